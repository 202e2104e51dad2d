"""The platform seam for DeepSpeed ZeRO stages 1-3: partition-aware, collective, shard-local writes.

Under ZeRO every process owns one contiguous fragment of each parameter's flattened fp32 master and of its
Adam moments (stage 1/2: `param._hp_mapping`; stage 3: the param's partition). The working copy is whole on
every process (stage 1/2, and ZeRO-3 persistent params) and/or a local partition (stage 3 `ds_tensor`).

A reset costs two all-reduces in all: one flat vector of every module's score logits (and per-rank sums of
squares for the norm criterion), each process filling the slices it owns; and one flat buffer that rebuilds,
from the shards every process kept, only the snapshot's source rows of A and columns of B (and their moments). Each process then writes
only the positions of its own fragments (master, moments) and of its working copy. A snapshot is a local copy
of each process's own fragments: no communication, host memory = 3 x adapter size / world size (fp32).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch

from . import ranks
from .access import PlatformAccess, RankStats, score_parameters
from .beam import ModuleReset
from .flat_runs import Run, columns, gather_local, local_parts, rows, scatter_local, total
from .layer import BeamLoRALinear
from .support import check_engine_support

logger = logging.getLogger(__name__)


class _Fragment:
    """This process's slice [start, start + numel) of one parameter's flat fp32 master and moments. Writes take
    whole rank slots as runs of flat positions (flat_runs.py) and touch only the part this process holds."""

    start: int
    numel: int

    def read(self, key: Optional[str] = None) -> torch.Tensor:
        raise NotImplementedError

    def write(self, runs: List[Run], values: torch.Tensor, key: Optional[str] = None) -> None:
        raise NotImplementedError

    def write_working_copy(self, runs: List[Run], values: torch.Tensor) -> None:
        raise NotImplementedError


class _Stage12Fragment(_Fragment):
    def __init__(self, param: torch.nn.Parameter):
        self.param, self.mapping = param, getattr(param, "_hp_mapping", None)
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


class _Stage3Fragment(_Fragment):
    def __init__(self, param: torch.nn.Parameter):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state  # noqa: F401

        self.param = param
        self.partition_numel = param.ds_tensor.ds_numel
        rank = param._z3_optimizer._get_param_partition_rank(param)
        self.start = self.partition_numel * rank
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


class ZeroAccess(PlatformAccess):
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
        self._fragment_type = _Stage3Fragment if self.stage == 3 else _Stage12Fragment
        self.all_reduce_bytes = 0
        if self.stage == 3:
            warn_if_adapters_not_persistent(self.modules, engine)
        for m in self.modules:
            for name, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B), ("lora_score", m.score_parameter)):
                if not p.requires_grad:
                    raise ValueError(f"{name} has requires_grad=False: DeepSpeed keeps no fp32 master for it, "
                                     "so BeamLoRA cannot edit it. Do not freeze adapter parameters.")
                if not (hasattr(p, "_hp_mapping") if self.stage in (1, 2) else hasattr(p, "_z3_optimizer")):
                    raise ValueError(f"A BeamLoRA {name} is not in the DeepSpeed optimizer. Build the optimizer from "
                                     "the trainable parameters after beamlora_ds.apply() (optimizer_param_groups).")
        check_engine_support(engine)  # NVMe parameter offload: out of reach of any edit (support.py)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def fragments(self) -> List[Dict[str, _Fragment]]:
        """Built fresh on each use: load_checkpoint may replace DeepSpeed's fragment mappings."""
        self._relink_stage12_moments()
        scores = {id(p): self._fragment_type(p) for p in score_parameters(self.modules)}  # a table: one for all
        return [{"lora_A": self._fragment_type(m.lora_A), "lora_B": self._fragment_type(m.lora_B),
                 "lora_score": scores[id(m.score_parameter)]} for m in self.modules]

    def _relink_stage12_moments(self) -> None:
        """After load_checkpoint, stage 1/2 loses the param -> moment links; rebuild them (local, cheap)."""
        if self.stage in (1, 2) and hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

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
        if with_norms:
            return RankStats(buffer[0], buffer[1], buffer[2])
        return RankStats(buffer[0])

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


def persistence_threshold_for(modules: Sequence[BeamLoRALinear]) -> int:
    """The smallest `stage3_param_persistence_threshold` that keeps every adapter tensor resident under ZeRO-3
    (the score table included: it is read by every module)."""
    scores = max(getattr(p, "ds_numel", p.numel()) for p in score_parameters(modules))
    return 1 + max(scores, max(max(m.r * m.in_features, m.out_features * m.r) for m in modules))


def warn_if_adapters_not_persistent(modules: Sequence[BeamLoRALinear], engine) -> None:
    """Partitioned adapter tensors are all-gathered by every forward and backward: say so, with the fix."""
    params = [p for m in modules for p in (m.lora_A, m.lora_B)] + score_parameters(modules)
    gathered = [p for p in params if not getattr(p, "ds_persist", True)]
    if gathered and ranks.is_process_zero():  # the same on every process: one line, not one per GPU
        elements = sum(p.ds_numel for p in params)
        logger.warning(
            "%d of %d BeamLoRA tensors are partitioned under ZeRO-3, so every forward and backward all-gathers them "
            "(hundreds of tiny collectives per step). Set zero_optimization.stage3_param_persistence_threshold >= %d "
            "to keep them resident, at %.1f MB per GPU (bf16).", len(gathered), len(params),
            persistence_threshold_for(modules), elements * 2 / 2**20)


def score_runs(module: BeamLoRALinear) -> List[Run]:
    """`module`'s r score logits as a flat run of its score parameter: its row of the table, or 0..r-1."""
    row = module.score_row
    return [Run((0 if row is None else row) * module.r, module.r)]


def _slot_runs(module: BeamLoRALinear, slots: Sequence[int]):
    """The rank slots `slots` of a module as flat runs: rows of A (r x d_in), columns of B (d_out x r), of this
    process's tensors (under tensor parallelism its slice of the split one)."""
    return (("lora_A", rows(slots, module.local_in_features)),
            ("lora_B", columns(slots, module.local_out_features, module.r)))


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter: each process holds only a shard (`numel() == 0` outside a gather)."""
    return hasattr(param, "ds_id")


def full_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter in fp32 on the CPU: the optimizer's fp32 master under ZeRO 1-3, else the tensor.

    Collective under ZeRO (call it on every process, same parameters in the same order): stage 1/2 all-reduce
    the master's fragments, stage 3 all-gathers the shards. Reading the master, not the possibly bf16 working
    copy, is what makes an exported adapter the trained one (docs/method.md section 6).
    """
    if is_zero3_param(param):
        if param.requires_grad and getattr(param, "_z3_optimizer", None) is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(param).detach().float().cpu().clone()
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().float().cpu().clone()
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 (and DeepSpeed's bf16 optimizer)
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float().cpu().clone()
    return param.detach().float().cpu().clone()
