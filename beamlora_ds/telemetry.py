"""Where did the capacity go? A run's reset records: written to log.jsonl, read back, drawn by `beamlora-plot`.

    beamlora-plot outputs/run/log.jsonl allocation.png

A reset refills each pruned slot with a copy of one of the same module's strongest ranks (docs/method.md, section
4), so a module that loses k weak ranks gains k copies of strong ones. The picture is a layers x projections grid
of those k, summed over the run, next to the modules that gained the most copies (full names, also printed);
below it, the keep-fraction of each reset and how many ranks it moved.

Module names are read as `<stack>.<layer>.<projection>`: the first path component that is an integer is the
layer, the path before it the stack (one per model, two for encoder-decoder), the path after it the projection
(`model.layers.12.self_attn.q_proj` -> layer 12, `q_proj`). A name with no such component (`lm_head`) is listed
apart, never dropped.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


# ------------------------------------------------------------------------------------------- the log file
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


def read_resets(log_path: str) -> List[dict]:
    """The applied (not skipped) reset records, one per step: a step written twice (a controller's history
    written again after a resume) counts once, as last written."""
    by_step: Dict[int, dict] = {}
    for r in current_records(log_path):
        if r.get("type") == "reset":
            by_step[r["step"]] = r
    resets = sorted((r for r in by_step.values() if not r.get("skipped")), key=lambda r: r["step"])
    if not resets:
        raise ValueError(f"{log_path} has no reset records: the run ended before its first reset (interval steps).")
    return resets


def reset_log_record(record: dict) -> dict:
    """A BeamController reset record as log.jsonl holds it: `type: reset`, tuples as lists, anything else that
    JSON cannot hold as a string. The one encoding of `log_reset` and `RunLog.reset`."""
    if not isinstance(record, dict) or not {"step", "keep_fraction", "pruned"} <= set(record):
        raise ValueError(f"not a BeamLoRA reset record: {str(record)[:80]!r}; pass what BeamController.step() "
                         "returns at a reset, or an entry of beam.history.")
    encoded = json.dumps(record, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    return {"type": "reset", **json.loads(encoded)}


def is_log_writer() -> bool:
    """Whether this process writes the log: process 0 of an initialized torch.distributed group (DeepSpeed's
    included), or the only process. Every process holds the same reset records; one copy is enough."""
    from .ranks import is_process_zero

    return is_process_zero()


def log_reset(log_path: str, record: Optional[dict]) -> bool:
    """Append a reset record to `log_path` (a log.jsonl `beamlora-plot` reads) from your own training loop.

        record = beam.step(optimizer)
        log_reset("out/log.jsonl", record)       # None (no reset this step) writes nothing

    or after training: `for record in beam.history: log_reset(path, record)`. Only process 0 writes when
    torch.distributed is initialized, so every process may call it. Returns whether a line was written.
    """
    if record is None:
        return False
    line = json.dumps(reset_log_record(record))  # checked on every process, so all of them raise together
    if os.path.isdir(log_path):
        raise ValueError(f"{log_path} is a folder; pass the log file, e.g. {os.path.join(log_path, 'log.jsonl')}")
    if not is_log_writer():
        return False
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a") as f:
        f.write(line + "\n")
    return True


# ------------------------------------------------------------------------------------------- module names
class ModuleSite(NamedTuple):
    """Where a module sits: `stack` (the path before the layer number), `layer`, `projection` (the path after)."""
    stack: str
    layer: int
    projection: str


def parse_module_name(name: str) -> Optional[ModuleSite]:
    """`model.layers.12.mlp.down_proj` -> ('model.layers', 12, 'mlp.down_proj'); None without a layer number
    followed by a projection. The first integer is the layer, so the expert number of a mixture-of-experts
    layer (`layers.3.mlp.experts.7.w1`) or the sub-layer of a T5 block stays part of the projection."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ModuleSite(".".join(parts[:i]), int(part), ".".join(parts[i + 1:]))
    return None


def short_labels(paths: Iterable[str]) -> Dict[str, str]:
    """Each dotted path by its shortest trailing part that no other path ends with (never starting at a bare
    number): `self_attn.q_proj` -> `q_proj`, but GPT-2's `attn.c_proj` and `mlp.c_proj` stay whole."""
    paths = list(dict.fromkeys(paths))
    labels = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            tail = parts[-n:]
            clash = any(p != path and (p == ".".join(tail) or p.endswith("." + ".".join(tail))) for p in paths)
            if not clash and not tail[0].isdigit():
                break
        labels[path] = ".".join(tail)
    return labels


def merge_orders(sequences: Iterable[Sequence[str]]) -> List[str]:
    """One order consistent with every sequence (each in model order, each missing some items): a topological
    sort of their neighbour pairs, ties by first appearance. Items of an inconsistent cycle come last."""
    first: Dict[str, int] = {}
    after: Dict[str, set] = {}
    for seq in sequences:
        for item in seq:
            first.setdefault(item, len(first))
            after.setdefault(item, set())
        for a, b in zip(seq, seq[1:]):
            if a != b:
                after[a].add(b)
    waiting = {item: 0 for item in first}
    for item in first:
        for b in after[item]:
            waiting[b] += 1
    ready = [(first[item], item) for item, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: List[str] = []
    while ready:
        _, item = heapq.heappop(ready)
        order.append(item)
        for b in after[item]:
            waiting[b] -= 1
            if waiting[b] == 0:
                heapq.heappush(ready, (first[b], b))
    placed = set(order)
    return order + sorted((i for i in first if i not in placed), key=first.get)


# ------------------------------------------------------------------------------------------- counts
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


def projection_order(resets: Sequence[dict]) -> List[str]:
    """Projection paths in model order, merged from each reset's per-layer runs (a reset lists its modules in
    model order, but only those it touched)."""
    runs: Dict[tuple, List[str]] = {}
    for k, r in enumerate(resets):
        for name, _ in r["pruned"]:
            site = parse_module_name(name)
            if site is not None:
                run = runs.setdefault((k, site.stack, site.layer), [])
                if not run or run[-1] != site.projection:
                    run.append(site.projection)
    return merge_orders(runs.values())


def copies_gained(resets: Sequence[dict]) -> Dict[str, int]:
    """Ranks pruned and refilled per module over the run, in model order (stack, layer, projection; names without
    a layer number last). Modules that never moved are absent: the log names only what a reset touched."""
    counts: Dict[str, int] = {}
    for r in resets:
        for name, _ in r["pruned"]:
            counts[name] = counts.get(name, 0) + 1
    projection = {p: i for i, p in enumerate(projection_order(resets))}
    sites = {name: parse_module_name(name) for name in counts}
    stack = {s: i for i, s in enumerate(dict.fromkeys(site.stack for site in sites.values() if site))}
    first = {name: i for i, name in enumerate(counts)}

    def model_order(name):
        site = sites[name]
        return (0, stack[site.stack], site.layer, projection[site.projection]) if site else (1, first[name], 0, 0)

    return {name: counts[name] for name in sorted(counts, key=model_order)}


def top_modules(resets: Sequence[dict], n: int = 15) -> List[Tuple[str, int]]:
    """The `n` modules that gained the most copies, most first (ties in model order)."""
    return sorted(copies_gained(resets).items(), key=lambda item: -item[1])[:n]  # a stable sort: ties keep model order


class LayerGrid(NamedTuple):
    """counts[row, column]: ranks pruned and refilled over the run in one layer's projection. `rows` are layer
    numbers (led by the stack when a model has several), `columns` short projection names, `names[row][column]`
    the full module name (None where no module of the log sits), `unplaced` the (name, count) without a layer."""
    rows: List[str]
    columns: List[str]
    counts: np.ndarray
    names: List[List[Optional[str]]]
    unplaced: List[Tuple[str, int]]


def layer_grid(resets: Sequence[dict]) -> LayerGrid:
    """The layers x projections grid of `copies_gained`; every layer from 0 to the highest seen has a row."""
    totals = copies_gained(resets)
    sites = {name: parse_module_name(name) for name in totals}
    placed = [name for name in totals if sites[name] is not None]
    stacks = list(dict.fromkeys(sites[name].stack for name in placed))
    projections = projection_order(resets)
    column = {p: j for j, p in enumerate(projections)}
    stack_label = short_labels(stacks)
    row_keys = [(s, layer) for s in stacks
                for layer in range(1 + max(sites[n].layer for n in placed if sites[n].stack == s))]
    row = {key: i for i, key in enumerate(row_keys)}
    counts = np.zeros((len(row_keys), len(projections)), dtype=np.int64)
    names: List[List[Optional[str]]] = [[None] * len(projections) for _ in row_keys]
    for name in placed:
        i, j = row[sites[name][:2]], column[sites[name].projection]
        counts[i, j] += totals[name]
        names[i][j] = name
    rows = [str(layer) if len(stacks) == 1 else f"{stack_label[s]}.{layer}" for s, layer in row_keys]
    labels = short_labels(projections)
    return LayerGrid(rows, [labels[p] for p in projections], counts, names,
                     [(name, totals[name]) for name in totals if sites[name] is None])


def summary_lines(resets: Sequence[dict], top: int = 15) -> List[str]:
    """The text beside the grid and on stdout: the top modules by copies gained, then those without a layer."""
    steps = [r["step"] for r in resets]
    span = f"1 reset (step {steps[0]})" if len(steps) == 1 else f"{len(steps)} resets (steps {steps[0]}-{steps[-1]})"
    ranked = top_modules(resets, top)
    width = len(str(ranked[0][1])) if ranked else 1
    lines = [f"most copies gained over {span}:"] + [f"{count:>{width}}  {name}" for name, count in ranked]
    unplaced = layer_grid(resets).unplaced
    if unplaced and len(unplaced) == len(copies_gained(resets)):
        lines += ["", "no module name has a layer number (as in model.layers.3.q_proj): no grid"]
    elif unplaced:
        lines += ["", f"{len(unplaced)} modules without a layer number (not in the grid):"]
        lines += [f"{count:>{width}}  {name}" for name, count in unplaced[:top]]
        lines += [f"... and {len(unplaced) - top} more"] if len(unplaced) > top else []
    return lines


# ------------------------------------------------------------------------------------------- the picture
MAX_GRID_ROWS, MAX_GRID_COLUMNS = 160, 40  # beyond this the grid is unreadable: the list says it instead


def _draw_grid(fig, ax, grid: LayerGrid) -> None:
    from matplotlib.ticker import MaxNLocator

    rows, cols = grid.counts.shape
    if not rows or not cols or rows > MAX_GRID_ROWS or cols > MAX_GRID_COLUMNS:
        ax.axis("off")
        why = "no module name has a layer number" if not rows else f"{rows} layers x {cols} projections: too large"
        ax.text(0.5, 0.5, f"no layers x projections grid\n({why})\nsee the list", ha="center", va="center",
                transform=ax.transAxes)
        return
    image = ax.imshow(grid.counts, aspect="auto", cmap="magma_r", vmin=0, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, label="ranks pruned and refilled (copies gained)", fraction=0.08, pad=0.03)
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    slanted = max(map(len, grid.columns)) > 6
    ax.xaxis.tick_top()
    ax.set_xticks(range(cols), grid.columns, rotation=40 if slanted else 0, ha="left" if slanted else "center",
                  rotation_mode="anchor", fontsize=8)
    step = max(1, rows // 60)
    ax.set_yticks(range(0, rows, step), grid.rows[::step], fontsize=7 if rows > 24 else 9)
    ax.set_ylabel("layer")
    if rows * cols <= 800:
        vmax = max(1, int(grid.counts.max()))
        for (i, j), value in np.ndenumerate(grid.counts):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=6 if rows > 24 else 8,
                        color="white" if value > 0.6 * vmax else "black")


def _draw_moves(ax, resets: Sequence[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in resets]
    bars = ax.bar(range(len(steps)), [len(r["pruned"]) for r in resets], color="tab:blue", alpha=0.6)
    ax.bar_label(bars, fontsize=8)
    ax.margins(y=0.15)
    ax.set_ylabel("ranks moved")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    twin = ax.twinx()
    twin.plot(range(len(steps)), [r["keep_fraction"] for r in resets], "o-", color="tab:red", label="keep-fraction")
    twin.set_ylabel("keep-fraction p(t)")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_xlabel("reset at step")


def plot_allocation(log_path: str, out_png: str, top: int = 15) -> str:
    """Draw the log's rank reallocation into `out_png` (which it replaces); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    resets = read_resets(log_path)
    grid, text = layer_grid(resets), summary_lines(resets, top)
    rows, cols = grid.counts.shape
    grid_w = 2.2 + 0.6 * min(max(cols, 3), MAX_GRID_COLUMNS)
    text_w = 0.5 + 0.068 * max(map(len, text))
    top_h = min(20.0, max(4.0, 1.6 + 0.2 * min(rows, MAX_GRID_ROWS), 0.8 + 0.16 * len(text)))
    fig = plt.figure(figsize=(grid_w + text_w, top_h + 2.6))
    spec = fig.add_gridspec(2, 2, width_ratios=[grid_w, text_w], height_ratios=[top_h, 2.6])
    grid_ax, text_ax, moves_ax = fig.add_subplot(spec[0, 0]), fig.add_subplot(spec[0, 1]), fig.add_subplot(spec[1, :])
    _draw_grid(fig, grid_ax, grid)
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, "\n".join(text), va="top", ha="left", family="monospace", fontsize=8,
                 transform=text_ax.transAxes)
    _draw_moves(moves_ax, resets)
    fig.suptitle(f"BeamLoRA rank reallocation: {sum(len(r['pruned']) for r in resets)} ranks moved in "
                 f"{len(copies_gained(resets))} modules over {len(resets)} resets")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def main(argv=None):
    parser = argparse.ArgumentParser(prog="beamlora-plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="log.jsonl written by launch/train.py or by telemetry.log_reset")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--top", type=int, default=15, help="how many modules the list names (default: 15)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    try:
        resets = read_resets(args.log)
        print("\n".join(summary_lines(resets, args.top)))
        print(f"wrote {plot_allocation(args.log, args.out, args.top)}")
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
