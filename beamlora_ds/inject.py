"""apply(): wrap the target linear layers of a model in BeamLoRALinear and freeze everything else."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

from torch import nn

from .config import BeamLoRAConfig
from .controller import BeamController
from .layer import BeamLoRALinear


def matches_target(name: str, target_modules) -> bool:
    """peft's rule: a regex string must match the whole module name; a list entry must equal it or its suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def apply(model: nn.Module, config: BeamLoRAConfig) -> BeamController:
    """Replace every matching nn.Linear in `model` (in place) by a BeamLoRALinear; return its controller.

    Only `lora_A`, `lora_B` and `lora_score` stay trainable. Fails before changing anything when nothing
    matches, a match is not a linear layer, or r does not fit a layer.
    """
    config.validate()
    if find_beamlora_modules(model):
        raise ValueError("This model already has BeamLoRA modules; apply() once per model.")
    matched = check_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: Dict[str, BeamLoRALinear] = {}
    for name, module in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = BeamLoRALinear(module, r=config.r, alpha=config.alpha, dropout=config.dropout, tau=config.tau)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return BeamController(wrapped, config)


def check_targets(model: nn.Module, config: BeamLoRAConfig) -> List[Tuple[str, nn.Module]]:
    """The (name, layer) pairs apply() would wrap; raises as apply() does when nothing matches, a match is not a
    linear layer, or r does not fit a layer. Uses only names and shapes, changes nothing: it works on a weightless
    meta-device skeleton (models.meta_skeleton), which is how train.py refuses these before loading any weights.
    """
    matched = [(name, module) for name, module in model.named_modules()
               if name and matches_target(name, config.target_modules)]
    if not matched:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module. Linear layers in this "
                         f"model are named like: {_linear_name_examples(model)}.")
    not_linear = [f"{name} ({type(module).__name__})" for name, module in matched if not isinstance(module, nn.Linear)]
    if not_linear:
        raise TypeError(f"target_modules matched modules BeamLoRA cannot wrap (only nn.Linear and bitsandbytes "
                        f"Linear4bit): {not_linear[:5]}. Narrow target_modules to the linear projections.")
    too_small = [f"{name} ({m.in_features}->{m.out_features})" for name, m in matched
                 if config.r > min(m.in_features, m.out_features)]
    if too_small:
        raise ValueError(f"r={config.r} is larger than the smaller dimension of {too_small[:5]}. Lower r or "
                         "leave those layers out of target_modules.")
    return matched


def find_beamlora_modules(model: nn.Module) -> Dict[str, BeamLoRALinear]:
    """All BeamLoRALinear modules of `model`, by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BeamLoRALinear)}


def optimizer_param_groups(model: nn.Module, weight_decay: float = 0.0) -> List[dict]:
    """Trainable parameters for a torch optimizer: weight decay on A and B, never on the score (as the paper)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("lora_score") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _linear_name_examples(model: nn.Module, limit: int = 10) -> List[str]:
    suffixes: List[str] = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.Linear) and leaf not in suffixes:
            suffixes.append(leaf)
    examples: Iterable[str] = suffixes[:limit] or [n for n, _ in model.named_modules() if n][:limit]
    return list(examples)
