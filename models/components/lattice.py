"""The DRR spatial lattice, shared by DRR-Net (models/drrnet.py) and the DRR image models (models/image.py).

``G' = pi(G) + R(pi(G))``: ``pi`` = structural super-resolution (SSR) of L dense grids to one lattice shape R,
channel concatenation and per-channel sin/cos feature upsampling (PE); R = a GLU refiner applied pointwise to
every lattice vertex (spec ``drrnet.md`` 2.1, ``vision.md`` 2.1). A field model that owns the modules below mixes
in :class:`RefinedLatticeMixin` and gets:

* :meth:`~RefinedLatticeMixin.spatial_lattice`: the whole refined lattice (D, *R) (plain path, baking);
* :meth:`~RefinedLatticeMixin._folded_features`: the fast training / unbaked path: refine only the vertices a
  batch's interpolation stencils touch (``sparse_refine``), through the fused CPU pipeline
  (models/fast_ops.vertex_pipeline) when allowed, with a bias-free linear layer ``W`` folded into the vertices
  (``W interp(G') = interp(W G')``), then a gather interpolation;
* :meth:`~RefinedLatticeMixin._bake_lattice`: the cached lattice and its folded table ``W G'`` (P, hidden)
  for the baked fast path (a gather interpolation per query point).

Attributes the mixin reads (set by :meth:`~RefinedLatticeMixin._build_lattice` and
:meth:`~RefinedLatticeMixin._set_fast_options`): ``spatial_grids`` (DenseGrids), ``ssr_shape``, ``pe``
(FeatureUpsamplingPE or None), ``spatial_refiner`` (GLURefiner or None), ``spatial_feature_dim``, ``use_pi``,
``refine_at_inference``, ``fast_paths``, ``sparse_refine``, ``sparse_refine_ratio``, ``fused_refiner``,
``last_refined_vertices`` and the non-persistent buffers ``_baked_grid``, ``_baked_fused``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from models import fast_ops
from models.components.encodings import FeatureUpsamplingPE
from models.components.grids import DenseGrids
from models.components.refiners import GLURefiner
from util.registry import ConfigError

__all__ = ["RefinedLatticeMixin", "SPARSE_REFINE"]

SPARSE_REFINE = ("auto", "always", "never")


class RefinedLatticeMixin:
    """Methods of a model with a DRR spatial lattice (see the module docstring); mix into an ``nn.Module``."""

    # ------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------
    def _build_lattice(self, shapes: Sequence[Tuple[int, ...]], channels: int, init_range: float,
                       ssr_shape: Optional[Tuple[int, ...]], pe_frequencies: int, pe_scale: float,
                       pe_include_input: bool, use_pi: bool, refiner_layers: int, hidden_mult: float,
                       ssr_key: str = "model.ssr_resolution") -> None:
        """Create the grids (init U(-init_range, init_range)), the PE (with ``use_pi`` and K > 0) and the refiner
        (``refiner_layers`` > 0), in that order; ``ssr_shape`` None = the per-axis maximum of the grid shapes."""
        self.use_pi = bool(use_pi)
        self.spatial_grids = DenseGrids(shapes, channels, init_range)  # grids[l]: (C, *r_l)
        self.ssr_shape: Tuple[int, ...] = self.spatial_grids.max_shape if ssr_shape is None else tuple(ssr_shape)
        if any(n < 2 for n in self.ssr_shape):
            raise ConfigError(f"{ssr_key}: every axis needs >= 2 vertices, got {self.ssr_shape}")
        self.pe = (FeatureUpsamplingPE(self.spatial_grids.out_dim, pe_frequencies, pe_scale, pe_include_input)
                   if self.use_pi and pe_frequencies > 0 else None)
        self.spatial_feature_dim = self.pe.out_dim if self.pe is not None else self.spatial_grids.out_dim  # D
        self.spatial_refiner = (GLURefiner(self.spatial_feature_dim, refiner_layers, hidden_mult)
                                if refiner_layers > 0 else None)

    def _set_fast_options(self, fast_paths: bool, sparse_refine: str, sparse_refine_ratio: float,
                          fused_refiner: str) -> None:
        """Validate and store the fast-path switches; register the bake cache buffers (never saved)."""
        if sparse_refine not in SPARSE_REFINE:
            raise ConfigError(f"model.sparse_refine: '{sparse_refine}' not in {SPARSE_REFINE}")
        if fused_refiner not in SPARSE_REFINE:
            raise ConfigError(f"model.fused_refiner: '{fused_refiner}' not in {SPARSE_REFINE}")
        self.fast_paths = bool(fast_paths)
        self.sparse_refine = sparse_refine
        self.sparse_refine_ratio = float(sparse_refine_ratio)
        self.fused_refiner = fused_refiner
        self.last_refined_vertices: Optional[int] = None   # vertices refined by the last fast lattice pass
        self.register_buffer("_baked_grid", None, persistent=False)   # (D, *R) when baked with pi
        self.register_buffer("_baked_fused", None, persistent=False)  # (prod(R), hidden): W G' channels-last

    # ------------------------------------------------------------------------------------------------
    # the refined lattice
    # ------------------------------------------------------------------------------------------------
    def _refine_now(self) -> bool:
        return self.training or self.refine_at_inference

    def spatial_lattice(self, refine: bool = True, chunk_size: Optional[int] = None) -> Tensor:
        """The spatial lattice ``G' = pi(G) + R_sp(pi(G))`` (or ``pi(G)`` when not ``refine``): (D_sp, *R).

        Only defined with ``use_pi``. Every vertex goes through the PE and the refiner (memory ~ prod(R) *
        refiner hidden width). ``chunk_size``: process that many vertices at a time (the refiner is
        pointwise, so the result is the same; meant for ``no_grad`` use such as ``bake``).
        """
        if not self.use_pi:
            raise RuntimeError(f"{type(self).__name__}.spatial_lattice: use_pi is False, the model has no "
                               "spatial lattice")
        lat = self.spatial_grids.lattice(self.ssr_shape)          # (L*d_fs, *R)
        u = lat.flatten(1).transpose(0, 1)                        # (P, L*d_fs)
        P = u.shape[0]
        if chunk_size is None or chunk_size >= P:
            return self._refine_points(u, refine).transpose(0, 1).reshape(-1, *self.ssr_shape)
        out = u.new_empty(self.spatial_feature_dim, P)            # (D_sp, P)
        for i in range(0, P, chunk_size):
            out[:, i:i + chunk_size] = self._refine_points(u[i:i + chunk_size], refine).transpose(0, 1)
        return out.reshape(-1, *self.ssr_shape)

    def _refine_points(self, u: Tensor, refine: bool) -> Tensor:
        """Feature upsampling and refinement of lattice vertices: (P, L*d_fs) -> (P, D_sp).

        Without autograd (baking) and with ``fast_paths``, the chunked vertex pipeline's forward (same
        values; models/fast_ops.vertex_pipeline) when :meth:`_use_fused` allows it.
        """
        if not torch.is_grad_enabled() and self.fast_paths and self._use_fused(u):
            refiner = self.spatial_refiner if refine else None
            return fast_ops.vertex_pipeline(u.contiguous(), self.pe, refiner, None)
        if self.pe is not None:
            u = self.pe(u)
        if refine and self.spatial_refiner is not None:
            u = u + self.spatial_refiner(u)
        return u

    # ------------------------------------------------------------------------------------------------
    # fast paths (models/fast_ops.py)
    # ------------------------------------------------------------------------------------------------
    def _ssr_rows(self, rows: Tensor) -> Tensor:
        """pi's SSR + concatenation at some lattice vertices: rows (U,) flat indices -> (U, L*d_fs)."""
        parts = []
        for g, shape in zip(self.spatial_grids.grids, self.spatial_grids.shapes):
            wt = torch.float64 if g.dtype == torch.float64 else torch.float32
            idx, w = fast_ops.resize_stencil(rows, self.ssr_shape, shape, wt)
            parts.append(fast_ops.gather_interp(fast_ops.to_rows(g).contiguous(), idx, w))
        return torch.cat(parts, dim=-1)

    def _touched_rows(self, idx: Tensor, w: Tensor) -> Tuple[Optional[Tensor], Tensor, int]:
        """Decide sparse or dense refinement for stencil rows idx (M, K) with weights w (M, K).

        A vertex counts as touched only through a corner of non-zero weight: a point on a lattice vertex
        (training voxels when the SSR shape is the data's, as in the paper's Cloverleaf config) touches one
        to a few vertices, not 2^d. Zero-weight corners are pointed at touched row 0; they add exactly
        0 to values and gradients, as in ``grid_sample``.

        Returns (rows or None (dense), idx into the refined rows, number of refined vertices).
        """
        P = math.prod(self.ssr_shape)
        if self.sparse_refine == "never":
            return None, idx, P
        mask, U = fast_ops.touched_mask(idx, w, P)
        if U == 0 or (self.sparse_refine == "auto" and U > self.sparse_refine_ratio * P):
            return None, idx, P
        rows = mask.nonzero()[:, 0]                                # (U,) sorted
        pos = torch.cumsum(mask, 0) - 1                            # (P,) row -> position among the touched
        return rows, torch.where(w != 0, pos[idx], 0), U

    def _use_fused(self, u: Tensor) -> bool:
        """Use the chunked vertex pipeline (models/fast_ops.vertex_pipeline) for rows u?

        "auto": on CPU in float32, without autocast or under CPU bf16 autocast (then the pipeline multiplies
        in bf16 itself: models/fast_ops.lowp_products) (where the per-row intermediates of the autograd
        composition are memory-bound); GPUs keep the autograd composition. Only ReLU-gated GLU blocks.
        """
        if self.fused_refiner == "never":
            return False
        blocks = self.spatial_refiner.blocks if self.spatial_refiner is not None else []
        autocast_ok = not torch.is_autocast_enabled(u.device.type) or fast_ops.lowp_products(u) is not None
        ok = u.dtype == torch.float32 and autocast_ok and all(isinstance(b.act, nn.ReLU) for b in blocks)
        return ok and (self.fused_refiner == "always" or u.device.type == "cpu")

    def _folded_features(self, x: Tensor, w_fold: Tensor) -> Tuple[Tensor, bool]:
        """Unbaked fast path: ``interp(W G')(x)`` with pi + R_sp on the touched (or all) vertices only.

        Args:
            x: (M, d) coordinates.
            w_fold: (hidden, D_sp) weight of the bias-free linear map applied to the interpolated feature; it
                is folded into the refined vertices when they are at most as many as the points.

        Returns:
            (z (M, hidden), whether the fused CPU pipeline ran).
        """
        M, d = x.shape
        idx, w = fast_ops.corner_stencil(x, self.ssr_shape)             # (M, 2^d)
        rows, idx, V = self._touched_rows(idx, w)
        self.last_refined_vertices = V
        if rows is None:
            u = fast_ops.to_rows(self.spatial_grids.lattice(self.ssr_shape))    # (P, L*d_fs)
        else:
            u = self._ssr_rows(rows)                                    # (U, L*d_fs)
        refiner = self.spatial_refiner if self._refine_now() else None
        fold = V <= M                                                   # fold W into the vertices
        fused = self._use_fused(u)
        if fused:
            g = fast_ops.vertex_pipeline(u, self.pe, refiner, w_fold if fold else None)
        else:
            g = self._refine_points(u, refiner is not None)            # (V, D_sp)
            if fold:
                g = torch.nn.functional.linear(g, w_fold)
        if fold:
            z = fast_ops.gather_interp(g, idx, w)
        else:                                                           # fewer points than vertices
            z = torch.nn.functional.linear(fast_ops.gather_interp(g, idx, w), w_fold)
        return z, fused

    def _baked_features(self, x: Tensor) -> Tensor:
        """Baked fast path: gather interpolation of the folded table at x (M, d) -> (M, hidden)."""
        idx, w = fast_ops.corner_stencil(x, self.ssr_shape)
        table = self._baked_fused
        return fast_ops.gather_interp(table, idx, w.to(table.dtype))

    # ------------------------------------------------------------------------------------------------
    # baking
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _bake_lattice(self, refine: bool, chunk_size: int, w_fold: Optional[Tensor]) -> None:
        """Cache ``_baked_grid`` = the lattice (D_sp, *R) and, with ``w_fold`` (hidden, D_sp), ``_baked_fused``."""
        self._baked_grid = self.spatial_lattice(refine, chunk_size).contiguous()
        if w_fold is not None:
            self._baked_fused = self._fold_lattice(self._baked_grid, w_fold, chunk_size)

    @torch.no_grad()
    def _fold_lattice(self, grid: Tensor, w_fold: Tensor, chunk_size: int) -> Tensor:
        """(D_sp, *R) -> W G' as a contiguous channels-last table (prod(R), hidden)."""
        rows = fast_ops.to_rows(grid)                                 # (P, D_sp) view
        out = rows.new_empty(rows.shape[0], w_fold.shape[0])
        for i in range(0, rows.shape[0], chunk_size):
            torch.mm(rows[i:i + chunk_size], w_fold.t(), out=out[i:i + chunk_size])
        return out
