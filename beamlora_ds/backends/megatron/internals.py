"""Every private megatron-core name BeamLoRA relies on, one function each (docs/platform.md, "megatron-core
internals"; tests/megatron pin them for the version in constraints.txt).

- `ChainedOptimizer.chained_optimizers`: the optimizers `get_megatron_optimizer` chains (public attribute, listed
  because BeamLoRA walks it);
- `DistributedOptimizer._get_model_param_range_map(p)["param"]`: the slice of `p.view(-1)` this data-parallel
  process owns (its shards cut the flat buffer through parameters);
- `DistributedOptimizer.model_param_group_index_map[p]` -> (group, position) of the fp32 main shard of that slice in
  the wrapped torch optimizer's `param_groups` (what `_get_main_param_and_optimizer_states` reads), whose
  `state[main]` holds the moments: live tensors BeamLoRA writes in place;
- the plain optimizers' `p.main_param` (bf16: the fp32 copy; fp32: none, the parameter is its own master) and the
  wrapped torch optimizer's `state[main]` and `param_groups` (FusedAdam keeps its step count in the group).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch


def is_megatron_optimizer(obj) -> bool:
    """True for a megatron-core optimizer (chained or not), without importing megatron."""
    return any(cls.__module__.startswith("megatron.core.optimizer") for cls in type(obj).__mro__)


def inner_optimizers(optimizer) -> List[object]:
    """The MegatronOptimizers behind what `get_megatron_optimizer` returned (a ChainedOptimizer or one)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed(optimizer) -> bool:
    """Whether this (inner) optimizer is Megatron's DistributedOptimizer: state sharded over data-parallel ranks."""
    return hasattr(optimizer, "model_param_group_index_map") and hasattr(optimizer, "_get_model_param_range_map")


def precision_aware(optimizer) -> bool:
    """The precision-aware optimizer keeps scaled low-precision states that cannot be written in place."""
    config = getattr(optimizer, "config", None)
    return bool(getattr(config, "use_precision_aware_optimizer", False))


def has_loss_scaler(optimizer) -> bool:
    """fp16 training: a loss scaler may skip a step after an overflow."""
    return getattr(optimizer, "grad_scaler", None) is not None


def data_parallel_group(optimizer):
    """The group a DistributedOptimizer shards its state over."""
    return optimizer.data_parallel_group


def holds(optimizer, param: torch.nn.Parameter) -> bool:
    """Whether this inner optimizer trains (the distributed one: this process's part of) `param`."""
    if is_distributed(optimizer):
        return param in optimizer.model_param_group_index_map
    main = main_param(optimizer, param)
    return any(main is p for group in optimizer.optimizer.param_groups for p in group["params"])


def owned_range(optimizer, param: torch.nn.Parameter) -> Tuple[int, int]:
    """(start, numel) of the flat slice of `param` whose master and moments this process holds."""
    if not is_distributed(optimizer):
        return 0, param.numel()
    try:
        owned = optimizer._get_model_param_range_map(param)["param"]
    except KeyError:  # this data-parallel rank owns no part of param
        return 0, 0
    return int(owned.start), int(owned.size)


def main_param(optimizer, param: torch.nn.Parameter):
    """The fp32 main values of the part of `param` this process holds (a flat shard under the distributed
    optimizer, whole otherwise), live; None when it holds none."""
    if is_distributed(optimizer):
        index = optimizer.model_param_group_index_map.get(param)
        return None if index is None else optimizer.optimizer.param_groups[index[0]]["params"][index[1]]
    main = getattr(param, "main_param", None)
    return param if main is None else main


def state_of(optimizer, main: torch.Tensor, create: bool = False) -> dict:
    """The wrapped torch optimizer's live state entry of a main tensor (torch creates it at the first step; with
    `create`, an empty one is made to be filled, as when a checkpoint is loaded before any step)."""
    state = optimizer.optimizer.state
    return state[main] if create or main in state else {}


def main_and_state(optimizer, param: torch.nn.Parameter) -> Dict[str, torch.Tensor]:
    """{"param": fp32 main values, **optimizer state} of the part of `param` this process holds, as live tensors;
    {} when it holds none."""
    main = main_param(optimizer, param)
    return {} if main is None else {"param": main, **state_of(optimizer, main)}


def weight_decay_of(optimizer, param: torch.nn.Parameter):
    """The weight decay the optimizer's group for `param` applies (None where this process cannot tell): the
    group's `weight_decay`, which Megatron's OptimizerParamScheduler rewrites (as weight decay x `wd_mult`) at its
    construction and every step, and which the torch optimizer reads."""
    main = main_param(optimizer, param)
    for group in optimizer.optimizer.param_groups:
        if any(main is p for p in group["params"]):
            return group.get("weight_decay", 0.0)
    return None


def adam_step(optimizer, param):
    """Adam's step count for the part of `param` this process holds: torch keeps it per parameter, Transformer
    Engine's and Apex's FusedAdam (Megatron's choice where installed) per group. None before the first step."""
    main = main_param(optimizer, param)
    if main is None:
        return None
    step = state_of(optimizer, main).get("step")
    if step is None:
        step = next((g.get("step") for g in optimizer.optimizer.param_groups if any(main is p for p in g["params"])),
                    None)
    return None if step is None else int(step)


def group_settings(optimizer) -> list:
    """The wrapped torch optimizer's group entries other than the parameters (lr, betas, FusedAdam's step, ...)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.optimizer.param_groups]


def set_group_settings(optimizer, settings: list) -> None:
    for group, saved in zip(optimizer.optimizer.param_groups, settings):
        group.update(saved)
