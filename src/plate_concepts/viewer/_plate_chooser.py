"""The Features panel's plate chooser: the store's plates with their tokens, wells and control
tokens (a combo box whose list is a sortable table), and whether selecting a feature goes to
the plate where it is most active."""

from __future__ import annotations

from typing import Any

import pandas as pd
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QStandardItem, QStandardItemModel
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QTableView,
    QWidget,
)

COLUMNS = ("plate", "tokens", "wells", "controls")
#: The popup's height in rows, at most.
VISIBLE_ROWS = 20


class PlateChooser(QWidget):
    """Choose one of the store's plates; ``plate_chosen`` carries its name (also when the
    program chooses it: :meth:`show_plate` does not emit)."""

    plate_chosen = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox()
        self.combo.setToolTip(
            "The plate whose wells, fields and crops are shown (tokens, wells and control "
            "tokens per plate in the list)"
        )
        self.model = QStandardItemModel(0, len(COLUMNS), self)
        self.model.setHorizontalHeaderLabels(list(COLUMNS))
        view = QTableView()
        view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        view.verticalHeader().setVisible(False)
        view.verticalHeader().setDefaultSectionSize(20)
        view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        view.setShowGrid(False)
        view.setMinimumWidth(360)
        self.combo.setModel(self.model)
        self.combo.setView(view)
        self.combo.setMaxVisibleItems(VISIBLE_ROWS)
        self.combo.activated.connect(self._on_activated)
        self.follow = QCheckBox("go to top plate")
        self.follow.setToolTip(
            "When a feature is selected, show the plate where it is active on the largest "
            "fraction of crops (its 'top plate' in the table)"
        )
        layout.addWidget(self.combo, stretch=1)
        layout.addWidget(self.follow)

    def set_plates(self, table: pd.DataFrame | None, current: str | None) -> None:
        """List the plates of ``table`` (``FeatureExplorer.plate_table()``), ``current`` chosen."""
        self.model.removeRows(0, self.model.rowCount())
        if table is not None:
            for record in table.itertuples(index=False):
                controls = "—" if pd.isna(record.n_controls) else f"{int(record.n_controls):,}"  # no control column
                cells = [str(record.plate), f"{record.n_tokens:,}", f"{record.n_wells:,}", controls]
                items = [QStandardItem(text) for text in cells]
                for item in items[1:]:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.model.appendRow(items)
        self.show_plate(current)

    def plates(self) -> list[str]:
        return [self.model.item(row, 0).text() for row in range(self.model.rowCount())]

    @property
    def current(self) -> str | None:
        return self.combo.currentText() or None

    def show_plate(self, name: str | None) -> None:
        """Show ``name`` as the chosen plate (no ``plate_chosen``)."""
        self.combo.blockSignals(True)
        self.combo.setCurrentIndex(self.plates().index(name) if name in self.plates() else -1)
        self.combo.blockSignals(False)

    def choose(self, name: str) -> None:
        """Choose plate ``name`` as a user would (emits ``plate_chosen``)."""
        if name not in self.plates():
            raise ValueError(f"no plate {name!r} in the list (plates: {self.plates()[:10]})")
        self.combo.setCurrentIndex(self.plates().index(name))
        self._on_activated(self.combo.currentIndex())

    def _on_activated(self, _index: Any) -> None:
        if self.current:
            self.plate_chosen.emit(self.current)
