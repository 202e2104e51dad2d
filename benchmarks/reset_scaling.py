"""How one BeamLoRA reset's cost and communication grow with modules, rank and processes, and what that means at 70B.

    python benchmarks/reset_scaling.py [--quick] [--json benchmarks/results/reset_scaling.json]

For each number of processes W (1 and 2; 4 too in the full form) this script launches
`deepspeed --num_gpus W benchmarks/reset_cost.py --points ...` once (ZeRO-3, bf16, p0 = 0.5 so resets prune a lot;
3 resets per configuration: many ranks, a few, none) and collects every reset of every configuration
(layers x 7 projections, rank r, hidden size); each configuration runs twice per launch, interleaved, and the
faster of each reset's two times is kept (a shared machine only ever adds time). It then checks the derived
communication counts, fits a cost model to the measured times, and extrapolates it to Llama-2-70B on 64 GPUs.
--from_json refits and extrapolates an earlier run's measurements (other interconnect or step assumptions).

Communication of one reset (beamlora_ds/backends/deepspeed/zero_access.py, default settings: score importance,
optimizer_state "inherit" with AdamW, check_consistency off), per process, whatever the world size W:
    collectives  C = 1 + [P > 0]      (the N x r score logits; then, if any rank was pruned, the source rows/columns)
    bytes        B = 4 * (N*r + K * S),   K = 3 (fp32 master, exp_avg, exp_avg_sq), S = sum over the P pruned ranks
                                          of (d_in + d_out) of their module
Both buffers are full-length on every process (each fills the slices it owns, the rest are zeros), so B does not
shrink with W. A ring all-reduce moves 2 (W-1)/W x B bytes in and out of each process. With importance="norm"
the score read is 3 N r floats and is done twice (C = 2 + [P > 0], B = 4 (6 N r + K S)); optimizer_state="keep"
has K = 1; check_consistency adds one 16-byte all-reduce. A snapshot is one 16-byte all-reduce.

Cost model of one reset, per process (each term one kind of work in backends/deepspeed/zero_access.py /
method/controller.py):
    t = a*C + b*ring(W)*B + n*N + m*M + e*K*S + g*K*S/W + f*K*A/W
      a: latency per collective;  b: seconds per byte on the wire;  ring(W) = 2 (W-1) / W
      N: modules (the fragment bookkeeping, score reads and score-moment zeroing visit every module)
      M: modules touched by the reset (per-module planning and writes)
      K*S: the full-length gather buffer (zero-filled, all-reduced, sliced) and, where the working copy is whole on
           every process, its writes: copying at memory speed, on every process, so not / W
      K*S/W: gathering and writing this process's part of the moved rows and columns: interval arithmetic on its
           fragment (beamlora_ds/backends/flat_runs.py), so only what it holds (before: full-length position masks)
      K*A/W: A = r * (d_in + d_out) summed over touched modules; ZeRO-3 writes clone each process's partition
The constants are fitted (non-negative least squares, relative error) on the measured resets with W <= CPU cores.
For the extrapolation, a and b are replaced by the stated interconnect, plus the host<->GPU copies of both
buffers (ZeroAccess builds them on the host: 2 B over PCIe); n, m, e, f stay this CPU's (the host does the
index work in the real run too), so the compute part is a CPU-bound, pessimistic estimate.

Times with W > the number of CPU cores (4 processes on a 2-core machine) are oversubscribed: only their bytes and
collective counts mean anything, and they are left out of the fit. /dev/shm buffers of these launches are removed.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from beamlora_ds import testing  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
K_INHERIT = 3  # fp32 master + AdamW's exp_avg and exp_avg_sq
LLAMA2_70B = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "layers": 80, "vocab": 32000}
FEATURES = ("collectives", "ring_bytes", "modules", "modules_touched", "elements", "local_elements",
            "partition_elements")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 tiny configurations, 1 and 2 processes: under 2 minutes")
    p.add_argument("--worlds", default=None, help="comma-separated process counts (default 1,2,4; quick 1,2)")
    p.add_argument("--json", default="benchmarks/results/reset_scaling.json")
    p.add_argument("--from_json", default=None, help="refit and extrapolate the measured resets of an earlier run's "
                   "JSON (other interconnect or step assumptions) instead of launching")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each configuration per launch, interleaved; the fastest is kept (default 2, quick 1)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per launch")
    p.add_argument("--gpus", type=int, default=64, help="extrapolation: number of GPUs")
    p.add_argument("--rank", type=int, default=64, help="extrapolation: LoRA rank")
    p.add_argument("--link_gbps", type=float, default=100.0, help="extrapolation: GB/s per GPU on the all-reduce ring")
    p.add_argument("--latency_us", type=float, default=20.0, help="extrapolation: latency per all-reduce")
    p.add_argument("--pcie_gbps", type=float, default=25.0, help="extrapolation: host<->GPU copy GB/s")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="extrapolation: bf16 dense peak per GPU")
    p.add_argument("--mfu", type=float, default=0.4, help="extrapolation: achieved fraction of the peak")
    p.add_argument("--tokens_per_gpu", type=int, default=2048, help="extrapolation: tokens per GPU per step "
                   "(micro-batch 4 x 512, the paper's length)")
    p.add_argument("--interval", type=int, default=3000, help="extrapolation: reset interval T (paper)")
    p.add_argument("--total_steps", type=int, default=37032, help="extrapolation: run length (paper)")
    p.add_argument("--p0", type=float, default=0.95, help="extrapolation: initial keep-fraction (paper)")
    args = p.parse_args(argv)
    args.worlds = [int(w) for w in (args.worlds or ("1,2" if args.quick else "1,2,4")).split(",")]
    args.repeats = args.repeats or (1 if args.quick else 2)
    return args


# ------------------------------------------------------------------------------------------------ formulas
def module_sizes(hidden, intermediate, heads, kv_heads):
    """(d_in, d_out) of the seven projections of one Llama decoder layer."""
    kv = kv_heads * (hidden // heads)
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}


def reset_collectives(pruned: int) -> int:
    """All-reduces of one reset with the default settings: the score logits, then the sources if any were pruned."""
    return 1 + (pruned > 0)


def reset_bytes(modules: int, r: int, sum_din_dout: int, keys: int = K_INHERIT) -> int:
    """Bytes each process all-reduces in one reset: N*r fp32 logits + K fp32 values per pruned (d_in + d_out)."""
    return 4 * (modules * r + keys * sum_din_dout)


def ring(world: int) -> float:
    """Bytes a ring all-reduce moves in and out of each process, per byte of the buffer."""
    return 2 * (world - 1) / world


def features(row: dict) -> list:
    return [row["collectives"], ring(row["world"]) * row["bytes"], row["modules"], row["modules_touched"],
            K_INHERIT * row["pruned_din_plus_dout"], K_INHERIT * row["pruned_din_plus_dout"] / row["world"],
            K_INHERIT * row["touched_adapter_elements"] / row["world"]]


# -------------------------------------------------------------------------------------------------- launches
def sweep_points(quick: bool, world: int):
    """LAYERSxRANKxHIDDEN configurations: layers (modules), rank and hidden size each varied around 2x16x256, and
    two with few modules but wide layers, where the per-element work dominates (it does at 70B)."""
    if quick:
        return ["1x4x64", "2x8x128"]
    if world > (os.cpu_count() or 1):
        return ["1x16x256", "2x64x256"]
    layers = [f"{n}x16x256" for n in (1, 2, 4, 8)]
    ranks = [f"2x{r}x256" for r in (4, 32, 64)]
    hidden = [f"2x16x{h}" for h in (128, 512, 1024)]
    wide = ["1x32x2048", "1x32x4096"]
    return layers + ranks + hidden + wide


def launch(world: int, points, timeout: int) -> list:
    """One `deepspeed --num_gpus W reset_cost.py --points ...` (beamlora_ds.testing: timeout, one retry of a
    native start-up abort, /dev/shm clean-up); the measured points."""
    return testing.launch_for_json(
        os.path.join(ROOT, "benchmarks", "reset_cost.py"),
        ["--points", ",".join(points), "--seq", "16", "--micro_batch", "1", "--interval", "4", "--intervals", "3",
         "--p0", "0.5"], "--json", nproc=world, timeout=timeout)["points"]


def fastest(rows: list) -> list:
    """One row per (configuration, reset) with the fastest of its repeats: a shared 2-core machine only ever adds time.
    Repeats of a configuration make the same reset decisions (same seeds), so they share every count."""
    kept = {}
    for row in rows:
        key = tuple(row[k] for k in ("world", "layers", "r", "hidden", "reset", "pruned", "pruned_din_plus_dout"))
        if key in kept:
            kept[key]["repeats_s"].append(row["seconds"])
            kept[key]["seconds"] = min(kept[key]["repeats_s"])
        else:
            kept[key] = dict(row, repeats_s=[row["seconds"]])
    return list(kept.values())


def rows_of(point: dict, oversubscribed: bool) -> list:
    rows = []
    for i, t in enumerate(point["reset_s"]):
        rows.append({"world": point["world"], "layers": point["layers"], "modules": point["modules"],
                     "r": point["r"], "hidden": point["hidden"], "intermediate": point["intermediate"],
                     "adapter_elements": point["adapter_elements"], "reset": i + 1,
                     "pruned": point["ranks_pruned"][i], "modules_touched": point["modules_touched"][i],
                     "pruned_din_plus_dout": point["reset_pruned_din_plus_dout"][i],
                     "touched_adapter_elements": point["reset_touched_adapter_elements"][i],
                     "bytes": point["reset_all_reduce_bytes"][i], "bytes_logged": point["reset_logged_bytes"][i],
                     "bytes_formula": reset_bytes(point["modules"], point["r"],
                                                  point["reset_pruned_din_plus_dout"][i]),
                     "collectives": point["reset_collectives"][i],
                     "collectives_formula": reset_collectives(point["ranks_pruned"][i]),
                     "seconds": t, "step_s": point["median_step_s"], "oversubscribed": oversubscribed})
    return rows


# ------------------------------------------------------------------------------------------------------- fit
def fit(rows: list) -> dict:
    """Non-negative least squares on relative error: each row is divided by its measured time."""
    import numpy as np

    X = np.array([features(r) for r in rows], dtype=float)
    y = np.array([r["seconds"] for r in rows], dtype=float)
    scale = X.max(axis=0)
    scale[scale == 0] = 1.0
    A, b = (X / scale) / y[:, None], np.ones_like(y)
    coef = nnls(A, b) / scale
    predicted = X @ coef
    rel = (predicted - y) / y
    return {"constants": dict(zip(FEATURES, coef.tolist())), "points": len(rows),
            "median_abs_rel_error": float(np.median(np.abs(rel))), "max_abs_rel_error": float(np.max(np.abs(rel))),
            "predicted_s": predicted.tolist()}


def nnls(A, b, iterations: int = 200):
    """Non-negative least squares (Lawson-Hanson active set), in numpy: scipy is not a dependency, and clipping a
    plain least-squares solution is wrong when features are nearly collinear (the K*S and K*S/W terms at W = 1)."""
    import numpy as np

    x, passive = np.zeros(A.shape[1]), np.zeros(A.shape[1], dtype=bool)
    for _ in range(iterations):
        gradient = A.T @ (b - A @ x)
        if passive.all() or gradient[~passive].max(initial=0.0) <= 1e-12:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            z = np.zeros_like(x)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            blocked = passive & (z <= 0)
            step = np.min(x[blocked] / (x[blocked] - z[blocked]))
            x = x + step * (z - x)
            passive &= x > 1e-15
    return x


# --------------------------------------------------------------------------------------------- extrapolation
def llama_shapes(cfg: dict, r: int) -> dict:
    sizes = module_sizes(cfg["hidden"], cfg["intermediate"], cfg["heads"], cfg["kv_heads"])
    per_layer = sum(i + o for i, o in sizes.values())
    linear = cfg["layers"] * sum(i * o for i, o in sizes.values())
    return {"modules": cfg["layers"] * len(sizes), "adapter_elements": cfg["layers"] * r * per_layer,
            "mean_din_plus_dout": per_layer / len(sizes), "max_din_plus_dout": max(i + o for i, o in sizes.values()),
            "parameters": linear + 2 * cfg["vocab"] * cfg["hidden"] + (2 * cfg["layers"] + 1) * cfg["hidden"]}


def extrapolate(args, constants: dict) -> dict:
    from beamlora_ds.method import algorithm

    shapes = llama_shapes(LLAMA2_70B, args.rank)
    N, r, W = shapes["modules"], args.rank, args.gpus
    keep = algorithm.keep_fraction(args.interval, args.p0, max(1, 2 * args.total_steps // 3))
    first = round((1 - keep) * N * r)
    scenarios = {"first reset (paper schedule, importance spread evenly)": first,
                 "every rank but one per module (most select_pruned allows)": N * (r - 1),
                 "every rank (the formula's bound)": N * r}
    link, latency, pcie = args.link_gbps * 1e9, args.latency_us * 1e-6, args.pcie_gbps * 1e9
    tokens = args.tokens_per_gpu * W
    step_6n = 6 * shapes["parameters"] * tokens / (W * args.peak_tflops * 1e12 * args.mfu)
    step_4n = 4 * shapes["parameters"] * tokens / (W * args.peak_tflops * 1e12 * args.mfu)
    out = {"model": "Llama-2-70B", **LLAMA2_70B, "r": r, "gpus": W, **shapes, "keep_fraction_first_reset": keep,
           "assumptions": {"link_GB_s": args.link_gbps, "latency_us": args.latency_us, "pcie_GB_s": args.pcie_gbps,
                           "peak_tflops": args.peak_tflops, "mfu": args.mfu, "tokens_per_gpu": args.tokens_per_gpu,
                           "interval": args.interval,
                           "compute constants": "fitted on this CPU (host-side index work; pessimistic)"},
           "step_s_6N": step_6n, "step_s_4N": step_4n, "scenarios": {}, "worlds": {}}

    def one(pruned, world):
        S = pruned * shapes["mean_din_plus_dout"]
        A = shapes["adapter_elements"]  # 5% of 64 ranks is ~3 per module: every module is touched
        C, B = reset_collectives(pruned), reset_bytes(N, r, S)
        comm = C * latency + ring(world) * B / link
        staging = 2 * B / pcie
        compute = (constants["modules"] * N + constants["modules_touched"] * N + constants["elements"] * K_INHERIT * S
                   + constants.get("local_elements", 0.0) * K_INHERIT * S / world
                   + constants["partition_elements"] * K_INHERIT * A / world)
        total = comm + staging + compute
        return {"pruned_ranks": pruned, "collectives": C, "bytes": B, "comm_s": comm, "staging_s": staging,
                "compute_s": compute, "reset_s": total, "x_step_4N": total / step_4n, "x_step_6N": total / step_6n,
                "amortized_per_step": total / (args.interval * step_4n)}

    for name, pruned in scenarios.items():
        out["scenarios"][name] = one(pruned, W)
    for world in (8, 16, 32, 64, 128, 256):
        out["worlds"][world] = one(first, world)
    return out


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse(argv)
    tick = time.perf_counter()
    cores = os.cpu_count() or 1
    rows, launches = [], {}
    if args.from_json:
        with open(args.from_json) as f:
            earlier = json.load(f)
        launches, args.worlds = earlier["launches"], sorted({r["world"] for r in earlier["rows"]})
        rows = [{k: v for k, v in r.items() if k != "model_s"} for r in earlier["rows"]]
    for world in [] if args.from_json else args.worlds:
        points = sweep_points(args.quick, world)
        t0 = time.perf_counter()
        print(f"W={world}: deepspeed --num_gpus {world} reset_cost.py --points {','.join(points)}"
              f"{f' (x{args.repeats}, interleaved)' if args.repeats > 1 and world <= cores else ''}", flush=True)
        runs = 1 if world > cores else args.repeats
        results = launch(world, points * runs, args.timeout)
        launches[world] = {"points": points, "repeats": runs, "seconds": time.perf_counter() - t0}
        rows += fastest([row for point in results for row in rows_of(point, oversubscribed=world > cores)])
    for row in rows:  # the closed-form shapes must match the real model's, or the 70B numbers mean nothing
        sizes = module_sizes(row["hidden"], row["intermediate"], 8, 4)
        row["adapter_elements_formula"] = row["layers"] * row["r"] * sum(i + o for i, o in sizes.values())
    fitted_rows = [r for r in rows if not r["oversubscribed"]]
    model = fit(fitted_rows)
    for row, p in zip(fitted_rows, model.pop("predicted_s")):
        row["model_s"] = p
    checks = {"bytes_equal_formula": all(r["bytes"] == r["bytes_formula"] == r["bytes_logged"] for r in rows),
              "collectives_equal_formula": all(r["collectives"] == r["collectives_formula"] for r in rows),
              "adapter_elements_equal_formula": all(r["adapter_elements"] == r["adapter_elements_formula"]
                                                    for r in rows)}
    extra = extrapolate(args, model["constants"])

    print(f"\nBeamLoRA reset scaling (ZeRO-3, bf16, this machine: {cores} CPU cores; seconds are per reset)")
    head = (f"{'W':>2} {'layers':>6} {'N':>4} {'r':>3} {'hidden':>6} {'pruned':>6} {'touched':>7} {'C':>2} "
            f"{'bytes':>11} {'= formula':>9} {'seconds':>8} {'model':>8}")
    print(head)
    for r in rows:
        model_s = f"{r['model_s']:8.4f}" if "model_s" in r else "   (over)"
        print(f"{r['world']:>2} {r['layers']:>6} {r['modules']:>4} {r['r']:>3} {r['hidden']:>6} {r['pruned']:>6} "
              f"{r['modules_touched']:>7} {r['collectives']:>2} {r['bytes']:>11,} "
              f"{'yes' if r['bytes'] == r['bytes_formula'] == r['bytes_logged'] else 'NO':>9} {r['seconds']:8.4f} "
              f"{model_s}")
    if any(r["oversubscribed"] for r in rows):
        print(f"(over): {max(args.worlds)} processes on {cores} cores are oversubscribed: their bytes and collective "
              "counts are exact, their times are not meaningful and are not fitted.")
    print("\nCost model t = a*C + b*ring(W)*B + n*N + m*M + e*K*S + f*K*A/W, fitted on "
          f"{model['points']} resets (median |error| {model['median_abs_rel_error']:.0%}, "
          f"max {model['max_abs_rel_error']:.0%}):")
    units = {"collectives": "s per collective", "ring_bytes": "s per byte on the wire", "modules": "s per module",
             "modules_touched": "s per touched module", "elements": "s per element of the full buffer",
             "local_elements": "s per element gathered/written here (/W)",
             "partition_elements": "s per partition element (/W)"}
    for k, v in model["constants"].items():
        print(f"  {k:<20} {v:.3e} {units[k]}")
    print(f"\nExtrapolation: Llama-2-70B ({extra['parameters'] / 1e9:.1f}B parameters), {extra['modules']} modules, "
          f"r={extra['r']}, {extra['adapter_elements'] / 1e6:.0f}M adapter elements, {extra['gpus']} GPUs; "
          f"{args.link_gbps:g} GB/s per GPU ring, {args.latency_us:g} us per all-reduce, host<->GPU "
          f"{args.pcie_gbps:g} GB/s; step = 4N (6N) x {args.tokens_per_gpu} tokens/GPU at {args.mfu:.0%} of "
          f"{args.peak_tflops:g} TFLOP/s = {extra['step_s_4N']:.2f} s ({extra['step_s_6N']:.2f} s)")
    print(f"{'scenario':<58} {'pruned':>7} {'C':>2} {'bytes':>15} {'comm s':>8} {'PCIe s':>8} {'compute s':>9} "
          f"{'reset s':>8} {'x step 4N/6N':>13}")
    for name, s in extra["scenarios"].items():
        print(f"{name:<58} {s['pruned_ranks']:>7} {s['collectives']:>2} {s['bytes']:>15,.0f} {s['comm_s']:>8.3f} "
              f"{s['staging_s']:>8.3f} {s['compute_s']:>9.3f} {s['reset_s']:>8.3f} "
              f"{s['x_step_4N']:>7.2f}/{s['x_step_6N']:.2f}")
    print("first reset at other world sizes (bytes do not change with W):")
    for world, s in extra["worlds"].items():
        print(f"  W={world:<4} comm {s['comm_s']:.4f} s, compute {s['compute_s']:.3f} s, reset {s['reset_s']:.3f} s "
              f"= {s['x_step_4N']:.2f} steps (4N); once per {args.interval} steps: "
              f"{s['amortized_per_step']:.1e} of training")
    result = {"benchmark": "reset_scaling", "quick": args.quick, "cpu_cores": cores, "launches": launches,
              "rows": rows, "checks": checks, "model": model, "extrapolation": extra,
              "seconds": earlier["seconds"] if args.from_json else time.perf_counter() - tick}
    if args.from_json:
        result.update(quick=earlier["quick"], cpu_cores=earlier["cpu_cores"], refit_from=args.from_json)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    if not all(checks.values()):
        sys.exit(f"a count does not match its formula: {checks}")


if __name__ == "__main__":
    main()
