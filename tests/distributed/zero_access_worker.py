"""Training runs of the small regression net with BeamLoRA: the single-process plain-torch reference (called
in-process by the test) and, under `deepspeed`, any number of ZeRO runs in one launch, one engine after another in
the same processes (a launch costs far more than one of these runs).

    deepspeed --num_gpus 2 tests/distributed/zero_access_worker.py --runs runs.json --out results.pt

runs.json maps a label to the options of one run (RUN_DEFAULTS). Every process trains on its own share of each
global batch, so the ZeRO runs agree with the reference up to rounding. Rank 0 writes {label: result} to --out: the
losses, reset history, final fp32 adapter weights, all-reduce bytes and BeamLoRA's log messages of that run, or
{"error": message} for a run BeamLoRA refused (the launch goes on with the next run).
"""
import argparse
import datetime
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TwoLayerNet, regression_batches  # noqa: E402

import beamlora_ds  # noqa: E402
from beamlora_ds import BeamLoRAConfig, optimizer_param_groups  # noqa: E402

GLOBAL_BATCH = 16
RUN_DEFAULTS = {"stage": -1, "dtype": "fp32", "steps": 24, "interval": 8, "importance": "score",
                "optimizer_state": "inherit", "stop_at": 0, "resume_from": "", "ckpt_dir": "",
                "persist": False,  # adapters resident under ZeRO-3 (the shipped setting)
                "check": False,  # check_consistency=True on a healthy run
                "plant_desync": False}  # rank 1 changes its seed before the first reset


def build(run: dict):
    torch.manual_seed(0)
    model = TwoLayerNet()
    cfg = BeamLoRAConfig(r=8, alpha=16.0, dropout=0.0, tau=0.05, interval=run["interval"], total_steps=run["steps"],
                         p0=0.6, seed=0, importance=run["importance"], optimizer_state=run["optimizer_state"],
                         check_consistency=run["plant_desync"] or run["check"])
    beam = beamlora_ds.apply(model, cfg)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.01), lr=2e-2)
    return model, beam, optimizer


def summary(beam, losses, weights, world) -> dict:
    history = [{"step": r["step"], "pruned": sorted(map(list, r["pruned"])), "sources": sorted(map(list, r["sources"]))}
               for r in beam.history]
    return {"losses": losses, "history": history, "weights": weights, "global_step": beam.global_step,
            "world": world, "all_reduce_bytes": [r.get("all_reduce_bytes", 0) for r in beam.history]}


def train_reference(**options) -> dict:
    """The single-process run with plain torch AdamW: the oracle of the ZeRO runs."""
    run = {**RUN_DEFAULTS, **options}
    model, beam, optimizer = build(run)
    losses = []
    for x, y in regression_batches(run["steps"], seed=3, batch=GLOBAL_BATCH):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        beam.step(optimizer)
        losses.append(loss.item())
    weights = {f"{name}.{key}": getattr(m, key).detach().float().clone()
               for name, m in zip(beam.module_names, beam.modules) for key in ("lora_A", "lora_B", "lora_score")}
    return summary(beam, losses, weights, 1)


def ds_config(run: dict, beam, world: int) -> dict:
    threshold = beamlora_ds.persistence_threshold_for(beam.modules) if run["persist"] else 0
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 by default; the reference does not clip
            "bf16": {"enabled": run["dtype"] == "bf16"},
            "zero_optimization": {"stage": run["stage"], "stage3_param_persistence_threshold": threshold},
            "wall_clock_breakdown": False}


def train_zero(run: dict, dist) -> dict:
    """One run on a fresh engine; raises what BeamLoRA raises (a refusal, a detected desync) on every process."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    rank, world = dist.get_rank(), dist.get_world_size()
    model, beam, optimizer = build(run)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(run, beam, world))
    dtype = torch.bfloat16 if run["dtype"] == "bf16" else torch.float32
    start = 0
    if run["resume_from"]:
        beamlora_ds.load_checkpoint(engine, beam, run["resume_from"])
        start = beam.global_step
    per_rank, losses = GLOBAL_BATCH // world, []
    for step, (x, y) in enumerate(regression_batches(run["steps"], seed=3, batch=GLOBAL_BATCH)[start:], start + 1):
        out = engine(x[rank * per_rank:(rank + 1) * per_rank].to(dtype))
        loss = torch.nn.functional.mse_loss(out.float(), y[rank * per_rank:(rank + 1) * per_rank])
        engine.backward(loss)
        engine.step()
        if run["plant_desync"] and rank == 1 and step == run["interval"]:
            beam.config.seed += 1  # a silent desync: this process alone would draw other pairings
        beam.step(engine)
        losses.append(loss.item())  # this rank's share; the mean over ranks is compared
        if run["stop_at"] and step == run["stop_at"]:
            beamlora_ds.save_checkpoint(engine, beam, run["ckpt_dir"])
            break
    weights = {}
    for name, m in zip(beam.module_names, beam.modules):
        for key in ("lora_A", "lora_B", "lora_score"):
            p = m.score_parameter if key == "lora_score" else getattr(m, key)  # the scores: one (modules x r) table
            full = safe_get_full_fp32_param(p) if run["stage"] > 0 else p.detach()  # stage 0: whole, no master
            if key == "lora_score" and m.score_row is not None:
                full = full[m.score_row]
            weights[f"{name}.{key}"] = full.float().cpu().clone()
    mean_losses = torch.tensor(losses)
    dist.all_reduce(mean_losses)
    return summary(beam, (mean_losses / world).tolist(), weights, world)


class Messages(logging.Handler):
    """BeamLoRA's log messages of one run (its warnings are part of what the tests check)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True, help="JSON file: {label: {option: value}}")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=90))
    with open(args.runs) as f:
        runs = json.load(f)
    results, logger = {}, logging.getLogger("beamlora_ds")
    for label, options in runs.items():
        messages = Messages()
        logger.addHandler(messages)
        try:
            results[label] = train_zero({**RUN_DEFAULTS, **options}, dist)
        except (RuntimeError, ValueError) as e:  # refusals and detected desyncs: recorded, the next run goes on
            results[label] = {"error": str(e)}
        finally:
            logger.removeHandler(messages)
        results[label]["log"] = "\n".join(messages.lines)
    if dist.get_rank() == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
