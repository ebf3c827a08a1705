"""What several commands share: the napari hand-over of ``view`` and ``demo-run``."""

from __future__ import annotations

from pathlib import Path


def run_or_screenshot(viewer, screenshot: str | None) -> int:
    """Hand the viewer to the user, or (headless runs) save a screenshot of it and close it."""
    import napari

    if not screenshot:
        napari.run()
        return 0
    from qtpy.QtWidgets import QApplication

    for _ in range(20):  # let the canvas take its final size and workers draw their layers
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(screenshot, canvas_only=False, flash=False)
    print(f"saved a screenshot of the viewer to {screenshot}")
    viewer.close()
    return 0
