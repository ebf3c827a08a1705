"""The panels' read-only tables of selectable rows; a cell too narrow for its text shows the
full text as a tooltip."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QEvent, QModelIndex, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QStyle,
    QStyledItemDelegate,
    QTableView,
    QToolTip,
)

from plate_concepts.viewer._layout import plain_tooltip


def elided_text(view: QAbstractItemView, index: QModelIndex) -> str | None:
    """The full text of the cell at ``index`` when the view shows it cut short, else None."""
    text = index.data(Qt.ItemDataRole.DisplayRole)
    if text is None or str(text) == "":
        return None
    text = str(text)
    margin = view.style().pixelMetric(QStyle.PixelMetric.PM_FocusFrameHMargin, None, view) + 1
    available = view.visualRect(index).width() - 2 * margin
    metrics = view.fontMetrics()
    needed = max(metrics.horizontalAdvance(line) for line in text.splitlines() or [text])
    return text if needed > available else None


class FullTextTooltips(QStyledItemDelegate):
    """Item delegate: a cut-short cell's tooltip is its full text (cells with a tooltip of
    their own keep it)."""

    def helpEvent(self, event: QEvent, view: Any, option: Any, index: QModelIndex) -> bool:
        if (
            event.type() == QEvent.Type.ToolTip
            and index.isValid()
            and index.data(Qt.ItemDataRole.ToolTipRole) is None
        ):
            text = elided_text(view, index)
            if text is not None:
                QToolTip.showText(event.globalPos(), plain_tooltip(text), view)
            else:
                QToolTip.hideText()
            return True
        return super().helpEvent(event, view, option, index)


def show_full_text_tooltips(view: QAbstractItemView) -> None:
    """Give ``view`` (a QTableView, or a magicgui Table's ``native``) full-text tooltips."""
    view.setItemDelegate(FullTextTooltips(view))


def row_table(model: Any, min_height: int) -> QTableView:
    """A sortable, read-only table of ``model`` (a proxy model) where one row at a time is
    selected: compact rows, columns sized to their contents, full-text tooltips."""
    table = QTableView()
    table.setModel(model)
    table.setSortingEnabled(True)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(20)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    table.setWordWrap(False)
    table.setMinimumHeight(min_height)
    show_full_text_tooltips(table)  # long label values are cut short
    return table
