"""The streaming trainer and the estimators: determinism, resume, cancel, stores, errors."""

from __future__ import annotations

import dataclasses
import inspect
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import NotFittedError

from plate_concepts.dictionary import (
    ICFL,
    METHODS,
    ControlWhitening,
    FitDiverged,
    FitMessage,
    ICFLModule,
    ICFLSettings,
    TopKModule,
    TopKSAE,
    TrainingConfig,
    TrainingEvent,
    fit_dictionary,
    iter_train,
    load_dictionary,
    method_class,
    recorded_batch_column,
    resolve_device,
    train,
)
from plate_concepts.dictionary.checkpoints import read_checkpoint
from plate_concepts.dictionary.settings import setting_help
from plate_concepts.dictionary.whitening import RankDeficientWarning
from plate_concepts.embeddings.store import EmbeddingStore
from plate_concepts.plates.platemap import ControlSpec

torch.set_num_threads(1)

DIM, N_ATOMS = 16, 24


def planted(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens = 2 random planted unit atoms with positive weights + small noise; the first fifth
    are controls (noise only)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(N_ATOMS, DIM))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    tokens = rng.normal(scale=0.02, size=(n, DIM))
    is_control = np.zeros(n, dtype=bool)
    is_control[: n // 5] = True
    for i in range(n // 5, n):
        tokens[i] += (rng.random(2) + 0.5) @ atoms[rng.choice(N_ATOMS, 2, replace=False)]
    return tokens.astype(np.float32), is_control, atoms


def make_store(path, tokens: np.ndarray, is_control: np.ndarray | None, chunk_rows: int = 50, **columns) -> EmbeddingStore:
    n = len(tokens)
    obs = pd.DataFrame({
        "plate": "P1", "well": [f"B{1 + i % 12:02d}" for i in range(n)], "field": 1,
        "crop_y": np.arange(n), "crop_x": 0, "crop_size": 64, **columns,
    })
    if is_control is not None:
        obs["is_control"] = is_control
    store = EmbeddingStore.create(path, dim=tokens.shape[1], chunk_rows=chunk_rows)
    store.append(tokens, obs)
    return EmbeddingStore.open(path)


def new_model(method: str, dim: int = DIM, seed: int = 0):
    if method == "icfl":  # frequent redraws exercise the generator and the Adam reset
        return ICFLModule(32, dim, n_rounds=2, per_round=2, resample_every=4, resample_threshold=0.4, seed=seed)
    return TopKModule(32, dim, k=4, dead_window_tokens=256, seed=seed)


def fitted_whitening(tokens: np.ndarray, is_control: np.ndarray) -> ControlWhitening:
    return ControlWhitening("pca").fit(tokens, is_control)


def state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


CONFIG = {"steps": 24, "batch_size": 64, "lr": 1e-2, "warmup_steps": 5, "device": "cpu",
          "log_every": 8}


@pytest.fixture(scope="module")
def data():
    return planted()


# ---------------------------------------------------------------------- determinism, resume, cancel
@pytest.mark.parametrize("method", ["icfl", "topk"])
def test_same_seed_gives_identical_runs_and_another_seed_differs(data, method):
    tokens, is_control, _ = data
    runs = []
    for seed in (0, 0, 1):
        result = train(new_model(method), ControlWhitening("pca"), tokens, TrainingConfig(**CONFIG, seed=seed), is_control=is_control)
        runs.append(state(result.model))
    assert_same_state(runs[0], runs[1])
    assert not torch.equal(runs[0]["decoder"], runs[2]["decoder"])


@pytest.mark.parametrize("method,source", [("icfl", "array"), ("topk", "array"), ("icfl", "store")])
def test_resume_from_a_cancelled_run_equals_an_uninterrupted_run(data, tmp_path, method, source):
    tokens, is_control, _ = data
    data_in = make_store(tmp_path / "store", tokens, is_control) if source == "store" else tokens
    whitening = fitted_whitening(tokens, is_control)
    # 600 tokens / 64 = 9 batches per epoch: 24 steps cross two epoch boundaries, the cut at
    # step 11 falls inside epoch 1.
    full = train(new_model(method), whitening, data_in, TrainingConfig(**CONFIG))

    cancel = threading.Event()
    checkpoint = tmp_path / "run.ckpt.safetensors"

    def stop_at_11(event: TrainingEvent) -> None:
        if event.step == 11:
            cancel.set()

    cut = train(
        new_model(method), whitening, data_in, TrainingConfig(**{**CONFIG, "log_every": 1}),
        checkpoint_path=checkpoint, callback=stop_at_11, cancel=cancel,
    )
    assert cut.cancelled and cut.steps == 11 and checkpoint.is_file()
    assert read_checkpoint(checkpoint)[1]["positions"] == [[1, 2]]

    resumed = train(new_model(method), ControlWhitening("pca"), data_in, TrainingConfig(**CONFIG), resume_from=checkpoint)
    assert not resumed.cancelled and resumed.steps == 24 and resumed.tokens_seen == full.tokens_seen
    assert_same_state(state(full.model), state(resumed.model))  # tokens_since_fired included


def test_cancel_leaves_a_usable_model_and_a_checkpoint(data, tmp_path):
    tokens, is_control, _ = data
    whitening = fitted_whitening(tokens, is_control)
    polls = iter(range(100))
    result = train(
        new_model("icfl"), whitening, tokens,
        TrainingConfig(**CONFIG), checkpoint_path=tmp_path / "c.safetensors",
        cancel=lambda: next(polls) >= 5,  # a callable works as well as an Event
    )
    assert result.cancelled and result.steps == 5 and result.events[-1].step == 5
    x = whitening.transform_torch(torch.from_numpy(tokens[:50]))
    codes = result.model.encode(x)
    assert torch.isfinite(result.model.decode(codes)).all()
    assert torch.allclose(result.model.decoder.norm(dim=1), torch.ones(32), atol=1e-5)
    assert read_checkpoint(tmp_path / "c.safetensors")[1]["step"] == 5

    already = threading.Event()
    already.set()
    nothing = train(new_model("topk"), whitening, tokens, TrainingConfig(**CONFIG), cancel=already)
    assert nothing.cancelled and nothing.steps == 0
    assert torch.isfinite(nothing.model.decode(nothing.model.encode(x))).all()


def test_iter_train_yields_events_and_returns_the_result(data):
    tokens, is_control, _ = data
    generator = iter_train(new_model("topk"), ControlWhitening("pca"), tokens,
                           TrainingConfig(**{**CONFIG, "steps": 20}), is_control=is_control)
    events = []
    with pytest.raises(StopIteration) as stop:
        while True:
            events.append(next(generator))
    result = stop.value.value
    assert [e.step for e in events] == [8, 16, 20]
    assert all(e.total_steps == 20 and e.tokens_per_s > 0 and 0 <= e.dead_fraction <= 1 for e in events)
    assert result.steps == 20 and result.tokens_seen == 20 * 64 and result.events == events
    assert result.fvu == pytest.approx(events[-1].fvu)


def test_training_recovers_planted_atoms(data):
    tokens, is_control, atoms = data
    result = train(ICFLModule(32, DIM, n_rounds=1, per_round=2), ControlWhitening("pca"), tokens,
                   TrainingConfig(steps=200, batch_size=128, device="cpu", log_every=50), is_control=is_control)
    whitening = result.whitening
    planted_dirs = torch.nn.functional.normalize(
        whitening.transform_torch(torch.from_numpy(atoms).float() + torch.from_numpy(whitening.control_mean_).float()), dim=1
    )
    best = (planted_dirs @ torch.nn.functional.normalize(result.model.decoder.detach(), dim=1).T).max(dim=1).values
    assert (best > 0.9).float().mean() >= 0.9
    assert result.events[-1].fvu < result.events[0].fvu


# ---------------------------------------------------------------------- stores
class SpyStore:
    """An EmbeddingStore that records how it is read."""

    def __init__(self, store: EmbeddingStore) -> None:
        self._store = store
        self.largest_read = 0
        self.iter_calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self) -> int:
        return len(self._store)

    def read(self, rows=slice(None), **kwargs):
        out = self._store.read(rows, **kwargs)
        self.largest_read = max(self.largest_read, len(out))
        return out

    def iter_batches(self, batch_size, **kwargs):
        self.iter_calls.append({"batch_size": batch_size, **kwargs})
        for item in self._store.iter_batches(batch_size, **kwargs):
            x = item[0] if isinstance(item, tuple) else item
            self.largest_read = max(self.largest_read, len(x))
            yield item


def test_training_from_a_store_streams_batches_and_fits_whitening_on_obs_controls(data, tmp_path):
    tokens, is_control, _ = data
    spy = SpyStore(make_store(tmp_path / "s", tokens, is_control))
    result = train(new_model("icfl"), ControlWhitening("pca"), spy, TrainingConfig(**CONFIG))
    # Whitening from obs['is_control'], read through the store, equals a fit on the controls.
    reference = fitted_whitening(tokens, is_control)
    assert np.allclose(result.whitening.whitening_, reference.whitening_)
    assert np.allclose(result.whitening.control_mean_, reference.control_mean_)
    # Tokens only ever come through bounded batches, never a whole-store read.
    assert spy.largest_read <= max(64, int(is_control.sum()))
    training_calls = [c for c in spy.iter_calls if c.get("shuffle")]
    assert training_calls and all(c["batch_size"] == 64 and c["epochs"] == 1 for c in training_calls)
    assert np.isfinite(result.fvu) and result.steps == 24


def test_store_without_controls_column_gives_a_clear_error(data, tmp_path):
    tokens, _, _ = data
    store = make_store(tmp_path / "s", tokens, None)
    with pytest.raises(ValueError, match="control column 'is_control' not found.*it was embedded without a control spec"):
        train(new_model("icfl"), ControlWhitening("pca"), store, TrainingConfig(**CONFIG))


def test_pca_batch_whitening_trains_from_a_store_column(data, tmp_path):
    tokens, is_control, _ = data
    labels = np.where(np.arange(len(tokens)) % 2 == 0, "exp1", "exp2")
    store = make_store(tmp_path / "s", tokens, is_control, experiment=labels)
    result = train(new_model("topk"), ControlWhitening("pca-batch"), store, TrainingConfig(**CONFIG), batches="experiment")
    assert result.whitening.batch_names_ == ["exp1", "exp2"] and np.isfinite(result.fvu)
    # Columns as the imported table named them (the Metadata_ prefix, another case) find the
    # store's columns, for the batches and for a column of booleans marking the controls.
    from plate_concepts.dictionary.controls import batch_values, control_mask

    np.testing.assert_array_equal(batch_values(store, "Metadata_Experiment"), labels)
    np.testing.assert_array_equal(control_mask(store, "Metadata_is_control"), is_control)


def test_fit_dictionary_writes_a_loadable_file_and_resumes(data, tmp_path):
    tokens, is_control, _ = data
    treatment = np.where(is_control, "DMSO", "drug")
    make_store(tmp_path / "s", tokens, None, treatment=treatment)
    out = tmp_path / "dict.safetensors"
    seen: list[TrainingEvent] = []
    common = {"control": "treatment=DMSO", "n_features": 32, "n_rounds": 2, "per_round": 2,
              "steps": 12, "batch_size": 64, "lr": 1e-2, "device": "cpu", "log_every": 4,
              "checkpoint_every": 5}
    result = fit_dictionary(tmp_path / "s", out, "icfl", progress=seen.append, keep_checkpoint=True, **common)
    model, _whitening, meta = load_dictionary(out)
    steps = [e.step for e in seen if isinstance(e, TrainingEvent)]  # and the whitening chosen, first
    assert meta["method"] == "icfl" and meta["training"]["steps"] == 12 and steps == [4, 8, 12]
    assert meta["store"]["n_tokens"] == 600 and meta["control"] == {
        "spec": "treatment=DMSO", "n_controls": int(is_control.sum()), "batch_column": None}
    assert torch.equal(model.decoder, result.model_.decoder.cpu())
    checkpoint = tmp_path / "dict.ckpt.safetensors"
    assert read_checkpoint(checkpoint)[1]["step"] == 12  # kept, as asked

    longer = fit_dictionary(tmp_path / "s", tmp_path / "more.safetensors", "icfl", resume=checkpoint,
                            checkpoint_path=tmp_path / "more.ckpt", **{**common, "steps": 16})
    assert longer.training_["steps"] == 16 and not (tmp_path / "more.ckpt").exists()
    with pytest.raises(ValueError, match=r"k \(--k\) is a setting of TopK SAE, not of ICFL"):
        fit_dictionary(tmp_path / "s", out, "icfl", k=3, **common)
    with pytest.raises(ValueError, match="control spec 'treatment=water'.*no row"):
        fit_dictionary(tmp_path / "s", tmp_path / "water.safetensors", "topk", control="treatment=water",
                       steps=2, device="cpu")
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        fit_dictionary(tmp_path / "s", tmp_path / "other.safetensors", "icfl", resume=True, **common)


# ---------------------------------------------------------------------- errors and settings
def test_trainer_errors_are_clear(data, tmp_path):
    tokens, is_control, _ = data
    with pytest.raises(ValueError, match="is_control is required"):
        train(new_model("icfl"), ControlWhitening("pca"), tokens, TrainingConfig(**CONFIG))
    with pytest.raises(ValueError, match="no control tokens"):
        train(new_model("icfl"), ControlWhitening("pca"), tokens, TrainingConfig(**CONFIG), is_control=np.zeros(600, bool))
    with pytest.raises(ValueError, match="dim=8"):
        train(new_model("icfl", dim=8), fitted_whitening(tokens, is_control), tokens, TrainingConfig(**CONFIG))
    bad = tokens.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        train(new_model("icfl"), fitted_whitening(tokens, is_control), bad, TrainingConfig(**CONFIG))
    checkpoint = tmp_path / "c.safetensors"
    train(new_model("icfl"), fitted_whitening(tokens, is_control), tokens, TrainingConfig(**CONFIG),
          checkpoint_path=checkpoint, keep_checkpoint=True)
    with pytest.raises(ValueError, match="not this 'topk' model"):
        train(new_model("topk"), ControlWhitening(), tokens, TrainingConfig(**CONFIG), resume_from=checkpoint)
    with pytest.raises(ValueError, match=r"of a fit with other settings \(n_features 32 there, 16 now\): resume it with its"):
        train(ICFLModule(16, DIM, n_rounds=2, per_round=2, resample_every=4, resample_threshold=0.4),
              ControlWhitening(), tokens, TrainingConfig(**CONFIG), resume_from=checkpoint)
    with pytest.raises(ValueError, match="same settings"):  # another seed = another data stream
        train(new_model("icfl"), ControlWhitening(), tokens, TrainingConfig(**CONFIG, seed=3), resume_from=checkpoint)
    with pytest.raises(ValueError, match="n_tokens=600"):
        train(new_model("icfl"), ControlWhitening(), tokens[:300], TrainingConfig(**CONFIG), resume_from=checkpoint)
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainingConfig(lr=-1.0)


def test_small_data_shrinks_the_batch_with_a_warning(data):
    tokens, is_control, _ = data
    with pytest.warns(RuntimeWarning, match="using 600"):
        result = train(new_model("topk"), ControlWhitening(), tokens, TrainingConfig(**{**CONFIG, "batch_size": 4096, "steps": 2}), is_control=is_control)
    assert result.batch_size == 600


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------------- estimators
@pytest.fixture(scope="module")
def estimators(data):
    tokens, is_control, _ = data
    options = {"steps": 20, "batch_size": 64, "lr": 1e-2, "device": "cpu", "log_every": 10}
    return (
        ICFL(n_features=32, n_rounds=2, per_round=2, **options).fit(tokens, is_control=is_control),
        TopKSAE(n_features=32, k=4, **options).fit(tokens, is_control=is_control),
    )


def test_estimator_transform_equals_preprocess_then_encode(data, estimators):
    tokens, _, _ = data
    for estimator in estimators:
        codes = estimator.transform(tokens)
        direct = estimator.encode(estimator.preprocess(tokens))
        assert torch.equal(codes.dense(), direct.dense())
        assert np.allclose(estimator.reconstruct(tokens), estimator.decode(direct), atol=1e-6)
        assert np.allclose(estimator.preprocess(tokens), estimator.whitening_.transform(tokens), atol=1e-5)
        assert estimator.components_.shape == (32, DIM)
        assert np.allclose(np.linalg.norm(estimator.components_, axis=1), 1, atol=1e-5)
        assert estimator.training_["steps"] == 20 and estimator.n_features_in_ == DIM


def test_estimator_save_load_returns_the_right_class(estimators, data, tmp_path):
    tokens, _, _ = data
    for estimator in estimators:
        path = estimator.save(tmp_path / f"{estimator.method}.safetensors")
        loaded = ICFL.load(path)  # whichever class is asked, the file decides
        assert type(loaded) is type(estimator) and loaded.get_params() == {**estimator.get_params(), "device": "cpu"}
        assert torch.equal(loaded.transform(tokens).dense(), estimator.transform(tokens).dense())
        assert loaded.training_ == estimator.training_


def test_estimator_errors(data, estimators):
    tokens, _is_control, _ = data
    icfl, _ = estimators
    with pytest.raises(NotFittedError):
        ICFL(n_features=32).encode(np.zeros((2, DIM), np.float32))
    with pytest.raises(NotFittedError):
        TopKSAE(n_features=32).transform(tokens)
    with pytest.raises(ValueError, match="12 columns, expected 16"):
        icfl.transform(tokens[:, :12])
    with pytest.raises(ValueError, match="12 columns, expected 16"):
        icfl.encode(tokens[:, :12])
    bad = tokens[:5].copy()
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match="row 2"):
        icfl.transform(bad)
    with pytest.raises(ValueError, match="row 2"):
        ICFL(n_features=32, steps=2).fit(bad, is_control=np.ones(5, bool))
    with pytest.raises(ValueError, match="no control tokens"):
        ICFL(n_features=32, steps=2).fit(tokens, is_control=np.zeros(len(tokens), bool))


# ---------------------------------------------------------------------- the one fit path
def test_fit_iter_yields_progress_records_provenance_and_equals_fit(data, tmp_path):
    tokens, is_control, _ = data
    store = make_store(tmp_path / "s", tokens, None, treatment=np.where(is_control, "DMSO", "drug"))
    options = {"n_features": 32, "n_rounds": 2, "per_round": 2, "steps": 12, "batch_size": 64,
               "lr": 1e-2, "device": "cpu", "log_every": 4}
    generator = ICFL(**options).fit_iter(store, "treatment=DMSO")
    events = []
    with pytest.raises(StopIteration) as stop:
        while True:
            events.append(next(generator))
    fitted = stop.value.value
    assert events[0] == FitMessage(fitted.whitening_.describe(), None)  # the whitening chosen, first
    assert isinstance(fitted, ICFL) and [e.step for e in events[1:]] == [4, 8, 12]
    assert fitted.provenance_ == {
        "store": {"path": str((tmp_path / "s").resolve()), "n_tokens": 600, "dim": DIM},
        "control": {"spec": "treatment=DMSO", "n_controls": int(is_control.sum()), "batch_column": None},
    }
    again = ICFL(**options).fit(store, "treatment=DMSO")  # fit = fit_iter run to the end
    assert torch.equal(again.model_.decoder, fitted.model_.decoder)
    loaded = ICFL.load(fitted.save(tmp_path / "d.safetensors"))
    assert loaded.provenance_ == fitted.provenance_  # one layout, whoever fitted it


def test_a_small_store_gets_sizes_from_its_size_and_more_features_than_tokens_are_refused(data):
    tokens, is_control, _ = data
    generator = ICFL().fit_iter(tokens, is_control)
    note = next(generator)  # said before any work is done
    generator.close()
    assert isinstance(note, FitMessage) and note.text == (
        "small store (600 tokens): using 64 features, 128 tokens per step, 938 steps "
        "(--features, --batch-size, --steps to choose)"
    )
    sized = ICFLSettings().resolved(600)
    assert (sized.n_features, sized.batch_size, sized.steps, sized.log_every) == (64, 128, 938, 9)
    big = ICFLSettings().resolved(40_000_000)  # a real store: the full defaults, no note
    assert (big.n_features, big.batch_size, big.steps) == (8192, 4096, 2000)
    assert ICFLSettings().size_note(40_000_000) is None
    with pytest.raises(ValueError, match="1000 features for 600 tokens: more features than tokens"):
        next(ICFL(n_features=1000, steps=1).fit_iter(tokens, is_control))
    forced = ICFL(n_features=1000, n_rounds=1, per_round=2, steps=1, batch_size=64, device="cpu")
    assert forced.fit(tokens, is_control, force=True).model_.n_features == 1000


def test_a_rank_deficient_whitening_is_one_message_not_a_warning(data):
    import warnings

    tokens, _, _ = data
    few = np.arange(len(tokens)) < 10  # 10 controls in 16 dimensions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = TopKSAE(n_features=32, k=4, steps=2, batch_size=64, device="cpu", shrinkage=None)
        messages = [e for e in exact.fit_iter(tokens, few) if isinstance(e, FitMessage) and e.category is not None]
    assert len(messages) == 1 and messages[0].category is RankDeficientWarning
    assert "vary along only 9 of the 16" in messages[0].text and "--shrinkage auto" in messages[0].text


def test_checkpoints_come_by_time_and_a_finished_fit_removes_its_own(data, tmp_path):
    tokens, is_control, _ = data
    checkpoint = tmp_path / "c.ckpt.safetensors"
    options = {"n_features": 32, "k": 4, "steps": 6, "batch_size": 64, "device": "cpu",
               "log_every": 1}
    seen = []
    for event in TopKSAE(**options, checkpoint_minutes=1e-9).fit_iter(tokens, is_control, checkpoint_path=checkpoint):
        if getattr(event, "step", None) == 4:  # a checkpoint is written as soon as it is due, between steps
            seen.append(read_checkpoint(checkpoint)[1]["step"])
    assert seen == [3] and not checkpoint.exists()
    out = tmp_path / "c.safetensors"  # its checkpoint lies beside it: c.ckpt.safetensors
    TopKSAE(**options).fit(tokens, is_control, out_path=out, keep_checkpoint=True)
    assert read_checkpoint(checkpoint)[1]["step"] == 6 and oct(checkpoint.stat().st_mode & 0o777) == oct(
        0o666 & ~_umask())
    with pytest.raises(FileExistsError, match="checkpoint kept of a finished fit"):
        next(TopKSAE(**options).fit_iter(tokens, is_control, out_path=out, overwrite=True))


def test_cancelling_while_the_whitening_is_fitted_trains_nothing_and_writes_nothing(data, tmp_path):
    tokens, is_control, _ = data
    store = make_store(tmp_path / "s", tokens, is_control)
    cancel = threading.Event()
    cancel.set()
    out = tmp_path / "d.safetensors"
    with pytest.raises(InterruptedError, match="nothing was trained"):
        fit_dictionary(tmp_path / "s", out, "icfl", n_features=32, steps=5, batch_size=64, device="cpu", cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert len(store) == 600


def test_a_diverging_fit_is_one_clear_error(data):
    tokens, is_control, _ = data
    with pytest.raises(FitDiverged, match=r"diverged at step \d+ .*learning rate 1e\+30 is too high") as error:
        TopKSAE(n_features=32, k=4, steps=20, batch_size=64, lr=1e30, device="cpu").fit(tokens, is_control)
    assert isinstance(error.value, ValueError) and isinstance(error.value, FloatingPointError)


def test_settings_are_declared_once_and_read_by_the_estimators():
    assert ICFL().get_params() == {f.name: f.default for f in dataclasses.fields(ICFLSettings)}
    assert TopKSAE().get_params()["k"] == inspect.signature(TopKModule).parameters["k"].default
    assert ICFLSettings().n_rounds == inspect.signature(ICFLModule).parameters["n_rounds"].default
    assert set(ICFLSettings.model_fields()) == {"n_rounds", "per_round", "resample_every", "resample_threshold", "use_gram"}
    assert METHODS == {"icfl": ICFL, "topk": TopKSAE} and method_class("topk").module_class is TopKModule
    with pytest.raises(ValueError, match="unknown dictionary method 'pca'"):
        method_class("pca")
    for bad, match in (({"steps": -1}, "steps must be >= 0"),
                       ({"lr": 0.0}, "lr must be a positive"),
                       ({"whiten": "zca"}, "whiten must be one of"),
                       ({"shrinkage": 2.0}, "shrinkage"),
                       ({"batch_size": 1.5}, "batch_size must be an integer")):
        with pytest.raises(ValueError, match=match):
            ICFL(**bad).settings()
    with pytest.raises(TypeError, match="has no parameter"):
        ICFL(k=3)
    assert "n_rounds\n        ICFL: pursuit rounds J. (default: 20)" in ICFL.__doc__


def test_the_learning_rate_help_is_each_models_own_rule():
    """The lr help states each method's default_lr from the constants it computes with, so a
    changed constant changes the help (it was a copy of the numbers)."""
    from plate_concepts.dictionary import icfl, topk

    help_text = setting_help(next(f for f in dataclasses.fields(ICFLSettings) if f.name == "lr"))
    for estimator in METHODS.values():
        assert estimator.module_class.lr_rule and estimator.module_class.lr_rule in help_text
    assert ICFLModule.lr_rule == f"{icfl.LR_TURN:g}/sqrt(dim), at most {icfl.LR_MAX:g}"
    assert ICFLModule(8, 64).default_lr() == pytest.approx(min(icfl.LR_MAX, icfl.LR_TURN / 8))
    assert TopKModule.lr_rule == f"{topk.BASE_LR:g} x sqrt({topk.BASE_LR_FEATURES}/M)"
    assert TopKModule(topk.BASE_LR_FEATURES // 4, 8, k=2).default_lr() == pytest.approx(2 * topk.BASE_LR)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_files_of_every_earlier_layout_give_the_same_provenance(data, tmp_path):
    """Panel fits kept the store, the control spec and the batch column inside ``training``;
    command-line fits at the top level. Both load into one layout."""
    from plate_concepts.dictionary import save_dictionary

    tokens, is_control, _ = data
    batches = np.where(np.arange(len(tokens)) % 2 == 0, 1.0, 2.0)
    fitted = ICFL(32, n_rounds=2, per_round=2, steps=4, batch_size=64, device="cpu", whiten="pca-batch")
    fitted.fit(tokens, is_control, batches)
    store = {"path": "/data/s.store", "n_tokens": 600, "dim": DIM}
    panel = {**fitted.training_, "store": store, "control": "treatment=DMSO", "batch_column": "batch"}
    save_dictionary(tmp_path / "panel.safetensors", fitted.model_, fitted.whitening_, {"training": panel})
    command_line = {"training": fitted.training_, "store": store,
                    "control": {"spec": "treatment=DMSO", "n_controls": 120, "batch_column": "batch"}}
    save_dictionary(tmp_path / "cli.safetensors", fitted.model_, fitted.whitening_, command_line)
    for name, n_controls in (("panel", None), ("cli", 120)):
        loaded = ICFL.load(tmp_path / f"{name}.safetensors")
        assert loaded.provenance_ == {"store": store, "control": {
            "spec": "treatment=DMSO", "n_controls": n_controls, "batch_column": "batch"}}
        assert recorded_batch_column(loaded) == "batch" and loaded.training_ == fitted.training_
    assert recorded_batch_column(fitted) is None  # fitted on labels given as an array


def test_controls_given_as_numbers_are_recorded_as_the_spec_a_user_would_type(data, tmp_path):
    """A ControlSpec of numbers (a dose column read as floats) selects the controls as text and is
    recorded so (this failed after training: the spec could not be written as text)."""
    tokens, is_control, _ = data
    labels = pd.DataFrame({"dose": np.where(is_control, 0.0, 1.5)})
    estimator = ICFL(16, n_rounds=1, per_round=2, steps=5, batch_size=64, device="cpu")
    estimator.fit(tokens, is_control=ControlSpec("dose", [0.0]), labels=labels)
    assert estimator.provenance_["control"]["spec"] == "dose=0"
    assert estimator.provenance_["control"]["n_controls"] == int(is_control.sum())
    loaded = ICFL.load(estimator.save(tmp_path / "dose.safetensors"))
    assert loaded.provenance_["control"]["spec"] == "dose=0"
