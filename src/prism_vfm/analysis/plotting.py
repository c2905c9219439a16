"""Figure helpers on matplotlib's object API with the Agg canvas: no pyplot state, no display needed."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prism_vfm.errors import MissingExtraError


def new_figure(n_panels: int, panel_size: tuple[float, float] = (4.0, 3.0), max_cols: int = 4) -> tuple:
    """A figure with a grid of ``n_panels`` axes (row-major); unused axes are hidden."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # matplotlib is the optional "analysis" extra
        raise MissingExtraError("plots", "matplotlib", "analysis") from exc
    cols = min(max(n_panels, 1), max_cols)
    rows = math.ceil(max(n_panels, 1) / cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def save(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def heatmap_grid(
    panels: Sequence[tuple[np.ndarray, str]],
    path: str | os.PathLike,
    row_labels: Sequence[str],
    xlabel: str,
    colorbar_label: str,
    vmax: float | None = None,
    suptitle: str | None = None,
    col_labels: Sequence[str] | None = None,
    max_cols: int = 4,
) -> Path:
    """One heatmap per (matrix, title) panel sharing one colour scale, annotated when small enough.

    Panels fill rows of ``max_cols``; ``row_labels`` and ``col_labels`` name the matrices' rows and columns
    (columns default to their indices).
    """
    top = vmax if vmax is not None else max(float(np.max(m)) for m, _ in panels) or 1.0
    n_cols = max(m.shape[1] for m, _ in panels)
    fig, axes = new_figure(
        len(panels),
        (max(3.0, 0.45 * n_cols + 1.5), max(2.2, 0.45 * len(row_labels) + 1.2)),
        max_cols=max_cols,
    )
    image = None
    for ax, (matrix, title) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_xticks(range(matrix.shape[1]), col_labels or [str(j) for j in range(matrix.shape[1])])
        ax.set_yticks(range(matrix.shape[0]), row_labels)
        if matrix.size <= 160:
            for (r, c), v in np.ndenumerate(matrix):
                colour = "black" if v > 0.6 * top else "white"
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color=colour)
    fig.colorbar(image, ax=axes, label=colorbar_label, shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    return save(fig, path)


def checkpoint_curves(
    layers: Mapping[Any, Mapping[str, Sequence[float]]],
    labels: Sequence[str],
    path: str | os.PathLike,
    ylabel: str,
    suptitle: str,
    integer: bool = False,
) -> Path:
    """One PNG: a panel per layer (``layers``: block → {curve name: one value per checkpoint}), the
    checkpoints ``labels`` along x; ``integer`` puts the y ticks on whole numbers."""
    fig, axes = new_figure(len(layers))
    for ax, (block, curves) in zip(axes, layers.items(), strict=True):
        for name, values in curves.items():
            ax.plot(range(len(labels)), values, marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(f"block {block}", fontsize=10)
        if integer:
            ax.yaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.suptitle(suptitle)
    return save(fig, path)
