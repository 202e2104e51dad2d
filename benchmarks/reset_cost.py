"""What a BeamLoRA snapshot and reset cost under DeepSpeed, relative to an ordinary training step.

    deepspeed --num_gpus 2 benchmarks/reset_cost.py [--stage 3] [--quick] [--json out.json]
    deepspeed --num_gpus 2 benchmarks/reset_cost.py --points 1x8x128,2x16x256 --json out.json   # a sweep

A Llama built from a config (no download) with BeamLoRA on all seven projections trains for a few intervals;
p0 is set low so the first resets touch nearly every module (the worst case). For each process we time the
training step (forward, backward, engine.step) and, separately, `beam.step(engine)` on snapshot and reset
steps. Reported: median training step, snapshot and reset time as multiples of it, and the bytes each
process all-reduced per reset, next to the formula 4 * (N*r + 3 * sum over pruned ranks of (d_in + d_out)).

DeepSpeed's own comms logger is switched on around `beam.step` only, so every reset also records how many
collectives went through `deepspeed.comm` and their total message size: a count independent of BeamLoRA's.
`--points LAYERSxRANK[xHIDDEN],...` measures several configurations one after another in the same launch
(fresh model and engine each; benchmarks/reset_scaling.py uses it): the JSON is then {"points": [...]}.
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import time

import torch

import beamlora_ds


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=None, help="default: hidden * 8 // 3")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--intervals", type=int, default=4, help="number of reset intervals to run")
    p.add_argument("--p0", type=float, default=0.5, help="initial keep-fraction (low: the first resets prune a lot)")
    p.add_argument("--points", default=None,
                   help="comma-separated LAYERSxRANK[xHIDDEN]: measure each in turn in this launch")
    p.add_argument("--quick", action="store_true", help="small and short: a smoke test for CI")
    p.add_argument("--json", default="benchmarks/results/reset_cost.json")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.rank, args.seq, args.interval, args.intervals = 128, 2, 8, 32, 4, 2
    return args


def parse_points(args):
    """[(layers, rank, hidden)]: the --points list, or the single configuration of the other flags."""
    if not args.points:
        return [(args.layers, args.rank, args.hidden)]
    points = []
    for item in args.points.split(","):
        fields = [int(x) for x in item.lower().split("x")]
        if len(fields) not in (2, 3):
            raise SystemExit(f"--points: {item!r} is not LAYERSxRANK or LAYERSxRANKxHIDDEN")
        points.append((fields[0], fields[1], fields[2] if len(fields) == 3 else args.hidden))
    return points


def comm_totals(dist):
    """(operations, bytes) DeepSpeed's comms logger has recorded so far on this process."""
    records = dist.comms_logger.comms_dict.values()
    return (sum(v[0] for rec in records for v in rec.values()),
            sum(size * v[0] for rec in records for size, v in rec.items()))


def measure(args, layers, rank_r, hidden, dist, rank, world):
    """Train one configuration for a few intervals; the result dict of this process."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import deepspeed

    torch.manual_seed(0)
    intermediate = args.intermediate or hidden * 8 // 3
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=args.heads,
                                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq))
    total_steps = args.interval * (args.intervals + 1)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=rank_r, alpha=2.0 * rank_r, dropout=0.0,
                                                               interval=args.interval, total_steps=total_steps,
                                                               p0=args.p0))
    threshold = beamlora_ds.persistence_threshold_for(beam.modules)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "steps_per_print": 10**9,
              "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": threshold}}
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    g = torch.Generator().manual_seed(rank)
    step_s, snapshot_s, reset_s, reset_bytes, touched, formula, pruned = [], [], [], [], [], [], []
    snapshot_ops, reset_ops, reset_logged_bytes, reset_sizes, reset_touched_elems = [], [], [], [], []
    sizes = {n: m.in_features + m.out_features for n, m in zip(beam.module_names, beam.modules)}
    events = beam.next_events()
    for step in range(1, total_steps + 1):
        ids = torch.randint(0, 1024, (args.micro_batch, args.seq), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        dist.barrier()
        ops0, bytes0 = comm_totals(dist)
        dist.configure(enabled=True, prof_all=True, verbose=False)
        t1 = time.perf_counter()
        record = beam.step(engine)
        t2 = time.perf_counter()
        dist.configure(enabled=False)
        ops1, bytes1 = comm_totals(dist)
        dist.barrier()
        step_s.append(t1 - t0)
        if step == events["snapshot"]:
            snapshot_s.append(t2 - t1)
            snapshot_ops.append(ops1 - ops0)
        if record is not None:
            reset_s.append(t2 - t1)
            reset_bytes.append(record["all_reduce_bytes"])
            reset_ops.append(ops1 - ops0)
            reset_logged_bytes.append(bytes1 - bytes0)
            pruned.append(len(record["pruned"]))
            names = {name for name, _ in record["pruned"]}
            touched.append(len(names))
            reset_sizes.append(sum(sizes[n] for n, _ in record["pruned"]))
            reset_touched_elems.append(sum(rank_r * sizes[n] for n in names))
            formula.append(4 * (len(beam.modules) * rank_r + 3 * reset_sizes[-1]))
        events = beam.next_events()
    median = statistics.median(step_s)
    n_modules, adapter_elems = len(beam.modules), sum(m.r * (m.in_features + m.out_features) for m in beam.modules)
    result = {
        "stage": args.stage, "world": world, "modules": n_modules, "layers": layers, "r": rank_r, "hidden": hidden,
        "intermediate": intermediate, "adapter_elements": adapter_elems, "median_step_s": median,
        "snapshot_x_step": [s / median for s in snapshot_s], "reset_x_step": [s / median for s in reset_s],
        "reset_all_reduce_bytes": reset_bytes, "reset_bytes_formula": formula, "modules_touched": touched,
        "ranks_pruned": pruned,
        "tokens_per_s": args.micro_batch * args.seq * world / median,
        "snapshot_s": snapshot_s, "reset_s": reset_s,
        "snapshot_collectives": snapshot_ops, "reset_collectives": reset_ops,
        "reset_logged_bytes": reset_logged_bytes,
        "reset_pruned_din_plus_dout": reset_sizes, "reset_touched_adapter_elements": reset_touched_elems,
    }
    if rank == 0:
        print(f"\nBeamLoRA reset cost, ZeRO-{args.stage}, {world} processes, {n_modules} modules, r={rank_r}, "
              f"hidden {hidden}, {adapter_elems:,} adapter elements")
        print(f"{'event':<10}{'seconds':>10}{'x median step':>15}{'all-reduce bytes':>18}{'ranks pruned':>14}"
              f"{'modules touched':>17}{'collectives':>13}")
        print(f"{'step':<10}{median:>10.4f}{1.0:>15.2f}")
        for s, k in zip(snapshot_s, snapshot_ops):
            print(f"{'snapshot':<10}{s:>10.4f}{s / median:>15.2f}{0:>18,}{'':>14}{'':>17}{k:>13}")
        for s, b, k, t, c in zip(reset_s, reset_bytes, pruned, touched, reset_ops):
            print(f"{'reset':<10}{s:>10.4f}{s / median:>15.2f}{b:>18,}{k:>14}{t:>17}{c:>13}")
    del engine, optimizer, model, beam
    gc.collect()
    return result


def main():
    args = parse()
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = [measure(args, layers, r, hidden, dist, rank, world) for layers, r, hidden in parse_points(args)]
    if rank == 0:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"points": results} if args.points else results[0], f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
