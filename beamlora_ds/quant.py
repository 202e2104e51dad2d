"""4-bit NF4 bases (QLoRA-style) for BeamLoRA, alone or under DeepSpeed ZeRO-3.

    settings = check_4bit_request(ds_config, compute_dtype=torch.bfloat16)   # refuses bad requests, loads nothing
    model = load_4bit_model(path, ds_config, compute_dtype=torch.bfloat16)  # then beamlora_ds.apply(model, cfg)

`bitsandbytes.nn.Linear4bit` subclasses `nn.Linear`, so `beamlora_ds.apply` wraps it like any linear layer; the
adapter is created in the layer's compute dtype (fp32 when none is set), never in the dtype of the packed storage.

What loading does, and why (each point is a way the plain `from_pretrained` call goes wrong under ZeRO-3):
- `bnb_4bit_quant_storage` is the model's training dtype (bf16 or fp32). DeepSpeed casts every float parameter
  to the training dtype at `deepspeed.initialize` (`p.data = p.data.to(dtype)`): packed nibbles stored as
  another float dtype would be converted numerically, i.e. destroyed. ZeRO-3 then partitions the 4-bit storage
  like any other parameter of that dtype.
- No `device_map` under ZeRO-3 (transformers refuses one). The quantizer then places the model on the current
  accelerator device, so each process first selects its own (LOCAL_RANK).
- A live `HfDeepSpeedConfig` exists before `from_pretrained` under ZeRO-3, as for unquantized models. (transformers
  5 does not partition a quantized model while it loads, bitsandbytes quantizes after `zero.Init` would: each
  process builds the whole 4-bit model, about 0.55 byte per quantized weight plus the 16-bit embeddings and
  lm_head, and `deepspeed.initialize` partitions it.)
- Loading is bounded under ZeRO-3 with several processes (docs/qlora.md, "Loading at scale"): the processes of a
  node load in turns (`staggered.load_in_turns`); right after its turn every process but rank 0 drops its
  weights (`staggered.drop_weights_rank0_will_send`), and once all have loaded the model is partitioned from
  rank 0's copy, one parameter at a time (`staggered.partition_from_rank0`), so a node holds about one whole
  model at a time instead of one per process, and the model returned is partitioned, as an unquantized ZeRO-3
  load is. `BEAMLORA_DS_4BIT_LOAD=together` (or `in_turns=False`) restores the old way: every process loads at
  once and keeps its whole copy until `deepspeed.initialize`.
- No `peft.prepare_model_for_kbit_training`. Of what it does, freezing every base parameter is kept (and
  `apply` freezes again). Its fp32 upcast of norms, embeddings and lm_head is left out on purpose: a DeepSpeed
  engine in bf16 casts every float parameter back to bf16 at `initialize` (the upcast would be undone, after
  costing a transient fp32 copy of the embeddings), in fp32 training everything already is fp32, and under
  ZeRO-3 it would only mix dtypes among partitioned parameters. The trainable adapters get fp32 master
  weights and Adam moments from DeepSpeed's optimizer in any case. Input gradients are enabled when gradient
  checkpointing is on (`enable_input_require_grads`), as peft does.
- DeepSpeed checkpoints resume: a Linear4bit saves its quantization constants under keys a strict
  `load_state_dict` rejects; a pre-hook consumes them after checking they match the base that is loaded.
- The AVX512-BF16 trap: on CPUs with AVX512-BF16, a `Linear4bit` in eval mode fed a tensor without grad repacks
  its weight in place into a kernel layout. Under ZeRO-3 that silently corrupts the (partitioned) model and a
  later `save_checkpoint` fails. `support_avx512bf16_for_cpu = False` on every `Linear4bit` turns that path off
  (a training-only setting: it only disables a CPU inference speed-up), and the model is returned in train mode
  (`from_pretrained` returns eval mode).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import ranks, staggered
from .ds_config import DSConfigError, zero_stage
from .support import UnsupportedSetupError, check_zero_support

logger = logging.getLogger(__name__)

LOAD_MODE_VARIABLE = "BEAMLORA_DS_4BIT_LOAD"  # "turns" (default) or "together": see loads_in_turns
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


def _name(dtype) -> str:
    return COMPUTE_DTYPES.get(dtype, str(dtype).replace("torch.", ""))


def training_dtype(ds_config: Optional[dict]) -> torch.dtype:
    """The dtype a DeepSpeed engine built from `ds_config` trains in: bf16, fp16 or fp32 (no config: fp32)."""
    config = ds_config or {}
    enabled = {key: config.get(key, {}).get("enabled", False) for key in ("bf16", "fp16")}
    unresolved = [key for key, value in enabled.items() if value == "auto"]
    if unresolved:
        raise QuantizationError(f"The DeepSpeed config has {unresolved[0]}.enabled = \"auto\": the 4-bit storage dtype "
                                "must be known before loading. Resolve the config first (launch/train.py does, with "
                                "beamlora_ds.ds_config.resolve_auto) or set it to true/false.")
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
            raise QuantizationError(f"model_dtype={_name(model_dtype)} but the DeepSpeed config trains in "
                                    f"{_name(trains_in)} (its bf16/fp16 sections), and DeepSpeed casts the model to "
                                    "that. Leave model_dtype unset, or change the config.")
        model_dtype = trains_in
    elif model_dtype is None:
        model_dtype = torch.float32
    elif model_dtype not in COMPUTE_DTYPES:
        raise QuantizationError(f"model_dtype={model_dtype!r}: use torch.bfloat16, torch.float16 or torch.float32.")
    storage = model_dtype if quant_storage is None else quant_storage
    if storage != model_dtype:
        raise QuantizationError(f"quant_storage={_name(storage)} but the model trains in {_name(model_dtype)}: "
                                "DeepSpeed casts every float parameter to the training dtype, which would destroy "
                                "packed 4-bit weights stored as another dtype, and ZeRO-3 partitions them as that "
                                "dtype. Leave quant_storage unset (it follows the training dtype, "
                                f"{_name(model_dtype)}).")
    halves = {torch.bfloat16, torch.float16}
    if compute_dtype in halves and model_dtype in halves and compute_dtype != model_dtype:
        raise QuantizationError(f"4-bit compute dtype {_name(compute_dtype)} with a model (and 4-bit storage) in "
                                f"{_name(model_dtype)}: every 4-bit layer would round its {_name(model_dtype)} input "
                                f"to {_name(compute_dtype)} (fp16 overflows above 65504, bf16 keeps 8 bits of "
                                f"mantissa). Use compute_dtype={_name(model_dtype)}, or make the DeepSpeed config's "
                                "bf16/fp16 section match the compute dtype.")
    if ds_config:  # without DeepSpeed there is no ZeRO setup to refuse
        try:
            check_zero_support(stage, _name(model_dtype), four_bit=True)
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


def load_4bit_model(path: str, ds_config: Optional[dict], compute_dtype: torch.dtype = torch.bfloat16,
                    double_quant: bool = True, gradient_checkpointing: bool = False,
                    model_dtype: Optional[torch.dtype] = None, in_turns: Optional[bool] = None) -> nn.Module:
    """A causal LM with every linear layer but lm_head in NF4, ready for `beamlora_ds.apply` and DeepSpeed.

    `path`: a hub name, a local folder, or `models.BUILTIN_TINY` (the tiny Llama is saved to a temporary folder
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

    model = staggered.load_in_turns(load, what=path) if turns else load()
    if early:
        staggered.partition_from_rank0(model, ds_config, settings.model_dtype)
    logger.info("Loaded %s in 4-bit NF4%s: %d linear layers quantized, compute %s, storage %s%s",
                path, " (double quantization)" if double_quant else "",
                sum(isinstance(m, _linear4bit()) for m in model.modules()), _name(settings.compute_dtype),
                _name(settings.quant_storage), ", in turns per node" if turns else "")
    return model


def loads_in_turns(settings: FourBitSettings, in_turns: Optional[bool] = None) -> bool:
    """Whether `load_4bit_model` bounds loading (docs/qlora.md, "Loading at scale"): under ZeRO-3 with more than
    one process, unless `in_turns=False` or $BEAMLORA_DS_4BIT_LOAD=together (the unbounded way, for comparison)."""
    if in_turns is None:
        mode = os.environ.get(LOAD_MODE_VARIABLE, "turns")
        if mode not in ("turns", "together"):
            raise QuantizationError(f"{LOAD_MODE_VARIABLE}={mode!r}: use \"turns\" (the default: one process per "
                                    "node loads at a time) or \"together\" (every process at once).")
        in_turns = mode == "turns"
    return bool(in_turns) and settings.zero_stage == 3 and ranks.is_distributed()


def _partitioned_from_rank0(ds_config: Optional[dict]) -> bool:
    """Partitioning fills every parameter from global rank 0, except under MiCS (one source per shard group):
    there the processes only take turns, and each keeps its copy until deepspeed.initialize."""
    mics = ((ds_config or {}).get("zero_optimization") or {}).get("mics_shard_size", -1)
    return not isinstance(mics, int) or mics <= 0


def _load_whole(path: str, settings: FourBitSettings, ds_config: Optional[dict]) -> nn.Module:
    from . import models

    if path == models.BUILTIN_TINY:
        with tempfile.TemporaryDirectory(prefix="beamlora_tiny4bit_") as folder:
            _save_checkpoint(models._tiny_llama(settings.model_dtype), folder)  # before HfDeepSpeedConfig exists
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

    from . import models

    if settings.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        models._live_hf_ds_config.append(HfDeepSpeedConfig(ds_config))  # must stay referenced while loading
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


def accept_saved_quant_state(model: nn.Module) -> None:
    """Let `load_state_dict` (DeepSpeed's `load_checkpoint`, ZeRO 1-3) take a state dict saved from this 4-bit model.

    A Linear4bit saves its quantization constants beside its packed weight (`weight.absmax`, `weight.quant_map`,
    `weight.nested_*`, `weight.quant_state.bitsandbytes__nf4`), keys that no module accepts back, so a strict load
    fails with "Unexpected key(s)". The frozen base is rebuilt identically by loading the same model with the same
    settings, so a pre-hook on each Linear4bit consumes those keys, after checking that they describe the base
    that is loaded (same constants): resuming on another base or quantization is refused."""
    for name, module in model.named_modules():
        if isinstance(module, _linear4bit()) and not getattr(module, "_beamlora_accepts_quant_state", False):
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


def disable_cpu_repacking(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place CPU repacking (AVX512-BF16 kernel layout) on every Linear4bit of `model`;
    returns the number of Linear4bit layers. Refuses a model whose weights an eval-mode forward already repacked
    (bitsandbytes 0.50's inverse of it is wrong without double quantization): call this right after loading."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, _linear4bit()):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise QuantizationError(f"{name}: its 4-bit weight was already repacked for the CPU inference kernel "
                                        "(an eval-mode forward without grad on an AVX512-BF16 CPU). Reload the model "
                                        "and call disable_cpu_repacking before any forward (load_4bit_model does).")
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
