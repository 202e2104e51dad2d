"""A real transformers.Trainer run of the tiny built-in Llama with BeamLoRA attached (optionally DeepSpeed).

    deepspeed --num_gpus 2 tests/hf_worker.py --out DIR [--stop_at 6] [--resume DIR/checkpoint-6] [--ds_stage 3]
Writes DIR/result.pt on rank 0: the reset history and the final adapter tensors (fp32, full). Without DeepSpeed,
tests/integrations/test_hf_trainer.py calls train() in its own process. Under ZeRO-3 each run needs its own
launch: a second Trainer in the same processes does not start afresh (measured: a run meant to stop at step 6 went on to 12).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beamlora_ds  # noqa: E402
from beamlora_ds.loading import builtin, models  # noqa: E402
from beamlora_ds.train import data as data_lib  # noqa: E402
from beamlora_ds.integrations.hf_trainer import attach  # noqa: E402


def train(out: str, stop_at: int = 0, resume: bool = False, ds_stage: int = -1, weight_decay: float = 0.1,
          own_optimizer_decay: float = None, best_at_end: bool = False) -> dict:
    """One Trainer run (in this process); returns, on every process, the reset history, the final adapter and the
    weight decay the Trainer's real optimizer applies to each adapter tensor (plain torch optimizer only)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokenizer = builtin.char_tokenizer()
    rows = data_lib.arithmetic_examples(256, seed=0)
    examples = data_lib.tokenize_examples(rows, tokenizer, max_length=64)
    model = models.load_model(builtin.BUILTIN_TINY, torch.float32, {})
    torch.manual_seed(0)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=4, alpha=8.0, dropout=0.05, interval=4,
                                                               total_steps=12, p0=0.7))
    ds = None
    if ds_stage >= 0:
        import datetime

        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param as full_fp32

        # on CPU the process group must be gloo; made here, accelerate and the Trainer then use it
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
        ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": ds_stage, "stage3_param_persistence_threshold": 0}}
    training_args = TrainingArguments(output_dir=out, max_steps=12, per_device_train_batch_size=4,
                                      gradient_accumulation_steps=2, learning_rate=3e-3, save_steps=6,
                                      logging_steps=1, report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
                                      data_seed=0, deepspeed=ds, save_only_model=False, disable_tqdm=True,
                                      lr_scheduler_type="cosine", warmup_steps=0,
                                      weight_decay=weight_decay,
                                      **(dict(eval_strategy="steps", eval_steps=6, load_best_model_at_end=True,
                                              metric_for_best_model="loss", greater_is_better=True)
                                         if best_at_end else {}))

    def collate(batch):
        return data_lib.collate(batch, tokenizer.pad_token_id)

    optimizers = (None, None)
    if own_optimizer_decay is not None:  # the user's own optimizer, every trainable tensor in one group
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers = (torch.optim.AdamW(trainable, lr=3e-3, weight_decay=own_optimizer_decay), None)
    trainer = Trainer(model=model, args=training_args, train_dataset=examples, data_collator=collate,
                      optimizers=optimizers, eval_dataset=examples[:16] if best_at_end else None)
    attach(trainer, beam)

    class StopAt(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if stop_at and state.global_step == stop_at:
                control.should_training_stop = True

    trainer.add_callback(StopAt())
    trainer.train(resume_from_checkpoint=resume if isinstance(resume, str) else (True if resume else None))
    weights = {}
    for name, m in zip(beam.module_names, beam.modules):
        for key in ("lora_A", "lora_B", "lora_score"):
            param = m.score_parameter if key == "lora_score" else getattr(m, key)  # the scores: one table
            full = full_fp32(param) if ds is not None else None
            value = full if full is not None else param.detach()
            if key == "lora_score" and m.score_row is not None:
                value = value[m.score_row]
            weights[f"{name}.{key}"] = value.float().cpu().clone()
    return {"history": [(r["step"], sorted(map(tuple, r["pruned"]))) for r in beam.history],
            "global_step": beam.global_step, "weights": weights, "process_index": trainer.args.process_index,
            "decay": optimizer_weight_decay(trainer, model), "best": trainer.state.best_model_checkpoint,
            "param_groups": optimizer_group_count(trainer)}


def optimizer_group_count(trainer):
    """How many parameter groups the Trainer's optimizer has (None under DeepSpeed)."""
    if ds_enabled(trainer):
        return None
    optimizer = trainer.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return len(optimizer.param_groups)


def optimizer_weight_decay(trainer, model) -> dict:
    """{parameter name: weight_decay of its group} read from the Trainer's torch optimizer (None under DeepSpeed,
    whose flat groups are read through beamlora_ds instead)."""
    if ds_enabled(trainer):
        return None
    optimizer = trainer.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    group_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of.get(id(p)) for name, p in model.named_parameters() if p.requires_grad}


def ds_enabled(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stop_at", type=int, default=0)
    p.add_argument("--resume", default="", help="the checkpoint folder to resume from (explicit, so that a retried "
                   "launch resumes from the same one and not from the checkpoint its first try wrote)")
    p.add_argument("--ds_stage", type=int, default=3)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    result = train(args.out, args.stop_at, args.resume or False, args.ds_stage)
    if result.pop("process_index") == 0:
        torch.save(result, os.path.join(args.out, "result.pt"))


if __name__ == "__main__":
    main()
