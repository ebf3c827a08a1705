"""Feature explorer results -> napari layer data, without Qt (the Features panel's logic).

Everything here returns plain LayerDataTuples ``(data, kwargs, layer_type)`` placed in level-0
plate-mosaic coordinates (the world coordinates of the plate's layers), so the Features panel
only adds or updates layers:

- the plate heatmap: one value per well (mean activation or fraction of active crops);
- the activation map over the fields of one well, upsampled from the patch tokens to pixels;
- the cells of that well, each coloured by the mean activation inside it
  (``DirectLabelColormap``; the values in ``layer.features``);
- the top-activating crops as RGB thumbnails, and the per-label-value activation bars.

Only ``napari.utils.colormaps`` (no Qt) is imported, lazily, for the label colours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from plate_concepts.analysis.explorer import THUMBNAIL_SIZE, TOP_CROPS, cell_label_name

if TYPE_CHECKING:
    from plate_concepts.analysis.explorer import FeatureExplorer, TopCrop
    from plate_concepts.plates.mosaic import PlateMosaic

LayerData = tuple[Any, dict[str, Any], str]
Kind = Literal["mean", "fraction"]
Mode = Literal["cosine", "code"]

COLORMAP = "inferno"  # perceptual, dark = inactive: reads well over fluorescence
METADATA_KEY = "plate_concepts"
ROLE_HEATMAP = "feature-heatmap"
ROLE_MAP = "feature-map"
ROLE_CELLS = "feature-cells"
FEATURE_ROLES = (ROLE_HEATMAP, ROLE_MAP, ROLE_CELLS)
KIND_TEXT = {"mean": "mean activation per well", "fraction": "fraction of active crops per well"}
MODE_TEXT = {"cosine": "cosine with the feature direction", "code": "feature code"}
#: Top-activating crops shown per feature.
N_CROPS = TOP_CROPS
#: A feature view over at most this many field pixels, from memory, is computed on the GUI
#: thread (~10 ms per million pixels): a worker's start and the GIL it shares with painting
#: would cost more than the work.
QUICK_MAX_PIXELS = 4_000_000
#: The activation map of a well is computed at most this many pixels on its longer side.
MAP_MAX_SIDE = 1536
#: The cells layer of a well is shown at most this many pixels on its longer side (a well of
#: 3 x 3 fields of 1080 px at half resolution: colouring 10 million pixels per feature would
#: cost more than any screen shows).
CELLS_MAX_SIDE = 2048


def layer_name(feature: int, what: str) -> str:
    """'feature 12: activation map' - the names a biologist sees in the layer list."""
    return f"feature {feature}: {what}"


def _role_metadata(role: str, **extra: Any) -> dict[str, Any]:
    return {METADATA_KEY: {"role": role, **extra}}


def value_limits(values: Any) -> tuple[float, float]:
    """(low, high) contrast limits of the finite values: from 0 (or the most negative value,
    e.g. a cosine) to the largest; never an empty range."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = min(float(finite.min()), 0.0), float(finite.max())
    if high <= low:
        high = low + 1.0
    return low, high


# ---------------------------------------------------------------------- plate heatmap
def heatmap_layer_data(
    explorer: FeatureExplorer, mosaic: PlateMosaic, feature: int, kind: Kind = "mean"
) -> LayerData:
    """One colour per well over the whole plate, aligned with the mosaic (NaN: no tokens)."""
    heatmap = explorer.plate_heatmap(feature, mosaic, kind)
    values = explorer.well_values(feature, kind)
    return (
        heatmap.image,
        {
            "name": layer_name(feature, KIND_TEXT[kind]),
            "scale": tuple(heatmap.scale),
            "translate": tuple(heatmap.translate),
            "colormap": COLORMAP,
            "contrast_limits": value_limits(values.to_numpy()),
            "opacity": 0.6,
            "blending": "translucent",
            "interpolation2d": "nearest",
            "metadata": _role_metadata(ROLE_HEATMAP, feature=int(feature), kind=kind),
        },
        "image",
    )


# ---------------------------------------------------------------------- fields of one well
@dataclass(frozen=True)
class WellGrid:
    """Where a well's fields lie in the mosaic: the field grid's origin and size (level 0)."""

    well: str
    origin: tuple[int, int]
    shape: tuple[int, int]

    @classmethod
    def of(cls, mosaic: PlateMosaic, well: str) -> WellGrid:
        y0, x0, _, _ = mosaic.well_box(well)
        shape = (
            mosaic.field_grid[0] * mosaic.tile_shape[0],
            mosaic.field_grid[1] * mosaic.tile_shape[1],
        )
        return cls(well, (y0, x0), shape)


def map_downsample(mosaic: PlateMosaic, max_side: int = MAP_MAX_SIDE) -> int:
    """The power-of-two factor a well's activation map is computed at: small enough that the
    well stays under ``max_side`` pixels, and dividing the field and tile sizes so that every
    map pixel sits exactly on the mosaic's pixel grid."""
    grid = WellGrid.of(mosaic, mosaic.plate.wells[0])
    wanted = max(1, math.ceil(max(grid.shape) / max_side))
    factor = 1
    sizes = (*mosaic.plate.image_shape, *mosaic.tile_shape)
    while factor * 2 <= 2 ** math.ceil(math.log2(wanted)) and all(
        s % (factor * 2) == 0 for s in sizes
    ):
        factor *= 2
    return factor


def field_keys(explorer: FeatureExplorer, well: str) -> list[int]:
    """The fields of ``well`` that have crops in the explorer's store, in order."""
    fields = []
    for field_index in explorer.plate.fields(well) if explorer.plate is not None else range(64):
        try:
            explorer.field_rows(well, field_index)
        except KeyError:
            continue
        fields.append(int(field_index))
    return fields


def activation_map_layer_data(
    explorer: FeatureExplorer,
    mosaic: PlateMosaic,
    feature: int,
    well: str,
    mode: Mode = "cosine",
    downsample: int | None = None,
) -> LayerData | None:
    """The feature's activation over every field of ``well`` as one image spanning the well's
    field grid (NaN between fields), ``downsample`` x coarser than the mosaic; None when the
    well has no crops."""
    fields = field_keys(explorer, well)
    if not fields:
        return None
    factor = map_downsample(mosaic) if downsample is None else int(downsample)
    sizes = (*mosaic.plate.image_shape, *mosaic.tile_shape)
    if any(size % factor for size in sizes):
        raise ValueError(
            f"downsample {factor} does not divide the field and tile sizes {sizes}: the map would not line "
            "up with the plate (use map_downsample)"
        )
    grid = WellGrid.of(mosaic, well)
    canvas = np.full((grid.shape[0] // factor, grid.shape[1] // factor), np.nan, dtype=np.float32)
    for field_index in fields:
        values = explorer.field_map(feature, well, field_index, mode=mode, downsample=factor)
        oy, ox = mosaic.field_origin(well, field_index)
        top, left = (oy - grid.origin[0]) // factor, (ox - grid.origin[1]) // factor
        h, w = (
            min(values.shape[0], canvas.shape[0] - top),
            min(values.shape[1], canvas.shape[1] - left),
        )
        canvas[top : top + h, left : left + w] = values[:h, :w]
    half = (factor - 1) / 2  # napari: data pixel i is centred at translate + i * scale
    return (
        canvas,
        {
            "name": layer_name(feature, "activation map"),
            "scale": (float(factor), float(factor)),
            "translate": (grid.origin[0] + half, grid.origin[1] + half),
            "colormap": COLORMAP,
            "contrast_limits": value_limits(canvas),
            "opacity": 0.55,
            "blending": "translucent",
            "metadata": _role_metadata(
                ROLE_MAP,
                feature=int(feature),
                well=well,
                fields=fields,
                mode=mode,
                downsample=factor,
            ),
        },
        "image",
    )


def cells_layer_data(
    explorer: FeatureExplorer,
    mosaic: PlateMosaic,
    feature: int,
    well: str,
    mode: Mode = "cosine",
    label_name: str | None = None,
    max_side: int = CELLS_MAX_SIDE,
) -> LayerData | None:
    """The labelled cells of ``well``'s fields, each coloured by its mean activation.

    Label ids are renumbered so that they are unique across the fields (``layer.features``
    keeps each object's field and original label); None when the plate has no label image.
    """
    plate = explorer.plate
    if plate is None:
        return None
    label_name = label_name or cell_label_name(plate.label_names)
    if label_name is None:
        return None
    fields = [f for f in field_keys(explorer, well) if label_name in plate.field_labels(well, f)]
    if not fields:
        return None
    grid = WellGrid.of(mosaic, well)
    factor = 1  # big wells: every 2nd/4th... label pixel, as the mosaic's coarser levels do
    while max(grid.shape) // factor > max_side and all(
        s % (factor * 2) == 0 for s in (*plate.image_shape, *mosaic.tile_shape)
    ):
        factor *= 2
    canvas = np.zeros((grid.shape[0] // factor, grid.shape[1] // factor), dtype=np.int32)
    tables, offset = [], 0
    for field_index in fields:
        values = explorer.cell_values(feature, well, field_index, label_name, mode=mode)
        ids = values["label"].to_numpy()  # increasing: every object of the field
        labels = explorer.label_image(well, field_index, label_name)[::factor, ::factor]
        # Objects renumbered 1..n after the previous fields' (any ids, never overflowing).
        renumbered = np.where(labels > 0, np.searchsorted(ids, labels) + 1 + offset, 0)
        oy, ox = mosaic.field_origin(well, field_index)
        top, left = (oy - grid.origin[0]) // factor, (ox - grid.origin[1]) // factor
        h, w = (
            min(labels.shape[0], canvas.shape[0] - top),
            min(labels.shape[1], canvas.shape[1] - left),
        )
        canvas[top : top + h, left : left + w] = renumbered[:h, :w]
        tables.append(
            pd.DataFrame(
                {
                    "index": offset + 1 + np.arange(len(ids)),
                    "well": well,
                    "field": field_index + 1,  # 1-based, as in the status bar
                    "cell": values["label"].to_numpy(),
                    "mean activation": values["mean_activation"].to_numpy(),
                    "area (px)": values["area"].to_numpy(),
                }
            )
        )
        offset += len(ids)
    features = pd.concat(tables, ignore_index=True)
    limits = value_limits(features["mean activation"])
    half = (factor - 1) / 2
    return (
        canvas,
        {
            "name": layer_name(feature, label_name),
            "scale": (float(factor), float(factor)),
            "translate": (grid.origin[0] + half, grid.origin[1] + half),
            "features": features,
            "colormap": label_colormap(
                features["index"].to_numpy(), features["mean activation"].to_numpy(), limits
            ),
            "opacity": 0.7,
            "blending": "translucent",
            "metadata": _role_metadata(
                ROLE_CELLS,
                feature=int(feature),
                well=well,
                fields=fields,
                label_name=label_name,
                limits=limits,
            ),
        },
        "labels",
    )


def label_colors(
    ids: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    limits: tuple[float, float],
    colormap: str = COLORMAP,
) -> dict[int | None, np.ndarray]:
    """Label id -> RGBA of its value on ``colormap`` between ``limits``; background (0) and
    unlisted ids transparent, objects without a value (NaN) grey."""
    from napari.utils.colormaps import ensure_colormap

    ids = np.asarray(ids, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    low, high = limits
    scaled = np.clip((values - low) / ((high - low) or 1.0), 0.0, 1.0)
    rgba = ensure_colormap(colormap).map(np.nan_to_num(scaled)).astype(np.float32)
    rgba[~np.isfinite(values)] = (0.5, 0.5, 0.5, 0.6)
    colors: dict[int | None, np.ndarray] = {
        None: np.zeros(4, np.float32),
        0: np.zeros(4, np.float32),
    }
    colors.update({int(i): color for i, color in zip(ids, rgba)})
    return colors


def label_colormap(ids: Any, values: Any, limits: tuple[float, float]) -> Any:
    """A napari ``DirectLabelColormap`` colouring each label by its value."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=label_colors(ids, values, limits))


# ---------------------------------------------------------------------- crops and bars
@dataclass
class CropThumbnail:
    """One top-activating crop as an RGB image, with where it comes from."""

    rgb: np.ndarray  # (s, s, 3) uint8
    crop: TopCrop

    @property
    def caption(self) -> str:
        return f"{self.crop.well} f{self.crop.field + 1}\n{self.crop.value:.3g}"


def composite_rgb(
    image: np.ndarray,
    limits: Sequence[tuple[float, float]],
    colors: Sequence[Sequence[float]],
    size: int | None = None,
) -> np.ndarray:
    """(C, y, x) raw channels -> (y, x, 3) uint8 RGB, each channel scaled to its contrast
    limits, tinted by its colour and added (as the viewer's additive channel layers); strided
    down to about ``size`` pixels."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or len(limits) != image.shape[0] or len(colors) != image.shape[0]:
        raise ValueError(
            f"image must be (channels, y, x) with one contrast limit and colour per channel; got {image.shape}, "
            f"{len(limits)} limits, {len(colors)} colours"
        )
    if size is not None and max(image.shape[1:]) > size:
        stride = max(1, max(image.shape[1:]) // size)
        image = image[:, ::stride, ::stride]
    out = np.zeros((*image.shape[1:], 3), dtype=np.float32)
    for channel, (low, high), color in zip(image, limits, colors):
        scaled = np.clip((channel - low) / ((high - low) or 1.0), 0.0, 1.0)
        out += scaled[..., None] * np.asarray(color[:3], dtype=np.float32)
    return (np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)


def top_crop_thumbnails(
    explorer: FeatureExplorer,
    feature: int,
    n: int,
    limits: Sequence[tuple[float, float]],
    colors: Sequence[Sequence[float]],
    size: int = 96,
) -> list[CropThumbnail]:
    """The ``n`` most active crops of ``feature`` as RGB thumbnails (empty without a plate)."""
    if explorer.plate is None:
        return []
    crops = explorer.top_crops(feature, n, on_plate=True)
    pixels = explorer.crop_pixels([c.row for c in crops], size)
    return [
        CropThumbnail(composite_rgb(image, limits, colors, size), crop)
        for crop, image in zip(crops, pixels, strict=True)
    ]


@dataclass
class Bars:
    """Activation of one feature per value of a label column, controls last."""

    title: str
    labels: list[str]
    values: list[float]
    is_control: list[bool]


def label_value_bars(
    explorer: FeatureExplorer,
    feature: int,
    label_column: str,
    max_values: int = 16,
    kind: Kind = "mean",
) -> Bars:
    """The values with the highest activation (at most ``max_values``) and the controls."""
    table = explorer.label_value_activation(feature, label_column)
    measure = "mean_activation" if kind == "mean" else "fraction_active"
    controls = table[table["group"] == "control"]
    values = table[table["group"] != "control"].sort_values(measure, ascending=False, kind="stable")
    shown = values.head(max_values)
    what = "mean activation" if kind == "mean" else "fraction of active crops"
    title = f"{what} per {label_column}"
    if len(values) > len(shown):
        title += f" (top {len(shown)} of {len(values)})"
    rows = pd.concat([shown, controls])
    return Bars(
        title=title,
        labels=[str(v) for v in rows["value"]],
        values=[float(v) for v in rows[measure]],
        is_control=[g == "control" for g in rows["group"]],
    )


# ---------------------------------------------------------------------- everything at once
@dataclass
class FeatureView:
    """All that selecting a feature shows; computed off the GUI thread, applied on it."""

    feature: int
    well: str | None
    layers: list[LayerData] = field(default_factory=list)
    crops: list[CropThumbnail] = field(default_factory=list)
    bars: Bars | None = None


def top_well(explorer: FeatureExplorer, feature: int, kind: Kind = "mean") -> str | None:
    """The well where ``feature`` is highest (None when no well has tokens)."""
    values = explorer.well_values(feature, kind).dropna()
    return None if values.empty else str(values.idxmax())


def feature_view(
    explorer: FeatureExplorer,
    mosaic: PlateMosaic | None,
    feature: int,
    *,
    kind: Kind = "mean",
    mode: Mode = "cosine",
    well: str | None = None,
    label_column: str | None = None,
    n_crops: int = N_CROPS,
    channel_limits: Sequence[tuple[float, float]] | None = None,
    channel_colors: Sequence[Sequence[float]] | None = None,
    thumbnail_size: int = THUMBNAIL_SIZE,
    label_name: str | None = None,
) -> FeatureView:
    """Layers, crops and bars of one feature. ``well``: whose fields get the activation map and
    the object colours (default: the feature's top well); ``label_name``: whose objects are
    coloured (default :func:`~plate_concepts.analysis.explorer.cell_label_name`)."""
    well = well or top_well(explorer, feature, kind)
    view = FeatureView(feature=int(feature), well=well)
    if mosaic is not None:
        view.layers.append(heatmap_layer_data(explorer, mosaic, feature, kind))
        if well is not None:
            for layer in (
                activation_map_layer_data(explorer, mosaic, feature, well, mode),
                cells_layer_data(explorer, mosaic, feature, well, mode, label_name),
            ):
                if layer is not None:
                    view.layers.append(layer)
    if (
        n_crops
        and explorer.plate is not None
        and channel_limits is not None
        and channel_colors is not None
    ):
        view.crops = top_crop_thumbnails(
            explorer, feature, n_crops, channel_limits, channel_colors, thumbnail_size
        )
    column = label_column or explorer.label_column
    if column is not None:
        view.bars = label_value_bars(explorer, feature, column, kind=kind)
    return view


def computed_quickly(
    explorer: FeatureExplorer,
    mosaic: PlateMosaic | None,
    feature: int,
    *,
    kind: Kind = "mean",
    mode: Mode = "cosine",
    well: str | None = None,
    n_crops: int = N_CROPS,
    thumbnail_size: int = THUMBNAIL_SIZE,
    label_name: str | None = None,
    max_pixels: int = QUICK_MAX_PIXELS,
) -> bool:
    """Whether :func:`feature_view` with these arguments reads nothing from disk and maps at
    most ``max_pixels`` field pixels: quick enough (tens of ms) to run on the GUI thread."""
    well = well or top_well(explorer, feature, kind)
    if mosaic is None or well is None:
        return True
    plate = explorer.plate
    fields = field_keys(explorer, well)
    if plate is not None and len(fields) * plate.image_shape[0] * plate.image_shape[1] > max_pixels:
        return False
    return explorer.in_memory(
        well,
        mode=mode,
        label_name=None if plate is None else label_name or cell_label_name(plate.label_names),
        crop_rows=[c.row for c in explorer.top_crops(feature, n_crops, on_plate=True)]
        if plate is not None
        else [],
        thumbnail_size=thumbnail_size,
    )


def feature_table(explorer: FeatureExplorer, label_column: str | None) -> pd.DataFrame:
    """The Features panel's table: readable column names, one row per feature."""
    table = explorer.feature_table(label_column)
    return pd.DataFrame(
        {
            "feature": table["feature"].to_numpy(),
            "frequency": table["frequency"].to_numpy(),
            "most selective for": [
                ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
                for v in table["best_value"]
            ],
            "max selectivity": table["max_selectivity"].to_numpy(),
            "avg selectivity": table["average_selectivity"].to_numpy(),
            "dead": table["dead"].to_numpy(),
        }
    )
