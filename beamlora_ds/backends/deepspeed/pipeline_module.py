"""apply() on a DeepSpeed PipelineModule (docs/pipeline.md): this process builds one stage's layers, named by their
index in the whole model's layer list (`3.self_attn.q_proj`), so module names already carry the whole model's
numbering and the controller can order every stage's modules (method/stages.py).

Each stage wraps its own targets; a problem on any stage (no target there, a target inside a tied module, a layer
that cannot be wrapped) is raised on every stage together, so none waits for the others in DeepSpeed's set-up.
A is seeded by layer name, so every number of stages starts from the same adapter. Each layer keeps its modules'
scores in its own table, so that DeepSpeed's per-layer checkpoint files hold them (a table on the PipelineModule
itself would be in none).
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from ...method.config import BeamLoRAConfig
from ...method.inject import check_targets, find_beamlora_modules, matches_target, wrap_targets
from ...method.layer import BeamLoRALinear
from .. import coordination
from .internals import pipeline_stage_of


def is_pipeline_module(model: nn.Module) -> bool:
    """True for a deepspeed.pipe.PipelineModule (by its stage attributes, without importing DeepSpeed)."""
    return pipeline_stage_of(model) is not None


def wrap_pipeline_stage(model: nn.Module, config: BeamLoRAConfig) -> Dict[str, BeamLoRALinear]:
    """wrap_targets on this process's stage, once every stage's targets are checked (a problem anywhere raised on
    all, before any stage changes), A seeded by layer name."""
    problem = None
    try:
        tied = [name for name, _ in model.named_modules()
                if name.startswith("tied_modules.") and matches_target(name, config.target_modules)]
        if tied:
            raise ValueError(f"{tied[0]} is inside a tied module (TiedLayerSpec), which several stages share: "
                             "BeamLoRA does not adapt tied modules; narrow target_modules to the untied layers.")
        if find_beamlora_modules(model):
            raise ValueError("This model already has BeamLoRA modules; apply() once per model.")
        check_targets(model, config)
    except Exception as error:  # noqa: BLE001 - raised below on every stage together
        suffix = (" Under pipeline parallelism every stage takes part in the whole model's reset and must hold "
                  "BeamLoRA modules." if "matched no module" in str(error) else "")
        kind = {"TypeError": TypeError, "ValueError": ValueError}.get(type(error).__name__, RuntimeError)
        problem = kind(f"pipeline stage {pipeline_stage_of(model)}: {error}{suffix}")
    coordination.raise_first_error(problem)
    wrapped = wrap_targets(model, config, table_per_child=True)  # DeepSpeed saves each layer in its own file
    for name, layer in wrapped.items():
        layer.seed_lora_A(config.seed, name)
    return wrapped
