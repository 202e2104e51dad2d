"""A 4-bit NF4 request checked before anything loads: what cannot work is refused with the fix, what can becomes
the settings `four_bit_load.load_4bit_model` loads with.

Why each rule (docs/platform.md): DeepSpeed casts every float parameter to the training dtype at initialize, so
the packed 4-bit storage must be stored as that dtype (bnb_4bit_quant_storage), or the cast would destroy it, and
ZeRO-3 partitions it as that dtype; transformers refuses a device_map under ZeRO-3; a half-precision compute dtype
other than the model's would round every layer's input; ZeRO-0 in half precision keeps its fp32 copies out of
reach (supported_setups.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..backends.deepspeed.config import DSConfigError, zero_stage
from ..backends.deepspeed.supported_setups import UnsupportedSetupError, check_zero_support

MIN_BITSANDBYTES = "0.43.0"  # first release with bnb_4bit_quant_storage (needed to partition 4-bit weights)
COMPUTE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class QuantizationError(ValueError):
    """A 4-bit request that cannot work, found before anything is loaded; the message says what to change."""


@dataclass(frozen=True)
class FourBitSettings:
    """A checked 4-bit request: what `load_4bit_model` passes to `BitsAndBytesConfig` and `from_pretrained`."""

    compute_dtype: torch.dtype
    quant_storage: torch.dtype  # the packed nibbles' container dtype = model_dtype
    model_dtype: torch.dtype    # the training dtype: the non-quantized parameters and the adapters
    double_quant: bool
    zero_stage: int

    def bnb_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=self.compute_dtype,
                                  bnb_4bit_quant_storage=self.quant_storage)


def dtype_name(dtype) -> str:
    """bf16, fp16, fp32 (or torch's name for another dtype), as messages and DeepSpeed configs say it."""
    return COMPUTE_DTYPES.get(dtype, str(dtype).replace("torch.", ""))


def training_dtype(ds_config: Optional[dict]) -> torch.dtype:
    """The dtype a DeepSpeed engine built from `ds_config` trains in: bf16, fp16 or fp32 (no config: fp32)."""
    config = ds_config or {}
    enabled = {key: config.get(key, {}).get("enabled", False) for key in ("bf16", "fp16")}
    unresolved = [key for key, value in enabled.items() if value == "auto"]
    if unresolved:
        raise QuantizationError(f"The DeepSpeed config has {unresolved[0]}.enabled = \"auto\": the 4-bit storage dtype "
                                "must be known before loading. Resolve the config first (launch/train.py does, with "
                                "beamlora_ds.train.ds_config_auto) or set it to true/false.")
    if enabled["bf16"] is True and enabled["fp16"] is True:
        raise QuantizationError("The DeepSpeed config enables both bf16 and fp16; enable one.")
    return torch.bfloat16 if enabled["bf16"] is True else torch.float16 if enabled["fp16"] is True else torch.float32


def check_4bit_request(ds_config: Optional[dict], compute_dtype: torch.dtype = torch.bfloat16,
                       double_quant: bool = True, device_map=None, quant_storage: Optional[torch.dtype] = None,
                       model_dtype: Optional[torch.dtype] = None) -> FourBitSettings:
    """Refuse a 4-bit NF4 request that cannot work, before anything is loaded. Returns the settings to load with.

    `ds_config` is the (resolved) DeepSpeed config the model will train under, or None/{} for no DeepSpeed; the
    model's dtype (non-quantized parameters, 4-bit storage) is its training dtype. Without DeepSpeed it is
    `model_dtype` (default fp32).
    """
    _check_bitsandbytes()
    if compute_dtype not in COMPUTE_DTYPES:
        raise QuantizationError(f"compute_dtype={compute_dtype!r}: use torch.bfloat16, torch.float16 or torch.float32.")
    if not isinstance(double_quant, bool):
        raise QuantizationError(f"double_quant={double_quant!r}: use True or False.")
    try:
        stage = zero_stage(ds_config)
    except DSConfigError as e:  # callers of this function catch QuantizationError
        raise QuantizationError(str(e)) from e
    if stage == 3 and device_map is not None:
        raise QuantizationError(f"device_map={device_map!r} under ZeRO stage 3: DeepSpeed places and partitions the "
                                "model itself (transformers refuses a device_map with ZeRO-3). Remove device_map; each "
                                "process loads onto its own device (LOCAL_RANK).")
    if ds_config:
        trains_in = training_dtype(ds_config)
        if model_dtype is not None and model_dtype != trains_in:
            raise QuantizationError(f"model_dtype={dtype_name(model_dtype)} but the DeepSpeed config trains in "
                                    f"{dtype_name(trains_in)} (its bf16/fp16 sections), and DeepSpeed casts the model to "
                                    "that. Leave model_dtype unset, or change the config.")
        model_dtype = trains_in
    elif model_dtype is None:
        model_dtype = torch.float32
    elif model_dtype not in COMPUTE_DTYPES:
        raise QuantizationError(f"model_dtype={model_dtype!r}: use torch.bfloat16, torch.float16 or torch.float32.")
    storage = model_dtype if quant_storage is None else quant_storage
    if storage != model_dtype:
        raise QuantizationError(f"quant_storage={dtype_name(storage)} but the model trains in {dtype_name(model_dtype)}: "
                                "DeepSpeed casts every float parameter to the training dtype, which would destroy "
                                "packed 4-bit weights stored as another dtype, and ZeRO-3 partitions them as that "
                                "dtype. Leave quant_storage unset (it follows the training dtype, "
                                f"{dtype_name(model_dtype)}).")
    halves = {torch.bfloat16, torch.float16}
    if compute_dtype in halves and model_dtype in halves and compute_dtype != model_dtype:
        raise QuantizationError(f"4-bit compute dtype {dtype_name(compute_dtype)} with a model (and 4-bit storage) in "
                                f"{dtype_name(model_dtype)}: every 4-bit layer would round its {dtype_name(model_dtype)} input "
                                f"to {dtype_name(compute_dtype)} (fp16 overflows above 65504, bf16 keeps 8 bits of "
                                f"mantissa). Use compute_dtype={dtype_name(model_dtype)}, or make the DeepSpeed config's "
                                "bf16/fp16 section match the compute dtype.")
    if ds_config:  # without DeepSpeed there is no ZeRO setup to refuse
        try:
            check_zero_support(stage, dtype_name(model_dtype), four_bit=True)
        except UnsupportedSetupError as e:
            raise QuantizationError(str(e)) from e
    if compute_dtype == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise QuantizationError("bf16 compute on a GPU without bf16 support: train in fp32 (no --bf16; compute fp32), "
                                "or use a GPU with bf16 (Ampere or newer).")
    return FourBitSettings(compute_dtype=compute_dtype, quant_storage=storage, model_dtype=model_dtype,
                           double_quant=double_quant, zero_stage=stage)


def _check_bitsandbytes() -> None:
    """bitsandbytes importable and recent enough to store 4-bit weights as the training dtype."""
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a broken install failing while it loads its native library
        raise QuantizationError(f"4-bit (nf4) bases need bitsandbytes, which cannot be imported here "
                                f"({type(e).__name__}: {e}). Install it with: "
                                f"pip install 'bitsandbytes>={MIN_BITSANDBYTES}' - or train without quantization "
                                "(--quantization none).") from e
    from packaging.version import Version

    version = getattr(bitsandbytes, "__version__", "0")
    if Version(version) < Version(MIN_BITSANDBYTES):
        raise QuantizationError(f"bitsandbytes {version} is too old for 4-bit bases under DeepSpeed: it has no "
                                f"quant_storage. Upgrade: pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'.")
