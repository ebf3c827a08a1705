"""Perturbation profiles and confound flags of the explorer's activation pass, for the viewer.

Computed once per explorer in a worker (the explorer preparer's, :func:`screen_profiles`) from
the pass's sums (:mod:`plate_concepts.analysis.perturbations`, :mod:`plate_concepts.analysis.
confounds`), then read on the GUI thread: the Features panel's "top values (z)" column and the
Perturbations panel. No Qt here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from plate_concepts._progress import Cancelled, CancelLike, cancel_requested
from plate_concepts.analysis.confounds import ConfoundScores, confound_scores
from plate_concepts.analysis.perturbations import (
    REPLICATE_Z,
    PerturbationProfiles,
    most_selective_text,
    perturbation_profiles,
)

#: Label values listed per feature in the feature table.
TOP_VALUES = 3


@dataclass
class ScreenProfiles:
    """Per label column its :class:`PerturbationProfiles` (or why there are none), and the
    confound flags of every feature with ``batch`` as the batch column."""

    profiles: dict[str, PerturbationProfiles]
    problems: dict[str, str]
    confounds: ConfoundScores | None
    batch: str | None
    _top: dict[tuple[str, int], tuple[list[str], np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def columns(self) -> list[str]:
        """The label columns with profiles."""
        return list(self.profiles)

    def top_values(self, column: str, n: int = TOP_VALUES) -> tuple[list[str], np.ndarray]:
        """Per feature: its (at most ``n``) label values of ``column`` with the highest z-score
        against same-plate controls, above 2 (``"drug (8.1), dmso2 (2.4)"``), and its best z
        (for sorting; NaN without profiles)."""
        if (column, n) in self._top:
            return self._top[(column, n)]
        result = self.profiles.get(column)
        if result is None or not result.values:
            n_features = result.wells.n_features if result is not None else 0
            return [""] * n_features, np.full(n_features, np.nan)
        z = result.z_table()
        table = z.to_numpy(dtype=np.float64)  # (values, features)
        names = [str(v) for v in z.index]
        order = np.argsort(-table, axis=0, kind="stable")[:n]
        texts = []
        for feature in range(table.shape[1]):
            best = [i for i in order[:, feature] if table[i, feature] > REPLICATE_Z]
            texts.append(", ".join(f"{names[i]} ({table[i, feature]:.1f})" for i in best))
        answer = texts, table.max(axis=0)
        self._top[(column, n)] = answer
        return answer

    def flag_text(self, feature: int) -> str:
        """``"batch 0.45"``: the nuisance a feature is flagged for and its variance fraction."""
        flag = None if self.confounds is None else self.confounds.flags.get(int(feature))
        return "" if flag is None else f"{flag.by} {flag.score:.2f}"

    def why_flagged(self, feature: int) -> str:
        flag = None if self.confounds is None else self.confounds.flags.get(int(feature))
        return "" if flag is None else flag.why()

    def profile_table(self, column: str, value: Any, n: int = 20) -> pd.DataFrame:
        """The ``n`` features with the highest z-score for ``value`` of ``column``: feature, z,
        replicate_fraction, mean, fraction_active and confound (the flag's text)."""
        profile = self.profiles[column].values[value]
        table = profile.top(n)
        table["confound"] = [self.flag_text(int(f)) for f in table["feature"]]
        return table


def default_batch_column(label_columns: Sequence[str], recorded: str | None = None) -> str | None:
    """The batch column for confound flags: the dictionary's recorded one when it is a label
    column, else the first label column named like a batch (``batch``, ``Metadata_Batch``)."""
    if recorded is not None and recorded in label_columns:
        return recorded
    return next((c for c in label_columns if "batch" in c.casefold()), None)


def screen_profiles(
    activation_pass: Any,
    batch: str | None = None,
    *,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelLike | None = None,
    null_size: int | None = None,
) -> ScreenProfiles:
    """Profiles of every label column of the pass but ``batch``, and confound flags with
    ``batch`` (see :func:`default_batch_column`). ``progress(done, total)`` counts columns;
    ``cancel`` stops between them with :class:`Cancelled`."""
    columns = [c for c in activation_pass.label_columns if c != batch]
    total = len(columns) + 1
    profiles: dict[str, PerturbationProfiles] = {}
    problems: dict[str, str] = {}
    options = {} if null_size is None else {"null_size": null_size}
    for done, column in enumerate(columns):
        if cancel_requested(cancel):
            raise Cancelled("profiling was cancelled")
        try:
            with warnings.catch_warnings():  # plates without controls: said in ``problems``
                warnings.simplefilter("ignore", UserWarning)
                profiles[column] = perturbation_profiles(activation_pass, column, **options)
        except ValueError as err:
            problems[column] = str(err)
        if progress is not None:
            progress(done + 1, total)
    confounds = confound_scores(activation_pass, columns, batch) if activation_pass.n_features else None
    if progress is not None:
        progress(total, total)
    return ScreenProfiles(profiles, problems, confounds, batch)


def describe_profiles(profiles: ScreenProfiles, n_plates: int) -> str:
    """The Perturbations panel's status: what was profiled and flagged, and why a label column
    has no profiles (one reason, with the columns it holds for: often the same for all)."""
    if not profiles.profiles and not profiles.problems:
        text = ("No perturbation profiles: the store has no label column (plate map columns such as "
                "perturbation or compound; embed the plates with a plate map, --platemap)")
    elif profiles.profiles:
        text = f"Profiles of {len(profiles.profiles)} label column(s) against the controls of {n_plates} plate(s)"
    else:
        text = "No perturbation profiles"
    if profiles.confounds is not None:
        text += f"; {len(profiles.confounds.flags)} feature(s) flagged as confounds"
        text += f" (batch column {profiles.batch})" if profiles.batch else ""
    reasons: dict[str, list[str]] = {}
    for column, problem in profiles.problems.items():
        reasons.setdefault(problem, []).append(column)
    for problem, columns in reasons.items():
        text += f". {', '.join(columns)}: {problem}"
    return text + "."


def describe_value(result: PerturbationProfiles, value: Any) -> str:
    """``"drug: 4 wells on 2 plates, 512 crops; mAP 0.88 (p 0.01); most selective: feature 7
    (max selectivity 0.512), first by z"``."""
    profile = result.values[value]
    plates = f" on {profile.n_plates} plates" if profile.n_plates > 1 else ""
    text = f"{value}: {profile.n_wells} well{'s' if profile.n_wells != 1 else ''}{plates}, {profile.n_tokens:,} crops"
    if math.isfinite(profile.map):
        text += f"; mAP {profile.map:.2f} (p {profile.map_p_value:.2g})"
    else:
        text += "; no mAP (one replicate well)"
    return f"{text}; {most_selective_text(profile)}"


class ScreenCrops:
    """Top crops of features over the whole store as RGB thumbnails, each read from its own
    plate (opened from the store's recorded sources once, then kept; the explorer's plate is
    used as it is). Thread-safe enough for one worker at a time."""

    def __init__(self, explorer: Any) -> None:
        self.explorer = explorer
        self._plates: dict[str, Any] = {}  # name -> (Plate, limits, colours), or None: not found

    def _plate(self, name: str) -> Any:
        if name not in self._plates:
            from plate_concepts.embeddings.source_plates import open_plate_named
            from plate_concepts.plates.display import channel_colors, contrast_limits

            plate = self.explorer.plate if name == self.explorer.plate_name else None
            try:
                plate = plate or open_plate_named(self.explorer.store, name)
                self._plates[name] = None if plate is None else (
                    plate, contrast_limits(plate), channel_colors(plate.channels)
                )
            except (OSError, ValueError, KeyError):
                self._plates[name] = None
        return self._plates[name]

    def thumbnails(self, feature: int, n: int, size: int) -> tuple[list[tuple[Any, str, np.ndarray]], int]:
        """(crop, plate name, (s, s, 3) uint8 RGB) of the ``n`` crops where ``feature`` is most
        active over the store, and how many of them had no images."""
        from plate_concepts.analysis.explorer import TopCrop
        from plate_concepts.plates.display import composite_rgb, read_crop

        top = self.explorer.activation_pass.top_tokens(feature, n)
        if not top:
            return [], 0
        rows = np.asarray([row for row, _ in top])
        obs = self.explorer.store.read_obs(rows, ["plate", "well", "field", "crop_y", "crop_x", "crop_size"])
        out, missing = [], 0
        for (row, value), record in zip(top, obs.itertuples(index=False), strict=True):
            opened = self._plate(str(record.plate))
            if opened is None:
                missing += 1
                continue
            plate, limits, colors = opened
            crop = TopCrop(int(row), str(record.well), int(record.field), int(record.crop_y),
                           int(record.crop_x), int(record.crop_size), float(value))
            pixels = read_crop(plate, crop.well, crop.field, crop.crop_y, crop.crop_x, crop.crop_size, size)
            out.append((crop, str(record.plate), composite_rgb(pixels, limits, colors)))
        return out, missing
