"""A 4-bit NF4 base against a bf16 base on the CPU: step time and peak memory, same model, same BeamLoRA setup.

    python benchmarks/qlora_memory.py --quick [--json out.json]

A Llama built from a config (no download) is saved once in bf16; each measurement is a fresh child process that
loads it either as bf16 (`from_pretrained(dtype=bf16)`) or as NF4 with double quantization and bf16 compute
(`beamlora_ds.load_4bit_model`), wraps all seven projections with BeamLoRA (same r, bf16 adapters both),
and trains a few steps with torch AdamW on random tokens (including a reset). getrusage's peak RSS can only grow
within a process, so every measurement is its own child process, and the variants alternate (nf4, bf16, nf4,
bf16, ...) in this one run, which also spreads the noise of a shared machine over both. Memory is counted above
the child's RSS after its imports (the same imports for both); after loading, both models are copied out of
the mmapped checkpoint file into process memory (else bf16 weights would count only as touched file pages);
a sampling thread separates the loading peak (NF4 loading reads bf16 weights before quantizing them) from the
training peak. Reported per variant
(median over repeats), with nf4/bf16 ratios: weight bytes; anonymous RSS (heap and tensors, without the clean
pages of the mmapped checkpoint file) and RSS, each after loading, peak while training and peak while loading;
getrusage's lifetime peak; load time; median step time.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="training steps per measurement (the first is not timed)")
    p.add_argument("--repeats", type=int, default=3, help="child processes per variant, alternating")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="a small model and 2 repeats: about a minute on 2 cores")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--child", choices=["nf4", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 1024, 2752, 4, 4096
        args.seq, args.steps, args.repeats = 64, 5, 2
    return args


def maxrss_bytes() -> int:
    """Peak resident set of this process so far (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anon_rss_bytes() -> int:
    """Resident anonymous memory (heap, tensors), without clean file pages such as mmapped safetensors files,
    which the kernel can drop at any time and which RSS counts too."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()


class RssSampler:
    """Highest current RSS seen every few ms since the last reset(): the peak of one phase (getrusage's peak
    covers the whole process life, so it cannot tell the loading transient from training)."""

    def __init__(self, every_s: float = 0.005):
        import threading

        self.every_s, self._stop = every_s, False
        self.reset()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self):
        self.peak, self.anon_peak = max(self.peak, rss_bytes()), max(self.anon_peak, anon_rss_bytes())

    def _run(self):
        while not self._stop:
            self._sample()
            time.sleep(self.every_s)

    def reset(self) -> None:
        self.peak, self.anon_peak = rss_bytes(), anon_rss_bytes()

    def read(self) -> tuple:
        self._sample()
        return self.peak, self.anon_peak

    def stop(self) -> None:
        self._stop = True
        self.thread.join()


def _own_memory(model) -> None:
    """Copy every tensor out of the mmapped checkpoint file into process memory and drop the mapping, for both
    variants alike: otherwise the bf16 weights stay file pages (counted by RSS only once touched) while NF4
    holds quantized copies plus the whole file it read."""
    import gc

    for t in list(model.parameters()) + list(model.buffers()):
        t.data = t.data.clone()
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so RSS shows what is still in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(args) -> dict:
    """One measurement in this (fresh) process; prints one JSON line."""
    import bitsandbytes  # noqa: F401  (imported by both variants before the baseline, so imports are not counted)
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401

    import beamlora_ds
    from beamlora_ds import load_4bit_model

    if args.threads:
        torch.set_num_threads(args.threads)
    _trim_heap()
    start, anon_start = rss_bytes(), anon_rss_bytes()
    sampler = RssSampler()
    tick = time.perf_counter()
    if args.child == "nf4":
        model = load_4bit_model(args.model_dir, None, compute_dtype=torch.bfloat16, double_quant=True,
                                      model_dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).train()
    _own_memory(model)
    load_s = time.perf_counter() - tick
    load_peak = sampler.read()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=0.0,
                                                               interval=2, total_steps=args.steps, p0=0.8))
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model), lr=1e-4)
    _trim_heap()
    after_load, anon_after_load = rss_bytes(), anon_rss_bytes()
    sampler.reset()
    g = torch.Generator().manual_seed(0)
    times, resets = [], 0
    for step in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g)
        tick = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        resets += beam.step(optimizer) is not None
        times.append(time.perf_counter() - tick)
    train_peak = sampler.read()
    sampler.stop()
    return {"variant": args.child, "weight_bytes": weight_bytes,
            "load_peak_rss_bytes": load_peak[0] - start, "rss_after_load_bytes": after_load - start,
            "train_peak_rss_bytes": train_peak[0] - start, "lifetime_peak_rss_bytes": maxrss_bytes() - start,
            "load_peak_anon_bytes": load_peak[1] - anon_start, "anon_after_load_bytes": anon_after_load - anon_start,
            "train_peak_anon_bytes": train_peak[1] - anon_start, "baseline_rss_bytes": start, "load_s": load_s,
            "step_s": statistics.median(times[1:]),
            "first_step_s": times[0], "resets": resets, "adapter_dtype": str(beam.modules[0].lora_A.dtype),
            "final_loss": float(loss)}


def build_model(args, folder: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=max(args.seq, 128))
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    args = parse(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    from beamlora_ds import testing

    passthrough = ["--hidden", args.hidden, "--intermediate", args.intermediate, "--layers", args.layers,
                   "--vocab", args.vocab, "--rank", args.rank, "--seq", args.seq, "--micro_batch", args.micro_batch,
                   "--steps", args.steps, "--threads", args.threads]
    runs = {"nf4": [], "bf16": []}
    with tempfile.TemporaryDirectory(prefix="qlora_memory_") as folder:
        params = build_model(args, folder)
        print(f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab "
              f"{args.vocab}: {params / 1e6:.1f}M parameters; BeamLoRA r={args.rank} on all 7 projections; "
              f"batch {args.micro_batch} x {args.seq}; {args.steps} steps x {args.repeats} repeats per variant",
              flush=True)
        for repeat in range(args.repeats):
            for variant in ("nf4", "bf16"):  # alternate
                cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model_dir", folder,
                       *map(str, passthrough)]
                proc = testing.run(cmd, timeout=3600, cwd=ROOT)  # a child that hangs is killed, not waited on
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{variant} measurement failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                runs[variant].append(json.loads(line[len("RESULT "):]))
                r = runs[variant][-1]
                print(f"  repeat {repeat + 1} {variant:>4}: step {r['step_s'] * 1e3:.0f} ms, training peak "
                      f"+{r['train_peak_anon_bytes'] / 2**20:.0f} MiB anonymous / +"
                      f"{r['train_peak_rss_bytes'] / 2**20:.0f} MiB RSS", flush=True)
    keys = ("weight_bytes", "anon_after_load_bytes", "train_peak_anon_bytes", "load_peak_anon_bytes",
            "rss_after_load_bytes", "train_peak_rss_bytes", "load_peak_rss_bytes", "lifetime_peak_rss_bytes",
            "load_s", "step_s")
    summary = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in runs.items()}
    summary["baseline_rss_bytes"] = statistics.median(r["baseline_rss_bytes"] for rs in runs.values() for r in rs)
    ratio = {k: summary["nf4"][k] / summary["bf16"][k] for k in keys}
    rows = [("weights (state_dict bytes)", "weight_bytes", 2**20, "MiB"),
            ("anonymous RSS after loading", "anon_after_load_bytes", 2**20, "MiB"),
            ("anonymous RSS peak, training", "train_peak_anon_bytes", 2**20, "MiB"),
            ("anonymous RSS peak, loading", "load_peak_anon_bytes", 2**20, "MiB"),
            ("RSS after loading", "rss_after_load_bytes", 2**20, "MiB"),
            ("peak RSS while training", "train_peak_rss_bytes", 2**20, "MiB"),
            ("peak RSS while loading", "load_peak_rss_bytes", 2**20, "MiB"),
            ("peak RSS (getrusage, lifetime)", "lifetime_peak_rss_bytes", 2**20, "MiB"),
            ("load time", "load_s", 1, "s"), ("step time (median)", "step_s", 1e-3, "ms")]
    print(f"\nMedians over {args.repeats} runs per variant; memory is above the process's RSS after imports "
          f"({summary['baseline_rss_bytes'] / 2**20:.0f} MiB, the same for both). Anonymous RSS leaves out file "
          "pages (the checkpoint file read while loading, shared libraries).")
    print(f"| {'':<32} | {'nf4':>10} | {'bf16':>10} | nf4/bf16 |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 12}|----------|")
    for label, key, unit, name in rows:
        print(f"| {label:<32} | {summary['nf4'][key] / unit:>6.1f} {name:<3} | {summary['bf16'][key] / unit:>6.1f} "
              f"{name:<3} | {ratio[key]:>8.2f} |")
    result = {"benchmark": "qlora_memory", "device": "cpu", "threads": args.threads or None,
              "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                        "vocab": args.vocab, "parameters": params},
              "beamlora": {"r": args.rank, "targets": "all 7 projections"},
              "batch": [args.micro_batch, args.seq], "steps": args.steps, "repeats": args.repeats,
              "median": summary, "ratio_nf4_over_bf16": ratio, "runs": runs}
    print(json.dumps({"median": summary, "ratio_nf4_over_bf16": ratio}))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
