"""BeamLoRACallback in a real transformers.Trainer (tiny built-in Llama, gradient accumulation 2, lora dropout):
resets at the right optimizer steps, and a run stopped at step 6 and resumed from the Trainer checkpoint ends
with exactly the adapter of the run that never stopped. Here in this process, without DeepSpeed; the ZeRO-3 form
(the same three runs, each a 2-process launch) is in tests/distributed/test_hf_zero.py."""
import os

import pytest
import torch

from beamlora_ds import testing

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "hf_worker.py")


def run_worker(runs, ds_stage=-1, deepspeed_procs=0):
    """Each run ({"out", "stop_at", "resume"}) in turn: hf_worker.train() in this process, or hf_worker.py under
    `deepspeed --num_gpus deepspeed_procs` (one launch per run); their results."""
    if not deepspeed_procs:
        import hf_worker

        return [hf_worker.train(**run) for run in runs]
    results = []
    for run in runs:
        args = ["--out", run["out"], "--stop_at", run.get("stop_at", 0), "--ds_stage", ds_stage]
        proc = testing.run(testing.deepspeed_command(WORKER, args + (["--resume"] if run.get("resume") else []),
                                                     deepspeed_procs), timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.append(torch.load(os.path.join(run["out"], "result.pt"), weights_only=False))
    return results


def check_resume_is_exact(tmp_path, ds_stage=-1, deepspeed_procs=0):
    """The run that never stopped, one stopped at step 6, and its resume from the Trainer checkpoint."""
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    full, stopped, resumed = run_worker([{"out": full_dir}, {"out": part_dir, "stop_at": 6},
                                         {"out": part_dir, "resume": True}], ds_stage, deepspeed_procs)
    assert full["global_step"] == 12
    assert [step for step, _ in full["history"]] == [4, 8]  # optimizer steps, not the 24 micro-steps
    assert len(full["history"][0][1]) > 0
    assert stopped["global_step"] == 6
    assert os.path.isfile(os.path.join(part_dir, "checkpoint-6", "beamlora_state_rank0.pt"))
    assert resumed["global_step"] == 12 and resumed["history"] == full["history"]
    for name, value in full["weights"].items():
        assert torch.allclose(resumed["weights"][name], value, rtol=1e-6, atol=1e-7), name


def test_trainer_resets_and_resumes_exactly(tmp_path):
    check_resume_is_exact(tmp_path)
