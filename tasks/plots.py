"""PNG figures for MLflow and ``dvc plots``: neuron masks, the forgetting matrix, the loss curve and
sample grids. Each function writes one file and returns its path.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``:
no global backend or figure registry, so a long-running worker neither leaks figures nor needs a
display (https://matplotlib.org/stable/gallery/user_interfaces/web_application_server_sgskip.html).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from cns.generate import grid
from cns.info import short_layer_name

DPI = 100
# Row categories of the mask heatmap, drawn in this order (later ones on top).
CATEGORIES = (("general", "general (never selected)", "#9e9e9e"),
              ("owned", "owned by earlier concepts", "#1f77b4"),
              ("concept", "selected for this concept", "#d62728"))
OTHER_COLOUR = "#f0f0f0"


ANNOTATE_CELLS = 144  # 12 x 12


def save_figure(fig: Figure, path: str | Path, *, dpi: int = DPI, bbox_inches: str | None = None) -> Path:
    """A Figure to a PNG on the Agg canvas (no pyplot, no display); the project's one figure saver."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches=bbox_inches)
    return path


def _layer_rows(masks: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    """Layer name -> row count, in the UNet's data flow order: down blocks, mid block, up blocks."""
    rows: dict[str, int] = {}
    for mask in masks.values():
        for name, selected in mask.items():
            rows.setdefault(name, int(selected.numel()))
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def order(name: str) -> tuple:
        parts = name.split(".")
        return (stage.get(parts[0], 3), *[(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts[1:]])

    return {name: rows[name] for name in sorted(rows, key=order)}


def mask_heatmap(masks: dict[str, dict[str, torch.Tensor]], path: str | Path, title: str = "selected neurons") -> Path:
    """One strip per K/V layer, each row (neuron) a tick at its index scaled to the layer's width,
    coloured as selected / owned by earlier concepts / general / other; a bar of the selected count
    per layer on the right. ``masks`` is :func:`cns.delta.load_masks`' {kind: {layer: bool rows}}."""
    rows = _layer_rows(masks)
    names = list(rows)
    fig = Figure(figsize=(12, 1.6 + 0.32 * len(names)))
    ax, bars = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [5, 1]})
    for y, name in enumerate(names):
        ax.add_patch(Rectangle((0, y - 0.4), 1, 0.8, color=OTHER_COLOUR, linewidth=0))
    for kind, _, colour in CATEGORIES:
        segments = []
        for y, name in enumerate(names):
            selected = masks.get(kind, {}).get(name)
            if selected is not None and selected.any():
                x = (torch.nonzero(selected.flatten()).flatten().numpy() + 0.5) / rows[name]
                segments += [((v, y - 0.4), (v, y + 0.4)) for v in x]
        ax.add_collection(LineCollection(segments, colors=colour, linewidths=0.8))
    ax.set_xlim(0, 1)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_yticks(range(len(names)), [f"{short_layer_name(n)} ({rows[n]})" for n in names], fontsize=8)
    ax.set_xlabel("neuron (row index / layer width)")
    counts = {kind: sum(int(m.sum()) for m in masks.get(kind, {}).values()) for kind, _, _ in CATEGORIES}
    ax.legend(handles=[Patch(color=c, label=f"{label}: {counts[k]}") for k, label, c in CATEGORIES]
              + [Patch(color=OTHER_COLOUR, label="other")], loc="upper center", bbox_to_anchor=(0.5, -0.06 - 0.3 / len(names)),
              ncol=4, fontsize=8, frameon=False)
    selected = [int(masks.get("concept", {}).get(n, torch.zeros(0)).sum()) for n in names]
    bars.barh(range(len(names)), selected, color=CATEGORIES[-1][2])
    for y, count in enumerate(selected):
        bars.text(count, y, f" {count}", va="center", fontsize=7)
    bars.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    bars.set_xlabel("selected rows")
    bars.set_xlim(0, max(selected + [1]) * 1.3)
    fig.suptitle(f"{title} ({counts['concept']} of {sum(rows.values())} K/V rows)")
    fig.tight_layout()
    return save_figure(fig, path)


def forgetting_heatmap(matrix: pd.DataFrame, path: str | Path, title: str = "output change since learned") -> Path:
    """Rows: the model after learning concept j; columns: concept i; values: output change of i
    (mean |pixel difference| in [0, 1]); NaN where i was not learned yet or not re-checked then
    (drawn hatched while the matrix is small). The figure's size is capped and values are written
    in the cells only up to ``ANNOTATE_CELLS`` cells: a per-version plot must not cost more at
    concept 50 (2,500 cells) than at concept 3 (measured: 8 s a version at 50 uncapped)."""
    values = matrix.to_numpy(dtype=float)
    rows, cols = max(1, values.shape[0]), max(1, values.shape[1])
    fig = Figure(figsize=(min(14.0, 2.5 + 0.9 * cols), min(10.0, 1.8 + 0.6 * rows)))
    ax = fig.subplots()
    cmap = colormaps["Reds"].with_extremes(bad="white")
    finite = values[np.isfinite(values)]
    top = max(float(finite.max()) if finite.size else 0.0, 1e-6)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=top, aspect="auto")
    if values.size <= ANNOTATE_CELLS:
        for (y, x), value in np.ndenumerate(values):
            if math.isnan(value):
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="//", color="#cccccc", linewidth=0))
            else:
                ax.text(x, y, f"{value:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 * top else "black")
    every_x, every_y = max(1, cols // 25), max(1, rows // 25)
    ax.set_xticks(range(0, values.shape[1], every_x), [str(c) for c in matrix.columns][::every_x], rotation=30,
                  ha="right")
    ax.set_yticks(range(0, values.shape[0], every_y), [str(r) for r in matrix.index][::every_y])
    ax.set_xlabel("concept evaluated")
    ax.set_ylabel("model after learning")
    fig.colorbar(image, ax=ax, label="mean |pixel change|")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def loss_curve(losses: Sequence[float], path: str | Path, title: str = "training loss") -> Path:
    """Loss per step, with a moving average over a tenth of the run (the raw curve is noisy:
    every step draws a new timestep)."""
    steps = np.arange(1, len(losses) + 1)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, losses, color="#1f77b4", alpha=0.35, linewidth=1, label="per step")
    window = max(1, len(losses) // 10)
    if len(losses) >= window > 1:
        smooth = np.convolve(np.asarray(losses, dtype=float), np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="#1f77b4", linewidth=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_grid(samples: torch.Tensor, path: str | Path, per_row: int, cell: int | None = None) -> Path:
    """uint8 (n, h, w, 3) samples as one image, ``per_row`` per row (a prompt's samples side by
    side when per_row = num_images_per_prompt); cells at least 128 px, small images scaled up."""
    images = [Image.fromarray(a) for a in samples.cpu().numpy()]
    rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(rows, cell=cell or max(128, samples.shape[1])).save(path)
    return path
