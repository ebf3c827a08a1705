"""Dictionary files: round trips, metadata, damaged and foreign files, atomic writes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import plate_concepts
from plate_concepts.dictionary import (
    ControlWhitening,
    ICFLModule,
    TopKModule,
    TrainingConfig,
    load_dictionary,
    read_dictionary_metadata,
    save_dictionary,
    train,
)
from plate_concepts.dictionary import io as dictionary_io

torch.set_num_threads(1)
DIM = 16


def tokens_and_controls(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(DIM, DIM))
    tokens = (rng.normal(size=(n, DIM)) @ mixing + 3.0).astype(np.float32)
    is_control = np.arange(n) % 3 == 0
    return tokens, is_control


def trained(method: str, whiten: str = "pca"):
    tokens, is_control = tokens_and_controls()
    batches = np.where(np.arange(len(tokens)) % 2 == 0, "a", "b")
    whitening = ControlWhitening(whiten).fit(tokens, is_control, batches)
    model = (ICFLModule(32, DIM, n_rounds=2, per_round=3) if method == "icfl" else TopKModule(32, DIM, k=5, seed=3))
    config = TrainingConfig(steps=15, batch_size=64, lr=1e-2, device="cpu", log_every=5)
    result = train(model, whitening, tokens, config, batches=batches)
    return result, tokens, batches


@pytest.fixture(scope="module", params=["icfl", "topk"])
def fitted(request):
    return trained(request.param)


def file_info(result) -> dict:
    return {"training": result.info(), "store": {"path": "/data/plate.store", "n_tokens": 400}, "control": {"spec": "is_control"}}


def rewrite(path, out, tensors=None, metadata=None) -> None:
    """Copy a dictionary file, replacing its tensors and/or JSON metadata."""
    with safe_open(str(path), "pt") as handle:
        old_tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        old_meta = json.loads(handle.metadata()["plate_concepts"])
    save_file(tensors if tensors is not None else old_tensors, str(out),
              metadata={"plate_concepts": json.dumps(metadata if metadata is not None else old_meta)})


def test_save_then_load_gives_identical_codes(fitted, tmp_path):
    result, tokens, _ = fitted
    path = save_dictionary(tmp_path / "d.safetensors", result.model, result.whitening, file_info(result))
    model, whitening, _ = load_dictionary(path)
    assert type(model) is type(result.model) and not model.training
    x_saved = result.whitening.transform_torch(torch.from_numpy(tokens))
    x_loaded = whitening.transform_torch(torch.from_numpy(tokens))
    assert torch.equal(x_saved, x_loaded)
    before, after = result.model.encode(x_saved), model.encode(x_loaded)
    assert torch.equal(before.indices, after.indices) and torch.equal(before.values, after.values)
    for name, tensor in result.model.state_tensors().items():
        assert torch.equal(tensor, model.state_tensors()[name])


def test_file_holds_float32_tensors_and_json_metadata(fitted, tmp_path):
    result, _, _ = fitted
    path = save_dictionary(tmp_path / "d.safetensors", result.model, result.whitening, file_info(result))
    with safe_open(str(path), "pt") as handle:
        names = set(handle.keys())
        assert all(handle.get_tensor(n).dtype == torch.float32 for n in names)
    expected = {"decoder", "bias", "control_mean", "whitening"}
    if result.model.method == "topk":
        expected |= {"encoder", "encoder_bias"}
    assert names == expected

    meta = read_dictionary_metadata(path)
    assert meta == load_dictionary(path)[2]
    assert meta["method"] == result.model.method and meta["format_version"] == dictionary_io.FORMAT_VERSION
    assert meta["package_version"] == plate_concepts.__version__
    assert meta["hyperparameters"] == result.model.hyperparameters()
    assert meta["whitening"] == result.whitening.metadata()
    assert meta["training"]["steps"] == 15 and meta["training"]["final"]["fvu"] == pytest.approx(result.fvu)
    assert meta["store"] == {"path": "/data/plate.store", "n_tokens": 400}
    assert meta["control"] == {"spec": "is_control"} and meta["n_features"] == 32 and meta["input_dim"] == DIM


def test_pca_batch_transform_round_trips(tmp_path):
    result, tokens, batches = trained("icfl", whiten="pca-batch")
    path = save_dictionary(tmp_path / "d.safetensors", result.model, result.whitening)
    _, whitening, meta = load_dictionary(path)
    assert meta["whitening"]["batches"] == ["a", "b"]
    # batch_mean/batch_scale are stored as float32: equal to float32 rounding
    assert np.allclose(whitening.transform(tokens, batches), result.whitening.transform(tokens, batches), atol=1e-5)


def test_loading_never_unpickles(fitted, tmp_path, monkeypatch):
    result, _, _ = fitted
    path = save_dictionary(tmp_path / "d.safetensors", result.model, result.whitening)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_dictionary(path)


def test_damaged_and_foreign_files_give_clear_errors(fitted, tmp_path):
    result, _, _ = fitted
    path = save_dictionary(tmp_path / "d.safetensors", result.model, result.whitening)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors is not a readable safetensors"):
        load_dictionary(truncated)

    text = tmp_path / "notes.safetensors"
    text.write_text("plate layout notes, not a tensor file\n")
    with pytest.raises(ValueError, match=r"notes\.safetensors is not a readable safetensors"):
        load_dictionary(text)

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_dictionary(tmp_path / "missing.safetensors")

    plain = tmp_path / "plain.safetensors"
    save_file({"decoder": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ValueError, match="not a plate-concepts dictionary"):
        load_dictionary(plain)


def test_inconsistent_files_give_clear_errors(fitted, tmp_path):
    result, _, _ = fitted
    path = save_dictionary(tmp_path / "d.safetensors", result.model, result.whitening)
    meta = read_dictionary_metadata(path)
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118

    bad = tmp_path / "bad.safetensors"
    rewrite(path, bad, metadata={**meta, "method": "kmeans"})
    with pytest.raises(ValueError, match="unknown dictionary method 'kmeans'"):
        load_dictionary(bad)

    rewrite(path, bad, tensors={k: v for k, v in tensors.items() if k != "decoder"})
    with pytest.raises(ValueError, match=r"\['decoder'\].*missing"):
        load_dictionary(bad)

    rewrite(path, bad, metadata={**meta, "hyperparameters": {**meta["hyperparameters"], "n_features": 40}})
    with pytest.raises(ValueError, match=r"'decoder' has shape \(32, 16\).*\(40, 16\)"):
        load_dictionary(bad)

    rewrite(path, bad, tensors={**tensors, "whitening": tensors["whitening"][:, :8].contiguous()})
    with pytest.raises(ValueError, match="whitening"):
        load_dictionary(bad)

    rewrite(path, bad, metadata={**meta, "format_version": 99})
    with pytest.raises(ValueError, match="format version 99"):
        load_dictionary(bad)


def test_save_is_atomic_and_checks_info(fitted, tmp_path, monkeypatch):
    result, _, _ = fitted
    path = save_dictionary(tmp_path / "d.safetensors", result.model, result.whitening)
    original = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dictionary_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_dictionary(path, result.model, result.whitening)
    assert path.read_bytes() == original and [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]
    monkeypatch.undo()

    with pytest.raises(ValueError, match="reserved"):
        save_dictionary(path, result.model, result.whitening, {"method": "other"})
