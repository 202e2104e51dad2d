"""BeamLoRA in your own DeepSpeed loop: the complete minimal script (docs/integration.md shows it in full).

    deepspeed --num_gpus 2 examples/train_deepspeed.py --out out/ds [--zero_stage 2] [--steps 40] [--resume]
    deepspeed --num_gpus 8 examples/train_deepspeed.py --model meta-llama/Llama-2-7b-hf --zero_stage 3 --bf16 ...

The default model is a small Llama built from a config (no download); the data is a stand-in (counting: each
token is the previous one plus one, from a random start, so the loss has something to learn). Swap in your own
model and DataLoader.
"""
import argparse
import os

import deepspeed
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import beamlora_ds


def load_model(name: str, dtype: torch.dtype):
    if name == "tiny":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    # under ZeRO-3, build a transformers.integrations.HfDeepSpeedConfig(ds_config) first so the model loads partitioned
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)


def batch_for(step: int, rank: int, micro_batch: int, seed: int):
    """Step `step`'s micro-batch of process `rank`: a function of (step, rank), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    start = torch.randint(0, 64, (micro_batch, 1), generator=generator)
    ids = (start + torch.arange(16)) % 64  # counting from a random start: learnable
    return {"input_ids": ids, "labels": ids}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/ds")
    p.add_argument("--model", default="tiny", help="'tiny' (built from a config) or a path / hub name")
    p.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--save_every", type=int, default=10)
    p.add_argument("--stop_at", type=int, default=0, help="stop after this step (to try --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = p.parse_args()

    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    rank = deepspeed.comm.get_rank()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(args.seed)  # before apply(): lora_A's random init is then the same in every run
    model = load_model(args.model, dtype)

    # 1. apply() before the optimizer and before deepspeed.initialize
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=8, alpha=16, total_steps=args.steps,
                                                               interval=args.interval))
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model, weight_decay=0.01), lr=3e-3)
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "bf16": {"enabled": args.bf16},
                 "zero_optimization": {"stage": args.zero_stage,
                                       # ZeRO-3: keep the adapters resident (one gather less per step)
                                       "stage3_param_persistence_threshold":
                                           beamlora_ds.persistence_threshold_for(beam.modules)}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    # 2. resume: DeepSpeed's state plus BeamLoRA's; client_state carries what your loop needs (here the step)
    checkpoints, start = os.path.join(args.out, "checkpoints"), 0
    if args.resume:
        _, client_state = beamlora_ds.load_checkpoint(engine, beam, checkpoints)
        start = client_state["step"]

    # 3. the loop: beam.step(engine) after every engine.step(), on every process
    for step in range(start, args.steps):
        batch = batch_for(step, rank, ds_config["train_micro_batch_size_per_gpu"], args.seed)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        record = beam.step(engine)  # a reset record at a reset step, else None
        beamlora_ds.log_reset(os.path.join(args.out, "log.jsonl"), record)  # process 0 writes; beamlora-plot draws it
        if rank == 0 and record:
            print(f"step {step + 1}: reset moved {len(record['pruned'])} ranks; loss {loss.item():.4f}", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.stop_at:
            beamlora_ds.save_checkpoint(engine, beam, checkpoints, client_state={"step": step + 1})
        if step + 1 == args.stop_at:
            return

    # 4. a stock peft adapter (score folded in); every process calls it, process 0 writes
    beamlora_ds.save_adapter(engine, os.path.join(args.out, "adapter"), overwrite=True)
    if rank == 0:
        print(f"done: {beam.global_step} steps, {len(beam.history)} resets, adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()
