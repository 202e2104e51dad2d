"""Filling a DeepSpeed config's "auto" values for launch/train.py: by hand-checked values, conflicts named, nothing
guessed; the first pass (before loading) and the second (with the model and the run's length) each fill only
their own values."""
import pytest

from beamlora_ds.backends.deepspeed.config import DSConfigError, load_ds_config, precision
from beamlora_ds.train.ds_config_auto import CommandLine, fill_before_loading, fill_for_model

GIVEN = dict(micro_batch=4, accumulation=2, max_grad_norm=1.0, bf16=None, learning_rate=3e-4, weight_decay=0.0)
MODEL = dict(learning_rate=3e-4, total_steps=100, warmup_steps=3, hidden_size=64, persistence_threshold=700)


def resolve(config, world_size=2, **given):
    """Both passes, as launch/train.py makes them."""
    first = fill_before_loading(config, world_size, CommandLine(**{**GIVEN, **given}))
    return fill_for_model(first, **MODEL)


def test_shipped_configs_resolve():
    for name in ("zero2", "zero3", "zero3_offload"):
        config = resolve(load_ds_config(f"ds_configs/{name}.json"))
        assert config["train_batch_size"] == 4 * 2 * 2 and config["gradient_clipping"] == 1.0
        assert config["bf16"]["enabled"] is False
    z3 = resolve(load_ds_config("ds_configs/zero3.json"))["zero_optimization"]
    assert z3["stage3_param_persistence_threshold"] == 700  # ours, not HF's 10 * hidden
    assert z3["reduce_bucket_size"] == 64 * 64 and z3["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    offload = resolve(load_ds_config("ds_configs/zero3_offload.json"))
    assert offload["optimizer"]["params"]["lr"] == 3e-4


def test_each_pass_fills_only_its_own_values():
    """Before loading, the model's values stay "auto" (the second pass fills them), and the input is not changed."""
    raw = load_ds_config("ds_configs/zero3.json")
    first = fill_before_loading(raw, 2, CommandLine(**GIVEN))
    assert raw["train_batch_size"] == "auto" and first["train_batch_size"] == 16
    assert first["zero_optimization"]["stage3_param_persistence_threshold"] == "auto"
    second = fill_for_model(first, **MODEL)
    assert first["zero_optimization"]["stage3_param_persistence_threshold"] == "auto"
    assert second["zero_optimization"]["stage3_param_persistence_threshold"] == 700
    scheduler = fill_for_model(dict(first, scheduler={"params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                                 "warmup_max_lr": "auto"}}), **MODEL)["scheduler"]
    assert scheduler["params"] == {"total_num_steps": 100, "warmup_num_steps": 3, "warmup_max_lr": 3e-4}


def test_config_values_win_when_the_command_line_is_silent():
    config = resolve({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1}, micro_batch=None,
                     accumulation=None)
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
        resolve(config, **change)
    assert words in str(info.value)


def test_auto_precision_follows_the_command_line():
    assert precision(resolve({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, bf16=True)) == "bf16"
    assert precision(resolve({"bf16": {"enabled": "auto"}})) == "fp32"
