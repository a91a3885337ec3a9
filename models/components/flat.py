"""The reference baselines' per-point input ``u = [x, c]`` (K-Planes, Explorable-INR, FA-INR).

Contents:
    flat_input      repeat c along the points, concatenate with x, flatten: (B*N, d + d_c)
    FlatInputModel  FieldModel whose subclasses define ``forward_flat(u) -> (n, C)``
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.base import FieldModel

__all__ = ["flat_input", "FlatInputModel"]


def flat_input(x: Tensor, c: Tensor) -> Tensor:
    """The reference surrogate wrapper's input: repeat c along the points, concatenate, flatten.

    Args:
        x: (B, N, d) coordinates in [-1, 1], column 0 = last array axis (grid_sample order).
        c: (B, d_c) conditions, normally in [0, 1].

    Returns:
        u: (B*N, d + d_c), spatial columns first.
    """
    B, N, _ = x.shape
    return torch.cat([x, c[:, None, :].expand(B, N, c.shape[-1]).to(x.dtype)], dim=-1).reshape(B * N, -1)


class FlatInputModel(FieldModel):
    """Base of the baselines, which (as the reference wrapper) work on flat per-point inputs ``u = [x, c]``:
    a subclass defines ``forward_flat(u) -> (n, C)``."""

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, N, d) in [-1, 1] (column 0 = W axis); c: (B, d_c) in [0, 1] -> (B, N, C)."""
        B, N, _ = x.shape
        return self.forward_flat(flat_input(x, c)).reshape(B, N, -1)

    def forward_flat(self, u: Tensor) -> Tensor:
        """u: (n, d + d_c) -> (n, C)."""
        raise NotImplementedError
