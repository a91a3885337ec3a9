"""Feature grids, planes and lines of the grid-based field models.

Contents:
    uniform_parameter        a parameter initialised U(low, high) (every grid, plane and line of the models)
    per_axis                 an int-or-list config value expanded to one entry per axis / parameter
    upsample_grid            structural super-resolution of one grid (align_corners resize)
    DenseGrids               L dense feature grids (multi-resolution; one level = a single dense grid)
    Planes                   feature planes sampled at coordinate pairs, combined by product or sum
    lerp_lines, line_product exact linear interpolation of 1D lines (align_corners), Hadamard product over lines
    resample_line            a line's values on another align_corners lattice
    ConditionLines           multi-resolution 1D lines, one per condition parameter and level (DRR-Net)
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from util.registry import ConfigError
from util.sampling import sample_grid

__all__ = ["uniform_parameter", "per_axis", "upsample_grid", "DenseGrids", "Planes", "lerp_lines", "line_product",
           "resample_line", "ConditionLines"]


def uniform_parameter(shape: Sequence[int], low: float, high: float) -> nn.Parameter:
    """A float32 parameter of ``shape`` drawn U(low, high) (one ``uniform_`` call: the draws of
    ``nn.init.uniform_`` on the same shape)."""
    return nn.Parameter(torch.empty(*shape).uniform_(low, high))


def per_axis(value: Union[int, Sequence[int]], n: int, key: str, unit: str = "one value per axis") -> List[int]:
    """An int (the same for all) or a sequence of exactly ``n`` ints -> list of n ints.

    Args:
        value: the config value.
        n: entries wanted (axes, condition parameters).
        key: config key for the error message, e.g. ``"model.grid_size"``.
        unit: what one entry is, for the error message.

    Raises:
        ConfigError: a sequence of another length.
    """
    if isinstance(value, numbers.Integral):
        return [int(value)] * n
    vals = [int(v) for v in value]
    if len(vals) != n:
        raise ConfigError(f"{key}: {list(value)} has {len(vals)} entries; expected an int or {n} values ({unit})")
    return vals


# ----------------------------------------------------------------------------------------------------
# Spatial grids
# ----------------------------------------------------------------------------------------------------
def upsample_grid(grid: Tensor, shape: Sequence[int]) -> Tensor:
    """Structural super-resolution of one grid: its values at the vertices of a ``shape`` lattice.

    Linear (2D: bilinear, 3D: trilinear) interpolation with align_corners=True, i.e. lattice vertex j of an
    n-point axis sits at ``2 j / (n - 1) - 1`` on both grids. Works in array space, so no coordinate
    convention is involved; equals sampling ``grid`` at the lattice's vertex coordinates.

    Args:
        grid: (C, *s) with len(s) in (1, 2, 3).
        shape: target spatial shape, same length as s.

    Returns:
        (C, *shape); ``grid`` itself when the shapes agree.
    """
    shape = tuple(int(n) for n in shape)
    if tuple(grid.shape[1:]) == shape:
        return grid
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
    return F.interpolate(grid[None], size=shape, mode=mode, align_corners=True)[0]


class DenseGrids(nn.Module):
    """L dense feature grids ``G^l`` of shapes ``shapes[l]`` with C channels each, init U(-a, a).

    Args:
        shapes: spatial shape of every grid in array order ((D, H, W) or (H, W)), each axis >= 2.
        channels: C (= d_fs).
        init_range: a of the uniform initialisation.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], channels: int, init_range: float = 1e-3):
        super().__init__()
        self.shapes: List[Tuple[int, ...]] = [tuple(int(n) for n in s) for s in shapes]
        if not self.shapes or len({len(s) for s in self.shapes}) != 1:
            raise ValueError(f"DenseGrids: need >= 1 grid, all with the same number of axes; got {self.shapes}")
        if any(n < 2 for s in self.shapes for n in s):
            raise ValueError(f"DenseGrids: every axis needs >= 2 vertices; got {self.shapes}")
        self.channels = int(channels)
        self.grids = nn.ParameterList(
            [uniform_parameter((self.channels, *s), -init_range, init_range) for s in self.shapes]
        )  # grids[l]: (C, *shapes[l])

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    @property
    def out_dim(self) -> int:
        """Channels of the concatenation over levels: L * C."""
        return self.num_levels * self.channels

    @property
    def max_shape(self) -> Tuple[int, ...]:
        """Per-axis maximum of the grid shapes."""
        return tuple(max(s[i] for s in self.shapes) for i in range(len(self.shapes[0])))

    def lattice(self, shape: Sequence[int]) -> Tensor:
        """Every grid super-resolved to ``shape`` and concatenated over channels: (L * C, *shape).

        Channel ``l * C + j`` is channel j of grid l.
        """
        return torch.cat([upsample_grid(g, shape) for g in self.grids], dim=0)

    def forward(self, x: Tensor) -> Tensor:
        """Sample every grid at x and concatenate: x (B, N, d) in [-1, 1] -> (B, N, L * C)."""
        return torch.cat([sample_grid(g, x) for g in self.grids], dim=-1)


# ----------------------------------------------------------------------------------------------------
# Feature planes
# ----------------------------------------------------------------------------------------------------
class Planes(nn.ParameterList):
    """Feature planes: plane i (C, R_i0, R_i1) is sampled (bilinear, align_corners) at the coordinate columns
    ``cols[i]`` (the first listed column runs along the plane's last axis, ``grid_sample`` order).

    A ``ParameterList`` of the planes (state-dict keys ``0``, ``1``, ...), plus how to read them.

    Args:
        planes: the plane tensors (C, R_a, R_b), initialised by the caller; wrapped as parameters.
        cols: per plane the two coordinate columns it is sampled at.
        padding_mode: ``grid_sample`` padding outside [-1, 1]: "zeros" or "border".
    """

    def __init__(self, planes: Sequence[Tensor], cols: Sequence[Sequence[int]], padding_mode: str = "zeros"):
        if len(planes) != len(cols):
            raise ValueError(f"Planes: {len(planes)} planes but {len(cols)} column pairs")
        super().__init__([p if isinstance(p, nn.Parameter) else nn.Parameter(p) for p in planes])
        self.cols: List[List[int]] = [[int(a) for a in c] for c in cols]
        self.padding_mode = padding_mode

    def sample(self, x: Tensor) -> List[Tensor]:
        """Every plane at x (B, N, D) -> list of (B, N, C)."""
        return [sample_grid(p, x[..., c], padding_mode=self.padding_mode) for p, c in zip(self, self.cols)]

    def product(self, x: Tensor, start: Optional[Tensor] = None) -> Tensor:
        """Hadamard product ``start * P_0(x) * P_1(x) * ...`` (left to right; ``start`` None: begin with P_0)."""
        out = start
        for v in self.sample(x):
            out = v if out is None else out * v
        return out

    def sum(self, x: Tensor) -> Tensor:
        """Sum of the planes' features at x: (B, N, C)."""
        return torch.stack(self.sample(x)).sum(0)


# ----------------------------------------------------------------------------------------------------
# Lines
# ----------------------------------------------------------------------------------------------------
def lerp_lines(lines: Tensor, t: Tensor, clamp: bool = True) -> Tensor:
    """Linear interpolation (align_corners) of P lines, line k at the positions t[..., k].

    Position t maps to fractional index ``s = t (H - 1)``, ``w = s - i0``. Gathers and elementwise operations
    only (fvcore counts no FLOPs for it). The two reference formulas, kept apart so that each model's outputs
    stay bit for bit those of its reference:

    * ``clamp=True`` (DRR-Net): t clamped to [0, 1] (border), ``i0 = min(floor(s), H - 2)``, ``i1 = i0 + 1``,
      result ``v[i0] + w (v[i1] - v[i0])``.
    * ``clamp=False`` (the reference baselines): t as is, ``i0 = floor(s)``, ``i1 = min(i0 + 1, H - 1)``,
      result ``(1 - w) v[i0] + w v[i1]``; t < 0 indexes from the end of the line (Python wrap, i0 >= -H) and
      t > 1 + 1/(H - 1) raises IndexError.

    Args:
        lines: (P, H, C), H >= 2.
        t: (..., P), normally in [0, 1].
        clamp: see above.

    Returns:
        (..., P, C).
    """
    P, H, _ = lines.shape
    if H < 2:
        raise ValueError(f"lerp_lines: lines need >= 2 vertices, got {H}")
    s = (t.clamp(0.0, 1.0) if clamp else t) * (H - 1)     # (..., P)
    i0 = s.detach().floor()
    i0 = (i0.clamp(max=H - 2) if clamp else i0).long()     # (..., P)
    w = (s - i0.to(s.dtype)).unsqueeze(-1).to(lines.dtype)  # (..., P, 1)
    i1 = i0 + 1 if clamp else torch.clamp(i0 + 1, max=H - 1)
    k = torch.arange(P, device=lines.device).expand_as(i0)  # (..., P)
    v0 = lines[k, i0]                                       # (..., P, C)
    v1 = lines[k, i1]
    return v0 + w * (v1 - v0) if clamp else (1 - w) * v0 + w * v1


def line_product(lines: Sequence[Tensor], c: Tensor, clamp: bool = False) -> Tensor:
    """Hadamard product over k of the line lookups ``lerp(line_k, c[:, k])`` (Explorable-INR, FA-INR).

    Every lookup is :func:`lerp_lines` with the baselines' formula (``clamp=False``).

    Args:
        lines: d_c tensors, line k of shape (L_k, F) (lengths may differ).
        c: (n, >= d_c) positions; column k is looked up in line k.
        clamp: clamp the positions to [0, 1] first (the baselines' corrected option); False: the reference's
            unclamped, wrapping lookup.

    Returns:
        (n, F).
    """
    out = None
    for k, line in enumerate(lines):
        t = c[:, k:k + 1].to(line.dtype)                                        # (n, 1)
        if clamp:
            t = t.clamp(0.0, 1.0)
        v = lerp_lines(line[None], t, clamp=False)[:, 0]                        # (n, F)
        out = v if out is None else out * v
    return out


def _resample_matrix(m: int, n: int) -> Tensor:
    """(n, m) float64 matrix of :func:`resample_line` from m to n vertices (identity when m == n)."""
    if m == n:
        return torch.eye(n, dtype=torch.float64)
    s = torch.linspace(0.0, 1.0, n, dtype=torch.float64) * (m - 1)
    i0 = s.floor().clamp(max=m - 2).long()
    w = s - i0
    r = torch.zeros(n, m, dtype=torch.float64)
    r[torch.arange(n), i0] = 1.0 - w
    r[torch.arange(n), i0 + 1] += w
    return r


def resample_line(line: Tensor, n: int) -> Tensor:
    """Values of one line at the n vertices of an n-point align_corners lattice of [0, 1].

    Args:
        line: (H, C).
        n: target length.

    Returns:
        (n, C); ``line`` itself when H == n.
    """
    if line.shape[0] == n:
        return line
    t = torch.linspace(0.0, 1.0, n, device=line.device, dtype=torch.float32)
    return lerp_lines(line[None], t[:, None])[:, 0]          # (n, C)


class ConditionLines(nn.Module):
    """Multi-resolution 1D feature lines: for level l and condition parameter k a line of length r[l][k]
    with C channels, init U(-a, a).

    Two ways to read them:

    * :meth:`forward`: every line interpolated at its parameter's value, directly (no unification).
    * :meth:`unified` + :meth:`split`: "local-then-global" (DRR paper Eq. 5): per parameter k, its L lines
      resampled to that parameter's largest length H_k and concatenated (level-major channels), then every
      parameter's line resampled to the overall largest length H and all concatenated -> one (H, d_c*L*C)
      line for a refiner; :meth:`split` cuts it back into (d_c, H, L*C).

    Both give features ordered (parameter k, level l, channel j) -> index ``(k * L + l) * C + j``.

    Args:
        resolutions: (L, d_c) nested list of line lengths, each >= 2.
        channels: C (= d_fc).
        init_range: a of the uniform initialisation.
    """

    def __init__(self, resolutions: Sequence[Sequence[int]], channels: int, init_range: float = 1e-3):
        super().__init__()
        self.resolutions = [[int(n) for n in level] for level in resolutions]
        if not self.resolutions or len({len(level) for level in self.resolutions}) != 1:
            raise ValueError(f"ConditionLines: need (levels, cond_dim) lengths; got {resolutions}")
        if any(n < 2 for level in self.resolutions for n in level):
            raise ValueError(f"ConditionLines: every line needs >= 2 vertices; got {self.resolutions}")
        self.num_levels = len(self.resolutions)
        self.cond_dim = len(self.resolutions[0])
        self.channels = int(channels)
        # lines[l * cond_dim + k]: (r[l][k], C)
        self.lines = nn.ParameterList([
            uniform_parameter((n, self.channels), -init_range, init_range)
            for level in self.resolutions for n in level
        ])
        self.param_max = [max(level[k] for level in self.resolutions) for k in range(self.cond_dim)]  # H_k
        self.max_len = max(self.param_max)                                                          # H
        self.register_buffer("_unify", self._unification_matrix(), persistent=False)

    @property
    def out_dim(self) -> int:
        """d_c * L * C."""
        return self.cond_dim * self.num_levels * self.channels

    def line(self, level: int, k: int) -> Tensor:
        """The raw line of level ``level`` and parameter ``k``: (r[level][k], C)."""
        return self.lines[level * self.cond_dim + k]

    def forward(self, c: Tensor) -> Tensor:
        """Raw multi-resolution features: c (B, d_c) in [0, 1] -> (B, d_c * L * C)."""
        feats = []
        for k in range(self.cond_dim):
            for level in range(self.num_levels):
                feats.append(lerp_lines(self.line(level, k)[None], c[:, k:k + 1])[:, 0])  # (B, C)
        return torch.cat(feats, dim=-1)

    def _unification_matrix(self) -> Tensor:
        """The linear map of :meth:`unified` on the stacked raw lines: (d_c * L * H, sum of line lengths).

        Block ((k, l), line (l, k)) = R(H <- H_k) R(H_k <- r[l][k]), R(n <- m) the (n, m) matrix of
        :func:`resample_line` (identity when n = m); composed in float64, stored in float32.
        """
        H, L = self.max_len, self.num_levels
        offsets, o = {}, 0
        for level in range(L):
            for k in range(self.cond_dim):
                offsets[level, k] = o
                o += self.resolutions[level][k]
        m = torch.zeros(self.cond_dim * L * H, o, dtype=torch.float64)
        for k in range(self.cond_dim):
            glob = _resample_matrix(self.param_max[k], H)
            for level in range(L):
                r = self.resolutions[level][k]
                row, col = (k * L + level) * H, offsets[level, k]
                m[row:row + H, col:col + r] = glob @ _resample_matrix(r, self.param_max[k])
        return m.float()

    def unified(self) -> Tensor:
        """Local-then-global unification: (H, d_c * L * C).

        Per parameter k its L lines resampled to H_k and concatenated, then resampled to H: both steps are
        linear, so one product of a fixed matrix with the stacked lines computes all of them.
        """
        flat = self._unify.to(self.lines[0].dtype) @ torch.cat(list(self.lines), dim=0)  # (d_c*L*H, C)
        H, C = self.max_len, self.channels
        return flat.reshape(self.cond_dim, self.num_levels, H, C).permute(2, 0, 1, 3).reshape(H, -1)

    def split(self, line: Tensor) -> Tensor:
        """(H, d_c * L * C) -> (d_c, H, L * C): one line per parameter."""
        H = line.shape[0]
        return line.reshape(H, self.cond_dim, -1).transpose(0, 1)

    @staticmethod
    def sample_split(lines: Tensor, c: Tensor) -> Tensor:
        """Per-parameter interpolation of split lines: lines (d_c, H, F), c (B, d_c) -> (B, d_c * F)."""
        return lerp_lines(lines, c).flatten(-2)
