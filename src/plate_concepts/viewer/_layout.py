"""Layout shared by the docked panels."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget


class _VerticalScroll(QScrollArea):
    """Scrolls up and down only: as wide as its contents need, as short as the window wants."""

    def minimumSizeHint(self) -> QSize:
        contents = self.widget().minimumSizeHint().width() if self.widget() is not None else 0
        width = contents + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(width, super().minimumSizeHint().height())

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        # The contents' layout changed (rows added or shown): the dock asks our width again.
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(watched, event)


def scrolled_body(panel: QWidget) -> QVBoxLayout:
    """The layout of ``panel``'s contents, inside a vertical scroll area: a panel taller than
    the screen scrolls instead of making napari's window taller than the screen (docked panels
    share one column, whose height is the tallest panel's minimum)."""
    outer = QVBoxLayout(panel)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = _VerticalScroll(panel)
    scroll.setWidgetResizable(True)  # the contents fill the panel when there is room
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    body = QWidget(scroll)
    scroll.setWidget(body)
    outer.addWidget(scroll)
    return QVBoxLayout(body)
