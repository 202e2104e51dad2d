"""BeamController: counts optimizer steps, snapshots at T/2, prunes and refills at T, 2T, ... (docs/method.md 3-4).

It decides with the pure functions of `algorithm.py` and touches parameters and optimizer state only through a
`PlatformAccess` (seam.py), built for whatever `step()` is given by the `Platform` apply() hands it (the backends'),
so the same controller drives a one-process loop and a partitioned multi-process engine.
"""
from __future__ import annotations

import logging
import math
import weakref
from typing import Dict, List, Optional

import torch

from ..testing.failpoints import kill_point
from . import algorithm
from .config import RESUME_FIELDS, BeamLoRAConfig
from .layer import BeamLoRALinear
from .score_table import score_parameters
from .seam import Platform, PlatformAccess, RankStats
from .stages import WholeModel, stack_stats

logger = logging.getLogger(__name__)

# The layout of state_dict(). 2: the scores of all modules in one (modules x r) table, the tensor-parallel layout
# recorded. Another version is refused when a run resumes (resume_problem), never converted.
STATE_VERSION = 2

_controller_of_module: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> weakref(controller)


def controller_of(module: torch.nn.Module) -> Optional["BeamController"]:
    """The live controller that drives `module` (a BeamLoRALinear), if any: how export finds the step count."""
    ref = _controller_of_module.get(module)
    return ref() if ref is not None else None


class BeamController:
    """Call `step(optimizer_or_engine)` once after every optimizer step; read `history` for the resets."""

    def __init__(self, modules: Dict[str, BeamLoRALinear], config: BeamLoRAConfig, platform: Platform):
        if not modules:
            raise ValueError("BeamController needs at least one BeamLoRALinear module")
        self.config = config.validate()
        self.module_names: List[str] = list(modules)
        self.modules: List[BeamLoRALinear] = list(modules.values())
        # what a reset plans over: this process's modules, or every pipeline stage's (known once step() is given
        # the optimizer or engine whose platform knows the stages)
        self.whole_model = WholeModel(list(self.module_names), list(range(len(self.modules))))
        self.global_step = 0
        self.history: List[dict] = []
        self._platform = platform
        self._snapshot: Optional[dict] = None
        self._snapshot_step: Optional[int] = None
        self._access: Optional[PlatformAccess] = None
        self._access_owner: Optional[int] = None
        self._nonfinite_loss_step: Optional[int] = None  # first step since the last reset with a NaN/Inf loss
        self._stepped_ref = None  # weakref to the optimizer or engine last given to step()
        for module in self.modules:
            _controller_of_module[module] = weakref.ref(self)

    # ------------------------------------------------------------------------------------------ stepping
    def step(self, optimizer_or_engine, loss=None) -> Optional[dict]:
        """Advance one optimizer step; snapshot or reset when the schedule says. Returns the reset record, if any.

        With a DeepSpeed engine, call it after every `engine.step()` (or once per optimizer step, after the last
        micro-step's): calls that did not update the weights (between gradient-accumulation boundaries, or an
        fp16 overflow that DeepSpeed skipped) are ignored. `loss`, optional, is the step's loss and must be the same
        number on every process (e.g. averaged over them): a NaN/Inf loss cancels the next reset, so weights a bad
        step may have corrupted are never copied into other ranks.
        """
        access = self.access_for(optimizer_or_engine)
        if not access.step_applied():
            return None  # a micro-step inside gradient accumulation, or an fp16 overflow: no optimizer step
        self.global_step += 1
        t, cfg = self.global_step, self.config
        if t == cfg.total_steps + 1:
            _log(access, logging.WARNING, "BeamLoRA: step %d is past total_steps=%d, where the schedule ended (no "
                 "more resets). Set total_steps to the run's number of optimizer steps.", t, cfg.total_steps)
        if loss is not None and self._nonfinite_loss_step is None and not math.isfinite(float(loss)):
            self._nonfinite_loss_step = t
            _log(access, logging.WARNING, "BeamLoRA: non-finite loss (%s) at step %d; the next reset will be "
                 "skipped", float(loss), t)
        record = None
        if algorithm.is_snapshot_step(t, cfg.interval, cfg.total_steps):
            self._snapshot, self._snapshot_step = access.snapshot(), t
            kill_point("snapshot", t)
        if algorithm.is_reset_step(t, cfg.interval, cfg.total_steps):
            record = self._reset(access, t)
        return record

    def next_events(self) -> dict:
        """The steps of the next snapshot and the next reset (None when no more will happen)."""
        cfg = self.config

        def first(predicate):
            return next((t for t in range(self.global_step + 1, cfg.total_steps + 1)
                         if predicate(t, cfg.interval, cfg.total_steps)), None)

        return {"snapshot": first(algorithm.is_snapshot_step), "reset": first(algorithm.is_reset_step)}

    def access_for(self, optimizer_or_engine) -> PlatformAccess:
        """The platform seam this controller uses for `optimizer_or_engine` (made once per engine or optimizer)."""
        if self._access is None or self._access_owner != id(optimizer_or_engine):
            self._access = self._platform.access(self.modules, optimizer_or_engine)
            self._access_owner = id(optimizer_or_engine)
            self._stepped_ref = _weak(optimizer_or_engine)
            self.whole_model = self._access.stages.whole_model(self.module_names)
            decayed = self._decayed_scores(self._access)
            if decayed:
                _log(self._access, logging.WARNING, "BeamLoRA: the optimizer applies weight decay to %d lora_score "
                     "parameters (e.g. %s); the paper never decays the score. %s", len(decayed), decayed[0],
                     self._access.no_score_decay_fix)
        return self._access

    def decayed_scores(self, optimizer_or_engine) -> List[str]:
        """Names of the modules whose `lora_score` the optimizer (or engine) applies weight decay to; [] is right."""
        return self._decayed_scores(self.access_for(optimizer_or_engine))

    def _decayed_scores(self, access: PlatformAccess) -> List[str]:
        return [name for name, decay in zip(self.module_names, access.score_weight_decays()) if decay]

    def step_count_problem(self, optimizer_or_engine=None) -> Optional[str]:
        """A message when `step()` was skipped or called extra times: this controller's step count differs from
        the optimizer's own (`optimizer_or_engine`, else the one last given to step(), else the one live optimizer
        holding the scores). None when they agree or the optimizer keeps no count. save_checkpoint and save_adapter
        log it as a warning."""
        target = optimizer_or_engine if optimizer_or_engine is not None else (
            self._stepped_ref() if self._stepped_ref is not None else None)
        if target is None:  # step() was never called: the optimizer it should have been given
            target = self._platform.optimizer_holding(score_parameters(self.modules))
        steps = self._platform.optimizer_steps(target, self.modules) if target is not None else None
        if steps is None or steps == self.global_step:
            return None
        how = ("beam.step() was not called after some optimizer steps" if steps > self.global_step
               else "beam.step() was called more often than the optimizer stepped")
        return (f"BeamLoRA counted {self.global_step} optimizer steps, the optimizer counted {steps}: {how}. Call "
                "beam.step(engine) (or beam.step(optimizer)) exactly once after every optimizer step, on every "
                "process; snapshots and resets follow BeamLoRA's count, so they are now off by "
                f"{abs(steps - self.global_step)} steps.")

    def _importance(self, stats) -> torch.Tensor:
        if self.config.importance == "score":
            return algorithm.score_importance(stats.logits, self.config.tau)
        return algorithm.norm_importance(stats.a_row_sq, stats.b_col_sq)

    def _reset(self, access: PlatformAccess, step: int) -> dict:
        cfg = self.config
        bytes_before = access.all_reduce_bytes + access.stages.all_reduce_bytes
        keep = algorithm.keep_fraction(step, cfg.p0, cfg.resolved_t_end)
        stats = self._whole_model_stats(access)
        logits, importance = stats.logits, self._importance(stats)
        nonfinite_loss_step = access.stages.earliest(self._nonfinite_loss_step)  # any stage's, the same on all
        skipped = None
        if nonfinite_loss_step is not None:
            skipped = f"non-finite loss at step {nonfinite_loss_step}"
        elif not (torch.isfinite(importance).all() and torch.isfinite(logits).all()):
            skipped = "non-finite score or importance"
        self._nonfinite_loss_step = None
        if skipped:
            record = {"step": step, "keep_fraction": keep, "skipped": skipped, "pruned": [], "sources": []}
            _log(access, logging.WARNING, "BeamLoRA reset at step %d skipped (%s); training goes on", step, skipped)
            self.history.append(record)
            return record
        if self._snapshot is None:
            raise RuntimeError(f"BeamLoRA reset at step {step} has no snapshot (taken at step "
                               f"{step - cfg.interval // 2}). If you resumed, load the controller's state_dict too.")
        plans = algorithm.plan_reset(importance, keep, cfg.seed, step)
        if cfg.check_consistency and not _agreed(access, _plan_checksum(plans, importance)):
            raise RuntimeError(f"BeamLoRA reset at step {step}: processes disagree on the reset decision "
                               "(different scores or plans on different ranks); refusing to apply it.")
        new_logits = {p.module_index: algorithm.average_scores(logits[p.module_index], p.targets, p.sources)
                      for p in plans}
        whole = self.whole_model  # plans and logits are the whole model's; this process applies its modules' part
        access.apply_reset(whole.local_plans(plans), whole.local_rows(new_logits), self._snapshot,
                           inherit_moments=cfg.optimizer_state == "inherit")
        kill_point("reset", step)
        access.zero_score_moments()
        self._snapshot, self._snapshot_step = None, None  # free host memory until the next snapshot
        record = self._record(step, keep, plans, importance, new_logits, access)
        record["all_reduce_bytes"] = access.all_reduce_bytes + access.stages.all_reduce_bytes - bytes_before
        self.history.append(record)
        _log(access, logging.INFO, "BeamLoRA reset at step %d: keep-fraction %.4f, %d ranks pruned in %d of %d "
             "modules", step, keep, len(record["pruned"]), len(plans), len(self.whole_model.names))
        return record

    def _whole_model_stats(self, access: PlatformAccess) -> RankStats:
        """This process's rank stats, and under pipeline parallelism every stage's, as rows of the whole model."""
        with_norms = self.config.importance == "norm"
        stats = access.rank_stats(with_norms=with_norms)
        if self.whole_model.is_local_only:
            return stats
        rows = access.stages.gather(stack_stats(stats.logits, stats.a_row_sq, stats.b_col_sq), self.whole_model)
        return RankStats(rows[0], rows[1], rows[2]) if with_norms else RankStats(rows[0])

    def _record(self, step, keep, plans, importance, new_logits, access) -> dict:
        if self.config.importance == "norm":  # A and B changed: read them again
            importance_after = self._importance(self._whole_model_stats(access))
        else:  # the new logits are known here: no second read
            importance_after = importance.clone()
            for m, row in new_logits.items():
                importance_after[m] = algorithm.score_importance(row[None], self.config.tau)[0]
        names = self.whole_model.names
        return {
            "step": step,
            "keep_fraction": keep,
            "pruned": [(names[p.module_index], j) for p in plans for j in p.targets],
            "sources": [(names[p.module_index], j, s) for p in plans for j, s in zip(p.targets, p.sources)],
            "importance_before": {names[p.module_index]: importance[p.module_index].tolist() for p in plans},
            "importance_after": {names[p.module_index]: importance_after[p.module_index].tolist() for p in plans},
        }

    # -------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: step, snapshot (this process's shard), history, config.

        Reset randomness needs no RNG state: every permutation is drawn from a generator seeded by
        (seed, step, module index), so it is the same after a resume by construction.
        """
        return {"version": STATE_VERSION, "global_step": self.global_step, "config": self.config.to_dict(),
                "module_names": list(self.module_names), "snapshot": self._snapshot,
                "snapshot_step": self._snapshot_step, "history": list(self.history),
                "nonfinite_loss_step": self._nonfinite_loss_step, "tensor_parallel": self.tensor_parallel_layout,
                "process": self.process_place}

    def resume_problem(self, state: dict) -> Optional[str]:
        """Why this controller cannot continue from a saved `state_dict()`, or None: another state version,
        other BeamLoRA settings, other modules, another tensor-parallel split. Checked before anything loads."""
        if state.get("version") != STATE_VERSION:
            return (f"Cannot resume: the BeamLoRA state has version {state.get('version')!r}, this beamlora_ds reads "
                    f"version {STATE_VERSION} (an earlier development version of beamlora_ds wrote it). Resume with "
                    "the beamlora_ds that wrote it, or start a new run.")
        saved, current = state["config"], self.config.to_dict()
        changed = [f"{k}: saved {saved.get(k)!r}, now {current[k]!r}" for k in RESUME_FIELDS if saved.get(k) != current[k]]
        if changed:
            return ("Cannot resume: the BeamLoRA config differs from the checkpoint's (" + "; ".join(changed)
                    + "). Resume with the original settings or start a new run.")
        if list(state["module_names"]) != self.module_names:
            return (f"Cannot resume: the checkpoint has {len(state['module_names'])} BeamLoRA modules here, this model "
                    f"has {len(self.module_names)} (or different names). Use the same target_modules, and under "
                    "pipeline parallelism the same stages and partition of the layers.")
        if state.get("process", self.process_place) != self.process_place:  # a state without one predates it
            return foreign_state_message(state["process"], self.process_place)
        if state["tensor_parallel"] != self.tensor_parallel_layout:
            return ("Cannot resume: the checkpoint was written with another tensor-parallel split (autotp_size or "
                    "model) than this run's, and its model and optimizer files are per slice. Resume with the same "
                    "tensor_parallel.autotp_size, or export the adapter (beamlora-export consolidates the slices) "
                    "and start a new run from it.")
        return None

    @property
    def process_place(self) -> dict:
        """{"rank", "world_size"} of this process: a state holds this process's snapshot shard and random streams,
        so only the process that wrote it may continue from it."""
        return dict(self._platform.process_place())

    @property
    def tensor_parallel_layout(self) -> dict:
        """{module name: [column or row, partition sizes]} of the layers split for tensor parallelism ({} without):
        what an offline export needs to put the processes' slices together, and what a resume must match."""
        return {name: [m.tensor_parallel.kind, list(m.tensor_parallel.sizes)]
                for name, m in zip(self.module_names, self.modules) if m.tensor_parallel is not None}

    def load_state_dict(self, state: dict) -> None:
        problem = self.resume_problem(state)
        if problem:
            raise ValueError(problem)
        self.global_step = int(state["global_step"])
        self._snapshot = state["snapshot"]
        self._snapshot_step = state["snapshot_step"]
        self.history = list(state["history"])
        self._nonfinite_loss_step = state["nonfinite_loss_step"]


def foreign_state_message(saved: dict, here: dict) -> str:
    return (f"Cannot resume: this BeamLoRA state was saved by process {saved.get('rank')} of "
            f"{saved.get('world_size')}, and this is process {here['rank']} of {here['world_size']}. Each process "
            "holds its own snapshot shard, so each must load the state it saved: resume with "
            "beamlora_ds.save_checkpoint / load_checkpoint (one state file per process, also across a change in the "
            "number of processes), or save and load beam.state_dict() per process (a framework's checkpointing that "
            "saves one copy for all processes, such as accelerate's register_for_checkpointing, does not).")


def _log(access: PlatformAccess, level: int, message: str, *args) -> None:
    """Reset lines come from process 0 only: every process decides the same reset, and 64 identical lines on 64
    GPUs say no more than one (the record itself is in `history` on every process)."""
    if access.is_process_zero():
        logger.log(level, message, *args)


def _agreed(access: PlatformAccess, checksum: float) -> bool:
    """The consistency check over the access's processes and over the pipeline stages (both always asked: every
    process enters both collectives)."""
    same_here = access.all_processes_agree(checksum)
    same_across_stages = access.stages.agree(checksum)
    return same_here and same_across_stages


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # an object that takes no weak references: keep none
        return None


def _plan_checksum(plans, importance: torch.Tensor) -> float:
    """A number that differs, with overwhelming probability, when two processes planned differently."""
    total = float(importance.double().mul(torch.arange(1, importance.numel() + 1, dtype=torch.float64)
                                          .view_as(importance)).sum())
    for p in plans:
        for i, (j, s) in enumerate(zip(p.targets, p.sources)):
            total += math.sin(1.0 + p.module_index * 1009 + j * 31 + s * 7 + i)
    return total
