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
from plate_concepts.plates.display import composite_rgb
from plate_concepts.plates.geometry import canonical_well

if TYPE_CHECKING:
    from plate_concepts.analysis.explorer import FeatureExplorer, TopCrop
    from plate_concepts.analysis.feature_notes import FeatureNotes
    from plate_concepts.plates.mosaic import PlateMosaic
    from plate_concepts.viewer._screen_profiles import ScreenProfiles

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


def layer_name(feature: int, what: str, name: str = "") -> str:
    """'feature 12: activation map', or with the feature's name 'feature 12 (enlarged nuclei):
    activation map' - the names a biologist sees in the layer list."""
    return f"feature {feature} ({name}): {what}" if name else f"feature {feature}: {what}"


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
    explorer: FeatureExplorer, mosaic: PlateMosaic, feature: int, kind: Kind = "mean", name: str = ""
) -> LayerData:
    """One colour per well over the whole plate, aligned with the mosaic (NaN: no tokens);
    ``name``: the feature's name."""
    heatmap = explorer.plate_heatmap(feature, mosaic, kind)
    values = explorer.well_values(feature, kind)
    return (
        heatmap.image,
        {
            "name": layer_name(feature, KIND_TEXT[kind], name),
            "scale": tuple(heatmap.scale),
            "translate": tuple(heatmap.translate),
            "colormap": COLORMAP,
            "contrast_limits": value_limits(values.to_numpy()),
            "opacity": 0.6,
            "blending": "translucent",
            "interpolation2d": "nearest",
            "metadata": _role_metadata(ROLE_HEATMAP, feature=int(feature), kind=kind,
                                       what=KIND_TEXT[kind], plate=explorer.plate_name),
        },
        "image",
    )


# ---------------------------------------------------------------------- what a selection shows
@dataclass(frozen=True)
class FeatureSelection:
    """What selecting a feature shows, decided once (:func:`resolve_selection`) and read by
    :func:`computed_quickly`, :func:`feature_view` and the layer functions."""

    feature: int
    kind: Kind
    mode: Mode
    #: Whose fields get the activation map and the object colours (None: no well has tokens).
    well: str | None
    #: Fields of ``well`` that have crops in the store.
    fields: tuple[int, ...]
    #: The label image whose objects are coloured (None: the plate has none, or no plate).
    label_name: str | None
    #: Fields of ``well`` that have crops and the label image ``label_name``.
    label_fields: tuple[int, ...]
    #: The feature's most active crops of the explorer's plate (none without the plate).
    top_crops: tuple[TopCrop, ...]
    #: The label column of the per-value bars (None: no bars; "well": the plate's wells).
    label_column: str | None
    #: The feature's name (its notes), for the layer names.
    name: str = ""


def resolve_selection(
    explorer: FeatureExplorer,
    feature: int,
    *,
    kind: Kind = "mean",
    mode: Mode = "cosine",
    well: str | None = None,
    label_name: str | None = None,
    label_column: str | None = None,
    n_crops: int = N_CROPS,
    name: str = "",
) -> FeatureSelection:
    """Decide what ``feature`` shows: ``well`` (default: the feature's top well), its fields,
    ``label_name`` (default :func:`~plate_concepts.analysis.explorer.cell_label_name`), the
    fields that have it, the ``n_crops`` top crops and the bars' ``label_column`` (default the
    explorer's). Milliseconds: everything it reads is in memory after ``prepare``."""
    feature = int(feature)
    well = canonical_well(well) if well else top_well(explorer, feature, kind)
    fields = tuple(explorer.well_fields(well)) if well is not None else ()
    plate = explorer.plate
    if plate is not None:
        label_name = label_name or cell_label_name(plate.label_names)
    else:
        label_name = None
    label_fields = (
        tuple(f for f in fields if label_name in plate.field_labels(well, f))
        if plate is not None and label_name is not None and well is not None
        else ()
    )
    top_crops = (
        tuple(explorer.top_crops(feature, n_crops, on_plate=True))
        if plate is not None and n_crops
        else ()
    )
    return FeatureSelection(
        feature=feature,
        kind=kind,
        mode=mode,
        well=well,
        fields=fields,
        label_name=label_name,
        label_fields=label_fields,
        top_crops=top_crops,
        label_column=label_column or explorer.label_column,
        name=name,
    )


# ---------------------------------------------------------------------- fields of one well
def map_downsample(mosaic: PlateMosaic, max_side: int = MAP_MAX_SIDE) -> int:
    """The power-of-two factor a well's activation map is computed at: small enough that the
    well stays under ``max_side`` pixels, and dividing the field and tile sizes so that every
    map pixel sits exactly on the mosaic's pixel grid."""
    wanted = max(1, math.ceil(max(mosaic.field_grid_shape) / max_side))
    factor = 1
    sizes = (*mosaic.plate.image_shape, *mosaic.tile_shape)
    while factor * 2 <= 2 ** math.ceil(math.log2(wanted)) and all(
        s % (factor * 2) == 0 for s in sizes
    ):
        factor *= 2
    return factor


def _paste(
    canvas: np.ndarray, image: np.ndarray, mosaic: PlateMosaic, well: str, field: int, factor: int
) -> None:
    """Put a field's ``image`` (``factor`` x coarser than the mosaic) at its place in a canvas
    spanning ``well``'s field grid at the same scale."""
    y0, x0, _, _ = mosaic.field_grid_box(well)
    oy, ox = mosaic.field_origin(well, field)
    top, left = (oy - y0) // factor, (ox - x0) // factor
    h = min(image.shape[0], canvas.shape[0] - top)
    w = min(image.shape[1], canvas.shape[1] - left)
    canvas[top : top + h, left : left + w] = image[:h, :w]


def activation_map_layer_data(
    explorer: FeatureExplorer,
    mosaic: PlateMosaic,
    selection: FeatureSelection,
    downsample: int | None = None,
) -> LayerData | None:
    """The selected feature's activation over every field of the selection's well as one
    image spanning the well's field grid (NaN between fields), ``downsample`` x coarser than
    the mosaic; None when the well has no crops."""
    feature, well, mode = selection.feature, selection.well, selection.mode
    if well is None or not selection.fields:
        return None
    factor = map_downsample(mosaic) if downsample is None else int(downsample)
    sizes = (*mosaic.plate.image_shape, *mosaic.tile_shape)
    if any(size % factor for size in sizes):
        raise ValueError(
            f"downsample {factor} does not divide the field and tile sizes {sizes}: the map would not line "
            "up with the plate (use map_downsample)"
        )
    y0, x0, y1, x1 = mosaic.field_grid_box(well)
    canvas = np.full(((y1 - y0) // factor, (x1 - x0) // factor), np.nan, dtype=np.float32)
    for field_index in selection.fields:
        values = explorer.field_map(feature, well, field_index, mode=mode, downsample=factor)
        _paste(canvas, values, mosaic, well, field_index, factor)
    half = (factor - 1) / 2  # napari: data pixel i is centred at translate + i * scale
    return (
        canvas,
        {
            "name": layer_name(feature, "activation map", selection.name),
            "scale": (float(factor), float(factor)),
            "translate": (y0 + half, x0 + half),
            "colormap": COLORMAP,
            "contrast_limits": value_limits(canvas),
            "opacity": 0.55,
            "blending": "translucent",
            "metadata": _role_metadata(
                ROLE_MAP,
                feature=feature,
                what="activation map",
                plate=explorer.plate_name,
                well=well,
                fields=list(selection.fields),
                mode=mode,
                downsample=factor,
            ),
        },
        "image",
    )


def cells_layer_data(
    explorer: FeatureExplorer,
    mosaic: PlateMosaic,
    selection: FeatureSelection,
    max_side: int = CELLS_MAX_SIDE,
) -> LayerData | None:
    """The objects of the selection's label image in its well's fields, each coloured by its
    mean activation.

    Label ids are renumbered so that they are unique across the fields (``layer.features``
    keeps each object's field and original label); None when there are no such objects.
    """
    plate, well, label_name = explorer.plate, selection.well, selection.label_name
    if plate is None or well is None or label_name is None or not selection.label_fields:
        return None
    feature, fields = selection.feature, selection.label_fields
    y0, x0, y1, x1 = mosaic.field_grid_box(well)
    factor = 1  # big wells: every 2nd/4th... label pixel, as the mosaic's coarser levels do
    while max(y1 - y0, x1 - x0) // factor > max_side and all(
        s % (factor * 2) == 0 for s in (*plate.image_shape, *mosaic.tile_shape)
    ):
        factor *= 2
    canvas = np.zeros(((y1 - y0) // factor, (x1 - x0) // factor), dtype=np.int32)
    tables, offset = [], 0
    for field_index in fields:
        values = explorer.cell_values(feature, well, field_index, label_name, mode=selection.mode)
        ids = values["label"].to_numpy()  # increasing: every object of the field
        labels = explorer.label_image(well, field_index, label_name)[::factor, ::factor]
        # Objects renumbered 1..n after the previous fields' (any ids, never overflowing).
        renumbered = np.where(labels > 0, np.searchsorted(ids, labels) + 1 + offset, 0)
        _paste(canvas, renumbered, mosaic, well, field_index, factor)
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
            "name": layer_name(feature, label_name, selection.name),
            "scale": (float(factor), float(factor)),
            "translate": (y0 + half, x0 + half),
            "features": features,
            "colormap": label_colormap(
                features["index"].to_numpy(), features["mean activation"].to_numpy(), limits
            ),
            "opacity": 0.7,
            "blending": "translucent",
            "metadata": _role_metadata(
                ROLE_CELLS,
                feature=feature,
                what=label_name,
                plate=explorer.plate_name,
                well=well,
                fields=list(fields),
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


def colormap_colors(colormap: str = COLORMAP, n: int = 32) -> np.ndarray:
    """(n, 4) RGBA of ``colormap`` from its low end to its high end (for a colour scale)."""
    from napari.utils.colormaps import ensure_colormap

    return ensure_colormap(colormap).map(np.linspace(0.0, 1.0, n))


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


def top_crop_thumbnails(
    explorer: FeatureExplorer,
    crops: Sequence[TopCrop],
    limits: Sequence[tuple[float, float]],
    colors: Sequence[Sequence[float]],
    size: int = THUMBNAIL_SIZE,
) -> list[CropThumbnail]:
    """RGB thumbnails of ``crops`` (of the explorer's plate, e.g. a selection's top crops)."""
    if not crops:
        return []
    pixels = explorer.crop_pixels([c.row for c in crops], size)
    return [
        CropThumbnail(composite_rgb(image, limits, colors), crop)
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
    """The values with the highest activation (at most ``max_values``), then the controls,
    each shown once: a value whose tokens are all controls is drawn as a control, and the
    pooled controls row is left out when it is exactly one such value (``"DMSO (controls)"``)."""
    table = explorer.label_value_activation(feature, label_column)
    measure = "mean_activation" if kind == "mean" else "fraction_active"
    pooled = table[table["group"] == "control"]
    labelled = table[table["group"] != "control"]
    all_controls = (labelled["n_control"] == labelled["n_tokens"]) & (labelled["n_tokens"] > 0)
    control_values = labelled[all_controls]
    values = labelled[~all_controls].sort_values(measure, ascending=False, kind="stable")
    shown = values.head(max_values)
    names = [str(v) for v in control_values["value"]]
    if (
        len(control_values) == 1
        and len(pooled)
        and (control_values["n_tokens"].iat[0] == pooled["n_tokens"].iat[0])
    ):
        pooled, names = pooled.iloc[:0], [f"{names[0]} (controls)"]
    what = "mean activation" if kind == "mean" else "fraction of active crops"
    title = f"{what} per {label_column}"
    if len(values) > len(shown):
        title += f" (top {len(shown)} of {len(values)})"
    controls = pd.concat([control_values, pooled])
    return Bars(
        title=title,
        labels=[str(v) for v in shown["value"]] + names + [str(v) for v in pooled["value"]],
        values=[float(v) for v in pd.concat([shown, controls])[measure]],
        is_control=[False] * len(shown) + [True] * len(controls),
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
    selection: FeatureSelection,
    *,
    channel_limits: Sequence[tuple[float, float]] | None = None,
    channel_colors: Sequence[Sequence[float]] | None = None,
    thumbnail_size: int = THUMBNAIL_SIZE,
) -> FeatureView:
    """Layers, crops and bars of a selection (crop thumbnails need the channels' contrast
    limits and colours)."""
    feature, well = selection.feature, selection.well
    view = FeatureView(feature=feature, well=well)
    if mosaic is not None:
        view.layers.append(heatmap_layer_data(explorer, mosaic, feature, selection.kind, selection.name))
        for layer in (
            activation_map_layer_data(explorer, mosaic, selection),
            cells_layer_data(explorer, mosaic, selection),
        ):
            if layer is not None:
                view.layers.append(layer)
    if channel_limits is not None and channel_colors is not None:
        view.crops = top_crop_thumbnails(
            explorer, selection.top_crops, channel_limits, channel_colors, thumbnail_size
        )
    if selection.label_column is not None:
        view.bars = label_value_bars(explorer, feature, selection.label_column, kind=selection.kind)
    return view


def computed_quickly(
    explorer: FeatureExplorer,
    mosaic: PlateMosaic | None,
    selection: FeatureSelection,
    *,
    thumbnail_size: int = THUMBNAIL_SIZE,
    max_pixels: int = QUICK_MAX_PIXELS,
) -> bool:
    """Whether :func:`feature_view` of ``selection`` reads nothing from disk and maps at most
    ``max_pixels`` field pixels: quick enough (tens of ms) to run on the GUI thread."""
    if mosaic is None or selection.well is None:
        return True
    plate = explorer.plate
    if plate is not None:
        height, width = plate.image_shape
        if len(selection.fields) * height * width > max_pixels:
            return False
    return explorer.in_memory(
        selection.well,
        mode=selection.mode,
        label_name=selection.label_name,
        crop_rows=[crop.row for crop in selection.top_crops],
        thumbnail_size=thumbnail_size,
    )


def feature_table(
    explorer: FeatureExplorer,
    label_column: str | None,
    notes: FeatureNotes | None = None,
    profiles: ScreenProfiles | None = None,
) -> pd.DataFrame:
    """The Features panel's table: readable column names, one row per feature; ``name`` when
    the dictionary has a file (its notes); on a screen the plates where the feature is active
    and its top plate; with profiles, its top values of the label column by z-score against
    same-plate controls (``_best z`` sorts them)."""
    table = explorer.feature_table(label_column)
    features = table["feature"].to_numpy()
    out = {"feature": features}
    if notes is not None:
        out["name"] = [notes.name(int(f)) for f in features]
    out.update({
        "frequency": table["frequency"].to_numpy(),
        "most selective for": [
            ("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
            for v in table["best_value"]
        ],
        "max selectivity": table["max_selectivity"].to_numpy(),
    })
    if profiles is not None and label_column in profiles.profiles:
        texts, best = profiles.top_values(label_column)
        out["top values (z)"] = texts
        out["_best z"] = best
    if "n_plates" in table:
        out["plates"] = table["n_plates"].to_numpy()
        out["top plate"] = table["top_plate"].astype(str).to_numpy()
    out["avg selectivity"] = table["average_selectivity"].to_numpy()
    out["dead"] = table["dead"].to_numpy()
    return pd.DataFrame(out)
