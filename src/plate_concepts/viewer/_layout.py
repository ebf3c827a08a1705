"""Layout shared by the docked panels."""

from __future__ import annotations

from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget


def scrolled_body(panel: QWidget) -> QVBoxLayout:
    """The layout of ``panel``'s contents, inside a vertical scroll area: a panel taller than
    the screen scrolls instead of making napari's window taller than the screen (docked panels
    share one column, whose height is the tallest panel's minimum)."""
    outer = QVBoxLayout(panel)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea(panel)
    scroll.setWidgetResizable(True)  # the contents fill the panel when there is room
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    body = QWidget(scroll)
    scroll.setWidget(body)
    outer.addWidget(scroll)
    return QVBoxLayout(body)
