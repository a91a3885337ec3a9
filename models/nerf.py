"""Radiance fields for NeRF (spec vision 3.2-3.3): the contract the NeRF task renders through, and vanilla NeRF.

A radiance field maps world points (and view directions) to a density and a color. On top of the
:class:`models.base.FieldModel` contract it provides::

    density(x: (S, 3)) -> sigma (S,)                                  # visibility / occupancy passes (no grad)
    rgb_sigma(x: (S, 3), d: (S, 3)) -> (rgb (S, 3), sigma (S,))       # the rendering pass
    forward(x: (B, N, 3), c: (B, 0), d: (B, N, 3)) -> (B, N, 4)       # [r, g, b, sigma], for generic callers

``d`` are unit view directions (camera to point). The NeRF task (tasks/nerf/task.py) calls ``forward`` for the
rendering pass (so a wrapped data-parallel model synchronizes its gradients) and ``density`` on the unwrapped
model.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from models.base import FieldModel
from models.components.encodings import HashGrid
from models.components.grids import DenseGrids, Planes, uniform_parameter
from models.components.lattice import RefinedLatticeMixin
from models.components.mlp import MLP
from models.components.refiners import GLURefiner
from util.registry import ConfigError, register
from util.sampling import sample_grid

__all__ = ["RadianceField", "frequency_encoding", "VanillaNeRF", "trunc_exp", "spherical_harmonics_deg4",
           "GridRadianceField", "NGPRadianceField", "MRGridRadianceField", "MRGridDRRRadianceField",
           "TriPlaneRadianceField", "TriPlaneDRRRadianceField", "DenseRadianceField", "DenseDRRRadianceField",
           "PAPER_NERF_MODELS"]


class RadianceField(FieldModel):
    """Base class of the radiance fields (see the module docstring)."""

    def begin_step(self, step: int) -> None:
        """Called by the NeRF task at the start of every training step (before any pass); default: nothing.
        Models with a per-step cache (the DRR grids' refined lattice) drop it here."""

    def density(self, x: Tensor) -> Tensor:
        """Density at world points ``(S, 3)``: ``(S,)``, >= 0."""
        raise NotImplementedError

    def rgb_sigma(self, x: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
        """Color in [0, 1] ``(S, 3)`` and density ``(S,)`` at world points ``x (S, 3)`` seen along ``d (S, 3)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, c: Optional[Tensor] = None, d: Optional[Tensor] = None) -> Tensor:
        """``(B, N, 4)`` = [rgb, sigma] at points ``x (B, N, 3)`` along directions ``d (B, N, 3)`` (default +z:
        fields whose color depends on the direction need ``d``); ``c (B, 0)`` is unused (a single scene)."""
        if d is None:
            d = torch.zeros_like(x)
            d[..., 2] = 1.0
        rgb, sigma = self.rgb_sigma(x.reshape(-1, 3), d.reshape(-1, 3))
        return torch.cat([rgb, sigma[:, None].to(rgb.dtype)], dim=-1).reshape(*x.shape[:-1], 4)


def frequency_encoding(x: Tensor, n_freqs: int) -> Tensor:
    """``[x, sin(2^k x) for k < n_freqs, cos(2^k x) for k < n_freqs]`` (all sines first, frequency-major, no pi):
    ``(..., D)`` -> ``(..., D (1 + 2 n_freqs))`` (spec vision 3.2)."""
    if n_freqs == 0:
        return x
    freqs = 2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device)
    xb = (x[..., None, :] * freqs[:, None]).reshape(*x.shape[:-1], n_freqs * x.shape[-1])
    return torch.cat([x, torch.sin(xb), torch.cos(xb)], dim=-1)


@register("model", "vanilla_nerf")
class VanillaNeRF(RadianceField):
    """Vanilla NeRF MLP (spec vision 3.2, config 3 of ``train_mlp_nerf.py``; ~596k parameters with the defaults).

    Raw world positions (no box normalization, no inside mask), position encoding with ``pos_freqs`` octaves (63
    values), direction encoding with ``dir_freqs`` (27). Trunk: ``depth`` Linear+ReLU layers of ``width``, the
    position encoding concatenated again to the input of layer ``skip_layer + 1``; density ReLU(Linear width ->
    1); color: Linear width -> width (bottleneck, no activation) || direction encoding -> Linear ->
    ``width // 2`` + ReLU -> Linear -> 3 -> sigmoid. Xavier-uniform weights, zero biases.

    Args:
        width: trunk width (256).
        depth: trunk layers (8).
        skip_layer: the position encoding re-enters after this many trunk layers (5; 0 disables).
        pos_freqs: octaves of the position encoding (10).
        dir_freqs: octaves of the direction encoding (4).
    """

    def __init__(self, width: int = 256, depth: int = 8, skip_layer: int = 5, pos_freqs: int = 10,
                 dir_freqs: int = 4):
        super().__init__()
        for key, val, lo in (("width", width, 2), ("depth", depth, 1), ("skip_layer", skip_layer, 0),
                             ("pos_freqs", pos_freqs, 0), ("dir_freqs", dir_freqs, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"model.{key} must be an integer >= {lo}, got {val!r}")
        if skip_layer >= depth:
            raise ValueError(f"model.skip_layer must be < model.depth ({depth}), got {skip_layer}")
        self.pos_freqs, self.dir_freqs, self.skip_layer = pos_freqs, dir_freqs, skip_layer
        p_dim, d_dim = 3 * (1 + 2 * pos_freqs), 3 * (1 + 2 * dir_freqs)
        layers = []
        for i in range(depth):
            fan_in = p_dim if i == 0 else width + (p_dim if skip_layer and i == skip_layer else 0)
            layers.append(nn.Linear(fan_in, width))
        self.trunk = nn.ModuleList(layers)
        self.sigma_head = nn.Linear(width, 1)
        self.bottleneck = nn.Linear(width, width)
        self.color_hidden = nn.Linear(width + d_dim, width // 2)
        self.color_out = nn.Linear(width // 2, 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _trunk(self, x: Tensor) -> Tensor:
        enc = frequency_encoding(x, self.pos_freqs)
        h = enc
        for i, layer in enumerate(self.trunk):
            if self.skip_layer and i == self.skip_layer:
                h = torch.cat([h, enc], dim=-1)
            h = torch.relu(layer(h))
        return h

    def density(self, x: Tensor) -> Tensor:
        return torch.relu(self.sigma_head(self._trunk(x)))[:, 0]

    def rgb_sigma(self, x: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
        h = self._trunk(x)
        sigma = torch.relu(self.sigma_head(h))[:, 0]
        g = torch.cat([self.bottleneck(h), frequency_encoding(d, self.dir_freqs)], dim=-1)
        rgb = torch.sigmoid(self.color_out(torch.relu(self.color_hidden(g))))
        return rgb, sigma


# ----------------------------------------------------------------------------------------------------
# grid radiance fields (spec vision 3.2-3.3)
# ----------------------------------------------------------------------------------------------------
class _TruncExp(torch.autograd.Function):
    """exp in fp32 whose backward clamps the exponent at 15 (instant-NGP's truncated exponential)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D401
        x = x.float()
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """``exp(x)`` computed in fp32; the gradient is ``exp(min(x, 15))`` (spec vision 3.2)."""
    return _TruncExp.apply(x)


def spherical_harmonics_deg4(d: Tensor) -> Tensor:
    """The 16 real spherical harmonics of degree < 4 of unit directions: ``(..., 3)`` -> ``(..., 16)``.

    Orthonormal real basis (tcnn's SphericalHarmonics degree 4 up to its choice of signs; spec vision 4 notes any
    fixed orthonormal basis is equivalent when training from scratch). Band l occupies columns l^2 .. (l+1)^2 - 1.
    """
    x, y, z = d.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * x * z, 0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (3 * xx - yy), 2.8906114426405538 * x * y * z,
        0.45704579946446572 * y * (1 - 5 * zz), 0.3731763325901154 * z * (5 * zz - 3),
        0.45704579946446572 * x * (1 - 5 * zz), 1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (xx - 3 * yy),
    ], dim=-1)


def _int_key(key: str, value, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigError(f"model.{key} must be an integer >= {low}, got {value!r}")
    return int(value)


def _pos_key(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"model.{key} must be a number > 0, got {value!r}")
    return float(value)


def _shape3(key: str, value, dims: int = 3) -> Tuple[int, ...]:
    """An int (cube / square) or ``dims`` ints in array order -> shape, every axis >= 2."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        shape = (int(value),) * dims
    elif isinstance(value, (list, tuple)) and len(value) == dims and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        shape = tuple(int(v) for v in value)
    else:
        raise ConfigError(f"model.{key} must be an int or a list of {dims} ints, got {value!r}")
    if any(n < 2 for n in shape):
        raise ConfigError(f"model.{key}: every axis needs >= 2 vertices, got {value!r}")
    return shape


class GridRadianceField(RadianceField):
    """Common part of the grid radiance fields (spec vision 3.2): box normalization, density and color heads.

    ``features(u (S, 3)) -> (S, D)`` is the encoder (subclasses); ``u`` are the points in the box mapped to
    [0, 1]^3 (``unit_box``, NGP) or [-1, 1]^3 (the DRR grids). Density MLP ``D -> mlp_width -> 1 + geo_features``
    (one hidden layer, ReLU, no biases) -> ``[s, geometry features]``; density = ``trunc_exp(s - 1)`` x
    inside-box indicator (inclusive for NGP, strict for the DRR grids, spec 5.11); color = sigmoid of the MLP
    ``[SH_4(d) (16) || geometry features] -> color_width (x color_hidden_layers) -> 3`` (ReLU, no biases).
    All linear layers Xavier-uniform (tcnn's FullyFusedMLP replaced, spec 4).
    """

    def __init__(self, aabb: Sequence[float], feature_dim: int, mlp_width: int, geo_features: int, color_width: int,
                 color_hidden_layers: int, unit_box: bool, inclusive: bool):
        super().__init__()
        try:
            box = [float(v) for v in aabb]
        except (TypeError, ValueError):
            box = []
        if len(box) != 6 or not all(math.isfinite(v) for v in box) or not all(box[i] < box[i + 3] for i in range(3)):
            raise ConfigError(f"model.aabb must be 6 numbers (xmin, ymin, zmin, xmax, ymax, zmax) with min < max, "
                              f"got {aabb!r}")
        self.register_buffer("aabb", torch.tensor(box, dtype=torch.float32), persistent=False)
        self.unit_box, self.inclusive = bool(unit_box), bool(inclusive)
        self.geo_features = _int_key("geo_features", geo_features, 0)
        self.density_mlp = MLP([feature_dim, _int_key("mlp_width", mlp_width, 1), 1 + self.geo_features],
                               bias=False, init="xavier_uniform")
        hidden = _int_key("color_hidden_layers", color_hidden_layers, 0)
        self.color_mlp = MLP([16 + self.geo_features] + [_int_key("color_width", color_width, 1)] * hidden + [3],
                             bias=False, init="xavier_uniform")

    def features(self, u: Tensor) -> Tensor:
        """Encoder: normalized points ``(S, 3)`` -> ``(S, D)``."""
        raise NotImplementedError

    def _normalize(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """World points (S, 3) -> (normalized points (S, 3), inside-box mask (S,))."""
        lo, hi = self.aabb[:3].to(x.dtype), self.aabb[3:].to(x.dtype)
        u = (x - lo) / (hi - lo)
        if self.inclusive:
            inside = ((u >= 0) & (u <= 1)).all(-1)
        else:
            inside = ((u > 0) & (u < 1)).all(-1)
        return (u if self.unit_box else u * 2 - 1), inside

    def _geometry(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        u, inside = self._normalize(x)
        h = self.density_mlp(self.features(u))
        sigma = trunc_exp(h[:, 0] - 1) * inside
        return sigma, h[:, 1:]

    def density(self, x: Tensor) -> Tensor:
        return self._geometry(x)[0]

    def rgb_sigma(self, x: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
        sigma, geo = self._geometry(x)
        sh = spherical_harmonics_deg4(d.to(geo.dtype))
        rgb = torch.sigmoid(self.color_mlp(torch.cat([sh, geo], dim=-1)))
        return rgb, sigma

    def head_parameters(self) -> List[nn.Parameter]:
        return list(self.density_mlp.parameters()) + list(self.color_mlp.parameters())


@register("model", "ngp_nerf")
class NGPRadianceField(GridRadianceField):
    """NGP radiance field (spec vision 3.2, config 0 of ``configs/nerf/*.yaml``).

    Points in the box mapped to [0, 1]^3 (inside test inclusive) -> multiresolution hash grid (tcnn formulas,
    models/components/encodings.HashGrid, 3D) -> density MLP -> ``trunc_exp(s - 1)``; color head on SH_4 and 15
    geometry features. Paper: 16 levels x 2 features, T = 2^19, N_min 16, N_max 4096 (growth 1.4473): 12,599,904
    table parameters (logical sizes), density MLP 32 -> 64 -> 16, color head 31 -> 64 -> 64 -> 3.

    Args:
        aabb: scene box (set by the program from ``task.aabb``).
        levels: hash-grid levels L.
        features_per_level: F.
        log2_hashmap_size: log2 of the most entries of a level.
        base_resolution: N_min.
        max_resolution: N_max (growth = exp((ln N_max - ln N_min) / (L - 1))).
        init_range: table init U(-init_range, init_range).
        tcnn_padding: allocate tcnn's level sizes rounded up to multiples of 8 entries.
        mlp_width: hidden width of the density MLP.
        geo_features: geometry features passed to the color head.
        color_width: hidden width of the color head.
        color_hidden_layers: hidden layers of the color head.
    """

    def __init__(self, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5), levels: int = 16,
                 features_per_level: int = 2, log2_hashmap_size: int = 19, base_resolution: int = 16,
                 max_resolution: int = 4096, init_range: float = 1e-4, tcnn_padding: bool = False,
                 mlp_width: int = 64, geo_features: int = 15, color_width: int = 64, color_hidden_layers: int = 2):
        levels = _int_key("levels", levels, 1)
        feats = _int_key("features_per_level", features_per_level, 1)
        log2 = _int_key("log2_hashmap_size", log2_hashmap_size, 1)
        if log2 > 30:
            raise ConfigError(f"model.log2_hashmap_size must be <= 30, got {log2}")
        base = _int_key("base_resolution", base_resolution, 1)
        top = _int_key("max_resolution", max_resolution, 1)
        if levels > 1 and top < base:
            raise ConfigError(f"model.max_resolution ({top}) must be >= model.base_resolution ({base})")
        super().__init__(aabb, levels * feats, mlp_width, geo_features, color_width, color_hidden_layers,
                         unit_box=True, inclusive=True)
        self.encoding = HashGrid(3, levels, feats, log2, base, top, None, _pos_key("init_range", init_range),
                                 bool(tcnn_padding))

    def features(self, u: Tensor) -> Tensor:
        return self.encoding(u)

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``hash_grid`` and ``heads`` (density MLP and color head)."""
        return {"hash_grid": list(self.encoding.parameters()), "heads": self.head_parameters()}


class _StepRefined:
    """The refined lattices of a DRR radiance field, computed once per training step (mix into a RadianceField).

    Subclasses implement ``_refined_lattices(chunk)`` (the list of refined lattices, computed in the current
    grad mode) and ``_refine_params()`` (the parameters they depend on). :meth:`_lattices` returns:

    * baked: the bake cache;
    * training, ``refine_per_pass`` False (default): one refinement per step, computed with autograd on the
      first call of the step (even from a no-grad pass: the occupancy update or the visibility pass) and shared
      by every later pass of the step (those under no_grad just read it). The cache is keyed by the step given
      to :meth:`begin_step` and the parameters' in-place versions, so an optimizer step (or a load) invalidates
      it even without ``begin_step``;
    * otherwise (eval unbaked, or ``refine_per_pass`` True = the reference's behaviour, spec 3.3 "training
      cost"): refined at every call.
    """

    def _init_refine(self, refine_per_pass: bool, bake_chunk: int) -> None:
        self.refine_per_pass = bool(refine_per_pass)
        self.bake_chunk = _int_key("bake_chunk", bake_chunk, 1)
        self._step_token: Optional[int] = None
        self._step_key = None
        self._step_cache: Optional[List[Tensor]] = None
        self._baked_lattices: Optional[List[Tensor]] = None
        self.register_load_state_dict_pre_hook(_StepRefined._drop_caches)

    def _refined_lattices(self, chunk: Optional[int] = None) -> List[Tensor]:
        raise NotImplementedError

    def _refine_params(self) -> List[nn.Parameter]:
        raise NotImplementedError

    def _lattices(self) -> List[Tensor]:
        if self.is_baked and self._baked_lattices is not None:
            return self._baked_lattices
        if not self.training or self.refine_per_pass or torch.is_inference_mode_enabled():
            return self._refined_lattices()
        key = (self._step_token, tuple(p._version for p in self._refine_params()))
        if self._step_cache is None or key != self._step_key:
            self._step_cache = None
            with torch.enable_grad():
                self._step_cache = self._refined_lattices()
            self._step_key = key
        return self._step_cache

    def begin_step(self, step: int) -> None:
        """A new training step: the next pass refines again."""
        self._step_token = int(step)
        self._step_cache = None

    def train(self, mode: bool = True):
        self._step_cache = None
        return super().train(mode)

    @torch.no_grad()
    def bake(self, chunk_size: Optional[int] = None) -> None:
        """Eval mode; refine once (no grad, fp32) and keep the lattices until ``train()`` / :meth:`unbake`."""
        self.eval()
        self.unbake()
        dev = self.aabb.device
        with torch.autocast(dev.type, enabled=False):
            self._baked_lattices = [t.contiguous() for t in self._refined_lattices(int(chunk_size or self.bake_chunk))]
        FieldModel.bake(self)

    def unbake(self) -> None:
        self._baked_lattices = None
        FieldModel.unbake(self)

    @staticmethod
    def _drop_caches(module, *args, **kwargs) -> None:
        module._step_cache = None
        module.unbake()


_MRGRID_RES = (16, 32, 64, 96)


@register("model", "mrgrid_nerf")
class MRGridRadianceField(GridRadianceField):
    """MRGrid radiance field (spec vision 3.3, config 2): L dense grids of C channels over [-1, 1]^3, each sampled
    trilinearly (align corners, zero padding) and concatenated (D = L C) -> density MLP and color head.

    Paper: levels 16^3, 32^3, 64^3, 96^3, C = 16 (D = 64; 18,939,904 grid parameters).

    Args:
        aabb: scene box (set by the program from ``task.aabb``).
        resolutions: one entry per level: an int (cube) or (D, H, W) sizes.
        channels: C, features per level.
        init_range: grid init U(-init_range, init_range).
        mlp_width: hidden width of the density MLP (D -> mlp_width -> 1 + geo_features).
        geo_features: geometry features passed to the color head.
        color_width: hidden width of the color head.
        color_hidden_layers: hidden layers of the color head.
    """

    def __init__(self, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5),
                 resolutions: Sequence = _MRGRID_RES, channels: int = 16, init_range: float = 1e-3,
                 mlp_width: int = 64, geo_features: int = 15, color_width: int = 64, color_hidden_layers: int = 2):
        shapes = self._shapes(resolutions)
        channels = _int_key("channels", channels, 1)
        super().__init__(aabb, len(shapes) * channels, mlp_width, geo_features, color_width, color_hidden_layers,
                         unit_box=False, inclusive=False)
        self.spatial_grids = DenseGrids(shapes, channels, _pos_key("init_range", init_range))

    @staticmethod
    def _shapes(resolutions) -> List[Tuple[int, ...]]:
        if not isinstance(resolutions, (list, tuple)) or not resolutions:
            raise ConfigError(f"model.resolutions must be a non-empty list (one resolution per level), "
                              f"got {resolutions!r}")
        return [_shape3(f"resolutions[{i}]", r) for i, r in enumerate(resolutions)]

    def features(self, u: Tensor) -> Tensor:
        return self.spatial_grids(u[None])[0]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``spatial_grids`` and ``heads``."""
        return {"spatial_grids": list(self.spatial_grids.parameters()), "heads": self.head_parameters()}


@register("model", "dense_nerf")
class DenseRadianceField(MRGridRadianceField):
    """Dense-grid radiance field (spec vision 3.3, config 7): one dense grid -> density MLP and color head.

    Paper: 128^3, C = 16 (33,554,432 grid parameters).

    Args:
        aabb: scene box (set by the program from ``task.aabb``).
        resolution: an int (cube) or (D, H, W) sizes.
        channels: C.
        init_range: grid init U(-init_range, init_range).
        mlp_width: hidden width of the density MLP.
        geo_features: geometry features passed to the color head.
        color_width: hidden width of the color head.
        color_hidden_layers: hidden layers of the color head.
    """

    def __init__(self, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5), resolution=128,
                 channels: int = 16, init_range: float = 1e-3, mlp_width: int = 64, geo_features: int = 15,
                 color_width: int = 64, color_hidden_layers: int = 2):
        _shape3("resolution", resolution)
        super().__init__(aabb, [resolution], channels, init_range, mlp_width, geo_features, color_width,
                         color_hidden_layers)


@register("model", "mrgrid_drr_nerf")
class MRGridDRRRadianceField(_StepRefined, RefinedLatticeMixin, GridRadianceField):
    """MRGrid+DRR radiance field (spec vision 3.3, config 1): the levels super-resolved to the SSR lattice
    (default the finest level's shape) and concatenated (U, D = L C channels, no PE), ``G' = U + R(U)`` with a
    GLU refiner applied to every vertex, then G' sampled trilinearly -> density MLP and color head.

    Paper: levels 16, 32, 64, 96 (C = 16, D = 64), refined on 96^3, 4 blocks x hidden_mult 8 (512 hidden):
    18,939,904 grid + 393,472 refiner parameters. Training refines the whole lattice once per step (shared by
    the occupancy update, the visibility pass and the rendering pass; ``refine_per_pass`` restores the
    reference's refinement in every pass); :meth:`bake` refines once for evaluation.

    Args:
        aabb: scene box (set by the program from ``task.aabb``).
        resolutions: one entry per level: an int (cube) or (D, H, W) sizes.
        channels: C, features per level.
        ssr_resolution: the refined lattice (int or (D, H, W)); null = the finest level's shape.
        refiner_layers: GLU blocks of the refiner (0: G' = U, the super-resolved levels only).
        hidden_mult: hidden width of each block = floor(D * hidden_mult).
        refine_per_pass: refine in every pass (the reference) instead of once per training step.
        init_range: grid init U(-init_range, init_range).
        mlp_width: hidden width of the density MLP.
        geo_features: geometry features passed to the color head.
        color_width: hidden width of the color head.
        color_hidden_layers: hidden layers of the color head.
        bake_chunk: lattice vertices refined at a time by the bake (bounds its memory).
    """

    def __init__(self, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5),
                 resolutions: Sequence = _MRGRID_RES, channels: int = 16, ssr_resolution=None,
                 refiner_layers: int = 4, hidden_mult: float = 8.0, refine_per_pass: bool = False,
                 init_range: float = 1e-3, mlp_width: int = 64, geo_features: int = 15, color_width: int = 64,
                 color_hidden_layers: int = 2, bake_chunk: int = 1 << 16):
        shapes = MRGridRadianceField._shapes(resolutions)
        channels = _int_key("channels", channels, 1)
        ssr = None if ssr_resolution is None else _shape3("ssr_resolution", ssr_resolution)
        layers = _int_key("refiner_layers", refiner_layers, 0)
        hm = _pos_key("hidden_mult", hidden_mult)
        D = len(shapes) * channels
        if layers > 0 and math.floor(D * hm) < 1:
            raise ConfigError(f"model.hidden_mult: {hidden_mult} leaves no hidden unit in the refiner blocks (D={D})")
        GridRadianceField.__init__(self, aabb, D, mlp_width, geo_features, color_width, color_hidden_layers,
                                   unit_box=False, inclusive=False)
        self.refine_at_inference = True
        self._build_lattice(shapes, channels, _pos_key("init_range", init_range), ssr, 0, 1.0, False, True,
                            layers, hm, ssr_key="model.ssr_resolution")
        self._set_fast_options(True, "never", 1.0, "auto")
        self._init_refine(refine_per_pass, bake_chunk)

    def _refined_lattices(self, chunk: Optional[int] = None) -> List[Tensor]:
        return [self.spatial_lattice(True, chunk)]                      # (D, *R)

    def _refine_params(self) -> List[nn.Parameter]:
        return list(self.spatial_grids.parameters()) + (
            list(self.spatial_refiner.parameters()) if self.spatial_refiner is not None else [])

    def features(self, u: Tensor) -> Tensor:
        return sample_grid(self._lattices()[0], u[None])[0]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``spatial_grids``, ``spatial_refiner`` (empty without refiner) and ``heads``."""
        ref = self.spatial_refiner
        return {"spatial_grids": list(self.spatial_grids.parameters()),
                "spatial_refiner": list(ref.parameters()) if ref is not None else [], "heads": self.head_parameters()}


@register("model", "dense_drr_nerf")
class DenseDRRRadianceField(MRGridDRRRadianceField):
    """Dense+DRR radiance field (spec vision 3.3, config 6): one dense grid refined on its own lattice,
    ``G' = G + R(G)``, sampled trilinearly -> density MLP and color head.

    Paper: 128^3, C = 16, 4 blocks x hidden_mult 8 (128 hidden): 33,554,432 grid + 24,640 refiner parameters.
    See :class:`MRGridDRRRadianceField` for when the refinement runs.

    Args:
        aabb: scene box (set by the program from ``task.aabb``).
        resolution: an int (cube) or (D, H, W) sizes.
        channels: C.
        refiner_layers: GLU blocks of the refiner (0: none).
        hidden_mult: hidden width of each block = floor(C * hidden_mult).
        refine_per_pass: refine in every pass (the reference) instead of once per training step.
        init_range: grid init U(-init_range, init_range).
        mlp_width: hidden width of the density MLP.
        geo_features: geometry features passed to the color head.
        color_width: hidden width of the color head.
        color_hidden_layers: hidden layers of the color head.
        bake_chunk: lattice vertices refined at a time by the bake.
    """

    def __init__(self, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5), resolution=128,
                 channels: int = 16, refiner_layers: int = 4, hidden_mult: float = 8.0,
                 refine_per_pass: bool = False, init_range: float = 1e-3, mlp_width: int = 64,
                 geo_features: int = 15, color_width: int = 64, color_hidden_layers: int = 2,
                 bake_chunk: int = 1 << 16):
        _shape3("resolution", resolution)
        super().__init__(aabb, [resolution], channels, None, refiner_layers, hidden_mult, refine_per_pass,
                         init_range, mlp_width, geo_features, color_width, color_hidden_layers, bake_chunk)


_TRIPLANE_COLS = ((1, 2), (0, 2), (0, 1))  # plane 0: (y, z), plane 1: (x, z), plane 2: (x, y) (spec 3.3)


@register("model", "triplane_nerf")
class TriPlaneRadianceField(GridRadianceField):
    """TriPlane radiance field (spec vision 3.3, config 5): three feature planes of C channels, plane 0 indexed
    by (y, z), plane 1 by (x, z), plane 2 by (x, y) (the first coordinate along the plane's width axis), each
    sampled bilinearly (align corners, zero padding), features **summed** over the planes (D = C).

    Paper: 256^2 planes, C = 48 (9,437,184 plane parameters).

    Args:
        aabb: scene box (set by the program from ``task.aabb``).
        resolution: plane size: an int (square) or (height, width).
        channels: C.
        init_range: plane init U(-init_range, init_range).
        mlp_width: hidden width of the density MLP.
        geo_features: geometry features passed to the color head.
        color_width: hidden width of the color head.
        color_hidden_layers: hidden layers of the color head.
    """

    def __init__(self, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5), resolution=256,
                 channels: int = 48, init_range: float = 1e-3, mlp_width: int = 64, geo_features: int = 15,
                 color_width: int = 64, color_hidden_layers: int = 2):
        shape = _shape3("resolution", resolution, dims=2)
        channels = _int_key("channels", channels, 1)
        a = _pos_key("init_range", init_range)
        super().__init__(aabb, channels, mlp_width, geo_features, color_width, color_hidden_layers,
                         unit_box=False, inclusive=False)
        self.planes = Planes([uniform_parameter((channels, *shape), -a, a) for _ in range(3)], _TRIPLANE_COLS)

    def features(self, u: Tensor) -> Tensor:
        return self.planes.sum(u[None])[0]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``planes`` and ``heads``."""
        return {"planes": list(self.planes.parameters()), "heads": self.head_parameters()}


@register("model", "triplane_drr_nerf")
class TriPlaneDRRRadianceField(_StepRefined, TriPlaneRadianceField):
    """TriPlane+DRR radiance field (spec vision 3.3, config 4): every plane refined on its own lattice by its own
    GLU refiner, ``P_i' = P_i + R_i(P_i)``, then sampled and summed as :class:`TriPlaneRadianceField`.

    Paper: 256^2 planes, C = 48, per plane 4 blocks x hidden_mult 8 (384 hidden): 9,437,184 plane + 664,128
    refiner parameters. See :class:`MRGridDRRRadianceField` for when the refinement runs.

    Args:
        aabb: scene box (set by the program from ``task.aabb``).
        resolution: plane size: an int (square) or (height, width).
        channels: C.
        refiner_layers: GLU blocks of each plane's refiner (>= 1).
        hidden_mult: hidden width of each block = floor(C * hidden_mult).
        refine_per_pass: refine in every pass (the reference) instead of once per training step.
        init_range: plane init U(-init_range, init_range).
        mlp_width: hidden width of the density MLP.
        geo_features: geometry features passed to the color head.
        color_width: hidden width of the color head.
        color_hidden_layers: hidden layers of the color head.
        bake_chunk: plane vertices refined at a time by the bake.
    """

    def __init__(self, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5), resolution=256,
                 channels: int = 48, refiner_layers: int = 4, hidden_mult: float = 8.0,
                 refine_per_pass: bool = False, init_range: float = 1e-3, mlp_width: int = 64,
                 geo_features: int = 15, color_width: int = 64, color_hidden_layers: int = 2,
                 bake_chunk: int = 1 << 16):
        super().__init__(aabb, resolution, channels, init_range, mlp_width, geo_features, color_width,
                         color_hidden_layers)
        layers = _int_key("refiner_layers", refiner_layers, 1)
        hm = _pos_key("hidden_mult", hidden_mult)
        C = self.planes[0].shape[0]
        if math.floor(C * hm) < 1:
            raise ConfigError(f"model.hidden_mult: {hidden_mult} leaves no hidden unit in the refiner blocks (C={C})")
        self.refiners = nn.ModuleList([GLURefiner(C, layers, hm) for _ in range(3)])
        self._init_refine(refine_per_pass, bake_chunk)

    def _refined_lattices(self, chunk: Optional[int] = None) -> List[Tensor]:
        out = []
        for p, ref in zip(self.planes, self.refiners):
            rows = p.flatten(1).t()                                     # (P, C)
            if chunk is None or chunk >= rows.shape[0]:
                r = rows + ref(rows)
            else:
                r = torch.cat([rows[i:i + chunk] + ref(rows[i:i + chunk]) for i in range(0, rows.shape[0], chunk)])
            out.append(r.t().reshape(p.shape))                          # (C, R_a, R_b)
        return out

    def _refine_params(self) -> List[nn.Parameter]:
        return list(self.planes.parameters()) + list(self.refiners.parameters())

    def features(self, u: Tensor) -> Tensor:
        x = u[None]
        return torch.stack([sample_grid(p, x[..., list(c)]) for p, c in zip(self._lattices(), _TRIPLANE_COLS)]
                           ).sum(0)[0]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``planes``, ``spatial_refiner`` and ``heads``."""
        return {"planes": list(self.planes.parameters()), "spatial_refiner": list(self.refiners.parameters()),
                "heads": self.head_parameters()}


# The paper's NeRF models (spec 3.3; ids of configs/nerf/{lego,drums}.yaml): type and keys beyond the defaults.
PAPER_NERF_MODELS: List[Dict[str, object]] = [
    dict(type="ngp_nerf"),
    dict(type="mrgrid_drr_nerf"),
    dict(type="mrgrid_nerf"),
    dict(type="vanilla_nerf"),
    dict(type="triplane_drr_nerf"),
    dict(type="triplane_nerf"),
    dict(type="dense_drr_nerf"),
    dict(type="dense_nerf"),
]
