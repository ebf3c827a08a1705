"""The in-memory plate model every reader returns: lazy (dask) images, never pixels in memory."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import dask.array as da
import numpy as np
import pandas as pd

from plate_concepts.plates.geometry import PlateFormat, canonical_well, parse_well

FieldKey = tuple[str, int]
"""(canonical well name, 0-based field index within the well)."""


@dataclass
class Plate:
    """A multi-well plate: for each (well, field), a multiscale stack of lazy (C, Y, X) images.

    ``images[(well, field)]`` is a list of levels, full resolution first, each a dask array of
    shape (channels, y, x); every field of a plate has the same channels, shape and dtype.
    ``labels[(well, field)]`` maps a label-image name (``nuclei``, ``cells``) to its levels
    (each (y, x), integer). ``platemap`` has one row per well, indexed by canonical well name.
    """

    name: str
    channels: list[str]
    images: dict[FieldKey, list[da.Array]]
    reader: str
    source: str = ""
    plate_format: PlateFormat | None = None
    labels: dict[FieldKey, dict[str, list[da.Array]]] = field(default_factory=dict)
    platemap: pd.DataFrame | None = None
    pixel_size_um: float | None = None
    channel_colors: list[str] | None = None
    platemap_source: str | None = None
    """The plate-map file joined to the plate, when one was (see ``open_plate``)."""
    format_inferred: bool = field(default=False, init=False, repr=False)
    """Whether the format was inferred from the imaged wells rather than stated by the source:
    a plate map may then widen it (:meth:`include_wells`)."""

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(f"plate {self.source or self.name!r} has no images")
        self.images = {(canonical_well(w), int(f)): levels for (w, f), levels in self.images.items()}
        self.labels = {(canonical_well(w), int(f)): lab for (w, f), lab in self.labels.items()}
        # The most common layout is the plate's: an odd field is named, not the majority.
        layouts = Counter((levels[0].shape, np.dtype(levels[0].dtype)) for levels in self.images.values())
        (shape, dtype), _ = layouts.most_common(1)[0]
        reference_key = min(k for k, levels in self.images.items() if levels[0].shape == shape)
        if len(shape) != 3:
            raise ValueError(
                f"field {reference_key} of {self.source or self.name!r} has shape {shape}; "
                "expected (channels, y, x)"
            )
        if shape[0] != len(self.channels):
            raise ValueError(
                f"field {reference_key} of {self.source or self.name!r} has {shape[0]} channels "
                f"but the plate names {len(self.channels)}: {self.channels}"
            )
        odd = sorted(
            key for key, levels in self.images.items()
            if levels[0].shape != shape or np.dtype(levels[0].dtype) != dtype
        )
        if odd:
            first = self.images[odd[0]][0]
            names = ", ".join(f"{w} field {f}" for w, f in odd[:5]) + (" ..." if len(odd) > 5 else "")
            raise ValueError(
                f"{len(odd)} field(s) of {self.source or self.name!r} differ from the other "
                f"{len(self.images) - len(odd)}: {names} (well {odd[0][0]} field {odd[0][1]} is "
                f"{first.shape} {first.dtype}, the others {shape} {dtype}); all fields of a plate "
                "must share channels, shape and dtype"
            )
        self.format_inferred = self.plate_format is None
        if self.plate_format is None:
            self.plate_format = PlateFormat.smallest_containing(self.wells)
        for well in self.wells:
            if not self.plate_format.contains(*parse_well(well)):
                raise ValueError(
                    f"well {well} lies outside the {self.plate_format.n_wells}-well plate format"
                )

    def include_wells(self, wells: Iterable[str], source: str = "the plate map") -> None:
        """Take the plate format from the wells of a plate map when the plate's own format was
        inferred from its imaged wells: a partly imaged plate (wells C03..N22 in the map, a few
        of them imaged) is the smallest standard plate holding all of them (here 384 wells, not
        the 12 that the imaged wells alone would suggest). A format stated by the source
        (OME-Zarr rows and columns) is kept."""
        if not self.format_inferred:
            return
        names = [*self.wells, *(str(w) for w in wells)]
        try:
            self.plate_format = PlateFormat.smallest_containing(names)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @property
    def wells(self) -> list[str]:
        """Wells with at least one field, sorted row by row."""
        return sorted({w for w, _ in self.images}, key=parse_well)

    def fields(self, well: str) -> list[int]:
        well = canonical_well(well)
        return sorted(f for w, f in self.images if w == well)

    @property
    def fields_per_well(self) -> dict[str, int]:
        return {w: len(self.fields(w)) for w in self.wells}

    def image(self, well: str, field: int = 0, level: int = 0) -> da.Array:
        """Lazy (C, Y, X) image of one field at one resolution level."""
        key = (canonical_well(well), int(field))
        if key not in self.images:
            raise KeyError(f"plate {self.name!r} has no field {field} in well {key[0]}")
        return self.images[key][level]

    def field_labels(self, well: str, field: int = 0, level: int = 0) -> dict[str, da.Array]:
        """Label images (name -> lazy (Y, X) integer array) of one field; empty if none."""
        key = (canonical_well(well), int(field))
        return {name: levels[level] for name, levels in self.labels.get(key, {}).items()}

    @property
    def image_shape(self) -> tuple[int, int]:
        """(y, x) of every field at full resolution."""
        return tuple(self.images[min(self.images)][0].shape[1:])  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self.images[min(self.images)][0].dtype

    @property
    def n_levels(self) -> int:
        """Resolution levels every field has."""
        return min(len(levels) for levels in self.images.values())

    @property
    def label_names(self) -> list[str]:
        return sorted({name for lab in self.labels.values() for name in lab})

    def well_metadata(self, well: str) -> dict[str, object]:
        """The plate-map row of a well (empty if it has none)."""
        if self.platemap is None:
            return {}
        well = canonical_well(well)
        if well not in self.platemap.index:
            return {}
        return self.platemap.loc[well].to_dict()
