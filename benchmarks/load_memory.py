"""Host memory of loading a 4-bit NF4 base under ZeRO-3: every process at once (before) against in turns (after).

    python benchmarks/load_memory.py            # a Llama of ~0.5B parameters, 2 processes, a few minutes
    python benchmarks/load_memory.py --quick --json out.json   # ~10M parameters (the CI smoke test)

A Llama built from a config (no download) is saved once in bf16 to a temporary folder. Each mode runs --repeats
`deepspeed --num_gpus 2` launches (alternating) of this file's worker, which loads it with
`beamlora_ds.load_4bit_model` (ZeRO-3, bf16 storage and compute, double quantization), applies BeamLoRA and
calls `deepspeed.initialize`; then it digests every gathered parameter and every quantization constant,
so the two modes can be compared bit for bit. Modes:
  together  every process loads at the same time and keeps its whole copy until deepspeed.initialize
            partitions it (BEAMLORA_DS_4BIT_LOAD=together: the old way)
  turns     the default: one process per node at a time, all but rank 0 drop their copy right after loading,
            then the model is partitioned from rank 0's copy, parameter by parameter (docs/qlora.md)
Measured: each process's peak resident memory (VmHWM from /proc/self/status, which also counts the pages of the
mmapped checkpoint file it read), and, sampled by this parent every 20 ms, each process's anonymous resident
memory (RssAnon: heap and tensors) and the node's, the sum over the processes at the same instant, with its peak.
Also each process's anonymous memory after its imports (baseline), after loading and after deepspeed.initialize,
and the load intervals. Prints a table, writes JSON (default benchmarks/results/load_memory.json).
"""
import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from host_memory import MiB, NodeSampler, save_random_llama, status_bytes, write_result  # noqa: E402  (beside this file)

MODES = ("together", "turns")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1280)
    p.add_argument("--intermediate", type=int, default=3456)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=2, help="launches per mode, alternating (the old way's peak varies "
                                                          "a lot from launch to launch)")
    p.add_argument("--quick", action="store_true", help="a ~10M-parameter Llama: well under a minute")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch before it is killed")
    p.add_argument("--json", default=None, help="where to write the result (default: benchmarks/results/"
                                               "load_memory.json; with --quick only when given)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out_dir", help=argparse.SUPPRESS)
    p.add_argument("--fail_rank", type=int, default=-1, help=argparse.SUPPRESS)  # tests: that rank's load fails
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 512, 1376, 2, 4, 4096
        args.repeats = 1
    return args


# --------------------------------------------------------------------------------------- launcher side
def save_model(args, folder: str) -> int:
    """A random Llama of the requested shape, saved in bf16; returns its parameter count."""
    return save_random_llama(folder, vocab_size=args.vocab, hidden_size=args.hidden,
                             intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.heads)


def launch_mode(args, model_dir: str, mode: str, extra=()) -> dict:
    """One launch of the worker in `mode`; the merged per-process records and the parent's samples."""
    from beamlora_ds import testing

    with tempfile.TemporaryDirectory(prefix="beamlora_loadmem_") as out_dir:
        cmd = testing.spawn_command(os.path.abspath(__file__), ["--worker", "--model_dir", model_dir, "--mode",
                                                                    mode, "--out_dir", out_dir, *extra], args.nproc)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", BEAMLORA_DS_4BIT_LOAD=mode)
        with NodeSampler(out_dir) as sampler:
            proc = testing.run(cmd, args.timeout, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode}: the launch failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        processes = []
        for path in sorted(glob.glob(os.path.join(out_dir, "rank*.json"))):
            with open(path) as f:
                record = json.load(f)
            record["peak_anon"] = sampler.peak_anon.get(str(record["rank"]), 0)
            record["peak_rss_sampled"] = sampler.peak_rss.get(str(record["rank"]), 0)
            processes.append(record)
    return {"mode": mode, "processes": processes, "node_peak_anon": sampler.node_anon,
            "node_peak_rss": sampler.node_rss, "timeline_anon_mib": sampler.timeline, "output_tail": (proc.stdout + proc.stderr)[-2000:]}


def report(result: dict) -> None:
    print(f"model: {result['parameters'] / 1e6:.0f}M parameters, whole 4-bit model {result['model_mib']:.0f} MiB "
          f"per process; {result['nproc']} processes, ZeRO-3, bf16")
    print(f"{'mode':<9} {'rank':>4} {'baseline':>9} {'peak anon':>10} {'VmHWM':>8} {'after load':>11} "
          f"{'after init':>11} {'load s':>7}   (MiB)")
    for run in result["runs"]:
        for p in run["processes"]:
            print(f"{run['mode']:<9} {p['rank']:>4} {p['baseline_anon'] / MiB:>9.0f} {p['peak_anon'] / MiB:>10.0f} "
                  f"{p['vm_hwm'] / MiB:>8.0f} {p['after_load_anon'] / MiB:>11.0f} {p['after_init_anon'] / MiB:>11.0f} "
                  f"{p['load_finished'] - p['load_started']:>7.1f}")
        print(f"{run['mode']:<9} node peak: anonymous {run['node_peak_anon'] / MiB:.0f} MiB "
              f"(above baselines {run['node_peak_above_baseline'] / MiB:.0f}), resident {run['node_peak_rss'] / MiB:.0f}"
              f" MiB; loads overlap: {run['loads_overlap']}")
    for mode, values in result["node_peak_above_baseline_mib"].items():
        print(f"{mode:<9} node peak above baselines, per launch: {values} MiB; per process: "
              f"{result['process_peak_above_baseline_mib'][mode]} MiB")
    if "node_peak_above_baseline_ratio" in result:
        print(f"turns / together, median node peak above baselines: {result['node_peak_above_baseline_ratio']:.2f}; "
              f"same weights after deepspeed.initialize: {result['same_weights']}")


def summarize(args, runs, parameters: int) -> dict:
    for run in runs:
        spans = sorted((p["load_started"], p["load_finished"]) for p in run["processes"])
        run["loads_overlap"] = any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
        run["node_peak_above_baseline"] = run["node_peak_anon"] - sum(p["baseline_anon"] for p in run["processes"])
    result = {"benchmark": "load_memory", "quick": args.quick, "nproc": args.nproc, "parameters": parameters,
              "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab")},
              "model_mib": runs[0]["processes"][0]["model_bytes"] / MiB, "runs": runs}
    by_mode = {mode: [run for run in runs if run["mode"] == mode] for mode in MODES}
    result["node_peak_above_baseline_mib"] = {mode: [round(run["node_peak_above_baseline"] / MiB) for run in found]
                                              for mode, found in by_mode.items() if found}
    result["process_peak_above_baseline_mib"] = {
        mode: [round((p["peak_anon"] - p["baseline_anon"]) / MiB) for run in found for p in run["processes"]]
        for mode, found in by_mode.items() if found}
    if all(by_mode.values()):
        medians = {mode: statistics.median(values) for mode, values in result["node_peak_above_baseline_mib"].items()}
        result["node_peak_above_baseline_ratio"] = medians["turns"] / max(1, medians["together"])
        result["same_weights"] = len({p["digest"] for run in runs for p in run["processes"]}) == 1
    return result


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="beamlora_loadmem_model_") as model_dir:
        parameters = save_model(args, model_dir)
        runs = [launch_mode(args, model_dir, mode) for _ in range(args.repeats) for mode in args.modes.split(",")]
    result = summarize(args, runs, parameters)
    report(result)
    write_result(result, args.json, args.quick, "load_memory.json")


# ------------------------------------------------------------------------------------------ worker side
def worker(args):
    import torch

    from beamlora_ds.train import processes

    rank, world = processes.init_distributed(120)
    with open(os.path.join(args.out_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    import deepspeed.comm as dist
    import transformers  # noqa: F401  (imported before the baseline: it counts the libraries, not the model)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401

    from beamlora_ds import check_4bit_request

    check_4bit_request(ds_config())
    dist.barrier()
    record = {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "mode": args.mode,
              "baseline_anon": status_bytes()["RssAnon"]}
    model = load(args, rank, record)
    record["after_load_anon"] = status_bytes()["RssAnon"]
    engine = build_engine(model)
    record["after_init_anon"] = status_bytes()["RssAnon"]
    record["vm_hwm"] = status_bytes()["VmHWM"]
    dist.barrier()
    open(os.path.join(args.out_dir, f"rank{rank}.measured"), "w").close()  # the parent stops sampling here
    record["digest"], record["quant_state_digest"] = digests(engine.module)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    processes.release_shm_buffers(dist)
    del torch


def load(args, rank: int, record: dict):
    """load_4bit_model in the mode asked (the environment variable set by the launcher side picks it)."""
    import torch

    from beamlora_ds import load_4bit_model
    from beamlora_ds.loading import staggered

    path = os.path.join(args.model_dir, "missing") if rank == args.fail_rank else args.model_dir
    started = time.time()
    model = load_4bit_model(path, ds_config(), compute_dtype=torch.bfloat16)
    turns = staggered.turns_taken()
    record["load_started"], record["load_finished"] = (turns[-1].started, turns[-1].finished) if turns else \
        (started, time.time())
    record["model_bytes"] = model_bytes(model)
    return model


def ds_config(threshold: int = 0) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}


def model_bytes(model) -> int:
    """The whole 4-bit model as loaded: parameters plus the bitsandbytes quantization constants."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values()
                         if hasattr(t, "numel"))
    return total


def build_engine(model):
    """BeamLoRA on the 7 projections (seeded), then deepspeed.initialize: where ZeRO-3 partitions the model."""
    import deepspeed
    import torch

    from beamlora_ds import BeamLoRAConfig, apply, optimizer_param_groups
    from beamlora_ds.backends.deepspeed.zero_params import persistence_threshold_for

    torch.manual_seed(0)
    beam = apply(model, BeamLoRAConfig(r=8, interval=2, total_steps=10))
    groups = optimizer_param_groups(model, 0.0)
    config = ds_config(persistence_threshold_for(beam.modules))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-4),
                                      model_parameters=groups, config=config)
    return engine


def digests(module):
    """sha256 over every parameter gathered whole (collective; every process computes the same) and over this
    process's quantization constants (never partitioned, so each process's own)."""
    import hashlib

    import deepspeed
    import torch

    params, states = hashlib.sha256(), hashlib.sha256()
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            params.update(name.encode() + p.data.detach().contiguous().view(torch.uint8).numpy().tobytes())
        state = getattr(p, "quant_state", None)
        if state is not None:
            for key, value in sorted(state.as_dict(packed=True).items()):
                if torch.is_tensor(value):
                    states.update(key.encode() + value.contiguous().view(torch.uint8).numpy().tobytes())
    return params.hexdigest(), states.hexdigest()


if __name__ == "__main__":
    main()
