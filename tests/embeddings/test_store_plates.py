"""A store spanning plates: per-plate parts and reads, summaries without scans, damage and
incompleteness detected, plates removed, and version-1 stores still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr.storage

from plate_concepts.embeddings import store_files
from plate_concepts.embeddings.store import (
    EmbeddingStore,
    StoreDamagedError,
    StoreIncompleteError,
)


def plate_obs(
    plate: str, n: int, wells=("B02", "B03", "C02"), control_well="B02", **labels
) -> pd.DataFrame:
    obs = pd.DataFrame(
        {
            "plate": plate,
            "well": [wells[i % len(wells)] for i in range(n)],
            "field": np.arange(n) // 6,
            "crop_y": (np.arange(n) % 6) * 32,
            "crop_x": 0,
            "crop_size": 32,
        }
    )
    obs["is_control"] = obs["well"] == control_well
    for name, mapping in labels.items():
        obs[name] = obs["well"].map(mapping)
    return obs


def three_plate_store(path, chunk_rows: int = 8, patch: bool = False):
    """Plates A (24 rows, two appends), B (16), C (8, its own 'dose' column), aligned to chunks
    of 8 rows so no chunk holds two plates."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((48, 4)).astype(np.float32)
    store = EmbeddingStore.create(
        path, dim=4, chunk_rows=chunk_rows, patch_grid=(1, 2) if patch else None,
        provenance={"model": "toy"},
    )  # fmt: skip
    treatment = {"B02": "DMSO", "B03": "drug", "C02": "drug"}
    obs = pd.concat(
        [
            plate_obs("A", 24, treatment=treatment),
            plate_obs("B", 16, treatment=treatment),
            plate_obs(
                "C", 8, wells=("D04", "D05"), control_well="D04", dose={"D04": 0.0, "D05": 1.5}
            ),
        ],
        ignore_index=True,
    )
    patches = np.repeat(tokens[:, None, None, :], 2, axis=2) if patch else None
    store.append(tokens[:16], obs.iloc[:16], None if patches is None else patches[:16])
    store.append(tokens[16:], obs.iloc[16:], None if patches is None else patches[16:])
    return store, tokens, obs


class FileRecorder:
    """Records the obs parts (parquet) and token chunks (zarr keys) a store opens."""

    def __init__(self, monkeypatch) -> None:
        self.parquet: list[str] = []
        self.chunks: list[str] = []
        real_parquet, real_get = pq.ParquetFile, zarr.storage.LocalStore.get

        def parquet_file(source, *args, **kwargs):
            self.parquet.append(str(source))
            return real_parquet(source, *args, **kwargs)

        async def get(store, key, *args, **kwargs):
            if key.startswith("c/"):  # a chunk, not metadata; named with its array's folder
                self.chunks.append(f"{Path(str(store.root)).name}/{key}")
            return await real_get(store, key, *args, **kwargs)

        monkeypatch.setattr(pq, "ParquetFile", parquet_file)
        monkeypatch.setattr(zarr.storage.LocalStore, "get", get)

    def clear(self) -> None:
        self.parquet.clear()
        self.chunks.clear()


# ---------------------------------------------------------------------- per-plate parts
def test_plates_get_their_own_parts_rows_and_reads(tmp_path):
    store, tokens, obs = three_plate_store(tmp_path / "s")
    store = EmbeddingStore.open(tmp_path / "s")
    assert store.plates == ["A", "B", "C"] and store.format_version == 2
    assert store.tokens_per_plate() == {"A": 24, "B": 16, "C": 8}
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    # The first append (16 rows of A) is one part; the second (8 A, 16 B, 8 C) is three.
    assert [p["plates"] for p in meta["parts"]] == [["A"], ["A"], ["B"], ["C"]]
    np.testing.assert_array_equal(store.plate_rows("B"), np.arange(24, 40))
    np.testing.assert_array_equal(store.read_plate("C"), tokens[40:])
    plate_b = store.read_obs(plate="B")
    assert list(plate_b.index) == list(range(24, 40))
    pd.testing.assert_frame_equal(
        plate_b.reset_index(drop=True), store.obs.iloc[24:40].reset_index(drop=True)
    )
    # Columns only some plates have read as missing for the others.
    assert store.obs_columns[-2:] == ["treatment", "dose"]
    both = store.read_obs([41, 3, 41], columns=["well", "dose", "treatment"])
    assert list(both.index) == [41, 3, 41]
    assert list(both["dose"].isna()) == [False, True, False] and both["dose"].iloc[0] == 1.5
    assert both["treatment"].iloc[1] == obs["treatment"].iloc[3]
    with pytest.raises(KeyError, match="no tokens"):
        store.read_obs(plate="Z")
    with pytest.raises(KeyError, match=r"\['nope'\] are not obs columns"):
        store.read_obs(slice(0, 3), columns=["nope"])


def test_a_per_plate_read_touches_only_that_plates_files(tmp_path, monkeypatch):
    three_plate_store(tmp_path / "s")
    recorder = FileRecorder(monkeypatch)
    store = EmbeddingStore.open(tmp_path / "s")
    store.describe()
    assert recorder.parquet == [] and recorder.chunks == []  # opening and describing scan nothing

    obs = store.read_obs(plate="B")
    tokens = store.read_plate("B")
    assert len(obs) == len(tokens) == 16
    assert recorder.parquet == [str(tmp_path / "s" / "obs" / "part-00002.parquet")]
    assert sorted(recorder.chunks) == ["tokens/c/3/0", "tokens/c/4/0"]  # rows 24..39

    recorder.clear()
    assert store.completed_keys("C") and recorder.parquet == [
        str(tmp_path / "s" / "obs" / "part-00003.parquet")
    ]


def test_interleaved_appends_are_split_by_plate_or_kept_as_one_mixed_part(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", dim=2, chunk_rows=4)
    runs = pd.concat([plate_obs("A", 3), plate_obs("B", 2), plate_obs("A", 2)], ignore_index=True)
    store.append(np.arange(14.0).reshape(7, 2), runs)
    assert [p["plates"] for p in store._meta["parts"]] == [["A"], ["B"], ["A"]]
    np.testing.assert_array_equal(store.plate_rows("A"), [0, 1, 2, 5, 6])

    # 200 alternating rows: more runs than parts are worth: one mixed part, still readable per plate.
    many = pd.concat([plate_obs(p, 1) for _ in range(100) for p in ("X", "Y")], ignore_index=True)
    store.append(np.zeros((200, 2)), many)
    assert store._meta["parts"][-1]["plates"] == ["X", "Y"]
    rows = store.plate_rows("Y")
    np.testing.assert_array_equal(rows, 7 + np.arange(1, 200, 2))
    assert (store.read_obs(plate="Y")["plate"] == "Y").all() and len(
        store.read_obs(plate="Y")
    ) == 100
    assert store.tokens_per_plate() == {"A": 5, "B": 2, "X": 100, "Y": 100}


# ---------------------------------------------------------------------- summaries
def test_summaries_match_the_rows_and_follow_appends(tmp_path):
    store, _, obs = three_plate_store(tmp_path / "s")
    info = EmbeddingStore.open(tmp_path / "s").describe(max_values=1)
    assert info["n_tokens"] == 48 and info["dim"] == 4 and info["plates"] == ["A", "B", "C"]
    assert info["wells_per_plate"] == {"A": 3, "B": 3, "C": 2}
    expected_controls = obs.groupby("plate")["is_control"].sum().to_dict()
    assert info["controls_per_plate"] == expected_controls == {"A": 8, "B": 6, "C": 4}
    assert info["control_wells_per_plate"] == {"A": 1, "B": 1, "C": 1}
    n_drug = int((obs["treatment"] == "drug").sum())
    assert info["labels"]["treatment"] == {"n_values": 2, "values": {"drug": n_drug}, "missing": 8}
    assert info["labels"]["dose"]["n_values"] == 2 and info["complete"] is True
    summary = store.plate_summary("A")
    assert summary["wells"] == obs[obs.plate == "A"]["well"].value_counts().to_dict()

    # A measurement (a distinct value per row) is not counted value by value.
    extra = plate_obs("A", 600, wells=("E05",)).assign(area=np.arange(600) * 1.25)
    store.append(np.ones((600, 4)), extra)
    reopened = EmbeddingStore.open(tmp_path / "s")
    assert reopened.describe()["labels"]["area"]["n_values"] is None
    assert reopened.plate_summary("A")["wells"]["E05"] == 600
    assert reopened.describe()["tokens_per_plate"]["A"] == 624


def test_compaction_merges_a_plates_parts_but_never_two_plates(tmp_path):
    store, _tokens, _obs = three_plate_store(tmp_path / "s")
    before = store.obs
    store.compact_obs()
    assert [p["plates"] for p in store._meta["parts"]] == [["A"], ["B"], ["C"]]
    reopened = EmbeddingStore.open(tmp_path / "s")
    pd.testing.assert_frame_equal(reopened.obs, before)
    assert len(list((tmp_path / "s" / "obs").iterdir())) == 3


# ---------------------------------------------------------------------- removing plates
def test_remove_plates_keeps_every_other_row_and_summary(tmp_path):
    store, tokens, obs = three_plate_store(tmp_path / "s", patch=True)
    store.update_provenance(plates={"A": {"complete": True}, "B": {"complete": True}})
    store.remove_plates(["B"])
    assert store.plates == ["A", "C"] and len(store) == 32
    keep = np.r_[0:24, 40:48]
    np.testing.assert_array_equal(store.read(), tokens[keep])
    np.testing.assert_array_equal(store.read_patches()[:, 0, 1], tokens[keep].astype(np.float16))
    pd.testing.assert_frame_equal(
        store.obs[["plate", "well", "field"]],
        obs.iloc[keep][["plate", "well", "field"]].reset_index(drop=True),
    )
    assert set(store.provenance["plates"]) == {"A"} and store.provenance["model"] == "toy"
    reopened = EmbeddingStore.open(tmp_path / "s")
    assert reopened.describe()["tokens_per_plate"] == {"A": 24, "C": 8}
    assert not any(p.name.startswith(".s.") for p in tmp_path.iterdir())  # nothing left beside it


# ---------------------------------------------------------------------- damage and completeness
def test_a_missing_chunk_of_committed_rows_fails_naming_file_and_rows(tmp_path):
    _store, tokens, _ = three_plate_store(tmp_path / "s")
    zeros = EmbeddingStore.create(tmp_path / "z", dim=4, chunk_rows=8)
    zeros.append(np.zeros((16, 4)), plate_obs("Z", 16))  # all-zero chunks are written too
    assert EmbeddingStore.open(tmp_path / "z").missing_chunks() == {"tokens": []}
    np.testing.assert_array_equal(EmbeddingStore.open(tmp_path / "z").read(), 0)

    chunk = tmp_path / "s" / "tokens" / "c" / "2" / "0"
    chunk.unlink()  # rows 16..23 (an interrupted copy)
    damaged = EmbeddingStore.open(tmp_path / "s")
    message = rf"chunk file {chunk} holding committed tokens rows 16\.\.23 is missing"
    with pytest.raises(StoreDamagedError, match=message):
        damaged.read(slice(10, 20))
    with pytest.raises(StoreDamagedError, match=message):
        damaged.read(np.array([47, 17]))
    with pytest.raises(StoreDamagedError, match=message):
        sum(len(b) for b in damaged.iter_batches(16))
    with pytest.raises(StoreDamagedError, match=message):
        damaged.tokens_dask()
    np.testing.assert_array_equal(damaged.read_plate("B"), tokens[24:40])  # other rows still read
    assert damaged.missing_chunks() == {"tokens": [2]}
    (tmp_path / "s" / "obs" / "part-00002.parquet").unlink()
    with pytest.raises(StoreDamagedError, match=r"obs part .*part-00002.parquet \(rows 24\.\.39\)"):
        damaged.read_obs(plate="B")


def test_a_truncated_chunk_fails_naming_file_and_rows(tmp_path):
    _store, tokens, _ = three_plate_store(tmp_path / "s")
    chunk = tmp_path / "s" / "tokens" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])  # rows 16..23 (a copy cut short)
    damaged = EmbeddingStore.open(tmp_path / "s")
    message = rf"chunk file {chunk} holding tokens rows 16\.\.23 cannot be read"
    with pytest.raises(StoreDamagedError, match=message):
        damaged.read(slice(0, 40))
    with pytest.raises(StoreDamagedError, match=message):
        damaged.read(np.array([47, 17]))
    with pytest.raises(StoreDamagedError, match=message):
        sum(len(b) for b in damaged.iter_batches(16))
    with pytest.raises(StoreDamagedError, match=message):
        sum(len(b) for b in damaged.iter_batches(4, rows=np.arange(10, 30)))
    np.testing.assert_array_equal(damaged.read_plate("B"), tokens[24:40])  # other rows still read
    part = tmp_path / "s" / "obs" / "part-00002.parquet"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(StoreDamagedError, match=rf"obs part {part} \(rows 24\.\.39\) cannot be read"):
        EmbeddingStore.open(tmp_path / "s").read_obs(plate="B")


def test_an_interrupted_embedding_makes_the_store_incomplete(tmp_path):
    store, _, _ = three_plate_store(tmp_path / "s")
    assert store.is_complete
    store.check_complete()
    store.update_provenance(
        plates={"A": {"complete": True}, "B": {"complete": False}}, pending_plates=["B", "D"]
    )
    reopened = EmbeddingStore.open(tmp_path / "s")
    assert reopened.incomplete_plates() == ["B", "D"] and not reopened.describe()["complete"]
    with pytest.raises(StoreIncompleteError, match=r"B \(16 tokens so far\), D \(not started\)"):
        reopened.check_complete()
    with pytest.warns(UserWarning, match="incomplete"):
        reopened.check_complete(allow_incomplete=True)


# ---------------------------------------------------------------------- format version 1
def as_version_1(path) -> None:
    """Rewrite a store in the version-1 layout: no per-plate parts, entries or summaries."""
    meta = json.loads((path / "store.json").read_text())
    meta["version"] = 1
    for key in ("columns", "plates", "summary_serial"):
        meta.pop(key, None)
    for part in meta["parts"]:
        part.pop("plates")
    (path / "store.json").write_text(json.dumps(meta))
    shutil.rmtree(path / "plates")


def test_version_1_stores_open_read_and_upgrade_on_append(tmp_path):
    _, tokens, _obs = three_plate_store(tmp_path / "s")
    expected = EmbeddingStore.open(tmp_path / "s").describe()
    as_version_1(tmp_path / "s")
    old = EmbeddingStore.open(tmp_path / "s")
    assert old.format_version == 1 and len(old) == 48
    np.testing.assert_array_equal(old.read(), tokens)
    assert old.plates == ["A", "B", "C"]
    np.testing.assert_array_equal(old.plate_rows("B"), np.arange(24, 40))
    described = old.describe()
    assert {k: v for k, v in described.items() if k != "format_version"} == {
        k: v for k, v in expected.items() if k != "format_version"
    }
    old.update_provenance(note="still version 1")  # a provenance update keeps the layout
    assert json.loads((tmp_path / "s" / "store.json").read_text())["version"] == 1

    old.append(np.ones((4, 4)), plate_obs("B", 4))
    upgraded = EmbeddingStore.open(tmp_path / "s")
    assert upgraded.format_version == 2 and upgraded.tokens_per_plate() == {
        "A": 24,
        "B": 20,
        "C": 8,
    }
    np.testing.assert_array_equal(upgraded.plate_rows("B"), np.r_[24:40, 48:52])
    assert upgraded.plate_summary("B")["wells"] == {"B02": 8, "B03": 6, "C02": 6}
    np.testing.assert_array_equal(upgraded.read()[:48], tokens)
    listed = [e["summary"] for e in upgraded._meta["plates"].values()] + [upgraded._meta["labels"]]
    assert sorted(p.name for p in (tmp_path / "s" / "plates").iterdir()) == sorted(
        f.split("/")[1] for f in listed
    )  # the summaries the append replaced are gone


def test_newer_formats_are_refused_clearly(tmp_path):
    three_plate_store(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    meta["version"] = store_files.FORMAT_VERSION + 1
    (tmp_path / "s" / "store.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="reads up to 2 \\(update plate_concepts\\)"):
        EmbeddingStore.open(tmp_path / "s")
