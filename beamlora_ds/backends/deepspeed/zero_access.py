"""The platform seam for DeepSpeed ZeRO stages 1-3: partition-aware, collective, shard-local writes.

A reset costs two all-reduces in all: one flat vector of every module's score logits (and per-rank sums of squares
for the norm criterion), each process filling the slices it owns; and one flat buffer that rebuilds, from the
shards every process kept, only the snapshot's source rows of A and columns of B (and their moments). Each process
then writes only the positions of its own fragments (master, moments, zero_fragments.py) and of its working copy. A
snapshot is a local copy of each process's own fragments: no communication, host memory = 3 x adapter size / world
size (fp32).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ...method.algorithm import ModuleReset
from ...method.layer import BeamLoRALinear
from ...method.score_table import score_parameters
from ...method.seam import PlatformAccess, RankStats
from .. import coordination
from ..flat_runs import Run, columns, gather_local, rows, total
from ..tensor_parallel import sum_split_norms
from ..torch_access import TorchAccess, adapter_parameters
from .internals import in_zero_optimizer, relink_stage12_moments
from .supported_setups import check_engine_support
from .zero_fragments import Fragment, Stage3Fragment, Stage12Fragment
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


class ZeroAccess(EngineSteps, PlatformAccess):
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

    def _all_reduce(self, buffer: torch.Tensor, op=None) -> torch.Tensor:
        from deepspeed.accelerator import get_accelerator

        on_device = buffer.to(get_accelerator().current_device_name())
        if op is None:
            self.dist.all_reduce(on_device, group=self.group)
        else:
            self.dist.all_reduce(on_device, op=op, group=self.group)
        self.all_reduce_bytes += on_device.numel() * on_device.element_size()
        return on_device.cpu()

    # --------------------------------------------------------------------------------------------- reads
    def rank_stats(self, with_norms: bool) -> RankStats:
        n, r = len(self.modules), self.modules[0].r
        buffer = torch.zeros(3 if with_norms else 1, n, r, dtype=torch.float32)
        score_values = {}  # each score fragment read once (a table is shared by every module)
        for m, (module, frags) in enumerate(zip(self.modules, self.fragments)):
            score = frags["lora_score"]
            if score.numel:
                if id(score) not in score_values:
                    score_values[id(score)] = score.read()
                gather_local(score_runs(module), score_values[id(score)], score.start, buffer[0, m])
            if with_norms:
                for slot, name in ((1, "lora_A"), (2, "lora_B")):
                    frag = frags[name]
                    if frag.numel:
                        positions = torch.arange(frag.start, frag.start + frag.numel)
                        rank = positions // module.local_in_features if name == "lora_A" else positions % module.r
                        buffer[slot, m].index_add_(0, rank, frag.read().pow(2))
        buffer = self._all_reduce(buffer)
        if not with_norms:
            return RankStats(buffer[0])
        sum_split_norms(buffer[1], buffer[2], self.modules)  # a tensor-parallel slice holds part of each sum
        return RankStats(buffer[0], buffer[1], buffer[2])

    def snapshot(self) -> dict:
        keys = self.moment_keys()
        counts = self._all_reduce(torch.tensor([len(keys), -len(keys)], dtype=torch.float64),
                                  op=self.dist.ReduceOp.MAX)
        if counts[0] != -counts[1]:  # every process must lay out the reset's gather buffer the same way
            raise RuntimeError(f"Processes see different optimizer state entries ({keys} here); BeamLoRA needs the "
                               "same optimizer (and state) on every process.")
        return {"moment_keys": keys, "world_size": self.data_parallel_size,
                "modules": [{name: {"start": frags[name].start, "numel": frags[name].numel,
                                    "master": frags[name].read(),
                                    "moments": {k: frags[name].read(k) for k in keys}}
                             for name in ("lora_A", "lora_B")} for frags in self.fragments]}

    @property
    def data_parallel_size(self) -> int:
        """The processes the parameters are partitioned over (what a snapshot's shards are cut for)."""
        return self.dist.get_world_size(group=self.group)

    def snapshot_ranges(self) -> List[Dict[str, tuple]]:
        """Per module, {"lora_A": (start, numel), "lora_B": ...}: the fragments a snapshot taken now would hold
        (what a snapshot written on another number of processes is cut again to, reshard.py)."""
        return [{name: (frags[name].start, frags[name].numel) for name in ("lora_A", "lora_B")}
                for frags in self.fragments]

    def _gather_source_values(self, snapshot: dict, plans: Sequence[ModuleReset], keys: Sequence[Optional[str]]
                              ) -> Dict[tuple, torch.Tensor]:
        """The snapshot's source rows of A and columns of B (master and moments), rebuilt from every process's
        shard with one all-reduce: each process copies in only the part it holds (interval arithmetic on its
        fragment, flat_runs.py). Values come out in the layout of the target slots they will be written to.
        """
        layout, size = [], 0
        for plan in plans:
            for name, runs in _slot_runs(self.modules[plan.module_index], plan.sources):
                for key in keys:
                    layout.append((plan.module_index, name, key, runs, size))
                    size += total(runs)
        buffer = torch.zeros(size, dtype=torch.float32)
        for m, name, key, runs, offset in layout:
            shard = snapshot["modules"][m][name]
            values = shard["master"] if key is None else shard["moments"][key]
            gather_local(runs, values, shard["start"], buffer[offset: offset + total(runs)])
        buffer = self._all_reduce(buffer)
        return {(m, name, key): buffer[offset: offset + total(runs)] for m, name, key, runs, offset in layout}

    # -------------------------------------------------------------------------------------------- writes
    @torch.no_grad()
    def apply_reset(self, plans, new_logits, snapshot, inherit_moments):
        if snapshot.get("world_size") != self.data_parallel_size:
            raise RuntimeError("The BeamLoRA snapshot was taken with a different number of processes; it holds "
                               "per-process shards. Resume with beamlora_ds.load_checkpoint, which cuts them again "
                               "for this number, not with the controller's load_state_dict alone.")
        keys = [None] + (list(snapshot["moment_keys"]) if inherit_moments else [])
        values = self._gather_source_values(snapshot, plans, keys) if plans else {}
        fragments = self.fragments
        for plan in plans:
            m, module, frags = plan.module_index, self.modules[plan.module_index], fragments[plan.module_index]
            for name, runs in _slot_runs(module, plan.targets):
                for key in keys:
                    frags[name].write(runs, values[(m, name, key)], key)
                frags[name].write_working_copy(runs, values[(m, name, None)])
            runs = score_runs(module)
            frags["lora_score"].write(runs, new_logits[m])
            frags["lora_score"].write_working_copy(runs, new_logits[m])

    @torch.no_grad()
    def zero_score_moments(self):
        """Every module's score moments: each score parameter's whole local fragment (a table: all rows)."""
        keys = self.moment_keys()
        for frag in {id(f["lora_score"]): f["lora_score"] for f in self.fragments}.values():
            for key in keys:  # what this process holds of the parameter, at once
                frag.write([Run(frag.start, frag.numel)], torch.zeros(frag.numel), key)

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

    def all_processes_agree(self, checksum: float) -> bool:
        values = torch.tensor([checksum, -checksum], dtype=torch.float64)
        highest = self._all_reduce(values, op=self.dist.ReduceOp.MAX)
        return bool(highest[0] == checksum and -highest[1] == checksum)


def score_runs(module: BeamLoRALinear) -> List[Run]:
    """`module`'s r score logits as a flat run of its score parameter: its row of the table, or 0..r-1."""
    row = module.score_row
    return [Run((0 if row is None else row) * module.r, module.r)]


def _slot_runs(module: BeamLoRALinear, slots: Sequence[int]):
    """The rank slots `slots` of a module as flat runs: rows of A (r x d_in), columns of B (d_out x r), of this
    process's tensors (under tensor parallelism its slice of the split one)."""
    return (("lora_A", rows(slots, module.local_in_features)),
            ("lora_B", columns(slots, module.local_out_features, module.r)))


class Stage0Access(EngineSteps, TorchAccess):
    """ZeRO stage 0 in fp32: whole parameters and one plain torch optimizer per process, stepped by the engine
    (every process applies the same edit)."""

    def __init__(self, modules: Sequence[BeamLoRALinear], engine):
        check_engine_support(engine)  # ZeRO-0 in bf16/fp16: DeepSpeed's fp32 copies are out of reach; the fix
        super().__init__(modules, engine.optimizer)
        self.engine = engine


def access_for_engine(modules: Sequence[BeamLoRALinear], engine) -> PlatformAccess:
    """The seam for a DeepSpeed engine: partitioned under ZeRO 1-3, whole at stage 0."""
    if engine.zero_optimization_stage() > 0:
        return ZeroAccess(modules, engine)  # refuses an unsupported setup itself (NVMe parameter offload)
    return Stage0Access(modules, engine)
