"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, safe
in a worker thread) and returned as PNG bytes. Every figure has axis labels, and every map of
values a colour bar with its range."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from plate_concepts.plates.geometry import PlateFormat, parse_well, row_letters

DPI = 100
#: Longest label value or feature name on an axis (longer ones end in "…").
TICK_CHARS = 40


def png(figure: Figure, palette: bool = False) -> bytes:
    """The figure as PNG; ``palette``: as 256 colours (crops: a third of the size, and a report
    with dozens of crop strips stays a few MB)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    if not palette:
        return buffer.getvalue()
    from PIL import Image

    image = Image.open(buffer).convert("RGB").quantize(256, dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return out.getvalue()


def shorten(text: str, n: int = TICK_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def profile_heatmap(z: pd.DataFrame, feature_labels: Sequence[str], value_title: str) -> bytes:
    """Values (rows) x features (columns) of robust z-scores, diverging around 0."""
    data = z.to_numpy(dtype=float)
    finite = np.abs(data[np.isfinite(data)])
    limit = float(np.percentile(finite, 99)) if finite.size else 1.0
    limit = max(limit, 2.0)
    height = 1.2 + 0.28 * len(z.index)
    width = 2.5 + 0.3 * len(z.columns)
    figure = Figure(figsize=(min(max(width, 6.0), 18.0), min(max(height, 2.5), 22.0)))
    ax = figure.add_subplot()
    image = ax.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(z.columns)), [shorten(f) for f in feature_labels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(z.index)), [shorten(str(v)) for v in z.index], fontsize=8)
    ax.set_xlabel("feature")
    ax.set_ylabel(value_title)
    bar = figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(f"robust z vs controls (clipped at ±{limit:.1f})")
    return png(figure)


def well_heatmaps(
    wells: Sequence[str],
    values: np.ndarray,
    titles: Sequence[str],
    marked: Sequence[str] = (),
    colorbar_label: str = "mean activation per well",
) -> bytes:
    """One plate map per column of ``values`` (wells x panels), side by side, each with its own
    colour bar; ``marked`` wells are ringed (e.g. a perturbation's replicates)."""
    positions = [parse_well(w) for w in wells]
    layout = PlateFormat.smallest_containing(positions)
    n = values.shape[1]
    panel_width = 2.2 + 0.3 * layout.n_columns
    figure = Figure(figsize=(min(panel_width * n, 18.0), 1.3 + 0.3 * layout.n_rows), layout="constrained")
    marked_set = {parse_well(w) for w in marked}
    for i in range(n):
        grid = np.full((layout.n_rows, layout.n_columns), np.nan)
        for (row, column), value in zip(positions, values[:, i], strict=True):
            grid[row, column] = value
        ax = figure.add_subplot(1, n, i + 1)
        image = ax.imshow(grid, cmap="inferno", interpolation="nearest")
        for row, column in marked_set:
            ax.add_patch(_ring(row, column))
        step = 1 if layout.n_columns <= 12 else 2
        ax.set_xticks(range(0, layout.n_columns, step), [str(c + 1) for c in range(0, layout.n_columns, step)], fontsize=7)
        ax.set_yticks(range(0, layout.n_rows, step), [row_letters(r) for r in range(0, layout.n_rows, step)], fontsize=7)
        ax.set_xlabel("plate column")
        ax.set_ylabel("plate row")
        ax.set_title(shorten(titles[i], 48), fontsize=8)
        bar = figure.colorbar(image, ax=ax, shrink=0.9)
        bar.set_label(colorbar_label, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return png(figure)


def _ring(row: int, column: int):  # -> matplotlib.patches.Circle
    from matplotlib.patches import Circle

    return Circle((column, row), 0.42, fill=False, edgecolor="cyan", linewidth=1.2)


def crop_strip(images: Sequence[np.ndarray], captions: Sequence[str]) -> bytes:
    """RGB crops in a row, each captioned (where it comes from, its code)."""
    n = max(len(images), 1)
    figure = Figure(figsize=(1.35 * n, 1.9), layout="constrained")
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        ax = figure.add_subplot(1, n, i + 1)
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=6)
    return png(figure, palette=True)


def factor_heatmap(scores: pd.DataFrame, feature_labels: Sequence[str]) -> bytes:
    """Features (rows) x factors (columns) of variance fractions (ε²)."""
    data = scores.to_numpy(dtype=float)
    figure = Figure(figsize=(2.5 + 0.7 * len(scores.columns), min(1.2 + 0.28 * len(scores.index), 22.0)))
    ax = figure.add_subplot()
    image = ax.imshow(np.clip(data, 0, 1), cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(scores.columns)), list(scores.columns), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(scores.index)), [shorten(f) for f in feature_labels], fontsize=7)
    ax.set_xlabel("factor (nuisances, then labels)")
    ax.set_ylabel("feature")
    bar = figure.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    bar.set_label("variance fraction explained (ε²)")
    return png(figure)


def frequency_histogram(frequency: np.ndarray, dead_threshold: float) -> bytes:
    """How often features fire: a histogram of log10 frequency; dead features counted apart."""
    alive = frequency[frequency >= dead_threshold]
    figure = Figure(figsize=(6.0, 2.6))
    ax = figure.add_subplot()
    if alive.size:
        ax.hist(np.log10(alive), bins=40, color="#4477aa")
    ax.set_xlabel("log10 fraction of tokens where the feature is active")
    ax.set_ylabel("features")
    ax.set_title(f"{alive.size} live features, {frequency.size - alive.size} dead", fontsize=9)
    return png(figure)
