"""launch/train.py refuses bad input with one clear line (exit 2) before any expensive work, writing nothing."""
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model_name_or_path", "builtin-tiny", "--lora_r", "8", "--max_steps", "20", "--interval", "4"]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.json").write_text('{"zero_optimization": {"stage": 2,}}')
    (d / "micro2.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    (d / "fields.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "ok.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                                        for i in range(40)))
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("user data")
    return d


CASES = [
    ("no ds_config", [], "--ds_config is required"),
    ("missing ds_config", ["--ds_config", "{d}/nope.json"], "does not exist"),
    ("malformed ds_config", ["--ds_config", "{d}/bad.json"], "not valid JSON"),
    ("config vs command line", ["--ds_config", "{d}/micro2.json", "--per_device_train_batch_size", "4"],
     "train_micro_batch_size_per_gpu=2 but the command line sets --per_device_train_batch_size 4"),
    ("non-empty output dir", ["--ds_config", "ds_configs/zero2.json", "--output_dir", "{d}/full"], "not empty"),
    ("resume without checkpoint", ["--ds_config", "ds_configs/zero2.json", "--resume"], "no checkpoint"),
    ("missing fields", ["--ds_config", "ds_configs/zero2.json", "--dataset", "{d}/fields.jsonl"], "--prompt_field"),
    ("empty dataset", ["--ds_config", "ds_configs/zero2.json", "--dataset", "{d}/empty.jsonl"], "empty"),
    ("all too long", ["--ds_config", "ds_configs/zero2.json", "--dataset", "{d}/ok.jsonl", "--max_length", "4"],
     "longer than --max_length=4"),
    ("targets match nothing", ["--ds_config", "ds_configs/zero2.json", "--target_modules", "query_key_value"],
     "matched no module"),
    ("rank too large", ["--ds_config", "ds_configs/zero2.json", "--lora_r", "100"], "larger than the smaller dimension"),
    ("interval too long", ["--ds_config", "ds_configs/zero2.json", "--interval", "15"], "interval=15 is too long"),
    ("p0 out of range", ["--ds_config", "ds_configs/zero2.json", "--p0", "1.5"], "p0=1.5"),
    ("tau not positive", ["--ds_config", "ds_configs/zero2.json", "--tau", "0"], "tau=0"),
    ("batch larger than data", ["--ds_config", "ds_configs/zero2.json", "--dataset", "{d}/ok.jsonl",
                                "--per_device_train_batch_size", "64"], "make no full optimizer step of 64 x 1 x 1"),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_refused_cleanly(files, tmp_path, name, argv, words):
    out = tmp_path / "out"
    argv = [a.format(d=files) for a in argv]
    if "--output_dir" not in argv:
        argv += ["--output_dir", str(out)]
    env = {**os.environ, "MASTER_PORT": str(_port())}
    proc = subprocess.run([sys.executable, "launch/train.py", *TINY, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert words in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert sorted(os.listdir(files / "full")) == ["keep.txt"]


def test_rank_environment_from_launchers():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train

    assert train.rank_environment({"RANK": "3", "WORLD_SIZE": "8"}) == {}
    srun = train.rank_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                   "MASTER_ADDR": "node1"})
    assert (srun["RANK"], srun["WORLD_SIZE"], srun["LOCAL_RANK"], srun["MASTER_ADDR"]) == ("5", "16", "1", "node1")
    ompi = train.rank_environment({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                                   "OMPI_COMM_WORLD_LOCAL_RANK": "2", "MASTER_ADDR": "a"})
    assert (ompi["RANK"], ompi["WORLD_SIZE"], ompi["LOCAL_RANK"]) == ("2", "4", "2")
    assert train.rank_environment({})["WORLD_SIZE"] == "1"
    with pytest.raises(train.UsageError, match="MASTER_ADDR"):
        train.rank_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
