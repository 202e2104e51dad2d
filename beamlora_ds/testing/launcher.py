"""Starting DeepSpeed processes from tests and benchmarks: one place for what every such launch needs.

- the processes themselves, started by spawn.py as DeepSpeed's launcher starts them but without its start-up
  (`spawn_command`), or by `deepspeed` itself where a test checks a documented command (`deepspeed_command`);
- a free master port;
- a timeout that kills the whole process group (a process stuck in a collective never returns by itself);
- one retry of the rare native abort ("terminate called without an active exception", no Python error) that
  gloo + DeepSpeed's CPU shared-memory comm op show about once in a few hundred launches;
- removal of the 64 MB /dev/shm buffer that DeepSpeed's CPU comm op leaves per process and launch (hundreds of
  launches would otherwise fill the machine's RAM); see docs/platform.md.

Used by tests/ and benchmarks/ alike; users may find it handy for their own multi-process tests.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

NATIVE_CRASH = "terminate called without an active exception"
SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT / --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port=None, since: Optional[float] = None) -> int:
    """Unlink DeepSpeed's leftover /dev/shm comm buffers of one master `port` (the files are named
    ..._<addr>_<port>_<rank>), or (no port) those modified at or after `since` (a time.time() value) that no live
    process maps: a sweep must not pull the buffer from under a concurrent run whose other rank has yet to open it.
    Returns how many were removed."""
    if port is None and since is None:
        raise ValueError("remove_shm_buffers needs a port or a start time; it never removes every buffer.")
    pattern = re.compile(rf"_{int(port)}_\d+$") if port is not None else None
    in_use = _mapped_shm_files() if pattern is None else set()
    removed = 0
    for path in glob.glob(SHM_BUFFERS):
        try:
            if (pattern.search(os.path.basename(path)) if pattern is not None else
                    os.path.getmtime(path) >= since and path not in in_use):
                os.unlink(path)
                removed += 1
        except OSError:  # gone already, or another run's
            pass
    return removed


def _mapped_shm_files() -> set:
    """The buffer files some live process has mapped (read from /proc/*/maps; unreadable ones are skipped)."""
    marker = os.path.basename(SHM_BUFFERS).rstrip("*")
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip() for line in f if marker in line)
        except (OSError, IndexError):
            pass
    return mapped


def deepspeed_command(script: str, args: Iterable = (), nproc: int = 2, port: Optional[int] = None) -> List[str]:
    """`deepspeed --num_gpus nproc --master_port PORT script args...` (a free port when none is given): the launcher
    users type; tests of a documented command use it."""
    return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nproc), "--master_port",
            str(port or free_port()), str(script), *map(str, args)]


SPAWN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spawn.py")


def spawn_command(script: str, args: Iterable = (), nproc: int = 2, port: Optional[int] = None, nnodes: int = 1,
                  node_rank: int = 0) -> List[str]:
    """The same processes as `deepspeed_command` (the same variables, `--local_rank=N`), started by spawn.py
    without DeepSpeed's launcher start-up (about 6 s a launch here): what tests and benchmarks use. `nnodes` and
    `node_rank` start one node of a job of several, on this machine."""
    return [sys.executable, SPAWN, "--nproc", str(nproc), "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--master_port", str(port or free_port()), str(script), *map(str, args)]


def single_process_env(port: Optional[int] = None, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a world-of-one DeepSpeed process started with plain `python` (without RANK/MASTER_* it
    tries MPI discovery and fails)."""
    env = dict(os.environ if base is None else base)
    env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port or free_port())})
    return env


def _master_port(cmd: Sequence) -> Optional[str]:
    for i, c in enumerate(cmd):
        c = str(c)
        if c == "--master_port" and i + 1 < len(cmd):
            return str(cmd[i + 1])
        if c.startswith("--master_port="):
            return c.split("=", 1)[1]
    return None


def _with_port(cmd: Sequence, port: int) -> List[str]:
    cmd = [str(port) if i > 0 and str(cmd[i - 1]) == "--master_port" else str(c) for i, c in enumerate(cmd)]
    return [re.sub(r"^--master_port=\d+$", f"--master_port={port}", c) for c in cmd]


def _run_once(cmd, timeout, cwd, env, echo_prefix) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; kill the group at `timeout` (raising TimeoutExpired) or when this process
    is interrupted; remove the /dev/shm buffers of its master port (or of a world-of-one env's MASTER_PORT)
    afterwards."""
    port = _master_port(cmd) or (env or {}).get("MASTER_PORT")
    proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env, start_new_session=True)
    timed_out = threading.Event()

    def kill_group():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    collected = threading.Lock()  # held by whichever comes first: the timeout or the end of the output

    def on_timeout():
        if collected.acquire(blocking=False):  # the output is not complete: this is a real timeout
            timed_out.set()
            kill_group()

    timer = threading.Timer(timeout, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        stdout, stderr = _collect(proc, echo_prefix)
        collected.acquire(blocking=False)  # a timer firing from now on finds it held and does nothing
    except BaseException:  # Ctrl-C or an error here must not leave a DeepSpeed launch running
        kill_group()
        proc.wait()
        raise
    finally:
        timer.cancel()
        if port is not None:
            remove_shm_buffers(port)
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _collect(proc: subprocess.Popen, echo_prefix: Optional[str]):
    """(stdout, stderr) once every process holding the pipes has exited; stdout lines starting with
    `echo_prefix` are printed as they arrive."""
    if not echo_prefix:
        return proc.communicate()
    err: List[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith(echo_prefix):
            print(line[len(echo_prefix):], end="", flush=True)
    proc.wait()
    reader.join()
    return "".join(out), "".join(err)


RETRIED = "\n--- the launch aborted natively (no Python error) and was run again; its second try: ---\n"


def run(cmd: Sequence, timeout: float, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
        echo_prefix: Optional[str] = None, before_retry: Optional[Callable[[], None]] = None
        ) -> subprocess.CompletedProcess:
    """Run a (multi-process) command, capturing stdout and stderr; returns the CompletedProcess whatever the exit.

    Kills the whole process group and raises subprocess.TimeoutExpired after `timeout` seconds. A native abort with
    no Python error is retried once on a new master port (the returned output is then both tries', joined by
    RETRIED); a Python exception, failed assertion or timeout is not. A retry runs the command again as it is, after
    `before_retry()` (e.g. removing what a fresh run's first try wrote, so that the second starts fresh too): a
    launch that resumes from `latest` then resumes from what the first try wrote, so name the checkpoint where the
    step it resumes from matters.
    Lines of stdout starting with `echo_prefix` are printed as they arrive (without the prefix).
    """
    proc = _run_once(cmd, timeout, cwd, env, echo_prefix)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and NATIVE_CRASH in output and "Traceback" not in output:
        print(f"retrying a launch that aborted natively: {' '.join(map(str, cmd))[:200]}", file=sys.stderr)
        if before_retry is not None:
            before_retry()
        port = free_port()
        cmd = _with_port(cmd, port)
        if env is not None and "MASTER_PORT" in env:
            env = dict(env, MASTER_PORT=str(port))
        first = proc
        proc = _run_once(cmd, timeout, cwd, env, echo_prefix)
        # both tries' output: a retried launch that resumes finds what its first try already wrote (a later
        # checkpoint), so what a caller looks for in the output may have been said by the first try only
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, first.stdout + RETRIED + proc.stdout,
                                           first.stderr + RETRIED + proc.stderr)
    return proc


def launch(script: str, args: Iterable = (), nproc: int = 2, timeout: float = 3600, cwd: Optional[str] = None,
           echo_prefix: Optional[str] = None) -> str:
    """`script args` in `nproc` processes (spawn_command); returns stdout + stderr, raises RuntimeError (with the
    output's tail) when the launch fails or runs past `timeout` seconds."""
    cmd = spawn_command(os.path.abspath(script), args, nproc)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = run(cmd, timeout, cwd=cwd, env=env, echo_prefix=echo_prefix)
    except subprocess.TimeoutExpired as e:
        tail = ((e.output or "") + (e.stderr or ""))[-6000:]
        raise RuntimeError(f"killed after {timeout} s: {' '.join(cmd)}\n{tail}") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{output[-6000:]}")
    return output


def launch_for_json(script: str, args: Iterable, out_flag: str, **launch_kwargs) -> dict:
    """`launch` with `out_flag PATH` appended, PATH a temporary file the worker writes its JSON result to; returns
    it. The file is gone afterwards whether the launch succeeded or not."""
    with tempfile.TemporaryDirectory(prefix="beamlora_launch_") as folder:
        path = os.path.join(folder, "result.json")
        launch(script, [*args, out_flag, path], **launch_kwargs)
        with open(path) as f:
            return json.load(f)


def node_commands(script: str, port: int, args_per_node: Sequence[Sequence], hostfile: Optional[str] = None
                  ) -> List[List[str]]:
    """One command per node of a job of one process per node, all on this machine (start them with run_together):
    with a `hostfile`, `deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P`, as
    launch/slurm_70b.sbatch runs on each node; without, the same processes through spawn.py."""
    if hostfile is None:
        return [spawn_command(script, args, nproc=1, port=port, nnodes=len(args_per_node), node_rank=node)
                for node, args in enumerate(args_per_node)]
    deepspeed = shutil.which("deepspeed") or "deepspeed"
    return [[deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
             "127.0.0.1", "--master_port", str(port), str(script), *map(str, args)]
            for node, args in enumerate(args_per_node)]


def run_together(cmds, envs, timeout, cwd=None):
    """Start every command at once, each in its own process group (one thread each unless OMP_NUM_THREADS is set:
    they share this machine's cores); wait for all (killing every group still running at `timeout`, then raising
    TimeoutExpired). Returns one CompletedProcess per command (stdout and stderr merged)
    plus `.seconds`, its wall time from the common start."""
    procs, outputs, ends = [], [], []
    start = time.time()
    for cmd, env in zip(cmds, envs):
        if len(cmds) > 1:  # nodes sharing this machine's cores: a thread each, as torchrun gives several processes
            env = {"OMP_NUM_THREADS": "1", **(os.environ if env is None else env)}
        procs.append(subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env, start_new_session=True))
        outputs.append([])
        ends.append(None)

    def collect(i):
        outputs[i].append(procs[i].stdout.read())
        procs[i].wait()
        ends[i] = time.time() - start

    readers = [threading.Thread(target=collect, args=(i,), daemon=True) for i in range(len(procs))]
    for r in readers:
        r.start()
    deadline = start + timeout
    try:
        for r in readers:
            r.join(max(deadline - time.time(), 0))
    finally:  # a timeout, or Ctrl-C: no launch may be left running
        late = [p for p in procs if p.poll() is None]
        for p in late:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for r in readers:
            r.join(10)
    if late:
        raise subprocess.TimeoutExpired(cmds, timeout, output="\n".join("".join(o) for o in outputs))
    results = []
    for cmd, p, out, end in zip(cmds, procs, outputs, ends):
        result = subprocess.CompletedProcess(cmd, p.returncode, "".join(out), "")
        result.seconds = end
        results.append(result)
    return results
