"""The start-up of a run against model size and processes per node, bf16 and 4-bit under ZeRO-3, extrapolated to
Llama-2-70B on 8 GPUs per node.

    python benchmarks/startup_scale.py                       # 3 sizes x 1, 2 processes x bf16, nf4: ~10 min here
    python benchmarks/startup_scale.py --quick --json out.json   # the ~10M model only (the CI smoke test)
    python benchmarks/startup_scale.py --from_json benchmarks/results/startup_scale.json --nvme_gbps 6   # refit

Each size (a Llama built from a config, no download: "tiny" ~10M, "smollm2-135m" SmolLM2-135M's shape, "0.48b"
load_memory.py's 478M shape) is saved once in bf16 to a temporary folder. For each number of processes and mode,
--repeats launches (in passes over all configurations; the one with the shortest load is kept: other work on a
shared machine only adds time) of this file's worker (beamlora_ds.testing, as the tests launch) load it the way
launch/train.py does (`loading.models.load_for_training`):
  bf16  ZeRO-3, partitioned while it loads (transformers' zero.Init through HfDeepSpeedConfig; only global rank 0
        copies the checkpoint's values, the other processes read its header only: see docs/recipes.md)
  nf4   4-bit NF4 under ZeRO-3 (`load_4bit_model`), one process per node at a time (BEAMLORA_DS_4BIT_LOAD=turns);
        with 2 processes also `turns:2` (both at once, then partitioned from rank 0's copy): the K-loaders question
then applies BeamLoRA (r = 8, 7 projections) and calls deepspeed.initialize, then takes one training step (32
tokens). The checkpoint's pages are dropped from the page cache before every launch (posix_fadvise), so the first
read comes from the disk. Measured:
  - the load time: the first process starting to load to the last one done with deepspeed.initialize (and the
    start-up before it, the first step after it);
  - host memory, sampled every 20 ms by this parent: the node's anonymous memory (summed over its processes at the
    same instant) above the processes' baselines after their imports, and each process's own, while loading (until
    every process has its model, partitioned) and through deepspeed.initialize;
  - which processes read the checkpoint's bytes: each process's file-backed peak (RssFile above its baseline; also,
    about once a second, the resident pages of its mappings of the checkpoint in /proc/<pid>/smaps);
  - the share of the machine's CPU that other work took during the launch ("others").
A cost model is fitted per mode and extrapolated to Llama-2-70B x 8 processes per node (startup_fit.py), marked
EXTRAPOLATED; the assumptions (this disk's and page cache's measured read speed, an assumed NVMe speed, this
machine's cores) are printed and saved.
Writes benchmarks/results/startup_scale.json (with --quick only when --json is given).
"""
import argparse
import glob
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import startup_fit  # noqa: E402
from host_memory import (MiB, NodeSampler, busy_cpu_s, evict, read_speed, save_random_llama,  # noqa: E402
                         status_bytes, write_result)

SIZES = {
    "tiny": {"hidden": 512, "intermediate": 1376, "layers": 2, "heads": 4, "kv_heads": 4, "vocab": 4096,
             "tied": False},
    "smollm2-135m": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152,
                     "tied": True},
    "0.48b": {"hidden": 1280, "intermediate": 3456, "layers": 20, "heads": 10, "kv_heads": 10, "vocab": 32000,
              "tied": False},
}
MODES = ("bf16", "nf4")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of " + ", ".join(SIZES))
    p.add_argument("--nprocs", default="1,2", help="processes per node, comma-separated")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--at_once", type=int, default=2, help="also nf4 with this many loaders per node at the largest "
                                                          "--nprocs (0: not)")
    p.add_argument("--nvme_gbps", type=float, default=3.0, help="assumed read speed of a GPU node's NVMe (GB/s)")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="launches per configuration; the fastest is kept")
    p.add_argument("--quick", action="store_true", help="the tiny model only, once: about a minute")
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch before it is killed")
    p.add_argument("--json", default=None, help="where to write (default benchmarks/results/startup_scale.json)")
    p.add_argument("--from_json", default=None, help="refit and extrapolate an earlier run's measurements")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--out_dir", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "tiny", 1
    unknown = sorted(set(args.sizes.split(",")) - set(SIZES)) + sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        p.error(f"unknown sizes or modes: {unknown}")
    return args


# --------------------------------------------------------------------------------------- launcher side
def save_model(shape: dict, folder: str) -> int:
    """A random Llama of `shape`, saved in bf16 (safetensors); returns its parameter count."""
    return save_random_llama(folder, vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                             num_hidden_layers=shape["layers"], intermediate_size=shape["intermediate"],
                             num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                             tie_word_embeddings=shape["tied"])


def launch(args, size: str, model_dir: str, mode: str, nproc: int, at_once: int) -> dict:
    """One launch; the point it measured (times, memory, the per-process records)."""
    from beamlora_ds import testing

    evict(model_dir)
    with tempfile.TemporaryDirectory(prefix="beamlora_startup_") as out_dir:
        cmd = testing.spawn_command(os.path.abspath(__file__), ["--worker", "--model_dir", model_dir, "--mode", mode,
                                                                "--out_dir", out_dir], nproc)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   BEAMLORA_DS_4BIT_LOAD=f"turns:{at_once}")
        launched, busy, own = time.time(), busy_cpu_s(), time.process_time()
        with NodeSampler(out_dir, mapped_under=model_dir, phase_marker=".loaded") as sampler:
            proc = testing.run(cmd, args.timeout, cwd=ROOT, env=env)
        wall, busy, own = time.time() - launched, busy_cpu_s() - busy, time.process_time() - own
        if proc.returncode != 0:
            raise RuntimeError(f"{size} {mode} x{nproc}: the launch failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        records = []
        for path in sorted(glob.glob(os.path.join(out_dir, "rank*.json"))):
            with open(path) as f:
                record = json.load(f)
            rank = str(record["rank"])
            record.update(peak_anon=sampler.peak_anon.get(rank, 0), peak_file=sampler.peak_file.get(rank, 0),
                          peak_checkpoint_mapped=sampler.peak_mapped.get(rank, 0),
                          peak_anon_loading=sampler.phase_peak_anon.get(rank, 0))
            records.append(record)
    result = point(size, mode, nproc, at_once, launched, records, sampler)
    others = busy - own - sum(r["cpu_total"] for r in records)  # CPU time of everything else on the machine
    result["others_cpu_share"] = max(0.0, others) / (wall * (os.cpu_count() or 1))
    return result


def point(size, mode, nproc, at_once, launched, records, sampler) -> dict:
    first = min(r["load_started"] for r in records)
    baselines = sum(r["baseline_anon"] for r in records)
    shape = SIZES[size]
    counts = startup_fit.llama_counts(shape)
    return {"size": size, "mode": mode, "nproc": nproc, "at_once": at_once,
            "parameters": counts["total"], "tensors": counts["tensors"],
            "checkpoint_bytes": startup_fit.checkpoint_bytes(shape),
            "model_bytes": startup_fit.model_bytes(shape, mode),
            "constant_bytes": startup_fit.constant_bytes(shape, mode),
            "startup_s": first - launched,
            "load_s": max(r["initialized"] for r in records) - first,
            "from_pretrained_s": max(r["loaded"] for r in records) - first,
            "initialize_s": max(r["initialized"] for r in records) - max(r["loaded"] for r in records),
            "first_step_s": max(r["stepped"] for r in records) - max(r["initialized"] for r in records),
            "to_first_step_s": max(r["stepped"] for r in records) - launched,
            "node_peak_loading_above_baseline": sampler.phase_node_anon - baselines,
            "process_peak_loading_above_baseline": max(r["peak_anon_loading"] - r["baseline_anon"] for r in records),
            "node_peak_above_baseline": sampler.node_anon - baselines,
            "node_after_init_above_baseline": sum(r["after_init_anon"] for r in records) - baselines,
            "process_peak_above_baseline": max(r["peak_anon"] - r["baseline_anon"] for r in records),
            "checkpoint_pages_mapped": {str(r["rank"]): r["peak_checkpoint_mapped"] for r in records},
            "file_pages_above_baseline": {str(r["rank"]): r["peak_file"] - r["baseline_file"] for r in records},
            "processes": records}


def configurations(args) -> list:
    """(size, mode, processes, loaders at once) of every launch of one pass."""
    nprocs, modes = [int(n) for n in args.nprocs.split(",")], args.modes.split(",")
    found = []
    for size in args.sizes.split(","):
        for nproc in nprocs:
            found += [(size, mode, nproc, 1) for mode in modes]
            if nproc == max(nprocs) > 1 and args.at_once > 1 and "nf4" in modes:
                found.append((size, "nf4", nproc, args.at_once))
    return found


def measure(args) -> tuple:
    """Every configuration --repeats times (in passes, so a busy spell of the machine hits different ones); per
    configuration the launch with the shortest load is kept (other work on a shared machine only adds time)."""
    launches = []
    with tempfile.TemporaryDirectory(prefix="beamlora_startup_models_") as root:
        for size in args.sizes.split(","):
            save_model(SIZES[size], os.path.join(root, size))
        for _ in range(args.repeats):
            for size, mode, nproc, at_once in configurations(args):
                launches.append(launch(args, size, os.path.join(root, size), mode, nproc, at_once))
                print(line(launches[-1]), flush=True)
        largest = os.path.join(root, max(args.sizes.split(","), key=lambda s: startup_fit.checkpoint_bytes(SIZES[s])))
        speeds = {"disk_bytes_per_s": read_speed(largest, cold=True),
                  "page_cache_bytes_per_s": read_speed(largest, cold=False), "measured_on": os.path.basename(largest)}
    points = {}
    for p in launches:
        key = (p["size"], p["mode"], p["nproc"], p["at_once"])
        if key not in points or p["load_s"] < points[key]["load_s"]:
            points[key] = p
    return list(points.values()), speeds, launches


# ------------------------------------------------------------------------------------------- reporting
HEADER = (f"{'size':<13}{'mode':<5}{'P':>2}{'K':>2}{'start':>6}{'load':>6}{'(read':>6}{'init)':>6}{'step':>5}"
          f"{'total':>6}{'node':>6}{'proc':>6}{'node':>6}{'after':>6}{'others':>7}  file pages MiB\n"
          f"{'':<34}(node, proc: peaks while loading; node: through initialize; after: after it)\n"
          f"{'':<34}(file pages: each process's peak RssFile above its baseline: the checkpoint pages it read, plus "
          f"~10 MiB of libraries)")


def line(p: dict) -> str:
    mapped = ", ".join(f"r{rank} {value / MiB:.0f}" for rank, value in sorted(p["file_pages_above_baseline"].items()))
    mib = [p[k] / MiB for k in ("node_peak_loading_above_baseline", "process_peak_loading_above_baseline",
                                "node_peak_above_baseline", "node_after_init_above_baseline")]
    return (f"{p['size']:<13}{p['mode']:<5}{p['nproc']:>2}{p['at_once']:>2}{p['startup_s']:>6.1f}{p['load_s']:>6.1f}"
            f"{p['from_pretrained_s']:>6.1f}{p['initialize_s']:>6.1f}{p['first_step_s']:>5.1f}"
            f"{p['to_first_step_s']:>6.1f}" + "".join(f"{v:>6.0f}" for v in mib) +
            f"{p.get('others_cpu_share', 0) * 100:>6.0f}%  {mapped}")


def loaders_at_once(points: list) -> list:
    """Each nf4 point with K > 1 loaders against K = 1 at the same size and P: load time and node peak ratios."""
    one = {(p["size"], p["nproc"]): p for p in points if p["mode"] == "nf4" and p["at_once"] == 1}
    return [{"size": p["size"], "nproc": p["nproc"], "at_once": p["at_once"],
             "load_ratio": p["load_s"] / base["load_s"],
             "node_peak_loading_ratio": p["node_peak_loading_above_baseline"] /
             base["node_peak_loading_above_baseline"]}
            for p in points if p["mode"] == "nf4" and p["at_once"] > 1
            for base in [one.get((p["size"], p["nproc"]))] if base]


def analyse(points: list, speeds: dict, args) -> dict:
    assumptions = {"nvme_bytes_per_s": args.nvme_gbps * startup_fit.GB, "cpu_cores_here": os.cpu_count(),
                   "disk_bytes_per_s_here": speeds["disk_bytes_per_s"],
                   "page_cache_bytes_per_s": speeds["page_cache_bytes_per_s"]}
    for p in points:  # older results (--from_json) lack it
        p.setdefault("constant_bytes", startup_fit.constant_bytes(SIZES[p["size"]], p["mode"]))
    result = {"benchmark": "startup_scale", "quick": args.quick, "shapes": SIZES, "points": points,
              "speeds": speeds, "assumptions": assumptions, "loaders_at_once": loaders_at_once(points),
              "fits": {}, "extrapolated_70b": {}}
    for mode in sorted({p["mode"] for p in points}):
        fits = startup_fit.fit_mode([p for p in points if p["mode"] == mode])
        result["fits"][mode] = fits
        options = [1] if mode == "bf16" else sorted({1, 2, 4, args.gpus_per_node})
        result["extrapolated_70b"][mode] = [startup_fit.extrapolate(mode, fits, assumptions, args.gpus_per_node, k)
                                            for k in options]
    return result


def report_fits(result: dict) -> None:
    for mode, fits in result["fits"].items():
        (a, u, b, v, c), (a2, b2, c2), q = fits["time_full"], fits["time_bytes_only"], fits["process_memory"]
        extra = "turns" if mode == "nf4" else "P"
        print(f"\nfit {mode} ({fits['points']} points): load s = {a:.2f} + {u * 1e3:.1f} ms x T + {b * 1e9:.2f} s/GB "
              f"x B + ({v * 1e3:.1f} ms x T + {c * 1e9:.2f} s/GB x B) x ({extra} - 1)\n   bytes only: load s = "
              f"{a2:.2f} + {b2 * 1e9:.2f} s/GB x B + {c2 * 1e9:.2f} s/GB x B x ({extra} - 1)\n   one process's peak "
              f"while loading = {q[0] / MiB:.0f} MiB + {q[1]:.2f} M")
        m = fits["node_memory"]
        if m is not None:
            rest = f"{m[2] / MiB:.0f} MiB x (P - 1)" if mode == "bf16" else "P x C (each process's constants)"
            print(f"   node peak while loading = {m[0] / MiB:.0f} MiB + {m[1]:.2f} M + {rest}   ({fits['node_points']} "
                  f"points; T tensors, B bf16 checkpoint bytes, M model bytes as loaded)")
        for r in fits["residuals"]:
            peak, fitted = r["node_peak_loading_above_baseline"]
            fitted = "" if fitted is None else f" (fit {fitted / MiB:.0f})"
            print(f"   {r['size']:<13} P={r['nproc']}: load {r['load_s'][0]:.1f} s (fit {r['load_s'][1]:.1f}), node "
                  f"peak while loading {peak / MiB:.0f} MiB{fitted}")


def report(result: dict) -> None:
    print("\nMeasured (seconds; MiB above the processes' baselines; P processes, K loading at once):")
    print(HEADER)
    for p in result["points"]:
        print(line(p))
    s, a = result["speeds"], result["assumptions"]
    print(f"\nThis machine: {a['cpu_cores_here']} CPU cores, disk {s['disk_bytes_per_s'] / 1e9:.2f} GB/s cold, page "
          f"cache {s['page_cache_bytes_per_s'] / 1e9:.1f} GB/s (one sequential reader); assumed NVMe "
          f"{a['nvme_bytes_per_s'] / 1e9:.1f} GB/s")
    for k in result["loaders_at_once"]:
        print(f"nf4 {k['size']}, P={k['nproc']}: K={k['at_once']} loaders at once against one: load x"
              f"{k['load_ratio']:.2f}, node peak while loading x{k['node_peak_loading_ratio']:.2f}")
    report_fits(result)
    print("\nEXTRAPOLATED to Llama-2-70B (68.98e9 parameters, bf16 checkpoint 138 GB, whole 4-bit model 36.4 GB), one "
          "node:")
    print(f"{'mode':<6}{'P':>3}{'K':>3}{'turns':>6}{'load, this machine':>20}{'(bytes only)':>13}"
          f"{'disk floor cached':>19}{'uncached':>10}{'node peak GB':>14}{'process peak GB':>17}")
    for mode, rows in result["extrapolated_70b"].items():
        for e in rows:
            here = [e[k] for k in ("load_s_at_this_machines_speed", "load_s_at_this_machines_speed_bytes_only")]
            here = ["n/a" if h is None else f"{h / 60:.0f} min" for h in here]
            node = e["node_peak_loading_above_baselines_bytes"]
            node = "n/a" if node is None else f"{node / 1e9:.1f}"
            print(f"{mode:<6}{e['nproc']:>3}{e['at_once']:>3}{e['turns']:>6}{here[0]:>20}{here[1]:>13}"
                  f"{e['load_s_disk_floor_cached']:>17.0f} s{e['load_s_disk_floor_uncached']:>8.0f} s{node:>14}"
                  f"{e['process_peak_loading_above_baseline_bytes'] / 1e9:>17.1f}")
    print("(this machine: the fitted times, CPU-bound here (n/a for K > 1: here K loads share the same cores); disk "
          "floor: reading the checkpoint only, at the assumed NVMe speed, later turns from the page cache (cached) or "
          "the disk (uncached); peaks while loading, as measured here where the accelerator is the CPU: device memory "
          "counts as host memory; add each process's baseline)")


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.from_json:
        with open(args.from_json) as f:
            old = json.load(f)
        points, speeds, launches = old["points"], old["speeds"], old.get("launches", [])
    else:
        points, speeds, launches = measure(args)
    result = analyse(points, speeds, args)
    result["launches"] = launches
    report(result)
    write_result(result, args.json, args.quick, "startup_scale.json")


# ------------------------------------------------------------------------------------------ worker side
def worker(args):
    started = time.time()
    from beamlora_ds.train import processes

    rank, _ = processes.init_distributed(600)
    with open(os.path.join(args.out_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    import importlib

    import deepspeed.comm as dist
    import load_memory  # its build_engine and ds_config

    from beamlora_ds.loading.models import load_for_training

    for library in ("transformers.models.llama.modeling_llama", "bitsandbytes"):  # before the baseline
        importlib.import_module(library)

    dist.barrier()
    status = status_bytes()
    record = {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "mode": args.mode,
              "process_started": started, "baseline_anon": status["RssAnon"], "baseline_file": status["RssFile"],
              "load_started": time.time(), "cpu_at_load_start": time.process_time()}
    model = load_for_training(args.model_dir, _bf16(), load_memory.ds_config(), four_bit=args.mode == "nf4")
    record.update(loaded=time.time(), cpu_at_loaded=time.process_time(), after_load_anon=status_bytes()["RssAnon"],
                  turns=_turns())
    open(os.path.join(args.out_dir, f"rank{rank}.loaded"), "w").close()  # the loading phase's peaks end here
    engine = load_memory.build_engine(model)
    record.update(initialized=time.time(), after_init_anon=status_bytes()["RssAnon"], vm_hwm=status_bytes()["VmHWM"])
    dist.barrier()
    open(os.path.join(args.out_dir, f"rank{rank}.measured"), "w").close()  # the parent stops sampling here
    first_step(engine)
    record.update(stepped=time.time(), cpu_total=time.process_time())
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    processes.release_shm_buffers(dist)


def _bf16():
    import torch

    return torch.bfloat16


def _turns() -> list:
    from beamlora_ds.loading import staggered

    return [[t.turn, t.turns, t.started, t.finished] for t in staggered.turns_taken()]


def first_step(engine) -> None:
    """One training step on 32 random tokens (the same on every process)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.module.config.vocab_size, (1, 32), generator=generator)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


if __name__ == "__main__":
    main()
