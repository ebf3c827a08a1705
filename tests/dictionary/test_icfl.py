"""ICFLModule: pursuit equivalence and known answers, code invariants, learning planted atoms,
redraws of near-duplicate features, the offset model and files saved before it was recorded."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from plate_concepts.dictionary import ICFL, ControlWhitening, icfl, load_dictionary, save_dictionary
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.icfl import ICFLModule
from plate_concepts.dictionary.io import METADATA_KEY


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; small problems gain nothing from threads
    yield
    torch.set_num_threads(previous)


def _tokens(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize(("n_features", "seed"), [(256, 0), (300, 1), (4096, 2)])
def test_gram_pursuit_gives_the_plain_pursuits_codes(
    n_features: int, seed: int, monkeypatch
) -> None:
    # Small Gram blocks: several column blocks, the last one padded (300 = 2 x 128 + 44).
    monkeypatch.setattr(icfl, "_GRAM_BLOCK_BYTES", 4 * n_features * 128)
    monkeypatch.setattr(icfl, "_GRAM_MIN_WIDTH", 1)
    module = ICFLModule(n_features, 64, n_rounds=4, per_round=3, seed=seed)
    with torch.no_grad():
        module.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    x = _tokens(400, 64, seed + 10)
    plain, gram = module.pursuit_plain(x), module.pursuit_gram(x)
    assert module._gram_blocks().shape[0] > 1
    assert torch.equal(plain.indices, gram.indices)
    torch.testing.assert_close(plain.values, gram.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(module.gram(), module.decoder @ module.decoder.T)


def test_codes_have_at_most_J_times_L_slots_and_no_repeated_active_index() -> None:
    # 12 features in 6 dimensions over 5 rounds: features are necessarily picked again.
    module = ICFLModule(12, 6, n_rounds=5, per_round=3, seed=3)
    codes = module.encode(_tokens(200, 6, 4))
    assert codes.indices.shape == (200, 15) and codes.n_features == 12
    for row_indices, row_active in zip(codes.indices, codes.active()):
        active = row_indices[row_active]
        assert len(active) == len(set(active.tolist()))
    assert (codes.active().sum(dim=1) <= 12).all()
    assert (codes.l0() == codes.active().sum(dim=1)).all()


def test_repeated_picks_add_up_into_one_slot() -> None:
    merged = icfl._merge_repeats(
        torch.tensor([[3, 1, 3, 0, 1]]), torch.tensor([[1.0, 2.0, 0.5, 0.0, -2.0]]), 5
    )
    assert merged.indices.tolist() == [[0, 1, 3, 0, 0]]
    assert merged.values.tolist() == [[0.0, 0.0, 1.5, 0.0, 0.0]]  # 1 picked twice, cancels to 0


def test_a_scaled_atom_is_recovered_exactly() -> None:
    module = ICFLModule(64, 16, n_rounds=1, per_round=1, seed=5)
    atoms = torch.tensor([3, 17, 40])
    coefficients = torch.tensor([2.5, 0.3, 7.0])
    x = coefficients.unsqueeze(1) * module.decoder.detach()[atoms]
    codes = module.encode(x)
    assert codes.indices[:, 0].tolist() == atoms.tolist()
    torch.testing.assert_close(codes.values[:, 0], coefficients, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(module.decode(codes), x, atol=1e-5, rtol=0.0)


def test_more_rounds_reconstruct_better() -> None:
    x = _tokens(300, 32, 6)
    errors = []
    for rounds in range(1, 6):
        module = ICFLModule(128, 32, n_rounds=rounds, per_round=2, seed=7)
        with torch.no_grad():
            errors.append(float((x - module.decode(module.encode(x))).pow(2).sum(dim=1).mean()))
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.5 * errors[0]


@pytest.mark.parametrize("offset", ["zero", "learned"])
def test_decode_is_the_dense_product_and_differentiable(offset: str) -> None:
    module = ICFLModule(50, 8, n_rounds=2, per_round=2, seed=8, offset=offset)
    with torch.no_grad():
        module.bias.fill_(0.25)
    codes = module.encode(_tokens(20, 8, 9))
    x_hat = module.decode(codes)
    torch.testing.assert_close(x_hat, codes.dense() @ module.decoder + module.bias)
    x_hat.sum().backward()
    used = torch.zeros(50, dtype=torch.bool)
    used[codes.indices[codes.active()]] = True
    if offset == "learned":
        assert module.bias.grad is not None and torch.equal(module.bias.grad, torch.full((8,), 20.0))
    else:  # a fixed offset is no trained parameter
        assert module.bias.grad is None and not module.bias.requires_grad
    assert (module.decoder.grad[used].abs().sum(dim=1) > 0).all()
    assert (module.decoder.grad[~used] == 0).all()


def test_training_loss_reports_stats_and_marks_fired_features() -> None:
    module = ICFLModule(40, 8, n_rounds=1, per_round=2, seed=10)
    module.tokens_since_fired.fill_(100)
    x = _tokens(30, 8, 11)
    loss, codes, stats = module.training_loss(x)
    expected = (x - module.decode(codes)).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    assert {"fvu", "cosine", "l0", "loss"} <= set(stats) and stats["l0"] <= 2
    fired = torch.zeros(40, dtype=torch.bool)
    fired[codes.indices[codes.active()]] = True
    assert (module.tokens_since_fired[fired] == 0).all()
    assert (module.tokens_since_fired[~fired] == 130).all()


def test_training_recovers_planted_atoms() -> None:
    """x = D* z* + noise with 48 unit-norm atoms in 32 dimensions, 3 active per token."""
    generator = torch.Generator().manual_seed(0)
    n, dim, n_atoms = 20_000, 32, 48
    planted = F.normalize(torch.randn(n_atoms, dim, generator=generator), dim=1)
    active = torch.rand(n, n_atoms, generator=generator).argsort(dim=1)[:, :3]
    weights = 0.5 + torch.rand(n, 3, generator=generator)
    x = torch.einsum("nk,nkd->nd", weights, planted[active]) + 0.01 * torch.randn(
        n, dim, generator=generator
    )

    module = ICFLModule(64, dim, n_rounds=3, per_round=1, resample_every=50, seed=0)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for step in range(1, 301):
        batch = x[torch.randint(0, n, (512,), generator=generator)]
        loss, _, stats = module.training_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_optimizer_step(step, generator)

    torch.testing.assert_close(module.decoder.detach().norm(dim=1), torch.ones(64))
    best_cosine = (planted @ module.decoder.detach().T).max(dim=1).values
    assert (best_cosine >= 0.9).float().mean() >= 0.8, best_cosine
    assert stats["fvu"] < 0.1


def test_near_duplicate_features_are_redrawn(monkeypatch) -> None:
    monkeypatch.setattr(icfl, "_RESAMPLE_BLOCK", 4)  # duplicates sit in different blocks
    module = ICFLModule(20, 32, resample_every=10, resample_threshold=0.9, seed=12)
    with torch.no_grad():
        module.decoder[9] = module.decoder[2] + 0.05 * module.decoder[3]  # cosine ~0.999 with 2
        module.decoder[13] = -2.0 * module.decoder[2]  # anti-parallel: not a duplicate
        module.decoder[17] = 3.0 * module.decoder[9]  # parallel to 9 (and near 2)
    module.tokens_since_fired.fill_(7)
    before = F.normalize(module.decoder.detach().clone(), dim=1)

    module.after_optimizer_step(9)  # not a resampling step: only renormalised
    assert module.last_resampled.numel() == 0
    torch.testing.assert_close(module.decoder.detach(), before)

    module.after_optimizer_step(10, torch.Generator().manual_seed(0))
    assert module.last_resampled.tolist() == [9, 17]
    after = module.decoder.detach()
    keep = torch.ones(20, dtype=torch.bool)
    keep[[9, 17]] = False
    torch.testing.assert_close(after[keep], before[keep])
    torch.testing.assert_close(after.norm(dim=1), torch.ones(20))
    cosine = after @ after.T - 2 * torch.eye(20)
    assert cosine.max() < 0.9
    assert module.tokens_since_fired[[9, 17]].tolist() == [0, 0]
    # The Gram cache follows the decoder.
    torch.testing.assert_close(module.gram(), after @ after.T)


def test_hyperparameters_rebuild_the_module() -> None:
    module = ICFLModule(
        30,
        8,
        n_rounds=3,
        per_round=2,
        resample_every=7,
        resample_threshold=0.8,
        use_gram=False,
        seed=4,
        offset="learned",
    )
    rebuilt = ICFLModule(**module.hyperparameters())
    assert rebuilt.hyperparameters() == module.hyperparameters()
    assert torch.equal(rebuilt.decoder, module.decoder)
    assert set(module.state_tensors()) == {"decoder", "bias"}
    assert rebuilt.offset == "learned" and rebuilt.bias.requires_grad


def test_init_from_data_and_bad_input() -> None:
    sample = torch.randn(100, 8)
    module = ICFLModule(30, 8)
    module.init_from_data(sample)
    assert torch.equal(module.bias.detach(), torch.zeros(8))  # the default offset stays at 0
    learned = ICFLModule(30, 8, offset="learned")
    learned.init_from_data(sample)
    torch.testing.assert_close(learned.bias.detach(), sample.mean(dim=0))
    with pytest.raises(ValueError, match="offset must be one of"):
        ICFLModule(30, 8, offset="mean")
    with pytest.raises(ValueError, match=r"x must be \(n, 8\)"):
        module.encode(torch.zeros(5, 7))
    bad = torch.zeros(5, 8)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="token 3 holds NaN"):
        module.encode(bad)
    with pytest.raises(ValueError, match="per_round"):
        ICFLModule(4, 8, per_round=5)


def test_a_dictionary_saved_before_the_offset_was_recorded_gives_the_codes_it_gave(tmp_path) -> None:
    """The layout before issue 10: the same tensors (decoder, a learned non-zero bias, the
    whitening) and metadata whose ICFL hyper-parameters have no "offset"."""
    generator = torch.Generator().manual_seed(20)
    raw = torch.randn(300, 16, generator=generator) + 0.5
    whitening = ControlWhitening(method="pca").fit(raw.numpy(), np.ones(300, dtype=bool))
    old = ICFLModule(40, 16, n_rounds=2, per_round=2, seed=21, offset="learned")
    with torch.no_grad():
        old.bias.copy_(0.3 * torch.randn(16, generator=generator))  # as a learned fit left it
    x = whitening.transform_torch(raw)
    expected = old.encode(x)
    path = save_dictionary(tmp_path / "old.safetensors", old, whitening)
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    assert metadata["hyperparameters"].pop("offset") == "learned"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata)})

    model, loaded_whitening, _ = load_dictionary(path)
    assert model.offset == "learned"
    torch.testing.assert_close(model.bias, old.bias, rtol=0, atol=0)
    codes = model.encode(loaded_whitening.transform_torch(raw))
    assert torch.equal(codes.indices, expected.indices)
    torch.testing.assert_close(codes.values, expected.values, rtol=0, atol=0)
    estimator_codes = ICFL.load(path).transform(raw.numpy())
    assert torch.equal(estimator_codes.indices, expected.indices)
    torch.testing.assert_close(estimator_codes.values, expected.values, rtol=0, atol=0)
    # The bias is what keeps those codes: read with today's default (b = 0) they would change.
    with torch.no_grad():
        model.bias.zero_()
    assert not torch.equal(model.encode(x).indices, expected.indices)


def test_new_files_record_the_zero_offset(tmp_path) -> None:
    raw = torch.randn(200, 8, generator=torch.Generator().manual_seed(22))
    whitening = ControlWhitening(method="none").fit(raw.numpy(), np.ones(200, dtype=bool))
    module = ICFLModule(20, 8, n_rounds=1, per_round=2, seed=23)
    path = save_dictionary(tmp_path / "new.safetensors", module, whitening)
    model, _, metadata = load_dictionary(path)
    assert metadata["hyperparameters"]["offset"] == "zero"
    assert model.offset == "zero" and not model.bias.requires_grad and not model.bias.any()


def test_empty_batch_and_codes_type() -> None:
    module = ICFLModule(30, 8, n_rounds=2, per_round=2)
    codes = module.encode(torch.zeros(0, 8))
    assert isinstance(codes, SparseCodes) and codes.indices.shape == (0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pursuits_match_the_cpu_and_training_steps_run() -> None:
    module = ICFLModule(2048, 64, n_rounds=4, per_round=3, seed=13)
    x = _tokens(1000, 64, 14)
    expected = module.pursuit_plain(x)
    module.to("cuda")
    for codes in (module.pursuit_plain(x.cuda()), module.pursuit_gram(x.cuda())):
        assert (codes.indices.cpu() == expected.indices).all(dim=1).float().mean() > 0.99
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    for step in range(1, 3):
        loss, codes, _ = module.training_loss(x.cuda())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_optimizer_step(step)
    torch.testing.assert_close(module.gram(), module.decoder @ module.decoder.T)
