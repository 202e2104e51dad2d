"""Filling the "auto" values of a DeepSpeed config for launch/train.py, as Hugging Face's integration fills them.

Twice, because not everything is known at once: `fill_before_loading` takes what the command line says (batch
sizes, clipping, precision, the optimizer's values) and is checked before anything loads; `fill_for_model` adds
what needs the model and the run's length (the scheduler's values, bucket sizes, the ZeRO-3 persistence
threshold) right before deepspeed.initialize, and refuses any "auto" left. A value set both in the config and on
the command line must agree: a conflict is an error naming both, never a silent choice.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..backends.deepspeed.config import DSConfigError


@dataclass(frozen=True)
class CommandLine:
    """What the command line says about values a DeepSpeed config may also set; None: not given there (the config
    decides, and an "auto" in it is an error)."""

    micro_batch: Optional[int]
    accumulation: Optional[int]
    max_grad_norm: Optional[float]
    bf16: Optional[bool]
    learning_rate: float
    weight_decay: float


def fill_before_loading(config: Dict[str, Any], world_size: int, given: CommandLine) -> Dict[str, Any]:
    """A copy of `config` with batch sizes (for `world_size` data-parallel processes), clipping, precision and the
    optimizer section's values filled; DSConfigError on conflicts and impossible batches."""
    config = copy.deepcopy(config)
    _settle_batch(config, world_size, given.micro_batch, given.accumulation)
    _settle(config, "gradient_clipping", given.max_grad_norm, "--max_grad_norm")
    _settle_precision(config, given.bf16)
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", given.learning_rate), ("weight_decay", given.weight_decay),
                           ("betas", [0.9, 0.999]), ("eps", 1e-8)):
            if params.get(key) == "auto":
                params[key] = value
    return config


def fill_for_model(config: Dict[str, Any], *, learning_rate: float, total_steps: int, warmup_steps: int,
                   hidden_size: Optional[int], persistence_threshold: int) -> Dict[str, Any]:
    """A copy of a config `fill_before_loading` returned, with the scheduler's values (the run's length and
    warmup, the peak `learning_rate`), the bucket sizes (from the model's `hidden_size`, when it has one) and the
    persistence threshold that keeps the adapters resident under ZeRO-3; DSConfigError for any "auto" left."""
    config = copy.deepcopy(config)
    scheduler = config.get("scheduler")
    if scheduler is not None:
        params = scheduler.setdefault("params", {})
        for key, value in (("total_num_steps", total_steps), ("warmup_num_steps", warmup_steps),
                           ("warmup_max_lr", learning_rate), ("warmup_min_lr", 0.0), ("cos_min_ratio", 0.0)):
            if params.get(key) == "auto":
                params[key] = value
    zero = config.get("zero_optimization", {})
    if hidden_size is not None:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))):
            if zero.get(key) == "auto":
                zero[key] = value
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = persistence_threshold  # keep adapters resident (not HF's 10*h)
    left = _find_auto(config)
    if left:
        raise DSConfigError(f"The DeepSpeed config has \"auto\" at {left} that beamlora_ds cannot fill; set a value "
                            "there.")
    return config


def _settle(config: dict, key: str, cli_value: Optional[Any], cli_flag: str) -> Any:
    """One value that may come from the config ("auto" or a number) and/or the command line (None = not given)."""
    current = config.get(key, "auto")
    if current == "auto":
        if cli_value is None:
            raise DSConfigError(f"{key} is \"auto\" and {cli_flag} was not given: set one of them.")
        config[key] = cli_value
        return cli_value
    if cli_value is not None and cli_value != current:
        raise DSConfigError(f"Conflict: the DeepSpeed config sets {key}={current!r} but the command line sets "
                            f"{cli_flag} {cli_value!r}. Remove one, or make them equal (or use \"auto\").")
    return current


def _settle_batch(config: dict, world_size: int, micro_batch: Optional[int], accumulation: Optional[int]) -> None:
    """Micro-batch and accumulation from the config or the command line; train_batch_size their product."""
    micro = _settle(config, "train_micro_batch_size_per_gpu", micro_batch, "--per_device_train_batch_size")
    accum = _settle(config, "gradient_accumulation_steps", accumulation, "--gradient_accumulation_steps")
    for key, value, flag in (("train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size"),
                             ("gradient_accumulation_steps", accum, "--gradient_accumulation_steps")):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise DSConfigError(f"{key}={value!r}: must be a positive integer. Fix it in the DeepSpeed config, or set "
                                f"it to \"auto\" and pass {flag}.")
    global_batch = micro * accum * world_size
    total = config.get("train_batch_size", "auto")
    if total == "auto":
        config["train_batch_size"] = global_batch
    elif not (isinstance(total, int) and not isinstance(total, bool) and total >= 1 and total % world_size == 0):
        raise DSConfigError(f"train_batch_size={total!r} in the DeepSpeed config cannot be split over {world_size} "
                            f"processes: it must be a positive multiple of the world size. Set it to \"auto\" "
                            f"(here: micro-batch {micro} x accumulation {accum} x {world_size} processes = "
                            f"{global_batch}), or to such a multiple.")
    elif total != global_batch:
        raise DSConfigError(f"train_batch_size={total} in the DeepSpeed config is not micro-batch {micro} x "
                            f"accumulation {accum} x {world_size} processes = {global_batch}. Set it to \"auto\" or "
                            f"{global_batch}, or change --per_device_train_batch_size / --gradient_accumulation_steps "
                            f"(or their config values) so the product is {total}.")


def _settle_precision(config: dict, bf16: Optional[bool]) -> None:
    """"auto" bf16 follows --bf16, "auto" fp16 is off (the command line has no --fp16); conflicts are refused."""
    for section in ("bf16", "fp16"):
        if section in config and config[section].get("enabled") == "auto":
            config[section]["enabled"] = bool(bf16) if section == "bf16" else False
    if bf16 is not None and config.get("bf16", {}).get("enabled", False) != bf16:
        raise DSConfigError(f"Conflict: the DeepSpeed config has bf16.enabled={config.get('bf16', {}).get('enabled', False)} "
                            f"but the command line {'sets' if bf16 else 'does not set'} --bf16.")
    if config.get("fp16", {}).get("enabled") is True and config.get("bf16", {}).get("enabled") is True:
        raise DSConfigError("The DeepSpeed config enables both fp16 and bf16; enable one.")


def _find_auto(node, path: str = "") -> Optional[str]:
    if node == "auto":
        return path or "<root>"
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


