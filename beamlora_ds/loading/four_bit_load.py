"""Loading a causal LM with every linear layer but lm_head in 4-bit NF4 (QLoRA-style), ready for
`beamlora_ds.apply` and DeepSpeed, alone or under ZeRO-3.

    settings = check_4bit_request(ds_config, compute_dtype=torch.bfloat16)   # four_bit_request.py: loads nothing
    model = load_4bit_model(path, ds_config, compute_dtype=torch.bfloat16)  # then beamlora_ds.apply(model, cfg)

`bitsandbytes.nn.Linear4bit` subclasses `nn.Linear`, so `apply` wraps it like any linear layer; the adapter is
created in the layer's compute dtype (fp32 when none is set), never in the dtype of the packed storage. Why the
load is done this way (docs/platform.md):
- No `device_map` under ZeRO-3 (transformers refuses one): the quantizer places the model on the current
  accelerator device, so each process first selects its own (LOCAL_RANK).
- Under ZeRO-3 a live `HfDeepSpeedConfig` exists before `from_pretrained`, as for unquantized models; transformers
  still does not partition a quantized model while it loads, so each process builds the whole 4-bit model (about
  0.55 byte per quantized weight plus the 16-bit embeddings and lm_head).
- With several processes under ZeRO-3 the load is bounded (docs/qlora.md, "Loading at scale"): the processes of a
  node load in turns, every process but rank 0 drops its weights right after its turn, and once all have loaded
  the model is partitioned from rank 0's copy, one parameter at a time (staggered.py). A node then holds about one
  whole model at a time instead of one per process. `BEAMLORA_DS_4BIT_LOAD=turns:K` lets K processes per node
  load at a time (K models' memory, ceil(L / K) turns); `BEAMLORA_DS_4BIT_LOAD=together` (or `in_turns=False`)
  loads on every process at once instead (for comparison). A load alone (one process, or not under ZeRO-3) maps
  large blocks as a turn does (staggered.large_blocks_mapped), unless the old way is asked for.
- No `peft.prepare_model_for_kbit_training`: of what it does, freezing the base is kept; its fp32 upcast of norms,
  embeddings and lm_head is not, since DeepSpeed casts every float parameter back to the training dtype at
  initialize, and the adapters get fp32 masters and moments from DeepSpeed's optimizer anyway. Input gradients
  are enabled for gradient checkpointing, as peft does.
- DeepSpeed checkpoints load back (four_bit_checkpoints.py), and bitsandbytes' CPU repacking is off
  (cpu_repacking.py); the model is returned in train mode (`from_pretrained` returns eval mode).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Optional

import torch
from torch import nn

from ..backends import coordination
from . import staggered
from .builtin import BUILTIN_TINY, tiny_llama
from .cpu_repacking import disable_cpu_repacking
from .four_bit_checkpoints import accept_saved_quant_state
from .four_bit_request import FourBitSettings, QuantizationError, check_4bit_request, dtype_name
from .hf_zero3 import enable_zero3_loading

logger = logging.getLogger(__name__)

LOAD_MODE_VARIABLE = "BEAMLORA_DS_4BIT_LOAD"  # "turns" (default), "turns:K" or "together": see loads_in_turns


def load_4bit_model(path: str, ds_config: Optional[dict], compute_dtype: torch.dtype = torch.bfloat16,
                    double_quant: bool = True, gradient_checkpointing: bool = False,
                    model_dtype: Optional[torch.dtype] = None, in_turns: Optional[bool] = None) -> nn.Module:
    """A causal LM with every linear layer but lm_head in NF4, ready for `beamlora_ds.apply` and DeepSpeed.

    `path`: a hub name, a local folder, or `builtin.BUILTIN_TINY` (the tiny Llama is saved to a temporary folder
    and loaded back through the same BitsAndBytesConfig path). See the module docstring for what is done and why.
    `model_dtype` only without DeepSpeed (ds_config None): the dtype of the non-quantized parameters (default fp32).
    `in_turns`: bounded loading under ZeRO-3 with several processes (None: on unless $BEAMLORA_DS_4BIT_LOAD is
    "together"); the model is then returned ZeRO-3-partitioned.
    Call on every process.
    """
    settings = check_4bit_request(ds_config, compute_dtype=compute_dtype, double_quant=double_quant,
                                  model_dtype=model_dtype)
    _select_local_device()
    turns = loads_in_turns(settings, in_turns)
    early = turns and _partitioned_from_rank0(ds_config)

    def load():
        model = _load_whole(path, settings, ds_config)
        prepare_4bit_model(model, gradient_checkpointing=gradient_checkpointing)
        if early:  # before the next process of this node loads
            staggered.drop_weights_rank0_will_send(model)
        return model

    if turns:
        model = staggered.load_in_turns(load, what=path, at_once=loaders_per_node() or 1)
    else:
        with staggered.large_blocks_mapped() if _bounded_loading_asked(in_turns) else contextlib.nullcontext():
            model = load()
    if early:
        staggered.partition_from_rank0(model, ds_config, settings.model_dtype)
    if getattr(model, "config", None) is not None:  # the built-in model loads from a temporary copy: keep its name
        model.config.name_or_path = path  # (what checkpoints record as their base)
    logger.info("Loaded %s in 4-bit NF4%s: %d linear layers quantized, compute %s, storage %s%s",
                path, " (double quantization)" if double_quant else "",
                sum(isinstance(m, _linear4bit()) for m in model.modules()), dtype_name(settings.compute_dtype),
                dtype_name(settings.quant_storage), ", in turns per node" if turns else "")
    return model


def loads_in_turns(settings: FourBitSettings, in_turns: Optional[bool] = None) -> bool:
    """Whether `load_4bit_model` bounds loading (docs/qlora.md, "Loading at scale"): under ZeRO-3 with more than
    one process, unless `in_turns=False` or $BEAMLORA_DS_4BIT_LOAD=together (the unbounded way, for comparison)."""
    return _bounded_loading_asked(in_turns) and settings.zero_stage == 3 and coordination.is_distributed()


def loaders_per_node() -> Optional[int]:
    """How many processes of a node load at a time as $BEAMLORA_DS_4BIT_LOAD says: "turns" (the default) 1,
    "turns:K" K, "together" None (every process at once, keeping its copy until deepspeed.initialize). K trades
    host memory for time: about K whole 4-bit models per node at the peak, ceil(L / K) loads one after another
    (docs/qlora.md, "Loading at scale")."""
    mode = os.environ.get(LOAD_MODE_VARIABLE, "turns").strip()
    if mode == "together":
        return None
    name, colon, count = mode.partition(":")
    if name == "turns" and (not colon or (count.isdigit() and int(count) >= 1)):
        return int(count) if colon else 1
    raise QuantizationError(f"{LOAD_MODE_VARIABLE}={mode!r}: use \"turns\" (the default: one process per node "
                            "loads at a time), \"turns:K\" (K processes per node at a time, K a whole number >= 1) "
                            "or \"together\" (every process at once).")


def _bounded_loading_asked(in_turns: Optional[bool]) -> bool:
    """Whether bounded loading is asked for: `in_turns` when given, else $BEAMLORA_DS_4BIT_LOAD is not "together".
    It loads in turns under ZeRO-3 with several processes (loads_in_turns); a load alone (one process, or no ZeRO-3)
    maps large blocks as a turn does (staggered.large_blocks_mapped: one process's peak about the 4-bit model,
    instead of 1.1-3.1 times it by chance)."""
    return bool(in_turns) if in_turns is not None else loaders_per_node() is not None


def _partitioned_from_rank0(ds_config: Optional[dict]) -> bool:
    """Partitioning fills every parameter from global rank 0, except under MiCS (one source per shard group):
    there the processes only take turns, and each keeps its copy until deepspeed.initialize."""
    mics = ((ds_config or {}).get("zero_optimization") or {}).get("mics_shard_size", -1)
    return not isinstance(mics, int) or mics <= 0


def _load_whole(path: str, settings: FourBitSettings, ds_config: Optional[dict]) -> nn.Module:
    if path == BUILTIN_TINY:
        with tempfile.TemporaryDirectory(prefix="beamlora_tiny4bit_") as folder:
            _save_checkpoint(tiny_llama(settings.model_dtype), folder)  # before HfDeepSpeedConfig exists
            return _from_pretrained(folder, settings, ds_config)
    return _from_pretrained(path, settings, ds_config)


def prepare_4bit_model(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """What a 4-bit model needs before `beamlora_ds.apply` and DeepSpeed, for a model loaded any way: every base
    parameter frozen, the CPU repacking trap off, DeepSpeed checkpoints loadable (see `accept_saved_quant_state`),
    input gradients for gradient checkpointing, train mode. Returns `model`; raises if it has no Linear4bit."""
    for p in model.parameters():  # the base is frozen; apply() makes only the adapters trainable
        p.requires_grad_(False)
    if disable_cpu_repacking(model) == 0:
        raise QuantizationError("This model has no bitsandbytes Linear4bit layer: nothing was quantized. Load it with "
                                "a BitsAndBytesConfig(load_in_4bit=True, ...) (load_4bit_model does).")
    accept_saved_quant_state(model)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get inputs with grad
    return model.train()


def _linear4bit():
    from bitsandbytes.nn import Linear4bit

    return Linear4bit


def _from_pretrained(path: str, settings: FourBitSettings, ds_config: Optional[dict]):
    from transformers import AutoModelForCausalLM

    if settings.zero_stage == 3:
        enable_zero3_loading(ds_config)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=settings.bnb_config(),
                                                dtype=settings.model_dtype)


def _save_checkpoint(model, folder: str) -> None:
    """config.json + model.safetensors, written by THIS process: `save_pretrained` writes on global rank 0 only
    once torch.distributed is initialized, and a private temporary folder needs no collective."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


def _select_local_device() -> None:
    """With no device_map the 4-bit quantizer loads onto the *current* GPU: make that this process's own."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
