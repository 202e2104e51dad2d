"""ZeroAccess in real 2-process DeepSpeed runs (CPU, gloo) against the single-process plain-torch run of the same
training (backends/deepspeed/zero_access.py against backends/torch_access.py's TorchAccess).

Each process trains on its half of every global batch, so with fp32 the ZeRO run must follow the
single-process run up to reduction-order rounding: identical pruned sets at every reset, adapter weights equal
within 1e-5 relative. All 2-process runs share one launch (zero_access_worker.py runs them one after another);
every launch has a timeout, so a collective that hangs fails the test instead of CI.
"""
import os

import pytest

import zero_access_worker as worker
from train_runs import launch_runs

TIMEOUT_S = 300


def two_process_runs(ckpt):
    runs = {f"stage{s}": {"stage": s} for s in (0, 1, 2, 3)}
    runs.update({
        "persist_check": {"stage": 3, "persist": True, "check": True},
        "norm": {"stage": 3, "importance": "norm"},
        "keep": {"stage": 3, "optimizer_state": "keep"},
        "bf16": {"stage": 3, "dtype": "bf16"},
        "desync": {"stage": 2, "plant_desync": True},
        "stage0_bf16": {"stage": 0, "dtype": "bf16"},
    })
    for s in (2, 3):  # stop after the snapshot (step 4), before the reset (8); then a fresh engine resumes
        runs[f"stop{s}"] = {"stage": s, "stop_at": 6, "ckpt_dir": os.path.join(ckpt, f"stage{s}")}
        runs[f"resume{s}"] = {"stage": s, "resume_from": os.path.join(ckpt, f"stage{s}")}
    return runs


def launch(folder, runs, nproc):
    return launch_runs(worker.__file__, folder, runs, nproc, TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-process run (one launch), the 1-process bf16 run, and the plain-torch references."""
    folder = str(tmp_path_factory.mktemp("zero"))
    results = launch(folder, two_process_runs(os.path.join(folder, "ckpt")), nproc=2)
    results["ckpt_dir"] = os.path.join(folder, "ckpt")
    results["bf16_one_process"] = launch(folder, {"bf16": {"stage": 3, "dtype": "bf16"}}, nproc=1)["bf16"]
    results["reference"] = worker.train_reference()
    for option in ({"importance": "norm"}, {"optimizer_state": "keep"}):
        results[f"reference_{next(iter(option.values()))}"] = worker.train_reference(**option)
    return results


def assert_follows(reference, result, rtol):
    assert "error" not in result, result.get("error")
    assert result["history"] == reference["history"], "pruned/source sets differ"
    assert [h["step"] for h in result["history"]] == [8, 16]
    assert sum(len(h["pruned"]) for h in result["history"]) > 0
    for name, expected in reference["weights"].items():
        got = result["weights"][name]
        rel = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        assert rel <= rtol, f"{name}: relative difference {rel:.2e} > {rtol}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_fp32_follows_single_process(runs, stage):
    assert_follows(runs["reference"], runs[f"stage{stage}"], rtol=1e-5)
    assert runs[f"stage{stage}"]["world"] == 2


def test_zero3_reset_communicates_what_the_formula_says_and_warns_on_partitioned_adapters(runs):
    result = runs["stage3"]
    # 2 modules x 8 ranks of fp32 logits; then, per pruned rank, its source's row of A and column of B
    # (in + out elements: q_proj 12 + 16, down_proj 16 + 8), each as master, exp_avg and exp_avg_sq
    per_rank = {"q_proj": 12 + 16, "down_proj": 16 + 8}
    expected = [4 * (2 * 8 + 3 * sum(per_rank[name] for name, _ in h["pruned"])) for h in result["history"]]
    assert result["all_reduce_bytes"] == expected
    assert "stage3_param_persistence_threshold >= 129" in result["log"]  # largest adapter tensor: 16 x 8


def test_zero3_resident_adapters_with_consistency_check_follow_single_process(runs):
    """The shipped ZeRO-3 setting: adapters persistent (whole on every process besides their partition), so a
    reset must write both copies; and the debug check must pass on a healthy run."""
    assert_follows(runs["reference"], runs["persist_check"], rtol=1e-5)
    assert "partitioned under ZeRO-3" not in runs["persist_check"]["log"]


@pytest.mark.parametrize("criterion", ["norm", "keep"])
def test_zero3_norm_criterion_and_keep_mode_follow_single_process(runs, criterion):
    assert_follows(runs[f"reference_{criterion}"], runs[criterion], rtol=1e-5)


def test_zero3_bf16_tracks_one_process_and_fp32(runs):
    """bf16 rounds every forward/backward op at 2^-9 relative; over 24 Adam steps at lr 2e-2 we measured about
    2% weight drift from fp32 (1-process and 2-process bf16 alike). 5% leaves margin yet catches a missed write,
    which moves weights by 50-120%. The reset decisions themselves are identical."""
    assert runs["bf16_one_process"]["world"] == 1
    assert_follows(runs["bf16_one_process"], runs["bf16"], rtol=5e-2)
    assert_follows(runs["reference"], runs["bf16"], rtol=5e-2)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_between_snapshot_and_reset_equals_uninterrupted(runs, stage):
    first = runs[f"stop{stage}"]
    assert first["global_step"] == 6 and first["history"] == []
    ckpt = os.path.join(runs["ckpt_dir"], f"stage{stage}")
    assert {"beamlora_state_rank0.pt", "beamlora_state_rank1.pt"} <= set(os.listdir(os.path.join(ckpt, "global_step6")))
    resumed = runs[f"resume{stage}"]
    assert resumed["global_step"] == 24
    assert_follows(runs[f"stage{stage}"], resumed, rtol=1e-6)


def test_consistency_check_detects_a_planted_desync(runs):
    assert "disagree" in runs["desync"]["error"]


def test_stage0_bf16_is_refused_with_a_fix(runs):
    assert "ZeRO stage 1, 2 or 3" in runs["stage0_bf16"]["error"]
