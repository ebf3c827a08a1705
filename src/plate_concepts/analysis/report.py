"""The HTML report of a dictionary over a store: one self-contained file (figures embedded as
base64 PNG, styles inline, no script, nothing fetched) that any browser opens without a
server, to send to a colleague.

Sections: the dictionary (method, settings, FVU, L0, dead features, selectivity per label); per
label column the perturbation profiles (a values x features heatmap of z-scores, then for each
value its best features with their top crops and per-well maps); the confound flags with why;
the named features. ``plate-concepts report`` and the Features panel's "Export report" both
call :func:`write_report`.
"""

from __future__ import annotations

import base64
import html
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from plate_concepts._progress import Cancelled, CancelLike, cancel_requested
from plate_concepts.analysis import report_figures as figures
from plate_concepts.analysis.activation_pass import ActivationPass
from plate_concepts.analysis.confounds import ConfoundScores, confound_scores
from plate_concepts.analysis.feature_notes import FeatureNotes
from plate_concepts.analysis.perturbations import (
    PerturbationProfiles,
    most_selective_text,
    perturbation_profiles,
)

GENERATOR = "plate-concepts report"
_MARKER = f'<meta name="generator" content="{GENERATOR}">'
DEAD_THRESHOLD = 1e-5


@dataclass
class ReportSettings:
    """How much the report shows: values detailed per label (best mAP first), features per
    value, crops per feature, columns of the profile heatmap, crop thumbnail size (px)."""

    values_per_label: int = 24
    features_per_value: int = 3
    crops_per_feature: int = 8
    heatmap_features: int = 40
    heatmap_values: int = 60
    thumbnail: int = 72
    min_confound_score: float | None = None


@dataclass
class _Context:
    activation_pass: ActivationPass
    notes: FeatureNotes | None
    store: Any
    plate_path: str | None
    settings: ReportSettings
    plates: dict[str, Any] = field(default_factory=dict)  # name -> Plate, or None: not found
    limits: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # plate name -> why it did not open ("": not found)
    shown_crops: dict[int, str] = field(default_factory=dict)  # feature -> where its crops are (once)

    def feature(self, feature: int) -> str:
        name = self.notes.name(feature) if self.notes is not None else ""
        return f"{feature}: {name}" if name else str(feature)


def is_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a report this package wrote (its generator tag, near the top)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return _MARKER.encode() in head


def write_report(
    out: str | os.PathLike,
    activation_pass: ActivationPass,
    dictionary: str | os.PathLike,
    *,
    labels: Sequence[str] = (),
    batch: str | None = None,
    store: Any = None,
    plate: str | os.PathLike | None = None,
    settings: ReportSettings | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelLike | None = None,
) -> Path:
    """Write the report of ``activation_pass`` (of the dictionary file ``dictionary``) to
    ``out``. ``labels``: label columns to profile (default: the pass's, without ``batch``);
    ``batch``: the batch column for the confound flags; ``store``: the EmbeddingStore, for the
    top crops (whose images come from the plates its provenance records, or from ``plate``).
    An existing ``out`` is replaced only if it is a report and ``overwrite``. ``progress(done,
    total)`` counts sections; ``cancel`` stops between them (:class:`Cancelled`), and nothing
    is written then."""
    from plate_concepts._io import atomic_path, replaceable_output

    out = Path(out)
    replaceable_output(out, "report", overwrite=overwrite, sources=[dictionary])
    text = build_report(activation_pass, dictionary, labels=labels, batch=batch, store=store,
                        plate=plate, settings=settings, progress=progress, cancel=cancel)
    with atomic_path(out, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


def size_text(path: str | os.PathLike) -> str:
    """A written report's size for a message: ``3.1 MB``, or ``25 kB`` (not ``0.0 MB``)."""
    size = Path(path).stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{max(round(size / 1e3), 1)} kB"


def build_report(
    activation_pass: ActivationPass,
    dictionary: str | os.PathLike,
    *,
    labels: Sequence[str] = (),
    batch: str | None = None,
    store: Any = None,
    plate: str | os.PathLike | None = None,
    settings: ReportSettings | None = None,
    progress: Callable[[int, int], Any] | None = None,
    cancel: CancelLike | None = None,
) -> str:
    """The report's HTML text (see :func:`write_report`)."""
    from plate_concepts.dictionary.io import read_dictionary_metadata

    settings = settings or ReportSettings()
    labels = [c for c in (labels or activation_pass.label_columns) if c != batch]
    metadata = read_dictionary_metadata(dictionary)
    notes = FeatureNotes.load(dictionary, activation_pass.n_features)
    context = _Context(activation_pass, notes, store, None if plate is None else os.fspath(plate), settings)
    steps = 2 + len(labels)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps)
        if cancel_requested(cancel):
            raise Cancelled("the report was cancelled; nothing was written")

    kwargs = {} if settings.min_confound_score is None else {"min_score": settings.min_confound_score}
    confounds = confound_scores(activation_pass, labels, batch, **kwargs)
    step()
    body = [
        _header(activation_pass, dictionary, store),
        _dictionary_section(activation_pass, metadata, labels),
    ]
    for column in labels:
        body.append(_label_section(context, column, confounds))
        step()
    body.append(_confound_section(context, confounds))
    body.append(_names_section(context))
    step()
    return _page(f"plate-concepts report: {Path(dictionary).name}", "\n".join(body))


# ---------------------------------------------------------------------- sections
def _header(activation_pass: ActivationPass, dictionary: str | os.PathLike, store: Any) -> str:
    import plate_concepts

    where = store.path if store is not None else activation_pass.spec.store
    return (
        f"<h1>Features of {_e(Path(dictionary).name)}</h1>"
        f"<p class=meta>Store {_e(where)} · {activation_pass.n_tokens:,} tokens on "
        f"{len(activation_pass.plates)} plate(s) · written {_e(time.strftime('%Y-%m-%d %H:%M'))} by "
        f"plate-concepts {_e(plate_concepts.__version__)}</p>"
    )


def _dictionary_section(activation_pass: ActivationPass, metadata: dict[str, Any], labels: Sequence[str]) -> str:
    problems = {}  # a label with one value (e.g. only in control wells) has no selectivity
    for column in labels:
        try:
            activation_pass.selectivity(column)
        except ValueError as err:
            problems[column] = str(err)
    evaluation = activation_pass.evaluation([c for c in labels if c not in problems], DEAD_THRESHOLD)
    settings = metadata.get("hyperparameters") or {}
    whitening = metadata.get("whitening") or {}
    training = metadata.get("training") or {}
    rows = [
        ("method", metadata.get("method")),
        ("features", metadata.get("n_features")),
        ("settings", ", ".join(f"{k} = {v}" for k, v in settings.items())),
        ("pre-processing", whitening.get("method")),
        ("training", ", ".join(f"{k} = {training[k]}" for k in ("steps", "tokens_seen", "device") if k in training)),
        ("FVU", f"{evaluation['fvu']:.4f}"),
        ("mean cosine of reconstructions", f"{evaluation['cosine']:.4f}"),
        ("L0 (active features per token)", f"{evaluation['l0']:.2f}"),
        ("dead features", f"{evaluation['n_dead']} ({evaluation['dead_fraction']:.1%}; active on < {DEAD_THRESHOLD:g} of tokens)"),
    ]
    table = _table(["", ""], [[k, v] for k, v in rows if v not in (None, "")], header=False)
    selectivity = [
        [column, s["n_avg_above_0.5"], s["n_avg_above_0.2"], _first(
            [f"{v}: {m:.2f}" for v, m in s["best_max_selectivity"].items()], 12, "values")]
        for column, s in evaluation["selectivity"].items()
    ]
    selectivity += [[column, "—", "—", f"none: {problem}"] for column, problem in problems.items()]
    part = ""
    if selectivity:
        part = "<h3>Selectivity per label</h3>" + _table(
            ["label", "features with average selectivity > 0.5", "> 0.2", "best max selectivity per value"],
            selectivity,
        )
    histogram = _image(figures.frequency_histogram(activation_pass.frequency, DEAD_THRESHOLD), "feature frequencies")
    return f"<h2>The dictionary</h2>{table}{histogram}{part}"


def _label_section(context: _Context, column: str, confounds: ConfoundScores) -> str:
    try:
        profiles = perturbation_profiles(context.activation_pass, column)
    except ValueError as err:
        return f"<h2>{_e(column)}</h2><p class=note>No profiles: {_e(err)}</p>"
    if not profiles.values:
        return f"<h2>{_e(column)}</h2><p class=note>Every value of {_e(column)} is in control wells only: nothing to profile.</p>"
    settings = context.settings
    order = sorted(profiles.values, key=lambda v: (-_finite(profiles.values[v].map), str(v)))
    parts = [f"<h2>Perturbation profiles: {_e(column)}</h2>", (
        "<p class=note>z: each feature's mean activation in a replicate well against the control "
        "wells of its plate (median and MAD), averaged over the value's wells; replicates: the "
        "fraction of its wells with z &gt; 2; mAP: phenotypic activity, how well its replicate "
        "wells retrieve each other against the controls (copairs; p from permutations). "
        f"Controls: {_e(', '.join(map(str, profiles.control_values)) or 'control wells')}.</p>"
    )]
    shown_values = order[: settings.heatmap_values]
    features: list[int] = []
    for value in shown_values:
        for feature in profiles.values[value].top(settings.features_per_value)["feature"]:
            if int(feature) not in features and len(features) < settings.heatmap_features:
                features.append(int(feature))
    if features:
        z = profiles.z_table(features)
        z = z.iloc[z.index.get_indexer(shown_values)]  # by label: True/False values are no mask
        parts.append(_image(figures.profile_heatmap(z, [context.feature(f) for f in features], column),
                            f"profile heatmap of {column}"))
        if len(order) > len(shown_values):
            parts.append(f"<p class=caption>The heatmap shows the first {len(shown_values)} of {len(order)} "
                         "values (best mAP first); the table has them all.</p>")
    summary = [
        [_e(v), p.n_wells, p.n_plates, _num(p.map, 3), _num(p.map_p_value, 4),
         _e(", ".join(context.feature(int(f)) for f in p.top(settings.features_per_value)["feature"]))]
        for v, p in ((v, profiles.values[v]) for v in order)
    ]
    parts.append(_table(["value", "wells", "plates", "mAP", "p", "best features by z"], summary, escape=False))
    for value in order[: settings.values_per_label]:
        parts.append(_value_detail(context, profiles, value, confounds))
    if len(order) > settings.values_per_label:
        parts.append(f"<p class=note>{len(order) - settings.values_per_label} more values are in the table "
                     "above only (best mAP first).</p>")
    return "\n".join(parts)


def _value_detail(context: _Context, profiles: PerturbationProfiles, value: Any, confounds: ConfoundScores) -> str:
    profile = profiles.values[value]
    best = profile.top(context.settings.features_per_value)
    rows = []
    for row in best.itertuples():
        flag = confounds.flags.get(int(row.feature))
        rows.append([
            _e(context.feature(int(row.feature))), f"{row.z:.2f}", _num(row.max_selectivity, 3),
            f"{row.replicate_fraction:.2f}", f"{row.mean:.4g}", f"{row.fraction_active:.2f}",
            f"<span class=flag>{_e(flag.by)}</span>" if flag else "",
        ])
    parts = [
        f"<h3>{_e(profiles.column)} = {_e(value)}</h3>",
        (f"<p class=meta>{profile.n_wells} replicate well(s) on {profile.n_plates} plate(s), "
         f"{profile.n_tokens:,} tokens, mAP {_num(profile.map, 3)}; {_e(most_selective_text(profile))}</p>"),
        _table(["feature", "z", "max selectivity", "replicates z > 2", "mean activation", "fraction active", "confound"],
               rows, escape=False),
    ]
    wells = profiles.wells.meta
    mine = wells[(wells["value"] == value) & ~wells["is_control"]]
    plate = mine["plate"].value_counts().index[0]
    aggregates = context.activation_pass.well_aggregates(plate)
    features = [int(f) for f in best["feature"]]
    parts.append(_image(
        figures.well_heatmaps(
            aggregates.wells, aggregates.mean_activation[:, features],
            [f"feature {context.feature(f)}" for f in features],
            marked=list(mine.loc[mine["plate"] == plate, "well"]),
            colorbar_label="mean activation per well",
        ),
        f"per-well maps of plate {plate}",
    ))
    parts.append(f"<p class=caption>Plate {_e(plate)}: mean activation per well; ringed: the wells of "
                 f"{_e(value)}.</p>")
    for feature in features:
        parts.append(_crops(context, feature, profiles.column, f"{profiles.column} = {value}"))
    return "\n".join(parts)


def _crops(context: _Context, feature: int, column: str, where: str) -> str:
    """The feature's top crops (its most active tokens over the store), as thumbnails: drawn
    the first time (under ``where``), linked to after that (a report stays a few MB)."""
    anchor = f"crops-{feature}"
    if feature in context.shown_crops:
        return (f"<p class=caption>Top crops of feature {_e(context.feature(feature))}: shown "
                f'<a href="#{anchor}">above</a>, under {_e(context.shown_crops[feature])}.</p>')
    context.shown_crops[feature] = where
    title = f"<p class=caption id={anchor}>Top crops of feature {_e(context.feature(feature))}</p>"
    if context.store is None:
        return title + "<p class=note>No store given: no crops.</p>"
    top = context.activation_pass.top_tokens(feature, context.settings.crops_per_feature)
    if not top:
        return title + "<p class=note>This feature is never active.</p>"
    from plate_concepts.plates.display import channel_colors, composite_rgb, read_crop

    rows = [r for r, _ in top]
    columns = ["plate", "well", "field", "crop_y", "crop_x", "crop_size", column]
    obs = context.store.read_obs(np.asarray(rows), [c for c in columns if c in context.store.obs_columns])
    images, captions, missing = [], [], set()
    for (_, record), (_, value) in zip(obs.iterrows(), top, strict=True):
        plate = _plate(context, str(record["plate"]))
        if plate is None:
            missing.add(str(record["plate"]))
            continue
        raw = read_crop(plate, str(record["well"]), int(record["field"]), int(record["crop_y"]),
                        int(record["crop_x"]), int(record["crop_size"]), context.settings.thumbnail)
        limits = context.limits[str(record["plate"])]
        images.append(composite_rgb(raw, limits, channel_colors(plate.channels)))
        label = figures.shorten(str(record.get(column, "")), 16)
        plate_name = f"{figures.shorten(str(record['plate']), 22)}\n" if len(context.activation_pass.plates) > 1 else ""
        captions.append(f"{plate_name}{record['well']} f{int(record['field']) + 1}\n{label}\ncode {value:.3g}")
    if not images:
        return title + f"<p class=note>No crop images: {_e(_missing_text(context, missing))}</p>"
    strip = _image(figures.crop_strip(images, captions), f"top crops of feature {feature}")
    if missing:
        strip += (f"<p class=note>{len(top) - len(images)} of its {len(top)} top crops are not shown: "
                  f"{_e(_missing_text(context, missing))}</p>")
    return title + strip


def _missing_text(context: _Context, plates: set[str]) -> str:
    """Why the images of ``plates`` are not shown, and what to do."""
    not_found = [repr(name) for name in sorted(plates) if not context.missing[name]]
    reasons = [context.missing[name] for name in sorted(plates) if context.missing[name]]
    if not_found:
        reasons.insert(0, f"the images of plate{'s' if len(not_found) > 1 else ''} {', '.join(not_found)} were "
                          "not found (the store records no readable source for them)")
    one_plate = len(context.activation_pass.plates) == 1
    return "; ".join(reasons) + ("; give the plate with --plate" if one_plate else
                                 "; put them back where the store records them (or give one with --plate)")


def _plate(context: _Context, name: str) -> Any:
    """The plate ``name`` of the store, opened once (None when its images cannot be found)."""
    if name in context.plates:
        return context.plates[name]
    from plate_concepts.embeddings.source_plates import open_plate_named, open_source_plate
    from plate_concepts.plates.display import contrast_limits

    plate = None
    try:
        if context.plate_path is not None:
            plate = open_source_plate(context.plate_path)
            if plate.name != name and len(context.activation_pass.plates) > 1:
                plate = None
        if plate is None:
            plate = open_plate_named(context.store, name)
    except (OSError, ValueError, KeyError) as err:
        context.missing[name] = f"the plate {name!r} could not be opened ({err})"
        plate = None
    if plate is None and name not in context.missing:
        context.missing[name] = ""
    context.plates[name] = plate
    if plate is not None:
        context.limits[name] = contrast_limits(plate)
    return plate


def _confound_section(context: _Context, confounds: ConfoundScores) -> str:
    measured = ", ".join(confounds.nuisance.columns) or "none"
    head = (
        "<h2>Confounds</h2><p class=note>For every feature, the variance fraction (ε², adjusted "
        "for the number of groups) that each nuisance explains — per-well mean activation for "
        "plate, batch, edge wells and row/column gradients; each token's code for field and "
        "foreground — against the best label at the same level. A feature is flagged when a "
        f"nuisance explains at least {confounds.min_score:.0%} of its variance and more than "
        f"any label. Nuisances measured here: {_e(measured)}.</p>"
    )
    if not confounds.flags:
        return head + "<p>No feature is flagged.</p>"
    rows = [
        [_e(context.feature(f)), f"<span class=flag>{_e(flag.by)}</span>", f"{flag.score:.2f}",
         _e(flag.label or "—"), _num(max(flag.label_score, 0.0), 2), _e(flag.why())]
        for f, flag in confounds.flags.items()
    ]
    table = _table(["feature", "by", "ε²", "best label", "its ε²", "why"], rows, escape=False)
    flagged = list(confounds.flags)[:60]
    scores = pd.concat([confounds.nuisance.loc[flagged], confounds.labels.loc[flagged]], axis=1)
    figure = _image(figures.factor_heatmap(scores, [context.feature(f) for f in flagged]), "confound scores")
    return head + table + figure


def _names_section(context: _Context) -> str:
    named = context.notes.named if context.notes is not None else {}
    path = context.notes.path.name if context.notes is not None else ""
    if not named:
        return f"<h2>Named features</h2><p class=note>No feature is named yet ({_e(path)}).</p>"
    rows = [[f, note.name, ", ".join(note.tags), note.note] for f, note in named.items()]
    return f"<h2>Named features</h2><p class=meta>From {_e(path)}</p>" + _table(["feature", "name", "tags", "note"], rows)


# ---------------------------------------------------------------------- HTML
_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1250px; padding: 0 1.5em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f6; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.meta { color: #555; } .note { color: #555; font-size: 13px; }
.caption { font-size: 12px; color: #444; margin: 0.2em 0; }
.flag { background: #ffe1cc; color: #8a3b00; padding: 0 4px; border-radius: 3px; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        f"{_MARKER}\n<meta name=viewport content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, header: bool = True, escape: bool = True) -> str:
    cell = (lambda v: _e(v)) if escape else (lambda v: str(v))
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _first(items: Sequence[str], n: int, what: str) -> str:
    """The first ``n`` of ``items``, comma-separated, saying how many there are when cut."""
    return ", ".join(items[:n]) + (f", … ({len(items)} {what})" if len(items) > n else "")


def _num(value: float, digits: int) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _finite(value: float) -> float:
    return value if np.isfinite(value) else -np.inf
