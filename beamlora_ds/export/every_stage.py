"""One adapter from every pipeline stage (docs/pipeline.md): each stage holds its own layers' modules, the exported
adapter holds the whole model's, in its layer order and under its layer numbering; and the module names of a
pipeline's layer list turned into the names of the model the adapter is for (`rename`)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch.distributed as dist

from ..method.stages import layer_number
from .adapter_format import TENSOR_KEYS, AdapterState


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


def every_stage_targets(targets: Union[List[str], str], names: Sequence[str], group) -> Union[List[str], str]:
    """adapter_config.json's target_modules for every stage: the leaf names when, on every stage, they select
    exactly the modules wrapped there (`targets` is then leaf names), else every stage's full module `names`."""
    if group is None:
        return targets
    stages = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, (targets, list(names)), group=group)
    if all(isinstance(t, list) and not any("." in n for n in t) for t, _ in stages):
        return sorted({n for t, _ in stages for n in t})
    return [n for _, stage_names in stages for n in stage_names]


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
