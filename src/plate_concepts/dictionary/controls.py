"""Which tokens are controls, which batch each token is in, and fitting the whitening on them.

Controls and batches are given per token (arrays) or, for an embedding store, by name: a spec
looked up in a per-token table (the store's obs by default; the Dictionary panel passes obs
joined with the plate map). Batch labels stay raw here: the whitening normalises them
(:func:`~plate_concepts.dictionary.whitening.batch_label_texts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from plate_concepts._progress import Cancelled, cancel_requested
from plate_concepts.dictionary.data import is_store, n_tokens_of, take_rows
from plate_concepts.dictionary.whitening import ControlWhitening

if TYPE_CHECKING:
    from plate_concepts.plates.platemap import ControlSpec

#: Rows per read when collecting control tokens from a store to fit the whitening.
CONTROL_READ_ROWS = 65536
#: The default control spec: the boolean ``is_control`` column a store records.
DEFAULT_CONTROL = "is_control"

Controls = Any  # None, a bool (or 0/1) per token, or a spec: str | ControlSpec


def is_control_spec(is_control: Controls) -> bool:
    """True for a control spec given by name (text or ControlSpec), False for a per-token mask."""
    from plate_concepts.plates.platemap import ControlSpec

    return isinstance(is_control, (str, ControlSpec))


def control_mask(data: Any, is_control: Controls = None, labels: pd.DataFrame | None = None) -> np.ndarray:
    """Bool mask of the control tokens of ``data`` (an array or a store).

    ``is_control``: a bool (or 0/1) per token; or a spec — ``"all"`` (every token), a column of
    booleans (``"is_control"``, the default for a store), ``"column=value[,value]"`` or a
    :class:`~plate_concepts.plates.platemap.ControlSpec` (values compared as text, so 1, 1.0
    and "1" match) — looked up in ``labels`` (one row per token; default: the store's obs).
    """
    n = n_tokens_of(data)
    if is_control is None:
        if labels is None and not is_store(data):
            raise ValueError(
                "is_control is required: one bool per token marking the unperturbed controls the "
                "whitening is fitted on (pass numpy.ones(n, bool) to use every token)"
            )
        is_control = DEFAULT_CONTROL
    if is_control_spec(is_control):
        mask = _mask_from_spec(data, is_control, labels)
    else:
        if isinstance(is_control, torch.Tensor):
            is_control = is_control.detach().cpu().numpy()
        mask = np.asarray(is_control)
        if mask.shape != (n,):
            raise ValueError(f"is_control must have one flag per token, shape ({n},), got {mask.shape}")
        if not _are_flags(mask):
            raise ValueError(f"is_control must be boolean (or 0/1), got dtype {mask.dtype}")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError(
            f"no control tokens: is_control selects 0 of {n} tokens; the whitening is fitted on controls"
        )
    return mask


def _mask_from_spec(data: Any, spec: str | ControlSpec, labels: pd.DataFrame | None) -> np.ndarray:
    from plate_concepts.plates.platemap import ControlSpec
    from plate_concepts.plates.platemap import control_mask as spec_mask

    if isinstance(spec, str) and spec == "all":
        return np.ones(n_tokens_of(data), dtype=bool)
    if isinstance(spec, ControlSpec) or "=" in spec:
        parsed = spec if isinstance(spec, ControlSpec) else ControlSpec.parse(spec)
        table, where = _label_column(data, labels, parsed.column, "control column")
        try:
            return spec_mask(table, parsed)
        except ValueError as err:
            raise ValueError(f"control spec {str(parsed)!r} on {where}: {err}") from err
    try:
        table, where = _label_column(data, labels, spec, "control column")
    except ValueError as err:
        hint = "; it was embedded without a control spec" if spec == DEFAULT_CONTROL else ""
        raise ValueError(
            f"{err}{hint}; give the controls as 'column=value' (e.g. --control treatment=DMSO), a "
            "column of booleans or 'all'"
        ) from None
    column = table.iloc[:, 0]
    if not _are_flags(column.to_numpy()):
        values = [str(v) for v in pd.unique(column.dropna())]
        shown = ", ".join(values[:6]) + (", ..." if len(values) > 6 else "")
        raise ValueError(
            f"control column {column.name!r} of {where} is not a column of booleans (its values: "
            f"{shown}); give the controls as 'column=value', e.g. --control "
            f"{column.name}={values[0] if values else 'VALUE'}"
        )
    return control_mask(data, column.to_numpy())


def _are_flags(values: np.ndarray) -> bool:
    """Booleans, or numbers that are all 0 or 1."""
    return values.dtype == bool or (values.dtype.kind in "iuf" and np.isin(values, (0, 1)).all())


def batch_values(data: Any, batches: Any, labels: pd.DataFrame | None = None) -> np.ndarray | None:
    """The raw batch label of every token: ``batches`` itself (one per token) or, given a
    column name (as the user may spell it), that column of ``labels`` (default: the store's
    obs); None stays None."""
    if batches is None:
        return None
    if isinstance(batches, str):
        return _label_column(data, labels, batches, "batch column")[0].iloc[:, 0].to_numpy()
    values = batches.detach().cpu().numpy() if isinstance(batches, torch.Tensor) else np.asarray(batches)
    n = n_tokens_of(data)
    if values.shape != (n,):
        raise ValueError(f"batch labels must be one per token, shape ({n},), got {values.shape}")
    return values


def _label_column(data: Any, labels: pd.DataFrame | None, name: str, what: str) -> tuple[pd.DataFrame, str]:
    """The one-column table of the per-token column ``name`` means (``Metadata_X`` finds ``X``:
    :func:`~plate_concepts.plates.platemap.resolve_column`), read alone from a store (its other
    columns stay on disk), and how to name where it was looked up in messages."""
    from plate_concepts.plates.platemap import resolve_column

    if labels is not None:
        if len(labels) != n_tokens_of(data):
            raise ValueError(f"the label table has {len(labels)} rows for {n_tokens_of(data)} tokens")
        return labels[[resolve_column(name, labels.columns, what)]], "the token labels"
    if not is_store(data):
        raise ValueError("controls or batches given by column name need an embedding store (or labels=)")
    column = data.resolve_column(name, what)
    return data.read_obs(columns=[column]), f"embedding store {data.path}"


def fit_whitening(
    whitening: ControlWhitening,
    data: Any,
    is_control: Controls = None,
    batches: Any = None,
    *,
    max_tokens: int = 50_000,
    seed: int = 0,
    labels: pd.DataFrame | None = None,
    cancel: Any = None,
    warn: bool = True,
) -> ControlWhitening:
    """Fit ``whitening`` on the control tokens of ``data`` (array or store).

    At most ``max_tokens`` controls are used (a seeded random subset); from a store they are
    read chunk by chunk, so memory stays bounded by ``max_tokens`` x dim. ``cancel`` (an Event
    or a callable) is polled between chunks: a cancelled fit raises :class:`InterruptedError`.
    ``warn``: issue a rank-deficient covariance as a warning (else only ``rank_note_``).
    """
    mask = control_mask(data, is_control, labels)
    raw_batches = batch_values(data, batches, labels)
    rows = np.flatnonzero(mask)
    if len(rows) > max_tokens:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_tokens, replace=False))
    if is_store(data):
        controls = np.empty((len(rows), data.dim), dtype=np.float32)
        filled = 0
        order = np.empty(len(rows), dtype=np.int64)
        chunks = data.iter_batches(CONTROL_READ_ROWS, shuffle=False, rows=rows, epochs=1, return_index=True)
        for x, index in chunks:
            if cancel_requested(cancel):
                raise Cancelled("cancelled while reading the control tokens; nothing was trained")
            controls[filled : filled + len(x)] = x
            order[filled : filled + len(x)] = index
            filled += len(x)
        rows = order[:filled]
        controls = controls[:filled]
    else:
        controls = take_rows(data if isinstance(data, torch.Tensor) else np.asarray(data), rows)
    control_batches = None if raw_batches is None else raw_batches[rows]
    whitening.fit(controls, np.ones(len(rows), dtype=bool), control_batches, warn=warn)
    return whitening


def is_fitted(whitening: ControlWhitening) -> bool:
    return hasattr(whitening, "whitening_")


