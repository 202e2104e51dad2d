"""apply(): put BeamLoRA on a model and get the controller that runs it, wired to the training platform.

The right order is: load the model, `apply()`, build the optimizer from the trainable parameters, then
`deepspeed.initialize` (or the Trainer). apply() replaces layers and freezes the base, so an optimizer built before
it holds only frozen tensors, and an engine built before it never sees the adapter parameters: those mistakes are
caught here, instead of as an IndexError deep inside DeepSpeed.
"""
from __future__ import annotations

import warnings

from torch import nn

from .method.config import BeamLoRAConfig
from .method.controller import BeamController
from .method.inject import wrap_targets
from .backends import BACKENDS
from .backends.torch_access import optimizers_holding
from .backends.deepspeed.internals import taken_by_zero_optimizer
from .backends.deepspeed.pipeline_module import is_pipeline_module, wrap_pipeline_stage
from .backends.megatron.layers import is_megatron_model, wrap_megatron_model
from .backends.wrappers import is_deepspeed_engine, is_megatron_wrapper

ORDER = ("The order is: model -> beamlora_ds.apply(model, config) -> optimizer from "
         "beamlora_ds.optimizer_param_groups(model) -> deepspeed.initialize (or the Trainer).")


def apply(model: nn.Module, config: BeamLoRAConfig) -> BeamController:
    """Replace every matching linear layer in `model` (in place) by a BeamLoRALinear; return its controller.

    Only `lora_A`, `lora_B` and the scores stay trainable; the scores of all wrapped layers live in one
    (modules x r) table, `model.beamlora_scores.lora_score` (docs/fused_score_design.md; a DeepSpeed PipelineModule
    has one per pipeline layer, a virtual pipeline one per chunk). Fails before changing
    anything when nothing matches, a match is not a linear layer, or r does not fit a layer. On a megatron-core
    model the targets are its parallel linear layers (docs/megatron.md); under a virtual pipeline, pass the list
    of this process's model chunks; on a DeepSpeed PipelineModule, this process's stage (docs/pipeline.md).
    """
    config.validate()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        check_model_before_apply(chunk)
    if isinstance(model, (list, tuple)):
        if not chunks or not all(is_megatron_model(c) for c in chunks):
            raise TypeError("apply() takes a list of models only for megatron-core's virtual pipeline (the model "
                            "chunks of this process); pass a single model otherwise.")
        return BeamController(wrap_megatron_model(chunks, config), config, BACKENDS)
    wrap = (wrap_megatron_model if is_megatron_model(model) else wrap_pipeline_stage if is_pipeline_module(model)
            else wrap_targets)
    return BeamController(wrap(model, config), config, BACKENDS)


def check_model_before_apply(model: nn.Module) -> None:
    """Refuse an engine, or a model an engine already took over; warn about an optimizer built too early."""
    if is_deepspeed_engine(model):
        raise TypeError("apply() got a DeepSpeed engine. Call apply() on the model before deepspeed.initialize, "
                        "then build the optimizer and the engine. " + ORDER)
    if is_megatron_wrapper(model):
        raise TypeError(f"apply() got Megatron's {type(model).__name__}. Call apply() on the GPT model before wrapping "
                        "it in DistributedDataParallel (or Float16Module) and before get_megatron_optimizer.")
    if any(taken_by_zero_optimizer(p) for p in model.parameters()):
        raise RuntimeError("apply() was called after deepspeed.initialize: the engine already partitioned this "
                           "model's parameters and would never train the adapter (DeepSpeed fails later with an "
                           "IndexError). " + ORDER)
    early = optimizers_holding(model.parameters())
    if early:
        warnings.warn(f"{len(early)} optimizer(s) ({type(early[0]).__name__}) built before apply() hold this model's "
                      "parameters: apply() freezes them and adds new adapter parameters the optimizer does not "
                      "have (deepspeed.initialize then fails with an IndexError, a torch loop trains nothing). "
                      + ORDER, stacklevel=3)
