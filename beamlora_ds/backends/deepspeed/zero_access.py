"""The platform seam for DeepSpeed ZeRO stages 1-3: partition-aware, collective, shard-local writes.

The reset itself is the fragment access's (backends/fragment_access.py): two all-reduces, shard-local writes of
fp32 master, moments and working copy. What is DeepSpeed's here: which fragments a process holds under each stage
(zero_fragments.py), DeepSpeed's data-parallel group and communication, its grouping of the parameters, and its
step count.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ...method.layer import BeamLoRALinear
from ...method.score_table import score_parameters
from ...method.seam import PlatformAccess
from .. import coordination
from ..fragment_access import Fragment, FragmentAccess
from ..pipeline import stages_of
from ..torch_access import TorchAccess, adapter_parameters
from . import internals
from .internals import in_zero_optimizer, relink_stage12_moments
from .supported_setups import check_engine_support
from .zero_fragments import Stage3Fragment, Stage12Fragment
from .zero_params import warn_if_adapters_not_persistent


class EngineSteps:
    """What a DeepSpeed engine says about its own steps, for either access (ZeRO 1-3 here, ZeRO-0 in fp32 through
    the plain torch access): a micro-step or a skipped fp16 step did not update the weights."""

    engine = None

    def step_applied(self) -> bool:
        return bool(self.engine.was_step_applied())

    def optimizer_steps(self) -> Optional[int]:
        return engine_steps(self.engine)

    def is_process_zero(self) -> bool:
        return coordination.is_process_zero()


def engine_steps(engine) -> int:
    """Optimizer updates a DeepSpeed engine applied: its steps minus the ones it skipped (fp16 overflow)."""
    return int(engine.global_steps) - int(getattr(engine, "skipped_steps", 0))


class ZeroAccess(EngineSteps, FragmentAccess):
    """BeamLoRA's reads and writes on a `deepspeed.DeepSpeedEngine` under ZeRO stage 1, 2 or 3."""

    def __init__(self, modules: Sequence[BeamLoRALinear], engine):
        import deepspeed.comm as dist

        self.dist = dist
        self.modules = list(modules)
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        if self.stage not in (1, 2, 3):
            raise ValueError(f"ZeroAccess handles ZeRO stages 1-3, not {self.stage}")
        self.optimizer = engine.optimizer
        self.group = getattr(self.optimizer, "dp_process_group", None) or engine.data_parallel_group
        self._fragment_type = Stage3Fragment if self.stage == 3 else Stage12Fragment
        self.all_reduce_bytes = 0
        if self.stage == 3:
            warn_if_adapters_not_persistent(self.modules)
        for m in self.modules:
            for name, p in adapter_parameters(m):
                if not p.requires_grad:
                    raise ValueError(f"{name} has requires_grad=False: DeepSpeed keeps no fp32 master for it, "
                                     "so BeamLoRA cannot edit it. Do not freeze adapter parameters.")
                if not in_zero_optimizer(p):
                    raise ValueError(f"A BeamLoRA {name} is not in the DeepSpeed optimizer. Build the optimizer from "
                                     "the trainable parameters after beamlora_ds.apply() (optimizer_param_groups).")
        check_engine_support(engine)  # NVMe parameter offload: out of reach of any edit (supported_setups.py)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def fragments(self) -> List[Dict[str, Fragment]]:
        """Built fresh on each use: load_checkpoint may replace DeepSpeed's fragment mappings."""
        self._relink_stage12_moments()
        scores = {id(p): self._fragment_type(p) for p in score_parameters(self.modules)}  # a table: one for all
        return [{"lora_A": self._fragment_type(m.lora_A), "lora_B": self._fragment_type(m.lora_B),
                 "lora_score": scores[id(m.score_parameter)]} for m in self.modules]

    def _relink_stage12_moments(self) -> None:
        """After load_checkpoint, stage 1/2 loses the param -> moment links; rebuild them (local, cheap)."""
        if self.stage in (1, 2):
            relink_stage12_moments(self.optimizer)

    def moment_keys(self) -> List[str]:
        """Optimizer state entries shaped like their (flat) parameter: exp_avg, exp_avg_sq, ..."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for flat, state in inner.state.items():
            return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        return []

    def all_reduce(self, buffer: torch.Tensor, op: str = "sum") -> torch.Tensor:
        from deepspeed.accelerator import get_accelerator

        on_device = buffer.to(get_accelerator().current_device_name())
        if op == "sum":
            self.dist.all_reduce(on_device, group=self.group)
        else:
            self.dist.all_reduce(on_device, op=self.dist.ReduceOp.MAX, group=self.group)
        self.all_reduce_bytes += on_device.numel() * on_device.element_size()
        return on_device.cpu()

    @property
    def data_parallel_size(self) -> int:
        """The processes the parameters are partitioned over (what a snapshot's shards are cut for)."""
        return self.dist.get_world_size(group=self.group)

    def score_weight_decays(self):
        """From DeepSpeed's own grouping of the trainable parameters, the same on every process: stage 1/2 keep
        `bit16_groups` aligned with the base optimizer's groups; stage 3 keeps sub-groups (`fp16_groups`) and the
        group each came from (`sub_group_to_group_id`). The base optimizer's groups keep their settings even while
        stage 3 empties their parameter lists between steps."""
        inner = getattr(self.optimizer, "optimizer", None)
        groups = getattr(inner, "param_groups", None)
        if not groups:
            return [None] * len(self.modules)
        if self.stage in (1, 2):
            group_of = {id(p): i for i, group in enumerate(getattr(self.optimizer, "bit16_groups", [])) for p in group}
        else:
            to_group = getattr(self.optimizer, "sub_group_to_group_id", {})
            group_of = {id(p): to_group.get(i) for i, sub in enumerate(getattr(self.optimizer, "fp16_groups", []))
                        for p in sub}
        indices = [group_of.get(id(m.score_parameter)) for m in self.modules]
        return [groups[i].get("weight_decay", 0.0) if i is not None and i < len(groups) else None for i in indices]


class Stage0Access(EngineSteps, TorchAccess):
    """ZeRO stage 0 in fp32: whole parameters and one plain torch optimizer per process, stepped by the engine
    (every process applies the same edit)."""

    def __init__(self, modules: Sequence[BeamLoRALinear], engine):
        check_engine_support(engine)  # ZeRO-0 in bf16/fp16: DeepSpeed's fp32 copies are out of reach; the fix
        super().__init__(modules, engine.optimizer)
        self.engine = engine


def access_for_engine(modules: Sequence[BeamLoRALinear], engine) -> PlatformAccess:
    """The seam for a DeepSpeed engine: partitioned under ZeRO 1-3, whole at stage 0."""
    access = ZeroAccess(modules, engine) if engine.zero_optimization_stage() > 0 else Stage0Access(modules, engine)
    access.stages = stages_of(internals.pipeline_parallel_group(engine))  # a PipelineEngine: every stage's reset
    return access
