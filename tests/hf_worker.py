"""A real transformers.Trainer run of the tiny built-in Llama with BeamLoRA attached (optionally DeepSpeed).

    python tests/hf_worker.py --out DIR [--stop_at 6] [--resume] [--ds_stage 3]   (under `deepspeed` for ZeRO)
Writes DIR/result.pt on rank 0: the reset history and the final adapter tensors (fp32, full).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beamlora_ds  # noqa: E402
from beamlora_ds import data as data_lib, models  # noqa: E402
from beamlora_ds.hf import attach  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--stop_at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ds_stage", type=int, default=-1)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokenizer = models.char_tokenizer()
    rows = data_lib.arithmetic_examples(256, seed=0)
    examples = data_lib.tokenize_examples(rows, tokenizer, max_length=64)
    model = models.load_model(models.BUILTIN_TINY, torch.float32, {})
    torch.manual_seed(0)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=4, alpha=8.0, dropout=0.05, interval=4,
                                                               total_steps=12, p0=0.7))
    ds = None
    if args.ds_stage >= 0:
        import datetime

        import deepspeed

        # on CPU the process group must be gloo; made here, accelerate and the Trainer then use it
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
        ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": args.ds_stage, "stage3_param_persistence_threshold": 0}}
    training_args = TrainingArguments(output_dir=args.out, max_steps=12, per_device_train_batch_size=4,
                                      gradient_accumulation_steps=2, learning_rate=3e-3, save_steps=6,
                                      logging_steps=1, report_to=[], use_cpu=not torch.cuda.is_available(), seed=0, data_seed=0,
                                      deepspeed=ds, save_only_model=False, disable_tqdm=True,
                                      lr_scheduler_type="cosine", warmup_steps=0)

    def collate(batch):
        return data_lib.collate(batch, tokenizer.pad_token_id)

    trainer = Trainer(model=model, args=training_args, train_dataset=examples, data_collator=collate)
    attach(trainer, beam)

    class StopAt(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if args.stop_at and state.global_step == args.stop_at:
                control.should_training_stop = True

    trainer.add_callback(StopAt())
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, m in zip(beam.module_names, beam.modules):
        for key in ("lora_A", "lora_B", "lora_score"):
            param = getattr(m, key)
            full = safe_get_full_fp32_param(param) if ds is not None else None
            weights[f"{name}.{key}"] = (full if full is not None else param.detach()).float().cpu().clone()
    if trainer.args.process_index == 0:
        torch.save({"history": [(r["step"], sorted(map(tuple, r["pruned"]))) for r in beam.history],
                    "global_step": beam.global_step, "weights": weights}, os.path.join(args.out, "result.pt"))


if __name__ == "__main__":
    main()
