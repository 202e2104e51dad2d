"""One training run of the small regression net with BeamLoRA, in one process or under DeepSpeed ZeRO.

Run directly for the single-process reference (plain torch AdamW), or under a launcher with --stage for
DeepSpeed; every process trains on its own half of each global batch, so the two agree up to rounding.
Rank 0 writes the run's result (losses, reset history, final fp32 adapter weights) to --out.
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TwoLayerNet, regression_batches  # noqa: E402

import beamlora_ds  # noqa: E402
from beamlora_ds import BeamLoRAConfig, optimizer_param_groups  # noqa: E402

GLOBAL_BATCH = 16


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=-1, help="-1: single process plain torch; 0-3: DeepSpeed ZeRO stage")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--interval", type=int, default=8)
    p.add_argument("--importance", default="score")
    p.add_argument("--optimizer_state", default="inherit")
    p.add_argument("--stop_at", type=int, default=0, help="save a checkpoint after this step and exit")
    p.add_argument("--resume_from", default="")
    p.add_argument("--ckpt_dir", default="")
    p.add_argument("--persist", action="store_true", help="keep adapters resident (the shipped ZeRO-3 setting)")
    p.add_argument("--check", action="store_true", help="check_consistency=True on a healthy run")
    p.add_argument("--plant_desync", action="store_true", help="rank 1 changes its seed before the first reset")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args()


def build(args):
    torch.manual_seed(0)
    model = TwoLayerNet()
    cfg = BeamLoRAConfig(r=8, alpha=16.0, dropout=0.0, tau=0.05, interval=args.interval, total_steps=args.steps,
                         p0=0.6, seed=0, importance=args.importance, optimizer_state=args.optimizer_state,
                         check_consistency=args.plant_desync or args.check)
    beam = beamlora_ds.apply(model, cfg)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.01), lr=2e-2)
    return model, beam, optimizer


def ds_config(args, beam):
    threshold = beamlora_ds.persistence_threshold_for(beam.modules) if args.persist else 0
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // int(os.environ.get("WORLD_SIZE", "1")),
            "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 by default; the reference does not clip
            "bf16": {"enabled": args.dtype == "bf16"},
            "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": threshold},
            "wall_clock_breakdown": False}


def adapter_weights(beam, stage):
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, m in zip(beam.module_names, beam.modules):
        for key in ("lora_A", "lora_B", "lora_score"):
            p = getattr(m, key)
            full = safe_get_full_fp32_param(p) if stage > 0 else p.detach()
            out[f"{name}.{key}"] = full.float().cpu().clone()
    return out


def main():
    args = parse()
    batches = regression_batches(args.steps, seed=3, batch=GLOBAL_BATCH)
    model, beam, optimizer = build(args)
    losses, rank, world = [], 0, 1
    if args.stage < 0:
        for x, y in batches:
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            beam.step(optimizer)
            losses.append(loss.item())
        weights = adapter_weights(beam, -1)
    else:
        import deepspeed
        import deepspeed.comm as dist

        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=90))
        rank, world = dist.get_rank(), dist.get_world_size()
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(args, beam))
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        start = 0
        if args.resume_from:
            beamlora_ds.load_checkpoint(engine, beam, args.resume_from)
            start = beam.global_step
        per_rank = GLOBAL_BATCH // world
        for step, (x, y) in enumerate(batches[start:], start=start + 1):
            xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
            out = engine(xs.to(dtype))
            loss = torch.nn.functional.mse_loss(out.float(), ys)
            engine.backward(loss)
            engine.step()
            if args.plant_desync and rank == 1 and step == args.interval:
                beam.config.seed += 1  # a silent desync: this process alone would draw other pairings
            try:
                beam.step(engine)
            except (RuntimeError, ValueError) as e:  # refusals and detected desyncs: report, exit non-zero
                if rank == 0:
                    with open(args.out, "w") as f:
                        json.dump({"error": str(e)}, f)
                raise SystemExit(3)
            losses.append(loss.item())  # this rank's half; the mean over ranks is compared
            if args.stop_at and step == args.stop_at:
                beamlora_ds.save_checkpoint(engine, beam, args.ckpt_dir)
                break
        weights = adapter_weights(beam, args.stage)
        loss_t = torch.tensor(losses)
        dist.all_reduce(loss_t)
        losses = (loss_t / world).tolist()
    if rank == 0:
        history = [{"step": r["step"], "pruned": sorted(map(list, r["pruned"])),
                    "sources": sorted(map(list, r["sources"]))} for r in beam.history]
        comm = [r.get("all_reduce_bytes", 0) for r in beam.history]
        torch.save({"losses": losses, "history": history, "weights": weights, "global_step": beam.global_step,
                    "world": world, "all_reduce_bytes": comm}, args.out)


if __name__ == "__main__":
    main()
