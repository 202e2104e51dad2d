"""Launching a benchmark worker under `deepspeed --num_gpus N` from a benchmark script, on this CPU or a GPU box.

One place for what every multi-process benchmark needs: a free port, a timeout that kills the whole process group
(a process stuck in a collective never returns by itself), one retry of the rare native gloo/shm start-up abort,
removal of the 64 MB /dev/shm buffer DeepSpeed's CPU comm op leaves per process, and the worker's JSON result.
"""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_CRASH = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU comm op leaves a 64 MB /dev/shm file per process and launch: drop those of this port only."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def launch(script: str, args, nproc: int = 2, timeout: float = 3600, echo_prefix: str = None) -> str:
    """Run `script args` under `deepspeed --num_gpus nproc` and return its output; lines starting with
    `echo_prefix` are printed as they come (without the prefix). Raises RuntimeError with the output's tail when
    the launch fails or runs past `timeout` seconds; a native abort with no Python error is retried once on a new
    port."""
    for attempt in (1, 2):
        port = free_port()
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nproc), "--master_port", str(port),
               os.path.abspath(script), *map(str, args)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        lines, timed_out = [], threading.Event()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
                                start_new_session=True)

        def kill_group():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill_group)
        timer.start()
        try:
            for line in proc.stdout:
                lines.append(line)
                if echo_prefix and line.startswith(echo_prefix):
                    print(line[len(echo_prefix):], end="", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
            remove_shm_buffers(port)
        output = "".join(lines)
        if rc == 0 and not timed_out.is_set():
            return output
        if timed_out.is_set():
            raise RuntimeError(f"worker killed after {timeout} s: {' '.join(cmd)}\n{output[-6000:]}")
        if attempt == 1 and NATIVE_CRASH in output and "Traceback" not in output:
            print("[retrying a launch that aborted natively]", flush=True)
            continue
        raise RuntimeError(f"worker failed (exit {rc}): {' '.join(cmd)}\n{output[-6000:]}")


def launch_for_json(script: str, args, out_flag: str, **launch_kwargs) -> dict:
    """`launch` with `out_flag PATH` appended, PATH a temporary file the worker writes its JSON to; returns it.
    The temporary file is gone afterwards whether the launch succeeded or not."""
    with tempfile.TemporaryDirectory(prefix="beamlora_bench_") as folder:
        path = os.path.join(folder, "result.json")
        launch(script, [*args, out_flag, path], **launch_kwargs)
        with open(path) as f:
            return json.load(f)
