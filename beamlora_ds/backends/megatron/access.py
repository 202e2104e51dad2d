"""The platform seam for megatron-core's optimizers: the reset on flat fragments (backends/fragment_access.py).

- The DistributedOptimizer shards each parameter's fp32 main copy and Adam moments over the data-parallel group in
  flat ranges that cut through parameters (a row of A is contiguous, a column of B strided): each process holds one
  fragment [start, start + numel) of each adapter parameter, exactly like ZeRO-1/2, and writes only it; the working
  copy is whole on every process after the optimizer's parameter all-gather, so every process writes it whole.
- The plain Megatron optimizer keeps the whole state on every process: the fragment is the whole parameter, there
  is nothing to all-reduce, and every process applies the same edit.
Under tensor parallelism each process's tensors are its slice of a split factor; the norm criterion is summed over
the tensor-parallel group (tensor_parallel.sum_split_norms), so importance is the same on every process.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ...method.layer import BeamLoRALinear
from ...method.score_table import score_parameters
from .. import coordination
from ..flat_runs import local_parts, scatter_local
from ..fragment_access import Fragment, FragmentAccess
from ..pipeline import stages_of
from ..tensor_parallel import comm_device
from ..torch_access import adapter_parameters
from . import internals


class MegatronFragment(Fragment):
    """The part of one parameter's fp32 main copy and optimizer state this process holds (whole for the plain
    optimizer), read and written in place; the working copy is whole on every process."""

    def __init__(self, optimizer, param: torch.nn.Parameter):
        self.param = param
        self.start, self.numel = internals.owned_range(optimizer, param) if optimizer is not None else (0, 0)
        self.tensors = internals.main_and_state(optimizer, param) if self.numel else {}

    def _flat(self, key):
        return self.tensors["param" if key is None else key].detach().view(-1)

    def read(self, key=None):
        if self.numel == 0:
            return torch.zeros(0)
        return self._flat(key)[: self.numel].float().cpu().clone()

    def write(self, runs, values, key=None):
        if self.numel and any(True for _ in local_parts(runs, self.start, self.start + self.numel)):
            scatter_local(runs, values, self._flat(key)[: self.numel], self.start)

    def write_working_copy(self, runs, values):
        scatter_local(runs, values, self.param.data.view(-1), 0)


class MegatronAccess(FragmentAccess):
    """BeamLoRA's reads and writes through a megatron-core optimizer (what `get_megatron_optimizer` returns)."""

    no_score_decay_fix = ("Pass config_overrides=beamlora_ds.megatron_optimizer_overrides(optimizer_config) to "
                          "get_megatron_optimizer.")

    def __init__(self, modules: Sequence[BeamLoRALinear], optimizer):
        self.modules = list(modules)
        self.optimizer = optimizer
        self.inner = internals.inner_optimizers(optimizer)
        self.all_reduce_bytes = 0
        for inner in self.inner:
            if internals.precision_aware(inner):
                raise ValueError("Megatron's precision-aware optimizer keeps scaled states BeamLoRA cannot edit in "
                                 "place; set use_precision_aware_optimizer=False.")
            if internals.has_loss_scaler(inner):
                raise ValueError("fp16 with a loss scaler is not supported with BeamLoRA on Megatron (a skipped step "
                                 "cannot be told apart); train in bf16 or fp32.")
        distributed = {internals.is_distributed(inner) for inner in self.inner}
        if len(distributed) != 1:
            raise ValueError("The Megatron optimizer mixes distributed and plain optimizers; BeamLoRA needs one kind.")
        self.distributed = distributed.pop()
        self.group = internals.data_parallel_group(self.inner[0]) if self.distributed else None
        self.stages = stages_of(pipeline_group())
        self._check_every_parameter_trained()

    def _holder(self, param):
        return next((inner for inner in self.inner if internals.holds(inner, param)), None)

    def _check_every_parameter_trained(self) -> None:
        """Every adapter parameter must be trained by this optimizer: under the distributed optimizer each process
        holds a part, so the parts held are added up over the group (one all-reduce)."""
        params = [(name, p) for m in self.modules for name, p in adapter_parameters(m)]
        held = torch.tensor([float(internals.owned_range(h, p)[1]) if (h := self._holder(p)) is not None else 0.0
                             for _, p in params], dtype=torch.float64)
        held = self.all_reduce(held)
        self.all_reduce_bytes = 0
        missing = [name for (name, p), n in zip(params, held.tolist()) if n != p.numel()]
        if missing:
            raise ValueError(f"{len(missing)} BeamLoRA parameters ({missing[:3]}) are not trained by this Megatron "
                             "optimizer. Call beamlora_ds.apply() before wrapping the model in Megatron's "
                             "DistributedDataParallel and building the optimizer with get_megatron_optimizer.")

    @property
    def fragments(self) -> List[Dict[str, Fragment]]:
        """Built fresh on each use (a loaded checkpoint may replace the optimizer's state tensors)."""
        scores = {id(p): MegatronFragment(self._holder(p), p) for p in score_parameters(self.modules)}
        return [{"lora_A": MegatronFragment(self._holder(m.lora_A), m.lora_A),
                 "lora_B": MegatronFragment(self._holder(m.lora_B), m.lora_B),
                 "lora_score": scores[id(m.score_parameter)]} for m in self.modules]

    def moment_keys(self) -> List[str]:
        """Optimizer state entries shaped like their main values (exp_avg, exp_avg_sq); none before the first step
        (torch's Adam creates them lazily)."""
        for m in self.modules:
            for _, p in adapter_parameters(m):
                holder = self._holder(p)
                tensors = internals.main_and_state(holder, p) if holder is not None else {}
                if tensors:
                    main = tensors["param"]
                    return sorted(k for k, v in tensors.items()
                                  if k != "param" and torch.is_tensor(v) and v.shape == main.shape)
        return []

    def all_reduce(self, buffer: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return buffer
        on_device = buffer.to(comm_device(self.group))
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        self.all_reduce_bytes += on_device.numel() * on_device.element_size()
        return on_device.cpu()

    @property
    def data_parallel_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    def score_weight_decays(self) -> List[Optional[float]]:
        return [internals.weight_decay_of(h, m.score_parameter) if (h := self._holder(m.score_parameter)) else None
                for m in self.modules]

    def optimizer_steps(self) -> Optional[int]:
        return megatron_steps(self.optimizer, self.modules)

    def is_process_zero(self) -> bool:
        return coordination.is_process_zero()

    def all_processes_agree(self, checksum: float) -> bool:
        """Over every process (tensor- and data-parallel), not only the group the fragments are spread across."""
        return coordination.all_agree(checksum)


def megatron_steps(optimizer, modules: Sequence[BeamLoRALinear]) -> Optional[int]:
    """The updates the optimizer gave the adapter, by torch Adam's per-parameter `step` of the parts this process
    holds (None before the first step, or where it holds none)."""
    steps = [internals.adam_step(inner, p) for inner in internals.inner_optimizers(optimizer)
             for m in modules for _, p in adapter_parameters(m) if internals.holds(inner, p)]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def pipeline_group():
    """Megatron's pipeline group of this process (one process per stage), None without pipeline parallelism."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group() if ps.get_pipeline_model_parallel_world_size() > 1 else None
