"""One parameter's fp32 master and optimizer moments as this process holds them under ZeRO: a flat fragment.

Under ZeRO every process owns one contiguous fragment [start, start + numel) of each parameter's flattened fp32
master and of its moments (stage 1/2: the parameter's link to a fragment of the flat partition; stage 3: its
partition). The working copy is whole on every process (stage 1/2, and persistent ZeRO-3 parameters) and/or a
local shard (stage 3 `ds_tensor`). Reads and writes take whole rank slots as runs of flat positions
(backends/flat_runs.py) and touch only the part this process holds.
"""
from __future__ import annotations

import torch

from ..flat_runs import local_parts, scatter_local
from ..fragment_access import Fragment
from .internals import stage12_mapping, zero3_partition_rank


class Stage12Fragment(Fragment):
    """ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the parameter links to its fragment of the flat fp32 partition."""

    def __init__(self, param: torch.nn.Parameter):
        self.param, self.mapping = param, stage12_mapping(param)
        address = self.mapping.lp_fragment_address if self.mapping is not None else None
        self.start, self.numel = (address.start, address.numel) if address is not None else (0, 0)

    def _hp(self, key):
        return self.mapping.get_hp_fragment(key).view(-1)

    def read(self, key=None):
        if self.numel == 0:
            return torch.zeros(0)
        return self._hp(key).detach().float().cpu().clone()

    def write(self, runs, values, key=None):
        if self.numel:
            scatter_local(runs, values, self._hp(key), self.start)

    def write_working_copy(self, runs, values):
        scatter_local(runs, values, self.param.data.view(-1), 0)  # whole on every process under stage 1/2


class Stage3Fragment(Fragment):
    """ZeRO-3: the parameter's partition, read and written through DeepSpeed's public safe_*_local_* functions."""

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self.partition_numel = param.ds_tensor.ds_numel
        self.start = self.partition_numel * zero3_partition_rank(param)
        self.numel = max(0, min(self.partition_numel, param.ds_numel - self.start))  # the last one is padded

    def _get_local(self, key):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = safe_get_local_fp32_param(self.param) if key is None else \
            safe_get_local_optimizer_state(self.param, key)
        return local.detach().view(-1)

    def read(self, key=None):
        return self._get_local(key)[: self.numel].float().cpu().clone()

    def write(self, runs, values, key=None):
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        if not any(True for _ in local_parts(runs, self.start, self.start + self.numel)):
            return
        local = self._get_local(key).clone()
        scatter_local(runs, values, local[: self.numel], self.start)
        if key is None:
            safe_set_local_fp32_param(self.param, local)
        else:
            safe_set_local_optimizer_state(self.param, local, key)

    def write_working_copy(self, runs, values):
        scatter_local(runs, values, self.param.ds_tensor.data.view(-1)[: self.numel], self.start)
        if self.param.data.numel() == self.param.ds_numel:  # gathered (persistent): the whole copy is live too
            scatter_local(runs, values, self.param.data.view(-1), 0)
