"""Small plots drawn with QPainter (no plotting library needed): a training curve, a
horizontal bar chart and colour scales; and RGB thumbnails as pixmaps. They follow the palette of the widget they sit in
(napari's theme)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from qtpy.QtCore import QEvent, QPointF, QRectF, Qt
from qtpy.QtGui import (
    QColor,
    QFontMetrics,
    QImage,
    QLinearGradient,
    QPainter,
    QPainterPath,
    QPen,
    QPixmap,
)
from qtpy.QtWidgets import QSizePolicy, QToolTip, QWidget

ACCENT = QColor(255, 140, 40)  # inferno's orange: the feature's colour across the panels
CONTROL = QColor(150, 150, 150)


def rgb_pixmap(rgb: np.ndarray, size: int) -> QPixmap:
    """A (y, x, 3) uint8 image as a pixmap of at most ``size`` pixels on a side."""
    rgb = np.ascontiguousarray(rgb)
    height, width = rgb.shape[:2]
    image = QImage(rgb.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(image).scaled(
        size, size, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
    )


def _format(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "–"


class LossCurve(QWidget):
    """A line plot of training loss against step, redrawn as points arrive."""

    def __init__(self, parent: QWidget | None = None, title: str = "training loss") -> None:
        super().__init__(parent)
        self.title = title
        self.steps: list[float] = []
        self.values: list[float] = []
        self.total_steps = 0
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self, total_steps: int = 0) -> None:
        self.steps, self.values, self.total_steps = [], [], total_steps
        self.update()

    def add_point(self, step: float, value: float) -> None:
        if math.isfinite(value):
            self.steps.append(float(step))
            self.values.append(float(value))
            self.update()

    def paintEvent(self, event: object) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().text().color()
        metrics = QFontMetrics(self.font())
        left, top = metrics.horizontalAdvance("0.000e-00") + 6, metrics.height() + 4
        plot = QRectF(
            left, top, self.width() - left - 8, self.height() - top - metrics.height() - 6
        )
        painter.setPen(text)
        painter.drawText(QPointF(left, metrics.ascent() + 1), self.title)
        dim = QColor(text)
        dim.setAlpha(90)
        painter.setPen(QPen(dim, 1))
        painter.drawRect(plot)
        if not self.values or plot.width() < 10 or plot.height() < 10:
            return
        high = max(self.values)
        low = min(0.0, min(self.values))
        span = (high - low) or 1.0
        x_max = max(self.total_steps, self.steps[-1], 1.0)

        def to_point(step: float, value: float) -> QPointF:
            return QPointF(
                plot.left() + plot.width() * step / x_max,
                plot.bottom() - plot.height() * (value - low) / span,
            )

        path = QPainterPath(to_point(self.steps[0], self.values[0]))
        for step, value in zip(self.steps[1:], self.values[1:]):
            path.lineTo(to_point(step, value))
        painter.setPen(QPen(ACCENT, 2))
        painter.drawPath(path)
        painter.setPen(text)
        painter.drawText(
            QRectF(0, plot.top() - metrics.height() / 2, left - 4, metrics.height()),
            Qt.AlignmentFlag.AlignRight,
            _format(high),
        )
        painter.drawText(
            QRectF(0, plot.bottom() - metrics.height() / 2, left - 4, metrics.height()),
            Qt.AlignmentFlag.AlignRight,
            _format(low),
        )
        painter.drawText(
            QRectF(plot.left(), plot.bottom() + 2, plot.width(), metrics.height()),
            Qt.AlignmentFlag.AlignRight,
            f"step {int(x_max)}",
        )
        painter.drawText(
            QRectF(plot.left(), plot.bottom() + 2, plot.width(), metrics.height()),
            Qt.AlignmentFlag.AlignLeft,
            f"last {_format(self.values[-1])}",
        )


class _RowTooltips(QWidget):
    """A plot of rows whose text may be cut short: the row under the mouse has its full text
    as a tooltip (``tooltip_at``)."""

    def tooltip_at(self, y: float) -> str | None:
        raise NotImplementedError

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            text = self.tooltip_at(event.pos().y())
            if text is None:
                QToolTip.hideText()
                event.ignore()
            else:
                QToolTip.showText(event.globalPos(), text, self)
            return True
        return super().event(event)


class BarChart(_RowTooltips):
    """Horizontal bars, one per label value; controls in grey, a dashed line at their mean."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = ""
        self.labels: list[str] = []
        self.values: list[float] = []
        self.is_control: list[bool] = []
        self.setMinimumHeight(80)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def set_data(
        self,
        title: str,
        labels: Sequence[str],
        values: Sequence[float],
        is_control: Sequence[bool] | None = None,
    ) -> None:
        self.title = title
        self.labels = [str(label) for label in labels]
        self.values = [float(v) for v in values]
        self.is_control = list(is_control) if is_control is not None else [False] * len(self.labels)
        metrics = QFontMetrics(self.font())
        self.setMinimumHeight(int((len(self.labels) + 2) * (metrics.height() + 3)) + 6)
        self.updateGeometry()
        self.update()

    def _row_height(self) -> int:
        return QFontMetrics(self.font()).height() + 3

    def row_at(self, y: float) -> int | None:
        """The bar drawn at height ``y`` (widget pixels), if any."""
        row = self._row_height()
        index = math.floor((y - row - 2) / row)
        return index if 0 <= index < len(self.labels) else None

    def tooltip_at(self, y: float) -> str | None:
        """The full label and value of the bar at height ``y`` (labels may be elided)."""
        index = self.row_at(y)
        if index is None:
            return None
        return f"{self.labels[index]}: {_format(self.values[index])}"

    def paintEvent(self, event: object) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().text().color()
        metrics = QFontMetrics(self.font())
        row = self._row_height()
        painter.setPen(text)
        painter.drawText(QPointF(2, metrics.ascent() + 1), self.title)
        finite = [v for v in self.values if math.isfinite(v)]
        if not finite:
            return
        label_width = min(
            max(metrics.horizontalAdvance(label) for label in self.labels) + 8, self.width() // 2
        )
        value_width = max(metrics.horizontalAdvance(_format(v)) for v in self.values) + 6
        left = label_width
        width = max(self.width() - left - value_width - 4, 10)
        low, high = min(0.0, *finite), max(0.0, *finite)
        span = (high - low) or 1.0

        def x_of(value: float) -> float:
            return left + width * (value - low) / span

        top = row + 2
        for index, (label, value, control) in enumerate(
            zip(self.labels, self.values, self.is_control)
        ):
            y = top + index * row
            painter.setPen(text)
            elided = metrics.elidedText(label, Qt.TextElideMode.ElideRight, label_width - 6)
            painter.drawText(
                QRectF(0, y, label_width - 6, row),
                Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                elided,
            )
            if math.isfinite(value):
                x0, x1 = sorted((x_of(0.0), x_of(value)))
                painter.fillRect(
                    QRectF(x0, y + 2, max(x1 - x0, 1.0), row - 4), CONTROL if control else ACCENT
                )
                painter.drawText(
                    QRectF(left + width + 4, y, value_width, row),
                    Qt.AlignmentFlag.AlignVCenter,
                    _format(value),
                )
        controls = [v for v, c in zip(self.values, self.is_control) if c and math.isfinite(v)]
        if controls:
            mean = sum(controls) / len(controls)
            pen = QPen(text, 1, Qt.PenStyle.DashLine)
            painter.setPen(pen)
            painter.drawLine(
                QPointF(x_of(mean), top - 2), QPointF(x_of(mean), top + len(self.labels) * row + 2)
            )


class ColorScales(_RowTooltips):
    """Colour scales of a few layers, one row each: the layer's name, then its low value, the
    colormap's gradient and its high value. napari's colour bars on the canvas carry no name;
    these tell which is which, and cover labels coloured by value, which have none."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.colors: list[QColor] = []
        self.rows: list[tuple[str, float, float]] = []
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(0)

    def _row_height(self) -> int:
        return QFontMetrics(self.font()).height() + 4

    def set_scales(
        self, colors: Sequence[Sequence[float]], rows: Sequence[tuple[str, float, float]]
    ) -> None:
        """``colors``: RGB(A) in 0..1, evenly spaced from low to high; ``rows``: (name, low,
        high) of each layer."""
        self.colors = [QColor.fromRgbF(*(float(c) for c in color[:3])) for color in colors]
        self.rows = [(str(name), float(low), float(high)) for name, low, high in rows]
        self.setFixedHeight(self._row_height() * len(self.rows))
        self.update()

    def tooltip_at(self, y: float) -> str | None:
        index = math.floor(y / self._row_height())
        if not 0 <= index < len(self.rows):
            return None
        name, low, high = self.rows[index]
        return f"{name}: {_format(low)} to {_format(high)}"

    def paintEvent(self, event: object) -> None:
        if not self.colors or not self.rows:
            return
        painter = QPainter(self)
        painter.setPen(self.palette().text().color())
        metrics = QFontMetrics(self.font())
        row = self._row_height()
        name_width = int(self.width() * 0.42)
        value_width = max(
            metrics.horizontalAdvance(_format(v)) for _, low, high in self.rows for v in (low, high)
        )
        bar_left = name_width + value_width + 8
        bar_width = max(self.width() - bar_left - value_width - 8, 10)
        for index, (name, low, high) in enumerate(self.rows):
            top = index * row
            painter.drawText(
                QRectF(0, top, name_width - 4, row),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                metrics.elidedText(name, Qt.TextElideMode.ElideRight, name_width - 4),
            )
            painter.drawText(
                QRectF(name_width, top, value_width + 4, row),
                Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                _format(low),
            )
            bar = QRectF(bar_left, top + 3, bar_width, row - 6)
            gradient = QLinearGradient(bar.topLeft(), bar.topRight())
            for step, color in enumerate(self.colors):
                gradient.setColorAt(step / max(len(self.colors) - 1, 1), color)
            painter.fillRect(bar, gradient)
            painter.drawText(
                QRectF(bar.right() + 4, top, value_width + 4, row),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                _format(high),
            )
