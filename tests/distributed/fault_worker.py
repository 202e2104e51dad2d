"""One DeepSpeed process training the small regression net with BeamLoRA while bad steps happen.

--dtype fp16: dynamic loss scaling starts far too high (every early step overflows) and a NaN loss is injected at
some steps: DeepSpeed skips those updates, and BeamLoRA must not count them. --dtype fp32: a NaN loss goes
through (nothing skips it); the next reset must be skipped and training must go on. Writes a JSON of what
happened at every step to --out.
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["fp16", "fp32"], required=True)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--nan_at", type=int, nargs="*", default=[], help="engine steps whose loss is made NaN")
    p.add_argument("--initial_scale_power", type=int, default=16)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = TwoLayerNet()
    beam = beamlora_ds.apply(model, BeamLoRAConfig(r=8, alpha=16.0, interval=4, total_steps=args.steps, p0=0.5,
                                                   seed=0))
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True}
    if args.dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": args.initial_scale_power, "loss_scale_window": 2,
                          "hysteresis": 1, "min_loss_scale": 1}
    groups = optimizer_param_groups(model, 0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2),
                                      model_parameters=groups, config=config)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    steps, batches, t = [], regression_batches(args.steps * 3, seed=3), 0
    while beam.global_step < args.steps and t < len(batches):
        x, y = batches[t]
        t += 1
        out = engine(x.to(dtype))
        loss = torch.nn.functional.mse_loss(out.float(), y)
        if t in args.nan_at:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        record = beam.step(engine, loss=loss.item())
        steps.append({"engine_step": t, "loss": loss.item() if math.isfinite(loss.item()) else str(loss.item()),
                      "applied": engine.was_step_applied(), "beam_step": beam.global_step,
                      "skipped_steps": engine.skipped_steps, "global_steps": engine.global_steps,
                      "reset": record})
    final_finite = all(bool(torch.isfinite(p).all()) for m in beam.modules for p in (m.lora_A, m.lora_B))
    with open(args.out, "w") as f:
        json.dump({"steps": steps, "history": beam.history, "beam_step": beam.global_step,
                   "adapters_finite": final_finite}, f, default=str)


if __name__ == "__main__":
    main()
