"""Pointwise refiners over lattice features (appendix B.1 of the DRR paper): RMSNorm, GLU block, GLU refiner."""
from __future__ import annotations

import math
from typing import Type

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "GLUBlock", "GLURefiner"]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dim with a learned per-channel scale.

    ``n(u) = u / sqrt(mean(u^2) + eps) * weight``; computed in float32, returned in the input dtype.

    Args:
        dim: channels D of the last dim.
        eps: added to the mean square (1e-6 as in the paper).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))  # (D,)

    def forward(self, u: Tensor) -> Tensor:
        """u: (..., D) -> (..., D)."""
        uf = u.float()
        out = uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.to(u.dtype) * self.weight


class GLUBlock(nn.Module):
    """Residual gated-linear-unit block of width D: ``u + W3(act(W1 n(u)) * W2 n(u))``.

    W1, W2: D -> floor(D * hidden_mult) and W3: back to D, all without bias; n = RMSNorm(D) (eps 1e-6).

    Args:
        dim: feature width D (input width = output width).
        hidden_mult: hidden width = floor(dim * hidden_mult).
        act_layer: activation class of the gate branch (ReLU in the paper).
        eps: RMSNorm epsilon.
    """

    def __init__(self, dim: int, hidden_mult: float = 2.0, act_layer: Type[nn.Module] = nn.ReLU, eps: float = 1e-6):
        super().__init__()
        hidden = int(math.floor(dim * hidden_mult))
        if hidden < 1:
            raise ValueError(f"GLUBlock: floor({dim} * {hidden_mult}) = {hidden} hidden units; need >= 1")
        self.hidden = hidden
        self.norm = RMSNorm(dim, eps)                  # weight (D,)
        self.w1 = nn.Linear(dim, hidden, bias=False)   # weight (H, D)
        self.w2 = nn.Linear(dim, hidden, bias=False)   # weight (H, D)
        self.w3 = nn.Linear(hidden, dim, bias=False)   # weight (D, H)
        self.act = act_layer()

    def forward(self, u: Tensor) -> Tensor:
        """u: (..., D) -> (..., D)."""
        n = self.norm(u)
        return u + self.w3(self.act(self.w1(n)) * self.w2(n))


class GLURefiner(nn.Module):
    """A stack of ``num_layers`` GLUBlocks of constant width; ``R(u)`` in ``G' = pi(G) + R(pi(G))``.

    The refiner is pointwise: it acts on the last dim only, so it is applied to every lattice vertex
    independently. It returns ``R(u)`` (the blocks' own residuals included); the caller adds the outer
    residual, so ``u + R(u)`` holds ``u`` twice plus the block updates (paper Eq. 3 with the blocks of
    appendix B.1, as in the reference code).

    Args:
        dim: feature width D.
        num_layers: number of blocks (>= 1).
        hidden_mult: hidden width of every block = floor(D * hidden_mult).
        act_layer: gate activation class.
    """

    def __init__(self, dim: int, num_layers: int, hidden_mult: float = 2.0, act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"GLURefiner: num_layers must be >= 1, got {num_layers}")
        self.dim = dim
        self.blocks = nn.Sequential(*[GLUBlock(dim, hidden_mult, act_layer) for _ in range(num_layers)])

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, u: Tensor) -> Tensor:
        """u: (..., D) -> (..., D)."""
        return self.blocks(u)
