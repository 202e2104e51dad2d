"""One reset over the whole model when pipeline parallelism splits its layers over stages (docs/pipeline.md).

BeamLoRA's selection is global: one top-p over every module's importances (algorithm.select_pruned). Under pipeline
parallelism a process holds only its stage's modules (with a virtual pipeline: several chunks of layers), so the
controller plans over the `WholeModel`: every stage's module names in the order one process would hold them, its
importances gathered by the platform's `Stages`. Every process then computes the same plan for the whole model and
applies the part that falls on its own modules. Without pipeline parallelism the whole model is this process's
modules and `Stages` does nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .algorithm import ModuleReset


@dataclass(frozen=True)
class WholeModel:
    """`names`: every BeamLoRA module of the model, in the one-process order; `local`: the position in `names` of
    each of this process's modules (in this process's order)."""

    names: List[str]
    local: List[int]

    @property
    def is_local_only(self) -> bool:
        return len(self.local) == len(self.names)

    def local_index(self) -> Dict[int, int]:
        """Whole-model index -> this process's module index."""
        return {whole: mine for mine, whole in enumerate(self.local)}

    def local_plans(self, plans: Sequence[ModuleReset]) -> List[ModuleReset]:
        """The plans of this process's modules, renumbered to its own module indices."""
        mine = self.local_index()
        return [ModuleReset(mine[p.module_index], p.targets, p.sources) for p in plans if p.module_index in mine]

    def local_rows(self, rows: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
        """{whole-model index: value} -> {this process's module index: value}, only this process's modules."""
        mine = self.local_index()
        return {mine[m]: value for m, value in rows.items() if m in mine}


def layer_number(name: str) -> float:
    """The number of the layer a module belongs to: the first all-digit part of its name (`decoder.layers.5.mlp.
    linear_fc1` -> 5, a pipeline module's `3.self_attn.q_proj` -> 3); a module outside the numbered layers (an
    output head) comes after them."""
    return next((int(part) for part in name.split(".") if part.isdigit()), math.inf)


def order_across_stages(stage_names: Sequence[Sequence[str]], this_stage: int) -> WholeModel:
    """The whole model from every stage's module names (stage i's list at index i): ordered by layer number, then
    stage, then position within the stage, which is the order one process holds them in when the names carry the
    whole model's layer numbers. Refuses a name held by two stages (a layer numbered within its stage)."""
    entries = sorted(((layer_number(name), stage, position, name) for stage, names in enumerate(stage_names)
                      for position, name in enumerate(names)))
    names = [name for *_, name in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Pipeline stages hold BeamLoRA modules of the same name ({duplicates[:3]}): a stage numbers "
                         "its layers from 0. Build each stage so its layers carry the whole model's numbers (Megatron: "
                         "layer_number, vp_stage for virtual pipelines; DeepSpeed: a PipelineModule of LayerSpecs), "
                         "and call beamlora_ds.apply() on that stage.")
    containers = sorted({name.split(f".{int(number)}.")[0] if f".{int(number)}." in name else ""
                         for name in names if (number := layer_number(name)) != math.inf})
    if len(containers) > 1:
        raise ValueError(f"BeamLoRA modules lie in more than one numbered container ({containers}), so their order "
                         "in the whole model is ambiguous under pipeline parallelism. Narrow target_modules to one of "
                         "them (e.g. a regex on decoder.layers; Megatron's multi-token prediction layers are "
                         "mtp.layers).")
    position = {(stage, pos): i for i, (_, stage, pos, _) in enumerate(entries)}
    return WholeModel(names, [position[(this_stage, p)] for p in range(len(stage_names[this_stage]))])


class Stages:
    """The pipeline stages a platform's reset spans: how every process learns the whole model and its importances.
    This base is one stage (no pipeline parallelism): the whole model is this process's modules."""

    def whole_model(self, names: Sequence[str]) -> WholeModel:
        """The whole model from this process's module `names` (collective over the stages)."""
        return WholeModel(list(names), list(range(len(names))))

    all_reduce_bytes = 0  # bytes this process has all-reduced over the stages

    def gather(self, local: torch.Tensor, whole: WholeModel) -> torch.Tensor:
        """(k, local modules, r) rows of this process -> (k, whole modules, r), every stage's rows (collective)."""
        return local

    def earliest(self, step: Optional[int]) -> Optional[int]:
        """The earliest of every stage's `step` (None where a stage has none), the same on every stage: a
        non-finite loss seen on one stage (under Megatron only the last has the loss) skips the reset on all."""
        return step

    def agree(self, checksum: float) -> bool:
        """Whether every stage computed the same `checksum` (the consistency check across stages)."""
        return True


def whole_rows(local: torch.Tensor, whole: WholeModel) -> torch.Tensor:
    """(k, whole modules, r) zeros with this process's rows (k, local modules, r) in their places: what a sum over
    the stages turns into the whole model's rows, each stage contributing its own."""
    out = torch.zeros(local.shape[0], len(whole.names), local.shape[-1], dtype=local.dtype)
    if whole.local:
        out[:, torch.tensor(whole.local)] = local
    return out


def stack_stats(logits: torch.Tensor, a_row_sq: Optional[torch.Tensor], b_col_sq: Optional[torch.Tensor]):
    """One (k, modules, r) tensor of the stats, so a pipeline gathers them in one collective."""
    parts = [logits] + [t for t in (a_row_sq, b_col_sq) if t is not None]
    return torch.stack([p.float() for p in parts])
