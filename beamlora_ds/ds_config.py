"""DeepSpeed JSON configs: read them with clear errors and fill "auto" values the way HF's integration does.

A value set both in the config and on the command line must agree; a conflict is an error naming both,
never a silent choice. Values the command line did not set are taken from the config.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional


class DSConfigError(ValueError):
    """A DeepSpeed config problem found before any model is loaded; the message says what to change."""


def load_ds_config(path: str) -> Dict[str, Any]:
    if not path:
        raise DSConfigError("--ds_config is required: pass one of the files in ds_configs/ (e.g. ds_configs/zero3.json).")
    if not os.path.isfile(path):
        raise DSConfigError(f"--ds_config {path!r} does not exist. Shipped configs are in ds_configs/.")
    with open(path) as f:
        text = f.read()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise DSConfigError(f"--ds_config {path!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from e
    if not isinstance(config, dict):
        raise DSConfigError(f"--ds_config {path!r} must hold a JSON object, not {type(config).__name__}.")
    return config


def zero_stage(config: Optional[Dict[str, Any]]) -> int:
    """The config's ZeRO stage (0 when it sets none, or for no config at all); refuses an unknown one."""
    stage = (config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DSConfigError(f"zero_optimization.stage={stage!r}: use 0, 1, 2 or 3.")
    return stage


def precision(config: Dict[str, Any]) -> str:
    """"bf16", "fp16" or "fp32": what an engine built from a resolved config (no "auto" left in its bf16/fp16
    sections; resolve_auto has refused both at once) trains in."""
    if config.get("fp16", {}).get("enabled") is True:
        return "fp16"
    return "bf16" if bool(config.get("bf16", {}).get("enabled", False)) else "fp32"


def offload_param_device(config: Dict[str, Any]) -> Optional[str]:
    """zero_optimization.offload_param.device ("cpu", "nvme", ...), None when parameters are not offloaded."""
    return (config.get("zero_optimization", {}).get("offload_param", {}) or {}).get("device")


def _settle(config: dict, key: str, cli_value: Optional[Any], cli_flag: str, where: str) -> Any:
    """One value that may come from the config ("auto" or a number) and/or the command line (None = not given)."""
    current = config.get(key, "auto")
    if current == "auto":
        if cli_value is None:
            raise DSConfigError(f"{where}{key} is \"auto\" and {cli_flag} was not given: set one of them.")
        config[key] = cli_value
        return cli_value
    if cli_value is not None and cli_value != current:
        raise DSConfigError(f"Conflict: the DeepSpeed config sets {where}{key}={current!r} but the command line "
                            f"sets {cli_flag} {cli_value!r}. Remove one, or make them equal (or use \"auto\").")
    return current


def resolve_auto(config: Dict[str, Any], *, world_size: int, micro_batch: Optional[int], accumulation: Optional[int],
                 max_grad_norm: Optional[float], bf16: Optional[bool], learning_rate: float, weight_decay: float,
                 total_steps: Optional[int], warmup_steps: Optional[int], hidden_size: Optional[int],
                 persistence_threshold: Optional[int]) -> Dict[str, Any]:
    """A copy of `config` with every "auto" filled; raises DSConfigError on conflicts and impossible batches.

    Pass total_steps/warmup_steps/hidden_size/persistence_threshold as None in a first pass (before the model
    and data are known): the values that need them are then left as they are.
    """
    config = copy.deepcopy(config)
    _settle_batch(config, world_size, micro_batch, accumulation)
    _settle(config, "gradient_clipping", max_grad_norm, "--max_grad_norm", "")
    _settle_precision(config, bf16)
    _fill_optimizer_and_scheduler(config, learning_rate, weight_decay, total_steps, warmup_steps)
    zero = config.get("zero_optimization", {})
    if hidden_size is not None:
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))):
            if zero.get(key) == "auto":
                zero[key] = value
    if persistence_threshold is not None and zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = persistence_threshold  # keep adapters resident (not HF's 10*h)
    if total_steps is not None:
        left = _find_auto(config)
        if left:
            raise DSConfigError(f"The DeepSpeed config has \"auto\" at {left} that beamlora_ds cannot fill; "
                                "set a value there.")
    return config


def _settle_batch(config: dict, world_size: int, micro_batch: Optional[int], accumulation: Optional[int]) -> None:
    """Micro-batch and accumulation from the config or the command line; train_batch_size their product."""
    micro = _settle(config, "train_micro_batch_size_per_gpu", micro_batch, "--per_device_train_batch_size", "")
    accum = _settle(config, "gradient_accumulation_steps", accumulation, "--gradient_accumulation_steps", "")
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


def _fill_optimizer_and_scheduler(config: dict, learning_rate: float, weight_decay: float,
                                  total_steps: Optional[int], warmup_steps: Optional[int]) -> None:
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", learning_rate), ("weight_decay", weight_decay), ("betas", [0.9, 0.999]),
                           ("eps", 1e-8)):
            if params.get(key) == "auto":
                params[key] = value
    scheduler = config.get("scheduler")
    if scheduler is not None and total_steps is not None:
        params = scheduler.setdefault("params", {})
        for key, value in (("total_num_steps", total_steps), ("warmup_num_steps", warmup_steps),
                           ("warmup_max_lr", learning_rate), ("warmup_min_lr", 0.0), ("cos_min_ratio", 0.0)):
            if params.get(key) == "auto":
                params[key] = value


def _find_auto(node, path: str = "") -> Optional[str]:
    if node == "auto":
        return path or "<root>"
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def node_local_storage(config: dict) -> bool:
    """DeepSpeed's `checkpoint.use_node_local_storage`: each node keeps its own processes' checkpoint files."""
    return bool((config.get("checkpoint") or {}).get("use_node_local_storage", False))
