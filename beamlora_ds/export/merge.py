"""Merge a BeamLoRA adapter into the base weights: W0 += (alpha / r) B diag(w) A, back to plain layers.

For deployments that want no adapter at all (docs/method.md section 6). A 4-bit bitsandbytes base is
dequantized first, so the merged model is an ordinary bf16 model, not a 4-bit one. A transformers Conv1D
base stores its weight in x out, so it gets the transposed update and stays a Conv1D (docs/architectures.md).
Merging edits modules in place and needs whole tensors: outside DeepSpeed only (under ZeRO, export first and
merge from the export).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch import nn

from ..backends.deepspeed.zero_params import is_zero3_param
from ..backends.wrappers import is_model_wrapper
from ..checkpointing.atomic import atomic_dir, out_dir_problem
from ..loading.cpu_repacking import dequantize_4bit_weight
from ..method.inject import find_beamlora_modules
from ..method.layer import is_conv1d, is_conv1d_layout
from ..method.score_table import detach_score_table
from .adapter_format import TENSOR_KEYS, AdapterState, delta_weight, shared_settings

logger = logging.getLogger(__name__)


@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold W0 += (alpha / r) B diag(w) A into every base layer and put the plain layer back (in place).

    Returns the model, now without BeamLoRA modules. A 4-bit bitsandbytes base is dequantized and merged into
    a bf16 nn.Linear, and the whole model is cast to bf16: the merged model is bf16, not 4-bit. Needs whole
    tensors, so not under ZeRO-3 (export with save_adapter or beamlora-export there, and merge outside).
    """
    if is_model_wrapper(model):
        raise TypeError("merge_adapter edits modules in place; pass a model outside DeepSpeed/DDP. Under DeepSpeed, "
                        "export with save_adapter(engine, dir) or beamlora-export and merge from there.")
    modules = find_beamlora_modules(model)
    if not modules:
        raise ValueError("This model has no BeamLoRA modules, so there is nothing to merge.")
    for name, m in modules.items():
        for key in TENSOR_KEYS:
            if is_zero3_param(getattr(m, key)):
                raise ValueError(f"{name}.{key} is a ZeRO-3 parameter; merge_adapter needs whole tensors. Export "
                                 "with save_adapter(engine, dir) or beamlora-export and merge outside DeepSpeed.")
    state = AdapterState(*shared_settings(modules))
    for name, m in modules.items():
        for key in TENSOR_KEYS:
            getattr(state, key)[name] = getattr(m, key).detach().float()
    merged = merge_state_into(model, state, {name: m.base_layer for name, m in modules.items()})
    detach_score_table(merged)  # its scores are folded in; nothing reads it any more
    return merged


def merge_state_into(model: nn.Module, state: AdapterState, bases: Optional[Dict[str, nn.Module]] = None
                     ) -> nn.Module:
    """Merge an adapter into the base layers named like its modules (in place); returns the model.

    When any base was 4-bit, the whole model becomes a plain bf16 model (a half-4-bit, half-dense model is
    neither what QLoRA users deploy nor loadable as saved)."""
    quantized = 0
    for name in state.module_names:
        base = bases[name] if bases is not None else _submodule(model, name)
        quantized += _is_4bit(base)
        _replace(model, name, merged_linear(base, delta_weight(state, name), name))
    if quantized:
        to_plain_bf16(model)
        logger.warning("Merged %d 4-bit base layers: the merged model is bf16, not 4-bit (dequantized NF4 weights "
                       "plus the adapter's update).", quantized)
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"The base model has no module {name!r}: it is not the model this adapter was trained on. "
                         "Pass the same base model.") from None


def _is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit layer: its weight carries a quant_state."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def merged_linear(base: nn.Module, delta: torch.Tensor, name: str = "") -> nn.Module:
    """`base` with `delta` (out x in) added to its weight (in fp32, stored back in the base dtype; transposed for a
    Conv1D, whose weight is in x out); a new bf16 layer for a 4-bit base (a Conv1D when quantized from one)."""
    weight = getattr(base, "weight", None)
    if weight is None:
        raise TypeError(f"{name}: {type(base).__name__} has no weight to merge into.")
    if is_conv1d(base):
        delta = delta.T
    if _is_4bit(base):
        dense = dequantize_4bit_weight(base).float()
        _check_fits(name, dense.shape, delta)
        return dense_bf16_linear(dense + delta.to(dense.device), getattr(base, "bias", None), is_conv1d_layout(base))
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name}: cannot merge into a {weight.dtype} weight ({type(base).__name__}); only float "
                        "and bitsandbytes 4-bit bases are supported.")
    _check_fits(name, weight.shape, delta)
    weight.data.copy_((weight.data.float() + delta.to(weight.device)).to(weight.dtype))
    return base


def _check_fits(name: str, shape, delta: torch.Tensor) -> None:
    if tuple(shape) != tuple(delta.shape):
        raise ValueError(f"{name}: the base weight is {tuple(shape)}, the adapter's update {tuple(delta.shape)}. "
                         "Pass the base model this adapter was trained on.")


def dense_bf16_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], conv1d: bool = False) -> nn.Module:
    """A frozen bf16 nn.Linear holding `weight` (out x in) and `bias`: what a merged 4-bit layer becomes. With
    `conv1d` (the 4-bit layer was quantized from a GPT-2 style Conv1D), a Conv1D holding the transposed weight, so
    the saved model has the shapes its architecture loads (docs/architectures.md)."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=torch.bfloat16)
        layer.weight.data.copy_(weight.T)
        layer.bias.data.copy_(bias.data if bias is not None else torch.zeros_like(layer.bias))
        return layer.requires_grad_(False)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.bfloat16,
                      device=weight.device)
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias.data)
    return layer.requires_grad_(False)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def to_plain_bf16(model: nn.Module) -> nn.Module:
    """Dequantize every remaining 4-bit layer, cast the model to bf16 and drop its quantization config, so it
    runs and saves as an ordinary bf16 model."""
    for name, module in list(model.named_modules()):
        if _is_4bit(module):
            dense = dequantize_4bit_weight(module).float()
            _replace(model, name, dense_bf16_linear(dense, getattr(module, "bias", None), is_conv1d_layout(module)))
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # first: transformers refuses to cast a bnb model
    elif getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model.to(torch.bfloat16)
    if config is not None and hasattr(config, "dtype"):
        config.dtype = torch.bfloat16
    return model


def save_merged(model: nn.Module, out_dir: str, overwrite: bool = False, tokenizer=None) -> str:
    """merge_adapter (if not done yet) then `save_pretrained` into `out_dir`, all or nothing. Edits `model`."""
    if is_model_wrapper(model):
        raise TypeError("save_merged edits modules in place; pass a model outside DeepSpeed/DDP. Under DeepSpeed, "
                        "run beamlora-export CHECKPOINT_DIR OUT_DIR --merge --base_model PATH instead.")
    if not hasattr(model, "save_pretrained"):
        raise TypeError("save_merged needs a transformers model (it calls save_pretrained); for another model call "
                        "merge_adapter(model) and save its state_dict yourself.")
    problem = out_dir_problem(out_dir, overwrite)
    if problem:
        raise FileExistsError(problem)
    if find_beamlora_modules(model):
        merge_adapter(model)
    if any(_is_4bit(m) for m in model.modules()):
        to_plain_bf16(model)
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
