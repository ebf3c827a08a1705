"""Embedding on Dask: two workers give the store of an in-process run (rows, order, index and
tokens exactly: the same model on the same pixels, one crop's token independent of the others in
its batch), also when a worker dies mid-run, when the run is cancelled and resumed, or when the
client crashes with parts on disk (committed parts are not appended twice, finished ones are
committed without embedding again); one token per object too; the CLI's --workers/--scheduler."""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TinyEmbedder, make_feature_plate, plate_of

from plate_concepts.embeddings import embed_dask
from plate_concepts.embeddings.embed import embed_plates
from plate_concepts.embeddings.embed_dask import parts_folder
from plate_concepts.embeddings.embedders import ModelEmbedder
from plate_concepts.embeddings.store import EmbeddingStore

distributed = pytest.importorskip("distributed")

WELLS = ("B02", "B03", "C02")
KEY = ["plate", "well", "field", "crop_y", "crop_x"]
# 32-px crops of 64 x 96 fields: 6 per field, 36 per plate; parts of 2 fields (12 crops).
SETTINGS = {"crop_size": 32, "batch_size": 4, "group_size": 8, "device": "cpu",
            "patch_tokens": True, "control": "treatment=DMSO"}  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, shared by the tests of this module (each starts in seconds)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.ERROR) as local:  # fmt: skip
        yield local


def screen_plate(name: str, seed: int):
    """Wells B02, B03, C02 with two 2 x 64 x 96 fields each (seeded noise), DMSO controls."""
    rng = np.random.default_rng(seed)
    images = {
        (well, field): rng.integers(0, 4000, (2, 64, 96)).astype(np.uint16)
        for well in WELLS
        for field in (0, 1)
    }
    platemap = pd.DataFrame(
        {"treatment": ["DMSO", "drug", "DMSO"], "dose": [0.0, 1.5, 0.0]},
        index=pd.Index(WELLS, name="well"),
    )
    return plate_of(images, platemap=platemap, name=name, channels=["DNA", "Mito"])


def screen():
    return [screen_plate("P1", 1), screen_plate("P2", 2)]


def assert_same_store(a: EmbeddingStore, b: EmbeddingStore) -> None:
    """The same rows in the same order, the same index, tokens, patch tokens, parts and records."""
    pd.testing.assert_frame_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.read(), b.read())
    if a.patch_grid is not None:
        np.testing.assert_array_equal(a.read_patches(), b.read_patches())
    assert [p["plates"] for p in a._meta["parts"]] == [p["plates"] for p in b._meta["parts"]]
    assert {**a.describe(), "path": None} == {**b.describe(), "path": None}
    assert a.provenance == b.provenance


@pytest.fixture
def spec(tiny_embedder) -> str:
    return f"torchscript:{tiny_embedder}"


@pytest.fixture
def in_process(tmp_path, spec) -> EmbeddingStore:
    return embed_plates(screen(), tmp_path / "in-process", spec, **SETTINGS)


def test_two_workers_give_the_store_of_an_in_process_run(cluster, tmp_path, spec, in_process):
    ticks = []
    store = embed_plates(screen(), tmp_path / "dask", spec, scheduler=cluster.scheduler_address,
                         progress=lambda *tick: ticks.append(tick), **SETTINGS)  # fmt: skip
    assert len(store) == 72 and store.is_complete and store.plates == ["P1", "P2"]
    assert_same_store(store, in_process)
    assert ticks[0] == (0, 72) and ticks[-1] == (72, 72)
    assert [done for done, _ in ticks] == sorted(done for done, _ in ticks)
    assert not parts_folder(tmp_path / "dask").exists()  # every part committed and removed


def test_a_killed_worker_is_replaced_and_no_field_counts_twice(cluster, tmp_path, spec, in_process):
    marker = tmp_path / "kill-once"
    marker.write_text("")

    class KillOnce(distributed.WorkerPlugin):
        """Kill the worker the first time it starts an embedding task."""

        name = "kill-once"

        def __init__(self, marker: str) -> None:
            self.marker = marker

        def transition(self, key, start, finish, **kwargs):
            if (
                finish == "executing"
                and "plate-concepts-embed-" in str(key)
                and os.path.exists(self.marker)
            ):
                os.remove(self.marker)
                os._exit(1)

    with distributed.Client(cluster) as client:
        client.register_plugin(KillOnce(str(marker)))
        try:
            store = embed_plates(screen(), tmp_path / "dask", spec,
                                 scheduler=cluster.scheduler_address, **SETTINGS)  # fmt: skip
        finally:
            client.unregister_worker_plugin("kill-once")
    assert not marker.exists()  # a worker did die
    assert not store.obs.duplicated(KEY).any()
    assert_same_store(store, in_process)


def test_a_cancelled_run_resumes_to_the_same_store(cluster, tmp_path, spec, in_process):
    stop = threading.Event()
    path = tmp_path / "dask"
    # One field per part: 12 parts, more than the 8 that two workers may have running or waiting.
    settings = {**SETTINGS, "group_size": 1}
    partial = embed_plates(screen(), path, spec, scheduler=cluster.scheduler_address, cancel=stop,
                           progress=lambda done, total: done and stop.set(), **settings)  # fmt: skip
    assert len(partial) < 72 and len(partial) % 6 == 0  # whole fields, committed in order
    assert "P2" in partial.incomplete_plates()
    left = [p for p in parts_folder(path).iterdir() if embed_dask.read_manifest(p)]  # kept finished
    assert len(partial) // 6 + len(left) < 12
    ticks = []
    resumed = embed_plates(screen(), path, spec, scheduler=cluster.scheduler_address,
                           progress=lambda *tick: ticks.append(tick), **settings)  # fmt: skip
    assert ticks[0][0] >= len(partial) and ticks[-1] == (72, 72)
    assert_same_store(resumed, in_process)
    assert not parts_folder(path).exists()


def test_after_a_crash_finished_parts_are_committed_once_and_not_embedded_again(
    cluster, tmp_path, spec, in_process, monkeypatch
):
    path = tmp_path / "dask"
    appends = []
    original_append = EmbeddingStore.append

    def crash_on_third(self, *args, **kwargs):
        appends.append(1)
        if len(appends) == 3:
            raise RuntimeError("the client crashed")
        return original_append(self, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(EmbeddingStore, "append", crash_on_third)
        patched.setattr(embed_dask, "_remove", lambda folder: None)  # committed parts stay
        with pytest.raises(RuntimeError, match="crashed"):
            embed_plates(screen(), path, spec, scheduler=cluster.scheduler_address, **SETTINGS)
    stored = EmbeddingStore.open(path)
    assert len(stored) == 24  # two parts of 12 crops committed
    in_store = set(zip(stored.obs["plate"], stored.obs["well"], stored.obs["field"], strict=True))
    # Mark the tokens of every part on disk: the resumed store shows which ones it reused.
    from safetensors.numpy import load_file, save_file

    parts = sorted(p for p in parts_folder(path).iterdir() if not p.name.startswith("."))
    assert len(parts) >= 3  # the two committed ones, and the one whose commit crashed
    reused = set()
    for part in parts:
        arrays = load_file(str(part / "tokens.safetensors"))
        save_file({**arrays, "tokens": arrays["tokens"] + 1000}, str(part / "tokens.safetensors"))
        manifest = embed_dask.read_manifest(part)
        fields = {(manifest["plate"], w, f) for w, f, _ in manifest["fields"]}
        if not fields <= in_store:
            reused |= fields
    resumed = embed_plates(screen(), path, spec, scheduler=cluster.scheduler_address, **SETTINGS)
    obs = resumed.obs
    assert len(resumed) == 72 and not obs.duplicated(KEY).any()
    pd.testing.assert_frame_equal(obs, in_process.obs)
    marked = np.array(
        [
            (p, w, f) in reused
            for p, w, f in zip(obs["plate"], obs["well"], obs["field"], strict=True)
        ]
    )
    assert marked.any() and not marked.all()
    tokens = resumed.read()
    np.testing.assert_array_equal(
        tokens[marked], in_process.read()[marked] + 1000
    )  # not embedded again
    np.testing.assert_array_equal(tokens[~marked], in_process.read()[~marked])
    assert not parts_folder(path).exists()


def test_overwrite_with_min_foreground_on_dask_equals_in_process(cluster, tmp_path, spec):
    """--min-foreground leaves out the same crops on the workers, and --overwrite replaces a
    finished store only once the new one is complete."""
    settings = {**SETTINGS, "min_foreground": 0.5}
    alone = embed_plates(screen(), tmp_path / "in-process", spec, **settings)
    assert 0 < len(alone) < 72  # the filter leaves crops out, not all of them
    path = tmp_path / "dask"
    embed_plates(screen(), path, spec, scheduler=cluster.scheduler_address, **SETTINGS)
    with pytest.raises(ValueError, match="min_foreground: store None, now 0.5"):  # not mixed
        embed_plates(screen(), path, spec, scheduler=cluster.scheduler_address, **settings)
    assert len(EmbeddingStore.open(path)) == 72
    store = embed_plates(screen(), path, spec, scheduler=cluster.scheduler_address,
                         overwrite=True, **settings)  # fmt: skip
    assert_same_store(store, alone)
    assert {p["min_foreground"] for p in store.provenance["plates"].values()} == {0.5}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_one_token_per_object_on_dask_equals_in_process(cluster, tmp_path):
    plates = [
        make_feature_plate(wells=["A01", "A02", "B01"]),
        make_feature_plate(wells=["A01", "B02"], seed=1),
    ]
    plates[1].name = "other"
    tiny = ModelEmbedder(TinyEmbedder(), "tiny")  # an object, not a spec: sent to the workers
    # model_input: the workers resize the crops as this process does (48 px: a 3 x 3 grid).
    settings = {"objects": "cells", "object_size": 32, "mask": True, "control": "treatment=DMSO",
                "model_input": 48, "device": "cpu", "batch_size": 5, "group_size": 8}  # fmt: skip
    alone = embed_plates(plates, tmp_path / "in-process", tiny, **settings)
    assert alone.provenance["patch_grid"] == [3, 3]
    ticks = []
    store = embed_plates(plates, tmp_path / "dask", tiny, scheduler=cluster.scheduler_address,
                         progress=lambda *tick: ticks.append(tick), **settings)  # fmt: skip
    assert len(store) == 5 * 2 * 4 and ticks[-1] == (10, 10)  # progress counts fields
    assert_same_store(store, alone)


def random_conv() -> torch.nn.Module:
    """A model without fixed weights: every build differs."""
    return torch.nn.Conv2d(2, 4, 16, stride=16)


def test_a_model_without_fixed_weights_is_refused(cluster, tmp_path):
    with pytest.raises(ValueError, match="differs from the one this run started with"):
        embed_plates(screen()[:1], tmp_path / "dask", "module:test_embed_dask:random_conv",
                     scheduler=cluster.scheduler_address, **SETTINGS)  # fmt: skip


def test_embed_command_with_workers_and_bad_requests(tmp_path, capsys, monkeypatch):
    from plate_concepts import _dask
    from plate_concepts.cli import main
    from plate_concepts.plates.omezarr_write import write_ome_zarr_plate

    paths = [write_ome_zarr_plate(plate, tmp_path / f"{plate.name}.ome.zarr") for plate in screen()]
    pd.DataFrame({"well": list(WELLS), "treatment": ["DMSO", "drug", "DMSO"]}).to_csv(
        tmp_path / "map.csv", index=False
    )
    common = [*map(str, paths), "--platemap", str(tmp_path / "map.csv"), "--crop", "32", "--control",
              "treatment=DMSO", "--model", "efficientnet-lite0:mean", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(["embed", *common[:2], str(tmp_path / "here"), *common[2:]]) == 0
    assert main(["embed", *common[:2], str(tmp_path / "dask"), *common[2:], "--workers", "2"]) == 0
    assert "dask: 72 tokens" in capsys.readouterr().out
    here, dask = EmbeddingStore.open(tmp_path / "here"), EmbeddingStore.open(tmp_path / "dask")
    pd.testing.assert_frame_equal(here.obs, dask.obs)
    # A real CNN: this process runs its convolutions on the machine's threads, each worker on
    # one, so float32 sums are added in another order (measured: up to 1e-5 on tokens of ~0.1).
    np.testing.assert_allclose(dask.read(), here.read(), rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(_dask, "CONNECT_TIMEOUT_S", 1)
    assert (
        main(
            [
                "embed",
                *common[:2],
                str(tmp_path / "s"),
                *common[2:],
                "--scheduler",
                "tcp://127.0.0.1:9",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "error: cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'" in err
        and len(err.splitlines()) == 1
    )
    assert (
        main(
            [
                "embed",
                *common[:2],
                str(tmp_path / "s"),
                *common[2:],
                "--workers",
                "2",
                "--scheduler",
                "tcp://x:1",
            ]
        )
        == 2
    )
    assert "give one" in capsys.readouterr().err
