"""One adapter from every pipeline stage (docs/pipeline.md): each stage holds its own layers' modules, the exported
adapter holds the whole model's, in its layer order and under its layer numbering; and the module names of a
pipeline's layer list turned into the names of the model the adapter is for (`rename`)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch.distributed as dist

from ..method.stages import layer_number
from .adapter_format import TENSOR_KEYS, AdapterState, leaves_select_exactly, target_modules_for


def every_stage(state: AdapterState, group) -> AdapterState:
    """Every stage's modules in one state, ordered by layer number (one object all-gather over the pipeline
    `group`; adapters are small); `state` itself without a group."""
    if group is None:
        return state
    stages = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, {key: getattr(state, key) for key in TENSOR_KEYS}, group=group)
    order = sorted((layer_number(name), stage, i, name) for stage, tensors in enumerate(stages)
                   for i, name in enumerate(tensors["lora_A"]))
    merged = AdapterState(state.r, state.alpha, state.tau, state.dropout, state.fan_in_fan_out)
    for _, stage, _, name in order:
        for key in TENSOR_KEYS:
            getattr(merged, key)[name] = stages[stage][key][name]
    return merged


def every_stage_targets(model, names: Sequence[str], group) -> Union[List[str], str]:
    """adapter_config.json's target_modules for every stage's modules (`names`: this stage's, of `model`): the leaf
    names of all stages when, on every stage, they select exactly the modules wrapped there, else every stage's full
    names (peft then matches them exactly). Without a group, target_modules_for on this model."""
    if group is None:
        return target_modules_for(model, names)
    stage_names = [None] * dist.get_world_size(group)
    dist.all_gather_object(stage_names, list(names), group=group)
    leaves = sorted({n.rpartition(".")[2] for stage in stage_names for n in stage})
    exact = [None] * len(stage_names)
    dist.all_gather_object(exact, leaves_select_exactly(model, names, leaves), group=group)
    return leaves if all(exact) else [n for stage in stage_names for n in stage]


def renamed(state: AdapterState, targets: Sequence[str], rename: Optional[Callable[[str], str]]):
    """(state, target_modules) under the names `rename` gives each module (the model the adapter is for); the leaf
    names stay the targets when renaming keeps every leaf."""
    if rename is None:
        return state, targets
    names = {name: rename(name) for name in state.module_names}
    if len(set(names.values())) != len(names):
        raise ValueError("rename gives two modules the same name; it must map each module to its own name.")
    out = AdapterState(state.r, state.alpha, state.tau, state.dropout, state.fan_in_fan_out)
    for key in TENSOR_KEYS:
        setattr(out, key, {names[n]: value for n, value in getattr(state, key).items()})
    keeps_leaves = all(old.rpartition(".")[2] == new.rpartition(".")[2] for old, new in names.items())
    leaves = isinstance(targets, list) and not any("." in t for t in targets)
    return out, (list(targets) if leaves and keeps_leaves else list(names.values()))
