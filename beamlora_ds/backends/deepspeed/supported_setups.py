"""Which ZeRO stage, precision and parameter offload BeamLoRA can train under: every such rule in one function.

launch/train.py asks it from the DeepSpeed config before anything is loaded, the ZeRO accesses from the engine at
the first step (zero_access.py), loading/four_bit_request.check_4bit_request for a 4-bit base. The rules and their
messages are the same everywhere; only the fix a message suggests follows the caller (a flag, a shipped config, a
library setting). Why each rule exists is measured in docs/platform.md.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

PRECISIONS = ("fp32", "bf16", "fp16")
# launch/train.py's loop has no fp16 path (no --fp16 flag, no handling of DeepSpeed's loss scale): bf16 or fp32
TRAIN_PY_PRECISIONS = ("fp32", "bf16")

_STAGE0_FIX = {  # what to do about ZeRO-0 in half precision, by caller
    "library": "Use ZeRO stage 1, 2 or 3 (set zero_optimization.stage), or train in fp32 with stage 0.",
    "cli": "Set zero_optimization.stage to 1, 2 or 3 (e.g. --ds_config ds_configs/zero2.json), or train in fp32 "
           "(no --bf16, bf16.enabled false).",
    "four_bit": "Use ZeRO stage 2 (ds_configs/qlora_single.json for one GPU: with one process it partitions "
                "nothing) or stage 3 (ds_configs/qlora_zero3.json).",
}


class UnsupportedSetupError(ValueError):
    """A ZeRO stage / precision / offload combination BeamLoRA cannot train under; the message names the fix."""


def check_zero_support(stage: int, precision: str, offload_param_device: Optional[str] = None, *,
                       cli: bool = False, four_bit: bool = False, pipeline_stages: int = 1) -> None:
    """Raise UnsupportedSetupError for a setup BeamLoRA cannot train under; return None otherwise.

    `precision`: "fp32", "bf16" or "fp16" (what the engine trains in); `offload_param_device`: ZeRO-3's
    offload_param.device ("cpu", "nvme", None). `cli`: the caller is launch/train.py (fp16 refused, fixes named as
    its flags); `four_bit`: the base is 4-bit (the fix points at the QLoRA configs); `pipeline_stages`: the stages
    of a DeepSpeed PipelineModule (1: no pipeline).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}.")
    if pipeline_stages > 1 and stage >= 2:
        raise UnsupportedSetupError(
            f"ZeRO stage {stage} with {pipeline_stages} pipeline stages: DeepSpeed's PipelineEngine refuses ZeRO-2 and "
            "ZeRO-3 (\"ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism\": they partition the gradients "
            "the pipeline schedule accumulates over micro-batches). Set zero_optimization.stage to 1 (or 0 in fp32).")
    if str(offload_param_device or "").lower() == "nvme":  # ZeRO-3 swaps those out of reach of any edit
        raise UnsupportedSetupError(
            "zero_optimization.offload_param.device is \"nvme\": BeamLoRA cannot edit parameters swapped out to "
            "NVMe. Set offload_param.device to \"cpu\" (offload_optimizer may stay on NVMe), e.g. as in "
            "ds_configs/zero3_offload.json.")
    if cli and precision not in TRAIN_PY_PRECISIONS:
        raise UnsupportedSetupError(
            f"The DeepSpeed config enables {precision}, which launch/train.py does not support yet: set "
            f"{precision}.enabled to false and train in bf16 (--bf16, bf16.enabled true or \"auto\") or fp32.")
    if stage == 0 and precision != "fp32":  # stage 0 keeps its fp32 master copies private to its optimizer
        fix = _STAGE0_FIX["four_bit" if four_bit else "cli" if cli else "library"]
        raise UnsupportedSetupError(f"ZeRO stage 0 with {precision}: BeamLoRA cannot edit DeepSpeed's private "
                                    f"fp32 copies there. {fix}")


def engine_setup(engine) -> Tuple[int, str, Optional[str]]:
    """(ZeRO stage, precision, offload_param device) of a DeepSpeed engine, read through its public methods."""
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    offload = getattr(getattr(engine, "zero_offload_param", lambda: None)(), "device", None)
    return engine.zero_optimization_stage(), precision, getattr(offload, "value", offload)  # an enum in DeepSpeed


def check_engine_support(engine) -> None:
    """check_zero_support for a live DeepSpeed engine (the controller's first step)."""
    check_zero_support(*engine_setup(engine))


def check_deepspeed_setup(ds_config: Union[str, dict], pipeline_stages: int = 1) -> None:
    """Refuse, before any model is built, a DeepSpeed config (a dict or a JSON file) BeamLoRA cannot train under:
    check_zero_support from its ZeRO stage, precision and parameter offload (`pipeline_stages`: the stages of the
    PipelineModule it will train). Raises UnsupportedSetupError naming the fix."""
    from .config import load_ds_config, offload_param_device, precision, zero_stage

    config = load_ds_config(ds_config) if isinstance(ds_config, str) else ds_config
    check_zero_support(zero_stage(config), precision(config), offload_param_device(config),
                       pipeline_stages=pipeline_stages)
