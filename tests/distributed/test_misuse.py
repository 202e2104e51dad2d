"""The usual mistakes around deepspeed.initialize (a new user's own DeepSpeed loop), each on a real 2-process
DeepSpeed engine: BeamLoRA names the fix before DeepSpeed's IndexError, or at the next save; every process says
the same (a check that raised on one process only would leave the other waiting)."""
import json
import shutil
import os

import pytest

from beamlora_ds import testing

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "misuse_worker.py")


@pytest.fixture(scope="module")
def said(tmp_path_factory):
    out = tmp_path_factory.mktemp("misuse")
    proc = testing.run(testing.spawn_command(WORKER, [out], 2), timeout=400,  # a retry starts fresh
                       before_retry=lambda: (shutil.rmtree(out), out.mkdir()))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_rank = []
    for rank in (0, 1):
        with open(out / f"misuse_rank{rank}.json") as f:
            per_rank.append(json.load(f))
    for name in per_rank[0]:  # the same outcome and value everywhere (warnings: only process 0 logs)
        assert [(r[name]["raised"], r[name]["value"]) for r in per_rank] == \
            [(per_rank[0][name]["raised"], per_rank[0][name]["value"])] * 2, name
    return per_rank[0]


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


@pytest.mark.parametrize("stage", [2, 3])
def test_the_engines_real_optimizer_is_read_for_score_weight_decay(said, stage):
    """ZeRO-2 splits parameters over processes and ZeRO-3 empties the base optimizer's lists between steps: the
    answer must still be all 14 scores (one decayed group) or none, on both processes."""
    assert said[f"decayed_scores_zero{stage}"]["value"] == 14, said[f"decayed_scores_zero{stage}"]
    assert said[f"undecayed_scores_zero{stage}"]["value"] == 0, said[f"undecayed_scores_zero{stage}"]


def test_zero0_with_deepspeeds_own_optimizer_steps(said):
    case = said["zero0_with_config_optimizer"]
    assert case["raised"] is None, case
