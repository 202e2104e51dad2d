"""BeamLoRA inside a `transformers.Trainer`, with or without DeepSpeed.

    beam = beamlora_ds.apply(model, BeamLoRAConfig(..., total_steps=training_args.max_steps))
    trainer = Trainer(model=model, args=training_args, ...)
    beamlora_ds.attach(trainer, beam)
    trainer.train()        # or trainer.train(resume_from_checkpoint=True)

attach() makes the Trainer a BeamLoRA Trainer (its class gains BeamLoRATrainerMixin, so a subclass such as
trl's SFTTrainer keeps its own behaviour): the score is never weight-decayed, `save_model` and every
`checkpoint-N` hold the adapter only (a stock peft adapter plus our unfolded state; the frozen base is re-loaded
from its source on resume), and a BeamLoRACallback steps the controller once per real optimizer update and saves
and restores its state with each checkpoint. docs/integration.md has the whole recipe.
"""
from __future__ import annotations

import os
import shutil

import torch
from transformers import TrainerCallback

from ..backends import coordination
from ..backends.deepspeed.internals import base_left_out_of_checkpoints
from ..checkpointing.base_identity import base_identity, identity_problem
from ..checkpointing.layout import STATE_FILE
from ..checkpointing.load import allow_adapter_only_state
from ..export.adapter_format import STATE_CONFIG, load_state, write_adapter
from ..export.live import adapter_metadata, adapter_state_from_model, save_adapter
from ..method.controller import BeamController
from ..method.inject import find_beamlora_modules

STAGING = ".beamlora_adapter.partial"  # inside the folder being saved; its files are moved up when complete


def attach(trainer, beam: BeamController) -> "BeamLoRACallback":
    """Turn `trainer` into a BeamLoRA Trainer and add the callback that steps `beam`; returns the callback."""
    check_processes_joined(trainer)
    if not isinstance(trainer, BeamLoRATrainerMixin):
        base = type(trainer)
        trainer.__class__ = type(f"BeamLoRA{base.__name__}", (BeamLoRATrainerMixin, base), {})
    model = trainer.model
    if not getattr(model, "_beamlora_adapter_only_loads", False):
        model.register_load_state_dict_post_hook(allow_adapter_only_state)
        model._beamlora_adapter_only_loads = True
    callback = BeamLoRACallback(trainer, beam)
    trainer.add_callback(callback)
    return callback


def check_processes_joined(trainer) -> None:
    """The launcher started N processes but the Trainer sees one: each would train alone (DeepSpeed then fails
    with "train_batch_size is not equal to ..."). Happens on a machine without CUDA unless told to use the CPU."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and trainer.args.world_size == 1:
        raise RuntimeError(f"The launcher started {launched} processes, but the Trainer sees only this one, so each "
                           "would train alone. On a machine without CUDA pass use_cpu=True to TrainingArguments (or "
                           "call deepspeed.init_distributed(dist_backend='gloo') before creating them).")


class BeamLoRATrainerMixin:
    """The Trainer methods BeamLoRA changes. attach() puts it in front of the trainer's class; subclass it
    yourself (`class MyTrainer(BeamLoRATrainerMixin, Trainer)`) if you prefer that to attach()'s class change.

    The one place beamlora_ds relies on Trainer internals: it overrides three private methods
    (`_save_optimizer_and_scheduler`, `_load_from_checkpoint`, `_load_best_model`) (docs/platform.md, "Trainer
    internals we rely on"; pinned by tests/integrations/test_hf_trainer.py)."""

    def get_decay_parameter_names(self, model):
        """The Trainer's choice minus every `lora_score`: the score re-weights ranks and is never decayed. With
        weight_decay 0 nothing is decayed, so every name is listed: one group, the other one empty (dropped by
        create_optimizer), as optimizer_param_groups does (docs/fused_score_design.md)."""
        if not self.args.weight_decay:
            return [name for name, _ in model.named_parameters()]
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith("lora_score")]

    def create_optimizer(self, model=None):
        """The Trainer's optimizer without empty parameter groups: under ZeRO each group is its own flat buffer
        and collectives per step."""
        optimizer = super().create_optimizer(model)
        inner = getattr(optimizer, "optimizer", optimizer)
        if isinstance(inner, torch.optim.Optimizer) and not inner.state:
            inner.param_groups[:] = [group for group in inner.param_groups if group["params"]]
        return optimizer

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._beamlora_resume_from = resume_from_checkpoint  # the callback reads BeamLoRA's state from there
        refuse_unresumable_checkpoint(self, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        """The adapter, not the model: a stock peft adapter (score folded in) plus our unfolded state, written into
        `output_dir` (other files there are kept). Under DeepSpeed call it on every process (the adapter is
        gathered), as the Trainer does; otherwise process 0 writes and the others return, as the stock Trainer."""
        output_dir = output_dir or self.args.output_dir
        if self.is_deepspeed_enabled:
            write_adapter_into(self.model_wrapped, output_dir)
        elif self.args.should_save:
            write_adapter_into(self.model, output_dir, collective=False)
        if self.args.should_save:
            tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def _save_optimizer_and_scheduler(self, output_dir):
        """DeepSpeed's part of a checkpoint without the frozen base (adapter, its fp32 master and moments): the
        Trainer's own save, with the engine's save_checkpoint told to exclude frozen parameters meanwhile."""
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        with base_left_out_of_checkpoints(self.model_wrapped):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if os.path.isfile(os.path.join(resume_from_checkpoint, STATE_CONFIG)):
            load_adapter_into(model if model is not None else self.model, resume_from_checkpoint)
        else:  # a checkpoint written before attach() took over saving: the Trainer's own format
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if not self.is_deepspeed_enabled and os.path.isfile(os.path.join(best, STATE_CONFIG)):
            load_adapter_into(self.model, best)
        else:
            super()._load_best_model()


def refuse_unresumable_checkpoint(trainer, resume_from_checkpoint) -> None:
    """Before the Trainer loads anything: a checkpoint whose BeamLoRA state this controller cannot continue
    (another state version, other settings or modules) is refused with the way out, on every process."""
    if not resume_from_checkpoint:
        return
    folder = resume_from_checkpoint
    if folder is True:
        from transformers.trainer_utils import get_last_checkpoint
        folder = get_last_checkpoint(trainer.args.output_dir)  # what the Trainer will pick (it raises on None)
    beams = [cb.beam for cb in trainer.callback_handler.callbacks if isinstance(cb, BeamLoRACallback)]
    if not folder or not beams:
        return
    path = os.path.join(folder, STATE_FILE.format(rank=trainer.args.process_index))
    saved = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else {}
    problem = beams[0].resume_problem(saved["beamlora"]) if saved else None  # a missing file: the callback says
    coordination.all_ranks_or_raise(problem is None, f"Checkpoint {folder!r}: {problem}", ValueError)
    # checkpoint-N holds the adapter, not the base: the one the Trainer was given must be the one it trained
    problem = identity_problem(saved.get("base"), base_identity(trainer.model), os.path.basename(folder))
    coordination.all_ranks_or_raise(problem is None, problem or "", ValueError)


def write_adapter_into(model_or_engine, folder: str, collective: bool = True) -> None:
    """save_adapter into an existing folder: written complete into a staging subfolder, then each file moved into
    place (a rename), so a reader sees the old adapter or the new one, never a half-written file. `collective`:
    every DeepSpeed process calls it (ZeRO gathers); else only the writing process does, and nothing waits."""
    staging = os.path.join(folder, STAGING)
    writer = not collective or coordination.rank() == 0
    if writer and os.path.lexists(staging):
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed half-way
    if collective:
        coordination.barrier()
        save_adapter(model_or_engine, staging)
    else:
        write_adapter(adapter_state_from_model(model_or_engine), staging, *adapter_metadata(model_or_engine))
    if writer:
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
        os.rmdir(staging)
    if collective:
        coordination.barrier()


@torch.no_grad()
def load_adapter_into(model, folder: str) -> None:
    """Put the unfolded A, B and score saved by save_model back into a model (no DeepSpeed: plain tensors)."""
    state = load_state(folder)
    modules = find_beamlora_modules(model)
    if sorted(modules) != sorted(state.module_names):
        raise ValueError(f"{folder} holds an adapter for {len(state.module_names)} modules, this model has "
                         f"{len(modules)} BeamLoRA modules (or other names): resume with the same target_modules.")
    for name, module in modules.items():
        for key in ("lora_A", "lora_B", "lora_score"):
            getattr(module, key).copy_(getattr(state, key)[name])


class BeamLoRACallback(TrainerCallback):
    """Steps the controller once per optimizer update; saves and restores its state with each checkpoint."""

    def __init__(self, trainer, beam: BeamController):
        self.trainer, self.beam = trainer, beam

    def _rank(self) -> int:
        return self.trainer.args.process_index

    def _target(self):
        """The DeepSpeed engine when the Trainer uses one, else the (wrapped) torch optimizer."""
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            return self.trainer.model_wrapped
        return self.trainer.optimizer

    def on_train_begin(self, args, state, control, **kwargs):
        self._resume_checked = False
        decayed = self.beam.decayed_scores(self._target())
        if decayed:
            raise ValueError(f"The Trainer's optimizer applies weight decay to {len(decayed)} lora_score parameters "
                             f"(e.g. {decayed[0]}); BeamLoRA never decays the score. The optimizer came from "
                             "outside the Trainer (`optimizers=` or the DeepSpeed config's `optimizer` section): "
                             "build it from beamlora_ds.optimizer_param_groups(model, weight_decay), set that "
                             "section's weight_decay to 0, or drop the section so the Trainer builds it.")

    def on_step_begin(self, args, state, control, **kwargs):
        if getattr(self, "_resume_checked", False):
            return
        self._resume_checked = True  # only the first step of a train() call can follow a resume
        if state.global_step > 0 and self.beam.global_step != state.global_step:
            resumed_from = getattr(self.trainer, "_beamlora_resume_from", None)
            folder = resumed_from if isinstance(resumed_from, str) else \
                os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, STATE_FILE.format(rank=self._rank()))
            coordination.all_ranks_or_raise(
                os.path.isfile(path), f"The Trainer resumed at step {state.global_step} but {path} is missing on some "
                "process: BeamLoRACallback saves BeamLoRA's state (snapshot, step count) into each checkpoint-N "
                "folder of output_dir. Resume from such a checkpoint.")
            self.beam.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["beamlora"])
            # RNG states: the Trainer restores its own from the same checkpoint

    def on_step_end(self, args, state, control, **kwargs):
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and getattr(accelerator, "optimizer_step_was_skipped", False):
            return  # an fp16 overflow: the weights did not change (DeepSpeed's own skips are seen by the engine)
        self.beam.step(self._target())

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, STATE_FILE.format(rank=self._rank()))
        base = base_identity(self.trainer.model)  # on every process (a gather under ZeRO-3): the checkpoint's base
        torch.save({"beamlora": self.beam.state_dict(), "base": base}, path + ".tmp")
        os.replace(path + ".tmp", path)
