"""BeamLoRACallback in a real transformers.Trainer under DeepSpeed ZeRO-3, 2 processes (engine steps inside
backward under accelerate): resets at the right steps and an exact resume from a Trainer checkpoint."""
import pytest

from test_hf import check_resume_is_exact

pytest.importorskip("deepspeed")


def test_trainer_zero3_resets_and_resumes_exactly(tmp_path):
    check_resume_is_exact(tmp_path, ds_stage=3, deepspeed_procs=2)
