"""The Embeddings panel: embed the open plate into a store (in the background, cancellable and
resumable), or open an existing store; then see how many tokens each well and label has."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
    Table,
)
from qtpy.QtWidgets import QSizePolicy

from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.plates.model import Plate
from plate_concepts.plates.platemap import ControlSpec
from plate_concepts.viewer._embedding_views import (
    EMBEDDER_CHOICES,
    available_devices,
    embedder_spec,
    obs_label_columns,
    store_summary,
    tokens_per_label,
    tokens_per_well,
)
from plate_concepts.viewer._jobs import Job, Progress, start_job
from plate_concepts.viewer._plate_views import label_values, plate_label_columns
from plate_concepts.viewer._table_tooltips import show_full_text_tooltips
from plate_concepts.viewer.state import get_state

if TYPE_CHECKING:
    import napari

NO_CONTROLS = "(no controls)"
GROUP_BATCHES = 4
"""Batches per store commit: progress is reported, and a crash loses at most, this many."""


class EmbeddingsPanel(Container):
    """Compute the open plate's embeddings with a built-in or user model, or open a store; show
    its tokens per well and per label. The store becomes the viewer's store (other panels fit
    dictionaries on it)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        choices = list(EMBEDDER_CHOICES)
        self.plate_label = Label(label="Plate", value="no plate open: open one in the Plate panel")
        self.embedder = ComboBox(label="Embedder", choices=choices, value=choices[0])
        self.model_file = FileEdit(
            label="Model file", mode="r", filter="TorchScript (*.pt *.pth *.ts)"
        )
        self.module = LineEdit(label="Module")
        self.crop_size = SpinBox(label="Crop size (px)", value=256, min=16, max=4096, step=16)
        self.batch_size = SpinBox(label="Batch size", value=32, min=1, max=4096)
        self.patch_tokens = CheckBox(text="Keep patch tokens (for activation maps)", value=False)
        # Choices are callables: napari resets docked widgets' choices whenever layers change.
        self.control_column = ComboBox(label="Controls", choices=self._control_columns)
        self.control_values = Select(
            label="Control values", choices=self._control_value_choices, allow_multiple=True
        )
        devices = available_devices()
        self.device = ComboBox(label="Device", choices=devices, value=devices[-1])
        self.store_path = FileEdit(
            label="Output store", mode="w", filter="Embedding store folder (*)"
        )
        self.overwrite = CheckBox(
            text="Replace the store if it exists (else resume it)", value=False
        )
        self.compute_button = PushButton(text="Compute embeddings")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Crops", min=0, max=1, value=0)
        self.message = Label(label="", value="")
        self.open_path = FileEdit(label="Existing store", mode="d")
        self.open_button = PushButton(text="Open store")
        self.store_info = Label(label="Store", value="no store open")
        self.count_by = ComboBox(label="Count by", choices=self._count_columns)
        self.per_label = Table(label="Tokens per label")
        self.per_well = Table(label="Tokens per well")
        super().__init__(
            widgets=[
                self.plate_label, self.embedder, self.model_file, self.module, self.crop_size,
                self.batch_size, self.patch_tokens, self.control_column, self.control_values,
                self.device, self.store_path, self.overwrite, self.compute_button,
                self.cancel_button, self.progress, self.message, self.open_path,
                self.open_button, self.store_info, self.count_by, self.per_label, self.per_well,
            ],
            scrollable=True,
        )  # fmt: skip
        # A long store name is cut at the panel's edge (whole in the tooltip) rather than
        # widening every panel docked beside this one.
        self.store_info.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.module.native.setPlaceholderText("package.module:callable returning a torch.nn.Module")
        self.control_values.tooltip = (
            "Wells whose control column has one of these values are controls"
        )
        for table in (self.per_label, self.per_well):
            table.read_only = True
            table.native.verticalHeader().setVisible(False)  # row numbers mean nothing here
            show_full_text_tooltips(table.native)  # long label values are cut short
        self.job: Job | None = None

        self.embedder.changed.connect(self._on_embedder_choice)
        self.control_column.changed.connect(self._on_control_column)
        self.compute_button.changed.connect(lambda: self.compute())
        self.cancel_button.changed.connect(self.cancel)
        self.open_button.changed.connect(lambda: self.open_store())
        self.count_by.changed.connect(self._update_label_counts)
        self._on_embedder_choice(self.embedder.value)

        state = get_state(viewer)
        state.plate_changed.connect(self._on_plate_changed)
        state.store_changed.connect(self._show_store)
        if state.plate is not None:
            self._on_plate_changed(state.plate)
        if state.store is not None:
            self._show_store(state.store)

    @property
    def native(self) -> Any:
        """The scroll area around the panel: napari docks a widget's ``native``, and docking
        the contents alone would make the panel as tall as all its rows (and napari's window
        taller than a laptop's screen)."""
        return self.root_native_widget

    # ------------------------------------------------------------------ computing
    def compute(self) -> Any:
        """Start embedding the viewer's plate into the output store in a background job;
        returns the job (None when the settings are incomplete; the message says what is
        missing)."""
        plate = get_state(self.viewer).plate
        try:
            if plate is None:
                raise ValueError("no plate is open: open one in the Plate panel first")
            spec = embedder_spec(
                self.embedder.value, self.model_file.line_edit.value, self.module.value
            )
            store_path = self._output_path()
            control = self._control_spec()
        except ValueError as err:
            self._show_error(str(err))
            return None
        settings = {
            "crop_size": int(self.crop_size.value),
            "batch_size": int(self.batch_size.value),
            "group_size": GROUP_BATCHES * int(self.batch_size.value),
            "patch_tokens": bool(self.patch_tokens.value),
            "control": control,
            "device": self.device.value,
            "overwrite": bool(self.overwrite.value),
        }

        def embed(job: Job) -> EmbeddingStore:
            from plate_concepts.embeddings.embed import embed_plate
            from plate_concepts.embeddings.embedders import load_embedder

            embedder = load_embedder(spec)  # in the job: loading weights takes a while
            return embed_plate(
                plate, store_path, embedder, **settings, progress=job.progress("crops"), cancel=job
            )

        self.progress.value = 0
        self.message.value = f"embedding {plate.name} with {spec} into {store_path.name}..."
        self._set_running(True)
        self.job = start_job(
            embed,
            progress=self._on_progress,
            returned=lambda store: self._on_embedded(store, store_path),
            errored=self._on_embed_error,
            finished=lambda: self._set_running(False),
        )
        return self.job

    def cancel(self) -> None:
        """Stop after the current batch; the crops embedded so far stay in the store."""
        if self.job is not None:
            self.job.cancel()
        self.message.value = "cancelling after the current batch..."

    def _on_progress(self, update: Progress) -> None:
        self.progress.max = max(update.total, 1)
        self.progress.value = min(update.done, update.total)
        self.progress.label = f"{update.done} / {update.total} {update.what}"

    def _on_embedded(self, store: EmbeddingStore, store_path: Path | None = None) -> None:
        store = EmbeddingStore.open(store.path)  # a fresh handle: all committed rows
        requested = Path(store_path) if store_path is not None else store.path
        if self.job is not None and self.job.cancelled:
            if store.path.resolve() != requested.resolve():
                # An overwrite builds its store beside the one it replaces (staging_path): the
                # old store is still the one at the path the user gave, untouched.
                self.message.value = (
                    f"cancelled with {len(store)} crops in the new store, which replaces "
                    f"{requested.name} once complete; {requested.name} is unchanged: Compute again "
                    "with overwrite on to continue"
                )
                if not EmbeddingStore.is_store(requested):
                    return
                store = EmbeddingStore.open(requested)
            else:
                self.message.value = (
                    f"cancelled with {len(store)} crops stored; the store is complete up to there: "
                    "Compute again with the same settings to resume"
                )
        else:
            self.message.value = f"done: {len(store)} crops in {store.path.name}"
        get_state(self.viewer).set_store(store)

    def _on_embed_error(self, err: Exception) -> None:
        self._show_error(f"embedding failed: {err}")

    def _set_running(self, running: bool) -> None:
        self.compute_button.enabled = not running
        self.open_button.enabled = not running
        self.cancel_button.enabled = running

    def _output_path(self) -> Path:
        text = self.store_path.line_edit.value.strip()
        if not text or text == ".":
            raise ValueError(
                "choose the output store: a new folder (or an existing store to resume)"
            )
        path = Path(text).expanduser()
        if path.exists() and not EmbeddingStore.is_store(path) and any(path.iterdir()):
            raise ValueError(
                f"{path} is a folder that is not an embedding store; choose a new folder name"
            )
        return path

    def _control_spec(self) -> ControlSpec | None:
        column = self.control_column.value
        if column in (None, NO_CONTROLS):
            return None
        values = list(self.control_values.value)
        if not values:
            raise ValueError(f"choose the control value(s) of {column!r}, or '{NO_CONTROLS}'")
        return ControlSpec(column, values)

    # ------------------------------------------------------------------ opening a store
    def open_store(self, path: str | Path | None = None) -> EmbeddingStore | None:
        """Open an existing store and make it the viewer's store."""
        if path is not None:
            self.open_path.value = Path(path)
        try:
            store = EmbeddingStore.open(Path(self.open_path.line_edit.value.strip()).expanduser())
        except (OSError, ValueError) as err:
            self._show_error(f"could not open the store: {err}")
            return None
        self.message.value = f"opened {store.path.name}"
        get_state(self.viewer).set_store(store)
        return store

    # ------------------------------------------------------------------ showing
    def _show_store(self, store: EmbeddingStore) -> None:
        obs = store.obs
        self.store_info.value = self.store_info.tooltip = store_summary(store)
        labels = obs_label_columns(obs)
        self.per_well.value = tokens_per_well(obs, [c for c in labels if c != "well"])
        preferred = self._control_spec_column(store)
        self.count_by.reset_choices()
        if labels:
            self.count_by.value = preferred if preferred in labels else labels[0]
        self._update_label_counts()

    def _update_label_counts(self, value: Any = None) -> None:
        store = get_state(self.viewer).store
        column = self.count_by.value
        if store is None or column is None:
            self.per_label.value = {"data": [], "columns": []}
            return
        self.per_label.value = tokens_per_label(store.obs, column)

    @staticmethod
    def _control_spec_column(store: EmbeddingStore) -> str | None:
        for record in store.provenance.get("plates", {}).values():
            if isinstance(record, dict) and record.get("control"):
                try:
                    return ControlSpec.parse(record["control"]).column
                except ValueError:
                    return None
        return None

    def _on_plate_changed(self, plate: Plate) -> None:
        self.plate_label.value = (
            f"{plate.name}: {len(plate.wells)} wells, {len(plate.images)} fields"
        )
        self.control_column.reset_choices()
        self.control_column.value = NO_CONTROLS
        self.control_values.reset_choices()
        if (
            not self.store_path.line_edit.value.strip()
            or self.store_path.line_edit.value.strip() == "."
        ):
            self.store_path.value = _default_store_path(plate)

    def _on_control_column(self, column: str) -> None:
        self.control_values.reset_choices()

    def _control_columns(self, widget: Any = None) -> list[str]:
        plate = get_state(self.viewer).plate
        return [NO_CONTROLS] if plate is None else [NO_CONTROLS, *plate_label_columns(plate)]

    def _control_value_choices(self, widget: Any = None) -> list[str]:
        plate = get_state(self.viewer).plate
        column = self.control_column.value if hasattr(self, "control_column") else NO_CONTROLS
        return [] if plate is None or column in (None, NO_CONTROLS) else label_values(plate, column)

    def _count_columns(self, widget: Any = None) -> list[str]:
        store = get_state(self.viewer).store
        return [] if store is None else obs_label_columns(store.obs)

    def _on_embedder_choice(self, choice: str) -> None:
        kind = EMBEDDER_CHOICES[choice]
        self.model_file.visible = kind == "torchscript"
        self.module.visible = kind == "module"

    def _show_error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.message.value = text
        show_error(text)


def _default_store_path(plate: Plate) -> Path:
    """``<plate name>.embeddings`` next to the plate's source (or in the working folder)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in plate.name)
    source = Path(plate.source) if plate.source else None
    folder = source.parent if source is not None and source.exists() else Path.cwd()
    return folder / f"{safe}.embeddings"
