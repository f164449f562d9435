"""The benchmark's pictures: one fidelity-matrix heatmap per method and the forgetting curves
(Agg canvas, no pyplot, as in tasks/plots.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


KEY = "concept_similarity"  # graded; the strict judge identity is in matrix.csv too


def _matrix(rows: list[list[dict | None]], n: int, key: str = KEY) -> np.ndarray:
    m = np.full((len(rows), n), np.nan)
    for j, row in enumerate(rows):
        for i, cell in enumerate(row[:n]):
            if cell is not None:
                m[j, i] = cell[key]
    return m


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_matrices(record: dict, path: Path) -> Path:
    names = list(record["matrices"])
    n = len(record["concepts"])
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.2 * rows))
    low = min(np.nanmin(_matrix(record["matrices"][name], n)) for name in names)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        m = _matrix(record["matrices"][name], n)
        image = ax.imshow(m, vmin=low, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("concept", fontsize=8)
        ax.set_ylabel("after learning" if name not in ("lora_fused", "single_kv") else "", fontsize=8)
        ax.set_xticks(range(n), [c[:6] for c in record["concepts"]], rotation=90, fontsize=6)
        labels = [str(j + 1) for j in range(m.shape[0])]
        if name == "lora_fused":
            labels[-1] = "fused"
        ax.set_yticks(range(m.shape[0]), labels, fontsize=6)
        if n <= 12:
            for (j, i), v in np.ndenumerate(m):
                if not np.isnan(v):
                    ax.text(i, j, f"{v:.2f}"[1:] if v < 1 else "1", ha="center", va="center", fontsize=5,
                            color="white" if v < (low + 1) / 2 else "black")
    fig.subplots_adjust(hspace=0.55, wspace=0.35)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="concept similarity (judge embeddings)")
    fig.suptitle("Concept similarity of concept i (columns) after learning concepts 1..j (rows)")
    return _save(fig, path)


def plot_curves(record: dict, path: Path) -> Path:
    n = len(record["concepts"])
    fig = Figure(figsize=(11, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, rows in record["matrices"].items():
        if name in ("lora_fused", "single_kv"):
            continue
        m = _matrix(rows, n)
        learned = [np.nanmean(m[j, :j + 1]) for j in range(m.shape[0])]
        left.plot(range(1, len(learned) + 1), learned, marker="o", label=name)
        drops = []
        for gap in range(n):
            values = [m[i + gap, i] - m[i, i] for i in range(n - gap)]
            drops.append(np.mean(values) if values else np.nan)
        right.plot(range(n), drops, marker="o", label=name)
    for name in ("lora_fused", "single_kv"):
        if name in record["matrices"]:
            m = _matrix(record["matrices"][name], n)
            final = np.nanmean(m[-1]) if name == "lora_fused" else np.nanmean(np.diag(m))
            left.axhline(final, linestyle="--", linewidth=1,
                         label=f"{name} ({'after fusion' if name == 'lora_fused' else 'each alone'})",
                         color="gray" if name == "single_kv" else "black")
    left.set(xlabel="concepts learned", ylabel="mean concept similarity of the concepts so far")
    right.set(xlabel="concepts learned since", ylabel="similarity change since learned")
    right.axhline(0, color="black", linewidth=0.5)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle("Forgetting in the benchmark world")
    return _save(fig, path)
