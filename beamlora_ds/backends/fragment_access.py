"""The platform seam for any platform that keeps each parameter's fp32 master and optimizer moments in flat
fragments owned by one process each: DeepSpeed ZeRO 1-3 (deepspeed/zero_access.py) and Megatron's optimizers
(megatron/access.py). The backend says what its fragments are and how it all-reduces; the reset is the same.

A reset costs two all-reduces in all: one flat vector of every module's score logits (and per-rank sums of squares
for the norm criterion), each process filling the slices it owns; and one flat buffer that rebuilds, from the
shards every process kept, only the snapshot's source rows of A and columns of B (and their moments). Each process
then writes only the positions of its own fragments (master, moments) and of its working copy. A snapshot is a
local copy of each process's own fragments: no communication, host memory = 3 x adapter size / world size (fp32).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..method.algorithm import ModuleReset
from ..method.layer import BeamLoRALinear
from ..method.seam import PlatformAccess, RankStats
from .flat_runs import Run, columns, gather_local, rows, total
from .tensor_parallel import sum_split_norms

FACTORS = ("lora_A", "lora_B")


class Fragment:
    """This process's slice [start, start + numel) of one parameter's flat fp32 master and moments."""

    start: int
    numel: int

    def read(self, key: Optional[str] = None) -> torch.Tensor:
        """The fragment's fp32 values (the master for key None, else that optimizer moment), a host copy."""
        raise NotImplementedError

    def write(self, runs: List[Run], values: torch.Tensor, key: Optional[str] = None) -> None:
        """The fragment's part of `runs` from `values` (the runs' value layout) into the master or a moment."""
        raise NotImplementedError

    def write_working_copy(self, runs: List[Run], values: torch.Tensor) -> None:
        """The same positions in the working copy the forward reads (bf16 or fp32)."""
        raise NotImplementedError


class FragmentAccess(PlatformAccess):
    """The reset on flat fragments. A backend provides `fragments` (per module {"lora_A", "lora_B", "lora_score"}:
    a Fragment; one object for a score table shared by all modules), `moment_keys()`, `all_reduce(buffer, op)`
    over the processes the fragments are spread across, and `data_parallel_size` (their number)."""

    modules: List[BeamLoRALinear]
    all_reduce_bytes = 0

    @property
    def fragments(self) -> List[Dict[str, Fragment]]:
        raise NotImplementedError

    def moment_keys(self) -> List[str]:
        raise NotImplementedError

    def all_reduce(self, buffer: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`buffer` (host, fp32/fp64) summed (op "sum") or maximised ("max") over the fragments' processes."""
        raise NotImplementedError

    @property
    def data_parallel_size(self) -> int:
        raise NotImplementedError

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
        buffer = self.all_reduce(buffer)
        if not with_norms:
            return RankStats(buffer[0])
        sum_split_norms(buffer[1], buffer[2], self.modules)  # a tensor-parallel slice holds part of each sum
        return RankStats(buffer[0], buffer[1], buffer[2])

    def snapshot(self) -> dict:
        keys = self.moment_keys()
        counts = self.all_reduce(torch.tensor([len(keys), -len(keys)], dtype=torch.float64), op="max")
        if counts[0] != -counts[1]:  # every process must lay out the reset's gather buffer the same way
            raise RuntimeError(f"Processes see different optimizer state entries ({keys} here); BeamLoRA needs the "
                               "same optimizer (and state) on every process.")
        return {"moment_keys": keys, "world_size": self.data_parallel_size,
                "modules": [{name: {"start": frags[name].start, "numel": frags[name].numel,
                                    "master": frags[name].read(),
                                    "moments": {k: frags[name].read(k) for k in keys}}
                             for name in FACTORS} for frags in self.fragments]}

    def snapshot_ranges(self) -> List[Dict[str, tuple]]:
        """Per module, {"lora_A": (start, numel), "lora_B": ...}: the fragments a snapshot taken now would hold
        (what a snapshot written on another number of processes is cut again to, checkpointing/reshard.py)."""
        return [{name: (frags[name].start, frags[name].numel) for name in FACTORS} for frags in self.fragments]

    def _gather_source_values(self, snapshot: dict, plans: Sequence[ModuleReset], keys: Sequence[Optional[str]]
                              ) -> Dict[tuple, torch.Tensor]:
        """The snapshot's source rows of A and columns of B (master and moments), rebuilt from every process's
        shard with one all-reduce: each process copies in only the part it holds (interval arithmetic on its
        fragment, flat_runs.py). Values come out in the layout of the target slots they will be written to.
        """
        layout, size = [], 0
        for plan in plans:
            for name, runs in slot_runs(self.modules[plan.module_index], plan.sources):
                for key in keys:
                    layout.append((plan.module_index, name, key, runs, size))
                    size += total(runs)
        buffer = torch.zeros(size, dtype=torch.float32)
        for m, name, key, runs, offset in layout:
            shard = snapshot["modules"][m][name]
            values = shard["master"] if key is None else shard["moments"][key]
            gather_local(runs, values, shard["start"], buffer[offset: offset + total(runs)])
        buffer = self.all_reduce(buffer)
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
            for name, runs in slot_runs(module, plan.targets):
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

    def all_processes_agree(self, checksum: float) -> bool:
        highest = self.all_reduce(torch.tensor([checksum, -checksum], dtype=torch.float64), op="max")
        return bool(highest[0] == checksum and -highest[1] == checksum)


def score_runs(module: BeamLoRALinear) -> List[Run]:
    """`module`'s r score logits as a flat run of its score parameter: its row of the table, or 0..r-1."""
    row = module.score_row
    return [Run((0 if row is None else row) * module.r, module.r)]


def slot_runs(module: BeamLoRALinear, slots: Sequence[int]):
    """The rank slots `slots` of a module as flat runs: rows of A (r x d_in), columns of B (d_out x r), of this
    process's tensors (under tensor parallelism its slice of the split one)."""
    return (("lora_A", rows(slots, module.local_in_features)),
            ("lora_B", columns(slots, module.local_out_features, module.r)))
