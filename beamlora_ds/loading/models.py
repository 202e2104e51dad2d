"""Loading the causal LM to fine-tune: a hub name or local path (partitioned at load under ZeRO-3), or a built-in
default that needs no download (builtin.py); its tokenizer; and, for checks before any weight is read, its config
and a weightless meta-device skeleton.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..backends.deepspeed.config import zero_stage
from .builtin import (BUILTIN, BUILTIN_NAMES, BUILTIN_SMOLLM2, BUILTIN_TINY, char_tokenizer, resolve_builtin,
                      smollm2_cache, smollm2_checkpoint, tiny_llama, tiny_llama_config)
from .four_bit_load import load_4bit_model
from .hf_zero3 import enable_zero3_loading

logger = logging.getLogger(__name__)


def model_path(name: str, rank: int = 0, barrier=lambda: None) -> str:
    """The folder or hub name to load; converts the packaged SmolLM2 once (rank 0, others wait)."""
    if name == BUILTIN_SMOLLM2:
        return smollm2_checkpoint(rank, barrier)
    return name


def ready_path(name: str) -> Optional[str]:
    """`model_path(name)` when it needs no conversion (and so no other process), else None: lets a launcher read
    the model's config and tokenizer before the processes of a run connect."""
    if name == BUILTIN_SMOLLM2 and not os.path.isfile(os.path.join(smollm2_cache(), "config.json")):
        return None
    return model_path(name, barrier=lambda: None)


def load_builtin_model(name: str = BUILTIN, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a built-in base, as launch/train.py trains it: the base to load an adapter trained on
    one (`PeftModel.from_pretrained(model, adapter_dir)`); `builtin` is SmolLM2 when its package is installed."""
    if name not in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is no built-in model; the built-in ones are {[n for n in BUILTIN_NAMES if n]} "
                         "(load any other with transformers' from_pretrained).")
    path = model_path(resolve_builtin(name))
    return load_model(path, dtype, {}), load_tokenizer(path)


def load_tokenizer(path: str):
    if path == BUILTIN_TINY:
        return char_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype, ds_config: dict) -> torch.nn.Module:
    """Under ZeRO-3 the model is partitioned while it loads (hf_zero3.py), never whole per process."""
    if path == BUILTIN_TINY:
        return tiny_llama(dtype)
    from transformers import AutoModelForCausalLM

    if zero_stage(ds_config) == 3:
        enable_zero3_loading(ds_config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_numel")]
    if partitioned:
        local = sum(p.ds_tensor.numel() for p in partitioned)  # p.numel() is 0 once partitioned
        logger.info("ZeRO-3: loaded partitioned, %s of %s parameters held by this process at load",
                    f"{local:,}", f"{sum(p.ds_numel for p in partitioned):,}")
    return model


def load_for_training(path: str, dtype: torch.dtype, ds_config: dict, four_bit: bool = False,
                      gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The base to fine-tune in the training dtype: as stored (`load_model`) or in 4-bit NF4 (`load_4bit_model`),
    with gradient checkpointing (not re-entrant) when asked."""
    if four_bit:
        model = load_4bit_model(path, ds_config, compute_dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    else:
        model = load_model(path, dtype, ds_config)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def meta_skeleton(path: str) -> torch.nn.Module:
    """The model `load_model(path, ...)` would return, built from its config on the meta device: every module with
    its real name and shape, no weight read or allocated. For checks that need the architecture only (which layers
    target_modules match, whether r fits them) before the expensive load. Call it before `load_model` under
    ZeRO-3: a live HfDeepSpeedConfig would make transformers partition the skeleton with zero.Init.
    Raises OSError when `path` has no readable config (the load would fail the same way).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError("meta_skeleton() while a ZeRO-3 HfDeepSpeedConfig is alive would partition it with "
                           "zero.Init: build the skeleton before load_model.")
    if path != BUILTIN_TINY and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise OSError(f"{path} is a folder without config.json")  # transformers says ValueError("Unrecognized ...")
    with torch.device("meta"):
        if path == BUILTIN_TINY:
            return LlamaForCausalLM(tiny_llama_config())
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def load_config(path: str):
    """The model's config alone (no weights), for checks before loading."""
    if path == BUILTIN_TINY:
        return tiny_llama_config()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
