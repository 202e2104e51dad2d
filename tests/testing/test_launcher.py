"""beamlora_ds.testing, the one launcher of tests and benchmarks: ports, /dev/shm clean-up, the process-group kill on
timeout and the single retry of a native abort (small shell and python commands stand in for DeepSpeed)."""
import mmap
import os
import socket
import subprocess
import sys
import time

import pytest

from beamlora_ds import testing


def test_free_port_is_bindable():
    port = testing.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert testing.deepspeed_command("w.py", ["--a", 1], nproc=3, port=port)[1:] == [
        "--num_gpus", "3", "--master_port", str(port), "w.py", "--a", "1"]
    env = testing.single_process_env(port, base={"KEEP": "1"})
    assert env == {"KEEP": "1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}


def test_remove_shm_buffers_removes_only_its_ports_files():
    port = testing.free_port()
    prefix = testing.SHM_BUFFERS.rstrip("*")
    mine = [f"{prefix}0_127.0.0.1_{port}_{rank}" for rank in (0, 1)]
    others = [f"{prefix}0_127.0.0.1_{port}1_0", f"{prefix}0_127.0.0.1_1{port}_0"]  # ports that contain this one
    try:
        for path in mine + others:
            open(path, "w").close()
        assert testing.remove_shm_buffers(port) == 2
        assert not any(map(os.path.exists, mine)) and all(map(os.path.exists, others))
    finally:
        for path in mine + others:
            if os.path.exists(path):
                os.unlink(path)


def test_sweep_by_time_spares_old_and_mapped_buffers(tmp_path, monkeypatch):
    """The session-end sweep removes what this session left, never a buffer a live process still maps."""
    monkeypatch.setattr(testing.launcher, "SHM_BUFFERS", str(tmp_path / "deepspeed_allreduce_buffer_*"))
    old, mapped, left = (tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_9_{i}" for i in range(3))
    old.write_bytes(b"x" * 16)
    os.utime(old, (1, 1))
    start = time.time() - 1
    mapped.write_bytes(b"x" * 16)
    left.write_bytes(b"x" * 16)
    with pytest.raises(ValueError, match="port or a start time"):
        testing.remove_shm_buffers()
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 16):
        assert testing.remove_shm_buffers(since=start) == 1
    assert old.exists() and mapped.exists() and not left.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_run_kills_the_whole_process_group_on_timeout():
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        testing.run(["sh", "-c", "sleep 60 & echo $!; sleep 60"], timeout=1)
    assert time.monotonic() - start < 20  # the pipes closed: the background sleep died with the group
    background = int(caught.value.output.split()[0])
    deadline = time.monotonic() + 10
    while _alive(background) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(background)


FAKE_LAUNCH = """
import os, sys
count = int(open(sys.argv[1]).read()) if os.path.exists(sys.argv[1]) else 0
open(sys.argv[1], "w").write(str(count + 1))
with open(sys.argv[1] + ".ports", "a") as f:
    f.write(sys.argv[3] + " " + os.environ["MASTER_PORT"] + "\\n")
if count == 0:
    print({crash!r}, file=sys.stderr)
    if {traceback}:
        raise SystemExit("Traceback (most recent call last): a Python error")
    sys.exit(1)
print("ok")
"""


@pytest.mark.parametrize("traceback", [False, True])
def test_run_retries_a_native_abort_once_on_a_new_port_but_not_a_python_error(tmp_path, traceback):
    script = tmp_path / "launch.py"
    script.write_text(FAKE_LAUNCH.format(crash=testing.NATIVE_CRASH, traceback=traceback))
    counter, port = tmp_path / "attempts", testing.free_port()
    env = testing.single_process_env(port)
    retried = []
    proc = testing.run([sys.executable, script, counter, "--master_port", port], timeout=60, env=env,
                       before_retry=lambda: retried.append(int(counter.read_text())))
    attempts = int(counter.read_text())
    ports = [line.split() for line in (tmp_path / "attempts.ports").read_text().splitlines()]
    if traceback:
        assert proc.returncode != 0 and attempts == 1 and retried == []
    else:
        assert proc.returncode == 0 and proc.stdout.endswith(testing.RETRIED + "ok\n") and attempts == 2
        assert ports[0] == [str(port)] * 2 and ports[1][0] == ports[1][1] != str(port)
        assert retried == [1]  # before_retry ran once, between the two tries


def test_spawn_starts_the_processes_deepspeed_would_and_stops_them_when_one_fails(tmp_path):
    """spawn.py gives each process the variables and the --local_rank argument DeepSpeed's launcher gives (one node
    of two here), and when one exits with an error it stops the others and exits with that error, saying so as
    DeepSpeed's launcher does (the kill-and-resume tests read that line)."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CROSS_RANK')\n"
        "sys.stdout.write(' '.join(os.environ[k] for k in keys) + ' ' + str(sys.argv[1:]) + '\\n')\n"  # one write: lines of two processes never interleave
        "if 'fail' in sys.argv and os.environ['LOCAL_RANK'] == '1':\n"
        "    os.kill(os.getpid(), 9)\n"
        "if 'fail' in sys.argv:\n"
        "    time.sleep(60)\n")
    ok = testing.run(testing.spawn_command(script, ["x"], nproc=2, port=4321, nnodes=2, node_rank=1), timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert sorted(ok.stdout.splitlines()) == [
        "2 0 4 2 127.0.0.1 4321 1 ['--local_rank=0', 'x']", "3 1 4 2 127.0.0.1 4321 1 ['--local_rank=1', 'x']"]
    started = time.time()
    failed = testing.run(testing.spawn_command(script, ["fail"], nproc=2, port=4322), timeout=60)
    assert failed.returncode == 247 and "exits with return code = -9" in failed.stderr  # as DeepSpeed: sys.exit(-9)
    assert time.time() - started < 30  # the other process, asleep for a minute, was stopped


def test_spawn_gives_one_thread_per_process_when_it_starts_several_unless_told(monkeypatch):
    """As torchrun: OMP_NUM_THREADS=1 for several processes on a node (a thread per core in each would oversubscribe
    the cores), an explicit value kept, one process left alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spawn_for_test", os.path.join(
        os.path.dirname(testing.__file__), "spawn.py"))
    spawn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spawn)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert spawn.worker_env(spawn.parse_args(["--nproc", "2", "--master_port", "1", "x.py"]), 0)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in spawn.worker_env(spawn.parse_args(["--master_port", "1", "x.py"]), 0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert spawn.worker_env(spawn.parse_args(["--nproc", "2", "--master_port", "1", "x.py"]), 1)["OMP_NUM_THREADS"] == "3"
