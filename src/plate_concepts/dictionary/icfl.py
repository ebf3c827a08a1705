"""ICFL, Iterative Codebook Feature Learning (method.md, "ICFL").

Model x ~ decoder^T z + bias with unit-norm feature directions (the rows of ``decoder``) and no
learned encoder: codes come from a batched pursuit. Each of J rounds selects, per token, the L
features with the largest *signed* inner product with the residual, fits their coefficients by
least squares, and subtracts the fit. The decoder is learned by gradient steps on the
reconstruction error with the codes held fixed.

The offset (issue 10): the bias is fixed at 0, the origin of the pre-processed space, which is
the control mean — a token like the average control has no features — and it is not trained
(``offset="zero"``). With signed codes and an overcomplete decoder a learned bias is not
identified (the codes can absorb any bias), and in training it wanders off; the pursuit then
spends its atoms cancelling it. Measured on the issue's planted data
(``benchmarks/bench_icfl_offset.py``: 20,000 tokens, d = 64, 96 atoms, M = 192, 3000 steps of
1024 at lr 1e-3, no whitening), learned bias -> bias 0:

- J = 2, L = 2: bias norm 2.0 (tokens have norm 1), FVU 0.30 -> 0.05, the worst class's best
  max selectivity 0.01 -> 0.64;
- J = 4, L = 1: bias norm 5.1, FVU 0.48 -> 0.02, 14 % -> 100 % of the atoms recovered,
  selectivity 0.07 -> 0.84 (TopK, k = 4: FVU 0.02, 0.98).

A bias set after every step to the batch's mean residual (its least-squares value for the codes)
drifts too (norm 8-16, FVU 0.30-0.49). A bias frozen at the data mean is ~0 when every token is a
control, and ties with 0 when 20 % of the tokens are controls (``--scenario controls``: FVU
0.016 both, selectivity 0.97 vs 0.95 at J = 4, L = 1; 0.72 vs 0.78 at J = 2, L = 2). Only when
every non-control token also carries a shared direction that no atom has (``--shift 1``) does it
reconstruct better (FVU 0.020 vs 0.027, atoms recovered 100 % vs 92 %: b = 0 spends an atom on
that direction), and there its selectivity is lower (0.94 vs 1.00; 0.72 vs 0.85) — so it is not
offered. ``offset="learned"`` (bias started at the sample mean and trained by Adam) remains only
so that dictionaries saved before the choice was recorded load with the codes they gave. On the
demo plate (d = 1600, 600 steps) the learned bias barely moved (norm 0.03) and the two models
found the planted perturbations about equally (docs/user-guide.md, section 6).

Two pursuits give the same codes up to rounding:

- :meth:`ICFLModule.pursuit_plain` recomputes the scores ``decoder @ r`` every round (d*M per
  token per round); it is the reference.
- :meth:`ICFLModule.pursuit_gram` computes the scores once and then updates them with the Gram
  matrix G = decoder decoder^T: ``scores -= G[S]^T c`` (M*L per token per round), and reads the
  L x L systems from G (Rubinstein, Zibulevsky & Elad 2008). G is cached and rebuilt whenever the
  decoder changes. On the CPU, G and the scores are stored in column blocks so that the updates
  stream through cache-sized pieces of G; the top-L selection is a two-stage exact search.

Choices (ours): loss = mean over tokens of the squared error summed over dimensions; a tiny
ridge (``RIDGE``) keeps the L x L solves stable when selected features are nearly parallel; for
each pair of features with cosine above the threshold, the one with the higher index is redrawn
(so the lowest index of a cluster of near-duplicates survives).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from plate_concepts.dictionary.base import DictionaryModule, reconstruction_stats
from plate_concepts.dictionary.codes import SparseCodes

#: Offset models: "zero" (b = 0, the control mean of the pre-processed space; the default) and
#: "learned" (b learned with the decoder, as dictionaries saved before the offset was recorded).
OFFSETS = ("zero", "learned")
#: Added to the diagonal of the L x L least-squares systems (features are unit norm, diagonal 1).
RIDGE = 1e-6
#: The default Adam learning rate is ``LR_TURN / sqrt(dim)``, at most ``LR_MAX``. Why: Adam moves
#: every coordinate by about ``lr`` per step, so a unit-norm decoder row (coordinates
#: ~1/sqrt(dim)) turns by about ``lr * sqrt(dim)`` per step; 0.04 converges within a few hundred
#: steps and stays stable (rows are renormalised after every step). That is 1.25e-3 at d = 1024.
#: The publication's 5e-5 is tuned for 300k steps over 40M tokens; at the thousands of steps of
#: an interactive fit the dictionary barely moves with it.
LR_TURN = 0.04
LR_MAX = 1e-2
#: Upper bound on tokens x features elements per encoding chunk (the n x M score matrix).
_SCORE_BUDGET = 2**26
#: Bytes per column block of the cached Gram matrix on the CPU (to stay in cache), and the
#: narrowest block.
_GRAM_BLOCK_BYTES = 2**23
#: Largest Gram matrix ``encode`` builds (4 GiB: M = 32768); bigger ones use the plain pursuit.
_GRAM_MAX_BYTES = 2**32
_GRAM_MIN_WIDTH = 64
#: Columns per matrix product when filling column-blocked results (big products run faster).
_PRODUCT_COLUMNS = 2048
#: Features per block in the two-stage top-L selection (see :func:`_top_l`).
_SELECT_BLOCK = 64
#: Rows per block when looking for near-duplicate features (memory O(block x M), not M x M).
_RESAMPLE_BLOCK = 1024


class ICFLModule(DictionaryModule):
    """ICFL dictionary of ``n_features`` unit-norm directions in ``dim`` dimensions.

    Parameters
    ----------
    n_rounds, per_round
        J and L of the pursuit: at most ``n_rounds * per_round`` non-zeros per token.
    resample_every, resample_threshold
        Every ``resample_every`` optimiser steps (0 disables), redraw one feature of each pair
        whose cosine similarity exceeds ``resample_threshold``.
    use_gram
        Encode with the Gram-matrix pursuit (fast) rather than the plain one.
    seed
        Seeds the decoder initialisation and, when no generator is passed, the redraws.
    offset
        "zero": the bias stays 0, the origin of the pre-processed space (the control mean), and
        is not trained. "learned": the bias starts at the sample mean and is trained with the
        decoder; it drifts (see the module docstring) and is kept only so that dictionaries
        saved before the offset was recorded give the codes they gave.
    """

    method = "icfl"
    #: Files saved before ``offset`` existed learned their bias.
    legacy_hyperparameters: ClassVar[dict[str, Any]] = {"offset": "learned"}
    lr_rule: ClassVar[str] = f"{LR_TURN:g}/sqrt(dim), at most {LR_MAX:g}"

    def __init__(
        self,
        n_features: int,
        dim: int,
        n_rounds: int = 20,
        per_round: int = 5,
        resample_every: int = 100,
        resample_threshold: float = 0.9,
        use_gram: bool = True,
        seed: int = 0,
        offset: str = "zero",
    ) -> None:
        super().__init__(n_features, dim)
        if n_rounds < 1 or per_round < 1:
            raise ValueError(f"n_rounds and per_round must be >= 1, got {n_rounds} and {per_round}")
        if per_round > n_features:
            raise ValueError(f"per_round ({per_round}) cannot exceed n_features ({n_features})")
        if resample_every < 0:
            raise ValueError(f"resample_every must be >= 0 (0 disables), got {resample_every}")
        if not -1.0 <= resample_threshold <= 1.0:
            raise ValueError(f"resample_threshold is a cosine in [-1, 1], got {resample_threshold}")
        if offset not in OFFSETS:
            raise ValueError(f"offset must be one of {list(OFFSETS)}, got {offset!r}")
        self.n_rounds = n_rounds
        self.per_round = per_round
        self.resample_every = resample_every
        self.resample_threshold = resample_threshold
        self.use_gram = use_gram
        self.seed = seed
        self.offset = offset
        self._generator = torch.Generator().manual_seed(seed)
        # Standard linear-layer init (uniform +-1/sqrt(fan_in), fan_in = n_features for a
        # decoder Linear(n_features, dim)), then rows scaled to unit norm.
        bound = 1.0 / n_features**0.5
        decoder = torch.empty(n_features, dim).uniform_(-bound, bound, generator=self._generator)
        self.decoder = torch.nn.Parameter(F.normalize(decoder, dim=1))
        # A parameter either way (same file layout); trained only when learned.
        self.bias = torch.nn.Parameter(torch.zeros(dim), requires_grad=offset == "learned")
        self._gram_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._decoder_version = 0
        #: Indices of the features redrawn by the last :meth:`after_optimizer_step` (so a trainer
        #: can reset their optimiser state).
        self.last_resampled = torch.empty(0, dtype=torch.long)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> SparseCodes:
        """Sparse codes (n, n_rounds * per_round slots) of tokens x (n, dim) by the pursuit
        (the Gram one if ``use_gram`` and the M x M Gram matrix fits in ``_GRAM_MAX_BYTES``)."""
        if self.use_gram and 4 * self.n_features**2 <= _GRAM_MAX_BYTES:
            return self.pursuit_gram(x)
        return self.pursuit_plain(x)

    @torch.no_grad()
    def pursuit_plain(self, x: torch.Tensor) -> SparseCodes:
        """Reference pursuit: scores ``r @ decoder^T`` recomputed every round."""
        return self._encode_chunked(x, gram=False)

    @torch.no_grad()
    def pursuit_gram(self, x: torch.Tensor) -> SparseCodes:
        """Gram pursuit: scores computed once, then updated through the cached Gram matrix."""
        return self._encode_chunked(x, gram=True)

    def _encode_chunked(self, x: torch.Tensor, gram: bool) -> SparseCodes:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (n, {self.dim}), got shape {tuple(x.shape)}")
        decoder = self.decoder.detach().float()
        x = x.detach().to(decoder.device, torch.float32)
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"token {int((~finite).nonzero()[0])} holds NaN or inf values")
        residual = x - self.bias.detach().float()
        blocks = self._gram_blocks() if gram else None
        chunk = max(1, _SCORE_BUDGET // self.n_features)
        parts = []
        for start in range(0, max(len(x), 1), chunk):
            part = residual[start : start + chunk]
            if blocks is None:
                parts.append(self._pursuit_plain_chunk(part, decoder))
            else:
                parts.append(self._pursuit_gram_chunk(part, decoder, blocks))
        return parts[0] if len(parts) == 1 else SparseCodes.cat(parts)

    def _pursuit_plain_chunk(self, residual: torch.Tensor, decoder: torch.Tensor) -> SparseCodes:
        picked, coefs = [], []
        for _ in range(self.n_rounds):
            scores = residual @ decoder.T  # (n, M): <D_m, r> for every feature
            rhs, selected = _top_l(scores, self.per_round)  # rhs = D_S r, read off the scores
            columns = decoder[selected]  # (n, L, d)
            c = _least_squares(columns @ columns.transpose(1, 2), rhs)
            residual = residual - torch.bmm(c.unsqueeze(1), columns).squeeze(1)
            picked.append(selected)
            coefs.append(c)
        return _merge_repeats(torch.cat(picked, dim=1), torch.cat(coefs, dim=1), self.n_features)

    def _pursuit_gram_chunk(
        self, residual: torch.Tensor, decoder: torch.Tensor, blocks: torch.Tensor
    ) -> SparseCodes:
        # Scores live in the same column blocks as G, (n_blocks, n, width), so that each block's
        # update is a contiguous in-place subtraction; padding columns hold -inf (never selected;
        # G's padding is 0, so they stay -inf).
        n_blocks, _, width = blocks.shape
        scores = _column_blocked_product(residual, decoder, width, pad=float("-inf"))  # <D_m, r>
        picked, coefs = [], []
        for round_ in range(self.n_rounds):
            rhs, selected = _top_l(scores, self.per_round)
            system = _gram_entries(blocks, selected.unsqueeze(2), selected.unsqueeze(1))
            c = _least_squares(system, rhs)
            picked.append(selected)
            coefs.append(c)
            if round_ == self.n_rounds - 1:
                break
            # scores_m -= sum_l c_l G[s_l, m]: a fused gather-and-sum of L rows of a G block per
            # token; the block stays in cache while all tokens read from it.
            rows = selected.int()  # int32 indices: faster bags
            for k in range(n_blocks):
                scores[k] -= F.embedding_bag(rows, blocks[k], per_sample_weights=c, mode="sum")
        return _merge_repeats(torch.cat(picked, dim=1), torch.cat(coefs, dim=1), self.n_features)

    def _gram_blocks(self) -> torch.Tensor:
        """The Gram matrix G = decoder decoder^T in column blocks, (n_blocks, M, width) float32
        (the last block zero-padded), cached until the decoder changes.

        On the CPU a block (8 MB) stays in cache while every token's update reads from it (the
        whole pursuit ran ~1.6x faster than with one block at d = 1024, M = 8192); on a GPU there
        is one block (G itself).
        """
        decoder = self.decoder
        key = (decoder.data_ptr(), decoder._version, decoder.device, self._decoder_version)
        if self._gram_cache is None or self._gram_cache[0] != key:
            self._gram_cache = None  # free the old matrix before building the new one
            weights = decoder.detach().float()
            M = self.n_features
            width = M
            if weights.device.type == "cpu":  # a multiple of the selection block, if it can be
                width = max(
                    _GRAM_MIN_WIDTH, _GRAM_BLOCK_BYTES // (4 * M) // _SELECT_BLOCK * _SELECT_BLOCK
                )
                width = min(M, width)
            self._gram_cache = (key, _column_blocked_product(weights, weights, width, pad=0.0))
        return self._gram_cache[1]

    def gram(self) -> torch.Tensor:
        """G = decoder decoder^T (M x M, float32), from the cached blocks."""
        blocks = self._gram_blocks()
        return blocks.permute(1, 0, 2).reshape(self.n_features, -1)[:, : self.n_features]

    # ------------------------------------------------------------------ decoding and training
    def decode(self, codes: SparseCodes) -> torch.Tensor:
        """bias + sum of the active decoder rows weighted by their codes (a gather, not a dense
        n x M product); differentiable in ``decoder`` and ``bias``."""
        indices = codes.indices.to(self.decoder.device)
        values = codes.values.to(self.decoder.device, self.decoder.dtype)
        return self.bias + F.embedding_bag(
            indices, self.decoder, per_sample_weights=values, mode="sum"
        )

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCodes, dict[str, float]]:
        """Loss = mean over tokens of ||x - x_hat||^2 (summed over dimensions), with the codes
        of the pursuit held fixed."""
        x = x.to(self.decoder.device, self.decoder.dtype)
        codes = self.encode(x)
        x_hat = self.decode(codes)
        loss = (x - x_hat).pow(2).sum(dim=1).mean()
        stats = reconstruction_stats(x, x_hat, codes)
        stats["loss"] = float(loss.detach())
        self._mark_fired(codes)
        return loss, codes, stats

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        """A learned offset starts at the mean of a sample of pre-processed tokens (sample, dim);
        a zero offset stays 0."""
        if sample.ndim != 2 or sample.shape[1] != self.dim or len(sample) == 0:
            raise ValueError(
                f"sample must be (n >= 1, {self.dim}), got shape {tuple(sample.shape)}"
            )
        if self.offset == "learned":
            self.bias.copy_(sample.to(self.bias.device, self.bias.dtype).mean(dim=0))

    @torch.no_grad()
    def after_optimizer_step(self, step: int, generator: torch.Generator | None = None) -> None:
        """Renormalise the decoder rows; every ``resample_every`` steps redraw near-duplicates."""
        norms = self.decoder.norm(dim=1, keepdim=True)
        if not bool(torch.isfinite(norms).all()):  # dividing would zero the rows silently
            raise FloatingPointError("the feature directions overflowed")
        self.decoder.div_(norms.clamp_min(1e-12))
        self.last_resampled = torch.empty(0, dtype=torch.long, device=self.decoder.device)
        if self.resample_every and step > 0 and step % self.resample_every == 0:
            self.resample_duplicates(generator)
        elif bool((norms == 0).any()):
            self._redraw(torch.nonzero(norms.squeeze(1) == 0).squeeze(1), generator)
        self._decoder_version += 1  # invalidates the Gram cache

    @torch.no_grad()
    def resample_duplicates(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Redraw, uniformly on the unit sphere, every feature whose cosine with a feature of
        lower index exceeds ``resample_threshold`` (and any zero row). Returns their indices."""
        decoder = self.decoder.detach()
        unit = F.normalize(decoder, dim=1)
        redraw = decoder.norm(dim=1) == 0
        for start in range(0, self.n_features, _RESAMPLE_BLOCK):
            stop = min(start + _RESAMPLE_BLOCK, self.n_features)
            cosine = unit[start:stop] @ unit[:stop].T  # (block, stop): pairs with a lower index
            rows = torch.arange(start, stop, device=decoder.device).unsqueeze(1)
            lower = torch.arange(stop, device=decoder.device).unsqueeze(0) < rows
            redraw[start:stop] |= ((cosine > self.resample_threshold) & lower).any(dim=1)
        indices = torch.nonzero(redraw).squeeze(1)
        self._redraw(indices, generator)
        return indices

    def _redraw(self, indices: torch.Tensor, generator: torch.Generator | None) -> None:
        if len(indices) == 0:
            return
        generator = generator if generator is not None else self._generator
        draws = torch.randn(len(indices), self.dim, generator=generator, device=generator.device)
        with torch.no_grad():
            self.decoder[indices] = F.normalize(draws, dim=1).to(
                self.decoder.device, self.decoder.dtype
            )
        self.tokens_since_fired[indices] = 0  # a redrawn feature starts a fresh life
        self.last_resampled = indices
        self._decoder_version += 1

    @property
    def code_slots(self) -> int:
        return self.n_rounds * self.per_round

    def default_lr(self) -> float:
        """``LR_TURN / sqrt(dim)``, at most ``LR_MAX`` (see :data:`LR_TURN`)."""
        return min(LR_MAX, LR_TURN / math.sqrt(self.dim))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "n_features": self.n_features,
            "dim": self.dim,
            "n_rounds": self.n_rounds,
            "per_round": self.per_round,
            "resample_every": self.resample_every,
            "resample_threshold": self.resample_threshold,
            "use_gram": self.use_gram,
            "seed": self.seed,
            "offset": self.offset,
        }


def _column_blocked_product(
    left: torch.Tensor, right: torch.Tensor, width: int, pad: float
) -> torch.Tensor:
    """left @ right.T stored in column blocks: (n_blocks, len(left), width), the last block's
    missing columns filled with ``pad``."""
    n, M = left.shape[0], right.shape[0]
    out = torch.empty(-(-M // width), n, width, device=left.device, dtype=left.dtype)
    group = width * max(1, _PRODUCT_COLUMNS // width)
    for start in range(0, M, group):
        part = left @ right[start : start + group].T
        count = -(-part.shape[1] // width)
        part = F.pad(part, (0, count * width - part.shape[1]), value=pad)
        out[start // width : start // width + count] = part.view(n, count, width).transpose(0, 1)
    return out


def _gram_entries(blocks: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """G[rows, cols] (broadcast) read from the column-blocked Gram matrix."""
    _, M, width = blocks.shape
    flat = (cols // width) * (M * width) + rows * width + cols % width
    return blocks.view(-1)[flat]


def _least_squares(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve the (n, L, L) normal equations of the selected features, with a tiny ridge."""
    ridge = RIDGE * torch.eye(system.shape[-1], device=system.device, dtype=system.dtype)
    return torch.linalg.solve(system + ridge, rhs)


def _top_l(scores: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column indices of the L largest scores of each row (unordered) of ``scores``,
    (n, M) or, stored in column blocks, (n_blocks, n, width) for an (n, n_blocks * width) matrix.

    Two stages, exact and faster than one ``topk`` over long rows on the CPU: the L largest
    entries lie in at most L selection blocks of ``_SELECT_BLOCK`` columns, and those are among
    the L blocks with the largest maxima; so take the L best blocks by their maxima, then the L
    best entries inside them.
    """
    if scores.ndim == 2:
        scores = scores.unsqueeze(0)
    n_blocks, n, width = scores.shape
    B = _SELECT_BLOCK
    per_block = width // B
    if width % B or n_blocks * per_block < 4 * L:
        flat = scores.permute(1, 0, 2).reshape(n, n_blocks * width)
        top = flat.topk(L, dim=1, sorted=False)
        return top.values, top.indices
    block_max = scores.view(n_blocks, n, per_block, B).amax(dim=3)
    block_max = block_max.permute(1, 0, 2).reshape(n, n_blocks * per_block)  # in column order
    best = block_max.topk(L, dim=1, sorted=False).indices  # (n, L) selection blocks
    token = torch.arange(n, device=scores.device).unsqueeze(1)
    start = (best // per_block) * (n * width) + token * width + (best % per_block) * B
    candidates = (start.unsqueeze(2) + torch.arange(B, device=scores.device)).view(n, L * B)
    values, where = torch.take(scores, candidates).topk(L, dim=1, sorted=False)
    return values, best.gather(1, where // B) * B + where % B


def _merge_repeats(indices: torch.Tensor, values: torch.Tensor, n_features: int) -> SparseCodes:
    """Add up the coefficients of a feature picked in several rounds into one slot.

    Sort each token's slots by feature, give each run of equal features one output slot
    (cumulative count of run starts) and scatter-add into it; leftover slots stay (0, 0).
    """
    indices, order = indices.sort(dim=1)
    values = values.gather(1, order)
    starts = torch.ones_like(indices, dtype=torch.bool)
    starts[:, 1:] = indices[:, 1:] != indices[:, :-1]
    slot = starts.cumsum(dim=1) - 1
    merged_values = torch.zeros_like(values).scatter_add_(1, slot, values)
    merged_indices = torch.zeros_like(indices).scatter_(1, slot, indices)
    return SparseCodes(merged_indices, merged_values, n_features)
