"""The Features panel's table of features: a pandas table for a QTableView that sorts by the
raw values, and the filter that searches label values and hides dead features."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from qtpy.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from qtpy.QtGui import QColor

#: Two-line headers keep the table narrow enough for a docked panel.
HEADERS = {
    "frequency": "freq.",
    "most selective for": "most\nselective for",
    "max selectivity": "max\nselect.",
    "avg selectivity": "avg\nselect.",
}


class FeatureTableModel(QAbstractTableModel):
    """A pandas table for a QTableView: text for display, raw values for sorting."""

    def __init__(self, table: pd.DataFrame | None = None, parent: Any = None) -> None:
        super().__init__(parent)
        self.table = pd.DataFrame() if table is None else table.reset_index(drop=True)
        self.shown = [c for c in self.table.columns if c != "dead"]

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008 - Qt's API
        return 0 if parent.isValid() else len(self.table)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.shown)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        column = self.shown[index.column()]
        value = self.table[column].iat[index.row()]
        if role == Qt.ItemDataRole.UserRole:
            return value.item() if isinstance(value, np.generic) else value
        if role == Qt.ItemDataRole.DisplayRole:
            if column == "feature":
                return str(int(value))
            if isinstance(value, (float, np.floating)):
                return "" if math.isnan(value) else f"{value:.3f}"
            return str(value)
        if role == Qt.ItemDataRole.TextAlignmentRole and column != "most selective for":
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and bool(self.table["dead"].iat[index.row()]):
            return QColor(128, 128, 128)
        return None

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return HEADERS.get(self.shown[section], self.shown[section])
        if role == Qt.ItemDataRole.ToolTipRole and orientation == Qt.Orientation.Horizontal:
            return {
                "feature": "Feature number (dictionary column)",
                "frequency": "Fraction of crops where the feature is active",
                "most selective for": "The label value the feature is most selective for",
                "max selectivity": "P(active | value) minus the largest P(active | other value)",
                "avg selectivity": "P(active | value) minus P(active | any other value)",
            }.get(self.shown[section])
        return None

    def feature_at(self, row: int) -> int:
        return int(self.table["feature"].iat[row])

    def row_of(self, feature: int) -> int | None:
        rows = np.flatnonzero(self.table["feature"].to_numpy() == feature)
        return int(rows[0]) if len(rows) else None


class FeatureFilter(QSortFilterProxyModel):
    """Sorts by raw values; keeps rows whose label value contains the search text, and hides
    dead features on request."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.search = ""
        self.hide_dead = True
        self.setSortRole(Qt.ItemDataRole.UserRole)

    def set_search(self, text: str) -> None:
        self.search = text.strip().lower()
        self.invalidateFilter()

    def set_hide_dead(self, hide: bool) -> None:
        self.hide_dead = bool(hide)
        self.invalidateFilter()

    def filterAcceptsRow(self, row: int, parent: QModelIndex) -> bool:
        model = self.sourceModel()
        if not isinstance(model, FeatureTableModel) or model.table.empty:
            return True
        if self.hide_dead and bool(model.table["dead"].iat[row]):
            return False
        if self.search:
            return self.search in str(model.table["most selective for"].iat[row]).lower()
        return True
