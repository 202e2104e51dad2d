"""The pipeline stages of a run, for the controller's one reset over the whole model (method/stages.py): what
Megatron's pipeline group and DeepSpeed's PipelineEngine grid share.

The group holds one process of each stage (the same tensor- and data-parallel place), in stage order. Learning the
whole model is one object all-gather of module names (once, at the first step); the stats of a reset are one
all-reduce: every stage writes its rows into zeros the size of the whole model, and the sum holds every stage's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..method.stages import Stages, WholeModel, order_across_stages, whole_rows
from .tensor_parallel import comm_device


class PipelineStages(Stages):
    """The stages of `group` (torch.distributed's process group of one process per pipeline stage)."""

    def __init__(self, group):
        self.group = group
        self.all_reduce_bytes = 0  # this process's, over the pipeline group

    def whole_model(self, names: Sequence[str]) -> WholeModel:
        stage_names = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(stage_names, list(names), group=self.group)
        return order_across_stages(stage_names, dist.get_rank(self.group))

    def gather(self, local: torch.Tensor, whole: WholeModel) -> torch.Tensor:
        return self._all_reduce(whole_rows(local, whole), dist.ReduceOp.SUM)

    def earliest(self, step: Optional[int]) -> Optional[int]:
        none = 1 << 62
        first = int(self._all_reduce(torch.tensor([none if step is None else step], dtype=torch.int64),
                                     dist.ReduceOp.MIN).item())
        return None if first == none else first

    def agree(self, checksum: float) -> bool:
        both = self._all_reduce(torch.tensor([checksum, -checksum], dtype=torch.float64), dist.ReduceOp.MAX)
        return bool(both[0] == checksum and -both[1] == checksum)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        on_device = tensor.to(comm_device(self.group))
        dist.all_reduce(on_device, op=op, group=self.group)
        self.all_reduce_bytes += on_device.numel() * on_device.element_size()
        return on_device.cpu()


def stages_of(group) -> Stages:
    """The stages of a pipeline group; one stage (the base Stages) for None or a group of one process."""
    if group is None or dist.get_world_size(group) == 1:
        return Stages()
    return PipelineStages(group)
