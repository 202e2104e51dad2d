"""What the BeamLoRA score path costs by itself, without DeepSpeed: the `h * r * softmax(score / tau)` of
BeamLoRALinear.forward and its backward, for many small modules, against the same adapters without it.

    python3 benchmarks/score_path.py            # SmolLM2-135M-like: 210 modules, r = 8, 256 tokens (~1 min)
    python3 benchmarks/score_path.py --quick    # CI smoke test (seconds)

Why: benchmarks/overhead.py shows BeamLoRA's ZeRO-2 step above LoRA's; this separates the autograd cost of the
score itself from DeepSpeed's per-parameter costs. Variants, timed round-robin on one thread (forward + backward
of a chain of N adapters, each x -> B (w * (A x))):
  none     LoRA: no score
  plain    the score path exactly as beamlora_ds.method.layer computes it (w = rank_weights(score, tau))
  fused    the same maths as one torch.autograd.Function (a candidate optimisation; its gradients are checked
           equal to plain's before timing)
  table    the model-level score path beamlora_ds.apply() installs: one (modules x r) ScoreTable, all rows computed
           once per forward, each module multiplying by its row (gradients checked equal to plain's)

Each variant is timed in a process of its own (--rounds rounds, the order rotated each round, the same seeded
tensors in every process): timed in one process, a variant's matrix multiplies ran up to 40% slower or faster
depending on which variant ran before it (allocator state), which swamped the score path's few milliseconds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from beamlora_ds.method.layer import rank_weights  # noqa: E402
from beamlora_ds.method.score_table import ScoreTable  # noqa: E402


class FusedRankScale(torch.autograd.Function):
    """h * r * softmax(score / tau) with a hand-written backward: one autograd node instead of four."""

    @staticmethod
    def forward(ctx, h, score, tau):
        p = torch.softmax(score.float() / tau, dim=-1)
        ctx.save_for_backward(h, p)
        ctx.tau = tau
        return h * (score.shape[-1] * p).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, p = ctx.saved_tensors
        r = p.shape[-1]
        grad_h = g * (r * p).to(g.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_p = r * (g * h).reshape(-1, r).sum(0).float()
            grad_s = p * (grad_p - (grad_p * p).sum()) / ctx.tau
        return grad_h, grad_s, None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few modules and repeats: the CI smoke test")
    p.add_argument("--modules", type=int, default=210, help="SmolLM2-135M: 30 layers x 7 projections")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--tokens", type=int, default=256, help="micro-batch x sequence length")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this thread's CPU time (less hit by other processes on a busy machine)")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant (the order rotated each round)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: time one variant, print JSON times
    p.add_argument("--json", default=None, help="default benchmarks/results/score_path.json (quick: score_path_quick.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.modules, args.repeats, args.warmup, args.rounds = 14, 4, 1, 1
    if args.json is None:
        args.json = os.path.join(ROOT, "benchmarks", "results", "score_path_quick.json" if args.quick else "score_path.json")
    return args


def build(args):
    torch.manual_seed(0)
    n, r, d = args.modules, args.r, args.hidden
    return {"x": [torch.randn(args.tokens, d) for _ in range(8)],
            "A": [torch.randn(r, d, requires_grad=True) for _ in range(n)],
            "B": [torch.randn(d, r, requires_grad=True) for _ in range(n)],
            "score": [torch.randn(r, requires_grad=True) for _ in range(n)],
            "table": ScoreTable(n, r, args.tau)}


def step(t, variant: str, tau: float) -> list:
    """Forward + backward of every adapter; returns the gradients and clears them."""
    total, table = 0, t["table"]
    for i, (a, b, s) in enumerate(zip(t["A"], t["B"], t["score"])):
        h = F.linear(t["x"][i % len(t["x"])], a)
        if variant == "plain":
            h = h * rank_weights(s, tau).to(h.dtype)
        elif variant == "fused":
            h = FusedRankScale.apply(h, s, tau)
        elif variant == "table":
            h = h * table.row(i).to(h.dtype)
        total = total + F.linear(h, b).sum()
    total.backward()
    params = t["A"] + t["B"] + t["score"] + [table.lora_score]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def ops_per_step(tensors, variant: str, tau: float) -> int:
    """aten operator calls of one forward + backward (torch.profiler), a count that machine noise cannot move."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(tensors, variant, tau)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def time_variant(args, tensors) -> list:
    """--only: this process times one variant (after its warm-up) and returns the step times."""
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    times = []
    for rep in range(args.warmup + args.repeats):
        tick = clock()
        step(tensors, args.only, args.tau)
        if rep >= args.warmup:
            times.append(clock() - tick)
    return times


def time_in_own_process(argv, variant: str) -> list:
    argv = list(sys.argv[1:] if argv is None else argv)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--only", variant],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(1)
    tensors = build(args)
    with torch.no_grad():
        tensors["table"].lora_score.copy_(torch.stack(tensors["score"]))
    if args.only:
        print(json.dumps(time_variant(args, tensors)))
        return
    plain, fused = step(tensors, "plain", args.tau), step(tensors, "fused", args.tau)
    max_diff = max((a - b).abs().max().item() for a, b in zip(plain, fused) if a is not None)
    table = step(tensors, "table", args.tau)
    n = args.modules
    table_diff = max([(a - b).abs().max().item() for a, b in zip(plain[:2 * n], table[:2 * n])]
                     + [(torch.stack(plain[2 * n:3 * n]) - table[-1]).abs().max().item()])
    if max_diff > 1e-5 or table_diff > 1e-5:
        raise SystemExit(f"the fused / table score paths' gradients differ from the plain one's by {max_diff} / "
                         f"{table_diff}")
    variants = ("none", "plain", "fused", "table")
    ops = {v: ops_per_step(tensors, v, args.tau) for v in variants}
    times = {v: [] for v in variants}
    for round_ in range(args.rounds):
        k = round_ % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate the order so drift hits all alike
            times[v] += time_in_own_process(argv, v)
    median = {v: statistics.median(ts) for v, ts in times.items()}
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "torch": torch.__version__,
              "threads": 1, "fused_vs_plain_max_grad_diff": max_diff, "table_vs_plain_max_grad_diff": table_diff,
              "clock": args.clock, "aten_ops_per_step": ops,
              "median_s": median, "score_path_extra_s": {v: median[v] - median["none"] for v in variants[1:]},
              "times_s": times}
    print(f"{args.modules} modules, r={args.r}, hidden {args.hidden}, {args.tokens} tokens, 1 thread, "
          f"{args.rounds} processes x {args.repeats} timed repeats per variant (median)")
    print(f"{'variant':<8}{'fwd+bwd ms':>12}{'vs none ms':>12}{'per module us':>15}{'aten ops':>10}")
    for v in variants:
        extra = median[v] - median["none"]
        print(f"{v:<8}{1e3 * median[v]:>12.1f}{1e3 * extra:>+12.1f}{1e6 * extra / args.modules:>+15.0f}"
              f"{ops[v]:>10}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
