"""BeamLoRACallback in a real transformers.Trainer (tiny built-in Llama, gradient accumulation 2, lora dropout):
resets at the right optimizer steps, and a run stopped at step 6 and resumed from the Trainer checkpoint ends
with exactly the adapter of the run that never stopped. The ZeRO-3 form is in tests/distributed/."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import run_launch  # noqa: E402

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "hf_worker.py")


def run_worker(out, *args, deepspeed_procs=0):
    if deepspeed_procs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["deepspeed", "--num_gpus", str(deepspeed_procs), "--master_port", str(port), WORKER]
    else:
        cmd = [sys.executable, WORKER]
    proc = run_launch(cmd + ["--out", str(out), *args], timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


def check_resume_is_exact(tmp_path, *extra, deepspeed_procs=0):
    full = run_worker(tmp_path / "full", *extra, deepspeed_procs=deepspeed_procs)
    assert full["global_step"] == 12
    assert [step for step, _ in full["history"]] == [4, 8]  # optimizer steps, not the 24 micro-steps
    assert len(full["history"][0][1]) > 0
    stopped = run_worker(tmp_path / "part", "--stop_at", "6", *extra, deepspeed_procs=deepspeed_procs)
    assert stopped["global_step"] == 6
    assert os.path.isfile(tmp_path / "part" / "checkpoint-6" / "beamlora_state_rank0.pt")
    resumed = run_worker(tmp_path / "part", "--resume", *extra, deepspeed_procs=deepspeed_procs)
    assert resumed["global_step"] == 12 and resumed["history"] == full["history"]
    for name, value in full["weights"].items():
        assert torch.allclose(resumed["weights"][name], value, rtol=1e-6, atol=1e-7), name


def test_trainer_resets_and_resumes_exactly(tmp_path):
    check_resume_is_exact(tmp_path)
