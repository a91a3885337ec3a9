"""DRR-Net: decoupled representation refinement for ensemble surrogates (spec ``drrnet.md`` section 2).

``f(x, c) = act(g(ReLU(W_f [z_sp(x) || z_c(c)] + b_f)))`` with

* ``z_sp(x)``: (bi/tri)linear sample (align_corners) of the refined spatial lattice
  ``G' = pi(G) + R_sp(pi(G))``, where ``pi`` = structural super-resolution (SSR) of the L dense grids to
  one resolution R, channel concatenation, and per-channel sin/cos feature upsampling (K frequencies);
* ``z_c(c)``: per-parameter linear interpolation of the refined condition lines
  ``line' = line + R_c(line)``, ``line`` = local-then-global unification of the multi-resolution lines;
* ``g``: ReLU MLP of width ``hidden_dim`` with ``decoder_layers`` linear layers in total.

Resolution convention: a spatial resolution is an int (a cube / square) or a per-axis list in **array
order** ``(D, H, W)`` (2D: ``(H, W)``), i.e. the grid parameter's spatial shape, the same order as a
member's ``spatial_shape``. Coordinates index it as everywhere in the project (``docs/design.md``): x column 0
runs along the LAST entry. So the paper's MPAS grid ``64x64x24`` is ``[64, 64, 24]``: 24 vertices along
coordinate column 0. (The reference implementation also uses the list as the tensor shape; parameter
counts do not depend on the order.)

Paths through the model:

* training mode, or not baked: pi and the refiners run over the whole lattice at every call;
* :meth:`DRRNet.bake`: runs pi and the refiners once under ``no_grad`` and caches the refined lattice
  ``(D_sp, *R)`` and the refined condition lines ``(d_c, H, L_c * d_fc)`` as non-persistent buffers (never in
  the state dict); ``forward`` then samples the caches and runs only the fusion and the decoder.
  ``train(True)``, :meth:`DRRNet.unbake` and loading a state dict drop the cache.

Ablations (paper Tables 8-9, Figs. 6-8) by config: ``use_pi``, ``pe_frequencies`` (0 = no feature
upsampling), ``ssr_resolution``, ``spatial_refiner_layers: 0``, ``cond_refiner_layers: 0``,
``refine_at_inference: false`` and the ``variant`` shortcut (:data:`VARIANTS`).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from models.base import FieldModel
from models.components.grids import ConditionLines, lerp_lines, per_axis
from models.components.lattice import SPARSE_REFINE, RefinedLatticeMixin
from util.config import NON_NEGATIVE, POSITIVE, VERTICES, above, in_range, one_of
from models.components.mlp import (AUTO_OUTPUT_MEAN, OUT_ACTIVATIONS, MLPDecoder, check_init_output_mean,
                                   init_output_bias, output_activation)
from models.components.refiners import GLURefiner
from models import cpu_kernels
from models.fast_ops import GridQuery, fused_head, grid_query
from util.registry import ConfigError, register
from util.sampling import axis_coords, sample_grid

# OUT_ACTIVATIONS and SPARSE_REFINE are the choices of out_activation and sparse_refine / fused_refiner
__all__ = ["DRRNet", "VARIANTS", "PAPER_CONFIGS", "PAPER_PARAM_COUNTS", "build_paper_model", "OUT_ACTIVATIONS",
           "SPARSE_REFINE"]

Resolution = Union[int, Sequence[int]]

# Ablation shortcuts: the keys each variant forces (the refiner depths/widths otherwise come from the config).
VARIANTS: Dict[str, Dict[str, object]] = {
    "full": {},                                                                   # pi + both refiners
    "embedding_only": dict(use_pi=False, spatial_refiner_layers=0, cond_refiner_layers=0),
    "pi_only": dict(use_pi=True, spatial_refiner_layers=0, cond_refiner_layers=0),
    "refiner_no_pi": dict(use_pi=False),                                          # refiners on raw features
    "spatial_refiner_only": dict(use_pi=True, cond_refiner_layers=0),
}


def _spatial_shape(entry: Resolution, spatial_dims: int, key: str) -> Tuple[int, ...]:
    return tuple(per_axis(entry, spatial_dims, f"model.{key}", "one size per axis in array order (D, H, W)"))


@register("model", "drrnet")
class DRRNet(RefinedLatticeMixin, FieldModel):
    """DRR-Net surrogate ``f(x, c) -> v`` (spec section 2).

    Args:
        cond_dim: d_c, number of condition parameters (injected from the data; no default).
        spatial_dims: d, 2 or 3 (injected from the data).
        spatial_resolutions: r_l of the L_sp dense grids; each an int (cube / square) or a per-axis list in
            array order (D, H, W) / (H, W).
        spatial_channels: d_fs, channels of every grid.
        ssr_resolution: R of the structural super-resolution (int or per-axis list, array order); None = the
            per-axis maximum of ``spatial_resolutions``.
        pe_frequencies: K of the feature upsampling ``u -> [sin(pi 2^k u)]_k, [cos(pi 2^k u)]_k`` per channel;
            0 = no feature upsampling (the lattice is the SSR concatenation itself).
        pe_scale: multiplier s on the PE argument, ``sin(s pi 2^k u)`` (1 = paper). Larger values make the
            features more sensitive to grid values (and the phase jumps of a fixed-size step larger).
        pe_include_input: also keep the raw channel value in front of its sin/cos terms (reference: False).
        use_pi: True: the spatial lattice is pi(G) (SSR + concat + PE), refined once per call over the whole
            lattice and bakeable. False: no SSR/PE; the spatial feature is the concatenation of the L grids
            sampled at the query point, ``z_raw(x) = [G^1(x) .. G^L(x)]`` (L * d_fs), and the spatial refiner,
            if any, is applied pointwise to it: ``z_sp = z_raw + R_sp(z_raw)`` (it then runs at query time,
            also after baking, since no lattice exists to cache it on).
        spatial_refiner_layers: GLU blocks of R_sp; 0 = no spatial refiner.
        spatial_hidden_mult: R_sp hidden width = floor(D_sp * mult).
        cond_resolutions: one entry per level l (L_c levels): an int (same length for every parameter) or a
            list of d_c lengths (one per parameter).
        cond_channels: d_fc, channels of every condition line.
        cond_refiner_layers: GLU blocks of R_c; 0 = no condition refiner, and then z_c interpolates the raw
            lines of every level directly (no unification).
        cond_hidden_mult: R_c hidden width = floor(d_c * L_c * d_fc * mult).
        hidden_dim: width of the fusion layer and the decoder (128 in the paper).
        decoder_layers: linear layers of the decoder g in total (last one -> out_dim).
        out_dim: output channels (1).
        out_activation: "sigmoid" (paper), "none", or "clamp" (to [0, 1]).
        init_output_mean: where the output starts. "auto" (default): the training mean of the normalized
            values, read from the dataset by the program (train.py); a number: that value (output units);
            None: PyTorch's default init (the paper's). With a value, the last decoder bias starts at the
            value that maps to it (logit for "sigmoid"), see :meth:`init_output`. Guards against the early
            collapse described below, which the paper's init does not (on real CloverLeaf data at the paper's
            lr 1e-3 it produced a constant model, warm-up or not). A model built by hand without data keeps
            the default init with "auto" until :meth:`init_output` is called.
        refine_at_inference: False disables both refiners outside training (paper Fig. 8): eval and bake use
            pi(G) and the unified condition lines only.
        variant: None (take the switches as given) or an ablation shortcut from :data:`VARIANTS`: "full",
            "embedding_only", "pi_only", "refiner_no_pi", "spatial_refiner_only"; it overrides the keys it lists.
        init_range: grids and lines are initialised U(-init_range, init_range).
        fast_paths: use the fast paths (see "Fast paths" below) with ``use_pi``; False = the plain path
            (grid_sample of the D_sp lattice, concatenation, full fusion layer per point, whole-lattice
            refinement). Both give the same outputs and gradients up to fp32 rounding. Can be flipped on an
            existing model (attribute ``fast_paths``).
        sparse_refine: with ``fast_paths`` outside the baked path: "auto" refines only the lattice vertices
            the batch's interpolation stencils touch when they are at most ``sparse_refine_ratio`` of the
            lattice, else the whole lattice; "always" / "never" force one of the two.
        sparse_refine_ratio: threshold of "auto" (touched vertices / lattice vertices). 0.75: on the 2-core
            CPU, demo model, sparse refinement was 17% faster than dense at 63% touched and 5% slower at 83%.
        fused_refiner: with ``fast_paths`` outside the baked path: compute PE, spatial refiner and the folded
            fusion weight of the refined vertices, and (with gradients) the per-point ReLU, decoder and
            output activation, with chunked autograd functions whose backward passes are written out
            (models/fast_ops.vertex_pipeline / fused_head; same values and gradients to fp32 rounding, less
            memory). "auto": on CPU in float32 without autocast; "always" / "never".

    The defaults are the paper's Cloverleaf configuration, except ``ssr_resolution`` (paper: 128).

    Shapes: D_sp = L_sp * d_fs * (2K + pe_include_input) with pi (L_sp * d_fs with K = 0 or without pi);
    D_c = d_c * L_c * d_fc.

    Fast paths (``fast_paths=True``, with ``use_pi``; models/fast_ops.py): the fusion layer is split as
    ``W_f [z_sp || z_c] + b = W_sp z_sp + (W_c z_c + b)``. The condition part is computed once per condition
    row; the spatial part is linear, like the interpolation, so it is applied on lattice vertices
    (``W_sp G'``, hidden_dim channels, channels-last) before a gather-based (tri)linear interpolation
    (``F.embedding_bag``, exactly ``grid_sample``'s zeros-padding semantics). :meth:`bake` stores the folded
    lattice ``_baked_fused`` (P, hidden_dim) next to ``_baked_grid``; :meth:`predict_grid` reconstructs a
    whole member lattice chunk by chunk without materializing coordinates and skips the interpolation
    where query vertices are lattice vertices. In training (or unbaked eval) pi and R_sp run only on the
    vertices the batch touches when that is cheaper (``sparse_refine``; only corners of non-zero weight
    count, so a point on a lattice vertex touches one vertex); the SSR of those vertices is computed by
    gathers with ``F.interpolate``'s stencil, so outputs and gradients equal the plain path's. On CPU,
    PE + R_sp + fold and the per-point head run as chunked autograd functions with hand-written backward
    passes (``fused_refiner``).

    Training stability (spec section 4, "observed collapse"): with the sigmoid output and a data mean far
    from 0.5 (CloverLeaf energy: 0.13), the first Adam steps (eps 1e-15, so every parameter moves by ~lr)
    all lower the output together; at too high a learning rate the pre-sigmoid value overshoots to
    -20..-100 within ~5 steps, the sigmoid saturates, every gradient underflows to exactly 0, and the model
    outputs 0 for good (relative L2 error 1). Measured on the clover16 ensemble (16 members x 2048 points,
    CPU): collapse at lr 1e-2; none at 3e-3 or 1e-3. At lr 1e-2 a 100-step linear warm-up or
    ``init_output_mean`` (the training mean) prevents it; ``pe_scale`` 0.25 or refiner lr 1e-3 do not (so
    the PE phase jumps are not the cause), and ``out_activation: none`` avoids the dead zero but trains
    unstably.
    """

    config_rules = dict(
        spatial_resolutions=VERTICES, cond_resolutions=VERTICES, ssr_resolution=VERTICES, spatial_channels=POSITIVE,
        cond_channels=POSITIVE, pe_frequencies=NON_NEGATIVE, pe_scale=above(0), spatial_refiner_layers=NON_NEGATIVE,
        cond_refiner_layers=NON_NEGATIVE, spatial_hidden_mult=above(0), cond_hidden_mult=above(0),
        hidden_dim=POSITIVE, decoder_layers=POSITIVE, out_dim=POSITIVE, init_range=above(0),
        sparse_refine_ratio=in_range(0, 1, True), out_activation=one_of(*OUT_ACTIVATIONS),
        variant=one_of(*VARIANTS), sparse_refine=one_of(*SPARSE_REFINE), fused_refiner=one_of(*SPARSE_REFINE))
    """Range rules of the config keys (checked when a config is loaded, before any data is read)."""

    def __init__(
        self,
        cond_dim: int,
        spatial_dims: int = 3,
        # spatial embedding and pi
        spatial_resolutions: Sequence[Resolution] = (16, 24, 32, 48),
        spatial_channels: int = 2,
        ssr_resolution: Optional[Resolution] = None,
        pe_frequencies: int = 6,
        pe_scale: float = 1.0,
        pe_include_input: bool = False,
        use_pi: bool = True,
        # spatial refiner
        spatial_refiner_layers: int = 4,
        spatial_hidden_mult: float = 4.0,
        # condition embedding and refiner
        cond_resolutions: Sequence[Resolution] = (2, 4, 8, 16),
        cond_channels: int = 2,
        cond_refiner_layers: int = 2,
        cond_hidden_mult: float = 2.67,
        # fusion and decoder
        hidden_dim: int = 128,
        decoder_layers: int = 3,
        out_dim: int = 1,
        out_activation: str = "sigmoid",
        init_output_mean: Union[float, str, None] = AUTO_OUTPUT_MEAN,
        # switches
        refine_at_inference: bool = True,
        variant: Optional[str] = None,
        init_range: float = 1e-3,
        # fast paths (same results as the plain path to fp32 rounding)
        fast_paths: bool = True,
        sparse_refine: str = "auto",
        sparse_refine_ratio: float = 0.75,
        fused_refiner: str = "auto",
    ):
        super().__init__()
        use_pi, spatial_refiner_layers, cond_refiner_layers = self._apply_variant(
            variant, use_pi, spatial_refiner_layers, cond_refiner_layers)
        self._check_arguments(cond_dim, spatial_dims, out_activation, pe_frequencies, spatial_refiner_layers,
                              cond_refiner_layers, spatial_resolutions, cond_resolutions)
        self.cond_dim = int(cond_dim)
        self.spatial_dims = int(spatial_dims)
        self.use_pi = bool(use_pi)
        self.refine_at_inference = bool(refine_at_inference)
        self.out_activation = out_activation
        self.variant = variant
        # Built in this order (the order of the random draws, so seeded inits stay bitwise reproducible):
        self._build_spatial_branch(spatial_resolutions, spatial_channels, init_range, ssr_resolution, pe_frequencies,
                                   pe_scale, pe_include_input, spatial_refiner_layers, spatial_hidden_mult)
        self._build_condition_branch(cond_resolutions, cond_channels, init_range, cond_refiner_layers,
                                     cond_hidden_mult)
        self._build_fusion_and_decoder(hidden_dim, decoder_layers, out_dim, init_output_mean)
        self._init_fast_paths_and_cache(fast_paths, sparse_refine, sparse_refine_ratio, fused_refiner)

    # ------------------------------------------------------------------------------------------------
    # construction, in the order of __init__
    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _apply_variant(variant: Optional[str], use_pi: bool, spatial_refiner_layers: int,
                       cond_refiner_layers: int) -> Tuple[bool, int, int]:
        """The switches after the ablation shortcut ``variant`` (:data:`VARIANTS`) forced its keys."""
        if variant is None:
            return use_pi, spatial_refiner_layers, cond_refiner_layers
        if variant not in VARIANTS:
            raise ConfigError(f"model.variant: unknown '{variant}'; known: {', '.join(VARIANTS)}")
        forced = VARIANTS[variant]
        return (bool(forced.get("use_pi", use_pi)),
                int(forced.get("spatial_refiner_layers", spatial_refiner_layers)),
                int(forced.get("cond_refiner_layers", cond_refiner_layers)))

    @staticmethod
    def _check_arguments(cond_dim, spatial_dims, out_activation, pe_frequencies, spatial_refiner_layers,
                         cond_refiner_layers, spatial_resolutions, cond_resolutions) -> None:
        """ConfigError for arguments no config rule covers (model built by hand, or data-injected values)."""
        if spatial_dims not in (2, 3):
            raise ConfigError(f"model.spatial_dims must be 2 or 3, got {spatial_dims}")
        if int(cond_dim) < 1:
            raise ConfigError(f"model.cond_dim must be >= 1, got {cond_dim}")
        if out_activation not in OUT_ACTIVATIONS:
            raise ConfigError(f"model.out_activation: '{out_activation}' not in {OUT_ACTIVATIONS}")
        if pe_frequencies < 0 or spatial_refiner_layers < 0 or cond_refiner_layers < 0:
            raise ConfigError("model.pe_frequencies / spatial_refiner_layers / cond_refiner_layers must be >= 0")
        if isinstance(spatial_resolutions, numbers.Integral) or isinstance(cond_resolutions, numbers.Integral):
            raise ConfigError("model.spatial_resolutions and model.cond_resolutions are lists (one entry per level)")

    def _build_spatial_branch(self, spatial_resolutions, spatial_channels, init_range, ssr_resolution,
                              pe_frequencies, pe_scale, pe_include_input, spatial_refiner_layers,
                              spatial_hidden_mult) -> None:
        """Spatial grids (``spatial_grids[l]``: (d_fs, *r_l)), ``ssr_shape``, PE, ``spatial_feature_dim`` (D_sp) and
        ``spatial_refiner`` (the shared ``RefinedLatticeMixin`` lattice)."""
        shapes = [_spatial_shape(r, self.spatial_dims, "spatial_resolutions") for r in spatial_resolutions]
        ssr_shape = (None if ssr_resolution is None
                     else _spatial_shape(ssr_resolution, self.spatial_dims, "ssr_resolution"))
        self._build_lattice(shapes, spatial_channels, init_range, ssr_shape, pe_frequencies, pe_scale,
                            pe_include_input, self.use_pi, spatial_refiner_layers, spatial_hidden_mult)

    def _build_condition_branch(self, cond_resolutions, cond_channels, init_range, cond_refiner_layers,
                                cond_hidden_mult) -> None:
        """Condition lines (``cond_lines.lines[l * d_c + k]``: (r_lk, d_fc)), ``cond_feature_dim`` (D_c) and the
        condition refiner R_c (None without layers)."""
        rows = [per_axis(r, self.cond_dim, "model.cond_resolutions", "one length per condition parameter")
                for r in cond_resolutions]                                       # (L_c, d_c)
        self.cond_lines = ConditionLines(rows, cond_channels, init_range)
        self.cond_feature_dim = self.cond_lines.out_dim
        self.cond_refiner = (GLURefiner(self.cond_feature_dim, cond_refiner_layers, cond_hidden_mult)
                             if cond_refiner_layers > 0 else None)

    def _build_fusion_and_decoder(self, hidden_dim, decoder_layers, out_dim, init_output_mean) -> None:
        """Fusion layer ``ReLU(W_f [z_sp || z_c] + b_f)`` (weight (hidden, D_sp + D_c)), decoder g, and the output
        bias when ``init_output_mean`` is a number ("auto" is resolved later by the program)."""
        self.fusion = nn.Sequential(
            nn.Linear(self.spatial_feature_dim + self.cond_feature_dim, hidden_dim), nn.ReLU())
        self.decoder = MLPDecoder(hidden_dim, hidden_dim, decoder_layers, out_dim)
        if check_init_output_mean(init_output_mean) not in (None, AUTO_OUTPUT_MEAN):
            self.init_output(init_output_mean)

    def _init_fast_paths_and_cache(self, fast_paths, sparse_refine, sparse_refine_ratio, fused_refiner) -> None:
        """Fast-path switches and the bake caches (``_baked_grid`` / ``_baked_fused`` / ``_baked_lines``, never
        saved; dropped when a state dict is loaded)."""
        self._set_fast_options(fast_paths, sparse_refine, sparse_refine_ratio, fused_refiner)
        self.register_buffer("_baked_lines", None, persistent=False)  # (d_c, H, L_c*d_fc) with a cond refiner
        self.register_buffer("_cond_tables", None, persistent=False)  # folded condition lines (_fold_condition)
        self.register_buffer("_cond_index", None, persistent=False)   # (3, lines) int64: parameter, row, length
        self.register_buffer("_cond_b", None, persistent=False)       # the fusion bias b_f of that snapshot
        self._cond_lines_list: List[Tuple[int, int, int]] = []          # the same, as Python ints
        self._lowp_cache: Dict[object, Optional[Tuple]] = {}   # per dtype; "mlp" / "amx": packed weights
        self._rows_cache: Dict[torch.dtype, Tuple[tuple, Tensor]] = {}   # predict_grid(keep_rows=True)
        self.register_load_state_dict_pre_hook(DRRNet._drop_cache_on_load)

    # ------------------------------------------------------------------------------------------------
    # refined structures
    # ------------------------------------------------------------------------------------------------
    def cond_line_set(self, refine: bool = True) -> Tensor:
        """Refined condition lines ``split(line + R_c(line))``, line = unified lines: (d_c, H, L_c * d_fc)."""
        u = self.cond_lines.unified()                             # (H, D_c)
        if refine and self.cond_refiner is not None:
            u = u + self.cond_refiner(u)
        return self.cond_lines.split(u)

    # ------------------------------------------------------------------------------------------------
    # features
    # ------------------------------------------------------------------------------------------------
    def spatial_features(self, x: Tensor) -> Tensor:
        """z_sp: x (B, N, d) in [-1, 1] (column 0 = last array axis) -> (B, N, D_sp)."""
        if self.is_baked and self._baked_grid is not None:
            return sample_grid(self._baked_grid, x)
        if self.use_pi:
            return sample_grid(self.spatial_lattice(self._refine_now()), x)
        z = self.spatial_grids(x)                                 # (B, N, L*d_fs)
        if self.spatial_refiner is not None and self._refine_now():
            z = z + self.spatial_refiner(z)
        return z

    def cond_features(self, c: Tensor) -> Tensor:
        """z_c: c (B, d_c) in [0, 1] -> (B, D_c), ordered (parameter, level, channel)."""
        if self.is_baked and self._baked_lines is not None:
            return ConditionLines.sample_split(self._baked_lines, c)
        if self.cond_refiner is not None:
            return ConditionLines.sample_split(self.cond_line_set(self._refine_now()), c)
        return self.cond_lines(c)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Predict values.

        Args:
            x: (B, N, d) coordinates in [-1, 1], column 0 = last array axis.
            c: (B, d_c) conditions in [0, 1].

        Returns:
            (B, N, out_dim), in (0, 1) with the sigmoid output.
        """
        if x.dim() != 3 or x.shape[-1] != self.spatial_dims:
            raise ValueError(f"DRRNet: x must be (B, N, {self.spatial_dims}), got {tuple(x.shape)}")
        if c.dim() != 2 or c.shape != (x.shape[0], self.cond_dim):
            raise ValueError(f"DRRNet: c must be ({x.shape[0]}, {self.cond_dim}), got {tuple(c.shape)}")
        if self.fast_paths and self.use_pi:
            if self.is_baked and self._baked_fused is not None:
                return self._forward_baked_fast(x, c)
            if not self.is_baked:
                return self._forward_lattice_fast(x, c)
        return self._forward_plain(x, c)

    def _forward_plain(self, x: Tensor, c: Tensor) -> Tensor:
        """The plain path: sampled features, concatenation, fusion and decoder per point."""
        B, N, _ = x.shape
        z_sp = self.spatial_features(x)                            # (B, N, D_sp)
        z_c = self.cond_features(c)                                # (B, D_c)
        h = torch.cat([z_sp, z_c[:, None, :].expand(B, N, z_c.shape[-1])], dim=-1)
        out = self.decoder(self.fusion(h))                         # (B, N, out_dim)
        return output_activation(out, self.out_activation)

    # ------------------------------------------------------------------------------------------------
    # fast paths (models/fast_ops.py)
    # ------------------------------------------------------------------------------------------------
    def _fusion_parts(self) -> Tuple[Tensor, Tensor, Tensor]:
        """W_sp (hidden, D_sp), W_c (hidden, D_c), b (hidden,) of the fusion layer."""
        lin = self.fusion[0]
        D = self.spatial_feature_dim
        return lin.weight[:, :D], lin.weight[:, D:], lin.bias

    def cond_bias(self, c: Tensor) -> Tensor:
        """The condition part of the fusion pre-activation, ``W_c z_c(c) + b_f``: c (B, d_c) -> (B, hidden).

        Baked: from the folded condition lines (:meth:`_fold_condition`), each row on its own (no products over
        the batch: a member's row has the same bits alone or among others)."""
        if self.is_baked and self._cond_tables is not None:
            return self._cond_bias_folded(c)
        _, w_c, b = self._fusion_parts()
        return torch.nn.functional.linear(self.cond_features(c), w_c, b)

    @torch.no_grad()
    def _fold_condition(self) -> None:
        """At bake: ``W_c z_c(c)`` is linear in the condition lines, so each line j (of parameter k_j; the refined
        lines, one per parameter, or else the raw lines of every level) times its block of W_c's columns is a
        table A_j (length_j, hidden), and the condition bias is ``b_f + sum_j lerp(A_j, c_{k_j})``: d_c or
        d_c L_c interpolations of hidden-wide rows instead of the features and a product (equal to the product
        form within float32 rounding). Stored as ``_cond_tables`` (rows, hidden), ``_cond_index`` (3, lines):
        each line's parameter, first row and length, and ``_cond_b`` (b_f)."""
        _, w_c, b = self._fusion_parts()
        lines, params = [], []
        if self._baked_lines is not None:                     # (d_c, H, F): columns k F .. (k + 1) F - 1
            lines, params = list(self._baked_lines), list(range(self.cond_dim))
        else:                                                 # raw lines, features in (parameter, level) order
            cl = self.cond_lines
            for k in range(self.cond_dim):
                for level in range(cl.num_levels):
                    lines.append(cl.line(level, k))
                    params.append(k)
        tables, cols, rows, index = [], 0, 0, []
        for k, line in zip(params, lines):
            n, F = line.shape
            tables.append(line.float() @ w_c[:, cols:cols + F].float().t())
            index.append((k, rows, n))
            cols, rows = cols + F, rows + n
        if cols != w_c.shape[1]:
            raise RuntimeError(f"DRRNet._fold_condition: lines with {cols} features, W_c has {w_c.shape[1]} columns")
        self._cond_tables = torch.cat(tables).contiguous()
        self._cond_index = torch.tensor(index, dtype=torch.int64, device=w_c.device).t().contiguous()
        self._cond_lines_list = index
        self._cond_b = b.detach().clone()

    def _cond_bias_folded(self, c: Tensor) -> Tensor:
        """:meth:`cond_bias` of a baked model: compiled on CPU (``cpu_kernels.cond_bias_lines``: one call), else
        the same float operations in PyTorch (the same bits; differentiable in c)."""
        b = self._cond_b
        if c.device.type == "cpu" and c.dtype == torch.float32 and b.dtype == torch.float32 and \
                not (c.requires_grad and torch.is_grad_enabled()):
            out = cpu_kernels.cond_bias_lines(c.contiguous(), self._cond_tables, self._cond_index, b)
            if out is not None:
                return out
        if torch.isnan(c).any():
            raise ValueError("DRRNet.cond_bias: a condition is NaN (conditions are parameters scaled to [0, 1])")
        out = b.expand(c.shape[0], -1)
        for k, r0, n in self._cond_lines_list:               # each line as ConditionLines samples it
            out = out + lerp_lines(self._cond_tables[None, r0:r0 + n], c[:, k:k + 1])[:, 0]
        return out.contiguous()

    def _head(self, pre: Tensor) -> Tensor:
        """Fusion pre-activation (..., hidden) -> ReLU -> decoder -> output activation."""
        return output_activation(self.decoder(torch.relu(pre)), self.out_activation)

    def _forward_lattice_fast(self, x: Tensor, c: Tensor) -> Tensor:
        """Unbaked fast path: pi + R_sp on the touched (or all) vertices, folded fusion, gather interpolation."""
        B, N, d = x.shape
        w_sp, _, _ = self._fusion_parts()
        z, fused = self._folded_features(x.reshape(B * N, d), w_sp)     # (B*N, hidden)
        if fused and torch.is_grad_enabled():
            return fused_head(z, self.cond_bias(c), self.decoder.linears, self.out_activation).reshape(B, N, -1)
        pre = z.reshape(B, N, -1) + self.cond_bias(c)[:, None, :]
        return self._head(pre)

    def _forward_baked_fast(self, x: Tensor, c: Tensor) -> Tensor:
        """Baked fast path: gather interpolation of the folded lattice + per-row condition bias."""
        B, N, d = x.shape
        z = self._baked_features(x.reshape(B * N, d))                    # (B*N, hidden)
        pre = z.reshape(B, N, -1) + self.cond_bias(c)[:, None, :]
        return self._head(pre)

    def _lowp(self, dtype: torch.dtype) -> Tuple[Tensor, ...]:
        """The folded table and decoder weights in ``dtype`` (cached until unbake)."""
        if dtype not in self._lowp_cache:
            tensors = [self._baked_fused.to(dtype)]
            for m in self.decoder.linears:
                tensors += [m.weight.detach().to(dtype), m.bias.detach().to(dtype)]
            self._lowp_cache[dtype] = tuple(tensors)
        return self._lowp_cache[dtype]

    @torch.no_grad()
    def predict_grid(self, shape: Sequence[int], c: Tensor, chunk_size: int = 1 << 13, fast: bool = True,
                     dtype: Optional[torch.dtype] = None, out: Optional[Tensor] = None,
                     table_dtype: Optional[torch.dtype] = None, keep_rows: bool = False,
                     vertices: Optional[Tensor] = None) -> Tensor:
        """Reconstruct one member on the vertices of a lattice (e.g. its full resolution).

        Same values as ``forward(grid_coords(shape)[None], c)`` (output channel 0), computed in chunks of
        ``chunk_size`` points; coordinates are generated per chunk, never all at once.

        Args:
            shape: array shape (D, H, W) / (H, W) of the queried lattice.
            c: (d_c,) or (1, d_c) condition.
            chunk_size: points per chunk (the one-pass decoder below needs no chunks: its memory is per block
                of 96 rows per thread).
            fast: True: on a baked model with ``use_pi``, per chunk: rows of the folded lattice (a slice when
                ``shape`` is the SSR shape, a row gather when every query vertex is a lattice vertex, else
                the gather interpolation) + the member's condition bias, ReLU (on CPU fp32 one compiled pass,
                ``GridQuery.gather_bias_relu``) and the decoder (addmm; on CPU fp32 the hidden layers as
                oneDNN linear + fused ReLU where it exists, ``DRR_ONEDNN_LINEAR=off`` switches it off; the
                last layer writes into the result). On CPU fp32 with compiled kernels, when the hidden
                layers are square with a width that is a multiple of ``cpu_kernels.panel_width()`` (32 with
                AVX-512) and the output has one channel, all of that runs as one compiled pass per block of
                rows (``cpu_kernels.baked_mlp``: the block's activations stay in the caches, register-blocked
                products; equal to the per-pass path within float32 rounding, bitwise the same for any chunk
                size or thread count); ``DRR_BAKED_MLP=off`` gives the per-pass path. Other
                models fall back to ``forward`` on chunked coordinates. False: the plain path
                (grid_sample + per-point fusion) on chunked coordinates.
            dtype: compute dtype of the fast path (torch.bfloat16 / torch.float16; None = float32); the
                result is float32. torch.bfloat16 on a CPU with AMX-BF16 (compiled library, ``DRR_BAKED_MLP``
                not off, the same decoder shapes as above with a width a multiple of 32): one compiled pass per
                block of rows with the products on the AMX tiles (``cpu_kernels.baked_mlp_amx``; rows of other
                lattices resampled per chunk as ``keep_rows`` does); else PyTorch's bf16 products.
            out: optional contiguous float32 tensor with prod(shape) elements on the model's device to write into
                (anything else: ValueError, never a silent copy).
            table_dtype: torch.bfloat16: the fast path reads the folded table stored in bfloat16 (a copy made
                once, cached until unbake) and computes everything else in float32: half the bytes of the
                gather, which bounds a query coarser than the lattice (each lattice row read about once); the
                result is exactly the float32 path on the table rounded to bfloat16. Only with ``dtype`` None.
            keep_rows: keep the folded table resampled onto this query lattice (prod(shape) x hidden values,
                the interpolation of every query vertex; it does not depend on the condition) and reuse it while
                the next calls ask for the same ``shape`` (and ``table_dtype``): later members then cost the
                condition bias, the ReLU and the decoder only, with bitwise the same result. One lattice is kept
                per products' dtype (float32; with ``dtype``, in that dtype); ``unbake`` drops them. For many
                members queried on one lattice that is not the model lattice (an explorer's volume, a
                resolution sweep).
            vertices: with ``keep_rows``, only these flat (C-order) vertex indices of the lattice, in this order
                (e.g. the planes an explorer shows, read from the kept rows); returns a (len(vertices),) tensor,
                equal to the full lattice's values there up to the products' summation order.

        Returns:
            float32 tensor of ``shape`` on the model's device.
        """
        shape = tuple(int(n) for n in shape)
        if len(shape) != self.spatial_dims:
            raise ValueError(f"predict_grid: shape {shape} needs {self.spatial_dims} axes")
        dev = self.fusion[0].weight.device
        c = c.reshape(1, -1).to(dev, torch.float32)
        P = math.prod(shape)
        if out is not None and (out.dtype != torch.float32 or out.numel() != P or not out.is_contiguous()
                                or out.device != dev):
            raise ValueError(f"predict_grid: out must be a contiguous float32 tensor of {P} elements on {dev} (the "
                             f"result is written into it); got {out.dtype}, {out.numel()} elements, "
                             f"{'contiguous' if out.is_contiguous() else 'not contiguous'}, on {out.device}")
        res = out.reshape(-1) if out is not None else torch.empty(P, device=dev, dtype=torch.float32)
        use_fast = fast and self.use_pi and self.is_baked and self._baked_fused is not None
        if vertices is not None and (not use_fast or out is not None):
            if out is not None:
                raise ValueError("predict_grid: vertices and out do not go together")
            full = self.predict_grid(shape, c, chunk_size, fast, dtype, None, table_dtype)
            return full.reshape(-1)[vertices.to(full.device, torch.int64).reshape(-1)]
        if not use_fast:
            q = grid_query(shape, shape, dev)
            coord_axes = [self._axis_coords(n, dev) for n in shape]
            for s, e in q.chunks(chunk_size):
                x = self._chunk_coords(q, coord_axes, s, e)[None]
                y = self(x, c) if fast else self._forward_plain(x, c)
                res[s:e] = y[0, :, 0].float()
            return res.reshape(shape)
        if vertices is not None and not keep_rows:
            raise ValueError("predict_grid: vertices needs keep_rows=True")
        res = self._baked_fields(shape, c, chunk_size, dtype, table_dtype, keep_rows, vertices,
                                 None if vertices is not None else res.view(1, -1))
        return res[0] if vertices is not None else res[0].reshape(shape)

    @torch.no_grad()
    def predict_grid_members(self, shape: Sequence[int], cs: Tensor, chunk_size: int = 1 << 13,
                             dtype: Optional[torch.dtype] = None, table_dtype: Optional[torch.dtype] = None,
                             keep_rows: bool = False) -> Tensor:
        """Several members on one lattice: (K, *shape) float32, member k = ``predict_grid(shape, cs[k], ...)``.

        On a baked model whose decoder the one-pass CPU kernels take (``predict_grid``'s fast path: float32, or
        bf16 products on AMX), each block of the lattice's table rows is read (or interpolated) once for all K
        members, so the pass over the rows, which bounds a single member's time on memory, is shared; bitwise the
        same values as K ``predict_grid`` calls. Otherwise (other models, devices, dtypes) it is those K calls.

        Args:
            shape: array shape of the queried lattice.
            cs: (K, d_c) conditions.
            chunk_size, dtype, table_dtype, keep_rows: as in :meth:`predict_grid`.
        """
        shape = tuple(int(n) for n in shape)
        if cs.dim() != 2 or cs.shape[1] != self.cond_dim:
            raise ValueError(f"predict_grid_members: conditions {tuple(cs.shape)}, expected (K, {self.cond_dim})")
        dev = self.fusion[0].weight.device
        if not (self.use_pi and self.is_baked and self._baked_fused is not None) or len(shape) != self.spatial_dims:
            return torch.stack([self.predict_grid(shape, c, chunk_size, dtype=dtype, table_dtype=table_dtype,
                                                  keep_rows=keep_rows) for c in cs]) if len(cs) else \
                torch.empty(0, *shape, device=dev)
        res = torch.empty(cs.shape[0], math.prod(shape), device=dev, dtype=torch.float32)
        return self._baked_fields(shape, cs.to(dev, torch.float32), chunk_size, dtype, table_dtype, keep_rows,
                                  None, res).reshape(-1, *shape)

    def _baked_fields(self, shape, cs: Tensor, chunk_size: int, dtype, table_dtype, keep_rows: bool,
                      vertices: Optional[Tensor], res: Optional[Tensor]) -> Tensor:
        """The baked fast path of predict_grid for K members (conditions cs (K, d_c)) into res (K, prod(shape)),
        or (with ``vertices``) into a new (K, len(vertices)) tensor; returns it (output activation applied)."""
        dev = self.fusion[0].weight.device
        lins = self.decoder.linears
        cb32 = self.cond_bias(cs)                  # (K, hidden): baked, each row the bits of a single member's
        if table_dtype not in (None, torch.float32, torch.bfloat16) or (table_dtype is not None and
                                                                         dtype is not None):
            raise ValueError(f"predict_grid: table_dtype {table_dtype} (expected None or torch.bfloat16, and "
                             f"only with dtype None; got dtype {dtype})")
        if dtype is None or dtype == self._baked_fused.dtype:
            table = self._baked_fused
            if table_dtype == torch.bfloat16:
                table = self._lowp(torch.bfloat16)[0]
            wb = [t for m in lins for t in (m.weight, m.bias)]
            act_dtype = torch.float32                                              # the products' dtype
        else:
            table, *wb = self._lowp(dtype)
            act_dtype = dtype
        q = grid_query(shape, self.ssr_shape, dev)
        if keep_rows and not q.identity:
            table, q = self._resampled_rows(q, table, act_dtype, chunk_size), grid_query(shape, shape, dev)
        if vertices is not None:
            vertices = vertices.to(dev, torch.int64).reshape(-1)
            table = table.index_select(0, vertices)
            P = vertices.numel()
            q = grid_query((P,), (P,), dev)
            res = torch.empty(cs.shape[0], P, device=dev, dtype=torch.float32)
        K, P = res.shape
        amx = self._amx_args(table, act_dtype) if dev.type == "cpu" else None
        if amx is not None:       # bf16 products on AMX tiles, one compiled pass per block of rows
            if not q.identity:                                        # rows resampled per chunk: buffers reused
                n = min(int(chunk_size), P)
                zero = torch.zeros(table.shape[1], dtype=table.dtype)
                rows_buf, part_buf = torch.empty(n, table.shape[1], dtype=table.dtype), torch.empty(K * n)
            for s, e in ([(0, q.num_points)] if q.identity else q.chunks(chunk_size)):
                rows = table if q.identity else \
                    q.gather_bias_relu(table, s, e, zero, rows_buf[:e - s], relu=False)  # as keep_rows resamples
                part = res if q.identity else part_buf[:K * (e - s)].view(K, e - s)       # them: the same bits
                if not cpu_kernels.baked_mlp_amx(rows, cb32, *amx, out=part, activation=self.out_activation):
                    break                                             # AMX refused: the PyTorch products
                if not q.identity:
                    res[:, s:e] = part
            else:
                return res                                            # (output activation applied)
            self._lowp_cache["amx"] = None
        n = min(int(chunk_size), P)
        H = table.shape[1]
        cbs = cb32.to(act_dtype)
        w_t = [wb[2 * i].t() for i in range(len(lins))]
        last = len(lins) - 1
        direct = act_dtype == torch.float32 and w_t[last].shape[1] == 1            # last layer into res
        mlp = self._mlp_args(table, q) if direct and dev.type == "cpu" else None
        if mlp is not None:       # gather + decoder per block of rows, compiled: memory O(block), so one call
            cpu_kernels.baked_mlp(q, 0, q.num_points, table, cbs.contiguous(), *mlp, out=res)
            return _output_activations_(res, self.out_activation)
        bufs = [torch.empty(n, H, device=dev, dtype=act_dtype) for _ in range(2)]    # reused: no per-chunk
        fused_relu = direct and dev.type == "cpu" and _onednn_linear_relu_ok()      # allocation; hidden:
        for k in range(K):                                                          # linear + ReLU
            cb, out_k = cbs[k].contiguous(), res[k]
            for s, e in q.chunks(chunk_size):
                m = e - s
                h = q.gather_bias_relu(table, s, e, cb, bufs[0][:m])                   # relu(rows + cb)
                for i in range(len(lins)):
                    if i < last and fused_relu:
                        h = _linear_relu_onednn(h, wb[2 * i], wb[2 * i + 1])
                    elif i < last and w_t[i].shape[1] == H:
                        nxt = bufs[(i + 1) % 2][:m]
                        torch.addmm(wb[2 * i + 1], h, w_t[i], out=nxt)
                        h = nxt.relu_()
                    elif i == last and direct:
                        h = torch.addmm(wb[2 * i + 1], h, w_t[i], out=out_k[s:e].view(m, 1))
                    else:
                        h = torch.addmm(wb[2 * i + 1], h, w_t[i])
                        if i < last:
                            h = h.relu_()
                if direct:
                    _output_activation_(out_k[s:e], self.out_activation)
                else:
                    out_k[s:e] = output_activation(h[:, 0].float(), self.out_activation)
        return res

    def _mlp_args(self, table: Tensor, q: GridQuery):
        """(packed, hbias, w_out, b_out) of ``cpu_kernels.baked_mlp`` (the packing cached until unbake) where that
        kernel applies to the float32 products on ``table`` (float32 or bfloat16, CPU) queried by ``q``: compiled
        library, ``DRR_BAKED_MLP`` not off, square hidden layers of a width that is a multiple of
        ``cpu_kernels.panel_width()``, one output channel, at most 256 corners; else None (the per-pass loop)."""
        if cpu_kernels.switched_off("DRR_BAKED_MLP") or table.device.type != "cpu" \
                or table.dtype not in (torch.float32, torch.bfloat16) or q.corners > 256 \
                or any(w.dtype != torch.float32 for w in q.axis_w) or cpu_kernels.library() is None:
            return None
        nr = cpu_kernels.panel_width()
        return self._packed_decoder("mlp", table.shape[1], nr, cpu_kernels.pack_panels,
                                    (table.shape[1] // nr, table.shape[1], nr), torch.float32)

    def _amx_args(self, table: Tensor, act_dtype: torch.dtype):
        """(packed, hbias, w_out, b_out) of ``cpu_kernels.baked_mlp_amx`` (cached until unbake) when bf16 products
        on AMX tiles apply: bf16 products (``dtype=torch.bfloat16``), a CPU and library with the AMX kernel,
        ``DRR_BAKED_MLP`` not off, square hidden layers of a width that is a multiple of 32 and one output
        channel; else None."""
        if act_dtype != torch.bfloat16 or table.dtype != torch.bfloat16 or table.device.type != "cpu" or \
                cpu_kernels.switched_off("DRR_BAKED_MLP") or cpu_kernels.library() is None or \
                not cpu_kernels.has_amx():
            return None
        H = table.shape[1]
        return self._packed_decoder("amx", H, 32, cpu_kernels.pack_amx, (H // 32, H // 16, 16, 16, 2),
                                    torch.bfloat16)

    def _packed_decoder(self, key: str, H: int, multiple: int, pack, packed_shape: tuple, packed_dtype):
        """(packed hidden weights (L, *packed_shape), hidden biases (L, H), output weight (H,), output bias) of a
        one-pass kernel, cached in ``_lowp_cache[key]`` until unbake; None (cached too) unless the hidden layers
        are float32 H x H with H a multiple of ``multiple`` and the output has one channel."""
        if key not in self._lowp_cache:
            lins = self.decoder.linears
            hidden, last = lins[:-1], lins[-1]
            ok = H % multiple == 0 and last.weight.shape == (1, H) and \
                all(m.weight.shape == (H, H) and m.weight.dtype == torch.float32 for m in hidden)
            self._lowp_cache[key] = None if not ok else (
                torch.stack([pack(m.weight) for m in hidden]) if hidden else
                torch.empty(0, *packed_shape, dtype=packed_dtype),
                torch.stack([m.bias.detach().float() for m in hidden]).contiguous() if hidden else torch.empty(0, H),
                last.weight.detach().float().reshape(H).contiguous(), float(last.bias.detach()))
        return self._lowp_cache[key]

    def _resampled_rows(self, q: GridQuery, table: Tensor, dtype: torch.dtype, chunk_size: int) -> Tensor:
        """The folded ``table`` interpolated at every vertex of ``q``'s query lattice, in the products' ``dtype``
        (as the interpolating path computes them before the condition bias), kept for the next call with the same
        lattice, table and dtype: ``predict_grid(keep_rows=True)``."""
        key = (q.query_shape, table.dtype, table.device)
        kept = self._rows_cache.get(dtype)
        if kept is None or kept[0] != key:
            self._rows_cache.pop(dtype, None)   # the previous lattice's rows go before the new ones are made
            rows = torch.empty(q.num_points, table.shape[1], device=table.device, dtype=dtype)
            zero = torch.zeros(table.shape[1], device=table.device, dtype=dtype)
            for s, e in q.chunks(chunk_size):
                q.gather_bias_relu(table, s, e, zero, rows[s:e], relu=False)
            kept = self._rows_cache[dtype] = (key, rows)
        return kept[1]

    @staticmethod
    def _axis_coords(n: int, dev) -> Tensor:
        return torch.from_numpy(axis_coords(n).astype(np.float32)).to(dev)

    @staticmethod
    def _chunk_coords(q: GridQuery, coord_axes: List[Tensor], s: int, e: int) -> Tensor:
        """Coordinates (e - s, d) of query vertices s..e-1 (column 0 = last array axis), = grid_coords rows."""
        rem = torch.arange(s, e, device=coord_axes[0].device)
        cols = []
        for k, st in enumerate(q.q_strides):
            j = torch.div(rem, st, rounding_mode="floor")
            rem = rem - j * st
            cols.append(coord_axes[k][j])
        return torch.stack(cols[::-1], dim=-1)

    # ------------------------------------------------------------------------------------------------
    # baking
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def bake(self, chunk_size: int = 1 << 16, fold: bool = True) -> None:
        """Switch to eval mode and cache the refined structures (pi and the refiners run once, no grad).

        Args:
            chunk_size: lattice vertices refined at a time (bounds the memory of the bake).
            fold: with ``use_pi`` also store the folded lattice ``W_sp G'`` channels-last (prod(R), hidden) in
                ``_baked_fused`` for the fast paths (memory prod(R) * hidden floats).

        Caches the lattice (D_sp, *R) (with ``use_pi``) and the condition lines (d_c, H, L_c * d_fc) (with a
        condition refiner) as non-persistent buffers; later calls of ``forward`` sample them and run only
        the fusion and the decoder. Without ``use_pi`` a spatial refiner keeps running per query point.
        The cache is a snapshot: ``train()``, :meth:`unbake` and ``load_state_dict`` drop it; after any other
        change of the weights call ``bake()`` again.
        """
        self.eval()
        self.unbake()
        refine = self.refine_at_inference
        if self.use_pi:
            self._bake_lattice(refine, chunk_size, self._fusion_parts()[0] if fold else None)
        if self.cond_refiner is not None:
            self._baked_lines = self.cond_line_set(refine).contiguous()
        self._fold_condition()
        super().bake()                                                 # marks the model baked

    def unbake(self) -> None:
        """Drop the cache; ``forward`` recomputes pi and the refiners again."""
        super().unbake()
        self._baked_grid = None
        self._baked_fused = None
        self._lowp_cache = {}
        self._rows_cache = {}
        self._baked_lines = None
        self._cond_tables = self._cond_index = self._cond_b = None
        self._cond_lines_list = []

    @staticmethod
    def _drop_cache_on_load(module: "DRRNet", *args, **kwargs) -> None:
        module.unbake()

    @torch.no_grad()
    def init_output(self, mean: float) -> None:
        """Set the last decoder bias so that an output of about ``mean`` is where training starts.

        ``logit(mean)`` with the sigmoid output (``mean`` clipped to [1e-4, 1 - 1e-4]), ``mean`` itself
        otherwise. Call it before training, e.g. with the mean of the normalized training values.
        """
        init_output_bias(self.decoder.net[-1], mean, self.out_activation == "sigmoid")

    # ------------------------------------------------------------------------------------------------
    # optimizer groups
    # ------------------------------------------------------------------------------------------------
    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Parameters by component: spatial_grids, cond_lines, spatial_refiner, cond_refiner, fusion, decoder.

        Every key is always present; a disabled refiner gives an empty list.
        """
        def params(m: Optional[nn.Module]) -> List[nn.Parameter]:
            return list(m.parameters()) if m is not None else []

        return {name: params(getattr(self, name)) for name in
                ("spatial_grids", "cond_lines", "spatial_refiner", "cond_refiner", "fusion", "decoder")}

    def extra_repr(self) -> str:
        return (f"cond_dim={self.cond_dim}, spatial_dims={self.spatial_dims}, ssr_shape={self.ssr_shape}, "
                f"use_pi={self.use_pi}, D_sp={self.spatial_feature_dim}, D_c={self.cond_feature_dim}, "
                f"out_activation={self.out_activation}, refine_at_inference={self.refine_at_inference}")


# ----------------------------------------------------------------------------------------------------
# The paper's three configurations (spec table 2.4): constructor kwargs plus the data's cond_dim (in a
# config file cond_dim and spatial_dims (3 here) are injected from the data).
# ----------------------------------------------------------------------------------------------------
PAPER_CONFIGS: Dict[str, Dict[str, object]] = {
    "nyx": dict(
        cond_dim=3,
        spatial_resolutions=[32, 80, 112, 128], spatial_channels=2, ssr_resolution=None,  # R = 128
        pe_frequencies=8,                                  # D_sp = 4 * 2 * 16 = 128
        spatial_refiner_layers=3, spatial_hidden_mult=4.0,  # hidden 512
        cond_resolutions=[2, 4, 8, 16], cond_channels=4,   # D_c = 3 * 4 * 4 = 48
        cond_refiner_layers=4, cond_hidden_mult=5.34,      # hidden floor(48 * 5.34) = 256
        hidden_dim=128, decoder_layers=3,
    ),
    "mpas": dict(
        cond_dim=4,
        spatial_resolutions=[[64, 64, 24], [128, 128, 48]], spatial_channels=4,
        ssr_resolution=[160, 160, 60],                     # array order: 60 vertices along x column 0
        pe_frequencies=10,                                 # D_sp = 2 * 4 * 20 = 160
        spatial_refiner_layers=4, spatial_hidden_mult=3.2,  # hidden 512
        cond_resolutions=[4, 8, 16, 32], cond_channels=4,  # D_c = 4 * 4 * 4 = 64
        cond_refiner_layers=3, cond_hidden_mult=2.0,       # hidden 128
        hidden_dim=128, decoder_layers=2,
    ),
    "clover": dict(
        cond_dim=6,
        spatial_resolutions=[16, 24, 32, 48], spatial_channels=2, ssr_resolution=128,
        pe_frequencies=6,                                  # D_sp = 4 * 2 * 12 = 96
        spatial_refiner_layers=4, spatial_hidden_mult=4.0,  # hidden 384
        cond_resolutions=[2, 4, 8, 16], cond_channels=2,   # D_c = 6 * 4 * 2 = 48
        cond_refiner_layers=2, cond_hidden_mult=2.67,      # hidden floor(48 * 2.67) = 128
        hidden_dim=128, decoder_layers=3,
    ),
}
# Paper totals (printed with one decimal, so +-0.05M). Ours (trainable parameters, the spec's reading: refiner
# widths D_sp = L*d_fs*2K and D_c = d_c*L_c*d_fc, hidden = floor(D * hidden_mult)):
# nyx 8,887,721 (-0.14%); mpas 4,642,945 (+0.93%); clover 854,345 (-5.07%: 0.854M printed as "0.9M").
PAPER_PARAM_COUNTS: Dict[str, float] = {"nyx": 8.9e6, "mpas": 4.6e6, "clover": 0.9e6}


_ONEDNN = {"ok": None}


def _linear_relu_onednn(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``relu(h @ weight^T + bias)`` as one oneDNN primitive with the ReLU as its post-op (CPU float32; the
    operator PyTorch's own compiler uses), which saves the separate ReLU pass over the (rows, out) result."""
    return torch.ops.mkldnn._linear_pointwise(h, weight, bias, "relu", [], "")


def _onednn_linear_relu_ok() -> bool:
    """Whether :func:`_linear_relu_onednn` exists here and gives the same bits as addmm + relu on a probe
    (checked once; the env var DRR_ONEDNN_LINEAR=off switches it off)."""
    if cpu_kernels.switched_off("DRR_ONEDNN_LINEAR"):
        return False
    if _ONEDNN["ok"] is None:
        try:
            g = torch.Generator().manual_seed(0)
            h, w, b = (torch.randn(s, generator=g) for s in ((67, 40), (24, 40), (24,)))
            _ONEDNN["ok"] = bool(torch.backends.mkldnn.is_available()) and torch.equal(
                _linear_relu_onednn(h, w, b), torch.addmm(b, h, w.t()).relu_())
        except Exception:  # noqa: BLE001 - missing operator / build without oneDNN: the addmm path
            _ONEDNN["ok"] = False
    return _ONEDNN["ok"]


def _output_activations_(res: Tensor, name: str) -> Tensor:
    """``_output_activation_`` on each member's row of res (K, P) on its own: the same bits as one member's call
    (a vectorized activation's lanes and tail depend on where an element sits in the tensor)."""
    for row in res:
        _output_activation_(row, name)
    return res


def _output_activation_(a: Tensor, name: str) -> Tensor:
    """``output_activation`` in place (the same kernels, so the same values)."""
    if name == "sigmoid":
        return torch.sigmoid(a, out=a)
    if name == "clamp":
        return a.clamp_(0.0, 1.0)
    if name != "none":
        raise ValueError(f"unknown output activation {name!r}")
    return a


def build_paper_model(name: str, **overrides) -> DRRNet:
    """A 3D DRRNet with the paper configuration ``name`` ("nyx", "mpas", "clover"), cond_dim included."""
    return DRRNet(spatial_dims=3, **{**PAPER_CONFIGS[name], **overrides})
