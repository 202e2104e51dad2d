"""BeamLoRA inside a `transformers.Trainer`, with or without DeepSpeed.

    beam = beamlora_ds.apply(model, BeamLoRAConfig(..., total_steps=training_args.max_steps))
    trainer = Trainer(model=model, args=training_args, ...)
    beamlora_ds.hf.attach(trainer, beam)
    trainer.train()        # or trainer.train(resume_from_checkpoint=True)

The callback steps the controller once per real optimizer update (under accelerate + DeepSpeed the engine
steps inside `backward`; steps the engine or the grad scaler skipped are not counted), saves the controller's
state into every Trainer checkpoint folder, and restores it when the Trainer resumes from one.
"""
from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from .checkpoint import STATE_FILE
from .controller import BeamController
from .ranks import all_ranks_or_raise


def attach(trainer, beam: BeamController) -> "BeamLoRACallback":
    """Add a BeamLoRACallback bound to `trainer` (it needs the trainer to find the DeepSpeed engine)."""
    callback = BeamLoRACallback(trainer, beam)
    trainer.add_callback(callback)
    return callback


class BeamLoRACallback(TrainerCallback):
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

    def on_step_begin(self, args, state, control, **kwargs):
        if getattr(self, "_resume_checked", False):
            return
        self._resume_checked = True  # only the first step of a train() call can follow a resume
        if state.global_step > 0 and self.beam.global_step != state.global_step:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, STATE_FILE.format(rank=self._rank()))
            all_ranks_or_raise(os.path.isfile(path), f"The Trainer resumed at step {state.global_step} but {path} "
                               "is missing on some process: BeamLoRACallback saves BeamLoRA's state (snapshot, step "
                               "count) into each checkpoint-N folder of output_dir. Resume from such a checkpoint.")
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
        torch.save({"beamlora": self.beam.state_dict()}, path + ".tmp")
        os.replace(path + ".tmp", path)
