"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),  x_hat = W_dec z + b_dec.

Everything after the encoder matmul is sparse: the decode gathers only the k active decoder rows
(an embedding bag), and the backward pass of the encoder and decoder touches only the n x k
selected (token, feature) pairs, so no (n, n_features) gradient is ever built. A training step
therefore costs about one dense (n x dim) @ (dim x n_features) product plus O(n k dim) work.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from plate_concepts.dictionary.base import DictionaryModule
from plate_concepts.dictionary.codes import SparseCodes

# Encode in row chunks so that the (rows x n_features) pre-activation stays around 256 MiB.
_ENCODE_CHUNK_ELEMENTS = 1 << 26
#: The default learning rate is ``BASE_LR`` at ``BASE_LR_FEATURES`` features, scaled by
#: ``1/sqrt(M)`` (:meth:`TopKModule.lr_for`).
BASE_LR, BASE_LR_FEATURES = 2e-4, 2**14


class TopKModule(DictionaryModule):
    """TopK sparse autoencoder with AuxK loss, unit-norm decoder rows and tied initialisation.

    Parameters
    ----------
    n_features, dim
        Dictionary size M and token dimension d.
    k
        Active features per token.
    k_aux
        Dead features used by the AuxK loss per token. Default ``dim // 2`` as in Gao et al.
        ("k_aux = d_model / 2"), at least 1 and at most ``n_features``.
    aux_weight
        Weight of the AuxK loss (Gao et al.: 1/32).
    dead_window_tokens
        A feature is dead (and trained by AuxK) once it has not fired for this many training
        tokens. Gao et al. used 10M tokens on language-model runs of billions of tokens; our
        datasets are 10-100x smaller (the publication trained on 40M tokens), so the default is
        1M tokens: a feature silent that long has frequency < 1e-6, far below the 1e-5 "dead"
        threshold of the metrics, and AuxK still starts reviving it early in training.
    seed
        Seeds the random decoder initialisation.
    """

    method = "topk"
    lr_rule: ClassVar[str] = f"{BASE_LR:g} x sqrt({BASE_LR_FEATURES}/M)"

    def __init__(
        self,
        n_features: int,
        dim: int,
        k: int = 32,
        k_aux: int | None = None,
        aux_weight: float = 1 / 32,
        dead_window_tokens: int = 1_000_000,
        seed: int = 0,
    ) -> None:
        super().__init__(n_features, dim)
        if not 1 <= k <= n_features:
            raise ValueError(f"k must be between 1 and n_features={n_features}, got {k}")
        if k_aux is None:
            k_aux = min(max(dim // 2, 1), n_features)
        if not 1 <= k_aux <= n_features:
            raise ValueError(f"k_aux must be between 1 and n_features={n_features}, got {k_aux}")
        if not (aux_weight >= 0 and math.isfinite(aux_weight)):
            raise ValueError(f"aux_weight must be a finite number >= 0, got {aux_weight}")
        if dead_window_tokens < 1:
            raise ValueError(f"dead_window_tokens must be >= 1, got {dead_window_tokens}")
        self.k = int(k)
        self.k_aux = int(k_aux)
        self.aux_weight = float(aux_weight)
        self.dead_window_tokens = int(dead_window_tokens)
        self.seed = int(seed)

        generator = torch.Generator().manual_seed(self.seed)
        # Gaussian rows normalised = directions uniform on the sphere.
        decoder = torch.randn(n_features, dim, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.decoder = torch.nn.Parameter(decoder)
        self.bias = torch.nn.Parameter(torch.zeros(dim))
        # Tied initialisation (W_enc = W_dec^T in column convention): rows of both are the same.
        self.encoder = torch.nn.Parameter(decoder.clone())
        self.encoder_bias = torch.nn.Parameter(torch.zeros(n_features))

    # ------------------------------------------------------------------ encoding and decoding

    def _check_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"tokens must have shape (n, {self.dim}), got {tuple(x.shape)}")
        return x.to(device=self.decoder.device, dtype=self.decoder.dtype)

    @torch.no_grad()
    def _select(self, centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ReLU pre-activations (n, M) and their top-k values and indices (n, k)."""
        pre = torch.addmm(self.encoder_bias, centred, self.encoder.t()).relu_()
        values, indices = torch.topk(pre, self.k, dim=1, sorted=False)
        return pre, values, indices

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> SparseCodes:
        """Top-k codes of tokens x (n, dim); slots whose ReLU value is 0 are inactive."""
        x = self._check_tokens(x)
        chunk = max(1, _ENCODE_CHUNK_ELEMENTS // self.n_features)
        values, indices = [], []
        for start in range(0, max(len(x), 1), chunk):
            _, v, i = self._select(x[start : start + chunk] - self.bias)
            values.append(v)
            indices.append(i)
        return SparseCodes(torch.cat(indices), torch.cat(values), self.n_features)

    def decode(self, codes: SparseCodes) -> torch.Tensor:
        """bias + sum of the k active decoder rows weighted by their values (sparse gather)."""
        codes = codes.to(self.decoder.device)
        return self._sparse_decode(codes.indices, codes.values) + self.bias

    def _sparse_decode(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast the encoder's values come out in bf16; the gather runs in the
        # decoder's dtype (float32), which also keeps the reconstruction accurate.
        return _SparseDecode.apply(indices, values.to(self.decoder.dtype), self.decoder)

    # ------------------------------------------------------------------ training

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCodes, dict[str, float]]:
        """Normalised MSE (reads as FVU) + ``aux_weight`` * AuxK loss on a batch of tokens.

        The stats are those of :func:`reconstruction_stats` plus ``aux_loss``, read back from the
        device in one transfer (each read waits for the GPU and stalls the step).
        """
        x = self._check_tokens(x)
        if len(x) < 2:
            raise ValueError(f"a training batch needs at least 2 tokens, got {len(x)}")
        x = x.detach()  # tokens are data: the encoder's backward below relies on it
        # Dead before this batch marks features fired; read now, while the GPU is still busy.
        dead_features = self.dead_mask(self.dead_window_tokens).nonzero().squeeze(1)

        with torch.no_grad():
            centred = x - self.bias
        # Only the dense M-wide selection profits from bf16 autocast; the sparse parts, whose
        # hand-written backward assumes one dtype, run in the parameters' dtype.
        pre, top_values, indices = self._select(centred)
        with torch.autocast(device_type=x.device.type, enabled=False):
            pre, top_values = pre.to(self.encoder.dtype), top_values.to(self.encoder.dtype)
            values = _SparseEncoderValues.apply(
                centred, self.bias, self.encoder, self.encoder_bias, indices, top_values
            )
            x_hat = self._sparse_decode(indices, values) + self.bias
            error = x_hat - x
            variance = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
            fvu = error.pow(2).sum() / variance
            loss = fvu

            aux_loss = torch.zeros((), device=x.device)
            if dead_features.numel() > 0:
                aux_loss = self._aux_loss(centred, pre, dead_features, -error.detach())
                loss = loss + self.aux_weight * aux_loss
        del pre

        codes = SparseCodes(indices, values.detach(), self.n_features)
        self._mark_fired(codes)
        with torch.no_grad():
            cosine = F.cosine_similarity(x, x_hat, dim=1, eps=1e-8).mean()
            l0 = codes.active().sum(dim=1).float().mean()
            numbers = torch.stack([fvu, cosine, l0, aux_loss]).tolist()
        return loss, codes, dict(zip(("fvu", "cosine", "l0", "aux_loss"), numbers, strict=True))

    def _aux_loss(
        self,
        centred: torch.Tensor,
        pre: torch.Tensor,
        dead_features: torch.Tensor,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """AuxK: the top ``k_aux`` dead features (no bias) reconstruct the main residual.

        Computed with dense products restricted to the dead columns. With k_aux = dim / 2 the
        selection is only ~10x sparser than the dead block, while gathering decoder rows costs
        ~10-20x (CPU) to ~50x (H100, fp32) more per multiply-add than a dense product, so the
        sparse route of the main loss would be slower here (measured: bench_topk.py).
        """
        with torch.no_grad():
            dead_pre = pre.index_select(1, dead_features)
            aux_values, local = torch.topk(
                dead_pre, min(self.k_aux, len(dead_features)), dim=1, sorted=False
            )
            selected = dead_pre.zero_().scatter_(1, local, aux_values)  # reuse the block's memory
        z = _MaskedEncoderProduct.apply(
            centred,
            self.bias,
            self.encoder.index_select(0, dead_features),
            self.encoder_bias.index_select(0, dead_features),
            selected,
        )
        residual_hat = z @ self.decoder.index_select(0, dead_features)
        variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return (residual_hat - residual).pow(2).sum() / variance

    @torch.no_grad()
    def _mark_fired(self, codes: SparseCodes) -> None:
        # As the base class, without boolean indexing: that would wait for the GPU twice a step.
        fired = torch.zeros(self.n_features, dtype=torch.int32, device=codes.indices.device)
        fired.index_add_(0, codes.indices.reshape(-1), codes.active().reshape(-1).to(torch.int32))
        since = self.tokens_since_fired + len(codes)
        self.tokens_since_fired.copy_(torch.where(fired > 0, torch.zeros_like(since), since))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove from each decoder row's gradient its component along the row."""
        grad = self.decoder.grad
        if grad is None:
            return
        rows = self.decoder
        squared_norms = rows.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)
        grad.sub_((grad * rows).sum(dim=1, keepdim=True) / squared_norms * rows)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, generator: torch.Generator | None = None) -> None:
        """Renormalise decoder rows to unit norm (the optimiser drifts them slightly)."""
        self.decoder.div_(self.decoder.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        """Set the decoder bias to the geometric median of a sample of tokens (Gao et al.).

        The median is robust to the outlying tokens a mean is pulled towards; see
        :func:`geometric_median` for the fallback to the mean.
        """
        sample = self._check_tokens(sample)
        if len(sample) == 0:
            raise ValueError("init_from_data needs at least one token, got an empty sample")
        self.bias.copy_(geometric_median(sample))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "dim": self.dim,
            "k": self.k,
            "k_aux": self.k_aux,
            "aux_weight": self.aux_weight,
            "dead_window_tokens": self.dead_window_tokens,
            "seed": self.seed,
        }

    @property
    def code_slots(self) -> int:
        return self.k

    def default_lr(self) -> float:
        """Gao et al.'s scaling with the dictionary size (:meth:`lr_for`)."""
        return self.lr_for(self.n_features)

    @staticmethod
    def lr_for(n_features: int, base_lr: float = BASE_LR) -> float:
        """Gao et al.'s learning-rate scaling with dictionary size: ``base_lr / sqrt(M / 2**14)``.

        They found the best Adam learning rate to fall roughly as 1/sqrt(n_latents), with 2e-4 at
        16k latents; M = 8192 gives 2.8e-4. (The dictionary-learning publication used 5e-5 at
        M = 8192; pass ``base_lr`` to scale from another reference point.)
        """
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        return base_lr / math.sqrt(n_features / BASE_LR_FEATURES)


# ---------------------------------------------------------------------- sparse autograd pieces


def _scatter_rows(
    indices: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_out: int
) -> torch.Tensor:
    """out[m] = sum over slots (i, j) with indices[i, j] == m of weights[i, j] * rows[i].

    The transpose of an embedding bag: slots sorted by feature make each output row one bag over
    ``rows``. No (n*k, dim) or (n, n_out) intermediate is built, and nothing waits for the GPU
    (``searchsorted`` finds the bag offsets where ``bincount`` would read its size back).
    """
    k = indices.shape[1]
    features, order = torch.sort(indices.reshape(-1))
    offsets = torch.searchsorted(
        features, torch.arange(n_out, device=features.device, dtype=features.dtype)
    )
    return F.embedding_bag(
        order // k, rows, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order]
    )


def _gather_dot(indices: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[i, j] = <table[indices[i, j]], rows[i]>, without an (n, k, dim) gather.

    This is the per-sample-weight gradient of an embedding bag; ATen's kernel for it is used
    directly because autograd's own backward also builds the (slower) dense weight gradient.
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    offsets = torch.arange(0, n * k, k, device=flat.device)
    bag_of_slot = torch.arange(n, device=flat.device).repeat_interleave(k)
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows.contiguous(),
        table,
        flat,
        offsets,
        bag_of_slot,
        0,
        -1,  # mode 0 = sum
    )
    return dots.view(n, k)


class _SparseDecode(torch.autograd.Function):
    """y[i] = sum_j values[i, j] * decoder[indices[i, j]]: an embedding bag, with a backward
    that visits only the selected rows (k dot products per token, a scatter of rows)."""

    @staticmethod
    def forward(
        ctx: Any, indices: torch.Tensor, values: torch.Tensor, decoder: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(indices, values, decoder)
        return F.embedding_bag(indices, decoder, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        indices, values, decoder = ctx.saved_tensors
        grad_values = _gather_dot(indices, decoder, grad_out) if ctx.needs_input_grad[1] else None
        grad_decoder = None
        if ctx.needs_input_grad[2]:
            grad_decoder = _scatter_rows(indices, values, grad_out, decoder.shape[0])
        return None, grad_values, grad_decoder


# Both encoder functions below take the centred tokens x - bias as data and ``bias`` separately.
# Since x needs no gradient, dL/dbias = -sum_i dL/dcentred_i = -(dL/dencoder_bias) @ encoder rows:
# a (features) x (features, dim) product instead of an (n, dim) gradient.


class _SparseEncoderValues(torch.autograd.Function):
    """values[i, j] = ReLU(<encoder[f], x_i - bias> + encoder_bias[f]) with f = indices[i, j].

    The forward returns the values already computed by the dense encoder product; the backward
    only visits the selected slots (a dense autograd would build an (n, M) gradient and run two
    more (n x d x M) products).
    """

    @staticmethod
    def forward(
        ctx: Any,
        centred: torch.Tensor,
        bias: torch.Tensor,
        encoder: torch.Tensor,
        encoder_bias: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(centred, encoder, indices, values > 0)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        centred, encoder, indices, positive = ctx.saved_tensors
        grad = grad_values * positive  # ReLU: no gradient where the pre-activation was clipped
        grad_feature_bias = torch.zeros(encoder.shape[0], dtype=grad.dtype, device=grad.device)
        grad_feature_bias.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        grad_bias = -(grad_feature_bias @ encoder) if ctx.needs_input_grad[1] else None
        grad_encoder = (
            _scatter_rows(indices, grad, centred, encoder.shape[0])
            if ctx.needs_input_grad[2]
            else None
        )
        return None, grad_bias, grad_encoder, grad_feature_bias, None, None


class _MaskedEncoderProduct(torch.autograd.Function):
    """z = ReLU((x - bias) @ rows.T + row_bias) on the entries where ``selected`` (the same
    values, computed without gradient, zero elsewhere) is non-zero; 0 elsewhere."""

    @staticmethod
    def forward(
        ctx: Any,
        centred: torch.Tensor,
        bias: torch.Tensor,
        rows: torch.Tensor,
        row_bias: torch.Tensor,
        selected: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(centred, rows, selected)
        return selected.clone()

    @staticmethod
    def backward(ctx: Any, grad_z: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        centred, rows, selected = ctx.saved_tensors
        grad = grad_z.masked_fill(selected <= 0, 0.0)
        grad_row_bias = grad.sum(dim=0)
        grad_bias = -(grad_row_bias @ rows) if ctx.needs_input_grad[1] else None
        grad_rows = grad.t() @ centred if ctx.needs_input_grad[2] else None
        return None, grad_bias, grad_rows, grad_row_bias, None


# ---------------------------------------------------------------------- geometric median


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Geometric median of points (n, dim) by Weiszfeld iterations started from the mean.

    Stops when a step moves less than ``tol`` times the points' typical spread. If the iterations
    produce non-finite numbers, or do not end with a smaller sum of distances than the mean has,
    the mean is returned instead.
    """
    points = points.double()
    mean = points.mean(dim=0)
    scale = (points - mean).norm(dim=1).mean().clamp_min(1e-12)
    median = mean
    for _ in range(max_iter):
        # Weiszfeld step: distance-weighted mean; the clamp keeps a point sitting on the estimate
        # from taking all the weight.
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8 * scale)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if bool(moved <= tol * scale):
            break

    def total_distance(centre: torch.Tensor) -> torch.Tensor:
        return (points - centre).norm(dim=1).sum()

    if not bool(torch.isfinite(median).all()) or total_distance(median) > total_distance(mean):
        median = mean
    return median.float()
