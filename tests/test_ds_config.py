"""DeepSpeed config reading and "auto" resolution: values by hand, conflicts named, nothing guessed."""
import json

import pytest

from beamlora_ds.ds_config import (DSConfigError, load_ds_config, offload_param_device, precision, resolve_auto,
                                   zero_stage)

KW = dict(world_size=2, micro_batch=4, accumulation=2, max_grad_norm=1.0, bf16=None, learning_rate=3e-4,
          weight_decay=0.0, total_steps=100, warmup_steps=3, hidden_size=64, persistence_threshold=700)


def test_shipped_configs_resolve(tmp_path):
    for name in ("zero2", "zero3", "zero3_offload"):
        config = resolve_auto(load_ds_config(f"ds_configs/{name}.json"), **KW)
        assert config["train_batch_size"] == 4 * 2 * 2 and config["gradient_clipping"] == 1.0
        assert config["bf16"]["enabled"] is False
    z3 = resolve_auto(load_ds_config("ds_configs/zero3.json"), **KW)["zero_optimization"]
    assert z3["stage3_param_persistence_threshold"] == 700  # ours, not HF's 10 * hidden
    assert z3["reduce_bucket_size"] == 64 * 64 and z3["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    offload = resolve_auto(load_ds_config("ds_configs/zero3_offload.json"), **KW)
    assert offload["optimizer"]["params"]["lr"] == 3e-4


def test_config_values_win_when_the_command_line_is_silent():
    config = resolve_auto({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1},
                          **{**KW, "micro_batch": None, "accumulation": None})
    assert config["train_batch_size"] == 16


@pytest.mark.parametrize("config, change, words", [
    ({"train_micro_batch_size_per_gpu": 2}, {}, "sets train_micro_batch_size_per_gpu=2 but the command line sets "
                                                "--per_device_train_batch_size 4"),
    ({"gradient_accumulation_steps": 4}, {}, "--gradient_accumulation_steps 2"),
    ({"train_batch_size": 10}, {}, "train_batch_size=10"),
    ({"gradient_clipping": 0.5}, {}, "--max_grad_norm 1.0"),
    ({"bf16": {"enabled": True}}, {"bf16": False}, "bf16.enabled=True"),
    ({"train_micro_batch_size_per_gpu": "auto"}, {"micro_batch": None}, "was not given"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, {}, "both fp16 and bf16"),
    ({"zero_optimization": {"sub_group_size": "auto"}}, {}, "zero_optimization.sub_group_size"),
])
def test_conflicts_and_unfillable_values_are_refused(config, change, words):
    with pytest.raises(DSConfigError) as info:
        resolve_auto(config, **{**KW, **change})
    assert words in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DSConfigError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(DSConfigError, match="line 1, column"):
        load_ds_config(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([1]))
    with pytest.raises(DSConfigError, match="JSON object"):
        load_ds_config(str(listed))
    with pytest.raises(DSConfigError, match="stage=4"):
        zero_stage({"zero_optimization": {"stage": 4}})


def test_stage_precision_and_offload_read_once_from_a_config():
    """The one reading of these settings that train.py, models.py and quant.py share (support.py judges them)."""
    assert zero_stage(None) == zero_stage({}) == 0
    assert zero_stage(load_ds_config("ds_configs/zero3.json")) == 3
    resolved = resolve_auto({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, **{**KW, "bf16": True})
    assert precision(resolved) == "bf16"
    assert precision({"fp16": {"enabled": True}}) == "fp16"
    assert precision({}) == precision({"bf16": {"enabled": False}}) == "fp32"
    assert offload_param_device(load_ds_config("ds_configs/zero3_offload.json")) == "cpu"
    assert offload_param_device({"zero_optimization": {"stage": 3, "offload_param": None}}) is None
    assert offload_param_device({}) is None

