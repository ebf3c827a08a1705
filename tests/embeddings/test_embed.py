from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REAL_DATA as REAL

from plate_concepts.embeddings.embed import embed_plate, embed_plates, staging_path
from plate_concepts.embeddings.store import EmbeddingStore, StoreIncompleteError
from plate_concepts.embeddings.tiling import IntensityNormalizer
from plate_concepts.plates.model import Plate
from plate_concepts.plates.platemap import ControlSpec, attach_platemap

NF1 = REAL / "nf1_plate2"
KEY = ["plate", "well", "field", "crop_y", "crop_x"]


class MeanPool:
    """A transparent embedder: 16-px patch tokens = per-channel patch means (d = C).

    So a crop's token is exactly its per-channel mean intensity: a known answer for every row.
    """

    name = "mean-pool-16"
    dim = None

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.calls = 0

    def patch_grid(self, crop_size: int) -> tuple[int, int]:
        return crop_size // 16, crop_size // 16

    def to(self, device):
        return self

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.avg_pool2d(crops.double(), 16).float().permute(0, 2, 3, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic_plate(planted_nuclei: bool = False) -> Plate:
    """3 wells x 2 fields of 3 x 64 x 96 uint16 (channels DNA, ER, Mito), seeded noise; with
    ``planted_nuclei`` the DNA channel is dark but for one bright 32-px square per field."""
    rng = np.random.default_rng(7)
    images = {}
    for n, well in enumerate(["B02", "B03", "C02"]):
        for field in (0, 1):
            image = rng.integers(0, 4000, size=(3, 64, 96)).astype(np.uint16)
            if planted_nuclei:
                image[0] = rng.integers(0, 50, size=(64, 96))
                y, x = [(0, 0), (32, 64), (0, 32)][n] if field == 0 else (32, 32)
                image[0, y : y + 32, x : x + 32] = 3000
            images[(well, field)] = [da.from_array(image, chunks=(3, 32, 96))]
    plate = Plate(
        name="synth", channels=["DNA", "ER", "Mito"], images=images, reader="test", source="memory"
    )
    platemap = pd.DataFrame(
        {
            "well": ["B2", "B3", "C2"],
            "treatment": ["DMSO", "drugA", "DMSO"],
            "dose_uM": [0.0, 1.5, 0.0],
            "field": ["x", "y", "z"],  # clashes with an index column -> platemap_field
        }
    )
    return attach_platemap(plate, platemap)


def _by_key(store: EmbeddingStore) -> tuple[pd.DataFrame, np.ndarray]:
    obs = store.obs.reset_index(drop=True)
    order = obs.sort_values(KEY).index.to_numpy()
    return obs.loc[order].reset_index(drop=True), store.read(order)


def test_tokens_are_the_embedded_crops_with_their_plate_map_labels(tmp_path):
    plate = _synthetic_plate()
    store = embed_plate(
        plate,
        tmp_path / "store",
        MeanPool(),
        crop_size=32,
        batch_size=5,
        patch_tokens=True,
        control="treatment=DMSO",
        device="cpu",
    )
    assert len(store) == 6 * 6 and store.dim == 3 and store.patch_grid == (2, 2)
    obs = store.obs
    assert not obs.duplicated(KEY).any()
    assert set(obs.columns) >= {
        *KEY,
        "crop_size",
        "treatment",
        "dose_uM",
        "platemap_field",
        "is_control",
    }
    assert "well_position" not in obs.columns
    expected_treatment = {"B02": "DMSO", "B03": "drugA", "C02": "DMSO"}
    assert (obs["treatment"] == obs["well"].map(expected_treatment)).all()
    assert (obs["is_control"] == (obs["treatment"] == "DMSO")).all()
    assert (obs.loc[obs.well == "B03", "dose_uM"] == 1.5).all()

    # Known answer: each token = per-channel mean of its crop after plate-scope scaling.
    record = store.provenance["plates"]["synth"]
    normalizer = IntensityNormalizer.from_record(record["normalization"])
    assert normalizer.scope == "plate" and np.asarray(normalizer.levels).shape == (3, 2)
    tokens, patches = store.read(), store.read_patches()
    for i, row in obs.iterrows():
        field = normalizer(plate.image(row.well, row.field).compute())
        crop = field[:, row.crop_y : row.crop_y + 32, row.crop_x : row.crop_x + 32]
        np.testing.assert_allclose(tokens[i], crop.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        patch = crop[:, 16:, :16].mean(axis=(1, 2))  # patch (1, 0), stored as float16
        np.testing.assert_allclose(patches[i, 1, 0], patch, atol=2e-3)

    provenance = store.provenance
    assert provenance["model"] == "mean-pool-16" and provenance["channels"] == ["DNA", "ER", "Mito"]
    assert record["crop_size"] == 32 and record["source"] == "memory" and record["complete"] is True
    assert record["control"] == "treatment=DMSO"


def test_interrupted_embedding_resumes_without_duplicates(tmp_path):
    plate = _synthetic_plate()
    settings = {"crop_size": 32, "batch_size": 3, "group_size": 4, "device": "cpu"}
    full = embed_plate(plate, tmp_path / "full", MeanPool(), **settings)

    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done > 0:
            stop.set()  # cancel once the first group is stored

    partial = embed_plate(
        plate, tmp_path / "resumed", MeanPool(), progress=progress, cancel=stop, **settings
    )
    assert 0 < len(partial) < len(full)
    assert seen[0] == (0, 36) and all(total == 36 for _, total in seen)
    assert partial.provenance["plates"]["synth"]["complete"] is False
    interrupted_keys = set(EmbeddingStore.open(tmp_path / "resumed").completed_keys())

    resumed_ticks = []
    resumed = embed_plate(
        plate,
        tmp_path / "resumed",
        MeanPool(),
        progress=lambda *tick: resumed_ticks.append(tick),
        **settings,
    )
    assert resumed_ticks[0] == (len(interrupted_keys), 36) and resumed_ticks[-1] == (36, 36)
    assert len(resumed) == len(full) == 36
    assert not resumed.obs.duplicated(KEY).any()
    assert interrupted_keys < resumed.completed_keys() == full.completed_keys()
    full_obs, full_tokens = _by_key(full)
    resumed_obs, resumed_tokens = _by_key(EmbeddingStore.open(tmp_path / "resumed"))
    pd.testing.assert_frame_equal(full_obs[KEY], resumed_obs[KEY])
    np.testing.assert_allclose(resumed_tokens, full_tokens, rtol=1e-6)
    assert resumed.provenance["plates"]["synth"]["complete"] is True

    # A finished store is left alone: no crop is embedded again.
    again = MeanPool()
    embed_plate(plate, tmp_path / "resumed", again, **settings)
    assert (
        len(EmbeddingStore.open(tmp_path / "resumed")) == 36 and again.calls == 1
    )  # the shape probe


def test_resume_refuses_other_settings(tmp_path):
    plate = _synthetic_plate()
    embed_plate(plate, tmp_path / "s", MeanPool(), crop_size=32, device="cpu")
    with pytest.raises(ValueError, match="crop_size: store 32, now 48"):
        embed_plate(plate, tmp_path / "s", MeanPool(), crop_size=48, device="cpu")
    with pytest.raises(ValueError, match="patch tokens"):
        embed_plate(
            plate, tmp_path / "s", MeanPool(), crop_size=32, patch_tokens=True, device="cpu"
        )
    with pytest.raises(ValueError, match="normalization"):
        embed_plate(
            plate,
            tmp_path / "s",
            MeanPool(),
            crop_size=32,
            device="cpu",
            normalizer=IntensityNormalizer(scope="field"),
        )
    rebuilt = embed_plate(
        plate, tmp_path / "s", MeanPool(), crop_size=48, device="cpu", overwrite=True
    )
    assert set(rebuilt.obs["crop_size"]) == {48}


def test_min_foreground_keeps_the_crops_with_nuclei(tmp_path):
    plate = _synthetic_plate(planted_nuclei=True)
    store = embed_plate(
        plate,
        tmp_path / "fg",
        MeanPool(),
        crop_size=32,
        min_foreground=0.5,
        device="cpu",
        normalizer=IntensityNormalizer(scope="field"),
    )
    obs = store.obs
    kept = {(r.well, r.field): (r.crop_y, r.crop_x) for r in obs.itertuples()}
    assert len(obs) == 6  # one planted square per field
    assert kept == {
        ("B02", 0): (0, 0),
        ("B03", 0): (32, 64),
        ("C02", 0): (0, 32),
        ("B02", 1): (32, 32),
        ("B03", 1): (32, 32),
        ("C02", 1): (32, 32),
    }
    assert (obs["foreground_fraction"] == 1.0).all()
    assert store.provenance["plates"]["synth"]["nuclear_channel"] == "DNA"


def test_real_nf1_plate_labels_and_controls(tmp_path):
    from plate_concepts.plates import open_plate

    plate = open_plate(NF1 / "images", platemap=NF1 / "platemap_NF1_plate2.csv")
    ticks = _Counter()
    store = embed_plate(
        plate,
        tmp_path / "nf1",
        MeanPool(),
        crop_size=256,
        drop_edge=True,
        control=ControlSpec("genotype", ["WT"]),
        device="cpu",
        progress=ticks,
    )
    obs = store.obs
    assert len(obs) == 5 * 6 and ticks.n == ticks.total == 30
    genotype = {"B07": "Null", "D06": "WT", "D07": "Null", "F07": "Null", "H12": "Null"}
    assert (obs["genotype"] == obs["well"].map(genotype)).all()
    assert obs.loc[obs.is_control, "well"].unique().tolist() == ["D06"]
    assert (obs["gene_name"] == "NF1").all()
    assert not {"WellRow", "WellCol", "well_position"} & set(obs.columns)
    assert set(zip(obs.crop_y, obs.crop_x)) == {(y, x) for y in (256, 512) for x in (256, 512, 768)}
    tokens = store.read()
    assert np.isfinite(tokens).all() and (tokens >= 0).all() and (tokens <= 1).all()
    assert store.provenance["plates"]["nf1_plate2"]["source"].endswith("images")
    assert store.provenance["plates"]["nf1_plate2"]["format"] == [8, 12]  # wells up to H12


def test_efficientnet_by_spec(tmp_path):
    plate = _synthetic_plate()
    store = embed_plate(
        plate,
        tmp_path / "eff",
        "efficientnet-lite0:mean",
        crop_size=32,
        batch_size=16,
        channels=["Mito", "DNA"],
        device="cpu",
    )
    assert len(store) == 36 and store.dim == 1280
    assert store.provenance["channels"] == ["Mito", "DNA"]
    assert store.provenance["embedder"]["weights_sha256"]
    assert np.isfinite(store.read()).all()


def test_embed_errors(tmp_path):
    plate = _synthetic_plate()
    with pytest.raises(ValueError, match=r"crop size 128 is larger than the field \(64 x 96 px\)"):
        embed_plate(plate, tmp_path / "a", MeanPool(), crop_size=128, device="cpu")
    with pytest.raises(ValueError, match="unknown embedder spec"):
        embed_plate(plate, tmp_path / "a", "vgg16", crop_size=32, device="cpu")
    with pytest.raises(ValueError, match=r"channels \['GFP'\] are not among"):
        embed_plate(
            plate, tmp_path / "a", MeanPool(), crop_size=32, channels=["DNA", "GFP"], device="cpu"
        )
    bare = Plate(name="bare", channels=plate.channels, images=plate.images, reader="test")
    with pytest.raises(ValueError, match="needs a plate map"):
        embed_plate(
            bare, tmp_path / "a", MeanPool(), crop_size=32, control="treatment=DMSO", device="cpu"
        )
    with pytest.raises(ValueError, match="no row has treatment in"):
        embed_plate(
            plate, tmp_path / "a", MeanPool(), crop_size=32, control="treatment=PBS", device="cpu"
        )
    (tmp_path / "not_a_store").mkdir()
    (tmp_path / "not_a_store" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        embed_plate(plate, tmp_path / "not_a_store", MeanPool(), crop_size=32, device="cpu")
    assert not (tmp_path / "a").exists()  # nothing was written by the failed calls


class _Counter:
    """A tqdm-like progress object."""

    def __init__(self) -> None:
        self.n, self.total = 0, None

    def update(self, k: int) -> None:
        self.n += k


# ---------------------------------------------------------------------- several plates
def _renamed(plate: Plate, name: str, seed: int, channel_order=(0, 1, 2)) -> Plate:
    """Another plate like ``plate`` (same wells and plate map), other pixels, its channels
    possibly in another order."""
    rng = np.random.default_rng(seed)
    images = {
        key: [
            da.from_array(
                rng.integers(0, 4000, size=(3, 64, 96)).astype(np.uint16)[list(channel_order)]
            )
        ]
        for key in plate.images
    }
    other = Plate(name=name, channels=[plate.channels[i] for i in channel_order], images=images,
                  reader="test", source=f"memory:{name}")  # fmt: skip
    return attach_platemap(other, plate.platemap.reset_index(drop=True))


SETTINGS = {"crop_size": 32, "batch_size": 5, "group_size": 8, "device": "cpu"}


def test_several_plates_go_into_one_store_each_readable_on_its_own(tmp_path):
    first = _renamed(_synthetic_plate(), "P1", seed=1)
    second = _renamed(_synthetic_plate(), "P2", seed=2, channel_order=(2, 0, 1))  # Mito, DNA, ER
    store = embed_plates(
        [first, second], tmp_path / "screen", MeanPool(), control="treatment=DMSO", **SETTINGS
    )
    assert store.plates == ["P1", "P2"] and store.is_complete and len(store) == 72
    assert store.provenance["channels"] == ["DNA", "ER", "Mito"]
    assert [part["plates"] for part in store._meta["parts"]] == [
        ["P1"],
        ["P2"],
    ]  # compacted per plate
    info = store.describe()
    assert info["controls_per_plate"] == {"P1": 24, "P2": 24} and info["wells_per_plate"] == {
        "P1": 3,
        "P2": 3,
    }

    # Known answer: each plate's tokens are those of embedding it alone, channels in store order.
    alone = embed_plate(second, tmp_path / "alone", MeanPool(), channels=["DNA", "ER", "Mito"],
                        control="treatment=DMSO", **SETTINGS)  # fmt: skip
    rows = store.plate_rows("P2")
    shared = store.read_obs(plate="P2").reset_index(drop=True)
    order = shared.sort_values(KEY).index.to_numpy()
    alone_obs, alone_tokens = _by_key(alone)
    np.testing.assert_allclose(store.read(rows)[order], alone_tokens, rtol=1e-6)
    pd.testing.assert_frame_equal(shared.loc[order, KEY].reset_index(drop=True), alone_obs[KEY])


def test_append_adds_plates_and_refuses_repeats_other_settings_and_strangers(tmp_path):
    first, second = (
        _renamed(_synthetic_plate(), name, seed) for name, seed in (("P1", 1), ("P2", 2))
    )
    path = tmp_path / "s"
    embed_plates([first], path, MeanPool(), **SETTINGS)
    p1_tokens = EmbeddingStore.open(path).read_plate("P1")
    with pytest.raises(ValueError, match=r"holds plate\(s\) \['P1'\], not \['P2'\]; pass --append"):
        embed_plates([second], path, MeanPool(), **SETTINGS)
    with pytest.raises(ValueError, match="crop_size: store 32, now 48"):
        embed_plates([second], path, MeanPool(), append=True, **{**SETTINGS, "crop_size": 48})
    bare = Plate(
        name="P3",
        channels=["DNA", "ER"],
        images={k: [v[0][:2]] for k, v in second.images.items()},
        reader="test",
    )
    with pytest.raises(
        ValueError, match=r"channels \['Mito'\] are not among the channels of plate 'P3'"
    ):
        embed_plates([bare], path, MeanPool(), append=True, **SETTINGS)
    with pytest.raises(ValueError, match=r"channels \['DNA', 'dna'\] are given more than once"):
        embed_plates([second], tmp_path / "t", MeanPool(), **{**SETTINGS, "channels": ["DNA", "ER", "dna"]})
    assert not (tmp_path / "t").exists()

    store = embed_plates([second], path, MeanPool(), append=True, **SETTINGS)
    assert store.plates == ["P1", "P2"] and len(store) == 72
    with pytest.raises(
        ValueError, match=r"already holds plate\(s\) P2 \(36 tokens\); pass --replace-plate"
    ):
        embed_plates([second], path, MeanPool(), append=True, **SETTINGS)
    redone = embed_plates([second], path, MeanPool(), append=True, replace_plate=True, **SETTINGS)
    assert redone.tokens_per_plate() == {"P1": 36, "P2": 36} and redone.is_complete
    np.testing.assert_array_equal(redone.read_plate("P1"), p1_tokens)  # untouched


def test_resume_refuses_a_changed_plate_map_or_control_spec(tmp_path):
    plate = _synthetic_plate()
    stop = threading.Event()
    partial = embed_plates([plate], tmp_path / "s", MeanPool(), control="treatment=DMSO", cancel=stop,
                           progress=lambda done, total: done and stop.set(), **SETTINGS)  # fmt: skip
    assert 0 < len(partial) < 36 and partial.incomplete_plates() == ["synth"]
    with pytest.raises(StoreIncompleteError, match=r"synth \(\d+ tokens so far\)"):
        EmbeddingStore.open(tmp_path / "s").check_complete()
    with pytest.raises(
        ValueError, match=r"control spec: store 'treatment=DMSO', now 'treatment=drugA'"
    ):
        embed_plates([plate], tmp_path / "s", MeanPool(), control="treatment=drugA", **SETTINGS)

    stored_wells = set(partial.obs["well"])
    changed = plate.platemap.reset_index(drop=True).assign(treatment=["PBS", "PBS", "PBS"])
    relabelled = attach_platemap(_synthetic_plate(), changed)
    well = min(stored_wells)
    with pytest.raises(ValueError, match=rf"well {well} treatment: '\w+' in the store, 'PBS' now"):
        embed_plates([relabelled], tmp_path / "s", MeanPool(), control="treatment=PBS", **SETTINGS)
    extra = attach_platemap(
        _synthetic_plate(), plate.platemap.reset_index(drop=True).assign(batch=["b1", "b2", "b1"])
    )
    with pytest.raises(ValueError, match=r"plate-map columns added \['batch'\]"):
        embed_plates([extra], tmp_path / "s", MeanPool(), control="treatment=DMSO", **SETTINGS)

    finished = embed_plates(
        [plate], tmp_path / "s", MeanPool(), control="treatment=DMSO", **SETTINGS
    )
    assert len(finished) == 36 and finished.is_complete
    finished.check_complete()


def test_overwrite_replaces_an_embedding_store_only_once_the_new_one_is_finished(tmp_path):
    plate = _synthetic_plate()
    path = tmp_path / "s"
    embed_plates([plate], path, MeanPool(), **SETTINGS)
    before = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}

    stop = threading.Event()
    cancelled = embed_plates([plate], path, MeanPool(), overwrite=True, cancel=stop,
                             progress=lambda done, total: done and stop.set(), **{**SETTINGS, "crop_size": 48})  # fmt: skip
    assert cancelled.path == staging_path(path) and not cancelled.is_complete
    assert {f: f.read_bytes() for f in path.rglob("*") if f.is_file()} == before  # untouched
    done = embed_plates([plate], path, MeanPool(), overwrite=True, **{**SETTINGS, "crop_size": 48})
    assert done.path == path and set(done.obs["crop_size"]) == {48} and done.is_complete
    assert not staging_path(path).exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not an embedding store"):
        embed_plates([plate], notes, MeanPool(), overwrite=True, **SETTINGS)
    assert (notes / "mine.txt").read_text() == "keep me"
