"""The Features panel's table of features: a pandas table for a QTableView that sorts by the
raw values, and the filter that searches feature numbers, names, tags, notes, label values and
plates, and hides dead features."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from qtpy.QtGui import QColor

if TYPE_CHECKING:
    from plate_concepts.analysis.feature_notes import FeatureNotes

#: Two-line headers keep the table narrow enough for a docked panel.
HEADERS = {
    "frequency": "freq.",
    "most selective for": "most\nselective for",
    "max selectivity": "max\nselect.",
    "avg selectivity": "avg\nselect.",
    "top values (z)": "top values\n(z vs controls)",
    "top plate": "top\nplate",
}
TOOLTIPS = {
    "feature": "Feature number (dictionary column)",
    "name": "The feature's name (kept beside the dictionary file; set it below the table)",
    "frequency": "Fraction of crops where the feature is active",
    "most selective for": "The label value the feature is most selective for",
    "max selectivity": "P(active | value) minus the largest P(active | other value)",
    "avg selectivity": "P(active | value) minus P(active | any other value)",
    "top values (z)": (
        "The label values whose wells raise the feature most: robust z-score of the well mean "
        "against the control wells of the same plate, averaged over replicate wells (above 2)"
    ),
    "plates": "Plates of the store where the feature is active",
    "top plate": "The plate where the feature is active on the largest fraction of crops",
    "z": (
        "Robust z-score of the feature's well mean against the control wells of the same "
        "plate (median, 1.4826 MAD), averaged over the value's replicate wells"
    ),
    "replicates z>2": "Fraction of the value's replicate wells whose own z-score exceeds 2",
    "mean": "Mean activation over the value's crops (inactive = 0)",
    "fraction active": "Fraction of the value's crops where the feature is active",
    "confound": (
        "The nuisance (plate, batch, edge wells, row/column gradient, field, foreground) that "
        "explains more of the feature's variance than any label, and that variance fraction"
    ),
}
#: Columns sorted by another (hidden) column's values.
SORT_BY = {"top values (z)": "_best z"}
#: Columns the search looks into.
SEARCHED = ("name", "most selective for", "top values (z)", "top plate")
TEXT_COLUMNS = ("name", "most selective for", "top values (z)", "top plate", "confound")


class FeatureTableModel(QAbstractTableModel):
    """A pandas table for a QTableView: text for display, raw values for sorting."""

    def __init__(
        self, table: pd.DataFrame | None = None, parent: Any = None, tips: dict[str, dict[int, str]] | None = None
    ) -> None:
        super().__init__(parent)
        self.table = pd.DataFrame() if table is None else table.reset_index(drop=True)
        #: column -> feature -> a cell's own tooltip (e.g. why a feature is flagged)
        self.tips = tips or {}
        self.shown = [c for c in self.table.columns if c != "dead" and not c.startswith("_")]

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
            if column in SORT_BY:
                value = self.table[SORT_BY[column]].iat[index.row()]
            return value.item() if isinstance(value, np.generic) else value
        if role == Qt.ItemDataRole.DisplayRole:
            if column == "feature":
                return str(int(value))
            if isinstance(value, (float, np.floating)):
                return "" if math.isnan(value) else f"{value:.3f}"
            return str(value)
        if role == Qt.ItemDataRole.ToolTipRole and column in self.tips:
            return self.tips[column].get(self.feature_at(index.row()))
        if role == Qt.ItemDataRole.TextAlignmentRole and column not in TEXT_COLUMNS:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and "dead" in self.table and bool(self.table["dead"].iat[index.row()]):
            return QColor(128, 128, 128)
        return None

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return HEADERS.get(self.shown[section], self.shown[section])
        if role == Qt.ItemDataRole.ToolTipRole and orientation == Qt.Orientation.Horizontal:
            return TOOLTIPS.get(self.shown[section])
        return None

    def feature_at(self, row: int) -> int:
        return int(self.table["feature"].iat[row])

    def row_of(self, feature: int) -> int | None:
        if "feature" not in self.table:
            return None
        rows = np.flatnonzero(self.table["feature"].to_numpy() == feature)
        return int(rows[0]) if len(rows) else None

    def set_name(self, feature: int, name: str) -> None:
        """Show a feature's new name in its row."""
        row = self.row_of(feature)
        if row is None or "name" not in self.table:
            return
        self.table.iloc[row, self.table.columns.get_loc("name")] = name
        index = self.index(row, self.shown.index("name"))
        self.dataChanged.emit(index, index)


class FeatureFilter(QSortFilterProxyModel):
    """Sorts by raw values; keeps the rows that match the search text (the feature's number,
    or text in its name, tags, note, label values or top plate), and hides dead features on
    request."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.search = ""
        self.hide_dead = True
        self.notes: FeatureNotes | None = None
        self.setSortRole(Qt.ItemDataRole.UserRole)

    def set_notes(self, notes: FeatureNotes | None) -> None:
        self.notes = notes
        self.invalidateFilter()

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
        if not self.search:
            return True
        feature = int(model.table["feature"].iat[row])
        if self.search == str(feature):
            return True
        if self.notes is not None and self.notes.get(feature).matches(self.search):
            return True
        # A number is a feature's, not a digit of some z-score (plate names are still searched).
        columns = ("top plate",) if self.search.isdigit() else SEARCHED
        return any(
            self.search in str(model.table[column].iat[row]).lower()
            for column in columns
            if column in model.table
        )
