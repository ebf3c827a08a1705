"""Two small plots drawn with QPainter (no plotting library needed): a training curve and a
horizontal bar chart. They follow the palette of the widget they sit in (napari's theme)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFontMetrics, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

ACCENT = QColor(255, 140, 40)  # inferno's orange: the feature's colour across the panels
CONTROL = QColor(150, 150, 150)


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


class BarChart(QWidget):
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

    def paintEvent(self, event: object) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().text().color()
        metrics = QFontMetrics(self.font())
        row = metrics.height() + 3
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
