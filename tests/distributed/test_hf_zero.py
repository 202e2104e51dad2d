"""BeamLoRA in a real transformers.Trainer under DeepSpeed, 2 processes (the engine steps inside backward under
accelerate): resets at the right steps, checkpoints that hold the adapter but not the frozen base, and an exact
resume from one (the base is re-loaded from its source; DeepSpeed's strict module load accepts the adapter-only
state). ZeRO-2 keeps the whole base on every process, the case where a full save would be largest; ZeRO-3
partitions it."""
import pytest

from trainer_runs import check_resume_is_exact



@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_zero_resets_and_resumes_exactly(tmp_path, stage):
    check_resume_is_exact(tmp_path, ds_stage=stage, deepspeed_procs=2)
