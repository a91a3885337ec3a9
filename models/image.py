"""Single-field INRs for images (spec ``vision.md`` section 2): the six models of the paper's image experiments.

Every model maps coordinates to values, ``forward(x: (B, N, d), c: (B, 0)) -> (B, N, out_dim)`` (no condition:
``cond_dim`` must be 0), with x in [-1, 1], column 0 = the last array axis (the image's width axis), align
corners (docs/design.md). Outputs are unbounded (no output activation, as the reference).

Registered types (config ids of ``configs/image/*.yaml`` in brackets):

* ``mrgrid_drr`` [0] / ``grid_drr`` [2]: DRR spatial encoder (spec 2.1): L dense grids -> structural
  super-resolution (SSR) to one lattice -> per-channel sin/cos PE -> ``G' = U + R(U)`` with a GLU refiner ->
  bilinear sample of G' -> decoder. Training recomputes G' at every step (on the vertices the batch touches,
  which gives the same values and gradients as refining the whole lattice: the refiner is pointwise);
  :meth:`DRRGridField.bake` computes it once.
* ``mrgrid`` [1] / ``grid`` [3]: the same dense grids sampled directly (levels concatenated) -> decoder.
* ``ngp`` [4]: multiresolution hash grid with tiny-cuda-nn's formulas (spec 2.3) -> decoder.
* ``siren`` [5]: sine MLP (spec 2.4).

The decoder of every grid model is tcnn's FullyFusedMLP replaced by a bias-free ReLU MLP with Xavier-uniform
weights, ``in -> 128 -> 128 -> out`` (spec 2.1).

Baked fast path of the DRR models (``fast_paths``, ``bake_fold``): the decoder's first layer W1 is linear and
bias-free, like the bilinear interpolation, so ``W1 interp(G')(x) = interp(W1 G')(x)``. :meth:`DRRGridField.bake`
stores the folded table ``W1 G'`` (channels-last, (prod(R), width)) computed chunk by chunk (SSR rows by gathers,
PE + refiner + fold through ``models.fast_ops.vertex_pipeline``), never the (D, *R) lattice itself; a query is
then one gather interpolation of ``width`` channels + ReLU + the remaining layers: the same per-point work as
the plain grid's decoder (whose first layer is 4 -> 128). Memory: prod(R) * width floats (Grid+DRR at the
paper's 2048^2: 2.1 GB in fp32; MRGrid+DRR 1536^2: 1.2 GB). ``bake(fold=False)`` stores the unfolded lattice
instead (prod(R) * D floats) and samples it with ``grid_sample``.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models import fast_ops
from models.base import FieldModel
from models.components.encodings import HashGrid
from models.components.grids import DenseGrids
from models.components.lattice import SPARSE_REFINE, RefinedLatticeMixin
from models.components.mlp import MLP
from models.components.siren import SIREN_BIAS_INITS, SIREN_INITS, SirenMLP
from util.registry import ConfigError, register
from util.sampling import sample_grid

__all__ = ["ImageField", "GridField", "DRRGridField", "NGPField", "SirenField", "image_decoder", "INPUT_MAPPINGS",
           "PAPER_IMAGE_MODELS"]

Resolution = Union[int, Sequence[int]]
INPUT_MAPPINGS = ("unit", "reference")
"""``ngp.input_mapping``: "unit" maps x in [-1, 1] to (x + 1) / 2 (tcnn's domain [0, 1]); "reference" feeds x as
is (the reference's quirk, spec 2.3 / 5.5)."""

PAPER_MRGRID_RESOLUTIONS = (16, 32, 64, 128, 256, 512, 1024)


# ----------------------------------------------------------------------------------------------------
# validation helpers (errors name the key, the value and what was expected)
# ----------------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(key: str, value, low: int) -> int:
    if not _is_int(value) or value < low:
        raise ConfigError(f"model.{key} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_positive(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"model.{key} must be a number > 0, got {value!r}")
    return float(value)


def _check_choice(key: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"model.{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _shape(entry: Resolution, dims: int, key: str) -> Tuple[int, ...]:
    """An int (square / cube) or ``dims`` ints in array order -> shape tuple, every axis >= 2."""
    if _is_int(entry):
        shape = (int(entry),) * dims
    elif isinstance(entry, (list, tuple)) and all(_is_int(n) for n in entry):
        shape = tuple(int(n) for n in entry)
        if len(shape) != dims:
            raise ConfigError(f"model.{key}: {list(entry)} has {len(shape)} axes, the data has {dims} (give an int "
                              f"or one size per axis in array order (H, W) / (D, H, W))")
    else:
        raise ConfigError(f"model.{key} must be an int or a list of {dims} ints, got {entry!r}")
    if any(n < 2 for n in shape):
        raise ConfigError(f"model.{key}: every axis needs >= 2 vertices, got {entry!r}")
    return shape


def _level_shapes(resolutions, dims: int, single: bool) -> List[Tuple[int, ...]]:
    """Level shapes of ``resolutions`` (``single``: the one-grid models, whose key is ``resolution``)."""
    if single:
        return [_shape(resolutions[0], dims, "resolution")]
    if _is_int(resolutions) or not isinstance(resolutions, (list, tuple)) or not resolutions:
        raise ConfigError(f"model.resolutions must be a non-empty list (one resolution per level), got {resolutions!r}")
    return [_shape(r, dims, f"resolutions[{i}]") for i, r in enumerate(resolutions)]


def image_decoder(in_dim: int, out_dim: int, width: int = 128, hidden_layers: int = 2) -> MLP:
    """tcnn FullyFusedMLP replacement: ``in -> width (x hidden_layers) -> out``, ReLU between, no biases,
    Xavier-uniform weights, no output activation."""
    return MLP([in_dim] + [width] * hidden_layers + [out_dim], bias=False, init="xavier_uniform")


# ----------------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------------
class ImageField(FieldModel):
    """Common part of the single-field models: argument checks and ``forward(x, c) = decode(features(x))``.

    Args:
        cond_dim: set by the program; must be 0 (a single field).
        spatial_dims: set by the program (2 for images).
        out_dim: set by the program: output channels (3 for RGB).
        dims_allowed: spatial dims the subclass supports.
    """

    #: the one-grid models (Grid, Grid+DRR) take ``resolution`` instead of ``resolutions``
    _single_level = False

    def __init__(self, cond_dim: int, spatial_dims: int, out_dim: int, dims_allowed: Sequence[int] = (2, 3)):
        super().__init__()
        if not _is_int(cond_dim) or cond_dim != 0:
            raise ConfigError(f"model.cond_dim: {type(self).__name__} is a single-field model and needs cond_dim 0 "
                              f"(a dataset without condition parameters, e.g. dataset.type image), got {cond_dim!r}")
        if spatial_dims not in dims_allowed:
            raise ConfigError(f"model.spatial_dims must be one of {tuple(dims_allowed)} for {type(self).__name__}, "
                              f"got {spatial_dims!r}")
        self.cond_dim = 0
        self.spatial_dims = int(spatial_dims)
        self.out_dim = _check_int("out_dim", out_dim, 1)

    def _check_inputs(self, x: Tensor, c: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.spatial_dims:
            raise ValueError(f"{type(self).__name__}: x must be (B, N, {self.spatial_dims}), got {tuple(x.shape)}")
        if c.dim() != 2 or c.shape[0] != x.shape[0] or c.shape[1] != 0:
            raise ValueError(f"{type(self).__name__}: c must be ({x.shape[0]}, 0), got {tuple(c.shape)}")

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, d) in [-1, 1], c (B, 0) -> (B, N, out_dim): ``decoder(features(x))``."""
        self._check_inputs(x, c)
        return self.decoder(self.features(x))


# ----------------------------------------------------------------------------------------------------
# dense grids without refinement: MRGrid, Grid
# ----------------------------------------------------------------------------------------------------
@register("model", "mrgrid")
class GridField(ImageField):
    """MRGrid (spec 2.1-2.2, config id 1): L dense grids of C channels, init U(-init_range, init_range), sampled
    bilinearly (align corners, zero padding) and concatenated (L * C features) -> bias-free ReLU decoder.

    Paper: 7 square levels 16, 32, ..., 1024 with C = 3 (4,194,048 grid parameters, 21 features, decoder
    19,456 parameters). The fast path (``fast_paths``) samples each level with a gather interpolation
    (models/fast_ops) instead of ``grid_sample``: the same values.

    Args:
        cond_dim: set by the program (0).
        spatial_dims: set by the program (2 for images).
        out_dim: set by the program (output channels, 3 for RGB).
        resolutions: one entry per level: an int (square) or per-axis sizes in array order (H, W).
        channels: C, features per level.
        init_range: grid init U(-init_range, init_range) (1e-3 as the reference code).
        decoder_width: width of the decoder's hidden layers (tcnn: 128).
        decoder_hidden_layers: hidden layers of the decoder (2: in -> 128 -> 128 -> out).
        fast_paths: sample the grids by gather interpolation (True) or ``grid_sample`` (False); same values.
    """

    def __init__(self, cond_dim: int = 0, spatial_dims: int = 2, out_dim: int = 3,
                 resolutions: Sequence[Resolution] = PAPER_MRGRID_RESOLUTIONS, channels: int = 3,
                 init_range: float = 1e-3, decoder_width: int = 128, decoder_hidden_layers: int = 2,
                 fast_paths: bool = True):
        super().__init__(cond_dim, spatial_dims, out_dim)
        shapes = _level_shapes(resolutions, self.spatial_dims, self._single_level)
        channels = _check_int("channels", channels, 1)
        init_range = _check_positive("init_range", init_range)
        self.spatial_grids = DenseGrids(shapes, channels, init_range)          # grids[l]: (C, *r_l)
        self.feature_dim = self.spatial_grids.out_dim                          # L * C
        self.decoder = image_decoder(self.feature_dim, self.out_dim, _check_int("decoder_width", decoder_width, 1),
                                     _check_int("decoder_hidden_layers", decoder_hidden_layers, 0))
        self.fast_paths = bool(fast_paths)

    def features(self, x: Tensor) -> Tensor:
        """x (B, N, d) -> (B, N, L * C), level-major."""
        if not self.fast_paths:
            return self.spatial_grids(x)
        B, N, d = x.shape
        flat = x.reshape(B * N, d)
        feats = []
        for g, shape in zip(self.spatial_grids.grids, self.spatial_grids.shapes):
            idx, w = fast_ops.corner_stencil(flat, shape)
            feats.append(fast_ops.gather_interp(fast_ops.to_rows(g), idx, w))
        return torch.cat(feats, dim=-1).reshape(B, N, -1)

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``spatial_grids`` and ``decoder``."""
        return {"spatial_grids": list(self.spatial_grids.parameters()), "decoder": list(self.decoder.parameters())}


@register("model", "grid")
class SingleGridField(GridField):
    """Grid (spec 2.2, config id 3): one dense grid of C channels -> bias-free ReLU decoder.

    Paper: 1024^2, C = 4 (4,194,304 grid parameters, decoder 17,280).

    Args:
        cond_dim: set by the program (0).
        spatial_dims: set by the program (2 for images).
        out_dim: set by the program (output channels, 3 for RGB).
        resolution: an int (square) or per-axis sizes in array order (H, W).
        channels: C, features of the grid.
        init_range: grid init U(-init_range, init_range).
        decoder_width: width of the decoder's hidden layers.
        decoder_hidden_layers: hidden layers of the decoder.
        fast_paths: gather interpolation (True) or ``grid_sample`` (False); same values.
    """

    _single_level = True

    def __init__(self, cond_dim: int = 0, spatial_dims: int = 2, out_dim: int = 3, resolution: Resolution = 1024,
                 channels: int = 4, init_range: float = 1e-3, decoder_width: int = 128, decoder_hidden_layers: int = 2,
                 fast_paths: bool = True):
        super().__init__(cond_dim, spatial_dims, out_dim, [resolution], channels, init_range, decoder_width,
                         decoder_hidden_layers, fast_paths)


# ----------------------------------------------------------------------------------------------------
# DRR: MRGrid+DRR, Grid+DRR
# ----------------------------------------------------------------------------------------------------
@register("model", "mrgrid_drr")
class DRRGridField(RefinedLatticeMixin, ImageField):
    """MRGrid+DRR (spec 2.1-2.2, config id 0): dense grids -> SSR -> PE -> GLU refiner -> decoder.

    ``U`` = every level sampled at the vertices of the SSR lattice R (align corners) and concatenated (L C
    channels); PE with g frequencies per channel ``[sin(pi 2^k u)]_k, [cos(pi 2^k u)]_k`` (D = L C 2g, no raw
    value); ``G' = U + R(U)`` with R = ``refiner_layers`` residual GLU blocks (RMSNorm, hidden floor(D
    hidden_mult), no biases); query = bilinear sample of G' -> bias-free decoder. Paper: levels 16..1024 (C = 3),
    SSR 1536^2, g = 2 (D = 84), 2 blocks with hidden_mult 2 (Pearl) / 3 (Tokyo); spatio_gen Tokyo 3 blocks x 2.

    Paths: training (and unbaked eval) with ``fast_paths`` refine only the lattice vertices the batch's stencils
    touch (``sparse_refine``), fold the decoder's first layer into them when they are at most as many as the
    points, then gather-interpolate (models/components/lattice.py); the plain path (``fast_paths: false``)
    refines the whole lattice and uses ``grid_sample``. Both give the same values and gradients to fp32
    rounding. :meth:`bake` caches the refined lattice (see the module docstring for the folded table).

    Args:
        cond_dim: set by the program (0).
        spatial_dims: set by the program (2 for images).
        out_dim: set by the program (output channels, 3 for RGB).
        resolutions: one entry per level: an int (square) or per-axis sizes in array order (H, W).
        channels: C, features per level.
        ssr_resolution: the SSR lattice R (int or per-axis sizes); null = the per-axis maximum of the levels.
        pe_frequencies: g, PE frequencies per channel (0 = no PE: the refiner works on U itself).
        pe_scale: multiplier s of the PE arguments sin(s pi 2^k u) (1 = the paper).
        refiner_layers: GLU blocks of the refiner (0 = no refiner: G' = PE(U)).
        hidden_mult: hidden width of each block = floor(D * hidden_mult).
        refine_at_inference: False: evaluation (and the bake) skips the refiner (G' = PE(U)), an ablation.
        init_range: grid init U(-init_range, init_range).
        decoder_width: width of the decoder's hidden layers (the width of the folded table).
        decoder_hidden_layers: hidden layers of the decoder (>= 1: the first layer is folded into the lattice).
        fast_paths: sparse refinement, folding and gather interpolation (True) or the plain path (False).
        sparse_refine: "auto" (refine only the touched vertices when they are at most ``sparse_refine_ratio`` of
            the lattice), "always" or "never".
        sparse_refine_ratio: threshold of "auto", in (0, 1].
        fused_refiner: the chunked PE + refiner + fold autograd function (models/fast_ops.vertex_pipeline):
            "auto" (CPU, fp32), "always" or "never".
        bake_fold: :meth:`bake` stores the folded table ``W1 G'`` (True, with ``fast_paths``) or the lattice G'.
        bake_chunk: lattice vertices refined at a time while baking (bounds the bake's memory).
    """

    def __init__(self, cond_dim: int = 0, spatial_dims: int = 2, out_dim: int = 3,
                 resolutions: Sequence[Resolution] = PAPER_MRGRID_RESOLUTIONS, channels: int = 3,
                 ssr_resolution: Optional[Resolution] = 1536, pe_frequencies: int = 2, pe_scale: float = 1.0,
                 refiner_layers: int = 2, hidden_mult: float = 2.0, refine_at_inference: bool = True,
                 init_range: float = 1e-3, decoder_width: int = 128, decoder_hidden_layers: int = 2,
                 fast_paths: bool = True, sparse_refine: str = "auto", sparse_refine_ratio: float = 0.75,
                 fused_refiner: str = "auto", bake_fold: bool = True, bake_chunk: int = 1 << 16):
        ImageField.__init__(self, cond_dim, spatial_dims, out_dim)
        shapes = _level_shapes(resolutions, self.spatial_dims, self._single_level)
        ssr = None if ssr_resolution is None else _shape(ssr_resolution, self.spatial_dims, "ssr_resolution")
        channels = _check_int("channels", channels, 1)
        pe_frequencies = _check_int("pe_frequencies", pe_frequencies, 0)
        refiner_layers = _check_int("refiner_layers", refiner_layers, 0)
        hidden_mult = _check_positive("hidden_mult", hidden_mult)
        if refiner_layers > 0 and math.floor(channels * len(shapes) * max(2 * pe_frequencies, 1) * hidden_mult) < 1:
            raise ConfigError(f"model.hidden_mult: {hidden_mult} leaves no hidden unit in the refiner blocks")
        _check_choice("sparse_refine", sparse_refine, SPARSE_REFINE)
        _check_choice("fused_refiner", fused_refiner, SPARSE_REFINE)
        ratio = sparse_refine_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ConfigError(f"model.sparse_refine_ratio must be a number in (0, 1], got {ratio!r}")
        self.refine_at_inference = bool(refine_at_inference)
        self._build_lattice(shapes, channels, _check_positive("init_range", init_range), ssr, pe_frequencies,
                            _check_positive("pe_scale", pe_scale), False, True, refiner_layers, hidden_mult)
        self.decoder = image_decoder(self.spatial_feature_dim, self.out_dim,
                                     _check_int("decoder_width", decoder_width, 1),
                                     _check_int("decoder_hidden_layers", decoder_hidden_layers, 1))
        self._set_fast_options(fast_paths, sparse_refine, ratio, fused_refiner)
        self.bake_fold = bool(bake_fold)
        self.bake_chunk = _check_int("bake_chunk", bake_chunk, 1)
        self.register_load_state_dict_pre_hook(DRRGridField._drop_cache_on_load)

    # ------------------------------------------------------------------------------------------ forward
    @property
    def _w_fold(self) -> Tensor:
        """W1 (width, D): the decoder's first (bias-free) linear layer."""
        return self.decoder[0].weight

    def _tail(self, z: Tensor) -> Tensor:
        """Decoder after its first linear layer: ReLU, the remaining layers."""
        for m in list(self.decoder)[1:]:
            z = m(z)
        return z

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, d) in [-1, 1], c (B, 0) -> (B, N, out_dim)."""
        self._check_inputs(x, c)
        B, N, d = x.shape
        if self.is_baked and self._baked_fused is not None:
            return self._tail(self._baked_features(x.reshape(B * N, d))).reshape(B, N, -1)
        if self.is_baked and self._baked_grid is not None:
            return self.decoder(sample_grid(self._baked_grid, x))
        if self.fast_paths:
            z, _ = self._folded_features(x.reshape(B * N, d), self._w_fold)
            return self._tail(z).reshape(B, N, -1)
        return self.decoder(sample_grid(self.spatial_lattice(self._refine_now()), x))

    # ------------------------------------------------------------------------------------------ baking
    @torch.no_grad()
    def bake(self, chunk_size: Optional[int] = None, fold: Optional[bool] = None) -> None:
        """Eval mode; run SSR, PE and the refiner once (fp32, no autocast, no grad) and cache the result.

        Args:
            chunk_size: lattice vertices per chunk (default ``bake_chunk``).
            fold: store the folded table ``W1 G'`` (P, width) (default ``bake_fold``; needs ``fast_paths``), else
                the lattice G' (D, *R).

        The cache is a snapshot: ``train()``, :meth:`unbake` and ``load_state_dict`` drop it.
        """
        self.eval()
        self.unbake()
        chunk = int(chunk_size or self.bake_chunk)
        fold = self.bake_fold if fold is None else bool(fold)
        refine = self.refine_at_inference
        dev = self._w_fold.device
        with torch.autocast(dev.type, enabled=False):
            if fold and self.fast_paths:
                self._baked_fused = self._folded_table(refine, chunk)
            else:
                self._baked_grid = self.spatial_lattice(refine, chunk).contiguous()
        FieldModel.bake(self)

    @torch.no_grad()
    def _folded_table(self, refine: bool, chunk: int) -> Tensor:
        """``W1 G'`` channels-last (prod(R), width), computed ``chunk`` lattice rows at a time."""
        w = self._w_fold.float()
        P = math.prod(self.ssr_shape)
        out = torch.empty(P, w.shape[0], device=w.device, dtype=torch.float32)
        for s in range(0, P, chunk):
            rows = torch.arange(s, min(s + chunk, P), device=w.device)
            u = self._ssr_rows(rows).float()                               # (n, L*C)
            if self._use_fused(u):
                g = fast_ops.vertex_pipeline(u.contiguous(), self.pe, self.spatial_refiner if refine else None, w)
            else:
                if self.pe is not None:
                    u = self.pe(u)
                if refine and self.spatial_refiner is not None:
                    u = u + self.spatial_refiner(u)
                g = F.linear(u, w)
            out[s:s + len(rows)] = g
        return out

    def unbake(self) -> None:
        """Drop the bake cache; ``forward`` refines again."""
        self._baked_grid = None
        self._baked_fused = None
        FieldModel.unbake(self)

    @staticmethod
    def _drop_cache_on_load(module: "DRRGridField", *args, **kwargs) -> None:
        module.unbake()

    # ------------------------------------------------------------------------------------------ misc
    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``spatial_grids``, ``spatial_refiner`` (empty without refiner) and ``decoder``."""
        ref = self.spatial_refiner
        return {"spatial_grids": list(self.spatial_grids.parameters()),
                "spatial_refiner": list(ref.parameters()) if ref is not None else [],
                "decoder": list(self.decoder.parameters())}

    def training_stats(self) -> Dict[str, float]:
        """``drr/refined_vertex_fraction``: share of the lattice the last fast pass refined."""
        if self.last_refined_vertices is None:
            return {}
        return {"drr/refined_vertex_fraction": self.last_refined_vertices / math.prod(self.ssr_shape)}

    def extra_repr(self) -> str:
        return (f"ssr_shape={self.ssr_shape}, D={self.spatial_feature_dim}, fast_paths={self.fast_paths}, "
                f"refine_at_inference={self.refine_at_inference}")


@register("model", "grid_drr")
class SingleGridDRRField(DRRGridField):
    """Grid+DRR (spec 2.2, config id 2): one dense grid -> SSR -> PE -> GLU refiner -> decoder.

    Paper: 1024^2 grid with C = 4, SSR 2048^2, g = 4 (D = 32), 2 blocks with hidden_mult 8 (256 hidden):
    4,194,304 grid + 49,216 refiner + 20,864 decoder parameters. See :class:`DRRGridField` for the paths.

    Args:
        cond_dim: set by the program (0).
        spatial_dims: set by the program (2 for images).
        out_dim: set by the program (output channels, 3 for RGB).
        resolution: the grid: an int (square) or per-axis sizes in array order (H, W).
        channels: C, features of the grid.
        ssr_resolution: the SSR lattice R (int or per-axis sizes); null = the grid's own shape.
        pe_frequencies: g, PE frequencies per channel (0 = no PE).
        pe_scale: multiplier s of the PE arguments.
        refiner_layers: GLU blocks of the refiner (0 = none).
        hidden_mult: hidden width of each block = floor(D * hidden_mult).
        refine_at_inference: False: evaluation (and the bake) skips the refiner.
        init_range: grid init U(-init_range, init_range).
        decoder_width: width of the decoder's hidden layers.
        decoder_hidden_layers: hidden layers of the decoder (>= 1).
        fast_paths: sparse refinement, folding and gather interpolation (True) or the plain path (False).
        sparse_refine: "auto", "always" or "never" (see ``mrgrid_drr``).
        sparse_refine_ratio: threshold of "auto", in (0, 1].
        fused_refiner: "auto", "always" or "never" (see ``mrgrid_drr``).
        bake_fold: the bake stores the folded table (True) or the lattice.
        bake_chunk: lattice vertices refined at a time while baking.
    """

    _single_level = True

    def __init__(self, cond_dim: int = 0, spatial_dims: int = 2, out_dim: int = 3, resolution: Resolution = 1024,
                 channels: int = 4, ssr_resolution: Optional[Resolution] = 2048, pe_frequencies: int = 4,
                 pe_scale: float = 1.0, refiner_layers: int = 2, hidden_mult: float = 8.0,
                 refine_at_inference: bool = True, init_range: float = 1e-3, decoder_width: int = 128,
                 decoder_hidden_layers: int = 2, fast_paths: bool = True, sparse_refine: str = "auto",
                 sparse_refine_ratio: float = 0.75, fused_refiner: str = "auto", bake_fold: bool = True,
                 bake_chunk: int = 1 << 16):
        super().__init__(cond_dim, spatial_dims, out_dim, [resolution], channels, ssr_resolution, pe_frequencies,
                         pe_scale, refiner_layers, hidden_mult, refine_at_inference, init_range, decoder_width,
                         decoder_hidden_layers, fast_paths, sparse_refine, sparse_refine_ratio, fused_refiner,
                         bake_fold, bake_chunk)


# ----------------------------------------------------------------------------------------------------
# NGP
# ----------------------------------------------------------------------------------------------------
@register("model", "ngp")
class NGPField(ImageField):
    """NGP (spec 2.3, config id 4): multiresolution hash grid (tiny-cuda-nn ``HashGrid`` formulas, pure PyTorch,
    models/components/encodings.HashGrid) -> bias-free ReLU decoder.

    Level l: ``scale_l = N_min b^l - 1``, ``res_l = ceil(scale_l) + 1``, lookup ``p = x' scale_l + 0.5``, corner
    ``floor(p)`` as uint32; dense index ``c_0 + c_1 res_l`` when ``res_l^d`` fits the table, else the XOR hash
    with primes (1, 2654435761, 805459861); both mod the table size; bilinear weights from ``frac(p)``; tables
    U(-1e-4, 1e-4). Paper: 7 levels x 2 features, T = 2^20, N_min 16, N_max 4096 (b = 2.5198; resolutions
    16, 41, 102, 256, 646, 1626, 4096; 5,184,690 table entries x features without tcnn's padding).

    Args:
        cond_dim: set by the program (0).
        spatial_dims: set by the program (2 for images; 3 works too).
        out_dim: set by the program (output channels, 3 for RGB).
        levels: L.
        features_per_level: F.
        log2_hashmap_size: log2 of T, the most entries of a level.
        base_resolution: N_min.
        max_resolution: N_max (defines the growth b = exp((ln N_max - ln N_min) / (L - 1))).
        per_level_scale: b directly (overrides ``max_resolution``); null = from ``max_resolution``.
        init_range: table init U(-init_range, init_range) (tcnn: 1e-4).
        input_mapping: "unit": x' = (x + 1) / 2, the whole image in tcnn's [0, 1] domain (corrected, default);
            "reference": x' = x as the reference feeds it (the ~3/4 of the image with a negative coordinate
            wrap to huge uint32 lattice indices and collide with the [0, 1] quadrant's entries).
        tcnn_padding: allocate tcnn's level sizes rounded up to multiples of 8 entries.
        decoder_width: width of the decoder's hidden layers.
        decoder_hidden_layers: hidden layers of the decoder.
    """

    def __init__(self, cond_dim: int = 0, spatial_dims: int = 2, out_dim: int = 3, levels: int = 7,
                 features_per_level: int = 2, log2_hashmap_size: int = 20, base_resolution: int = 16,
                 max_resolution: int = 4096, per_level_scale: Optional[float] = None, init_range: float = 1e-4,
                 input_mapping: str = "unit", tcnn_padding: bool = False, decoder_width: int = 128,
                 decoder_hidden_layers: int = 2):
        super().__init__(cond_dim, spatial_dims, out_dim)
        levels = _check_int("levels", levels, 1)
        base_resolution = _check_int("base_resolution", base_resolution, 1)
        max_resolution = _check_int("max_resolution", max_resolution, 1)
        if per_level_scale is None and levels > 1 and max_resolution < base_resolution:
            raise ConfigError(f"model.max_resolution ({max_resolution}) must be >= model.base_resolution "
                              f"({base_resolution})")
        log2_size = _check_int("log2_hashmap_size", log2_hashmap_size, 1)
        if log2_size > 30:
            raise ConfigError(f"model.log2_hashmap_size must be <= 30, got {log2_size}")
        self.input_mapping = _check_choice("input_mapping", input_mapping, INPUT_MAPPINGS)
        self.encoding = HashGrid(self.spatial_dims, levels, _check_int("features_per_level", features_per_level, 1),
                                 log2_size, base_resolution, max_resolution,
                                 None if per_level_scale is None else _check_positive("per_level_scale",
                                                                                       per_level_scale),
                                 _check_positive("init_range", init_range), bool(tcnn_padding))
        self.decoder = image_decoder(self.encoding.out_dim, self.out_dim, _check_int("decoder_width", decoder_width, 1),
                                     _check_int("decoder_hidden_layers", decoder_hidden_layers, 0))

    def features(self, x: Tensor) -> Tensor:
        """x (B, N, d) in [-1, 1] -> (B, N, L * F) hash-grid features (level-major)."""
        return self.encoding((x + 1) * 0.5 if self.input_mapping == "unit" else x)

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``hash_grid`` and ``decoder``."""
        return {"hash_grid": list(self.encoding.parameters()), "decoder": list(self.decoder.parameters())}


# ----------------------------------------------------------------------------------------------------
# SIREN
# ----------------------------------------------------------------------------------------------------
@register("model", "siren")
class SirenField(ImageField):
    """SIREN (spec 2.4, config id 5): ``hidden_layers + 1`` sine layers ``sin(omega (W h + b))`` of width 512,
    then a linear output layer.

    Init (``init: siren``): first layer W ~ U(-1/fan_in, 1/fan_in) (U(-1/2, 1/2) for 2D input), every other
    matrix (output included) U(+-sqrt(6/fan_in)/omega); biases PyTorch's default U(+-1/sqrt(fan_in))
    (``bias_init: default``). Paper: 2 -> 512, 8 hidden 512 -> 512, 512 -> 3, omega 30: 2,104,323 parameters.

    Args:
        cond_dim: set by the program (0).
        spatial_dims: set by the program (2 for images).
        out_dim: set by the program (output channels, 3 for RGB).
        width: width of every sine layer.
        hidden_layers: sine layers after the first one.
        omega_0: omega of every sine layer.
        init: weight init: "siren" (above), "reference" (U(+-sqrt(6/fan_in)/omega) on every matrix) or "xavier".
        bias_init: "default" (PyTorch's U(+-1/sqrt(fan_in)), the image SIREN) or "zeros".
    """

    def __init__(self, cond_dim: int = 0, spatial_dims: int = 2, out_dim: int = 3, width: int = 512,
                 hidden_layers: int = 8, omega_0: float = 30.0, init: str = "siren", bias_init: str = "default"):
        super().__init__(cond_dim, spatial_dims, out_dim, dims_allowed=(1, 2, 3))
        self.net = SirenMLP(self.spatial_dims, _check_int("width", width, 1),
                            _check_int("hidden_layers", hidden_layers, 0), self.out_dim,
                            _check_positive("omega_0", omega_0), _check_choice("init", init, SIREN_INITS),
                            _check_choice("bias_init", bias_init, SIREN_BIAS_INITS))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, d) in [-1, 1], c (B, 0) -> (B, N, out_dim)."""
        self._check_inputs(x, c)
        return self.net(x)

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """``siren``: every parameter."""
        return {"siren": list(self.net.parameters())}


# The paper's six image models (spec 2.2; ids of configs/image/*.yaml): type and keys beyond the defaults above.
PAPER_IMAGE_MODELS: Dict[str, List[Dict[str, object]]] = {
    name: [
        dict(type="mrgrid_drr", hidden_mult=hm, refiner_layers=nl),
        dict(type="mrgrid"),
        dict(type="grid_drr"),
        dict(type="grid"),
        dict(type="ngp"),
        dict(type="siren"),
    ]
    for name, (nl, hm) in {"pearl": (2, 2.0), "tokyo": (2, 3.0), "sr_pearl": (2, 2.0), "sr_tokyo": (3, 2.0)}.items()
}
