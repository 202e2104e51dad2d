"""The start-up cost model of benchmarks/startup_scale.py: fitted to its measurements, extrapolated to Llama-2-70B
on 8 processes (GPUs) per node. Pure arithmetic (numpy), so tests/benchmarks/test_startup_scale_smoke.py checks it
against hand-computed values.

One measured launch is a point: mode ("bf16": ZeRO-3, partitioned while it loads; "nf4": 4-bit, in turns), P
processes on one node, `at_once` (K) of them loading at a time (nf4), T parameter tensors, B bytes of bf16
checkpoint, M bytes of the model as it loads (bf16: B; nf4: the whole 4-bit model), C bytes of 4-bit quantization
constants (every process keeps its own whole set: they are not partitioned). Fitted by non-negative least squares on
relative error (benchmarks/reset_scaling.py's `nnls`), on the points with one loader at a time:
  load time (s)       t = a + u T + b B + (v T + c B) x      x = turns - 1 (nf4: each later turn is one more load)
                                                             x = P - 1     (bf16: rank 0 reads; each more process
                                                                            is one more to gather and broadcast to)
      per tensor and per byte: the smaller models have more, smaller tensors per byte, and per-tensor costs showed
      (SmolLM2-135M's 272 tensors took longer per byte than the 478M model's 183). With 6 points this leaves one
      degree of freedom, so the bytes-only model t = a + b B + c B x is fitted and extrapolated beside it.
  one process's peak while loading, above its baseline      p = c1 + f M
  the node's peak while loading (summed over its processes at the same instant), above their baselines:
      bf16   n = c0 + d M + e (P - 1)     (the shards sum to M whatever P; e: what each more process adds)
      nf4    n = c0 + d M + P C           fitted on P >= 2 (the whole model on rank 0 being partitioned while the
                                          others hold shards and their constants, a phase one process does not
                                          have: there deepspeed.initialize partitions); P C is not fitted, it is
                                          each process's constants
             with K > 1 loaders: max(n, K p + (P - K) C)  (K whole loads at once, the others' constants)
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reset_scaling import nnls  # noqa: E402  (beside this file)

LLAMA2_70B = {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 32000,
              "tied": False}
NF4_CONSTANT_BYTES_PER_WEIGHT = 1 / 64 + 4 / (64 * 256)  # an 8-bit absmax per 64 weights, an fp32 one per 256 of those
NF4_BYTES_PER_WEIGHT = 0.5 + NF4_CONSTANT_BYTES_PER_WEIGHT
TIME_MODELS = ("full", "bytes_only")
GB = 1e9


def llama_counts(shape: dict) -> dict:
    """Parameters of a Llama: `linear` (the decoder's projections, which NF4 quantizes), `other` (embeddings,
    lm_head unless tied, norms: kept in 16 bits), `total`, and the number of parameter `tensors`."""
    h, i, layers, head_dim = shape["hidden"], shape["intermediate"], shape["layers"], shape["hidden"] // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    embeddings = 1 if shape["tied"] else 2
    other = shape["vocab"] * h * embeddings + (2 * layers + 1) * h
    return {"linear": linear, "other": other, "total": linear + other, "tensors": 9 * layers + 1 + embeddings}


def checkpoint_bytes(shape: dict) -> int:
    """The bf16 safetensors checkpoint every mode reads (2 bytes per parameter)."""
    return 2 * llama_counts(shape)["total"]


def model_bytes(shape: dict, mode: str) -> float:
    """The whole model as one process loads it: bf16 2 bytes per parameter; nf4 NF4_BYTES_PER_WEIGHT per linear
    weight (double quantization) + 2 per other parameter."""
    counts = llama_counts(shape)
    if mode == "bf16":
        return 2.0 * counts["total"]
    return NF4_BYTES_PER_WEIGHT * counts["linear"] + 2.0 * counts["other"]


def constant_bytes(shape: dict, mode: str) -> float:
    """The quantization constants one process holds whole (nf4; 0 for bf16)."""
    return NF4_CONSTANT_BYTES_PER_WEIGHT * llama_counts(shape)["linear"] if mode == "nf4" else 0.0


def turns(nproc: int, at_once: int) -> int:
    return math.ceil(nproc / at_once)


def time_row(model: str, mode: str, nproc: int, at_once: int, tensors: int, checkpoint: float) -> list:
    extra = turns(nproc, at_once) - 1 if mode == "nf4" else nproc - 1
    if model == "bytes_only":
        return [1.0, checkpoint, checkpoint * extra]
    return [1.0, tensors, checkpoint, tensors * extra, checkpoint * extra]


def node_row(mode: str, nproc: int, model: float) -> list:
    return [1.0, model] if mode == "nf4" else [1.0, model, nproc - 1.0]


def node_target(p: dict) -> float:
    """What the node fit explains: the peak, less each process's constants for nf4 (those are not fitted)."""
    return p["node_peak_loading_above_baseline"] - p["nproc"] * p.get("constant_bytes", 0.0)


def fit(rows: list, values: list) -> list:
    """Non-negative coefficients minimising the relative error of `rows @ x` against `values`."""
    import numpy as np

    A, b = np.array(rows, dtype=float), np.array(values, dtype=float)
    return [float(x) for x in nnls(A / b[:, None], np.ones_like(b))]


def predict(coefficients: list, row: list) -> float:
    return sum(c * r for c, r in zip(coefficients, row))


def fit_mode(points: list) -> dict:
    """The fits of one mode's points (one loader at a time), with each point's prediction."""
    points = [p for p in points if p.get("at_once", 1) == 1]
    mode = points[0]["mode"]
    node_points = [p for p in points if mode == "bf16" or p["nproc"] >= 2]
    fits = {"points": len(points), "node_points": len(node_points)}
    for model in TIME_MODELS:
        fits[f"time_{model}"] = fit([time_row(model, mode, p["nproc"], 1, p["tensors"], p["checkpoint_bytes"])
                                     for p in points], [p["load_s"] for p in points])
    fits["process_memory"] = fit([[1.0, p["model_bytes"]] for p in points],
                                 [p["process_peak_loading_above_baseline"] for p in points])
    fits["node_memory"] = fit([node_row(mode, p["nproc"], p["model_bytes"]) for p in node_points],
                              [node_target(p) for p in node_points]) if node_points else None
    fits["residuals"] = [residual(p, fits, p in node_points) for p in points]
    return fits


def residual(p: dict, fits: dict, in_node_fit: bool) -> dict:
    """A point's measured load time and node peak beside the fitted models' values."""
    mode, nproc = p["mode"], p["nproc"]
    load = predict(fits["time_full"], time_row("full", mode, nproc, 1, p["tensors"], p["checkpoint_bytes"]))
    node = predict(fits["node_memory"], node_row(mode, nproc, p["model_bytes"])) + \
        nproc * p.get("constant_bytes", 0.0) if in_node_fit else None
    return {"size": p["size"], "nproc": nproc, "load_s": [p["load_s"], load],
            "node_peak_loading_above_baseline": [p["node_peak_loading_above_baseline"], node]}


def extrapolate(mode: str, fits: dict, assumptions: dict, nproc: int = 8, at_once: int = 1) -> dict:
    """Llama-2-70B on one node of `nproc` processes, from the fitted models (this machine's speeds; not for
    `at_once` > 1, which here only makes the loads share the same two cores), plus the disk-bound floor on a node
    with the assumed NVMe read speed: rank 0 reads the checkpoint once (bf16); each turn reads it (nf4), the first
    from the disk, the later ones from the page cache when it holds the checkpoint (`cached`: at the measured
    page-cache speed, never slower than the disk) or from the disk again (`uncached`); loaders of one turn share
    one read. Memory while loading as measured here, where the accelerator is the CPU (device memory is host
    memory). Every figure here is EXTRAPOLATED."""
    B, M, C = checkpoint_bytes(LLAMA2_70B), model_bytes(LLAMA2_70B, mode), constant_bytes(LLAMA2_70B, mode)
    T = llama_counts(LLAMA2_70B)["tensors"]
    n_turns = turns(nproc, at_once) if mode == "nf4" else 1
    one_read, later = B / assumptions["nvme_bytes_per_s"], (n_turns - 1) * B
    process = predict(fits["process_memory"], [1.0, M])
    node = None if fits["node_memory"] is None else predict(fits["node_memory"], node_row(mode, nproc, M)) + nproc * C
    if mode == "nf4" and at_once > 1 and node is not None:
        node = max(node, min(at_once, nproc) * process + max(0, nproc - at_once) * C)
    here = {model: predict(fits[f"time_{model}"], time_row(model, mode, nproc, at_once, T, B)) if at_once == 1
            else None for model in TIME_MODELS}
    return {"extrapolated": True, "model": "Llama-2-70B", "mode": mode, "nproc": nproc, "at_once": at_once,
            "turns": n_turns, "tensors": T, "checkpoint_bytes": B, "model_bytes": M, "constant_bytes": C,
            "load_s_at_this_machines_speed": here["full"], "load_s_at_this_machines_speed_bytes_only":
            here["bytes_only"],
            "load_s_disk_floor_cached": one_read + later / max(assumptions["page_cache_bytes_per_s"],
                                                                assumptions["nvme_bytes_per_s"]),
            "load_s_disk_floor_uncached": one_read + later / assumptions["nvme_bytes_per_s"],
            "node_peak_loading_above_baselines_bytes": node, "process_peak_loading_above_baseline_bytes": process}
