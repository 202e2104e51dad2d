"""One DeepSpeed process training the small regression net with BeamLoRA while bad steps happen, for each run of
--runs in turn (one engine after another: the process start costs more than a run).

dtype fp16: dynamic loss scaling starts far too high (every early step overflows) and a NaN loss is injected at
some steps: DeepSpeed skips those updates, and BeamLoRA must not count them. dtype fp32: a NaN loss goes
through (nothing skips it, stage 0), or ZeRO-3 skips it; where it goes through, the next reset must be skipped and
training must go on. Writes {label: what happened at every step} as JSON to --out.
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TwoLayerNet, regression_batches  # noqa: E402

import beamlora_ds  # noqa: E402
from beamlora_ds import BeamLoRAConfig, optimizer_param_groups  # noqa: E402


RUN_DEFAULTS = {"dtype": "fp32", "steps": 24, "nan_at": [], "initial_scale_power": 16, "stage": 2}


def train(run: dict) -> dict:
    """One run on a fresh engine; `nan_at` lists the engine steps whose loss is made NaN."""
    import deepspeed

    torch.manual_seed(0)
    model = TwoLayerNet()
    beam = beamlora_ds.apply(model, BeamLoRAConfig(r=8, alpha=16.0, interval=4, total_steps=run["steps"], p0=0.5,
                                                   seed=0))
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": run["stage"]}, "zero_allow_untested_optimizer": True}
    if run["dtype"] == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": run["initial_scale_power"], "loss_scale_window": 2,
                          "hysteresis": 1, "min_loss_scale": 1}
    groups = optimizer_param_groups(model, 0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2),
                                      model_parameters=groups, config=config)
    dtype = torch.float16 if run["dtype"] == "fp16" else torch.float32
    steps, batches, t = [], regression_batches(run["steps"] * 3, seed=3), 0
    while beam.global_step < run["steps"] and t < len(batches):
        x, y = batches[t]
        t += 1
        out = engine(x.to(dtype))
        loss = torch.nn.functional.mse_loss(out.float(), y)
        if t in run["nan_at"]:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        record = beam.step(engine, loss=loss.item())
        steps.append({"engine_step": t, "loss": loss.item() if math.isfinite(loss.item()) else str(loss.item()),
                      "applied": engine.was_step_applied(), "beam_step": beam.global_step,
                      "skipped_steps": engine.skipped_steps, "global_steps": engine.global_steps,
                      "reset": record})
    final_finite = all(bool(torch.isfinite(p).all()) for m in beam.modules for p in (m.lora_A, m.lora_B))
    return {"steps": steps, "history": beam.history, "beam_step": beam.global_step, "adapters_finite": final_finite}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True, help="JSON file: {label: {option: value}} (options: RUN_DEFAULTS)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    with open(args.runs) as f:
        runs = json.load(f)
    results = {label: train({**RUN_DEFAULTS, **options}) for label, options in runs.items()}
    with open(args.out, "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main()
