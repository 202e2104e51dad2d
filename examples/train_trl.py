"""BeamLoRA in trl's SFTTrainer: the complete minimal script (docs/trl.md shows it in full).

    python examples/train_trl.py --out out/sft [--steps 40] [--resume [out/sft/checkpoint-20]]
    deepspeed --num_gpus 2 examples/train_trl.py --out out/sft --deepspeed ds_configs/zero2.json

The default model is the built-in tiny Llama with its character tokenizer (no download); the data is a stand-in
(sums written out as text). Swap in your own model, tokenizer and dataset. No `peft_config`: BeamLoRA is the
adapter, applied before the trainer is built and attached after.
"""
import argparse
import os
import random

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import beamlora_ds
from beamlora_ds.loading.builtin import char_tokenizer, tiny_llama


def sums(rows: int) -> Dataset:
    """Stand-in data: "12+34=46", one sum a row (the same rows in every run and process)."""
    rng = random.Random(0)
    pairs = [(rng.randrange(100), rng.randrange(100)) for _ in range(rows)]
    return Dataset.from_dict({"text": [f"{a}+{b}={a + b}" for a, b in pairs]})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/sft")
    p.add_argument("--model", default="tiny", help="'tiny' (built from a config) or a path / hub name")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--save_every", type=int, default=5)
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config file (launch with `deepspeed`)")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the newest checkpoint-N in OUT, or from the checkpoint folder given")
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = p.parse_args()

    if args.model == "tiny":
        model, tokenizer = tiny_llama(torch.float32), char_tokenizer()
    else:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)  # before apply(): lora_A's random init is then the same in every run
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=8, alpha=16, total_steps=args.steps,
                                                               interval=args.interval))
    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=3e-3,
        weight_decay=0.01,            # on A and B only: attach() keeps it off the score
        max_length=32, save_steps=args.save_every, logging_steps=args.interval, report_to=[], seed=0,
        use_cpu=not torch.cuda.is_available(),   # without CUDA: else accelerate sees only one process
        deepspeed=args.deepspeed)
    # no peft_config: BeamLoRA is the adapter
    trainer = SFTTrainer(model=model, args=config, train_dataset=sums(512), processing_class=tokenizer)
    beamlora_ds.attach(trainer, beam)  # after SFTTrainer is built: steps BeamLoRA, adapter-only checkpoints
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(os.path.join(args.out, "adapter"))  # a stock peft adapter (score folded in)
    if trainer.is_world_process_zero():
        print(f"resets at steps {[record['step'] for record in beam.history]}")
        print(f"done: {beam.global_step} steps, {len(beam.history)} resets, adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()
