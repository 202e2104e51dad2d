"""Order mistakes around apply(), caught when apply() is called instead of as an IndexError deep inside DeepSpeed.

The right order is: load the model, `apply()`, build the optimizer from the trainable parameters, then
`deepspeed.initialize` (or the Trainer). apply() replaces layers and freezes the base, so an optimizer built
before it holds only frozen tensors, and an engine built before it never sees the adapter parameters.
"""
from __future__ import annotations

import gc
import warnings

import torch
from torch import nn

from .access import is_deepspeed_engine, taken_by_engine

ORDER = ("The order is: model -> beamlora_ds.apply(model, config) -> optimizer from "
         "beamlora_ds.optimizer_param_groups(model) -> deepspeed.initialize (or the Trainer).")


def check_model_before_apply(model: nn.Module) -> None:
    """Refuse an engine, or a model an engine already took over; warn about an optimizer built too early."""
    if is_deepspeed_engine(model):
        raise TypeError("apply() got a DeepSpeed engine. Call apply() on the model before deepspeed.initialize, "
                        "then build the optimizer and the engine. " + ORDER)
    if any(taken_by_engine(p) for p in model.parameters()):
        raise RuntimeError("apply() was called after deepspeed.initialize: the engine already partitioned this "
                           "model's parameters and would never train the adapter (DeepSpeed fails later with an "
                           "IndexError). " + ORDER)
    early = optimizers_holding(model.parameters())
    if early:
        warnings.warn(f"{len(early)} optimizer(s) ({type(early[0]).__name__}) built before apply() hold this model's "
                      "parameters: apply() freezes them and adds new adapter parameters the optimizer does not "
                      "have (deepspeed.initialize then fails with an IndexError, a torch loop trains nothing). "
                      + ORDER, stacklevel=3)


def optimizers_holding(parameters) -> list:
    """Live torch optimizers that hold any of `parameters` (one pass over the tracked objects, ~50 ms)."""
    ids = {id(p) for p in parameters}
    # issubclass(type(...)): isinstance would ask each object for __class__, and some deprecated torch objects warn
    return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.optim.Optimizer)
            and any(id(p) in ids for group in obj.param_groups for p in group["params"])]
