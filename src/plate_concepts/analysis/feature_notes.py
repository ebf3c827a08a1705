"""Names, tags and notes of a dictionary's features, kept in a small JSON file beside the
dictionary (``DICT.safetensors`` -> ``DICT.names.json``), never inside the safetensors file, so
naming a feature never rewrites the dictionary.

The file::

    {"format": "plate-concepts-feature-notes", "version": 1, "dictionary": "DICT.safetensors",
     "n_features": 256, "dictionary_saved_at": "2026-12-02T18:39:21+0000",
     "features": {"12": {"name": "enlarged nuclei", "tags": ["nucleus"], "note": "..."}}}

Writes are atomic (a temporary sibling renamed into place) and merge: the features changed here
replace theirs in the file as it is on disk when saving, so names written meanwhile by another
program (the command line while the viewer is open) are kept. A file that cannot be read is
reported with its path and left as it is. Names written for an earlier fit of the same
dictionary file (another ``saved_at`` or number of features) are loaded with a warning: they
may describe other features.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plate_concepts._io import atomic_path

FORMAT_NAME = "plate-concepts-feature-notes"
FORMAT_VERSION = 1
SUFFIX = ".names.json"


def notes_path(dictionary: str | os.PathLike) -> Path:
    """The names file of a dictionary file: ``DICT.safetensors`` -> ``DICT.names.json``."""
    path = Path(dictionary)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + SUFFIX)


@dataclass
class FeatureNote:
    """What a user wrote about one feature."""

    name: str = ""
    tags: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def is_empty(self) -> bool:
        return not (self.name or self.tags or self.note)

    def matches(self, text: str) -> bool:
        """Whether ``text`` (case-insensitive) is in the name, a tag or the note."""
        text = text.casefold()
        return any(text in part.casefold() for part in (self.name, self.note, *self.tags))


class FeatureNotes:
    """The names, tags and notes of one dictionary's features (0-based feature numbers).

    ``FeatureNotes.load(DICT)`` reads them (none yet: empty); change them with :meth:`set`,
    :meth:`tag`, :meth:`untag`, :meth:`clear`, then :meth:`save`.
    """

    def __init__(
        self, path: Path, dictionary: str, n_features: int | None, notes: dict[int, FeatureNote],
        saved_at: str | None = None,
    ) -> None:
        self.path = path
        self.dictionary = dictionary
        self.n_features = n_features
        self.notes = notes
        self.saved_at = saved_at  # the dictionary file's, to tell a refit at the same path
        self._changed: set[int] = set()  # what save() writes over the file on disk

    @classmethod
    def load(cls, dictionary: str | os.PathLike, n_features: int | None = None) -> FeatureNotes:
        """The notes of a dictionary file (``n_features`` checks feature numbers; default: from
        the file's metadata, so a missing file is an error, never an orphan names file)."""
        from plate_concepts.dictionary.io import read_dictionary_metadata

        dictionary = Path(dictionary)
        saved_at = None
        if n_features is None or dictionary.is_file():
            metadata = read_dictionary_metadata(dictionary)  # a clear error when it is missing
            n_features = int(metadata["n_features"]) if n_features is None else n_features
            saved_at = metadata.get("saved_at")
        path = notes_path(dictionary)
        notes: dict[int, FeatureNote] = {}
        if path.exists():
            notes, record = _read(path, n_features)
            _warn_if_another_fit(path, record, dictionary.name, n_features, saved_at)
        return cls(path, dictionary.name, n_features, notes, saved_at)

    # ------------------------------------------------------------------ reading
    def get(self, feature: int) -> FeatureNote:
        return self.notes.get(self._check(feature), FeatureNote())

    def name(self, feature: int) -> str:
        return self.get(feature).name

    def label(self, feature: int) -> str:
        """'feature 12' or 'feature 12: enlarged nuclei' (layer names, tables, reports)."""
        name = self.name(feature)
        return f"feature {feature}: {name}" if name else f"feature {feature}"

    def search(self, text: str) -> list[int]:
        """Features whose name, tags or note contain ``text`` (case-insensitive), in order."""
        return [f for f, note in sorted(self.notes.items()) if note.matches(text)]

    @property
    def named(self) -> dict[int, FeatureNote]:
        """Every feature with a name, tag or note, in order."""
        return dict(sorted(self.notes.items()))

    def tags(self) -> list[str]:
        """Every tag in use, sorted."""
        return sorted({tag for note in self.notes.values() for tag in note.tags})

    # ------------------------------------------------------------------ changing
    def set(
        self, feature: int, *, name: str | None = None, tags: list[str] | None = None, note: str | None = None
    ) -> FeatureNote:
        """Set the name, the tags (replacing them) or the note of a feature (None: unchanged)."""
        feature = self._check(feature)
        current = self.notes.get(feature, FeatureNote())
        updated = FeatureNote(
            current.name if name is None else _one_line(name, "name"),
            list(current.tags) if tags is None else _tags(tags),
            current.note if note is None else _text(note, "note"),
        )
        self._store(feature, updated)
        return updated

    def tag(self, feature: int, *tags: str) -> FeatureNote:
        current = self.get(feature)
        return self.set(feature, tags=[*current.tags, *tags])

    def untag(self, feature: int, *tags: str) -> FeatureNote:
        remove = {t.strip() for t in tags}
        return self.set(feature, tags=[t for t in self.get(feature).tags if t not in remove])

    def clear(self, feature: int) -> None:
        feature = self._check(feature)
        self.notes.pop(feature, None)
        self._changed.add(feature)

    def save(self) -> Path:
        """Write the file atomically (an empty set of notes still writes one), over the file as
        it is now: features changed here replace theirs, the others keep what is on disk (and
        are read back into these notes)."""
        with _saving(self.path.with_name(self.dictionary)):
            if self.path.exists():
                on_disk, _ = _read(self.path, self.n_features)  # unreadable: an error, the file is kept
                self.notes = {
                    **{f: n for f, n in on_disk.items() if f not in self._changed},
                    **{f: n for f, n in self.notes.items() if f in self._changed},
                }
            record = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "dictionary": self.dictionary,
                "n_features": self.n_features, "dictionary_saved_at": self.saved_at,
                "features": {
                    str(f): {"name": n.name, "tags": n.tags, "note": n.note} for f, n in sorted(self.notes.items())
                },
            }
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        self._changed.clear()
        return self.path

    def _store(self, feature: int, note: FeatureNote) -> None:
        self._changed.add(feature)
        if note.is_empty:
            self.notes.pop(feature, None)
        else:
            self.notes[feature] = note

    def _check(self, feature: Any) -> int:
        if isinstance(feature, bool) or not hasattr(feature, "__index__"):
            raise TypeError(f"feature must be a feature number, got {feature!r}")
        number = feature.__index__()
        if number < 0 or (self.n_features is not None and number >= self.n_features):
            limit = f"0..{self.n_features - 1}" if self.n_features is not None else "0 or more"
            raise ValueError(f"feature {number} is not a feature of {self.dictionary} ({limit})")
        return number


@contextmanager
def _saving(dictionary: Path) -> Iterator[None]:
    """One program at a time reads, merges and writes a names file: an advisory lock on the
    dictionary file (POSIX; never written by a save). Without one (Windows, a file system
    without locks, no dictionary file) the merge alone keeps all but simultaneous edits."""
    try:
        import fcntl

        handle = open(dictionary, "rb")  # noqa: SIM115 - held for the lock's lifetime
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks here (some network file systems): the merge still applies
        yield


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a feature's {what} must be text, got {value!r}")
    return value


def _one_line(value: Any, what: str) -> str:
    """A name or tag: one line of text (it goes into layer names and table cells), stripped."""
    text = _text(value, what).strip()
    if any(not c.isprintable() for c in text):
        raise ValueError(f"a feature's {what} must be one line of printable text, got {text!r}")
    return text


def _tags(tags: Any) -> list[str]:
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise TypeError(f"a feature's tags must be a list of text, got {tags!r}")
    out: list[str] = []
    for tag in tags:
        tag = _one_line(tag, "tag")
        if tag and tag not in out:
            out.append(tag)
    return out


ENTRY_KEYS = frozenset({"name", "tags", "note"})


def _read(path: Path, n_features: int | None) -> tuple[dict[int, FeatureNote], dict[str, Any]]:
    """The notes of a names file, and the file's record."""
    problem = f"{path} is not a readable feature-names file"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{problem} ({err}); fix it or move it away (it was left as it is)") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise ValueError(f"{problem} (no \"format\": \"{FORMAT_NAME}\"); move it away (it was left as it is)")
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{problem} (\"version\" must be a whole number, got {version!r}); it was left as it is")  # noqa: TRY004 - a bad file, not a bad call
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: feature-names format version {version} is newer than this plate_concepts reads")
    features = record.get("features")
    if not isinstance(features, dict):
        raise ValueError(f"{problem} (\"features\" must be an object)")  # noqa: TRY004 - a bad file, not a bad call
    notes: dict[int, FeatureNote] = {}
    for key, entry in features.items():
        try:
            feature = int(key)
            if feature < 0 or (n_features is not None and feature >= n_features):
                raise ValueError(f"no feature {feature} in a dictionary of {n_features}")
            if feature in notes:
                raise ValueError(f"feature {feature} has two entries")
            if not isinstance(entry, dict):
                raise TypeError("each entry must be an object with name, tags and note")
            if unknown := sorted(set(entry) - ENTRY_KEYS):  # saving would drop them
                raise ValueError(f"unknown key(s) {unknown} (expected {sorted(ENTRY_KEYS)})")
            note = FeatureNote(_one_line(entry.get("name", ""), "name"), _tags(entry.get("tags", [])),
                               _text(entry.get("note", ""), "note"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{problem}: entry {key!r}: {err}; it was left as it is") from err
        if not note.is_empty:
            notes[feature] = note
    return notes, record


def _warn_if_another_fit(
    path: Path, record: dict[str, Any], dictionary: str, n_features: int | None, saved_at: str | None
) -> None:
    """Names of an earlier fit saved at the same path describe other features: say so."""
    then = {"saved at": record.get("dictionary_saved_at"), "features": record.get("n_features")}
    now = {"saved at": saved_at, "features": n_features}
    differ = [key for key in then if then[key] is not None and now[key] is not None and then[key] != now[key]]
    if differ:
        said = ", ".join(f"{key} {then[key]} (now {now[key]})" for key in differ)
        warnings.warn(
            f"{path} was written for another fit of {dictionary} ({said}): its names may describe "
            "other features; check them (naming a feature records this fit), or move the file away",
            UserWarning, stacklevel=3,
        )
