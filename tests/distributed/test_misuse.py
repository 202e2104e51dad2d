"""The usual mistakes around deepspeed.initialize (issue: a new user's own DeepSpeed loop), each on a real
one-process DeepSpeed engine: BeamLoRA names the fix before DeepSpeed's IndexError, or at the next save."""
import json
import os
import sys

import pytest

from beamlora_ds import testing

pytest.importorskip("deepspeed")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "misuse_worker.py")


@pytest.fixture(scope="module")
def said(tmp_path_factory):
    out = tmp_path_factory.mktemp("misuse")
    proc = testing.run([sys.executable, WORKER, str(out)], timeout=400, env=testing.single_process_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "misuse.json") as f:
        return json.load(f)


def test_an_optimizer_built_before_apply_is_warned_about_before_deepspeed_fails(said):
    case = said["optimizer_before_apply"]
    assert any("built before apply()" in w and "optimizer_param_groups" in w for w in case["warnings"]), case


@pytest.mark.parametrize("stage", [2, 3])
def test_apply_after_deepspeed_initialize_is_refused(said, stage):
    case = said[f"apply_after_initialize_zero{stage}"]
    assert case["raised"] == "RuntimeError" and "after deepspeed.initialize" in case["message"], case


def test_apply_to_an_engine_is_refused(said):
    case = said["apply_to_engine"]
    assert case["raised"] == "TypeError" and "before deepspeed.initialize" in case["message"], case


@pytest.mark.parametrize("what", ["engine_optimizer", "client_optimizer"])
def test_step_with_an_optimizer_under_deepspeed_names_the_engine(said, what):
    case = said[f"step_with_{what}"]
    assert case["raised"] == "TypeError" and "beam.step(engine)" in case["message"], case
    assert "not in the optimizer" not in case["message"]


def test_forgotten_steps_are_told_at_save_checkpoint_and_save_adapter(said):
    case = said["forgotten_steps"]
    told = [w for w in case["warnings"] if "BeamLoRA counted 0 optimizer steps, the optimizer counted 3" in w]
    assert case["raised"] is None and len(told) == 2, case  # once by save_checkpoint, once by save_adapter


def test_extra_steps_are_told_at_save_checkpoint(said):
    case = said["extra_steps"]
    assert any("BeamLoRA counted 4 optimizer steps, the optimizer counted 2" in w and "more often" in w
               for w in case["warnings"]), case
