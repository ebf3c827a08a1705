"""Name, tags and note of the selected feature, edited in the Features panel and kept in the
small JSON file beside the dictionary (:class:`~plate_concepts.analysis.feature_notes.
FeatureNotes`). Enter in the name or tags, Save, or selecting another feature writes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari.utils.notifications import show_error
from qtpy.QtWidgets import QGridLayout, QLabel, QLineEdit, QPushButton, QWidget

if TYPE_CHECKING:
    from plate_concepts.viewer.state import PlateConceptsState

class NotesEditor(QWidget):
    """Edits the notes of one feature (:meth:`set_feature`) through the viewer's state."""

    def __init__(self, state: PlateConceptsState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.feature: int | None = None
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        self.where = QLabel()  # whose notes, and where they are kept
        self.where.setWordWrap(True)
        self.name = QLineEdit()
        self.name.setPlaceholderText("name, e.g. enlarged nuclei")
        self.tags = QLineEdit()
        self.tags.setPlaceholderText("tags, comma separated")
        self.note = QLineEdit()
        self.note.setPlaceholderText("a note")
        self.save_button = QPushButton("Save")
        grid.addWidget(self.where, 0, 0, 1, 3)
        grid.addWidget(self.name, 1, 0)
        grid.addWidget(self.tags, 1, 1, 1, 2)
        grid.addWidget(self.note, 2, 0, 1, 2)
        grid.addWidget(self.save_button, 2, 2)
        for edit in (self.name, self.tags, self.note):
            edit.returnPressed.connect(self.commit)
        self.save_button.clicked.connect(self.commit)
        self.set_feature(None)

    def set_feature(self, feature: int | None) -> None:
        """Show the notes of ``feature`` (what was typed for the previous one is saved first)."""
        if feature != self.feature:
            self.commit()
        self.feature = feature
        notes = self.state.notes
        enabled = notes is not None and feature is not None
        for widget in (self.name, self.tags, self.note, self.save_button):
            widget.setEnabled(enabled)
        if notes is None:
            self.where.setText(
                f"Names cannot be kept: {self.state.notes_problem}" if self.state.notes_problem
                else "Save the dictionary (Dictionary panel) to name its features: names are kept "
                "beside its file."
            )
        else:
            self.where.setText(f"Feature {feature}: name, tags and note" if feature is not None else "Name a feature: select it first")
            self.save_button.setToolTip(f"Write them to {notes.path} (Enter in a field does too)")
        note = notes.get(feature) if enabled else None
        self.name.setText(note.name if note else "")
        self.tags.setText(", ".join(note.tags) if note else "")
        self.note.setText(note.note if note else "")

    def _typed(self) -> tuple[str, list[str], str]:
        tags = [tag.strip() for tag in self.tags.text().split(",") if tag.strip()]
        return self.name.text().strip(), tags, self.note.text()

    def commit(self) -> bool:
        """Write what is typed for the current feature when it changed; whether it was written."""
        notes, feature = self.state.notes, self.feature
        if notes is None or feature is None:
            return False
        name, tags, text = self._typed()
        current = notes.get(feature)
        if (name, tags, text) == (current.name, current.tags, current.note):
            return False
        try:
            notes.set(feature, name=name, tags=tags, note=text)
            notes.save()
        except (OSError, ValueError, TypeError) as err:
            show_error(f"Could not save the name of feature {feature}: {err}")
            return False
        self.state.notes_changed.emit(feature)
        return True
