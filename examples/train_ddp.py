"""BeamLoRA under plain PyTorch DDP (torchrun): the complete minimal script (docs/ddp.md shows it in full).

    torchrun --nproc_per_node 2 examples/train_ddp.py --out out/ddp [--steps 40] [--resume]

The default model is a small Llama built from a config (no download); the data is a stand-in (counting from a
random start). Swap in your own model and DataLoader (with a DistributedSampler).
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import beamlora_ds


def batch_for(step: int, rank: int, micro_batch: int, seed: int):
    """Step `step`'s micro-batch of process `rank`: a function of (step, rank), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    start = torch.randint(0, 64, (micro_batch, 1), generator=generator)
    ids = (start + torch.arange(16)) % 64
    return {"input_ids": ids, "labels": ids}


def save(folder: str, step: int, model, optimizer, beam) -> None:
    """One checkpoint: the trainable tensors and the optimizer (the same on every DDP replica: process 0 writes
    them) and each process's own BeamLoRA state and RNG (the state records which process wrote it)."""
    rank, path = dist.get_rank(), os.path.join(folder, f"step-{step}")
    os.makedirs(path, exist_ok=True)
    torch.save({"beam": beam.state_dict(), "rng": torch.get_rng_state()}, os.path.join(path, f"rank{rank}.pt"))
    if rank == 0:
        trainable = {n: p.detach() for n, p in model.module.named_parameters() if p.requires_grad}
        torch.save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step},
                   os.path.join(path, "train_state.pt"))
    dist.barrier()  # every file of the checkpoint is written before `latest` names it
    if rank == 0:
        with open(os.path.join(folder, "latest.tmp"), "w") as f:
            f.write(f"step-{step}")
        os.replace(os.path.join(folder, "latest.tmp"), os.path.join(folder, "latest"))
    dist.barrier()


def load(folder: str, model, optimizer, beam) -> int:
    """The latest checkpoint into this process; returns its step."""
    with open(os.path.join(folder, "latest")) as f:
        path = os.path.join(folder, f.read().strip())
    shared = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
    model.module.load_state_dict(shared["trainable"], strict=False)  # the frozen base comes from where you load it
    optimizer.load_state_dict(shared["optimizer"])
    own = torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=False)
    beam.load_state_dict(own["beam"])
    torch.set_rng_state(own["rng"])
    return shared["step"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/ddp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--save_every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)  # what `deepspeed` passes; torchrun sets LOCAL_RANK
    args = p.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)  # the same base and lora_A on every process
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))

    # 1. apply() before the optimizer and before wrapping in DDP
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=8, alpha=16, total_steps=args.steps,
                                                               interval=args.interval))
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model, weight_decay=0.01), lr=3e-3)
    model = DistributedDataParallel(model, broadcast_buffers=False)  # buffers are constant (rotary frequencies)

    checkpoints, start = os.path.join(args.out, "checkpoints"), 0
    if args.resume:
        start = load(checkpoints, model, optimizer, beam)

    # 2. the loop: beam.step(optimizer) after every optimizer step, on every process (a reset is identical on all)
    for step in range(start, args.steps):
        loss = model(**batch_for(step, rank, 4, args.seed)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record = beam.step(optimizer)
        beamlora_ds.log_reset(os.path.join(args.out, "log.jsonl"), record)  # process 0 writes
        if rank == 0 and record:
            print(f"step {step + 1}: reset moved {len(record['pruned'])} ranks; loss {loss.item():.4f}", flush=True)
        if (step + 1) % args.save_every == 0:
            save(checkpoints, step + 1, model, optimizer, beam)

    # 3. a stock peft adapter (score folded in); every process calls it, process 0 writes
    beamlora_ds.save_adapter(model, os.path.join(args.out, "adapter"), overwrite=True)
    if rank == 0:
        print(f"done: {beam.global_step} steps, {len(beam.history)} resets, adapter in {args.out}/adapter")
    del model  # DDP's reducer released while the process group lives: on gloo its release at exit can deadlock
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
