"""What an embedding store holds, from its metadata alone: the description ``info`` prints and
whether the embedding runs into it were finished."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from plate_concepts.embeddings import store_rewrite
from plate_concepts.embeddings.obs_index import label_overview
from plate_concepts.embeddings.store_files import StoreIncompleteError

if TYPE_CHECKING:
    from plate_concepts.embeddings.store import EmbeddingStore


def incomplete_plates(uns: dict[str, Any]) -> list[str]:
    """Plates of a store's provenance whose embedding was interrupted (recorded as not
    complete) or asked for and not started (``pending_plates``)."""
    records = uns.get("plates") if isinstance(uns.get("plates"), dict) else {}
    started = [
        name
        for name, rec in records.items()
        if isinstance(rec, dict) and rec.get("complete") is False
    ]
    pending = [name for name in uns.get("pending_plates") or [] if name not in started]
    return started + pending


def check_complete(store: EmbeddingStore, allow_incomplete: bool) -> None:
    """See :meth:`EmbeddingStore.check_complete`."""
    missing = store.incomplete_plates()
    if not missing:
        return
    tokens = store.tokens_per_plate()
    shown = ", ".join(
        f"{name} ({tokens[name]} tokens so far)" if name in tokens else f"{name} (not started)"
        for name in missing[:8]
    ) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    message = (
        f"embedding store {store.path} is incomplete: the embedding of plate(s) {shown} was "
        "interrupted. Run the same `plate-concepts embed` command again to finish it"
    )
    if not allow_incomplete:
        raise StoreIncompleteError(
            message
            + ", or pass --allow-incomplete (allow_incomplete=True) to use the tokens it has"
        )
    warnings.warn(message + "; using the tokens it has", UserWarning, stacklevel=3)


def describe(store: EmbeddingStore, max_values: int) -> dict[str, Any]:
    """See :meth:`EmbeddingStore.describe`."""
    entries = store._plate_entries()
    uns = store._meta["uns"]
    return {
        "path": str(store.path),
        "kind": "embedding-store",
        "format_version": store.format_version,
        "n_tokens": len(store),
        "dim": store.dim,
        "dtype": store.dtype.name,
        "patch_grid": None if store.patch_grid is None else list(store.patch_grid),
        "model": uns.get("model"),
        "crop_size": uns.get("crop_size"),
        "channels": uns.get("channels"),
        "plates": list(entries),
        "tokens_per_plate": {p: e["n_tokens"] for p, e in entries.items()},
        "wells_per_plate": {p: e["n_wells"] for p, e in entries.items()},
        "controls_per_plate": {p: e["n_controls"] for p, e in entries.items()},
        "control_wells_per_plate": {p: e["n_control_wells"] for p, e in entries.items()},
        "labels": label_overview(store_rewrite.store_labels(store, store._meta), max_values),
        "complete": store.is_complete,
        "incomplete_plates": store.incomplete_plates(),
    }
