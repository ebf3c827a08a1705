"""Read a folder of single-plane TIFF exports (one file per well, field and channel) as a Plate.

File names are parsed by a regular expression with named groups:

- the well: ``well`` (any spelling, ``B7``/``B07``/``r02c07``), or ``row`` (letters or a
  1-based number) and ``column`` (1-based number);
- ``field`` and ``channel`` (ids; numeric ids sort as numbers). A group that does not take part
  in a match reads as id 1, so a pattern may leave out the site of one-field exports;
- optional ``channel_name`` (the channel's name as written in the file name), ``plane`` and
  ``timepoint`` (only one plane and timepoint is read: the first unless asked), ``plate``.

A pattern without ``/`` is matched against each file's name, one with ``/`` against its path
relative to the folder (for exports that put timepoints or planes in subfolders).

Segmentation masks saved next to the images (CellProfiler's ``SaveImages`` naming:
``<image file stem>_Mask<Objects>.tif``, e.g. ``B7_01_1_3_DAPI_001_MaskNuclei.tiff``) become the
fields' label images, named by their objects in lower case (``nuclei``, ``cells``); they are
looked for in a ``masks``, ``labels`` or ``segmentation`` folder inside or beside the folder.
A binary mask (background and one value) has its connected components numbered; a mask of
object ids is read as it is.
Pixels stay on disk: each channel is one ``dask.delayed`` read of its file, and only the TIFF
headers are read to learn and check shapes.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile

from plate_concepts.plates.geometry import canonical_well, parse_well
from plate_concepts.plates.model import Plate

_UUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"

PRESETS: dict[str, str] = {
    # Opera Phenix / Harmony: r03c03f03p01-ch1sk1fk1fl1.tiff (sk = timepoint; fk, fl = FLIM ids).
    "phenix": (
        r"r(?P<row>\d{1,3})c(?P<column>\d{1,3})f(?P<field>\d{1,4})p(?P<plane>\d{1,4})"
        r"-ch(?P<channel>\d{1,3})sk(?P<timepoint>\d{1,5})fk\d+fl\d+\.tiff?"
    ),
    # ImageXpress / MetaXpress: [Plate_]B07[_s1][_w1][<UUID>].tif, optionally below
    # TimePoint_<t>/ and ZStep_<z>/ folders; thumbnails (..._thumb...) do not match. The plate
    # prefix is lazy so that the earliest well-like token is the well ('P1_B07_s1' -> B07).
    "imagexpress": (
        r"(?:[^/]*/)*?(?:TimePoint_(?P<timepoint>\d+)/)?(?:ZStep_(?P<plane>\d+)/)?"
        r"(?:(?P<plate>[^/]+?)_)??(?P<well>[A-Za-z]{1,2}\d{1,3})(?:_s(?P<field>\d{1,4}))?"
        r"(?:_w(?P<channel>\d{1,2}))?(?:_?" + _UUID + r")?\.tiff?"
    ),
    # NF1 Schwann-cell plates: <Well>_01_<channel#>_<field>_<CHANNEL>_001.tif
    # (B7_01_1_3_DAPI_001.tif).
    "nf1": (
        r"(?P<well>[A-Za-z]{1,2}\d{1,3})_\d+_(?P<channel>\d+)_(?P<field>\d+)"
        r"_(?P<channel_name>[A-Za-z0-9]+)_\d+\.tiff?"
    ),
}
"""Built-in file-name patterns (matched whole, case-sensitively)."""

MASK_NAME = re.compile(r"(?P<stem>.+)_Mask(?P<objects>[A-Za-z0-9]+)\.tiff?")
"""A mask file: the stem of the image file it was segmented from, and its objects."""
MASK_FOLDERS = ("masks", "labels", "segmentation")
TIFF_SUFFIXES = (".tif", ".tiff")

Id = int | str
"""A field/channel/plane id from a file name: an int when it is all digits."""


@dataclass(frozen=True)
class _ImageFile:
    path: Path
    well: str
    field: Id
    channel: Id
    channel_name: str | None
    plane: Id | None
    timepoint: Id | None
    plate: str | None


def read_tiff_folder(
    folder: str | Path,
    pattern: str | None = None,
    channel_names: Sequence[str] | None = None,
    recursive: bool = False,
    plane: int | str | None = None,
    timepoint: int | str | None = None,
    masks: str | Path | bool = True,
) -> Plate:
    """Read a folder of per-channel TIFF files as a lazy, single-level :class:`Plate`.

    Parameters
    ----------
    folder
        The folder holding the TIFF files.
    pattern
        A name from :data:`PRESETS`, or a regular expression with named groups (see the module
        docstring); ``None`` tries every preset and uses the one matching the most files.
    channel_names
        Names for the channels in sorted-id order; default: the ``channel_name`` group of the
        pattern if it has one, else ``ch<id>``.
    recursive
        Also look in subfolders.
    plane, timepoint
        Which plane / timepoint to read when the pattern has those groups; default the first.
    masks
        The folder of segmentation masks (see the module docstring); True looks for one inside
        or beside ``folder``, False reads none.

    Files that do not match the pattern are ignored. The plate's reader is ``tiff-<preset>``, or
    ``tiff-pattern`` for a user regex.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"TIFF folder {folder} does not exist or is not a folder")
    paths = _list_files(folder, recursive)
    if pattern is None:
        preset = _best_preset(folder, paths)
        if preset is None:
            hint = (
                f"; {folder} is a folder of segmentation masks: pass the folder of the images "
                "they belong to"
                if folder.name.lower() in MASK_FOLDERS
                else "; pass a regex pattern (--pattern) that matches the image file names"
            )
            raise ValueError(
                f"no file of the {len(paths)} files in {folder} matches any preset "
                f"{sorted(PRESETS)} (e.g. {[p.name for p in paths[:3]]}){hint}"
            )
        pattern = preset
    reader = f"tiff-{pattern}" if pattern in PRESETS else "tiff-pattern"
    regex = _compile_pattern(PRESETS.get(pattern, pattern))
    files = [f for p in paths if (f := _parse(regex, folder, p)) is not None]
    if not files:
        raise ValueError(
            f"no file in {folder} matches the pattern {pattern!r} ({len(paths)} files seen"
            + (f", e.g. {[p.name for p in paths[:3]]})" if paths else ")")
        )
    files = _select(files, "plane", plane)
    files = _select(files, "timepoint", timepoint)
    table = _index_files(files)
    channel_ids = sorted(
        {channel for channels in table.values() for channel in channels}, key=_id_key
    )
    for (well, field_id), channels in sorted(table.items(), key=_field_sort_key):
        if len(channels) != len(channel_ids):
            raise ValueError(
                f"well {well} field {field_id} has channels {sorted(channels, key=_id_key)} but "
                f"the plate has {channel_ids} (folder {folder})"
            )
    names = _channel_names(files, channel_ids, channel_names)

    ordered_paths = {key: [channels[c] for c in channel_ids] for key, channels in table.items()}
    shape, dtype = check_tiff_headers([p for ps in ordered_paths.values() for p in ps])
    images = {}
    for well in sorted({w for w, _ in table}, key=parse_well):
        field_ids = sorted((f for w, f in table if w == well), key=_id_key)
        for index, field_id in enumerate(field_ids):
            images[(well, index)] = [lazy_tiff_stack(ordered_paths[(well, field_id)], shape, dtype)]
    field_indices = {
        (well, field_id): index
        for well in {w for w, _ in table}
        for index, field_id in enumerate(sorted((f for w, f in table if w == well), key=_id_key))
    }
    stems = {
        path.name.removesuffix(path.suffix): (well, field_indices[(well, field_id)])
        for (well, field_id), channels in table.items()
        for path in channels.values()
    }
    mask_folder = _mask_folder(folder) if masks is True else (Path(masks) if masks else None)
    plates = {f.plate for f in files if f.plate}
    return Plate(
        name=plates.pop() if len(plates) == 1 else _plate_name(folder),
        channels=names,
        images=images,
        reader=reader,
        source=str(folder),
        labels={} if mask_folder is None else _read_masks(mask_folder, stems, shape),
    )


def _mask_folder(folder: Path) -> Path | None:
    """The first masks/labels/segmentation folder inside or beside ``folder``."""
    for parent in (folder, folder.parent):
        for name in MASK_FOLDERS:
            if (parent / name).is_dir() and parent / name != folder:
                return parent / name
    return None


def _read_masks(
    folder: Path, stems: dict[str, tuple[str, int]], shape: tuple[int, int]
) -> dict[tuple[str, int], dict[str, list[da.Array]]]:
    """Label images of the fields from the mask files of ``folder`` whose stems name one of
    the plate's image files (others are left out); lazy, one read per mask."""
    if not folder.is_dir():
        raise FileNotFoundError(f"mask folder {folder} does not exist or is not a folder")
    labels: dict[tuple[str, int], dict[str, list[da.Array]]] = defaultdict(dict)
    for path in _list_files(folder, recursive=False):
        match = MASK_NAME.fullmatch(path.name)
        if match is None or match["stem"] not in stems:
            continue
        mask_shape, dtype = tiff_plane_header(path)
        if mask_shape != tuple(shape):
            raise ValueError(
                f"mask {path} is {mask_shape} but the images it belongs to are {shape}"
            )
        if dtype.kind not in "iu":
            raise ValueError(f"mask {path} holds {dtype} values; label images hold integer ids")
        key = stems[match["stem"]]
        read = dask.delayed(_read_mask, pure=True)(str(path), shape)
        labels[key][match["objects"].lower()] = [da.from_delayed(read, shape, dtype=np.int32)]
    return {key: dict(sorted(named.items())) for key, named in labels.items()}


def _read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask as an int32 label image: object ids kept, a binary mask's components numbered."""
    from skimage.measure import label

    mask = _read_plane(path, 0, shape)
    values = np.unique(mask)
    if len(values) <= 2 and values[0] == 0:  # background and one value: a binary mask
        return label(mask > 0, connectivity=2).astype(np.int32)
    return mask.astype(np.int32)


def holds_tiff_files(folder: str | Path) -> bool:
    """Whether a folder directly holds TIFF files (hidden files aside)."""
    return any(
        p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".") and p.is_file()
        for p in Path(folder).iterdir()
    )


def detect_tiff_preset(folder: str | Path, recursive: bool = False) -> str | None:
    """The preset matching the most files of a folder (ties: first in PRESETS), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"TIFF folder {folder} does not exist or is not a folder")
    return _best_preset(folder, _list_files(folder, recursive))


def tiff_plane_header(path: str | Path, page: int = 0) -> tuple[tuple[int, int], np.dtype]:
    """(shape, dtype) of one page of a TIFF file, from its header only (no pixels read)."""
    try:
        with tifffile.TiffFile(path) as tif:
            tiff_page = tif.pages[page]
            shape, dtype = tuple(tiff_page.shape), np.dtype(tiff_page.dtype)
    except Exception as error:  # tifffile raises many kinds on corrupt files; name the file
        raise ValueError(f"cannot read the TIFF header of {path} (page {page}): {error}") from error
    if len(shape) != 2:
        raise ValueError(
            f"{path} page {page} has shape {shape}; expected one 2-D single-channel plane per file"
        )
    return shape, dtype  # type: ignore[return-value]


def check_tiff_headers(
    paths: Sequence[str | Path], pages: Sequence[int] | None = None
) -> tuple[tuple[int, int], np.dtype]:
    """Check that all files share one plane shape and dtype (headers only); return them."""
    pages = list(pages) if pages is not None else [0] * len(paths)
    headers = [tiff_plane_header(path, page) for path, page in zip(paths, pages, strict=True)]
    (expected_shape, expected_dtype), _ = Counter(headers).most_common(1)[0]
    odd = [(path, header) for path, header in zip(paths, headers, strict=True)
           if header != (expected_shape, expected_dtype)]
    if odd:
        (path, (shape, dtype)), others = odd[0], len(paths) - len(odd)
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise ValueError(
            f"{path}{more} is {shape} {dtype} but the other {others} images are "
            f"{expected_shape} {expected_dtype}"
        )
    return expected_shape, expected_dtype


def lazy_tiff_stack(
    paths: Sequence[str | Path],
    shape: tuple[int, int],
    dtype: np.dtype,
    pages: Sequence[int] | None = None,
) -> da.Array:
    """A lazy (C, Y, X) dask array: one delayed read of one TIFF page per channel."""
    pages = list(pages) if pages is not None else [0] * len(paths)
    planes = [
        da.from_delayed(
            dask.delayed(_read_plane, pure=True)(str(path), page, shape), shape=shape, dtype=dtype
        )
        for path, page in zip(paths, pages, strict=True)
    ]
    return da.stack(planes)


def _read_plane(path: str, page: int, shape: tuple[int, int]) -> np.ndarray:
    try:
        plane = tifffile.imread(path, key=page)
    except Exception as error:  # name the file whatever went wrong in the decoder
        raise ValueError(f"cannot read the pixels of {path} (page {page}): {error}") from error
    if plane.shape != tuple(shape):
        raise ValueError(f"{path} page {page} has shape {plane.shape}; its header said {shape}")
    return plane


def _list_files(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and not p.name.startswith("."))


def _best_preset(folder: Path, paths: list[Path]) -> str | None:
    counts = {}
    for name, text in PRESETS.items():
        regex = re.compile(text)
        counts[name] = sum(_matches(regex, folder, p) for p in paths)
    best = max(counts, key=counts.__getitem__)  # first maximum: ties go to the earlier preset
    return best if counts[best] > 0 else None


def _matches(regex: re.Pattern[str], folder: Path, path: Path) -> bool:
    """Whether a file name matches and spells a real well (for choosing a preset)."""
    try:
        return _parse(regex, folder, path) is not None
    except ValueError:
        return False


def _compile_pattern(text: str) -> re.Pattern[str]:
    try:
        regex = re.compile(text)
    except re.error as error:
        raise ValueError(
            f"file-name pattern {text!r} is not a valid regular expression: {error}"
        ) from error
    groups = set(regex.groupindex)
    has_location = "well" in groups or {"row", "column"} <= groups
    if not has_location or "channel" not in groups:
        raise ValueError(
            f"file-name pattern {text!r} has the named groups {sorted(groups)}; it needs 'well' "
            "(or 'row' and 'column') and 'channel' (and usually 'field'), e.g. "
            r"'(?P<well>[A-P]\d+)_s(?P<field>\d+)_w(?P<channel>\d+)\.tif'"
        )
    return regex


def _parse(regex: re.Pattern[str], folder: Path, path: Path) -> _ImageFile | None:
    subject = path.relative_to(folder).as_posix() if "/" in regex.pattern else path.name
    match = regex.fullmatch(subject)
    if match is None:
        return None
    groups = {k: v for k, v in match.groupdict().items() if v is not None}
    try:
        if "well" in groups:
            well = canonical_well(groups["well"])
        else:
            row = groups["row"]
            well = canonical_well(
                f"r{row}c{groups['column']}" if row.isdigit() else f"{row}{groups['column']}"
            )
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: the well in its name cannot be read ({error})") from error
    return _ImageFile(
        path=path,
        well=well,
        field=_as_id(groups.get("field", "1")),
        channel=_as_id(groups.get("channel", "1")),
        channel_name=groups.get("channel_name"),
        plane=_as_id(groups["plane"]) if "plane" in groups else None,
        timepoint=_as_id(groups["timepoint"]) if "timepoint" in groups else None,
        plate=groups.get("plate"),
    )


def _select(files: list[_ImageFile], attribute: str, wanted: int | str | None) -> list[_ImageFile]:
    """Keep one plane (or timepoint): ``wanted``, or the first one found."""
    found = sorted({getattr(f, attribute) for f in files} - {None}, key=_id_key)
    if not found:
        if wanted is not None:
            raise ValueError(
                f"{attribute} {wanted!r} was asked for but the file names carry no {attribute}"
            )
        return files
    choice = found[0] if wanted is None else _as_id(str(wanted))
    if choice not in found:
        raise ValueError(f"{attribute} {wanted!r} not found; the files have {attribute}s {found}")
    return [f for f in files if getattr(f, attribute) in (choice, None)]


def _index_files(files: list[_ImageFile]) -> dict[tuple[str, Id], dict[Id, Path]]:
    """(well, field id) -> channel id -> path; duplicates are an error."""
    table: dict[tuple[str, Id], dict[Id, Path]] = defaultdict(dict)
    for f in files:
        channels = table[(f.well, f.field)]
        if f.channel in channels:
            raise ValueError(
                f"two files for well {f.well} field {f.field} channel {f.channel}: "
                f"{channels[f.channel]} and {f.path}"
            )
        channels[f.channel] = f.path
    return table


def _channel_names(
    files: list[_ImageFile], channel_ids: list[Id], channel_names: Sequence[str] | None
) -> list[str]:
    if channel_names is not None:
        if len(channel_names) != len(channel_ids):
            raise ValueError(
                f"{len(channel_names)} channel names {list(channel_names)} given for "
                f"{len(channel_ids)} channels {channel_ids}"
            )
        return [str(n) for n in channel_names]
    names_by_id: dict[Id, set[str]] = defaultdict(set)
    for f in files:
        if f.channel_name:
            names_by_id[f.channel].add(f.channel_name)
    names = []
    for channel in channel_ids:
        found = names_by_id.get(channel, set())
        if len(found) > 1:
            raise ValueError(
                f"channel {channel} has several names in the file names: {sorted(found)}"
            )
        names.append(
            found.pop() if found else (f"ch{channel}" if isinstance(channel, int) else channel)
        )
    return names


def _as_id(text: str) -> Id:
    return int(text) if text.isdigit() else text


def _id_key(value: Id | None) -> tuple[bool, int | str]:
    return (isinstance(value, str), value)  # type: ignore[return-value]


def _field_sort_key(item: tuple[tuple[str, Id], object]) -> tuple:
    (well, field_id), _ = item
    return parse_well(well), _id_key(field_id)


def _plate_name(folder: Path) -> str:
    # Exports often put the images in an "Images" folder inside the plate's folder.
    folder = folder.resolve()
    return (
        folder.parent.name
        if folder.name.lower() == "images" and folder.parent.name
        else folder.name
    )
