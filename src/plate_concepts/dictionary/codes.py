"""Sparse codes: for each token, the indices of its active features and their values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseCodes:
    """Codes of n tokens over ``n_features`` features, k slots per token.

    ``indices`` (n, k) int64 and ``values`` (n, k) float. A slot with value 0 is inactive
    (ICFL pads tokens with fewer than k distinct features with zeros; an index may repeat only
    with value 0). Use :meth:`dense` for an (n, n_features) matrix.
    """

    indices: torch.Tensor
    values: torch.Tensor
    n_features: int

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape or self.indices.ndim != 2:
            raise ValueError(
                f"indices {tuple(self.indices.shape)} and values {tuple(self.values.shape)} must both be (n, k)"
            )

    def __len__(self) -> int:
        return self.indices.shape[0]

    def dense(self) -> torch.Tensor:
        """(n, n_features) codes; repeated indices add up."""
        out = torch.zeros(len(self), self.n_features, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)

    def active(self) -> torch.Tensor:
        """(n, k) bool: the slots holding a non-zero value."""
        return self.values != 0

    def l0(self) -> torch.Tensor:
        """(n,) number of distinct active features per token."""
        return (self.dense() != 0).sum(dim=1)

    def to(self, device: torch.device | str) -> SparseCodes:
        return SparseCodes(self.indices.to(device), self.values.to(device), self.n_features)

    def __getitem__(self, rows: slice | torch.Tensor) -> SparseCodes:
        return SparseCodes(self.indices[rows], self.values[rows], self.n_features)

    @staticmethod
    def cat(parts: list[SparseCodes]) -> SparseCodes:
        """Concatenate codes of consecutive batches (k may differ; shorter ones are zero-padded)."""
        if not parts:
            raise ValueError("no codes to concatenate")
        k = max(p.indices.shape[1] for p in parts)
        pad = lambda t: torch.nn.functional.pad(t, (0, k - t.shape[1]))
        return SparseCodes(
            torch.cat([pad(p.indices) for p in parts]),
            torch.cat([pad(p.values) for p in parts]),
            parts[0].n_features,
        )
