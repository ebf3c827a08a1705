"""The on-disk embedding store and its importers/exporters."""

from __future__ import annotations

import itertools
import json
import tracemalloc

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from plate_concepts.embeddings import store as store_module
from plate_concepts.embeddings.profiles import (
    export_profiles,
    from_anndata,
    from_numpy,
    import_profiles,
    to_anndata,
)
from plate_concepts.embeddings.store import EmbeddingStore, default_chunk_rows


def make_obs(
    n: int, plate: str = "P1", start: int = 0, wells: list[str] | None = None
) -> pd.DataFrame:
    wells = wells or ["B7", "c03", "r04c12"]
    return pd.DataFrame(
        {
            "plate": plate,
            "well": [wells[i % len(wells)] for i in range(n)],
            "field": np.arange(start, start + n) % 9,
            "crop_y": (np.arange(start, start + n) // 9) * 64,
            "crop_x": 32,
            "crop_size": 64,
            "is_control": np.arange(start, start + n) % 4 == 0,
            "compound": [f"cpd{i % 5}" for i in range(start, start + n)],
            "dose": np.arange(start, start + n) * 0.5,
        }
    )


def filled_store(
    path, n: int, dim: int = 16, chunk_rows: int = 32, seed: int = 0, parts: int = 1
) -> tuple[EmbeddingStore, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, dim), dtype=np.float32)
    store = EmbeddingStore.create(path, dim=dim, chunk_rows=chunk_rows)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for a, b in itertools.pairwise(bounds):
        store.append(tokens[a:b], make_obs(b - a, start=a))
    return store, tokens


# ---------------------------------------------------------------------- round trips
def test_appends_round_trip_tokens_obs_patches_and_provenance(tmp_path):
    rng = np.random.default_rng(1)
    store = EmbeddingStore.create(
        tmp_path / "s",
        dim=12,
        patch_grid=(3, 2),
        chunk_rows=16,
        provenance={"model": "toy", "crop_size": 64, "channels": ["dna", "rna"]},
    )
    sizes = [5, 40, 1, 23]
    tokens = rng.standard_normal((sum(sizes), 12))
    patches = rng.standard_normal((sum(sizes), 3, 2, 12))
    start = 0
    for k, size in enumerate(sizes):
        rows = store.append(
            tokens[start : start + size],
            make_obs(size, plate=f"P{k}", start=start),
            patches[start : start + size],
        )
        assert rows == range(start, start + size)
        start += size
    store.update_provenance(note="appended", n_batches=np.int64(4))

    reopened = EmbeddingStore.open(tmp_path / "s")
    assert len(reopened) == 69 and reopened.dim == 12 and reopened.patch_grid == (3, 2)
    np.testing.assert_array_equal(reopened.read(), tokens.astype(np.float32))
    np.testing.assert_array_equal(
        reopened.read_patches(), patches.astype(np.float16).astype(np.float32)
    )
    obs = reopened.obs
    assert list(obs["plate"]) == [f"P{k}" for k, size in enumerate(sizes) for _ in range(size)]
    assert set(obs["well"]) == {"B07", "C03", "D12"}  # canonicalised
    np.testing.assert_array_equal(obs["field"], np.arange(69) % 9)
    np.testing.assert_array_equal(obs["dose"], np.arange(69) * 0.5)
    assert obs["is_control"].dtype == bool and obs["is_control"].sum() == 18
    assert reopened.provenance == {
        "model": "toy",
        "crop_size": 64,
        "channels": ["dna", "rna"],
        "note": "appended",
        "n_batches": 4,
    }
    np.testing.assert_array_equal(reopened.tokens_dask().compute(), tokens.astype(np.float32))


def test_float16_store_and_reads_by_index_and_mask(tmp_path):
    rng = np.random.default_rng(2)
    tokens = rng.standard_normal((100, 8)) * 100
    store = EmbeddingStore.create(tmp_path / "h", dim=8, dtype="float16", chunk_rows=16)
    store.append(tokens, make_obs(100))
    reopened = EmbeddingStore.open(tmp_path / "h")
    assert reopened.dtype == np.float16
    expected = tokens.astype(np.float16).astype(np.float32)
    rows = np.array([99, 3, 3, -1, 50, 17])
    np.testing.assert_array_equal(reopened.read(rows), expected[rows])
    assert reopened.read(rows).dtype == np.float32
    mask = np.arange(100) % 7 == 0
    np.testing.assert_array_equal(reopened.read(mask), expected[mask])
    np.testing.assert_array_equal(reopened.read(slice(90, None, 3)), expected[90::3])
    np.testing.assert_array_equal(reopened.read(5), expected[5])
    assert reopened.tokens_dask().dtype == np.float16
    with pytest.raises(IndexError, match="row 100 is out of range for a store of 100"):
        reopened.read(np.array([1, 100]))


def test_default_chunks_hold_4_to_8_mib(tmp_path):
    for dim, dtype in [(1024, "float32"), (768, "float16"), (384, "float32"), (5, "float32")]:
        rows = default_chunk_rows(dim * np.dtype(dtype).itemsize)
        assert 4 * 2**20 < rows * dim * np.dtype(dtype).itemsize <= 8 * 2**20
    store = EmbeddingStore.create(tmp_path / "s", dim=1024, patch_grid=(32, 32))
    assert store.chunk_rows == 2048 and store.chunk_rows_patch == 4  # 32*32*1024*2 B = 2 MiB a row


def test_completed_keys_and_has_rows(tmp_path):
    store, _ = filled_store(tmp_path / "s", 20)
    keys = store.completed_keys()
    assert len(keys) == 20 and ("P1", "B07", 0, 0, 32) in keys
    query = pd.DataFrame(
        {
            "plate": ["P1", "P1", "P2"],
            "well": ["b7", "C3", "B07"],
            "field": [0, 0, 0],
            "crop_y": [0, 0, 0],
            "crop_x": [32, 32, 32],
        }
    )
    np.testing.assert_array_equal(store.has_rows(query), [True, False, False])


def test_compact_obs_merges_parts_and_stale_handles_refuse_to_write(tmp_path):
    store, tokens = filled_store(tmp_path / "s", 90, parts=3)
    before = store.obs
    store.compact_obs()
    assert [p.name for p in (tmp_path / "s" / "obs").iterdir()] == ["part-00003.parquet"]
    reopened = EmbeddingStore.open(tmp_path / "s")
    pd.testing.assert_frame_equal(reopened.obs, before)
    reopened.append(tokens[:5], make_obs(5, plate="P9"))  # takes a new part name
    assert sorted(p.name for p in (tmp_path / "s" / "obs").iterdir()) == [
        "part-00003.parquet",
        "part-00004.parquet",
    ]
    assert list(EmbeddingStore.open(tmp_path / "s").obs["plate"][88:]) == ["P1", "P1"] + ["P9"] * 5
    with pytest.raises(RuntimeError, match="changed on disk since it was opened"):
        store.append(tokens[:5], make_obs(5))  # `store` still believes there are 90 rows
    with pytest.raises(RuntimeError, match="changed on disk"):
        store.update_provenance(model="stale")
    assert len(EmbeddingStore.open(tmp_path / "s")) == 95


# ---------------------------------------------------------------------- streaming batches
def collect(store: EmbeddingStore, **kwargs) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(store.iter_batches(return_index=True, **kwargs))


def test_iter_batches_covers_each_row_once_per_epoch_deterministically(tmp_path):
    store, tokens = filled_store(tmp_path / "s", 1000, chunk_rows=32, parts=3)
    batches = collect(store, batch_size=64, seed=3, buffer_chunks=4, epochs=2)
    index = np.concatenate([i for _, i in batches])
    assert len(index) == 2000
    first, second = index[:1000], index[1000:]
    assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
    assert not np.array_equal(first, second)  # a new order every epoch
    assert not np.array_equal(first, np.arange(1000))  # shuffled
    for x, i in batches:
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, tokens[i])
    sizes = [len(i) for _, i in batches]
    assert sizes == [64] * 15 + [40] + [64] * 15 + [40]

    again = collect(store, batch_size=64, seed=3, buffer_chunks=4, epochs=2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    other_seed = np.concatenate(
        [i for _, i in collect(store, batch_size=64, seed=4, buffer_chunks=4)]
    )
    assert not np.array_equal(other_seed, first)

    dropped = collect(store, batch_size=64, seed=3, drop_last=True)
    assert [len(i) for _, i in dropped] == [64] * 15
    in_order = np.concatenate([i for _, i in collect(store, batch_size=100, shuffle=False)])
    np.testing.assert_array_equal(in_order, np.arange(1000))
    endless = store.iter_batches(300, epochs=None)
    assert [len(next(endless)) for _ in range(10)] == [300, 300, 300, 100] * 2 + [300, 300]


def test_iter_batches_rows_subset_and_shards(tmp_path):
    store, _ = filled_store(tmp_path / "s", 1000, chunk_rows=32)
    controls = store.obs["is_control"].to_numpy()
    picked = np.concatenate([i for _, i in collect(store, batch_size=50, rows=controls)])
    assert sorted(picked) == list(np.flatnonzero(controls))
    listed = np.array([999, 0, 500, 501, 502])
    picked = np.concatenate([i for _, i in collect(store, batch_size=2, rows=listed)])
    assert sorted(picked) == sorted(listed)

    for epoch_seed in (0, 1):
        shards = [
            np.concatenate(
                [i for _, i in collect(store, batch_size=64, seed=epoch_seed, shard=(rank, 2))]
            )
            for rank in range(2)
        ]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(np.concatenate(shards)) == list(range(1000))
        assert abs(len(shards[0]) - len(shards[1])) <= 32  # interleaved chunks: balanced
    with pytest.raises(ValueError, match="shard"):
        store.iter_batches(8, shard=(2, 2))
    with pytest.raises(ValueError, match="selects no token"):
        store.iter_batches(8, rows=np.zeros(1000, bool))


def test_iter_batches_memory_does_not_grow_with_store_size(tmp_path):
    dim, n, chunk_rows = 64, 20_000, 1024
    rng = np.random.default_rng(0)
    peaks = {}
    for factor in (1, 8):
        store = EmbeddingStore.create(tmp_path / f"s{factor}", dim=dim, chunk_rows=chunk_rows)
        obs = make_obs(n)
        for _ in range(factor):
            store.append(rng.standard_normal((n, dim), dtype=np.float32), obs)
        store = EmbeddingStore.open(tmp_path / f"s{factor}")
        tracemalloc.start()
        seen = sum(len(batch) for batch in store.iter_batches(512, buffer_chunks=4, seed=1))
        peaks[factor] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seen == factor * n
    matrix_bytes = 8 * n * dim * 4  # 41 MB
    assert peaks[8] < 1.5 * peaks[1], peaks
    assert peaks[8] < matrix_bytes / 4, peaks


# ---------------------------------------------------------------------- bad input
def test_append_rejects_bad_inputs_with_clear_messages(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", dim=1024, chunk_rows=8)
    good = np.zeros((3, 1024), np.float32)
    with pytest.raises(
        ValueError, match=r"token dimension 768 differs from the store's 1024 \(.*s\)"
    ):
        store.append(np.zeros((3, 768)), make_obs(3))
    with pytest.raises(ValueError, match="obs has 2 rows but there are 3 tokens"):
        store.append(good, make_obs(2))
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['crop_size'\]"):
        store.append(good, make_obs(3).drop(columns="crop_size"))
    with pytest.raises(ValueError, match="'Z99x' is not a well name"):
        store.append(good, make_obs(3, wells=["B1", "Z99x"]))
    with pytest.raises(ValueError, match="column 'field' row 1: 'two' is not a whole number"):
        store.append(good, make_obs(3).assign(field=[1, "two", 3]))
    bad = good.copy()
    bad[2, 5] = np.nan
    with pytest.raises(
        ValueError,
        match=r"tokens row 2 of this append \(store row 2; plate P1, well D12, field 2\) "
        r"contains NaN or inf",
    ):
        store.append(bad, make_obs(3))
    bad[2, 5] = np.inf
    with pytest.raises(ValueError, match=r"row 2 .* contains NaN or inf"):
        store.append(bad, make_obs(3))
    with pytest.raises(ValueError, match="created without patch_grid"):
        store.append(good, make_obs(3), np.zeros((3, 2, 2, 1024)))
    assert len(store) == 0 and len(EmbeddingStore.open(tmp_path / "s")) == 0

    half = EmbeddingStore.create(tmp_path / "h", dim=4, dtype="float16", patch_grid=(2, 2))
    with pytest.raises(ValueError, match=r"row 1 .*beyond the float16 range"):
        half.append(np.array([[1.0] * 4, [1e6] * 4]), make_obs(2), np.zeros((2, 2, 2, 4)))
    with pytest.raises(
        ValueError, match=r"patch_tokens have shape \(2, 3, 2, 4\), expected \(2, 2, 2, 4\)"
    ):
        half.append(np.zeros((2, 4)), make_obs(2), np.zeros((2, 3, 2, 4)))
    with pytest.raises(ValueError, match="holds patch tokens"):
        half.append(np.zeros((2, 4)), make_obs(2))


def test_open_rejects_non_stores_and_corrupt_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        EmbeddingStore.open(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(
        ValueError, match=r"folder is not an embedding store: it has no store\.json"
    ):
        EmbeddingStore.open(tmp_path / "folder")

    filled_store(tmp_path / "s", 10)
    record = tmp_path / "s" / "store.json"
    text = record.read_text()
    record.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"s/store\.json is corrupt or truncated"):
        EmbeddingStore.open(tmp_path / "s")
    meta = json.loads(text)
    meta["n_tokens"] = 11
    record.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cover 10 rows but n_tokens is 11"):
        EmbeddingStore.open(tmp_path / "s")
    record.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an embedding-store record"):
        EmbeddingStore.open(tmp_path / "s")


def test_create_never_clobbers_by_accident(tmp_path):
    filled_store(tmp_path / "s", 10)
    with pytest.raises(FileExistsError, match="already exists"):
        EmbeddingStore.create(tmp_path / "s", dim=4)
    fresh = EmbeddingStore.create(tmp_path / "s", dim=4, overwrite=True)
    assert len(EmbeddingStore.open(tmp_path / "s")) == 0 and fresh.dim == 4
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an embedding store"):
        EmbeddingStore.create(tmp_path / "data", dim=4, overwrite=True)
    assert (tmp_path / "data" / "precious.txt").exists()


# ---------------------------------------------------------------------- crash safety
@pytest.mark.parametrize("crash_at", ["_write_parquet", "_write_meta"])
def test_crash_during_append_keeps_the_committed_state(tmp_path, monkeypatch, crash_at):
    store, tokens = filled_store(tmp_path / "s", 50, chunk_rows=32)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, crash_at, crash)
        with pytest.raises(OSError, match="simulated"):
            store.append(np.full((30, 16), 7.0), make_obs(30, plate="CRASH"))

    reopened = EmbeddingStore.open(tmp_path / "s")
    assert len(reopened) == 50 and len(reopened.obs) == 50
    assert "CRASH" not in set(reopened.obs["plate"])
    np.testing.assert_array_equal(reopened.read(), tokens)  # the shared partial chunk is intact
    assert sum(len(b) for b in reopened.iter_batches(16)) == 50

    new = np.full((20, 16), 3.0, np.float32)
    assert reopened.append(new, make_obs(20, plate="P2")) == range(50, 70)
    again = EmbeddingStore.open(tmp_path / "s")
    np.testing.assert_array_equal(again.read(), np.concatenate([tokens, new]))
    assert list(again.obs["plate"][48:52]) == ["P1", "P1", "P2", "P2"]
    assert sorted(p.name for p in (tmp_path / "s" / "obs").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]


# ---------------------------------------------------------------------- profile tables
def profile_table(n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    wells = ["B7", "b07", "r03c04", "C4", "H12"]
    table = pd.DataFrame(
        {
            "Metadata_Plate": ["0042"] * n,  # a numeric-looking barcode must stay text
            "Metadata_Well": [wells[i % len(wells)] for i in range(n)],
            "Metadata_Site": np.arange(n) % 4,
            "Metadata_pert_iname": [f"drug{i % 3}" for i in range(n)],
            "Metadata_is_control": np.arange(n) % 5 == 0,
        }
    )
    for name in [
        "Cells_AreaShape_Area",
        "Cells_Intensity_MeanIntensity_DNA",
        "Nuclei_Texture_Contrast",
    ]:
        table[name] = rng.standard_normal(n).astype(np.float32)
    return table


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".csv.gz"])
def test_profile_tables_round_trip(tmp_path, suffix):
    table = profile_table()
    source = tmp_path / f"plate_x{suffix}"
    if suffix == ".parquet":
        table.to_parquet(source, index=False)
    else:
        table.to_csv(source, index=False)

    store = import_profiles(source, tmp_path / "store", block_rows=8)
    assert len(store) == 30 and store.dim == 3
    assert len(store.provenance["feature_names"]) == 3
    assert len(list((tmp_path / "store" / "obs").iterdir())) == 4  # streamed: 8+8+8+6 rows
    obs = store.obs
    assert set(obs["well"]) == {"B07", "C04", "H12"}
    assert list(obs.columns[:6]) == ["plate", "well", "field", "pert_iname", "is_control", "crop_y"]
    assert (obs["plate"] == "0042").all() and (obs["crop_size"] == 0).all()
    np.testing.assert_array_equal(obs["field"], np.arange(30) % 4)
    np.testing.assert_array_equal(store.read(), table.iloc[:, 5:].to_numpy())

    out = tmp_path / f"export{suffix}"
    export_profiles(store, out, block_rows=7)
    back = (
        pd.read_parquet(out)
        if suffix == ".parquet"
        else pd.read_csv(out, dtype={"Metadata_Plate": str})
    )
    assert list(back.columns) == list(table.columns)
    expected = table.assign(
        Metadata_Well=[
            {"B7": "B07", "b07": "B07", "r03c04": "C04", "C4": "C04"}.get(w, w)
            for w in table["Metadata_Well"]
        ]
    )
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)


def test_profile_import_options_and_errors(tmp_path):
    table = profile_table(10)
    path = tmp_path / "t.parquet"
    table.to_parquet(path)
    picked = import_profiles(path, tmp_path / "cells", features="^Cells_", plate="override")
    assert picked.provenance["feature_names"] == [
        "Cells_AreaShape_Area",
        "Cells_Intensity_MeanIntensity_DNA",
    ]
    assert (picked.obs["plate"] == "0042").all()  # the table's own plate wins over the default
    no_plate = tmp_path / "no_plate.parquet"
    table.drop(columns=["Metadata_Plate", "Metadata_Site"]).to_parquet(no_plate)
    defaulted = import_profiles(no_plate, tmp_path / "d")
    assert (defaulted.obs["plate"] == "no_plate").all() and (defaulted.obs["field"] == 0).all()
    with pytest.raises(FileExistsError):
        import_profiles(path, tmp_path / "cells")

    with pytest.raises(ValueError, match="no feature columns match"):
        import_profiles(path, tmp_path / "e1", features="^Cytoplasm_")
    text = table.assign(Cells_Label=["x"] * 10)
    text.to_parquet(tmp_path / "text.parquet")
    with pytest.raises(ValueError, match=r"feature column 'Cells_Label'.*is not numeric"):
        import_profiles(tmp_path / "text.parquet", tmp_path / "e2", features="^Cells_")
    holes = table.copy()
    holes.loc[6, "Nuclei_Texture_Contrast"] = np.nan
    holes.to_csv(tmp_path / "holes.csv", index=False)
    with pytest.raises(
        ValueError, match=r"feature 'Nuclei_Texture_Contrast' in data row 7 \(well b07\) is empty"
    ):
        import_profiles(tmp_path / "holes.csv", tmp_path / "e3", block_rows=4)
    wells = table.assign(Metadata_Well=["B1"] * 9 + ["well-9"])
    wells.to_csv(tmp_path / "wells.csv", index=False)
    with pytest.raises(ValueError, match="data row 10: well 'well-9' is not a well name"):
        import_profiles(tmp_path / "wells.csv", tmp_path / "e4", block_rows=4)
    assert not any(
        (tmp_path / name).exists() for name in ("e1", "e2", "e3", "e4")
    )  # nothing half-made
    with pytest.raises(ValueError, match="no Metadata_Well column"):
        table.drop(columns="Metadata_Well").to_parquet(tmp_path / "nowell.parquet")
        import_profiles(tmp_path / "nowell.parquet", tmp_path / "e5")


# ---------------------------------------------------------------------- numpy and AnnData
def test_from_numpy(tmp_path):
    tokens = np.arange(60, dtype=np.float64).reshape(20, 3)
    patches = np.ones((20, 2, 2, 3))
    store = from_numpy(
        tokens,
        make_obs(20),
        tmp_path / "n",
        patch_tokens=patches,
        dtype="float16",
        provenance={"model": "m"},
    )
    assert (
        store.dtype == np.float16
        and store.patch_grid == (2, 2)
        and store.provenance == {"model": "m"}
    )
    np.testing.assert_array_equal(store.read(), tokens)
    np.testing.assert_array_equal(store.read_patches(np.array([3])), np.ones((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="obs has 19 rows"):
        from_numpy(tokens, make_obs(19), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")  # anndata's notes on zarr v3 defaults
@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_anndata_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(7)
    tokens = rng.standard_normal((45, 6)).astype(np.float32)
    patches = rng.standard_normal((45, 2, 3, 6))
    store = from_numpy(
        tokens,
        make_obs(45),
        tmp_path / "s",
        patch_tokens=patches,
        chunk_rows=8,
        provenance={"model": "toy", "crop_size": 64},
    )
    adata = to_anndata(store, patch_tokens=True)
    assert adata.shape == (45, 6) and adata.uns["model"] == "toy"
    assert adata.obsm["patch_tokens"].shape == (45, 2, 3, 6)
    assert "patch_tokens" not in to_anndata(store).obsm
    file = tmp_path / f"a{suffix}"
    if suffix == ".h5ad":
        adata.write_h5ad(file)
    else:
        with anndata.settings.override(zarr_write_format=3):
            adata.write_zarr(file)

    back = from_anndata(file, tmp_path / "back", block_rows=10)
    np.testing.assert_array_equal(back.read(), tokens)
    np.testing.assert_array_equal(back.read_patches(), store.read_patches())
    pd.testing.assert_frame_equal(back.obs, store.obs, check_dtype=False)
    assert back.provenance["model"] == "toy" and back.provenance["crop_size"] == 64
    assert len(list((tmp_path / "back" / "obs").iterdir())) == 5  # copied in blocks of 10 rows


def test_from_anndata_object_with_jump_metadata_names(tmp_path):
    obs = pd.DataFrame(
        {
            "Metadata_Plate": ["A", "A", "B"],
            "Metadata_Well": pd.Categorical(["a1", "A01", "p24"]),
            "label": ["x", "y", "z"],
        },
        index=["cell_a", "cell_b", "cell_c"],
    )
    x = scipy.sparse.csr_matrix(np.diag([1.0, 2.0, 3.0]))
    adata = anndata.AnnData(X=x, obs=obs, uns={"model": "m", "weights": np.array([1, 2])})
    store = from_anndata(adata, tmp_path / "s")
    assert list(store.obs["well"]) == ["A01", "A01", "P24"]
    assert list(store.obs["obs_name"]) == ["cell_a", "cell_b", "cell_c"]
    assert (store.obs["field"] == 0).all() and store.provenance["weights"] == [1, 2]
    np.testing.assert_array_equal(store.read(), np.diag([1, 2, 3]))

    adata.write_h5ad(tmp_path / "sparse.h5ad")  # backed sparse X, read in row blocks
    from_file = from_anndata(tmp_path / "sparse.h5ad", tmp_path / "f", block_rows=2)
    np.testing.assert_array_equal(from_file.read(), np.diag([1, 2, 3]))
    pd.testing.assert_frame_equal(from_file.obs, store.obs)
    with pytest.raises(ValueError, match="no 'well'"):
        from_anndata(anndata.AnnData(X=np.eye(2)), tmp_path / "nowell")
