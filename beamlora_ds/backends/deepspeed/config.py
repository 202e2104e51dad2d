"""Reading DeepSpeed JSON configs, with clear errors: the file itself and the settings BeamLoRA needs to know
before an engine exists (ZeRO stage, precision, parameter offload, node-local checkpoints, AutoTP degree).
Filling their "auto" values for launch/train.py is train/ds_config_auto.py's job."""
from __future__ import annotations

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
    sections; train/ds_config_auto.py has refused both at once) trains in."""
    if config.get("fp16", {}).get("enabled") is True:
        return "fp16"
    return "bf16" if bool(config.get("bf16", {}).get("enabled", False)) else "fp32"


def offload_param_device(config: Dict[str, Any]) -> Optional[str]:
    """zero_optimization.offload_param.device ("cpu", "nvme", ...), None when parameters are not offloaded."""
    return (config.get("zero_optimization", {}).get("offload_param", {}) or {}).get("device")


def node_local_storage(config: dict) -> bool:
    """DeepSpeed's `checkpoint.use_node_local_storage`: each node keeps its own processes' checkpoint files."""
    return bool((config.get("checkpoint") or {}).get("use_node_local_storage", False))


def autotp_size(config: Optional[Dict[str, Any]]) -> int:
    """The tensor-parallel degree a DeepSpeed config asks for (1: none)."""
    section = (config or {}).get("tensor_parallel") or {}
    return int(section.get("autotp_size", 1) or 1)
