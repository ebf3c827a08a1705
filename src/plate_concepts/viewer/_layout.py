"""Layout shared by the docked panels."""

from __future__ import annotations

import html

from qtpy.QtCore import QEvent, QObject, QSize, Qt
from qtpy.QtWidgets import QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget


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


def plain_label(text: str = " ") -> QLabel:
    """A wrapping label that shows its text as it is: label values and feature names such as
    ``<b>`` or ``a & b`` are not read as HTML."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextFormat(Qt.TextFormat.PlainText)
    return label


def plain_tooltip(text: str) -> str:
    """A tooltip showing ``text`` as typed (Qt reads tooltips as rich text when they look like
    it), wrapped at the tooltip's width, line breaks kept."""
    return "<p>" + html.escape(text).replace("\n", "<br>") + "</p>"
