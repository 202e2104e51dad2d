"""DeepSpeed checkpoints of a 4-bit model load back: a bitsandbytes Linear4bit saves its quantization constants
beside its packed weight, under keys a strict `load_state_dict` rejects."""
from __future__ import annotations

import torch
from torch import nn


def accept_saved_quant_state(model: nn.Module) -> None:
    """Let `load_state_dict` (DeepSpeed's `load_checkpoint`, ZeRO 1-3) take a state dict saved from this 4-bit model.

    A Linear4bit saves its quantization constants beside its packed weight (`weight.absmax`, `weight.quant_map`,
    `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`), keys that no module accepts back, so a strict load
    fails with "Unexpected key(s)". The frozen base is rebuilt identically by loading the same model with the same
    settings, so a pre-hook on each Linear4bit consumes those keys, after checking that they describe the base
    that is loaded (same constants): resuming on another base or quantization is refused."""
    from bitsandbytes.nn import Linear4bit

    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and not getattr(module, "_beamlora_accepts_quant_state", False):
            module.register_load_state_dict_pre_hook(_consume_quant_state)
            module._beamlora_accepts_quant_state = True


def _consume_quant_state(module, state_dict, prefix, *args) -> None:
    saved = {key[len(prefix + "weight."):]: state_dict.pop(key) for key in list(state_dict)
             if key.startswith(prefix + "weight.")}
    if not saved:
        return
    current = module.weight.quant_state.as_dict(packed=True)
    same = set(saved) == set(current) and all(torch.is_tensor(saved[k]) and torch.equal(saved[k].to(v.device), v)
                                              for k, v in current.items() if torch.is_tensor(v))
    if not same:
        raise RuntimeError(f"{prefix}weight: the checkpoint was saved from a different 4-bit base (other weights, "
                           "quantization type or double quantization). Resume with the same model and 4-bit settings.")
