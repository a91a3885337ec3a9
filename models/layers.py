"""Reusable blocks of the grid surrogates: embeddings, refiners, feature upsampling and decoders.

Shapes use named dims: ``B`` conditions (members) in a batch, ``N`` points per condition, ``d`` spatial
dims (2 or 3), ``P`` lattice vertices, ``C`` channels, ``L`` levels. Spatial shapes are in array order
``(D, H, W)`` (3D) or ``(H, W)`` (2D); coordinates follow ``docs/design.md`` (column 0 = last array axis,
[-1, 1], align_corners). Conditions are in [0, 1].

Contents:
    RMSNorm, GLUBlock, GLURefiner      pointwise refiners over lattice features (appendix B.1 of the DRR paper)
    positional_encoding, FeatureUpsamplingPE
                                       per-channel sin/cos feature upsampling
    MLPDecoder                         plain ReLU MLP head
    DenseGrids                         multi-resolution dense feature grids (+ structural super-resolution)
    ConditionLines                     multi-resolution 1D lines, one per condition parameter and level
    lerp_lines, resample_line          exact linear interpolation of 1D lines (align_corners)
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Type

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from util.registry import ConfigError
from util.sampling import sample_grid

__all__ = [
    "RMSNorm", "GLUBlock", "GLURefiner", "positional_encoding", "FeatureUpsamplingPE", "MLPDecoder",
    "DenseGrids", "ConditionLines", "lerp_lines", "resample_line", "upsample_grid",
]


# ----------------------------------------------------------------------------------------------------
# Refiner blocks
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# Positional-encoding feature upsampling
# ----------------------------------------------------------------------------------------------------
def positional_encoding(u: Tensor, num_freqs: int, scale: float = 1.0, include_input: bool = False) -> Tensor:
    """Per-channel sin/cos feature upsampling.

    Channel value ``u`` becomes ``[sin(s pi 2^0 u), ..., sin(s pi 2^(K-1) u), cos(s pi 2^0 u), ...,
    cos(s pi 2^(K-1) u)]`` (s = ``scale``), preceded by ``u`` itself when ``include_input``. The outputs of
    channel 0 come first, then channel 1, ...

    Args:
        u: (..., C) features.
        num_freqs: K >= 1.
        scale: multiplier on the argument (1 = the paper).
        include_input: prepend the raw value per channel (the reference code does not).

    Returns:
        (..., C * (2K + include_input)).

    Example:
        >>> positional_encoding(torch.tensor([[0.25]]), 2)   # sin(pi/4), sin(pi/2), cos(pi/4), cos(pi/2)
        tensor([[7.0711e-01, 1.0000e+00, 7.0711e-01, -4.3711e-08]])
    """
    coeff = (math.pi * scale) * torch.pow(2.0, torch.arange(num_freqs, device=u.device, dtype=u.dtype))  # (K,)
    arg = u[..., None] * coeff                                    # (..., C, K)
    parts = [torch.sin(arg), torch.cos(arg)]
    if include_input:
        parts.insert(0, u[..., None])
    return torch.cat(parts, dim=-1).flatten(-2)                   # (..., C * (2K [+1]))


class FeatureUpsamplingPE(nn.Module):
    """Module form of :func:`positional_encoding` that reports its width.

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

    def forward(self, u: Tensor) -> Tensor:
        """u: (..., C) -> (..., out_dim)."""
        return positional_encoding(u, self.num_freqs, self.scale, self.include_input)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_freqs={self.num_freqs}, scale={self.scale}, "
                f"include_input={self.include_input}")


# ----------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------
class MLPDecoder(nn.Module):
    """``num_layers`` linear layers in total, ReLU between them, no activation after the last.

    ``in_dim -> width -> ... -> width -> out_dim``; with ``num_layers == 1`` a single ``in_dim -> out_dim``.

    Args:
        in_dim: input width.
        width: hidden width.
        num_layers: linear layers in total (>= 1).
        out_dim: output width.
        act_layer: activation class between layers.
    """

    def __init__(self, in_dim: int, width: int, num_layers: int, out_dim: int = 1,
                 act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLPDecoder: num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [width] * (num_layers - 1) + [out_dim]
        layers: List[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))  # weight (dims[i+1], dims[i]), bias (dims[i+1],)
            if i < num_layers - 1:
                layers.append(act_layer())
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    @property
    def linears(self) -> List[nn.Linear]:
        """The linear layers in order (ReLU between them)."""
        return [m for m in self.net if isinstance(m, nn.Linear)]

    def forward(self, h: Tensor) -> Tensor:
        """h: (..., in_dim) -> (..., out_dim)."""
        return self.net(h)


# ----------------------------------------------------------------------------------------------------
# Output initialisation (the collapse guard)
# ----------------------------------------------------------------------------------------------------
AUTO_OUTPUT_MEAN = "auto"
"""``init_output_mean: auto``: the program replaces it with the training mean of the normalized values
(``util.runs.build_model`` reads it from the dataset); a model built by hand keeps its default init."""


def check_init_output_mean(value, key: str = "model.init_output_mean"):
    """Validate an ``init_output_mean`` value: None, "auto" or a finite number; returns it unchanged."""
    if value is None or value == AUTO_OUTPUT_MEAN:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{key} must be a number, 'auto' or null, got {value!r}")
    return value


@torch.no_grad()
def init_output_bias(layer: nn.Linear, mean: float, sigmoid: bool) -> None:
    """Set ``layer``'s bias so that the model output starts at about ``mean`` (a data-space value).

    With a sigmoid after ``layer`` the bias is ``logit(mean)`` (mean clipped to [1e-4, 1 - 1e-4]), else
    ``mean`` itself. Guards against the early collapse of a sigmoid output whose data mean is far from 0.5:
    the first Adam steps push every pre-activation the same way, the sigmoid saturates and all gradients
    underflow to 0 (see DRRNet's docstring).
    """
    mean = float(mean)
    if sigmoid:
        m = min(max(mean, 1e-4), 1.0 - 1e-4)
        mean = float(torch.logit(torch.tensor(m, dtype=torch.float64)))
    layer.bias.fill_(mean)


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
            [nn.Parameter(torch.empty(self.channels, *s).uniform_(-init_range, init_range)) for s in self.shapes]
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
# Condition lines
# ----------------------------------------------------------------------------------------------------
def lerp_lines(lines: Tensor, t: Tensor) -> Tensor:
    """Linear interpolation (align_corners) of P lines, line k at the positions t[..., k].

    Position t in [0, 1] maps to fractional index ``t (H - 1)``; t is clamped to [0, 1] (border). Exact:
    ``v[i0] + w (v[i0 + 1] - v[i0])`` with ``i0 = min(floor(t (H - 1)), H - 2)``.

    Args:
        lines: (P, H, C), H >= 2.
        t: (..., P) in [0, 1].

    Returns:
        (..., P, C).
    """
    P, H, _ = lines.shape
    if H < 2:
        raise ValueError(f"lerp_lines: lines need >= 2 vertices, got {H}")
    s = t.clamp(0.0, 1.0) * (H - 1)                         # (..., P)
    i0 = s.detach().floor().clamp(max=H - 2).long()         # (..., P)
    w = (s - i0.to(s.dtype)).unsqueeze(-1).to(lines.dtype)  # (..., P, 1)
    k = torch.arange(P, device=lines.device).expand_as(i0)  # (..., P)
    v0 = lines[k, i0]                                       # (..., P, C)
    v1 = lines[k, i0 + 1]
    return v0 + w * (v1 - v0)


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
            nn.Parameter(torch.empty(n, self.channels).uniform_(-init_range, init_range))
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
