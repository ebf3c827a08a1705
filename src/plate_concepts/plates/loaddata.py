"""Read a CellProfiler LoadData CSV (one row per field, one file per channel) as a lazy Plate.

A LoadData table names each channel's file in a ``FileName_<Channel>`` / ``PathName_<Channel>``
column pair, and the field's place in ``Metadata_Plate``, ``Metadata_Well`` (any spelling, or
``Metadata_Row`` + ``Metadata_Col``) and ``Metadata_Site`` (or ``Metadata_Field``). An optional
``Frame_<Channel>`` column gives the page of a multi-page TIFF. Channels named ``Illum...`` are
illumination-correction functions, not images, and are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from plate_concepts.plates.geometry import parse_well
from plate_concepts.plates.model import Plate
from plate_concepts.plates.platemap import as_text, wells_from_table
from plate_concepts.plates.tiff_folder import check_tiff_headers, lazy_tiff_stack

_FILE_COLUMN = re.compile(r"FileName_(?P<channel>.+)")
_PATH_COLUMN = re.compile(r"PathName_(?P<channel>.+)")
_SITE_COLUMNS = ("Metadata_Site", "Metadata_Field")


def is_loaddata_csv(path: str | Path) -> bool:
    """Whether a file is a CSV whose header has at least one FileName_/PathName_ column pair."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    try:
        columns = list(pd.read_csv(path, nrows=0).columns)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return False
    return bool(_image_channels(columns))


def read_loaddata_csv(
    csv_path: str | Path,
    channel_names: Sequence[str] | None = None,
    plate: str | None = None,
) -> Plate:
    """Read the images a LoadData CSV lists as a lazy, single-level :class:`Plate`.

    Parameters
    ----------
    csv_path
        The LoadData CSV; relative ``PathName_`` folders are resolved against its folder.
    channel_names
        If every name is one of the table's channels: read those channels, in that order.
        Otherwise, names for all the table's channels in column order (same count).
    plate
        Which ``Metadata_Plate`` to read when the table holds several.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"LoadData CSV {csv_path} does not exist")
    # Text only: file names like 'NA' or '001' must stay as written.
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    source = f"LoadData CSV {csv_path}"
    channels = _image_channels(list(table.columns), source)
    if not channels:
        raise ValueError(
            f"{source} has no FileName_<channel> / PathName_<channel> column pairs; its columns "
            f"are {list(table.columns)}"
        )
    table = _select_plate(table, plate, source)
    selected, names = _choose_channels(channels, channel_names, source)

    wells = wells_from_table(table, source=source)
    site_column = next((c for c in _SITE_COLUMNS if c in table.columns), None)
    sites = []
    for number, value in enumerate(table[site_column] if site_column else ["1"] * len(table), 1):
        text = as_text(value)
        if not text.isdigit():
            raise ValueError(
                f"{source}: data row {number} has {site_column}={value!r}; expected a number"
            )
        sites.append(int(text))

    base = csv_path.parent
    fields: dict[tuple[str, int], list[tuple[Path, int]]] = {}
    missing = []
    for number, ((_, record), well, site) in enumerate(
        zip(table.iterrows(), wells, sites, strict=True), 1
    ):
        if (well, site) in fields:
            raise ValueError(
                f"{source}: data row {number} repeats well {well} site {site}; one row per field "
                "is expected (planes and timepoints are not supported)"
            )
        files = [_channel_file(record, channel, base, source, number) for channel in selected]
        for channel, (path, _) in zip(selected, files, strict=True):
            if not path.is_file():
                missing.append(f"row {number} (well {well}, channel {channel}): {path}")
        fields[(well, site)] = files
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} image files not found: "
            + "; ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )

    all_files = [item for files in fields.values() for item in files]
    shape, dtype = check_tiff_headers([p for p, _ in all_files], [f for _, f in all_files])
    images = {}
    for well in sorted({w for w, _ in fields}, key=parse_well):
        for index, site in enumerate(sorted(s for w, s in fields if w == well)):
            paths, pages = zip(*fields[(well, site)], strict=True)
            images[(well, index)] = [lazy_tiff_stack(paths, shape, dtype, pages)]
    plate_names = set(table["Metadata_Plate"]) if "Metadata_Plate" in table.columns else set()
    return Plate(
        name=plate_names.pop() if len(plate_names) == 1 else csv_path.stem,
        channels=names,
        images=images,
        reader="loaddata",
        source=str(csv_path),
    )


def _channel_file(
    record: pd.Series, channel: str, base: Path, source: str, number: int
) -> tuple[Path, int]:
    """(path, page) of one channel of one LoadData row; relative folders start at ``base``."""
    folder = Path(record[f"PathName_{channel}"])
    path = (folder if folder.is_absolute() else base / folder) / record[f"FileName_{channel}"]
    frame = as_text(record.get(f"Frame_{channel}", "")) or "0"
    if not frame.isdigit():
        raise ValueError(
            f"{source}: data row {number} has Frame_{channel}={frame!r}; expected a page number"
        )
    return path, int(frame)


def _image_channels(columns: list[str], source: str | None = None) -> list[str]:
    """Channels with both a FileName_ and a PathName_ column, in column order (Illum* skipped).

    With ``source``, a FileName_ column without its PathName_ (or the reverse) is an error.
    """
    file_channels = [m["channel"] for c in columns if (m := _FILE_COLUMN.fullmatch(str(c)))]
    path_channels = [m["channel"] for c in columns if (m := _PATH_COLUMN.fullmatch(str(c)))]
    unpaired = sorted(set(file_channels) ^ set(path_channels))
    if source is not None and unpaired:
        raise ValueError(
            f"{source}: channels {unpaired} lack their FileName_ or PathName_ column; every "
            "channel needs both"
        )
    return [c for c in file_channels if c in path_channels and not c.startswith("Illum")]


def _select_plate(table: pd.DataFrame, plate: str | None, source: str) -> pd.DataFrame:
    plates = sorted(set(table["Metadata_Plate"])) if "Metadata_Plate" in table.columns else []
    if plate is None:
        if len(plates) > 1:
            raise ValueError(f"{source} holds plates {plates}; choose one with plate=")
        return table
    if plate not in plates:
        raise ValueError(f"{source}: plate {plate!r} not found; its plates are {plates}")
    return table[table["Metadata_Plate"] == plate].reset_index(drop=True)


def _choose_channels(
    channels: list[str], channel_names: Sequence[str] | None, source: str
) -> tuple[list[str], list[str]]:
    """(table channels to read, their names in the plate)."""
    if channel_names is None:
        return channels, channels
    wanted = [str(n) for n in channel_names]
    if wanted and all(n in channels for n in wanted):
        return wanted, wanted
    if len(wanted) == len(channels):
        return channels, wanted
    raise ValueError(
        f"{source}: channel_names {wanted} neither picks channels among {channels} nor renames "
        f"all {len(channels)} of them"
    )
