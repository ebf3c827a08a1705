"""How a plate's channels are shown: a colour per channel (by stain name), contrast limits from
a sample of the plate, and raw channels composited to RGB (viewer layers, thumbnails, reports).
No napari here: colours are names napari and matplotlib both know, with their RGB."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from plate_concepts.plates.model import Plate

# Cell Painting stains -> the colour a biologist expects; others cycle through COLORMAP_CYCLE.
STAIN_COLORMAPS = {
    "dapi": "blue", "hoechst": "blue", "dna": "blue", "nuclei": "blue",
    "gfp": "green", "er": "green", "concanavalin": "green",
    "rfp": "magenta", "mito": "red", "mitotracker": "red",
    "rna": "yellow", "syto": "yellow",
    "agp": "magenta", "phalloidin": "magenta", "actin": "magenta", "wga": "magenta",
    "brightfield": "gray", "bf": "gray",
}
COLORMAP_CYCLE = ["blue", "green", "magenta", "yellow", "red", "cyan", "gray"]


def channel_colormaps(channels: list[str]) -> list[str]:
    """A colormap name per channel, by stain name where it is recognisable."""
    maps = []
    for index, name in enumerate(channels):
        key = name.lower()
        match = next((cmap for stain, cmap in STAIN_COLORMAPS.items() if stain in key), None)
        maps.append(match or COLORMAP_CYCLE[index % len(COLORMAP_CYCLE)])
    return maps


def contrast_limits(plate: Plate, max_fields: int = 8, percentiles: tuple[float, float] = (1.0, 99.8)) -> list[tuple[float, float]]:
    """Per-channel contrast limits from intensity percentiles of a few fields spread over the plate
    (their coarsest stored level, strided to at most ~512 px), so opening stays fast."""
    keys = sorted(plate.images)
    picks = [keys[i] for i in np.linspace(0, len(keys) - 1, min(max_fields, len(keys))).astype(int)]
    samples = []
    for key in picks:
        image = plate.images[key][-1]
        stride = max(1, max(image.shape[1:]) // 512)
        samples.append(np.asarray(image[:, ::stride, ::stride]).reshape(image.shape[0], -1))
    pixels = np.concatenate(samples, axis=1).astype(np.float64)
    low, high = np.percentile(pixels, percentiles, axis=1)
    return [(float(lo), float(hi if hi > lo else lo + 1)) for lo, hi in zip(low, high)]


#: RGB of the colour names of :data:`STAIN_COLORMAPS` and :data:`COLORMAP_CYCLE`.
COLOR_RGB = {
    "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0), "red": (1.0, 0.0, 0.0),
    "magenta": (1.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0),
    "gray": (1.0, 1.0, 1.0),
}


def channel_colors(channels: list[str]) -> list[tuple[float, float, float]]:
    """An RGB colour per channel (those of :func:`channel_colormaps`)."""
    return [COLOR_RGB[name] for name in channel_colormaps(channels)]


def composite_rgb(
    image: np.ndarray, limits: Sequence[tuple[float, float]], colors: Sequence[Sequence[float]]
) -> np.ndarray:
    """(C, y, x) raw channels -> (y, x, 3) uint8 RGB: each channel scaled to its contrast limits,
    tinted by its colour and added (as additive channel layers look)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or len(limits) != image.shape[0] or len(colors) != image.shape[0]:
        raise ValueError(
            f"image must be (channels, y, x) with one contrast limit and colour per channel; got "
            f"{image.shape}, {len(limits)} limits, {len(colors)} colours"
        )
    out = np.zeros((*image.shape[1:], 3), dtype=np.float32)
    for channel, (low, high), color in zip(image, limits, colors, strict=True):
        scaled = np.clip((channel - low) / ((high - low) or 1.0), 0.0, 1.0)
        out += scaled[..., None] * np.asarray(color[:3], dtype=np.float32)
    return (np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)


def read_crop(plate: Plate, well: str, field: int, crop_y: int, crop_x: int, crop_size: int, size: int) -> np.ndarray:
    """(C, s, s) raw pixels of a crop, about ``size`` pixels on a side: from the coarsest pyramid
    level that still has ``size`` pixels across the crop, then every n-th pixel."""
    level = 0
    while level + 1 < plate.n_levels and crop_size // 2 ** (level + 1) >= size:
        level += 1
    f = 2**level
    stride = max(1, crop_size // f // size)
    image = plate.image(well, field, level)
    return np.asarray(image[:, crop_y // f : (crop_y + crop_size) // f : stride,
                            crop_x // f : (crop_x + crop_size) // f : stride])  # fmt: skip
