"""BeamLoRA in a Hugging Face Trainer: the complete minimal script (docs/integration.md shows it in full).

    python examples/train_trainer.py --out out/hf [--steps 40] [--resume]
    deepspeed --num_gpus 2 examples/train_trainer.py --out out/hf --deepspeed ds_configs/zero3.json

The default model is a small Llama built from a config (no download); the data is a stand-in (counting from a
random start). Swap in your own model, tokenizer and dataset.
"""
import argparse
import os

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments)

import beamlora_ds


class Counting(torch.utils.data.Dataset):
    """Stand-in data: row i counts up from a start drawn from i."""

    def __len__(self):
        return 4096

    def __getitem__(self, i):
        start = torch.randint(0, 64, (1,), generator=torch.Generator().manual_seed(i))
        ids = (start + torch.arange(16)) % 64
        return {"input_ids": ids, "labels": ids}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/hf")
    p.add_argument("--model", default="tiny", help="'tiny' (built from a config) or a path / hub name")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config file (launch with `deepspeed`)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in OUT")
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = p.parse_args()

    torch.manual_seed(0)  # before apply(): lora_A's random init is then the same in every run
    if args.model == "tiny":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=8, alpha=16, total_steps=args.steps,
                                                               interval=args.interval))
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=3e-3,
        weight_decay=0.01,            # on A and B only: attach() keeps it off the score
        save_steps=args.interval, logging_steps=args.interval, report_to=[], seed=0,
        use_cpu=not torch.cuda.is_available(),   # without CUDA: else accelerate sees only one process
        deepspeed=args.deepspeed)
    trainer = Trainer(model=model, args=training_args, train_dataset=Counting())
    beamlora_ds.attach(trainer, beam)  # steps BeamLoRA, saves adapter-only checkpoints with its state
    trainer.train(resume_from_checkpoint=args.resume or None)
    trainer.save_model(os.path.join(args.out, "adapter"))  # a stock peft adapter (score folded in)
    if trainer.is_world_process_zero():
        print(f"done: {beam.global_step} steps, {len(beam.history)} resets, adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()
