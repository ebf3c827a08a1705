"""Showing a finished demo run in napari: the plate, its labels, and the Features panel on the
feature that best picks out one planted concept."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plate_concepts.viewer.app import show_results

if TYPE_CHECKING:
    import napari

    from plate_concepts.demo_pipeline import DemoRun


def show_demo_run(viewer: napari.Viewer, run: DemoRun, concept: str = "nuclear-enlargement") -> int:
    """Open the run's plate, store, dictionary and explorer in ``viewer`` with the plugin's
    panels (:func:`show_results`), and select the best feature for ``concept``. Returns that
    feature."""
    rows = run.report[run.report["concept"] == concept]
    if rows.empty:
        raise ValueError(f"no planted concept {concept!r}; the report has {list(run.report['concept'])}")
    feature = int(rows["feature"].iloc[0])
    return show_results(viewer, run.explorer.plate, explorer=run.explorer, feature=feature)
