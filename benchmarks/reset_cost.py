"""What a BeamLoRA snapshot and reset cost under DeepSpeed, relative to an ordinary training step.

    deepspeed --num_gpus 2 benchmarks/reset_cost.py [--stage 3] [--quick] [--json out.json]

A Llama built from a config (no download) with BeamLoRA on all seven projections trains for a few intervals;
p0 is set low so the first resets touch nearly every module (the worst case). For each process we time the
training step (forward, backward, engine.step) and, separately, `beam.step(engine)` on snapshot and reset
steps. Reported: median training step, snapshot and reset time as multiples of it, and the bytes each
process all-reduced per reset, next to the formula 4 * (N*r + 3 * sum over pruned ranks of (d_in + d_out)).
"""
import argparse
import datetime
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
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--intervals", type=int, default=4, help="number of reset intervals to run")
    p.add_argument("--quick", action="store_true", help="small and short: a smoke test for CI")
    p.add_argument("--json", default="benchmarks/results/reset_cost.json")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.rank, args.seq, args.interval, args.intervals = 128, 2, 8, 32, 4, 2
    return args


def main():
    args = parse()
    import deepspeed
    import deepspeed.comm as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=args.seq))
    total_steps = args.interval * (args.intervals + 1)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0,
                                                               interval=args.interval, total_steps=total_steps, p0=0.5))
    threshold = beamlora_ds.persistence_threshold_for(beam.modules)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": threshold}}
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    g = torch.Generator().manual_seed(rank)
    step_s, snapshot_s, reset_s, reset_bytes, touched, formula, pruned = [], [], [], [], [], [], []
    events = beam.next_events()
    for step in range(1, total_steps + 1):
        ids = torch.randint(0, 1024, (args.micro_batch, args.seq), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        dist.barrier()
        t1 = time.perf_counter()
        record = beam.step(engine)
        dist.barrier()
        t2 = time.perf_counter()
        step_s.append(t1 - t0)
        if step == events["snapshot"]:
            snapshot_s.append(t2 - t1)
        if record is not None:
            reset_s.append(t2 - t1)
            reset_bytes.append(record["all_reduce_bytes"])
            pruned.append(len(record["pruned"]))
            touched.append(len({name for name, _ in record["pruned"]}))
            sizes = {n: m.in_features + m.out_features for n, m in zip(beam.module_names, beam.modules)}
            formula.append(4 * (len(beam.modules) * args.rank + 3 * sum(sizes[n] for n, _ in record["pruned"])))
        events = beam.next_events()
    median = statistics.median(step_s)
    n_modules, adapter_elems = len(beam.modules), sum(m.r * (m.in_features + m.out_features) for m in beam.modules)
    result = {
        "stage": args.stage, "world": world, "modules": n_modules, "r": args.rank, "hidden": args.hidden,
        "adapter_elements": adapter_elems, "median_step_s": median,
        "snapshot_x_step": [s / median for s in snapshot_s], "reset_x_step": [s / median for s in reset_s],
        "reset_all_reduce_bytes": reset_bytes, "reset_bytes_formula": formula, "modules_touched": touched,
        "ranks_pruned": pruned,
        "tokens_per_s": args.micro_batch * args.seq * world / median,
    }
    if rank == 0:
        print(f"\nBeamLoRA reset cost, ZeRO-{args.stage}, {world} processes, {n_modules} modules, r={args.rank}, "
              f"hidden {args.hidden}, {adapter_elems:,} adapter elements")
        print(f"{'event':<10}{'seconds':>10}{'x median step':>15}{'all-reduce bytes':>18}{'ranks pruned':>14}"
              f"{'modules touched':>17}")
        print(f"{'step':<10}{median:>10.4f}{1.0:>15.2f}")
        for s in snapshot_s:
            print(f"{'snapshot':<10}{s:>10.4f}{s / median:>15.2f}{0:>18,}")
        for s, b, k, t in zip(reset_s, reset_bytes, pruned, touched):
            print(f"{'reset':<10}{s:>10.4f}{s / median:>15.2f}{b:>18,}{k:>14}{t:>17}")
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
