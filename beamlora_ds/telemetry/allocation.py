"""Where did the capacity go? A run's reset records counted per module and placed on a layers x projections grid.

A reset refills each pruned slot with a copy of one of the same module's strongest ranks (docs/method.md, section
4), so a module that loses k weak ranks gains k copies of strong ones. Module names are read as
`<stack>.<layer>.<projection>`: the first path component that is an integer is the layer, the path before it the
stack (one per model, two for encoder-decoder), the path after it the projection
(`model.layers.12.self_attn.q_proj` -> layer 12, `q_proj`). A name with no such component (`lm_head`) is listed
apart, never dropped.
"""
from __future__ import annotations

import heapq
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


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
