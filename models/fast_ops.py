"""Kernels of the DRR-Net fast paths (models/drrnet.py): gather-based (multi)linear interpolation and, for CPU
training, two fused autograd functions.

All kernels work on a **channels-last flat table** ``(P, C)`` of a lattice of array shape ``S`` (row r =
the vertex with C-order flat index r) and use the project conventions (``docs/design.md``): coordinate
column 0 runs along the LAST array axis, vertex j of an n-point axis sits at ``2 j / (n - 1) - 1``.

* :func:`corner_stencil` gives, for coordinates x, the 2^d corner rows and weights of the interpolation with
  **exactly** the semantics of ``grid_sample(mode="bilinear", align_corners=True, padding_mode="zeros")``:
  a corner outside the lattice gets weight 0 (its row index is clamped so the gather stays in range); so
  ``x = +-1`` gives the boundary vertex and points outside [-1, 1] fade to 0 as with ``grid_sample``.
* :func:`gather_interp` sums ``w * table[idx]`` over the corners in one call (``F.embedding_bag``, a fused
  gather + weighted sum, or on CPU in float32 the compiled kernel; differentiable w.r.t. the table and the
  weights; on CPU its table gradient is a scatter of the corners instead of embedding_bag's sort).
* :func:`resize_stencil` is the stencil of ``F.interpolate(mode="(bi/tri)linear", align_corners=True)`` from
  a lattice ``src`` to the vertices of a lattice ``dst``; used to compute the structural super-resolution
  (SSR) of DRR-Net at a subset of its vertices only.
* :class:`GridQuery` enumerates the vertices of a query lattice chunk by chunk (no (P, d) coordinate tensor
  is ever materialized) and gives their stencil on a model lattice from per-axis tables; when every query
  vertex is a lattice vertex the stencil has a single corner (a row gather), and when the query lattice IS
  the model lattice it is a plain slice (:meth:`GridQuery.identity`).
* :func:`vertex_pipeline` (PE + GLU refiner + folded fusion weight over lattice rows) and :func:`fused_head`
  (ReLU + decoder + output activation over points): the training-time compositions with hand-written
  backward passes, in row chunks; equal to the autograd compositions to fp32 rounding.

On CPU in float32 the elementwise passes of these functions, the stencil and the gather / scatter run as the
compiled kernels of :mod:`models.cpu_kernels` when they are available, else as their PyTorch twins
(:class:`_TorchPrims`, also used on other devices and dtypes).
"""
from __future__ import annotations

import functools
import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import cpu_kernels
from models.components.mlp import output_activation

__all__ = ["strides_of", "corner_stencil", "gather_interp", "resize_stencil", "GridQuery", "to_rows", "touched_mask",
           "vertex_pipeline", "fused_head"]


def strides_of(shape: Sequence[int]) -> List[int]:
    """C-order strides (in elements) of an array shape."""
    out, s = [], 1
    for n in reversed(list(shape)):
        out.append(s)
        s *= int(n)
    return out[::-1]


def to_rows(grid: Tensor) -> Tensor:
    """(C, *S) -> channels-last flat table (prod(S), C) (a view when possible; differentiable)."""
    return grid.reshape(grid.shape[0], -1).t()


def _combine(per_axis_idx: List[Tensor], per_axis_w: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-axis (M, k_a) flat-index contributions and weights -> (M, prod k_a) corner rows and weights.

    Corners are enumerated with the FIRST array axis slowest (C order over the corner bits).
    """
    idx, w = per_axis_idx[0], per_axis_w[0]
    for ia, wa in zip(per_axis_idx[1:], per_axis_w[1:]):
        idx = (idx[:, :, None] + ia[:, None, :]).flatten(1)
        w = (w[:, :, None] * wa[:, None, :]).flatten(1)
    return idx, w


def _axis_sample(f: Tensor, n: int, stride: int) -> Tuple[Tensor, Tensor]:
    """One axis of the zeros-padding stencil: fractional index f (M,) on an n-vertex axis.

    Returns (M, 2) flat-index contributions (clamped) and (M, 2) weights (0 for corners outside).
    """
    f = f.clamp(-2.0, n + 1.0)                  # far outside: every corner invalid anyway; avoids overflow
    fl = torch.floor(f)
    t = f - fl
    i0 = fl.long()
    i1 = i0 + 1
    w0 = (1.0 - t) * ((i0 >= 0) & (i0 <= n - 1)).to(t.dtype)
    w1 = t * ((i1 >= 0) & (i1 <= n - 1)).to(t.dtype)
    idx = torch.stack([i0.clamp(0, n - 1), i1.clamp(0, n - 1)], dim=-1) * stride
    return idx, torch.stack([w0, w1], dim=-1)


def corner_stencil(x: Tensor, shape: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Corner rows and weights of ``grid_sample(bilinear, align_corners=True, zeros)`` at coordinates x.

    Args:
        x: (M, d) coordinates, column 0 = last array axis (float; the weights get its dtype).
        shape: lattice array shape (d axes, each >= 2).

    Returns:
        (idx int64 (M, 2^d), w (M, 2^d)): C-order flat vertex indices (clamped into the lattice) and
        weights; ``sum_c w[:, c] * table[idx[:, c]]`` equals ``grid_sample`` of the lattice at x.
    """
    shape = [int(n) for n in shape]
    d = len(shape)
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"corner_stencil: x must be (M, {d}), got {tuple(x.shape)}")
    if d <= 8 and _prims(x) is cpu_kernels:
        return cpu_kernels.corner_stencil(x.contiguous(), shape)    # the same operations, compiled
    strides = strides_of(shape)
    idxs, ws = [], []
    for k in range(d):                               # array axis k <- coordinate column d - 1 - k
        n = shape[k]
        f = ((x[:, d - 1 - k] + 1) / 2) * (n - 1)    # grid_sample's unnormalization (align_corners)
        i, w = _axis_sample(f, n, strides[k])
        idxs.append(i)
        ws.append(w)
    return _combine(idxs, ws)


def gather_interp(table: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """``out[m] = sum_c w[m, c] * table[idx[m, c]]``: table (P, C), idx (M, K), w (M, K) -> (M, C).

    One fused ``embedding_bag`` (mode "sum" with per-sample weights; on CPU in float32 the compiled
    ``gather_corners`` kernel of models/cpu_kernels when available); differentiable w.r.t. table and w.
    The weights are cast to the table's dtype. On CPU, when the table needs a gradient, the backward is
    :class:`_GatherInterpCPU` (a scatter of the corners: the compiled kernel, else one ``index_add_`` per
    corner instead of ``embedding_bag``'s sort of all M*K indices).
    """
    if idx.shape[1] == 1:                             # single corner: a plain row gather (weights are 1)
        return table.index_select(0, idx[:, 0]) * w.to(table.dtype)
    w = w.to(table.dtype)
    grad = torch.is_grad_enabled() and (table.requires_grad or w.requires_grad)
    if table.device.type == "cpu" and grad and table.requires_grad:
        return _GatherInterpCPU.apply(table, idx, w)
    if not grad:
        return _prims(table).gather_corners(table.contiguous(), idx.contiguous(), w.contiguous())
    return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")


class _GatherInterpCPU(torch.autograd.Function):
    """:func:`gather_interp` with a scatter-add backward for the table (CPU)."""

    @staticmethod
    def forward(ctx, table, idx, w):
        table, idx, w = table.contiguous(), idx.contiguous(), w.contiguous()
        ctx.save_for_backward(table, idx, w)
        return _prims(table).gather_corners(table, idx, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        table, idx, w = ctx.saved_tensors
        g_table = g_w = None
        if ctx.needs_input_grad[0]:
            g_table = _prims(table).scatter_corners_(torch.zeros_like(table), idx, w, go.contiguous())
        if ctx.needs_input_grad[2]:
            g_w = _gather_weight_grad(table, idx, go)
        return g_table, None, g_w


def touched_mask(idx: Tensor, w: Tensor, P: int) -> Tuple[Tensor, int]:
    """(mask (P,) bool of the rows ``idx[m, k]`` with ``w[m, k] != 0``, their number) for stencils idx / w."""
    return _prims(w).mark_touched(idx.contiguous(), w.contiguous(), P)


def _gather_weight_grad(table: Tensor, idx: Tensor, go: Tensor) -> Tensor:
    return torch.stack([(table.index_select(0, idx[:, k]) * go).sum(-1) for k in range(idx.shape[1])], -1)


def _resize_axis(src_n: int, dst_n: int, device, dtype=torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-axis tables of ``F.interpolate(..., align_corners=True)`` from src_n to dst_n vertices.

    Mirrors PyTorch's arithmetic (in float32 for float32 / reduced-precision grids, float64 for float64):
    scale = (src_n - 1) / (dst_n - 1), real = scale * j, i0 = min(floor(real), src_n - 1),
    lambda = clamp(real - i0, 0, 1), i1 = i0 + (i0 < src_n - 1).

    Returns:
        i0 (dst_n,), i1 (dst_n,) int64 and lambda (dst_n,) in ``dtype``.
    """
    j = torch.arange(dst_n, device=device, dtype=dtype)
    if src_n == dst_n:
        i0 = torch.arange(dst_n, device=device)
        return i0, i0, torch.zeros(dst_n, device=device, dtype=dtype)
    scale = torch.tensor(float(src_n - 1), dtype=dtype, device=device) / (dst_n - 1) if dst_n > 1 \
        else torch.zeros((), device=device, dtype=dtype)
    real = scale * j
    i0 = torch.floor(real).long().clamp(max=src_n - 1)
    lam = (real - i0.to(dtype)).clamp(0.0, 1.0)
    i1 = torch.where(i0 < src_n - 1, i0 + 1, i0)
    return i0, i1, lam


def resize_stencil(rows: Tensor, dst_shape: Sequence[int], src_shape: Sequence[int],
                   dtype=torch.float32) -> Tuple[Tensor, Tensor]:
    """Stencil of the (multi)linear ``align_corners`` resize from ``src_shape`` to ``dst_shape`` at some vertices.

    Args:
        rows: (M,) int64 C-order flat vertex indices of the ``dst_shape`` lattice.
        dst_shape, src_shape: array shapes (same number of axes).
        dtype: of the weights: float32, or float64 for float64 grids (as F.interpolate computes).

    Returns:
        (idx (M, 2^d) rows of the src lattice, w (M, 2^d)); ``gather_interp(to_rows(src), idx, w)``
        equals ``F.interpolate(src[None], dst_shape, align_corners=True)`` at those vertices (up to rounding).
        Axes of equal size contribute one corner (weight 1).
    """
    dst_shape = [int(n) for n in dst_shape]
    src_shape = [int(n) for n in src_shape]
    strides = strides_of(src_shape)
    dst_strides = strides_of(dst_shape)
    idxs, ws = [], []
    rem = rows
    for k, (sn, dn) in enumerate(zip(src_shape, dst_shape)):
        j = torch.div(rem, dst_strides[k], rounding_mode="floor")
        rem = rem - j * dst_strides[k]
        i0, i1, lam = _resize_axis(sn, dn, rows.device, dtype)
        if sn == dn:
            idxs.append((j * strides[k])[:, None])
            ws.append(torch.ones(rows.shape[0], 1, device=rows.device, dtype=dtype))
        else:
            idxs.append(torch.stack([i0[j], i1[j]], dim=-1) * strides[k])
            l1 = lam[j]
            ws.append(torch.stack([1.0 - l1, l1], dim=-1))
    return _combine(idxs, ws)


class GridQuery:
    """The vertices of a query lattice ``query_shape`` (array order) as stencils on a model lattice.

    Query vertex coordinates are the float32 values of ``util.sampling.grid_coords`` (so results match a
    forward pass on ``grid_coords(query_shape)``); they are never materialized: per-axis tables give each
    chunk's stencil. Axes whose query vertices all fall on model vertices use one corner.

    Args:
        query_shape: array shape of the queried lattice (e.g. a member's full resolution).
        lattice_shape: array shape of the model lattice the table belongs to.
        device: device of the index tensors.
    """

    def __init__(self, query_shape: Sequence[int], lattice_shape: Sequence[int], device=None):
        from util.sampling import axis_coords

        self.query_shape = tuple(int(n) for n in query_shape)
        self.lattice_shape = tuple(int(n) for n in lattice_shape)
        if len(self.query_shape) != len(self.lattice_shape):
            raise ValueError(f"GridQuery: query shape {self.query_shape} and lattice {self.lattice_shape} differ in axes")
        self.num_points = int(math.prod(self.query_shape))
        self.q_strides = strides_of(self.query_shape)
        strides = strides_of(self.lattice_shape)
        self.axis_idx: List[Tensor] = []
        self.axis_w: List[Tensor] = []
        for k, (qn, n) in enumerate(zip(self.query_shape, self.lattice_shape)):
            if qn > 1 and (n - 1) % (qn - 1) == 0:         # every query vertex is a lattice vertex (exact
                step = (n - 1) // (qn - 1)                 # arithmetic; float32 coordinates would put it
                i = (torch.arange(qn, device=device) * (step * strides[k]))[:, None]  # 1e-7 off)
                w = torch.ones(qn, 1, device=device)
            else:
                x = torch.from_numpy(axis_coords(qn).astype(np.float32)).to(device)
                f = ((x + 1) / 2) * (n - 1)
                i, w = _axis_sample(f, n, strides[k])      # (qn, 2)
            self.axis_idx.append(i.contiguous())
            self.axis_w.append(w.contiguous())
        self.identity = self.query_shape == self.lattice_shape and all(i.shape[1] == 1 for i in self.axis_idx)
        self.corners = int(math.prod(i.shape[1] for i in self.axis_idx))

    def stencil(self, start: int, stop: int) -> Tuple[Tensor, Tensor]:
        """Stencil of query vertices ``start .. stop - 1`` (flat C order): idx (M, K), w (M, K)."""
        dev = self.axis_idx[0].device
        rem = torch.arange(start, stop, device=dev)
        idxs, ws = [], []
        for k in range(len(self.query_shape)):
            j = torch.div(rem, self.q_strides[k], rounding_mode="floor")
            rem = rem - j * self.q_strides[k]
            idxs.append(self.axis_idx[k][j])
            ws.append(self.axis_w[k][j])
        return _combine(idxs, ws)

    def gather_bias_relu(self, table: Tensor, start: int, stop: int, bias: Tensor, out: Tensor,
                         relu: bool = True) -> Tensor:
        """``relu(gather_interp(table, *stencil(start, stop)) + bias)`` into ``out`` (stop - start, C)
        (``relu`` False: without the ReLU).

        The first pass of baked inference (``DRRNet.predict_grid``): table (P, C) on the model lattice, bias
        (C,). On CPU in float32 one compiled pass (``cpu_kernels.grid_gather_bias_relu``: each vertex's
        corners from the per-axis tables, never materialized; on the identity lattice ``bias_relu`` of the
        table's rows), with the same operations in the same order as the PyTorch composition, so the same
        values bit for bit; else that composition. A bfloat16 table with a float32 ``out`` is read into float32
        (compiled: bitwise the float32 pass on ``table.float()``). bfloat16 table, bias and ``out`` (bf16
        products): the corners are summed in float32 and rounded to bf16, then the bias is added (float32,
        rounded: PyTorch's bf16 addition), the rows thus rounded as resampled rows kept in bf16 are
        (``cpu_kernels.grid_gather_bias_relu``; the composition the same to float32 rounding of the sum).
        """
        wide = table.dtype == torch.bfloat16 and out.dtype == torch.float32   # a bf16 table read into float32
        lowp = table.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and bias.dtype == torch.bfloat16
        if (wide or lowp or _prims(table) is cpu_kernels) and cpu_kernels.library() is not None \
                and table.device.type == "cpu" and bias.is_contiguous() and \
                bias.dtype == (torch.bfloat16 if lowp else torch.float32):
            if self.identity and not wide and not lowp and relu:
                return cpu_kernels.bias_relu(table[start:stop], bias.view(1, -1), out=out)
            if not self.identity and self.corners <= 256 and all(w.dtype == torch.float32 for w in self.axis_w):
                return cpu_kernels.grid_gather_bias_relu(self, start, stop, table, bias, out, relu)
        if self.identity:
            torch.add(table[start:stop], bias, out=out)
        elif wide or lowp:                               # the composition, rows widened per chunk
            idx, w = self.stencil(start, stop)
            rows = table.index_select(0, idx.reshape(-1)).float().view(*idx.shape, -1)
            acc = torch.sum(rows * w.float().unsqueeze(-1), dim=1)
            torch.add(acc.to(out.dtype) if lowp else acc, bias, out=out)
        else:
            out.copy_(gather_interp(table, *self.stencil(start, stop))).add_(bias)
        return out.relu_() if relu else out

    def chunks(self, chunk_size: int):
        """Yield (start, stop) ranges covering the query lattice."""
        for s in range(0, self.num_points, int(chunk_size)):
            yield s, min(s + int(chunk_size), self.num_points)


@functools.lru_cache(maxsize=16)
def _cached_query(query_shape: tuple, lattice_shape: tuple, device) -> GridQuery:
    return GridQuery(query_shape, lattice_shape, device)


def grid_query(query_shape: Sequence[int], lattice_shape: Sequence[int], device=None) -> GridQuery:
    """``GridQuery(query_shape, lattice_shape, device)``, the last 16 kept: a GridQuery is only read, and making
    one (a few small tensors per axis) costs more than the rest of a baked member's Python around its kernel."""
    return _cached_query(tuple(int(n) for n in query_shape), tuple(int(n) for n in lattice_shape),
                         None if device is None else torch.device(device))


# ----------------------------------------------------------------------------------------------------
# Fused, chunked vertex pipeline of DRR-Net training (CPU)
# ----------------------------------------------------------------------------------------------------
class VertexPipeline(torch.autograd.Function):
    """``u -> PE -> g = pe + R(pe) -> g @ W_fold^T`` for a block of lattice rows, chunk by chunk.

    The same function as ``FeatureUpsamplingPE``, ``GLURefiner`` (ReLU gates, RMSNorm in float32) and the
    folded spatial part of the fusion layer composed with autograd, with the backward written out (RMSNorm,
    GLU and sin/cos derivatives), in row chunks that stay in the CPU caches. Each GLU block's two input
    projections are one matrix product (``[W1; W2]``, twice the width), as are their gradients. The forward
    keeps its per-chunk intermediates for the backward while they fit ``keep_bytes``; beyond that the
    backward recomputes each chunk's forward (memory O(chunk) instead of O(rows x hidden width)).
    ``tests/test_fast_paths.py`` checks values and gradients against the autograd composition.

    Call through :func:`vertex_pipeline`. Arguments after ``u``: the PE coefficients (K,) or None,
    include_input, RMSNorm eps, rows per chunk, number of GLU blocks, whether to keep intermediates, then per
    block (norm weight (D,), W1 (H, D), W2 (H, D), W3 (D, H)) and, when there is one more weight, the fold
    weight (hidden, D).
    """

    @staticmethod
    def forward(ctx, u, coeff, include_input, eps, chunk, n_blocks, keep, lowp, *weights):
        ctx.save_for_backward(u, coeff, *weights)
        ctx.cfg = (include_input, eps, chunk, n_blocks, lowp)
        packed = _pack(weights, n_blocks, lowp)
        keep = keep and any(ctx.needs_input_grad)
        ctx.kept = []
        width = packed["fold"].shape[0] if packed["fold"] is not None else \
            (u.shape[1] * (2 * coeff.numel() + int(include_input)) if coeff is not None else u.shape[1])
        out = torch.empty(u.shape[0], width, dtype=u.dtype, device=u.device)
        for s in range(0, u.shape[0], chunk):
            saved = _pipeline_chunk(u[s:s + chunk], coeff, include_input, eps, packed, keep, out[s:s + chunk])
            if keep:
                ctx.kept.append(saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, coeff, *weights = ctx.saved_tensors
        include_input, eps, chunk, n_blocks, lowp = ctx.cfg
        packed = _pack(weights, n_blocks, lowp)
        need_u = ctx.needs_input_grad[0]
        # gradient accumulators: per block ([W1; W2] diag(wn), W3), then the fold weight
        acc = [torch.zeros_like(t) for blk in packed["blocks"] for t in (blk[1], blk[2])]
        if packed["fold"] is not None:
            acc.append(torch.zeros_like(packed["fold"]))
        gu = torch.empty_like(u) if need_u else None
        grad_out = grad_out.contiguous()
        kept, ctx.kept = ctx.kept, []
        starts = list(range(0, u.shape[0], chunk))
        for i in reversed(range(len(starts))):                       # last forward chunk first: still cached
            s = starts[i]
            if kept:
                saved, kept[i] = kept[i], None                       # free as we go
            else:                                                    # recompute the chunk (in cache)
                saved = _pipeline_chunk(u[s:s + chunk], coeff, include_input, eps, packed, True)
            g_u = _pipeline_chunk_backward(grad_out[s:s + chunk], saved, coeff, include_input, packed, acc, need_u)
            if need_u:
                gu[s:s + chunk] = g_u
        return (gu, None, None, None, None, None, None, None, *_unpack_grads(acc, packed))


class _TorchPrims:
    """Elementwise / gather passes of the fast paths as PyTorch operators (any device, any float dtype): the
    twins of the compiled kernels in models/cpu_kernels (same arguments and results; the GLU passes and the
    RMSNorm backward on bf16 products' results too, as the kernels' bf16 versions)."""

    @staticmethod
    def rms_norm_fwd(x: Tensor, eps: float):
        ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True)       # (n, 1)
        r = torch.rsqrt(ss.square_().div_(x.shape[1]).add_(eps))     # 1 / rms
        return x * r, r

    @staticmethod
    def rms_norm_bwd(gx: Tensor, gxh: Tensor, xh: Tensor, r: Tensor, out=None) -> Tensor:
        gxh = gxh.float() if gxh.dtype == torch.bfloat16 else gxh    # a bf16 product's result, exact in float32
        m = (gxh * xh).sum(-1, keepdim=True).div_(xh.shape[1]).mul_(r)
        res = torch.addcmul(gx, r, gxh).addcmul_(m, xh, value=-1.0)
        return res if out is None else out.copy_(res)

    @staticmethod
    def gather_corners(table: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")

    @staticmethod
    def scatter_corners_(out: Tensor, idx: Tensor, w: Tensor, go: Tensor) -> Tensor:
        w_t, idx_t = w.t().contiguous(), idx.t().contiguous()          # per-corner contiguous columns
        for k in range(idx.shape[1]):
            out.index_add_(0, idx_t[k], go * w_t[k, :, None])
        return out

    @staticmethod
    def mark_touched(idx: Tensor, w: Tensor, P: int):
        mask = torch.zeros(P, dtype=torch.bool, device=idx.device)
        mask[idx[w != 0]] = True
        return mask, int(mask.sum())

    @staticmethod
    def bias_relu(x: Tensor, bias: Tensor, out=None) -> Tensor:
        nb, H = bias.shape
        r = torch.relu((x.view(nb, -1, H) + bias[:, None, :]).view(-1, H))
        return r if out is None else out.copy_(r)

    @staticmethod
    def linear_relu(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return torch.addmm(bias, h, weight.t()).relu_()

    @staticmethod
    def relu_bwd_segsum(g: Tensor, h: Tensor, segsum: Tensor, out=None) -> Tensor:
        r = torch.ops.aten.threshold_backward(g, h, 0.0)
        segsum.add_(r.view(segsum.shape[0], -1, segsum.shape[1]).sum(1))
        return r if out is None else out.copy_(r)

    @staticmethod
    def pe_fwd(u: Tensor, coeff: Tensor, include_input: bool) -> Tensor:
        arg = u[:, :, None] * coeff                                  # (n, C, K)
        parts = [torch.sin(arg), torch.cos(arg)]
        return torch.cat([u[:, :, None]] + parts if include_input else parts, dim=-1).flatten(1)

    @staticmethod
    def pe_bwd(g1: Tensor, g2, x0: Tensor, coeff: Tensor, include_input: bool) -> Tensor:
        K, off = coeff.numel(), int(include_input)
        g = g1 + g2 if g2 is not None else g1
        n, C = g.shape[0], g.shape[1] // (2 * K + off)
        g3, x3 = g.reshape(n, C, 2 * K + off), x0.reshape(n, C, 2 * K + off)
        gs, gc = g3[:, :, off:off + K], g3[:, :, off + K:]             # gradients of the sines, cosines
        gu = ((gs * x3[:, :, off + K:] - gc * x3[:, :, off:off + K]) * coeff).sum(-1)
        return gu + g3[:, :, 0] if include_input else gu

    @staticmethod
    def to_bf16(x: Tensor) -> Tensor:
        return x.to(torch.bfloat16)

    @staticmethod
    def glu_fwd(ab: Tensor) -> Tensor:
        H = ab.shape[1] // 2
        return torch.relu(ab[:, :H]) * ab[:, H:]

    @staticmethod
    def glu_bwd(gh: Tensor, ab: Tensor):
        H = gh.shape[1]
        gab = torch.empty_like(ab)
        ra = torch.relu(ab[:, :H])
        torch.ops.aten.threshold_backward.grad_input(gh * ab[:, H:], ab[:, :H], 0.0, grad_input=gab[:, :H])
        torch.mul(gh, ra, out=gab[:, H:])
        return gab, ra.mul_(ab[:, H:])

    # bf16 training: the passes around a bf16 product (bf16 results in, bf16 operands out; see cpu_kernels)
    @staticmethod
    def rms_norm_fwd_lp(x: Tensor, eps: float):
        xh, r = _TorchPrims.rms_norm_fwd(x, eps)
        return xh, xh.to(torch.bfloat16), r

    @staticmethod
    def add_bf16(a: Tensor, b: Tensor, out=None) -> Tensor:
        res = a + b.float()
        return res if out is None else out.copy_(res)

    @staticmethod
    def add_to_bf16(a: Tensor, b: Tensor) -> Tensor:
        return (a + b).to(torch.bfloat16)

    @staticmethod
    def bias_relu_lp(x: Tensor, bias: Tensor, operand: bool = True):
        out = _TorchPrims.bias_relu(x.float(), bias)
        return out, (out.to(torch.bfloat16) if operand else None)

    @staticmethod
    def relu_bwd_segsum_lp(g: Tensor, h: Tensor, segsum: Tensor, out=None, operand: bool = True):
        out = _TorchPrims.relu_bwd_segsum(g.float(), h, segsum, out)
        return out, (out.to(torch.bfloat16) if operand else None)


def lowp_products(t: Tensor):
    """torch.bfloat16 when the fused CPU paths should multiply in bf16 for ``t``: a float32 CPU tensor under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``train.mixed_precision: bf16`` on CPU); else None (fp32)."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and torch.is_autocast_enabled("cpu") \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return None


def _no_autocast(lowp):
    """Autocast off inside a fused function that multiplies in ``lowp`` itself (its elementwise passes stay
    float32); a no-op context without ``lowp`` (the fp32 path runs exactly as without this)."""
    import contextlib

    return torch.autocast("cpu", enabled=False) if lowp is not None else contextlib.nullcontext()


def _from_bf16(t: Tensor) -> Tensor:
    """A bf16 product's result as float32 (exact; the compiled single pass where available)."""
    if t.device.type == "cpu" and t.is_contiguous() and cpu_kernels.library() is not None:
        return cpu_kernels.from_bf16(t)
    return t.float()


def _pe_ops(t: Tensor):
    """The PE's primitives: compiled only with vectorized sin / cos (scalar ones are slower than PyTorch's)."""
    ops = _prims(t)
    return ops if ops is _TorchPrims or cpu_kernels.vector_math() else _TorchPrims


def _prims(t: Tensor):
    """Elementwise primitives for ``t``: the compiled kernels (models/cpu_kernels) for float32 CPU tensors
    when available, else :class:`_TorchPrims`."""
    if t.device.type == "cpu" and t.dtype == torch.float32 and cpu_kernels.library() is not None:
        return cpu_kernels
    return _TorchPrims


def _pack(weights, n_blocks, lowp=None):
    """Per block (norm weight wn (D,), [W1; W2] (2H, D), W3 (D, H), [W1; W2] diag(wn), and the forward's
    right-hand operands as contiguous transposes: (diag(wn) [W1; W2]^T (D, 2H), W3^T (H, D))); the fold
    weight and its contiguous transpose.

    The RMSNorm weight is folded into the projections (``(xh * wn) W^T = xh (W diag(wn))^T``), which saves an
    elementwise pass per block; the backward maps the gradient of the folded matrix back to W and wn. MKL
    multiplies by a contiguous (K, N) operand up to 1.25x faster than by a transposed view at these shapes.
    With ``lowp`` (torch.bfloat16) also ``low``: per block the ``lowp`` copies of (W3, W12s, W12s^T, W3^T),
    and ``fold_low`` / ``fold_t_low``.
    """
    blocks, low = [], []
    for k in range(n_blocks):
        wn, w1, w2, w3 = weights[4 * k:4 * k + 4]
        w12 = torch.cat([w1, w2], 0)
        w12s = w12 * wn
        blocks.append((wn, w12, w3, w12s, w12s.t().contiguous(), w3.t().contiguous()))
        if lowp is not None:          # bf16 copies of the matrix operands (fp32 masters stay as they are)
            low.append(tuple(t.to(lowp) for t in blocks[-1][2:]))   # (W3, W12s, W12s^T, W3^T)
    fold = weights[4 * n_blocks] if len(weights) > 4 * n_blocks else None
    packed = {"blocks": blocks, "fold": fold, "fold_t": fold.t().contiguous() if fold is not None else None,
              "lowp": lowp, "low": low}
    if lowp is not None and fold is not None:
        packed["fold_low"], packed["fold_t_low"] = fold.to(lowp), packed["fold_t"].to(lowp)
    return packed


def _pipeline_chunk(u, coeff, include_input, eps, packed, keep, dest=None):
    """Forward of one chunk of rows into ``dest`` (its rows of the output; None: no output); returns what the
    backward needs when ``keep`` (else an empty record)."""
    saved = {"blocks": []}
    ops = _prims(u)
    if coeff is not None:
        x0 = _pe_ops(u).pe_fwd(u, coeff, include_input)             # (n, D): channel-major, as the PE
        if keep:
            saved["x0"] = x0                                         # holds the sines and cosines
    else:
        x0 = u
    x = x0
    lowp = packed["lowp"]
    for k, (_, _, _, _, w12s_t, w3_t) in enumerate(packed["blocks"]):
        if lowp is None:
            xh, r = ops.rms_norm_fwd(x.contiguous(), eps)
            ab = xh @ w12s_t                                         # (n, 2H): [a | b]
            h = ops.glu_fwd(ab)                                      # relu(a) * b
            if keep:
                saved["blocks"].append((r, xh, ab))                 # h is recomputed from [a | b]
            x = torch.addmm(x, h, w3_t)
        else:       # bf16 products: the passes write their operands in bf16 and read their results in bf16
            low = packed["low"][k]
            xh, xhb, r = ops.rms_norm_fwd_lp(x.contiguous(), eps)
            ab = torch.mm(xhb, low[2])                               # bf16 [a | b]
            if keep:
                saved["blocks"].append((r, xh, ab, xhb))
            x = ops.add_bf16(x, torch.mm(ops.glu_fwd(ab), low[3]), out=None if x is x0 else x)
    if lowp is not None and packed["fold"] is not None:             # g only feeds the fold's bf16 products
        g = ops.add_to_bf16(x0, x) if packed["blocks"] else ops.to_bf16(x0.contiguous())
        if keep:
            saved["g"] = g
        if dest is not None:
            dest.copy_(torch.mm(g, packed["fold_t_low"]))
        return saved
    g = x0 + x if packed["blocks"] else x0
    if keep:
        saved["g"] = g
    if dest is not None:
        if packed["fold"] is None:
            dest.copy_(g)
        else:
            torch.mm(g, packed["fold_t"], out=dest)
    return saved


def _pipeline_chunk_backward(go, saved, coeff, include_input, packed, acc, need_u):
    """Backward of one chunk: accumulates into ``acc`` (per block: the folded [W1; W2] diag(wn), W3; then
    the fold weight; see :func:`_unpack_grads`); returns the rows' gradient."""
    lowp = packed["lowp"]
    ops = _prims(go)
    if packed["fold"] is None:
        gg = go
    elif lowp is None:
        acc[-1].addmm_(go.t(), saved["g"])
        gg = go @ packed["fold"]                                     # (n, D)
    else:                                                            # bf16 products (saved["g"] is bf16)
        gob = ops.to_bf16(go.contiguous())
        ops.add_bf16(acc[-1], torch.mm(gob.t(), saved["g"]), out=acc[-1])
        gg = _from_bf16(torch.mm(gob, packed["fold_low"]))
    gx = gg
    for k in reversed(range(len(packed["blocks"]))):
        _, _, w3, w12s, _, _ = packed["blocks"][k]
        r, xh, ab, *xhb = saved["blocks"][k]
        if lowp is None:
            gab, h = ops.glu_bwd(gx @ w3, ab)                        # d/da, d/db; h = relu(a) * b again
            acc[2 * k + 1].addmm_(gx.t(), h)                         # dW3 (D, H)
            acc[2 * k].addmm_(gab.t(), xh)                           # d([W1; W2] diag(wn))
            gxh = gab @ w12s
            # RMSNorm backward + residual; in place except the first time (gg is needed below)
            gx = ops.rms_norm_bwd(gx, gxh, xh, r, out=None if gx is gg else gx)
        else:                                                        # the same products in bf16
            w3_low, w12s_low = packed["low"][k][:2]
            gxb = ops.to_bf16(gx)
            gab, h = ops.glu_bwd(torch.mm(gxb, w3_low), ab)          # bf16 operands of the products below
            ops.add_bf16(acc[2 * k + 1], torch.mm(gxb.t(), h), out=acc[2 * k + 1])
            ops.add_bf16(acc[2 * k], torch.mm(gab.t(), xhb[0]), out=acc[2 * k])
            gx = ops.rms_norm_bwd(gx, torch.mm(gab, w12s_low), xh, r, out=None if gx is gg else gx)
    if not need_u:
        return None
    g2 = gg if packed["blocks"] else None                            # g = x0 + R(x0): both paths into x0
    if coeff is None:
        return gx + g2 if g2 is not None else gx
    return _pe_ops(gx).pe_bwd(gx, g2, saved["x0"], coeff, include_input)


def _unpack_grads(acc, packed):
    """Accumulated gradients -> per block (wn, W1, W2, W3) [+ fold], in the order of the Function's inputs."""
    grads = []
    for k, (wn, w12, w3, *_) in enumerate(packed["blocks"]):
        H = w3.shape[1]
        g12s = acc[2 * k]                                            # d/d(W12 diag(wn))
        g12 = g12s * wn
        grads += [(g12s * w12).sum(0), g12[:H], g12[H:], acc[2 * k + 1]]
    if packed["fold"] is not None:
        grads.append(acc[-1])
    return grads


def vertex_pipeline(u: Tensor, pe, refiner, w_fold, chunk: int = 2048, keep_bytes: float = 2 ** 30) -> Tensor:
    """Fused ``u -> x = pe(u) -> g = x + refiner(x) -> g @ w_fold^T`` on rows u (V, C) (:class:`VertexPipeline`).

    Args:
        u: (V, C) float32 rows (lattice vertices before the PE).
        pe: a ``FeatureUpsamplingPE`` or None (identity).
        refiner: a ``GLURefiner`` (ReLU gates), or None (no refinement).
        w_fold: (hidden, D) weight to fold in, or None (return g).
        chunk: rows per chunk (float32 products; with bf16 products eight times as many rows: their operands
            and results take half the bytes, and a bf16 product loses much of its speed to the work before it
            (the AMX unit's cost per call; in the demo step (4096 x 64) @ (64 x 256) takes 258 us against 104-132
            alone), so fewer, larger products win; demo step, 2-core Xeon with AMX, bf16 rows per chunk with
            the head's chunk at 8,192: 4,096 rows 1.00, 8,192 0.96-0.91, 16,384 (the whole demo lattice)
            0.89-0.91 (paired step times); in float32 2,048 and 4,096 rows gave 45 ms, 8,192 rows 72 ms).
        keep_bytes: keep the forward's per-row intermediates for the backward while they take at most this
            many bytes; above it, the backward recomputes each chunk's forward.

    Returns:
        (V, hidden) or (V, D).
    """
    coeff, include_input = None, False
    if pe is not None:
        coeff = pe.coefficients(u.device, u.dtype)                   # (K,) = scale pi 2^k
        include_input = bool(pe.include_input)
    weights, eps = [], 1e-6
    blocks = list(refiner.blocks) if refiner is not None else []
    for blk in blocks:
        if not isinstance(blk.act, torch.nn.ReLU):
            raise ValueError("vertex_pipeline: only ReLU-gated GLU blocks are supported")
        weights += [blk.norm.weight, blk.w1.weight, blk.w2.weight, blk.w3.weight]
        eps = blk.norm.eps
    if w_fold is not None:
        weights.append(w_fold)
    # floats kept per row (see _pipeline_chunk): the PE output x0, g, and per block r, xh, [a | b]
    D = pe.out_dim if pe is not None else u.shape[1]
    per_row = (D if pe is not None else 0) + D \
        + sum(D + 1 + 2 * blk.hidden for blk in blocks)
    keep = u.shape[0] * per_row * u.element_size() <= keep_bytes
    lowp = lowp_products(u)
    if lowp is not None:
        chunk = 8 * chunk
    with _no_autocast(lowp):
        return VertexPipeline.apply(u.contiguous(), coeff, include_input, eps, int(chunk), len(blocks), keep, lowp,
                                    *weights)


class FusedHead(torch.autograd.Function):
    """``act(MLP(relu(z + cb[row's condition])))`` with a hand-written backward, in row chunks (CPU).

    The DRR-Net fast path's per-point part in training: ``z`` (B*N, H) is the interpolated folded spatial
    term, ``cb`` (B, H) the per-condition term of the fusion layer; then ReLU, the decoder's linear layers
    with ReLU between, and the output activation. Same values and gradients as the autograd composition to
    fp32 rounding (``tests/test_fast_paths.py``); it saves the autograd bookkeeping and several elementwise
    passes over (B*N, H) tensors. Call through :func:`fused_head`.
    """

    @staticmethod
    def forward(ctx, z, cb, n_per, chunk, activation, lowp, *wb):
        outs, kept = [], []
        low = _head_low(wb, lowp)
        for b0, b1, s, e in _head_segments(cb.shape[0], n_per, chunk):
            hs, last, out = _head_chunk(z, cb, b0, b1, s, e, activation, wb, low)
            outs.append(out)
            kept.append((hs, last))
        ctx.kept, ctx.cfg = kept, (n_per, chunk, activation, cb.shape[0], lowp)
        ctx.save_for_backward(z, cb, *wb)
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        z, cb, *wb = ctx.saved_tensors
        n_per, chunk, activation, B, lowp = ctx.cfg
        low = _head_low(wb, lowp)
        kept, ctx.kept = ctx.kept, []              # freed as used; a second backward (retain_graph) recomputes
        go = go.contiguous()
        ops = _prims(z)
        H = wb[0].shape[1]
        gz = torch.empty(B * n_per, H, dtype=go.dtype, device=go.device)
        gcb = torch.zeros(B, H, dtype=go.dtype, device=go.device)
        gwb = [torch.zeros_like(t) for t in wb]
        for j, (b0, b1, s, e) in enumerate(_head_segments(B, n_per, chunk)):
            if kept:
                (hs, last), kept[j] = kept[j], None
            else:
                hs, last, _ = _head_chunk(z, cb, b0, b1, s, e, activation, wb, low)
            g = go[s:e]
            if activation == "sigmoid":
                g = g * last * (1.0 - last)
            elif activation == "clamp":
                g = g * ((last >= 0.0) & (last <= 1.0)).to(g.dtype)
            n_last = len(wb) - 2
            gwb[n_last + 1].add_(g.sum(0))                           # output layer's bias
            if low is not None:
                hs, hsb = hs
            gb = None                                                # g as bf16 (a product's operand)
            for i in reversed(range(0, len(wb), 2)):
                if low is None or i == n_last:                       # fp32 (the output layer always)
                    gwb[i].addmm_(g.t(), hs[i // 2])
                    g = g @ wb[i]                                    # d/d(layer input), before its ReLU
                else:                                                # hidden layer: bf16 products
                    gb = ops.to_bf16(g) if gb is None else gb
                    ops.add_bf16(gwb[i], torch.mm(gb.t(), hsb[i // 2]), out=gwb[i])
                    g = torch.mm(gb, low[i // 2][0])                 # bf16
                # ReLU backward + the previous layer's bias (the first layer: + the per-condition term, into gz)
                seg = gwb[i - 1].view(1, -1) if i else gcb[b0:b1]
                if g.dtype == torch.bfloat16:                        # ... and the next layer's bf16 operand
                    g, gb = ops.relu_bwd_segsum_lp(g, hs[i // 2], seg, out=None if i else gz[s:e], operand=i > 0)
                else:
                    g, gb = ops.relu_bwd_segsum(g, hs[i // 2], seg, out=g if i else gz[s:e]), None
        return (gz, gcb, None, None, None, None, *gwb)


def _head_low(wb, lowp):
    """None (fp32), or per hidden layer of the head (every linear layer but the output layer) its weight W and
    W^T (contiguous) in ``lowp``."""
    if lowp is None:
        return None
    return [(wb[i].to(lowp), wb[i].t().contiguous().to(lowp)) for i in range(0, len(wb) - 2, 2)]


def _head_chunk(z, cb, b0, b1, s, e, activation, wb, low=None):
    """Forward of rows s..e-1 (conditions b0..b1-1): (inputs of every linear layer, what the output
    activation's derivative needs, output). ``low`` (:func:`_head_low`): the hidden layers' products in bf16;
    the bias, ReLU, output layer and activation stay float32."""
    ops = _prims(z)
    n_hidden = len(wb) // 2 - 1
    if low is None:
        h = ops.bias_relu(z[s:e], cb[b0:b1])
    else:           # bf16 products: each layer's input also as bf16 (hb: the operand), kept for the backward
        h, hb = ops.bias_relu_lp(z[s:e], cb[b0:b1], operand=n_hidden > 0)
        hsb = [hb]
    hs = [h]
    for i in range(0, len(wb), 2):
        if i + 2 < len(wb) and low is not None:                      # hidden layer, bf16 products
            h, hb = ops.bias_relu_lp(torch.mm(hsb[-1], low[i // 2][1]), wb[i + 1].view(1, -1),
                                     operand=i + 4 < len(wb))
            hs.append(h)
            hsb.append(hb)
        elif i + 2 < len(wb):                                        # hidden layer: relu(h W^T + b)
            h = ops.linear_relu(h, wb[i], wb[i + 1])
            hs.append(h)
        else:
            a = torch.addmm(wb[i + 1], h, wb[i].t())
    out = output_activation(a, activation)
    return (hs if low is None else (hs, hsb)), (out if activation == "sigmoid" else a), out


def _head_segments(B: int, n_per: int, chunk: int):
    """Row ranges of :class:`FusedHead`: (b0, b1, start, stop), whole conditions b0..b1-1 together when
    ``n_per <= chunk``, else parts of one condition."""
    if n_per <= chunk:
        k = max(1, chunk // n_per)
        for b0 in range(0, B, k):
            b1 = min(B, b0 + k)
            yield b0, b1, b0 * n_per, b1 * n_per
    else:
        for b in range(B):
            for s in range(b * n_per, (b + 1) * n_per, chunk):
                yield b, b + 1, s, min(s + chunk, (b + 1) * n_per)


def fused_head(z: Tensor, cb: Tensor, linears, activation: str, chunk: int = 4096) -> Tensor:
    """Fused ``act(MLP(relu(z + cb)))`` (:class:`FusedHead`).

    Args:
        z: (B*N, H) rows, N consecutive rows per condition.
        cb: (B, H) per-condition term.
        linears: the decoder's ``nn.Linear`` layers in order (ReLU between them).
        activation: "sigmoid", "clamp" or "none".
        chunk: rows per chunk (float32 products; with bf16 products twice as many: fewer, larger bf16 products,
            see :func:`vertex_pipeline`; demo step 0.95 paired against the same rows as float32).

    Returns:
        (B*N, out_dim).
    """
    wb = [t for m in linears for t in (m.weight, m.bias)]
    if z.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        z, cb = z.float(), cb.float()            # outputs of autocast linear layers (the condition term, and z
                                                 # when fewer points than vertices) are bf16
    lowp = lowp_products(z)
    if lowp is not None:
        chunk = 2 * chunk
    with _no_autocast(lowp):
        return FusedHead.apply(z.contiguous(), cb.contiguous(), z.shape[0] // cb.shape[0], int(chunk), activation,
                               lowp, *wb)
