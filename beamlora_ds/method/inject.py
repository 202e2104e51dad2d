"""Finding a model's target layers, wrapping them in BeamLoRALinear and freezing everything else.

Wrappable are nn.Linear (bitsandbytes Linear4bit is one) and transformers' GPT-2 style Conv1D
(docs/architectures.md)."""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

from torch import nn

from .config import BeamLoRAConfig
from .layer import WRAPPABLE, BeamLoRALinear, base_features, is_wrappable
from .score_table import attach_score_table
from .targets import model_type_of, recommended_targets


def matches_target(name: str, target_modules) -> bool:
    """peft's rule: a regex string must match the whole module name; a list entry must equal it or its suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == key or name.endswith("." + key) for key in target_modules)


def wrap_targets(model: nn.Module, config: BeamLoRAConfig, table_per_child: bool = False
                 ) -> Dict[str, BeamLoRALinear]:
    """Replace every matching linear layer in `model` (in place) by a BeamLoRALinear; return them by name.

    Only `lora_A`, `lora_B` and the scores stay trainable; the scores of all wrapped layers live in one
    (modules x r) table, `model.beamlora_scores.lora_score` (docs/fused_score_design.md), or with
    `table_per_child` one table in each child of `model` that holds wrapped layers (a DeepSpeed PipelineModule
    saves each child, one layer of the pipeline, in its own file). Fails before changing anything when nothing
    matches, a match is not a linear layer, or r does not fit a layer.
    """
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
    if not table_per_child:
        attach_score_table(model, wrapped)
        return wrapped
    for child_name, child in model.named_children():
        mine = {name: m for name, m in wrapped.items() if name.startswith(child_name + ".")}
        if mine:
            attach_score_table(child, mine)
    return wrapped


def check_targets(model: nn.Module, config: BeamLoRAConfig) -> List[Tuple[str, nn.Module]]:
    """The (name, layer) pairs wrap_targets() would wrap; raises as it does when nothing matches, a match is not a
    linear layer, or r does not fit a layer. Uses only names and shapes, changes nothing: it works on a weightless
    meta-device skeleton (loading.models.meta_skeleton), which is how launch/train.py refuses these before loading any weights.
    """
    matched = [(name, module) for name, module in model.named_modules()
               if name and matches_target(name, config.target_modules)]
    if not matched:
        raise ValueError(no_match_message(model, config.target_modules))
    not_linear = [f"{name} ({type(module).__name__})" for name, module in matched if not is_wrappable(module)]
    if not_linear:
        raise TypeError(f"target_modules matched modules BeamLoRA cannot wrap (it wraps {WRAPPABLE}): "
                        f"{not_linear[:5]}. Narrow target_modules to the linear projections.")
    sizes = [(name, *base_features(module)) for name, module in matched]
    too_small = [f"{name} ({d_in}->{d_out})" for name, d_in, d_out in sizes if config.r > min(d_in, d_out)]
    if too_small:
        raise ValueError(f"r={config.r} is larger than the smaller dimension of {too_small[:5]}. Lower r or "
                         "leave those layers out of target_modules.")
    return matched


def no_match_message(model: nn.Module, target_modules) -> str:
    """Why nothing matched, with the names that would: the model's wrappable layers and, for a known
    architecture, its recommended targets (targets.py)."""
    message = (f"target_modules={target_modules!r} matched no module. Layers BeamLoRA can wrap in this model are "
               f"named like: {wrappable_leaf_names(model)}.")
    model_type = model_type_of(model)
    recommended = recommended_targets(model_type)
    if recommended:
        message += f" For {model_type} models the recommended target names are {','.join(recommended)}."
    return message + " See docs/architectures.md."


def find_beamlora_modules(model: nn.Module) -> Dict[str, BeamLoRALinear]:
    """All BeamLoRALinear modules of `model`, by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BeamLoRALinear)}


def optimizer_param_groups(model: nn.Module, weight_decay: float = 0.0) -> List[dict]:
    """Trainable parameters for a torch optimizer: weight decay on A and B, never on the score (as the paper).

    With weight_decay 0 the two groups would be the same, so there is one: under ZeRO each group is one more flat
    buffer, all-reduce and all-gather per step (docs/fused_score_design.md)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("lora_score") else decay).append(p)
    if not weight_decay:
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def wrappable_leaf_names(model: nn.Module, limit: int = 10) -> List[str]:
    """Distinct last name parts of the layers apply() could wrap, in module order (any module names if none)."""
    suffixes: List[str] = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if name and is_wrappable(module) and leaf not in suffixes:
            suffixes.append(leaf)
    examples: Iterable[str] = suffixes[:limit] or [n for n, _ in model.named_modules() if n][:limit]
    return list(examples)
