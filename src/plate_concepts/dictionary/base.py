"""What every dictionary model (ICFL, TopK SAE) offers the trainer, the file format and the UI.

A model works in the pre-processed space (control-whitened, unit-norm tokens): the trainer and
the estimators apply :class:`~plate_concepts.dictionary.whitening.ControlWhitening` first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from plate_concepts.dictionary.codes import SparseCodes


class DictionaryModule(torch.nn.Module, ABC):
    """A sparse dictionary x ~ decoder^T z + bias with ``n_features`` unit-norm feature directions.

    Subclasses hold ``decoder`` (n_features x dim, rows are feature directions) and ``bias`` (dim)
    as parameters, and a buffer ``tokens_since_fired`` (n_features,) counting the training
    tokens seen since each feature was last active (for dead-feature tracking and AuxK).
    """

    method: str  # "icfl" or "topk": the name written in dictionary files
    #: Values of hyper-parameters added after files were first written, as those older files
    #: (which do not record them) meant them; :func:`~plate_concepts.dictionary.io.load_dictionary`
    #: fills them in.
    legacy_hyperparameters: ClassVar[dict[str, Any]] = {}
    #: :meth:`default_lr` in words, for help texts (built from the constants it uses).
    lr_rule: ClassVar[str] = ""

    def __init__(self, n_features: int, dim: int) -> None:
        super().__init__()
        if n_features < 1 or dim < 1:
            raise ValueError(f"n_features and dim must be >= 1, got {n_features} and {dim}")
        self.n_features = n_features
        self.dim = dim
        self.register_buffer("tokens_since_fired", torch.zeros(n_features, dtype=torch.long))

    @abstractmethod
    def encode(self, x: torch.Tensor) -> SparseCodes:
        """Sparse codes of pre-processed tokens x (n, dim). No gradient flows through."""

    @abstractmethod
    def decode(self, codes: SparseCodes) -> torch.Tensor:
        """Reconstructions (n, dim) from codes, differentiable in the parameters."""

    @abstractmethod
    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCodes, dict[str, float]]:
        """Loss to minimise on a batch, the batch's codes, and batch statistics
        (at least ``fvu``, ``cosine``, ``l0``). Updates ``tokens_since_fired``."""

    def before_optimizer_step(self) -> None:
        """Hook between backward() and optimizer.step() (e.g. remove gradient parallel to columns)."""

    @abstractmethod
    def after_optimizer_step(self, step: int, generator: torch.Generator | None = None) -> None:
        """Hook after optimizer.step(): keep columns unit norm, redraw near-duplicates, etc."""

    def default_lr(self) -> float:
        """The method's default Adam learning rate for this model (its size and dimension)."""
        raise NotImplementedError(f"{type(self).__name__} must define default_lr()")

    @property
    @abstractmethod
    def code_slots(self) -> int:
        """Slots per token in its :class:`SparseCodes` (the most features active at once)."""

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of pre-processed tokens (default: none)."""

    @abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``type(self)(**hyperparameters())`` rebuilds it."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors written to the dictionary file (names as in the file format)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def dead_mask(self, window_tokens: int) -> torch.Tensor:
        """(n_features,) bool: features not active in the last ``window_tokens`` training tokens."""
        return self.tokens_since_fired >= window_tokens

    @torch.no_grad()
    def _mark_fired(self, codes: SparseCodes) -> None:
        fired = torch.zeros(self.n_features, dtype=torch.bool, device=codes.indices.device)
        fired[codes.indices[codes.active()]] = True
        self.tokens_since_fired += len(codes)
        self.tokens_since_fired[fired] = 0


def reconstruction_stats(x: torch.Tensor, x_hat: torch.Tensor, codes: SparseCodes) -> dict[str, float]:
    """Batch FVU, mean cosine(x, x_hat) and L0, as floats (for progress events)."""
    with torch.no_grad():
        x, x_hat = x.float(), x_hat.float()
        residual = (x - x_hat).pow(2).sum()
        total = (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        cosine = torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-8).mean()
        l0 = codes.active().sum(dim=1).float().mean()
    return {"fvu": float(residual / total), "cosine": float(cosine), "l0": float(l0)}
