"""BeamLoRA under DeepSpeed AutoTP (tensor parallelism), real processes on this CPU (gloo), against the unsplit
single-process run (tp_worker.train_reference, plain torch) of the same training on the tiny built-in Llama.

TP=2 on 2 processes under ZeRO 0, 1, 2 and 3, and TP=2 x DP=2 on 4 processes: the same pruned and source sets at
every reset, losses within 1e-5 relative, the consolidated adapter (what save_adapter writes) within 1e-4 relative,
and every replicated tensor bit-identical across the processes of a tensor-parallel group. Also: the norm
criterion, bf16, and a checkpoint taken in the middle of an interval (after a snapshot, before its reset) resumed on
a fresh engine equal to the run that never stopped. Each launch runs its trainings one after another.
"""
import math
import os

import pytest
import torch

import tp_worker as worker
from helpers import base_tensors_in_checkpoint
from train_runs import launch_runs

TIMEOUT_S = 420


def launch(folder, runs, nproc):
    return launch_runs(worker.__file__, folder, runs, nproc, TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tp"))
    two = {f"stage{s}": {"stage": s, "save_at_end": os.path.join(folder, f"end{s}")} for s in (0, 1, 2, 3)}
    two.update({"norm": {"stage": 2, "importance": "norm"}, "bf16": {"stage": 2, "dtype": "bf16"},
                "resumed": {"stage": 1, "stop_at": 6, "ckpt_dir": os.path.join(folder, "ckpt")}})
    results = launch(folder, two, nproc=2)
    results.update({f"dp2_{k}": v for k, v in launch(folder, {"stage1": {"stage": 1}}, nproc=4).items()})
    results["reference"] = worker.train_reference()
    results["reference_norm"] = worker.train_reference(importance="norm")
    results["folder"] = folder
    return results


def relative(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()


def assert_follows(reference, result, loss_rtol=1e-5, adapter_rtol=1e-4):
    assert [h["step"] for h in result["history"]] == [4, 8]
    assert sum(len(h["pruned"]) for h in reference["history"]) > 0  # the resets did something to compare
    assert result["history"] == reference["history"], "pruned/source sets differ from the unsplit run"
    for step, (got, want) in enumerate(zip(result["losses"], reference["losses"]), 1):
        assert abs(got - want) <= loss_rtol * abs(want), f"step {step}: loss {got} vs {want}"
    for step, (got, want) in enumerate(zip(result["grad_norms"], reference["grad_norms"]), 1):
        # the global norm clipping uses: counts the split factors on every process (DeepSpeed's mark); stage 0
        # does not report it (nan), its losses show it
        assert math.isnan(got) or abs(got - want) <= 10 * loss_rtol * want, f"step {step}: norm {got} vs {want}"
    assert result["adapter"].keys() == reference["adapter"].keys()
    for name, expected in reference["adapter"].items():
        assert result["adapter"][name].shape == expected.shape, name  # consolidated: the unsplit shape
        rel = relative(result["adapter"][name], expected)
        assert rel <= adapter_rtol, f"{name}: relative difference {rel:.2e}"


def assert_replicated_identical(result, tp=2):
    """Within each tensor-parallel group, every tensor that is not split is bit-identical on every process."""
    local = result["local"]
    split_factor = {name: ("lora_B" if kind == "column" else "lora_A") for name, (kind, _) in result["splits"].items()}
    assert split_factor, "no layer was split"
    for first in range(0, len(local), tp):
        for rank in range(first + 1, first + tp):
            assert torch.equal(local[rank]["scores"], local[first]["scores"])
            for key, value in local[first].items():
                name, _, factor = key.rpartition(".")
                if key != "scores" and split_factor.get(name) != factor:
                    assert torch.equal(local[rank][key], value), f"{key} differs between ranks {first} and {rank}"


def test_the_llama_projections_are_split_column_and_row_with_the_base_partition(runs):
    splits = runs["stage1"]["splits"]
    assert len(splits) == 14  # 7 projections x 2 layers
    for name, (kind, sizes) in splits.items():
        assert kind == ("row" if name.endswith(("o_proj", "down_proj")) else "column"), name
        assert len(sizes) == 2 and min(sizes) > 0
    local = runs["stage1"]["local"][0]
    assert local["model.layers.0.mlp.up_proj.lora_B"].shape == (86, 4)  # 172 outputs, half each
    assert local["model.layers.0.mlp.down_proj.lora_A"].shape == (4, 86)
    assert local["model.layers.0.mlp.up_proj.lora_A"].shape == (4, 64)  # replicated


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tp2_follows_the_unsplit_run(runs, stage):
    assert_follows(runs["reference"], runs[f"stage{stage}"])
    assert stage == 0 or not any(math.isnan(n) for n in runs[f"stage{stage}"]["grad_norms"])
    assert_replicated_identical(runs[f"stage{stage}"])


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_offline_export_of_a_tp_checkpoint_consolidates_the_slices(runs, stage):
    """beamlora-export on a checkpoint written under TP=2 (one set of files per slice, ZeRO 0, 1 and 3 layouts):
    the unsplit adapter the live engine's save_adapter gathered, and the peft files write."""
    from beamlora_ds.export.from_checkpoint import adapter_state_from_checkpoint, export_checkpoint

    folder = os.path.join(runs["folder"], f"end{stage}")
    state, _ = adapter_state_from_checkpoint(folder)
    live = runs[f"stage{stage}"]["adapter"]
    for name in state.module_names:
        for key in ("lora_A", "lora_B", "lora_score"):
            assert relative(getattr(state, key)[name], live[f"{name}.{key}"]) <= 1e-6, f"{name}.{key}"
    out = export_checkpoint(folder, os.path.join(runs["folder"], f"exported{stage}"))
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tp_checkpoints_hold_no_tensor_of_the_base(runs, stage):
    """Every tensor of every file of the TP=2 checkpoint, walked: none is a base weight, its tensor-parallel slice or
    a ZeRO-3 fragment (the base is loaded from its source on resume)."""
    from transformers import LlamaForCausalLM

    from beamlora_ds.loading import builtin

    base = LlamaForCausalLM(builtin.tiny_llama_config())
    assert base_tensors_in_checkpoint(os.path.join(runs["folder"], f"end{stage}"), base, tp=2) == []


def test_tp2_times_dp2_on_four_processes_follows_the_unsplit_run(runs):
    assert_follows(runs["reference"], runs["dp2_stage1"])
    assert_replicated_identical(runs["dp2_stage1"])


def test_norm_criterion_sums_the_split_factor_over_the_group(runs):
    assert runs["reference_norm"]["history"] != runs["reference"]["history"]  # the criterion matters here
    assert_follows(runs["reference_norm"], runs["norm"])
    assert_replicated_identical(runs["norm"])


def test_bf16_tracks_the_fp32_run(runs):
    result = runs["bf16"]
    assert [h["step"] for h in result["history"]] == [4, 8]
    for got, want in zip(result["losses"], runs["reference"]["losses"]):
        assert abs(got - want) <= 2e-2 * abs(want)
    assert_replicated_identical(result)


def test_a_resume_in_the_middle_of_an_interval_equals_the_run_that_never_stopped(runs):
    resumed, uninterrupted = runs["resumed"], runs["stage1"]
    assert resumed["history"] == uninterrupted["history"]
    for got, want in zip(resumed["losses"], uninterrupted["losses"]):
        assert abs(got - want) <= 1e-6 * abs(want)
    for name, expected in uninterrupted["adapter"].items():
        assert relative(resumed["adapter"][name], expected) <= 1e-6, name


def test_launch_train_with_tp2_ends_as_the_one_process_run(tmp_path):
    """`deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/tp2_zero1.json` on the tiny model, stopped
    after step 3 (between a reset and the next snapshot) and resumed: the same reset records, losses and adapter as
    one process with zero2.json, and the adapter (consolidated) loads in stock peft with the unsplit shapes. A
    resume that lost the data position, the snapshot or the optimizer state would not end equal."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from beamlora_ds.loading import builtin, models
    from train_runs import launch_train, read_log

    args = ["--model_name_or_path", "builtin-tiny", "--lora_r", "8", "--max_steps", "8", "--interval", "2",
            "--p0", "0.8", "--learning_rate", "3e-3", "--logging_steps", "1", "--lora_dropout", "0"]
    launches = [("one", "zero2", 1, []), ("tp", "tp2_zero1", 2, ["--stop_after", "3"]),
                ("tp", "tp2_zero1", 2, ["--resume"])]
    for name, config, nproc, extra in launches:
        proc = launch_train(str(tmp_path / name), "--ds_config", f"ds_configs/{config}.json", *args, *extra,
                            nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tp, one = (read_log(str(tmp_path / name)) for name in ("tp", "one"))
    assert any(r["type"] == "resume" for r in tp)
    resets = [{r["step"]: r["pruned"] for r in log if r["type"] == "reset"} for log in (tp, one)]
    assert resets[0] == resets[1] and sorted(resets[1]) == [2, 4, 6] and len(resets[1][2]) > 0
    losses = [{r["step"]: r["loss"] for r in log if r["type"] == "train"} for log in (tp, one)]
    assert sorted(losses[0]) == list(range(1, 9)) == sorted(losses[1])
    assert all(abs(losses[0][t] - losses[1][t]) <= 1e-5 * abs(losses[1][t]) for t in losses[1])
    got, want = (load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")) for name in ("tp", "one"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].shape == value.shape and relative(got[key], value) <= 1e-4, key
    peft_model = PeftModel.from_pretrained(models.load_model(builtin.BUILTIN_TINY, torch.float32, {}),
                                           str(tmp_path / "tp" / "adapter"))
    ids = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(peft_model(input_ids=ids).logits).all()
