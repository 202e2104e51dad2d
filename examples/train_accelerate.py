"""BeamLoRA in your own accelerate loop, with or without DeepSpeed: the complete minimal script (docs/accelerate.md
shows it in full).

    torchrun --nproc_per_node 2 examples/train_accelerate.py --out out/acc [--zero 2] [--steps 40] [--resume]
    torchrun --nproc_per_node 8 examples/train_accelerate.py --model meta-llama/Llama-2-7b-hf --zero 3 ...

--zero 2 or 3: DeepSpeed ZeRO through accelerate (this script builds the DeepSpeedPlugin); --zero 0: accelerate
without DeepSpeed (DDP). The default model is a small Llama built from a config (no download); the data is a
stand-in (counting from a random start). Swap in your own model and DataLoader.
"""
import argparse
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import beamlora_ds

MICRO_BATCH = 4


def load_model(name: str):
    if name == "tiny":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    return AutoModelForCausalLM.from_pretrained(name)


def batch_for(step: int, rank: int, seed: int):
    """Step `step`'s micro-batch of process `rank`: a function of (step, rank), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    start = torch.randint(0, 64, (MICRO_BATCH, 1), generator=generator)
    ids = (start + torch.arange(16)) % 64  # counting from a random start: learnable
    return {"input_ids": ids, "labels": ids}


def save(accelerator, model, beam, checkpoints: str, step: int):
    """A checkpoint that resumes exactly: checkpoints/global_step{step}, named by checkpoints/latest."""
    tag = f"global_step{step}"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the engine's state, each process's BeamLoRA state
        beamlora_ds.save_checkpoint(model, beam, checkpoints, tag=tag, client_state={"step": step})
        return
    accelerator.save_state(os.path.join(checkpoints, tag))  # model, optimizer, each process's random state
    # BeamLoRA's state per process (each holds its own snapshot): never through register_for_checkpointing
    torch.save({"beam": beam.state_dict(), "step": step},
               os.path.join(checkpoints, tag, f"beamlora_rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(checkpoints, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(checkpoints, "latest.tmp"), os.path.join(checkpoints, "latest"))


def load(accelerator, model, beam, checkpoints: str) -> int:
    """Resume from checkpoints/latest; returns the step to continue from."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _, client_state = beamlora_ds.load_checkpoint(model, beam, checkpoints)
        return client_state["step"]
    with open(os.path.join(checkpoints, "latest")) as f:
        folder = os.path.join(checkpoints, f.read().strip())
    accelerator.load_state(folder)
    saved = torch.load(os.path.join(folder, f"beamlora_rank{accelerator.process_index}.pt"), weights_only=False)
    beam.load_state_dict(saved["beam"])
    return saved["step"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/acc")
    p.add_argument("--model", default="tiny", help="'tiny' (built from a config) or a path / hub name")
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage; 0: no DeepSpeed (DDP)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--save_every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = p.parse_args()

    if not torch.cuda.is_available():
        # before Accelerator: without it accelerate takes every process for process 0 of 1 (all read process 0's
        # batches), and Accelerator(cpu=True) would silently train with DDP instead of DeepSpeed
        PartialState(cpu=True)
    torch.manual_seed(args.seed)  # before apply(): lora_A's random init is then the same in every run
    model = load_model(args.model)

    # 1. apply() before the optimizer and before accelerator.prepare
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=8, alpha=16, total_steps=args.steps,
                                                               interval=args.interval))
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model, weight_decay=0.01), lr=3e-3)
    plugin = None
    if args.zero:
        plugin = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": args.zero,  # ZeRO-3: keep the adapters resident (one gather less per step)
                                  "stage3_param_persistence_threshold":
                                      beamlora_ds.persistence_threshold_for(beam.modules)}})
    accelerator = Accelerator(deepspeed_plugin=plugin)
    model, optimizer = accelerator.prepare(model, optimizer)
    # what beam.step() is given: under DeepSpeed the engine (prepare returned it as the model), else the optimizer
    stepped = model if accelerator.distributed_type == DistributedType.DEEPSPEED else optimizer

    # 2. resume: accelerate's or DeepSpeed's state plus BeamLoRA's
    checkpoints, start = os.path.join(args.out, "checkpoints"), 0
    if args.resume:
        start = load(accelerator, model, beam, checkpoints)

    # 3. the loop: beam.step(...) after every optimizer step, on every process
    for step in range(start, args.steps):
        batch = {k: v.to(accelerator.device) for k, v in batch_for(step, accelerator.process_index, args.seed).items()}
        loss = model(**batch).loss
        accelerator.backward(loss)  # under DeepSpeed this also steps the engine
        accelerator.clip_grad_norm_(model.parameters(), 1.0)  # under DeepSpeed: its config's gradient_clipping
        optimizer.step()
        optimizer.zero_grad()
        record = beam.step(stepped)  # a reset record at a reset step, else None
        beamlora_ds.log_reset(os.path.join(args.out, "log.jsonl"), record)  # process 0 writes; beamlora-plot draws it
        if accelerator.is_main_process and record:
            print(f"step {step + 1}: reset moved {len(record['pruned'])} ranks; loss {loss.item():.4f}", flush=True)
        if (step + 1) % args.save_every == 0:
            save(accelerator, model, beam, checkpoints, step + 1)

    # 4. a stock peft adapter (score folded in); every process calls it, process 0 writes
    beamlora_ds.save_adapter(model, os.path.join(args.out, "adapter"), overwrite=True)
    if accelerator.is_main_process:
        print(f"done: {beam.global_step} steps, {len(beam.history)} resets, adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()
