"""bitsandbytes' CPU repacking: turning it off for training, and reading a weight it already repacked.

On CPUs with AVX512-BF16, a Linear4bit in eval mode fed a tensor without grad repacks its weight in place into a
kernel layout (docs/platform.md, "The AVX512-BF16 repack trap"). Under ZeRO-3 that silently corrupts the
partitioned model, and a later save_checkpoint fails; `support_avx512bf16_for_cpu = False` turns that path off (it
only disables a CPU inference speed-up). A model repacked anyway (an eval-mode forward elsewhere) can still be
merged: `dequantize_4bit_weight` undoes the repacking on a copy, through bitsandbytes' private inverse, the one
bitsandbytes internal beamlora_ds relies on (docs/platform.md).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .four_bit_request import QuantizationError


def disable_cpu_repacking(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place CPU repacking (AVX512-BF16 kernel layout) on every Linear4bit of `model`;
    returns the number of Linear4bit layers. Refuses a model whose weights an eval-mode forward already repacked
    (bitsandbytes 0.50's inverse of it is wrong without double quantization): call this right after loading."""
    from bitsandbytes.nn import Linear4bit

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise QuantizationError(f"{name}: its 4-bit weight was already repacked for the CPU inference kernel "
                                        "(an eval-mode forward without grad on an AVX512-BF16 CPU). Reload the model "
                                        "and call disable_cpu_repacking before any forward (load_4bit_model does).")
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def convert_weight_packed_for_cpu_inverse(data: torch.Tensor, quant_state):
    """bitsandbytes' own inverse of its CPU repacking (private: `bitsandbytes.functional`)."""
    import bitsandbytes.functional as bnbf

    return bnbf._convert_weight_packed_for_cpu_inverse(data, quant_state)


def dequantize_4bit_weight(base: nn.Module) -> torch.Tensor:
    """The dense weight of a bitsandbytes Linear4bit, also after its eval-mode CPU forward repacked it in place.

    bitsandbytes 0.50's own inverse of that repacking edits the layer's quant state in place and, without
    double quantization, leaves absmax in the packed (transposed) layout, which dequantizes to a wrong weight
    (measured: 10% off for in_features > 64). So: unpack a copy, and put absmax back in row order ourselves.
    """
    import bitsandbytes.functional as bnbf

    data, quant_state = base.weight.data, base.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        data, quant_state = convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(quant_state))
        if not quant_state.nested and quant_state.absmax.dim() == 2:  # packed layout: (in / blocksize, out)
            quant_state.absmax = quant_state.absmax.T.reshape(-1).float()
    return bnbf.dequantize_4bit(data, quant_state)
