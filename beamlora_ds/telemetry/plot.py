"""`beamlora-plot`: the picture of a run's rank reallocation (allocation.py's grid next to the modules that gained
the most copies; below it, the keep-fraction of each reset and how many ranks it moved).

    beamlora-plot outputs/run/log.jsonl allocation.png
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from .allocation import LayerGrid, copies_gained, layer_grid, summary_lines
from .reset_log import read_resets

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
    parser.add_argument("log", help="log.jsonl written by launch/train.py or by beamlora_ds.log_reset")
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
