"""Where did the capacity go? Rank-allocation pictures from a run's log.jsonl (reset records).

    beamlora-plot outputs/run/log.jsonl allocation.png

A reset refills each pruned slot with a copy of one of the same module's strongest ranks, so a module that
loses k weak ranks gains k copies of strong ones: the heatmap shows k per module (rows) and reset (columns).
Below it, the keep-fraction of each reset and how many ranks it moved.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np


def read_resets(log_path: str) -> List[dict]:
    resets = [r for r in current_records(log_path) if r.get("type") == "reset" and not r.get("skipped")]
    if not resets:
        raise ValueError(f"{log_path} has no reset records: the run ended before its first reset (interval steps).")
    return resets


def current_records(log_path: str) -> List[dict]:
    """The log's records as of the run's final state: a `resume` record at step s supersedes what the
    interrupted run logged after step s (those steps were redone from the checkpoint)."""
    records: List[dict] = []
    with open(log_path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("type") == "resume":
                records = [r for r in records if r.get("step") is None or r["step"] <= record["step"]]
            records.append(record)
    return records


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def allocation_matrix(resets: Sequence[dict]) -> Tuple[List[str], List[int], np.ndarray]:
    """(module names, reset steps, counts[module, reset] = ranks pruned and refilled)."""
    modules = sorted({name for r in resets for name, _ in r["pruned"]}, key=_natural_key)
    index: Dict[str, int] = {name: i for i, name in enumerate(modules)}
    counts = np.zeros((len(modules), len(resets)), dtype=np.int64)
    for k, r in enumerate(resets):
        for name, _ in r["pruned"]:
            counts[index[name], k] += 1
    return modules, [r["step"] for r in resets], counts


def plot_allocation(log_path: str, out_png: str, max_label_rows: int = 60) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resets = read_resets(log_path)
    modules, steps, counts = allocation_matrix(resets)
    height = min(14.0, 2.5 + 0.18 * max(len(modules), 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 1.2 + 0.5 * len(steps)), height + 2.5),
                                      gridspec_kw={"height_ratios": [height, 2.5]})
    image = top.imshow(counts if len(modules) else np.zeros((1, len(steps))), aspect="auto", cmap="magma_r",
                       interpolation="nearest")
    fig.colorbar(image, ax=top, label="ranks pruned and refilled")
    top.set_xticks(range(len(steps)), [str(s) for s in steps])
    top.set_xlabel("reset at step")
    if len(modules) <= max_label_rows:
        top.set_yticks(range(len(modules)), [m.replace("model.layers.", "L").replace("self_attn.", "")
                                             .replace("mlp.", "") for m in modules], fontsize=6)
    else:
        top.set_ylabel(f"{len(modules)} modules (in layer order)")
    top.set_title("BeamLoRA rank reallocation per module")
    moved = counts.sum(axis=0)
    bottom.bar(range(len(steps)), moved, color="tab:blue", alpha=0.6, label="ranks moved")
    bottom.set_ylabel("ranks moved")
    twin = bottom.twinx()
    twin.plot(range(len(steps)), [r["keep_fraction"] for r in resets], "o-", color="tab:red", label="keep-fraction")
    twin.set_ylabel("keep-fraction p(t)")
    bottom.set_xticks(range(len(steps)), [str(s) for s in steps])
    bottom.set_xlabel("reset at step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def main(argv=None):
    parser = argparse.ArgumentParser(prog="beamlora-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="log.jsonl written by launch/train.py")
    parser.add_argument("out", help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        print(plot_allocation(args.log, args.out))
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
