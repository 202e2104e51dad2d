"""Export a trained BeamLoRA adapter as a stock PEFT LoRA adapter, or merge it into the base weights.

Folding is exact at inference, where dropout is the identity (BEAMLORA.md section 6):

    B (w * (A x)) = B (diag(w) A) x,   w = r * softmax(score / tau) in fp32,   so A' = diag(w) A, B' = B

with the same r and alpha. `adapter_model.safetensors` + `adapter_config.json` then load with plain
`peft.PeftModel.from_pretrained` (and vLLM). An UNfolded adapter under peft's file names would load silently
and ignore the score, giving another model: our unfolded state goes under our own names only
(`beamlora_state.safetensors` + `beamlora_state.json`).

Three entry points:
  - `save_adapter(model_or_engine, out_dir)`: from a live model or DeepSpeed engine (any ZeRO stage; call it
    on every process, rank 0 writes);
  - `merge_adapter(model)` / `save_merged(model, out_dir)`: W0 += (alpha / r) B diag(w) A, back to plain layers;
  - `beamlora-export CHECKPOINT_DIR OUT_DIR`: from a DeepSpeed checkpoint folder, with no distributed job.

Every folder is written into a temporary sibling first and renamed into place, so a crash never leaves a
half-written adapter, and an existing non-empty folder is only replaced when asked (`overwrite=True`).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .atomic import fsync_tree, replace_dir, umask
from .checkpoint import STATE_FILE
from .failpoints import kill_point
from .inject import find_beamlora_modules, matches_target
from .layer import BeamLoRALinear, rank_weights

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names: folded (vanilla LoRA) tensors only
ADAPTER_CONFIG = "adapter_config.json"
STATE_WEIGHTS = "beamlora_state.safetensors"  # ours: the unfolded A, B and score
STATE_CONFIG = "beamlora_state.json"
STATE_FORMAT = "beamlora_ds.adapter"
STATE_VERSION = 1
CONTROLLER_STATE_FILE = STATE_FILE.format(rank=0)  # written by beamlora_ds.save_checkpoint in the tag folder
PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterState:
    """The unfolded adapter: full fp32 tensors by module name (in module order) and the settings that fold it."""

    r: int
    alpha: float
    tau: float
    dropout: float = 0.0
    lora_A: Dict[str, torch.Tensor] = field(default_factory=dict)
    lora_B: Dict[str, torch.Tensor] = field(default_factory=dict)
    lora_score: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def module_names(self) -> List[str]:
        return list(self.lora_A)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def folded(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        return fold(self.lora_A[name], self.lora_B[name], self.lora_score[name], self.tau)


# ----------------------------------------------------------------------------------------------- folding
def fold(lora_A: torch.Tensor, lora_B: torch.Tensor, lora_score: torch.Tensor, tau: float
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = (diag(w) A, B) in fp32: the vanilla LoRA pair that computes what the scored beam computes."""
    w = rank_weights(lora_score.float(), tau)
    return (w[:, None] * lora_A.float()).contiguous(), lora_B.float().contiguous()


def delta_weight(state: AdapterState, name: str) -> torch.Tensor:
    """(alpha / r) * B diag(w) A in fp32, shaped like the base weight (out x in)."""
    folded_A, folded_B = state.folded(name)
    return state.scaling * (folded_B @ folded_A)


def peft_tensors(state: AdapterState) -> Dict[str, torch.Tensor]:
    """Folded tensors under stock peft key names: base_model.model.<module>.lora_A.weight / .lora_B.weight."""
    tensors = {}
    for name in state.module_names:
        folded_A, folded_B = state.folded(name)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = folded_A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = folded_B
    return tensors


# ------------------------------------------------------------------------------------ reading a live model
def unwrap(model_or_engine) -> nn.Module:
    """The user's model inside a DeepSpeed engine (or DDP): peft key names must not carry `module.`."""
    model = model_or_engine
    while _is_wrapper(model):
        model = model.module
    return model


def _is_wrapper(obj) -> bool:
    names = {cls.__name__ for cls in type(obj).__mro__}
    return bool(names & {"DeepSpeedEngine", "DistributedDataParallel", "DataParallel"}) and hasattr(obj, "module")


def adapter_state_from_model(model: nn.Module) -> AdapterState:
    """Full fp32 A, B and score of every BeamLoRA module. Collective under ZeRO: call it on every process.

    Under DeepSpeed the values come from the fp32 master the optimizer holds (not the possibly bf16 working
    copy); ZeRO-3 gathers only these adapter tensors, in module order, the same calls on every rank.
    """
    modules = find_beamlora_modules(model)
    if not modules:
        raise ValueError("This model has no BeamLoRA modules, so there is no adapter to export. Pass the model "
                         "that beamlora_ds.apply() wrapped (or its DeepSpeed engine).")
    r, alpha, tau, dropout = _shared_settings(modules)
    state = AdapterState(r=r, alpha=alpha, tau=tau, dropout=dropout)
    for name, m in modules.items():
        expected = {"lora_A": (m.r, m.in_features), "lora_B": (m.out_features, m.r), "lora_score": (m.r,)}
        for key, shape in expected.items():
            tensor = full_fp32(getattr(m, key))
            _check_shape(f"{name}.{key}", tensor, shape)
            getattr(state, key)[name] = tensor
    return state


def full_fp32(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter in fp32 on the CPU: the optimizer's fp32 master under ZeRO 1-3, else the tensor.

    ZeRO-3 keeps only a shard per rank (`numel() == 0` outside a gather): it is all-gathered here, a collective.
    """
    if hasattr(param, "ds_id"):  # ZeRO-3
        if param.requires_grad and getattr(param, "_z3_optimizer", None) is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(param).detach().float().cpu().clone()
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().float().cpu().clone()
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 (and DeepSpeed's bf16 optimizer): collective all-reduce
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float().cpu().clone()
    return param.detach().float().cpu().clone()


def _shared_settings(modules: Dict[str, BeamLoRALinear]) -> Tuple[int, float, float, float]:
    """r, alpha, tau and dropout: one adapter_config.json describes every module, so they must agree."""
    settings = {(m.r, float(m.alpha), float(m.tau), _dropout_p(m)) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"BeamLoRA modules differ in (r, alpha, tau, dropout): {sorted(settings)}. Export writes "
                         "one adapter_config.json for all modules; use one BeamLoRAConfig for the whole model.")
    return next(iter(settings))


def _dropout_p(module: BeamLoRALinear) -> float:
    return float(module.lora_dropout.p) if isinstance(module.lora_dropout, nn.Dropout) else 0.0


def _check_shape(what: str, tensor: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(tensor.shape)}, but the module needs {tuple(shape)}. A ZeRO-3 "
                         "shard that was not gathered looks like this (numel 0): pass the DeepSpeed engine (or call "
                         "save_adapter on every process) so the full tensors are gathered. Nothing was written.")


# ----------------------------------------------------------------------------------- peft adapter config
def peft_config_dict(state: AdapterState, target_modules: Union[List[str], str], task_type: Optional[str],
                     base_model_name_or_path: Optional[str]) -> dict:
    """adapter_config.json as the installed peft's own LoraConfig writes it, so stock peft loads it as is."""
    from peft import LoraConfig

    alpha = int(state.alpha) if float(state.alpha).is_integer() else state.alpha
    config = LoraConfig(r=state.r, lora_alpha=alpha, lora_dropout=state.dropout, target_modules=target_modules,
                        bias="none", task_type=task_type, base_model_name_or_path=base_model_name_or_path,
                        inference_mode=True, fan_in_fan_out=False, use_rslora=False, use_dora=False,
                        init_lora_weights=True)
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    out["peft_type"] = "LORA"
    return out


def target_modules_for(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Leaf names of the wrapped modules when, by peft's matching rule, they select exactly those modules in
    `model`; otherwise the full module names (peft matches those exactly), so peft never adds extra layers."""
    leaves = sorted({name.rpartition(".")[2] for name in names})
    inside = tuple(name + "." for name in names)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    if {n for n in candidates if matches_target(n, leaves)} == set(names):
        return leaves
    logger.info("Leaf names %s would select more modules than BeamLoRA wrapped; adapter_config.json lists the %d "
                "full module names instead.", leaves, len(names))
    return list(names)


def target_modules_from_config(config_targets: Union[Sequence[str], str], names: Sequence[str]
                               ) -> Union[List[str], str]:
    """Without the model: apply() wrapped every module matching `config_targets` by peft's own rule, so leaf names
    are exact when the config listed leaf names; a regex or dotted names are passed on as they were."""
    if isinstance(config_targets, str) or any("." in t for t in config_targets):
        return config_targets if isinstance(config_targets, str) else list(config_targets)
    return sorted({name.rpartition(".")[2] for name in names})


def task_type_of(model: nn.Module) -> Optional[str]:
    """CAUSAL_LM for a transformers causal LM (peft then builds PeftModelForCausalLM), else None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if isinstance(model, PreTrainedModel) and type(model).__name__.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def base_model_name_of(model: nn.Module) -> Optional[str]:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


# ------------------------------------------------------------------------------------------------- writing
def write_adapter(state: AdapterState, out_dir: str, target_modules, task_type: Optional[str] = None,
                  base_model_name_or_path: Optional[str] = None, overwrite: bool = False) -> str:
    """Write the folded peft adapter and our unfolded state into `out_dir`, all or nothing. Local: no collectives."""
    tensors = peft_tensors(state)
    config = peft_config_dict(state, target_modules, task_type, base_model_name_or_path)
    with atomic_dir(out_dir, overwrite) as tmp:
        _save_safetensors(tensors, os.path.join(tmp, ADAPTER_WEIGHTS))
        _write_json(config, os.path.join(tmp, ADAPTER_CONFIG))
        _save_safetensors(_state_tensors(state), os.path.join(tmp, STATE_WEIGHTS))
        _write_json(_state_json(state, base_model_name_or_path), os.path.join(tmp, STATE_CONFIG))
    return out_dir


def _state_tensors(state: AdapterState) -> Dict[str, torch.Tensor]:
    return {f"{name}.{key}": getattr(state, key)[name].contiguous()
            for name in state.module_names for key in ("lora_A", "lora_B", "lora_score")}


def _state_json(state: AdapterState, base_model_name_or_path: Optional[str]) -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "r": state.r, "alpha": state.alpha, "tau": state.tau,
            "dropout": state.dropout, "module_names": state.module_names,
            "base_model_name_or_path": base_model_name_or_path,
            "note": f"Unfolded BeamLoRA state: <module>.lora_A, .lora_B, .lora_score. {ADAPTER_WEIGHTS} holds the "
                    "folded vanilla-LoRA equivalent A' = diag(r * softmax(score / tau)) A, B' = B."}


def load_state(adapter_dir: str) -> AdapterState:
    """Read back the unfolded state written next to an exported adapter (to continue or to re-fold)."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, STATE_CONFIG)) as f:
        meta = json.load(f)
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise ValueError(f"{adapter_dir}/{STATE_CONFIG} is not a version-{STATE_VERSION} BeamLoRA state file.")
    tensors = load_file(os.path.join(adapter_dir, STATE_WEIGHTS))
    state = AdapterState(r=meta["r"], alpha=meta["alpha"], tau=meta["tau"], dropout=meta["dropout"])
    for name in meta["module_names"]:
        for key in ("lora_A", "lora_B", "lora_score"):
            getattr(state, key)[name] = tensors[f"{name}.{key}"]
    return state


def _save_safetensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def out_dir_problem(out_dir: str, overwrite: bool) -> Optional[str]:
    """Why `out_dir` must not be written (None when it may): never clobber a folder unasked, nor a non-folder."""
    if not os.path.lexists(out_dir):
        return None
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        return f"{out_dir!r} exists and is not a folder; choose another output path."
    entries = os.listdir(out_dir)
    if not entries:
        return None
    if not overwrite:
        return (f"{out_dir!r} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it, "
                "or choose a new folder.")
    folders = sorted(e for e in entries if os.path.isdir(os.path.join(out_dir, e)))
    if folders:
        return (f"{out_dir!r} holds folders ({folders[:3]}): overwrite replaces the whole folder, and an adapter "
                "or merged-model folder has none, so this looks like something else (a run or checkpoint folder). "
                "Choose another output folder.")
    return None


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary sibling of `out_dir` to fill; on success rename it into place (replacing the old folder
    when `overwrite`), on error delete it. Readers see the old folder or the complete new one, never a mix."""
    problem = out_dir_problem(out_dir, overwrite)
    if problem:
        raise FileExistsError(problem)
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, f".{glob.escape(base)}.partial-*")):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        fsync_tree(tmp)
        kill_point("adapter")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------ save_adapter (live)
def save_adapter(model_or_engine, out_dir: str, base_model_name_or_path: Optional[str] = None,
                 overwrite: bool = False) -> str:
    """Write a stock peft LoRA adapter (score folded into A) plus our unfolded state into `out_dir`.

    Works on a plain model and on a DeepSpeed engine under any ZeRO stage. Under DeepSpeed call it on EVERY
    process (the gathers are collective); rank 0 alone writes, and every process returns only after the files
    are in place or raises when rank 0 could not write them. Returns `out_dir`.
    """
    model = unwrap(model_or_engine)
    if not find_beamlora_modules(model):
        raise ValueError("This model has no BeamLoRA modules, so there is no adapter to export. Pass the model "
                         "that beamlora_ds.apply() wrapped (or its DeepSpeed engine).")
    rank = _rank()
    problem = out_dir_problem(out_dir, overwrite) if rank == 0 else None
    if not _rank0_ok(problem is None):
        raise FileExistsError(problem or f"Process 0 refused to write {out_dir!r} (see its error); nothing was "
                              "written.")
    state = adapter_state_from_model(model)
    base_name = base_model_name_or_path or base_model_name_of(model)
    error = None
    if rank == 0:
        try:
            write_adapter(state, out_dir, target_modules_for(model, state.module_names), task_type_of(model),
                          base_name, overwrite)
            logger.info("Wrote a peft LoRA adapter (%d modules, r=%d, score folded into A) to %s",
                        len(state.module_names), state.r, out_dir)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = e
    if not _rank0_ok(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"Process 0 failed to write the adapter to {out_dir!r} (see its error).")
    return out_dir


def _rank() -> int:
    if not _distributed():
        return 0
    import deepspeed.comm as dist

    return dist.get_rank()


def _distributed() -> bool:
    try:
        import deepspeed.comm as dist
    except ImportError:
        return False
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank0_ok(ok: bool) -> bool:
    """Rank 0's verdict on every process (a broadcast, so also a barrier): only rank 0 writes, and a refusal
    there must stop the others too instead of leaving them waiting in the next collective."""
    if not _distributed():
        return ok
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=get_accelerator().current_device_name())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


# ------------------------------------------------------------------------------------------------- merging
@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold W0 += (alpha / r) B diag(w) A into every base layer and put the plain layer back (in place).

    Returns the model, now without BeamLoRA modules. A 4-bit bitsandbytes base is dequantized and merged into
    a bf16 nn.Linear, and the whole model is cast to bf16: the merged model is bf16, not 4-bit. Needs whole
    tensors, so not under ZeRO-3 (export with save_adapter or beamlora-export there, and merge outside).
    """
    if _is_wrapper(model):
        raise TypeError("merge_adapter edits modules in place; pass a model outside DeepSpeed/DDP. Under DeepSpeed, "
                        "export with save_adapter(engine, dir) or beamlora-export and merge from there.")
    modules = find_beamlora_modules(model)
    if not modules:
        raise ValueError("This model has no BeamLoRA modules, so there is nothing to merge.")
    for name, m in modules.items():
        for key in ("lora_A", "lora_B", "lora_score"):
            if hasattr(getattr(m, key), "ds_id"):
                raise ValueError(f"{name}.{key} is a ZeRO-3 parameter; merge_adapter needs whole tensors. Export "
                                 "with save_adapter(engine, dir) or beamlora-export and merge outside DeepSpeed.")
    state = AdapterState(*_shared_settings(modules))
    for name, m in modules.items():
        for key in ("lora_A", "lora_B", "lora_score"):
            getattr(state, key)[name] = getattr(m, key).detach().float()
    return merge_state_into(model, state, {name: m.base_layer for name, m in modules.items()})


def merge_state_into(model: nn.Module, state: AdapterState, bases: Optional[Dict[str, nn.Module]] = None
                     ) -> nn.Module:
    """Merge an adapter into the base layers named like its modules (in place); returns the model.

    When any base was 4-bit, the whole model becomes a plain bf16 model (a half-4-bit, half-dense model is
    neither what QLoRA users deploy nor loadable as saved)."""
    quantized = 0
    for name in state.module_names:
        base = bases[name] if bases is not None else _submodule(model, name)
        quantized += getattr(getattr(base, "weight", None), "quant_state", None) is not None
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


def merged_linear(base: nn.Module, delta: torch.Tensor, name: str = "") -> nn.Module:
    """`base` with `delta` added to its weight (in fp32, stored back in the base dtype); a new bf16 nn.Linear
    for a 4-bit base."""
    weight = getattr(base, "weight", None)
    if weight is None:
        raise TypeError(f"{name}: {type(base).__name__} has no weight to merge into.")
    if getattr(weight, "quant_state", None) is not None:
        return _merged_4bit(base, delta, name)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name}: cannot merge into a {weight.dtype} weight ({type(base).__name__}); only float "
                        "and bitsandbytes 4-bit bases are supported.")
    _check_fits(name, weight.shape, delta)
    weight.data.copy_((weight.data.float() + delta.to(weight.device)).to(weight.dtype))
    return base


def _merged_4bit(base: nn.Module, delta: torch.Tensor, name: str) -> nn.Linear:
    dense = dequantize_4bit_weight(base).float()
    _check_fits(name, dense.shape, delta)
    return dense_bf16_linear(dense + delta.to(dense.device), getattr(base, "bias", None))


def _check_fits(name: str, shape, delta: torch.Tensor) -> None:
    if tuple(shape) != tuple(delta.shape):
        raise ValueError(f"{name}: the base weight is {tuple(shape)}, the adapter's update {tuple(delta.shape)}. "
                         "Pass the base model this adapter was trained on.")


def dense_bf16_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.bfloat16,
                      device=weight.device)
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias.data)
    return layer.requires_grad_(False)


def dequantize_4bit_weight(base: nn.Module) -> torch.Tensor:
    """The dense weight of a bitsandbytes Linear4bit, also after its eval-mode CPU forward repacked it in place.

    bitsandbytes 0.50's own inverse of that repacking edits the layer's quant state in place and, without
    double quantization, leaves absmax in the packed (transposed) layout, which dequantizes to a wrong weight
    (measured: 10% off for in_features > 64). So: unpack a copy, and put absmax back in row order ourselves.
    """
    import copy

    import bitsandbytes.functional as bnbf

    data, quant_state = base.weight.data, base.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        data, quant_state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(quant_state))
        if not quant_state.nested and quant_state.absmax.dim() == 2:  # packed layout: (in / blocksize, out)
            quant_state.absmax = quant_state.absmax.T.reshape(-1).float()
    return bnbf.dequantize_4bit(data, quant_state)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def save_merged(model: nn.Module, out_dir: str, overwrite: bool = False, tokenizer=None) -> str:
    """merge_adapter (if not done yet) then `save_pretrained` into `out_dir`, all or nothing. Edits `model`."""
    if _is_wrapper(model):
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
    if any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in model.modules()):
        to_plain_bf16(model)
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def to_plain_bf16(model: nn.Module) -> nn.Module:
    """Dequantize every remaining 4-bit layer, cast the model to bf16 and drop its quantization config, so it
    runs and saves as an ordinary bf16 model."""
    for name, module in list(model.named_modules()):
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
            dense = dequantize_4bit_weight(module).float()
            _replace(model, name, dense_bf16_linear(dense, getattr(module, "bias", None)))
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


# ------------------------------------------------------------------------------- from a DeepSpeed checkpoint
def resolve_tag(checkpoint_dir: str, tag: Optional[str]) -> str:
    """`tag`, else the one named in the checkpoint folder's `latest` file."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"Checkpoint folder {checkpoint_dir!r} does not exist.")
    if tag:
        return tag
    latest = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(latest):
        tags = sorted(d for d in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, d)))
        raise FileNotFoundError(f"{checkpoint_dir!r} has no 'latest' file; pass --tag, one of {tags[:5]}.")
    with open(latest) as f:
        return f.read().strip()


def controller_state(tag_dir: str) -> dict:
    """The BeamController.state_dict() saved by beamlora_ds.save_checkpoint (r, alpha, tau, module names)."""
    path = os.path.join(tag_dir, CONTROLLER_STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by beamlora_ds.save_checkpoint, "
                                "so tau and the module names are unknown. Save checkpoints with "
                                "beamlora_ds.save_checkpoint(engine, beam, dir).")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state = saved.get("beamlora", saved)  # {"beamlora": state_dict, "rng": ...} or the bare state_dict
    if "config" not in state or "module_names" not in state:
        raise ValueError(f"{path} does not hold a BeamController state (no 'config'/'module_names').")
    return state


def fp32_weights_from_checkpoint(tag_dir: str, checkpoint_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    """Trainable weights as full fp32 tensors (lazily, not materialised), from any ZeRO stage's files."""
    if glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):  # ZeRO 1-3: rebuild the fp32 master
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag, exclude_frozen_parameters=True,
                                                        lazy_mode=True)
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")  # ZeRO-0: the whole module is in the model file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tag_dir!r} holds neither ZeRO optimizer shards nor mp_rank_00_model_states.pt: "
                                "not a DeepSpeed checkpoint folder.")
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    low = sorted({str(t.dtype) for k, t in module.items() if "lora_" in k and t.dtype != torch.float32})
    if low:
        logger.warning("ZeRO stage 0 checkpoint stores the adapter in %s; exporting that precision.", low)
    return module


def adapter_state_from_checkpoint(checkpoint_dir: str, tag: Optional[str] = None) -> Tuple[AdapterState, dict]:
    """The unfolded adapter and the BeamLoRA config of a DeepSpeed checkpoint; no distributed job needed."""
    tag = resolve_tag(checkpoint_dir, tag)
    tag_dir = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"No checkpoint {tag!r} in {checkpoint_dir!r}.")
    ctrl = controller_state(tag_dir)
    config = ctrl["config"]
    weights = fp32_weights_from_checkpoint(tag_dir, checkpoint_dir, tag)
    state = AdapterState(r=int(config["r"]), alpha=float(config["alpha"]), tau=float(config["tau"]),
                         dropout=float(config.get("dropout", 0.0)))
    missing = []
    for name in ctrl["module_names"]:
        for key in ("lora_A", "lora_B", "lora_score"):
            found = _lookup(weights, f"{name}.{key}")
            if found is None:
                missing.append(f"{name}.{key}")
                continue
            getattr(state, key)[name] = _materialise(found).float().clone()
    if missing:
        raise ValueError(f"The checkpoint's weights lack {len(missing)} adapter tensors (e.g. {missing[:3]}); were "
                         "adapter parameters frozen or renamed? Nothing was written.")
    _check_checkpoint_shapes(state)
    return state, config


def _lookup(weights: dict, key: str):
    """`key`, with or without a wrapper's `module.` prefix."""
    for candidate in (key, "module." + key):
        if candidate in weights:
            return weights[candidate]
    if key.startswith("module.") and key[len("module."):] in weights:
        return weights[key[len("module."):]]
    return None


def _materialise(tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, torch.Tensor) else tensor.contiguous()  # zero_to_fp32 lazy tensors


def _check_checkpoint_shapes(state: AdapterState) -> None:
    for name in state.module_names:
        a, b, s = state.lora_A[name], state.lora_B[name], state.lora_score[name]
        fits = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] == state.r and tuple(s.shape) == (state.r,)
        if not fits:
            raise ValueError(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)}, score {tuple(s.shape)} do not fit "
                             f"r={state.r}. The checkpoint and its BeamLoRA state disagree; nothing was written.")


def export_checkpoint(checkpoint_dir: str, out_dir: str, tag: Optional[str] = None, base_model: Optional[str] = None,
                      merge: bool = False, overwrite: bool = False, task_type: Optional[str] = "CAUSAL_LM") -> str:
    """What `beamlora-export` does: a peft adapter (or, with merge, a merged model) from a DeepSpeed checkpoint."""
    problem = out_dir_problem(out_dir, overwrite)
    if problem:
        raise FileExistsError(problem)
    if merge and not base_model:
        raise ValueError("--merge needs --base_model PATH: the base weights are not in the adapter checkpoint.")
    state, config = adapter_state_from_checkpoint(checkpoint_dir, tag)
    if merge:
        return _export_merged(state, base_model, out_dir, overwrite)
    targets = target_modules_from_config(config.get("target_modules", []), state.module_names)
    write_adapter(state, out_dir, targets, task_type, base_model, overwrite)
    logger.info("Wrote a peft LoRA adapter (%d modules, r=%d, score folded into A) to %s",
                len(state.module_names), state.r, out_dir)
    return out_dir


def _export_merged(state: AdapterState, base_model: str, out_dir: str, overwrite: bool) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    merge_state_into(model, state)
    tokenizer = _tokenizer_or_none(base_model)
    save_merged(model, out_dir, overwrite=overwrite, tokenizer=tokenizer)
    logger.info("Merged %d BeamLoRA modules into %s and saved the model to %s", len(state.module_names),
                base_model, out_dir)
    return out_dir


def _tokenizer_or_none(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        logger.info("No tokenizer in %s; the merged folder holds the model only.", path)
        return None


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="beamlora-export",
        description="Turn a BeamLoRA DeepSpeed checkpoint (any ZeRO stage, no GPUs or distributed job needed) into "
                    "a stock PEFT LoRA adapter (score folded into A), or with --merge into a merged model.")
    p.add_argument("checkpoint_dir", help="folder given to beamlora_ds.save_checkpoint (holds 'latest' and tags)")
    p.add_argument("out_dir", help="new folder for the adapter (or the merged model)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step100 (default: the 'latest' file)")
    p.add_argument("--merge", action="store_true", help="write a merged full model instead of an adapter")
    p.add_argument("--base_model", default=None,
                   help="base model path or name: needed by --merge; otherwise recorded in adapter_config.json")
    p.add_argument("--task_type", default="CAUSAL_LM",
                   help="peft task_type for adapter_config.json ('none' for a plain PeftModel); default CAUSAL_LM")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists and is not empty")
    args = p.parse_args(argv)
    if args.merge and not args.base_model:
        p.error("--merge needs --base_model PATH (the base weights are not in the checkpoint)")
    if args.task_type.lower() == "none":
        args.task_type = None
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_checkpoint(args.checkpoint_dir, args.out_dir, tag=args.tag, base_model=args.base_model,
                          merge=args.merge, overwrite=args.overwrite, task_type=args.task_type)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2
    print(os.path.abspath(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
