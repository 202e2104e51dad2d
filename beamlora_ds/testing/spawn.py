"""Start the processes of one node of a multi-process job the way DeepSpeed's launcher does, without its start-up.

    python beamlora_ds/testing/spawn.py --nproc 2 --master_port 29500 script.py args...
    python beamlora_ds/testing/spawn.py --nproc 2 --nnodes 2 --node_rank 1 --master_port 29500 script.py args...

Each process gets the variables DeepSpeed's launcher sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR,
MASTER_PORT, CROSS_RANK, CROSS_SIZE) and `--local_rank=N` after the script, as `deepspeed --num_gpus N` gives them,
and, when it starts several and none is set, OMP_NUM_THREADS=1 as torchrun gives it (torch's default, a thread per
core in every process, oversubscribes the cores: a 2-process test ran 1.2-1.5x longer on 2 cores);
the processes then run real DeepSpeed and torch.distributed, joined by `deepspeed.init_distributed`. When one exits
with an error, the others (and what they started) are stopped and this launcher exits with its code, saying "exits
with return code = N" as DeepSpeed's launcher does. What it saves: DeepSpeed's launcher imports torch and DeepSpeed
twice (its runner, then its per-node launcher) before the first worker starts, about 6 s a launch on a 2-core CPU
(benchmarks/launch_overhead.py, docs/testing.md); a test suite of a hundred launches spends ten minutes on that. Run
it by its path: it uses the standard library only, and `python -m beamlora_ds.testing.spawn` would import the whole
package first.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Tuple

STOP_GRACE_S = 5.0  # how long the others get to exit after SIGTERM before they are killed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spawn.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1, help="processes on this node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the job")
    p.add_argument("--node_rank", type=int, default=0, help="this node's place among them")
    p.add_argument("--master_addr", default="127.0.0.1")
    p.add_argument("--master_port", type=int, required=True)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        p.error("need --nproc >= 1, --nnodes >= 1 and 0 <= --node_rank < --nnodes")
    return args


def worker_env(args: argparse.Namespace, local_rank: int) -> dict:
    """The variables DeepSpeed's launcher gives process `local_rank` of node `args.node_rank` (the accelerators it
    sees: those of `deepspeed --num_gpus N`, unless the caller narrowed them already)."""
    env = dict(os.environ, RANK=str(args.node_rank * args.nproc + local_rank), LOCAL_RANK=str(local_rank),
               WORLD_SIZE=str(args.nproc * args.nnodes), LOCAL_SIZE=str(args.nproc), MASTER_ADDR=args.master_addr,
               MASTER_PORT=str(args.master_port), CROSS_RANK=str(args.node_rank), CROSS_SIZE=str(args.nnodes))
    env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(args.nproc))))
    if args.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def descendants(pid: int) -> List[int]:
    """Every process started by `pid`, its children's children included (Linux /proc; [] where unreadable)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def stop(processes: List[Tuple[list, subprocess.Popen]]) -> None:
    """SIGTERM to every process still running and to what it started, SIGKILL to all of them still there after
    STOP_GRACE_S (as DeepSpeed's launcher stops a process tree)."""
    running = [proc for _, proc in processes if proc.poll() is None]
    family = [pid for proc in running for pid in descendants(proc.pid)]
    for pid in [proc.pid for proc in running] + family:
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in family:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:  # gone already
        pass


def first_failure(finished: List[Tuple[list, int]]) -> Optional[Tuple[list, int]]:
    """The failure to report among processes that ended at the same poll: a death by signal (a SIGKILL a test sent)
    before an error exit (what the others then ran into)."""
    failed = [(cmd, code) for cmd, code in finished if code != 0]
    return min(failed, key=lambda item: item[1] >= 0) if failed else None


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    processes: List[Tuple[list, subprocess.Popen]] = []

    def on_signal(signum, frame):  # the launcher is stopped: so are its processes
        stop(processes)
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for local_rank in range(args.nproc):
        cmd = [sys.executable, "-u", args.script, f"--local_rank={local_rank}", *args.args]
        processes.append((cmd, subprocess.Popen(cmd, env=worker_env(args, local_rank))))
    alive = list(processes)
    while alive:
        finished = [(cmd, proc.returncode) for cmd, proc in alive if proc.poll() is not None]
        alive = [(cmd, proc) for cmd, proc in alive if proc.returncode is None]
        failure = first_failure(finished)
        if failure is not None:
            stop(alive)
            cmd, code = failure
            print(f"{cmd} exits with return code = {code}", file=sys.stderr, flush=True)
            return code % 256  # -9 -> 247, what DeepSpeed's launcher exits with (sys.exit(-9))
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
