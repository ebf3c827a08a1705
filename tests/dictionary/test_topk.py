"""TopK sparse autoencoder: sparse encode/decode against dense references, the sparse backward
against dense autograd, decoder-norm hooks, geometric median, AuxK, and planted-atom recovery."""

from __future__ import annotations

import json

import pytest
import torch

from plate_concepts.dictionary import topk as topk_module
from plate_concepts.dictionary.base import reconstruction_stats
from plate_concepts.dictionary.codes import SparseCodes
from plate_concepts.dictionary.topk import TopKModule, geometric_median

_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.fixture(autouse=True)
def _single_thread():
    # The CPU is shared; these tests are small enough that one thread is fastest anyway.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturbed_module(
    n_features: int = 64, dim: int = 16, k: int = 5, seed: int = 0, **kwargs
) -> TopKModule:
    """A module whose encoder, biases and decoder all differ (not the tied initialisation)."""
    module = TopKModule(n_features, dim, k=k, seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        module.encoder.add_(0.3 * torch.randn(n_features, dim, generator=g))
        module.encoder_bias.copy_(0.1 * torch.randn(n_features, generator=g))
        module.bias.copy_(0.2 * torch.randn(dim, generator=g))
    return module


def _tokens(n: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _dense_reference_codes(module: TopKModule, x: torch.Tensor) -> torch.Tensor:
    pre = torch.relu((x - module.bias) @ module.encoder.T + module.encoder_bias)
    values, indices = torch.topk(pre, module.k, dim=1)
    return torch.zeros_like(pre).scatter(1, indices, values)


def _dense_reference_loss(module: TopKModule, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The straightforward dense-autograd version of the training loss."""
    pre = torch.relu((x - module.bias) @ module.encoder.T + module.encoder_bias)
    values, indices = torch.topk(pre, module.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, indices, values)
    x_hat = z @ module.decoder + module.bias
    loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if dead.any():
        residual = (x - x_hat).detach()
        dead_pre = pre.masked_fill(~dead, float("-inf"))
        aux_values, aux_indices = torch.topk(dead_pre, min(module.k_aux, int(dead.sum())), dim=1)
        residual_hat = torch.zeros_like(pre).scatter(1, aux_indices, aux_values) @ module.decoder
        aux = (residual_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
        loss = loss + module.aux_weight * aux
    return loss


@pytest.mark.parametrize("device", _DEVICES)
def test_encode_gives_k_nonnegative_slots_matching_dense_reference(device):
    module = _perturbed_module().to(device)
    x = _tokens(200, 16).to(device)
    codes = module.encode(x)
    assert codes.indices.shape == (200, module.k) and codes.values.shape == (200, module.k)
    assert (codes.values >= 0).all()
    assert codes.n_features == 64
    # Distinct indices per token, and the same dense codes as ReLU followed by top-k.
    assert (codes.indices.sort(dim=1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(codes.dense(), _dense_reference_codes(module, x).detach())


def test_encode_marks_clipped_slots_inactive():
    module = TopKModule(32, 8, k=4)
    with torch.no_grad():
        module.encoder_bias.fill_(-100.0)
        module.encoder_bias[:2] = 100.0  # only two features can be positive
    codes = module.encode(_tokens(10, 8))
    assert (codes.active().sum(dim=1) == 2).all()
    assert set(codes.indices[codes.active()].tolist()) == {0, 1}


def test_encode_in_chunks_equals_one_pass(monkeypatch):
    module = _perturbed_module()
    x = _tokens(103, 16)
    whole = module.encode(x).dense()
    monkeypatch.setattr(topk_module, "_ENCODE_CHUNK_ELEMENTS", 64 * 10)  # chunks of 10 rows
    torch.testing.assert_close(module.encode(x).dense(), whole)
    assert len(module.encode(x[:0])) == 0


@pytest.mark.parametrize("device", _DEVICES)
def test_sparse_decode_matches_dense_decode_in_value_and_gradients(device):
    module = _perturbed_module().to(device)
    codes = module.encode(_tokens(50, 16).to(device))
    values = codes.values.clone().requires_grad_()
    weights = torch.randn(50, 16, generator=torch.Generator().manual_seed(3)).to(device)

    sparse = module.decode(SparseCodes(codes.indices, values, codes.n_features))
    (sparse * weights).sum().backward()
    sparse_grads = [module.decoder.grad.clone(), module.bias.grad.clone(), values.grad.clone()]
    module.zero_grad()
    values.grad = None

    dense = (
        SparseCodes(codes.indices, values, codes.n_features).dense() @ module.decoder + module.bias
    )
    (dense * weights).sum().backward()
    dense_grads = [module.decoder.grad, module.bias.grad, values.grad]

    torch.testing.assert_close(sparse, dense)
    for got, expected in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dead_every", [0, 3, 25])  # none dead; more dead than k_aux; fewer
def test_training_loss_and_sparse_backward_match_dense_autograd(dead_every, device):
    module = _perturbed_module(k_aux=6, dead_window_tokens=100).to(device)
    x = _tokens(40, 16, seed=2).to(device)
    dead = torch.zeros(64, dtype=torch.bool, device=device)
    with_dead = dead_every > 0
    if with_dead:
        dead[::dead_every] = True
        module.tokens_since_fired[dead] = 100

    expected_loss = _dense_reference_loss(module, x, dead)
    expected_loss.backward()
    expected = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()

    loss, codes, stats = module.training_loss(x)
    loss.backward()
    assert loss.device.type == device
    torch.testing.assert_close(loss, expected_loss)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=f"gradient of {name}")
    assert (stats["aux_loss"] > 0) == with_dead
    assert not codes.values.requires_grad
    with torch.no_grad():
        expected_stats = reconstruction_stats(x, module.decode(codes), codes)
    for name, value in expected_stats.items():
        assert stats[name] == pytest.approx(value, rel=1e-5), name


def test_training_loss_counts_tokens_since_fired():
    module = _perturbed_module()
    x = _tokens(30, 16)
    module.tokens_since_fired.fill_(7)
    _, codes, _ = module.training_loss(x)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[codes.indices[codes.active()]] = True
    assert fired.any() and not fired.all()
    assert (module.tokens_since_fired[fired] == 0).all()
    assert (module.tokens_since_fired[~fired] == 37).all()


def test_auxk_is_zero_without_dead_features_and_trains_dead_encoder_rows():
    module = _perturbed_module(n_features=256, k=3, dead_window_tokens=1000)
    x = _tokens(20, 16)
    unused = torch.ones(256, dtype=torch.bool)
    unused[module.encode(x).indices.reshape(-1)] = False

    loss, _, stats = module.training_loss(x)
    assert stats["aux_loss"] == 0.0
    assert loss.item() == pytest.approx(stats["fvu"], rel=1e-5)
    loss.backward()
    # Features outside every token's top-k get no gradient from the main loss.
    assert (module.encoder.grad[unused] == 0).all()
    assert (module.decoder.grad[unused] == 0).all()

    module.zero_grad()
    module.tokens_since_fired[unused] = 1000  # the unused features are now dead
    loss, _, stats = module.training_loss(x)
    assert stats["aux_loss"] > 0
    assert loss.item() == pytest.approx(
        stats["fvu"] + module.aux_weight * stats["aux_loss"], rel=1e-5
    )
    loss.backward()
    dead_rows_with_gradient = module.encoder.grad[unused].abs().sum(dim=1) > 0
    assert dead_rows_with_gradient.sum() >= module.k  # AuxK reached dead encoder rows
    assert (module.decoder.grad[unused].abs().sum(dim=1) > 0).sum() >= module.k


def test_parallel_gradient_removed_and_rows_unit_norm_after_step():
    module = _perturbed_module()
    x = _tokens(64, 16)
    loss, _, _ = module.training_loss(x)
    loss.backward()
    raw = module.decoder.grad.clone()
    rows = module.decoder.detach()
    module.before_optimizer_step()
    grad = module.decoder.grad
    assert (grad * rows).sum(dim=1).abs().max() < 1e-6
    # Only the parallel component went: the orthogonal part is untouched.
    parallel = (raw * rows).sum(dim=1, keepdim=True) * rows
    torch.testing.assert_close(grad, raw - parallel)
    assert (raw * rows).sum(dim=1).abs().max() > 1e-4  # the test removed something

    torch.optim.Adam(module.parameters(), lr=0.1).step()
    assert (module.decoder.norm(dim=1) - 1).abs().max() > 1e-4  # the step drifted the norms
    module.after_optimizer_step(0)
    torch.testing.assert_close(module.decoder.norm(dim=1), torch.ones(64))


def test_initialisation_is_seeded_tied_and_unit_norm():
    a, b, c = TopKModule(32, 8, seed=5), TopKModule(32, 8, seed=5), TopKModule(32, 8, seed=6)
    torch.testing.assert_close(a.decoder, b.decoder)
    assert not torch.allclose(a.decoder, c.decoder)
    torch.testing.assert_close(a.encoder, a.decoder)
    torch.testing.assert_close(a.decoder.norm(dim=1), torch.ones(32))
    assert (a.bias == 0).all() and (a.encoder_bias == 0).all()
    assert set(a.state_tensors()) == {"decoder", "bias", "encoder", "encoder_bias"}


def test_hyperparameters_rebuild_the_module():
    module = TopKModule(48, 10, k=4, aux_weight=0.1, dead_window_tokens=500, seed=3)
    params = module.hyperparameters()
    assert json.loads(json.dumps(params)) == params
    assert params == {
        "n_features": 48,
        "dim": 10,
        "k": 4,
        "k_aux": 5,
        "aux_weight": 0.1,
        "dead_window_tokens": 500,
        "seed": 3,
    }
    rebuilt = TopKModule(**params)
    for name, tensor in module.state_tensors().items():
        torch.testing.assert_close(rebuilt.state_tensors()[name], tensor)
    assert TopKModule(8, 100, k=2).k_aux == 8  # default dim // 2 is capped at n_features


def test_lr_scaling_with_dictionary_size():
    assert TopKModule.lr_for(2**14) == pytest.approx(2e-4)
    assert TopKModule.lr_for(2**16) == pytest.approx(1e-4)
    assert TopKModule.lr_for(8192, base_lr=1.0) == pytest.approx(2**0.5)
    with pytest.raises(ValueError):
        TopKModule.lr_for(0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be"):
        TopKModule(16, 4, k=17)
    with pytest.raises(ValueError, match="k_aux"):
        TopKModule(16, 4, k=2, k_aux=0)
    with pytest.raises(ValueError, match="aux_weight"):
        TopKModule(16, 4, k=2, aux_weight=-1)
    with pytest.raises(ValueError, match="dead_window_tokens"):
        TopKModule(16, 4, k=2, dead_window_tokens=0)
    module = TopKModule(16, 4, k=2)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        module.encode(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        module.training_loss(torch.zeros(1, 4))


def test_geometric_median_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([1.0, -2.0, 0.5, 3.0])
    clean = centre + 0.1 * torch.randn(300, 4, generator=g)
    outliers = torch.tensor([50.0, 50.0, -50.0, 50.0]) + torch.randn(60, 4, generator=g)
    points = torch.cat([clean, outliers])
    median = geometric_median(points)
    assert (median - centre).norm() < 0.1
    assert (points.mean(0) - centre).norm() > 10 * (median - centre).norm()
    # A symmetric sample: the median and the mean coincide.
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    torch.testing.assert_close(geometric_median(square), torch.zeros(2), atol=1e-6, rtol=0)

    module = TopKModule(8, 4, k=2)
    module.init_from_data(points)
    torch.testing.assert_close(module.bias.detach(), median)
    with pytest.raises(ValueError, match="empty"):
        module.init_from_data(points[:0])


def test_recovers_planted_atoms():
    g = torch.Generator().manual_seed(1)
    dim, n_atoms, n_tokens = 32, 48, 20_000
    atoms = torch.randn(n_atoms, dim, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    support = torch.stack([torch.randperm(n_atoms, generator=g)[:3] for _ in range(n_tokens)])
    coefficients = 0.5 + torch.rand(n_tokens, 3, generator=g)
    x = (coefficients[:, :, None] * atoms[support]).sum(1) + 0.01 * torch.randn(
        n_tokens, dim, generator=g
    )

    module = TopKModule(96, dim, k=3, dead_window_tokens=2000, seed=0)
    module.init_from_data(x[:2000])
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    step = 0
    for _ in range(6):
        for batch in torch.randperm(n_tokens, generator=g).split(256):
            loss, _, stats = module.training_loss(x[batch])
            optimizer.zero_grad()
            loss.backward()
            module.before_optimizer_step()
            optimizer.step()
            module.after_optimizer_step(step)
            step += 1

    best_cosine = (atoms @ module.decoder.detach().T).max(dim=1).values
    assert (best_cosine >= 0.9).float().mean() >= 0.8
    assert stats["fvu"] < 0.15 and stats["cosine"] > 0.95


def test_training_step_runs_under_bf16_autocast():
    """The trainer's bf16 option autocasts the loss: the dense selection may run in bf16, the
    sparse parts stay float32, and the gradients match a float32 step closely."""
    torch.manual_seed(0)
    module = TopKModule(64, 16, k=4, seed=0)
    module.tokens_since_fired += 10**7  # every feature dead: AuxK runs too
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _codes, _stats = module.training_loss(x)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
    bf16_grad = module.decoder.grad.clone()
    module.zero_grad()
    module.tokens_since_fired.fill_(10**7)
    loss32, _, _ = module.training_loss(x)
    loss32.backward()
    assert abs(float(loss) - float(loss32)) < 0.05 * float(loss32)
    assert torch.nn.functional.cosine_similarity(bf16_grad.flatten(), module.decoder.grad.flatten(), dim=0) > 0.9
