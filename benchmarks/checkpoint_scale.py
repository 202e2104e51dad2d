"""What a checkpoint costs as the model grows: bytes, save, verify and universal-conversion time, with and without
the frozen base, extrapolated to Llama-2-70B on 64 GPUs.

    python3 benchmarks/checkpoint_scale.py                          # tiny, SmolLM2-135M- and 0.5B-shaped; ~8 min
    python3 benchmarks/checkpoint_scale.py --quick --json out.json   # CI smoke test: the tiny model only

One 2-process launch (spawn.py, gloo on the CPU) of this file's worker; for each model (a Llama built from a
config, bf16, random weights: no download) and ZeRO stage (2 and 3): BeamLoRA (r 16, the seven projections),
`deepspeed.initialize`, one optimizer step (so the Adam moments exist), then, measured on process 0 between
barriers: `beamlora_ds.save_checkpoint` as it is now (the adapter, its fp32 master and moments, the BeamLoRA state;
no base tensor) and with `include_base=True` (DeepSpeed's full checkpoint, the baseline measured in the same run);
the verification `load_checkpoint` runs first (each process hashing its share of the bytes); DeepSpeed's universal
conversion that a resume on another number of processes runs (one process); the bytes of each folder and of the
exported peft adapter. Ratios are against the base-included checkpoint of the same model and stage.

Extrapolated (marked so): Llama-2-70B, r 64 (the multi-node recipe), 64 processes. Checkpoint bytes are fitted as
`a x adapter parameters + b` over the measured models (a: bytes per adapter parameter, b: per-process files);
write and hash rates are the measured per-process ones, each of the 64 processes writing and hashing its own
share at that rate (a storage that keeps up with 64 writers: the optimistic case); the universal conversion runs
in one process at its measured rate. The base-included figures add 2 bytes per base parameter (bf16): the module
state, which process 0 writes whole (ZeRO-2), or the frozen fragments in the parameters' dtype, spread over the
processes (ZeRO-3).
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODELS = {  # Llama configs: (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
    "tiny": (64, 172, 2, 4, 2, 1000, False),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
    "0.5b": (1024, 2816, 24, 16, 8, 32000, False),
}
LLAMA_70B = (8192, 28672, 80, 64, 8, 32000, False)
R, R_70B, WORLD_70B = 16, 64, 64
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_counts(shape, r: int) -> dict:
    """Base and adapter parameter counts of a Llama of `shape` with BeamLoRA rank `r` on the seven projections."""
    hidden, inter, layers, heads, kv, vocab, tied = shape
    kv_out = hidden // heads * kv
    sizes = [(hidden, hidden), (hidden, kv_out), (hidden, kv_out), (hidden, hidden), (hidden, inter),
             (hidden, inter), (inter, hidden)]
    base = layers * (sum(i * o for i, o in sizes) + 2 * hidden) + vocab * hidden * (1 if tied else 2) + hidden
    return {"base_parameters": base, "adapter_parameters": layers * sum(r * (i + o) for i, o in sizes),
            "modules": layers * len(sizes)}


# ------------------------------------------------------------------------------------------------ worker
def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)


def timed(dist, work) -> float:
    """Seconds from a barrier to the barrier after `work()` on every process (what the job waits)."""
    dist.barrier()
    start = time.perf_counter()
    work()
    dist.barrier()
    return time.perf_counter() - start


def measure(name: str, stage: int, folder: str) -> dict:
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import beamlora_ds
    from beamlora_ds.checkpointing import manifest, reshard

    hidden, inter, layers, heads, kv, vocab, tied = MODELS[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=R, alpha=2.0 * R, total_steps=100, interval=10,
                                                               target_modules=PROJECTIONS))
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold":
                                       beamlora_ds.persistence_threshold_for(beam.modules)},
                 "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.AdamW(beamlora_ds.optimizer_param_groups(model), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    beam.step(engine)
    row = {"model": name, "stage": stage, **llama_counts(MODELS[name], R)}
    for kind, include_base in (("adapter_only", False), ("with_base", True)):
        ckpt = os.path.join(folder, f"{name}_z{stage}_{kind}")
        row[f"{kind}_save_s"] = timed(dist, lambda: beamlora_ds.save_checkpoint(engine, beam, ckpt,
                                                                                include_base=include_base))
        tag = os.path.join(ckpt, "global_step1")
        row[f"{kind}_bytes"] = folder_bytes(tag)
        row[f"{kind}_verify_s"] = timed(dist, lambda: manifest.verify(tag, part=(dist.get_rank(),
                                                                                 dist.get_world_size())))
        owner = dist.get_rank() == 0
        row[f"{kind}_universal_s"] = timed(dist, lambda: reshard.convert_to_universal(ckpt, "global_step1", owner))
        row[f"{kind}_universal_bytes"] = folder_bytes(reshard.universal_folder(ckpt, "global_step1"))
        dist.barrier()
        if owner:
            shutil.rmtree(ckpt, ignore_errors=True)
    adapter = os.path.join(folder, f"{name}_z{stage}_adapter")
    beamlora_ds.save_adapter(engine, adapter)
    row["adapter_file_bytes"] = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))
    return row


def worker(spec_path: str) -> None:
    import deepspeed
    import deepspeed.comm as dist

    with open(spec_path) as f:
        spec = json.load(f)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=600))
    rows = [measure(name, stage, spec["folder"]) for name in spec["models"] for stage in spec["stages"]]
    if dist.get_rank() == 0:
        with open(spec["out"], "w") as f:
            json.dump(rows, f)


# ------------------------------------------------------------------------------------------------ parent
def fit_line(xs, ys):
    """Least-squares (slope, intercept) of ys against xs (one point: through the origin)."""
    n = len(xs)
    if n == 1:
        return ys[0] / xs[0], 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def extrapolate(rows: list, stage: int) -> dict:
    """Llama-2-70B, r 64, 64 processes, from this stage's measured rows (see the module docstring)."""
    mine = [r for r in rows if r["stage"] == stage]
    per_param, fixed = fit_line([r["adapter_parameters"] for r in mine], [r["adapter_only_bytes"] for r in mine])
    largest = max(mine, key=lambda r: r["adapter_only_bytes"])
    write_rate = largest["adapter_only_bytes"] / 2 / largest["adapter_only_save_s"]  # per process, bytes/s
    hash_rate = largest["with_base_bytes"] / 2 / largest["with_base_verify_s"]  # per process, the larger folder
    convert_rate = largest["adapter_only_bytes"] / largest["adapter_only_universal_s"]  # one process
    counts = llama_counts(LLAMA_70B, R_70B)
    adapter_only = per_param * counts["adapter_parameters"] + fixed / 2 * WORLD_70B
    base = counts["base_parameters"] * 2  # bf16: the module state (ZeRO-2), the frozen fragments (ZeRO-3)
    base_writer_bytes = base / WORLD_70B if stage == 3 else base  # ZeRO-2: process 0 writes the module state
    return {"stage": stage, "adapter_parameters": counts["adapter_parameters"],
            "bytes_per_adapter_parameter": per_param, "per_process_fixed_bytes": fixed / 2,
            "adapter_only_bytes": adapter_only, "adapter_only_save_s": adapter_only / WORLD_70B / write_rate,
            "adapter_only_verify_s": adapter_only / WORLD_70B / hash_rate,
            "adapter_only_universal_s": adapter_only / convert_rate,
            "with_base_bytes": adapter_only + base,
            "with_base_save_s": (adapter_only / WORLD_70B + base_writer_bytes) / write_rate,
            "with_base_verify_s": (adapter_only + base) / WORLD_70B / hash_rate,
            "rates_bytes_per_s": {"write_per_process": write_rate, "hash_per_process": hash_rate,
                                  "universal_conversion": convert_rate}}


def gb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e8 else f"{n / 1e9:.2f} GB" if n < 1e10 else f"{n / 1e9:.0f} GB"


def table(rows: list, extrapolated: list) -> str:
    lines = ["| model | ZeRO | adapter file | checkpoint (no base) | x adapter | with base | save s (no base / base) "
             "| verify s | universal s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['stage']} | {gb(r['adapter_file_bytes'])} | {gb(r['adapter_only_bytes'])} | "
            f"{r['adapter_only_bytes'] / r['adapter_file_bytes']:.1f} | {gb(r['with_base_bytes'])} | "
            f"{r['adapter_only_save_s']:.2f} / {r['with_base_save_s']:.2f} | "
            f"{r['adapter_only_verify_s']:.2f} / {r['with_base_verify_s']:.2f} | "
            f"{r['adapter_only_universal_s']:.2f} / {r['with_base_universal_s']:.2f} |")
    for e in extrapolated:
        lines.append(
            f"| 70B r{R_70B}, {WORLD_70B} processes (extrapolated) | {e['stage']} | | {gb(e['adapter_only_bytes'])} | | "
            f"{gb(e['with_base_bytes'])} | {e['adapter_only_save_s']:.1f} / {e['with_base_save_s']:.0f} | "
            f"{e['adapter_only_verify_s']:.1f} / {e['with_base_verify_s']:.0f} | {e['adapter_only_universal_s']:.0f} / - |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only (CI smoke test)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_scale.json"))
    p.add_argument("--measured", default=None,
                   help="a JSON this script wrote: extrapolate its measured rows again, without launching")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.measured:
        with open(args.measured) as f:
            rows = json.load(f)["measured"]
    else:
        rows = measure_in_processes(args.quick)
        if rows is None:
            return 1
    extrapolated = [extrapolate(rows, stage) for stage in (2, 3)]
    print(table(rows, extrapolated))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"measured": rows, "extrapolated_70b_64_processes": extrapolated, "r": R, "r_70b": R_70B,
                   "processes": 2, "device": "CPU (2 cores), gloo"}, f, indent=1)
    return 0


def measure_in_processes(quick: bool):
    """The measured rows of one 2-process launch of the worker (None when it failed, its output printed)."""
    from beamlora_ds import testing

    with tempfile.TemporaryDirectory(prefix="checkpoint_scale_") as folder:
        spec = {"folder": folder, "out": os.path.join(folder, "rows.json"), "stages": [2, 3],
                "models": ["tiny"] if quick else list(MODELS)}
        with open(os.path.join(folder, "spec.json"), "w") as f:
            json.dump(spec, f)
        proc = testing.run(testing.spawn_command(os.path.abspath(__file__), ["--worker",
                                                 os.path.join(folder, "spec.json")], 2), timeout=1800, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return None
        with open(spec["out"]) as f:
            return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
