"""GPU check: short BeamLoRA trainings on a Llama-7B-shaped layer stack with a 4-bit NF4 base and a bf16 base.

    python benchmarks/gpu_qlora.py [--quick] [--json benchmarks/results/gpu_qlora.json]

Needs one CUDA GPU (it refuses cleanly without one). A Llama with 7B-shaped layers (hidden 4096, intermediate
11008, 32 heads, vocab 32000; 4 decoder layers by default, 2 with --quick) is built from a LlamaConfig with
random weights and saved once in bf16. Then, each in a fresh process (so peak GPU memory is its own):
  nf4:  `beamlora_ds.load_4bit_model` (NF4, double quantization, bf16 compute and storage), the
        real loading path of `launch/train.py --quantization nf4`;
  bf16: `from_pretrained(dtype=bf16)`;
both with BeamLoRA r=64 (alpha 128) on all 7 projections, DeepSpeed ZeRO stage 2 in one process (as
ds_configs/qlora_single.json), bf16, torch AdamW, gradient checkpointing, micro-batch 4 x 512 random tokens,
and a reset interval short enough that snapshots and resets happen. Per base it reports: GPU memory after
loading, torch.cuda.max_memory_allocated while loading and while training, median step time (ordinary steps),
the time of snapshot and reset steps, tokens/s, first and last loss. Then a table and a JSON file.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=128.0)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--interval", type=int, default=4, help="reset interval T (snapshots at T/2, 3T/2, ...)")
    p.add_argument("--bases", default="nf4,bf16", help="comma-separated: nf4, bf16")
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--timeout", type=int, default=600, help="seconds per base")
    p.add_argument("--quick", action="store_true", help="2 layers, 256 tokens, 8 steps")
    p.add_argument("--json", default="benchmarks/results/gpu_qlora.json")
    p.add_argument("--cpu_smoke", action="store_true",
                   help="check this script itself on a CPU (tiny sizes, gloo; the numbers mean nothing)")
    p.add_argument("--child", choices=["nf4", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.seq, args.steps = 2, 256, 8
    if args.cpu_smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 128, 344, 4, 512
        args.rank, args.alpha, args.seq, args.steps = 8, 16.0, 32, 8
    return args


def refuse_without_gpu(args):
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("error: benchmarks/gpu_qlora.py needs a CUDA GPU (torch.cuda.is_available() is False here). "
              "For a CPU comparison of 4-bit and bf16 bases run: python benchmarks/qlora_memory.py --quick",
              file=sys.stderr)
        sys.exit(2)


def ds_config(args) -> dict:
    return {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": args.micro_batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
            "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": args.hidden * args.hidden}}


def child(args) -> dict:
    """One base in this fresh process: load, wrap, DeepSpeed, train; returns the measurements."""
    import torch

    GIB = 2**30
    cuda = not args.cpu_smoke

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def memory(stat: str) -> float:
        return getattr(torch.cuda, stat)() if cuda else 0
    from beamlora_ds import testing

    os.environ.update(testing.single_process_env(os.environ.get("MASTER_PORT")))
    import deepspeed
    from transformers import AutoModelForCausalLM

    import beamlora_ds
    from beamlora_ds import load_4bit_model
    from beamlora_ds.method import algorithm

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    if cuda:
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    config = ds_config(args)
    checkpointing = not args.no_gradient_checkpointing
    tick = time.perf_counter()
    if args.child == "nf4":
        model = load_4bit_model(args.model_dir, config, compute_dtype=torch.bfloat16, double_quant=True,
                                      gradient_checkpointing=checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
        model = (model.cuda() if cuda else model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    sync()
    load_s = time.perf_counter() - tick
    after_load, load_peak = memory("memory_allocated"), memory("max_memory_allocated")
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())

    torch.manual_seed(0)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(
        r=args.rank, alpha=args.alpha, dropout=0.05, interval=args.interval, total_steps=args.steps, p0=0.8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model), lr=3e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    times, kinds, losses = [], [], []
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g).to(engine.device)
        sync()
        tick = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        record = beam.step(engine)
        sync()
        times.append(time.perf_counter() - tick)
        losses.append(loss.item())
        kinds.append("reset" if record is not None else
                     "snapshot" if algorithm.is_snapshot_step(step, args.interval, args.steps) else "step")
    ordinary = [t for t, k in zip(times[2:], kinds[2:]) if k == "step"] or times[1:]
    step_s = statistics.median(ordinary)
    pruned = [len(r["pruned"]) for r in beam.history]
    return {"base": args.child, "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke test)",
            "linear4bit_layers": four_bit,
            "trainable_params": trainable, "load_s": load_s,
            "memory_after_load_gib": after_load / GIB, "max_memory_allocated_loading_gib": load_peak / GIB,
            "max_memory_allocated_training_gib": memory("max_memory_allocated") / GIB,
            "max_memory_reserved_gib": memory("max_memory_reserved") / GIB,
            "step_s_median": step_s, "tokens_per_s": args.micro_batch * args.seq / step_s,
            "first_step_s": times[0],
            "snapshot_step_s": [t for t, k in zip(times, kinds) if k == "snapshot"],
            "reset_step_s": [t for t, k in zip(times, kinds) if k == "reset"], "pruned_per_reset": pruned,
            "step_kinds": kinds, "step_s": times, "loss_first": losses[0], "loss_last": losses[-1],
            "losses_finite": all(l == l and abs(l) != float("inf") for l in losses)}


def build_model(args, folder: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(4096, args.seq))
    torch.manual_seed(0)
    with torch.device("cpu" if args.cpu_smoke else "cuda"):  # random init of 1B weights: seconds on a GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    if not args.cpu_smoke:
        torch.cuda.empty_cache()
    return {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
            "vocab": args.vocab, "parameters": params}


def main(argv=None):
    args = parse(argv)
    refuse_without_gpu(args)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    import bitsandbytes
    import torch

    from beamlora_ds import testing

    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    unknown = set(bases) - {"nf4", "bf16"}
    if unknown:
        sys.exit(f"error: --bases {sorted(unknown)}: use nf4 and/or bf16")
    device = "cpu (smoke test)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    result = {"benchmark": "gpu_qlora", "device": device, "torch": torch.__version__,
              "bitsandbytes": bitsandbytes.__version__, "settings": {k: v for k, v in vars(args).items()
                                                                     if k not in ("child", "model_dir")},
              "runs": {}, "errors": {}}
    passthrough = ["--layers", args.layers, "--hidden", args.hidden, "--intermediate", args.intermediate,
                   "--heads", args.heads, "--vocab", args.vocab, "--rank", args.rank, "--alpha", args.alpha,
                   "--micro_batch", args.micro_batch, "--seq", args.seq, "--steps", args.steps,
                   "--interval", args.interval] + (["--no_gradient_checkpointing"] if args.no_gradient_checkpointing
                                                   else []) + (["--cpu_smoke"] if args.cpu_smoke else [])
    with tempfile.TemporaryDirectory(prefix="gpu_qlora_") as folder:
        tick = time.perf_counter()
        result["model"] = build_model(args, folder)
        print(f"{result['device']}: Llama {args.layers} x 7B-shaped layers, {result['model']['parameters'] / 1e9:.2f}B "
              f"parameters, saved in {time.perf_counter() - tick:.0f} s; BeamLoRA r={args.rank} on all 7 projections, "
              f"batch {args.micro_batch} x {args.seq}, {args.steps} steps, reset interval {args.interval}", flush=True)
        for base in bases:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", base, "--model_dir", folder,
                   *map(str, passthrough)]
            try:  # the group is killed on timeout and the child's /dev/shm buffers removed
                proc = testing.run(cmd, args.timeout, cwd=ROOT, env=testing.single_process_env())
            except subprocess.TimeoutExpired:
                result["errors"][base] = f"timed out after {args.timeout} s"
                print(f"  {base}: timed out", flush=True)
                continue
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                result["errors"][base] = (proc.stdout[-2000:] + "\n" + proc.stderr[-4000:]).strip()
                print(f"  {base}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = result["runs"][base] = json.loads(line[len("RESULT "):])
            print(f"  {base}: step {r['step_s_median'] * 1e3:.0f} ms, training peak "
                  f"{r['max_memory_allocated_training_gib']:.2f} GiB, resets pruned {r['pruned_per_reset']}",
                  flush=True)
    runs = result["runs"]
    rows = [("Linear4bit layers", "linear4bit_layers", "{:.0f}"),
            ("trainable parameters (M)", "trainable_params", "{:.1f}"),
            ("load time (s)", "load_s", "{:.1f}"), ("GPU memory after load (GiB)", "memory_after_load_gib", "{:.2f}"),
            ("max allocated, loading (GiB)", "max_memory_allocated_loading_gib", "{:.2f}"),
            ("max allocated, training (GiB)", "max_memory_allocated_training_gib", "{:.2f}"),
            ("max reserved (GiB)", "max_memory_reserved_gib", "{:.2f}"),
            ("step time, median (ms)", "step_s_median", "{:.0f}"), ("tokens/s", "tokens_per_s", "{:.0f}"),
            ("loss first -> last", None, None)]
    print("\n| " + " | ".join(["", *runs]) + (" | nf4/bf16 |" if len(runs) == 2 else " |"))
    print("|" + "---|" * (len(runs) + 1 + (len(runs) == 2)))
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" for r in runs.values()]
            ratio = ""
        else:
            scale = 1e-6 if key == "trainable_params" else 1e3 if key == "step_s_median" else 1
            cells = [fmt.format(r[key] * scale) for r in runs.values()]
            ratio = (f"{runs['nf4'][key] / runs['bf16'][key]:.2f}" if len(runs) == 2 and runs["bf16"][key] else "")
        print("| " + " | ".join([label, *cells]) + (f" | {ratio} |" if len(runs) == 2 else " |"))
    for base, r in runs.items():
        print(f"{base}: snapshot steps {[round(t * 1e3) for t in r['snapshot_step_s']]} ms, reset steps "
              f"{[round(t * 1e3) for t in r['reset_step_s']]} ms")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if result["errors"] or not all(r["losses_finite"] for r in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
