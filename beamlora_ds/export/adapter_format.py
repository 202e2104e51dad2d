"""The exported adapter: folding the score into A, and the files stock peft (and we) read back.

Folding is exact at inference, where dropout is the identity (docs/method.md section 6):

    B (w * (A x)) = B (diag(w) A) x,   w = r * softmax(score / tau) in fp32,   so A' = diag(w) A, B' = B

with the same r and alpha. `adapter_model.safetensors` + `adapter_config.json` then load with plain
`peft.PeftModel.from_pretrained` (and vLLM). An UNfolded adapter under peft's file names would load silently
and ignore the score, giving another model: our unfolded state goes under our own names only
(`beamlora_state.safetensors` + `beamlora_state.json`).

Plain torch, safetensors and peft's config: where the tensors come from (a live model, a DeepSpeed
checkpoint) is the business of live.py and from_checkpoint.py.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checkpointing.atomic import atomic_dir
from ..method.inject import matches_target
from ..method.layer import BeamLoRALinear, rank_weights
from .model_card import CARD, builtin_base_card

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names: folded (vanilla LoRA) tensors only
ADAPTER_CONFIG = "adapter_config.json"
STATE_WEIGHTS = "beamlora_state.safetensors"  # ours: the unfolded A, B and score
STATE_CONFIG = "beamlora_state.json"
STATE_FORMAT = "beamlora_ds.adapter"
STATE_VERSION = 1  # another version, or a file without fan_in_fan_out (a development version wrote it), is refused
PEFT_PREFIX = "base_model.model."
TENSOR_KEYS = ("lora_A", "lora_B", "lora_score")


@dataclass
class AdapterState:
    """The unfolded adapter: full fp32 tensors by module name (in module order) and the settings that fold it."""

    r: int
    alpha: float
    tau: float
    dropout: float = 0.0
    fan_in_fan_out: bool = False  # peft's flag: the bases store their weight in x out (transformers Conv1D)
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


def shared_settings(modules: Mapping[str, BeamLoRALinear]) -> Tuple[int, float, float, float, bool]:
    """r, alpha, tau, dropout and fan_in_fan_out: one adapter_config.json describes every module, so the first four
    must agree (fan_in_fan_out: see `fan_in_fan_out_of`)."""
    settings = {(m.r, float(m.alpha), float(m.tau), _dropout_p(m)) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"BeamLoRA modules differ in (r, alpha, tau, dropout): {sorted(settings)}. Export writes "
                         "one adapter_config.json for all modules; use one BeamLoRAConfig for the whole model.")
    return (*next(iter(settings)), fan_in_fan_out_of({name: m.fan_in_fan_out for name, m in modules.items()}))


def fan_in_fan_out_of(conv1d_by_name: Mapping[str, bool]) -> bool:
    """peft's `fan_in_fan_out` for adapter_config.json, from which modules wrap a transformers Conv1D: True when
    any does. The adapter tensors have the same shapes either way (A: r x in, B: out x r); the flag only tells
    peft that the base weight is stored in x out (docs/architectures.md).

    peft has one flag for all layers, but its loader sets it per layer from the layer's type, so an adapter on
    Conv1D and nn.Linear layers together (GPT-2's c_attn with lm_head) still loads right: True describes the
    Conv1D layers, and peft says so in a warning for each nn.Linear layer."""
    return any(conv1d_by_name.values())


def _dropout_p(module: BeamLoRALinear) -> float:
    return float(module.lora_dropout.p) if isinstance(module.lora_dropout, nn.Dropout) else 0.0


# ----------------------------------------------------------------------------------------------- folding
def fold(lora_A: torch.Tensor, lora_B: torch.Tensor, lora_score: torch.Tensor, tau: float
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = (diag(w) A, B) in fp32: the vanilla LoRA pair that computes what the scored beam computes."""
    w = rank_weights(lora_score.float(), tau)
    return (w[:, None] * lora_A.float()).contiguous(), lora_B.float().contiguous()


def delta_weight(state: AdapterState, name: str) -> torch.Tensor:
    """(alpha / r) * B diag(w) A in fp32, shaped like an nn.Linear weight (out x in; a Conv1D weight is its
    transpose)."""
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


# ----------------------------------------------------------------------------------- peft adapter config
def peft_config_dict(state: AdapterState, target_modules: Union[List[str], str], task_type: Optional[str],
                     base_model_name_or_path: Optional[str]) -> dict:
    """adapter_config.json as the installed peft's own LoraConfig writes it, so stock peft loads it as is."""
    from peft import LoraConfig

    alpha = int(state.alpha) if float(state.alpha).is_integer() else state.alpha
    config = LoraConfig(r=state.r, lora_alpha=alpha, lora_dropout=state.dropout, target_modules=target_modules,
                        bias="none", task_type=task_type, base_model_name_or_path=base_model_name_or_path,
                        inference_mode=True, fan_in_fan_out=state.fan_in_fan_out, use_rslora=False, use_dora=False,
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
    if leaves_select_exactly(model, names, leaves):
        return leaves
    logger.info("Leaf names %s would select more modules than BeamLoRA wrapped; adapter_config.json lists the %d "
                "full module names instead.", leaves, len(names))
    return list(names)


def leaves_select_exactly(model: nn.Module, names: Sequence[str], leaves: Sequence[str]) -> bool:
    """Whether peft, given `leaves` as target_modules, would select exactly the modules `names` of `model`."""
    inside = tuple(name + "." for name in names)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    return {n for n in candidates if matches_target(n, list(leaves))} == set(names)


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
    """The path or hub name the model was loaded from, for adapter_config.json (None when unknown)."""
    name = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


# ------------------------------------------------------------------------------------ writing and reading
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
        card = builtin_base_card(base_model_name_or_path)
        if card is not None:
            with open(os.path.join(tmp, CARD), "w") as f:
                f.write(card)
    return out_dir


def _state_tensors(state: AdapterState) -> Dict[str, torch.Tensor]:
    return {f"{name}.{key}": getattr(state, key)[name].contiguous()
            for name in state.module_names for key in TENSOR_KEYS}


def _state_json(state: AdapterState, base_model_name_or_path: Optional[str]) -> dict:
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "r": state.r, "alpha": state.alpha, "tau": state.tau,
            "dropout": state.dropout, "fan_in_fan_out": state.fan_in_fan_out, "module_names": state.module_names,
            "base_model_name_or_path": base_model_name_or_path,
            "note": f"Unfolded BeamLoRA state: <module>.lora_A, .lora_B, .lora_score. {ADAPTER_WEIGHTS} holds the "
                    "folded vanilla-LoRA equivalent A' = diag(r * softmax(score / tau)) A, B' = B."}


def load_state(adapter_dir: str) -> AdapterState:
    """Read back the unfolded state written next to an exported adapter (to continue or to re-fold)."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, STATE_CONFIG)) as f:
        meta = json.load(f)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{adapter_dir}/{STATE_CONFIG} is not a BeamLoRA state file.")
    if meta.get("version") != STATE_VERSION or "fan_in_fan_out" not in meta:
        raise ValueError(f"{adapter_dir}/{STATE_CONFIG} is not the layout this beamlora_ds reads (version "
                         f"{STATE_VERSION}, with fan_in_fan_out): another or a development version of beamlora_ds "
                         f"wrote it. Its {ADAPTER_WEIGHTS} is a stock peft adapter and still loads in peft.")
    tensors = load_file(os.path.join(adapter_dir, STATE_WEIGHTS))
    state = AdapterState(r=meta["r"], alpha=meta["alpha"], tau=meta["tau"], dropout=meta["dropout"],
                         fan_in_fan_out=bool(meta["fan_in_fan_out"]))
    for name in meta["module_names"]:
        for key in TENSOR_KEYS:
            getattr(state, key)[name] = tensors[f"{name}.{key}"]
    return state


def _save_safetensors(tensors: Dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
