"""Encodings of coordinates and features: sin/cos positional encodings and the multiresolution hash grid.

Contents:
    frequencies          the (K,) coefficients ``s pi 2^k`` of a sin/cos encoding
    positional_encoding  sin/cos encoding, in the DRR per-channel layout or the NeRF-style frequency-major one
    FeatureUpsamplingPE  module form of the DRR layout (DRR-Net's and the DRR image models' feature upsampling)
    HashGrid             multiresolution hash encoding with tiny-cuda-nn's HashGrid formulas (Instant-NGP)
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch
from torch import Tensor, nn

from models import fast_ops

__all__ = ["frequencies", "positional_encoding", "FeatureUpsamplingPE", "HashGrid", "PE_LAYOUTS", "HASH_PRIMES"]

PE_LAYOUTS = ("channel", "frequency")


def frequencies(num_freqs: int, scale: float = 1.0, device=None, dtype=torch.float32) -> Tensor:
    """``[s pi 2^0, ..., s pi 2^(K-1)]`` (s = ``scale``): the arguments' coefficients of a sin/cos encoding, (K,)."""
    return (math.pi * scale) * torch.pow(2.0, torch.arange(num_freqs, device=device, dtype=dtype))


def positional_encoding(u: Tensor, num_freqs: int, scale: float = 1.0, include_input: bool = False,
                        layout: str = "channel") -> Tensor:
    """sin/cos encoding of every channel u_c with the coefficients a_k = s pi 2^k, k < K (s = ``scale``).

    Layouts of the output:

    * ``"channel"`` (DRR feature upsampling): per channel ``[u_c,] sin(a_0 u_c) .. sin(a_{K-1} u_c),
      cos(a_0 u_c) .. cos(a_{K-1} u_c)``; channel 0's block first. The raw value (``include_input``) leads its
      channel's block.
    * ``"frequency"`` (NeRF-style coordinate encoding, FA-INR): ``[u,]`` then for k = 0..K-1, for each channel
      c: ``sin(a_k u_c), cos(a_k u_c)``. The raw input (``include_input``) comes first, whole.

    Args:
        u: (..., C) features or coordinates.
        num_freqs: K >= 1.
        scale: multiplier s on the argument (1 = the papers).
        include_input: keep the raw values (see the layouts).
        layout: "channel" or "frequency".

    Returns:
        (..., C * (2K + include_input)).

    Example:
        >>> positional_encoding(torch.tensor([[0.25]]), 2)   # sin(pi/4), sin(pi/2), cos(pi/4), cos(pi/2)
        tensor([[7.0711e-01, 1.0000e+00, 7.0711e-01, -4.3711e-08]])
    """
    coeff = frequencies(num_freqs, scale, u.device, u.dtype)      # (K,)
    if layout == "channel":
        arg = u[..., None] * coeff                                # (..., C, K)
        parts = [torch.sin(arg), torch.cos(arg)]
        if include_input:
            parts.insert(0, u[..., None])
        return torch.cat(parts, dim=-1).flatten(-2)               # (..., C * (2K [+1]))
    if layout == "frequency":
        arg = u[..., None, :] * coeff[:, None]                    # (..., K, C)
        enc = torch.stack([torch.sin(arg), torch.cos(arg)], dim=-1).reshape(*u.shape[:-1], -1)
        return torch.cat([u, enc], dim=-1) if include_input else enc
    raise ValueError(f"positional_encoding: layout must be one of {PE_LAYOUTS}, got {layout!r}")


class FeatureUpsamplingPE(nn.Module):
    """Module form of :func:`positional_encoding` (``"channel"`` layout) that reports its width.

    Args:
        in_dim: channels C.
        num_freqs: K >= 1.
        scale: argument multiplier.
        include_input: keep the raw value per channel.
    """

    def __init__(self, in_dim: int, num_freqs: int, scale: float = 1.0, include_input: bool = False):
        super().__init__()
        if num_freqs < 1:
            raise ValueError(f"FeatureUpsamplingPE: num_freqs must be >= 1, got {num_freqs}")
        self.in_dim, self.num_freqs, self.scale, self.include_input = in_dim, num_freqs, float(scale), include_input

    @property
    def out_dim(self) -> int:
        return self.in_dim * (2 * self.num_freqs + int(self.include_input))

    def coefficients(self, device=None, dtype=torch.float32) -> Tensor:
        """The (K,) argument coefficients ``scale pi 2^k`` (what the fused CPU pipeline evaluates)."""
        return frequencies(self.num_freqs, self.scale, device, dtype)

    def forward(self, u: Tensor) -> Tensor:
        """u: (..., C) -> (..., out_dim)."""
        return positional_encoding(u, self.num_freqs, self.scale, self.include_input)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_freqs={self.num_freqs}, scale={self.scale}, "
                f"include_input={self.include_input}")


# ----------------------------------------------------------------------------------------------------
# Multiresolution hash grid
# ----------------------------------------------------------------------------------------------------
HASH_PRIMES = (1, 2654435761, 805459861)
"""tiny-cuda-nn's coherent prime hash factors of the first three dims."""
_U32 = 0xFFFFFFFF


def _mul_u32(a: Tensor, p: int) -> Tensor:
    """``(a * p) mod 2^32`` for int64 ``a`` in [0, 2^32) and a constant p < 2^32, without int64 overflow."""
    lo, hi = p & 0xFFFF, p >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _U32


def tcnn_level_scales(levels: int, base_resolution: int, per_level_scale: float) -> List[float]:
    """tcnn's ``grid_scale`` per level, in float32 as the CUDA code: ``exp2(l log2(b)) N_min - 1``."""
    log2_b = np.float32(np.log2(np.float32(per_level_scale)))
    return [float(np.float32(np.exp2(np.float32(lv) * log2_b)) * np.float32(base_resolution) - np.float32(1.0))
            for lv in range(levels)]


class HashGrid(nn.Module):
    """Multiresolution hash encoding (Instant-NGP) with tiny-cuda-nn's ``HashGrid`` formulas, pure PyTorch.

    Level l (l = 0..L-1): ``scale_l = N_min b^l - 1`` (float32, as tcnn; b = ``per_level_scale`` or, when not
    given, ``exp((ln N_max - ln N_min) / (L - 1))``), ``res_l = ceil(scale_l) + 1`` vertices per axis, table of
    ``size_l = min(res_l^d, T)`` entries x F features (``tcnn_padding``: ``min(next multiple of 8 of res_l^d, T)``
    as tcnn allocates), initialised U(-a, a).

    Lookup of a point x (tcnn's domain is [0, 1]^d): ``p = x scale_l + 0.5`` per axis, corner ``floor(p)`` (as a
    32-bit unsigned integer: a negative position wraps to 2^32 + floor(p), as tcnn's ``(uint32_t)(int)``),
    bilinear / trilinear weights from ``frac(p)``. A level with ``res_l^d <= size_l`` is dense: index
    ``c_0 + c_1 res_l (+ c_2 res_l^2)`` (uint32 arithmetic); otherwise hashed: ``XOR_i c_i pi_i`` with
    ``pi = (1, 2654435761, 805459861)`` (uint32); both ``mod size_l``. Coordinate column i is tcnn's dim i.
    Output: the levels' F features concatenated level-major, (..., L F). Differentiable w.r.t. the tables.

    Args:
        dims: input dims d (2 or 3).
        levels: L.
        features: F per level.
        log2_table_size: log2 of T, the most entries of a level.
        base_resolution: N_min.
        max_resolution: N_max, defines b when ``per_level_scale`` is None.
        per_level_scale: b directly (tcnn's parameter).
        init_range: a of the table init (tcnn: 1e-4).
        tcnn_padding: allocate tcnn's padded level sizes (multiple of 8 entries) instead of the logical ones.
    """

    def __init__(self, dims: int = 2, levels: int = 16, features: int = 2, log2_table_size: int = 19,
                 base_resolution: int = 16, max_resolution: int = 4096, per_level_scale: float = None,
                 init_range: float = 1e-4, tcnn_padding: bool = False):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"HashGrid: dims must be 2 or 3, got {dims}")
        if levels < 1 or features < 1 or not 1 <= log2_table_size <= 30 or base_resolution < 1:
            raise ValueError(f"HashGrid: bad sizes levels={levels}, features={features}, "
                             f"log2_table_size={log2_table_size}, base_resolution={base_resolution}")
        if per_level_scale is None:
            per_level_scale = (math.exp((math.log(max_resolution) - math.log(base_resolution)) / (levels - 1))
                               if levels > 1 else 1.0)
        self.dims, self.levels, self.features = int(dims), int(levels), int(features)
        self.per_level_scale = float(per_level_scale)
        self.table_size = 1 << int(log2_table_size)
        self.scales: List[float] = tcnn_level_scales(self.levels, base_resolution, self.per_level_scale)
        self.resolutions: List[int] = [int(math.ceil(s)) + 1 for s in self.scales]
        self.sizes: List[int] = []
        self.dense: List[bool] = []
        for r in self.resolutions:
            n = r ** self.dims
            if tcnn_padding:
                n = (n + 7) // 8 * 8
            size = min(n, self.table_size)
            self.sizes.append(size)
            self.dense.append(r ** self.dims <= size)
        self.tables = nn.ParameterList([
            nn.Parameter(torch.empty(n, self.features).uniform_(-init_range, init_range)) for n in self.sizes
        ])  # tables[l]: (size_l, F)
        corners = [[(k >> i) & 1 for i in range(self.dims)] for k in range(1 << self.dims)]
        self.register_buffer("_corners", torch.tensor(corners, dtype=torch.int64), persistent=False)  # (2^d, d)

    @property
    def out_dim(self) -> int:
        """L * F."""
        return self.levels * self.features

    def level_stencil(self, x: Tensor, level: int):
        """Table rows and weights of the 2^d corners of points x (M, d) at ``level``: idx (M, 2^d) int64,
        w (M, 2^d) float32 (corner k has offset bit i of k along dim i)."""
        pos = (x.double() * self.scales[level] + 0.5).float()      # tcnn: fmaf(scale, x, 0.5f)
        fl = torch.floor(pos)
        frac = pos - fl                                            # (M, d)
        cell = fl.long() & _U32                                    # (uint32_t)(int)floor(p)
        off = self._corners.to(x.device)                           # (K, d)
        c = (cell[:, None, :] + off) & _U32                        # (M, K, d) corner positions, uint32
        w = torch.where(off.bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)  # (M, K)
        res, size = self.resolutions[level], self.sizes[level]
        if self.dense[level]:
            idx = c[..., 0]
            for i in range(1, self.dims):
                idx = idx + c[..., i] * (res ** i)
            idx = idx & _U32
        else:
            idx = _mul_u32(c[..., 0], HASH_PRIMES[0])
            for i in range(1, self.dims):
                idx = idx ^ _mul_u32(c[..., i], HASH_PRIMES[i])
        return idx % size, w

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d) positions (tcnn's domain [0, 1]^d) -> (..., L * F) features, level-major."""
        if x.shape[-1] != self.dims:
            raise ValueError(f"HashGrid: x must have {self.dims} columns, got {tuple(x.shape)}")
        flat = x.reshape(-1, self.dims)
        feats = []
        for level, table in enumerate(self.tables):
            idx, w = self.level_stencil(flat, level)
            feats.append(fast_ops.gather_interp(table, idx, w))     # (M, F)
        return torch.cat(feats, dim=-1).reshape(*x.shape[:-1], self.out_dim)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, levels={self.levels}, features={self.features}, table_size={self.table_size}, "
                f"resolutions={self.resolutions}")
