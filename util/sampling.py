"""Grid coordinates and (multi)linear interpolation: the one home of the coordinate conventions.

Conventions (docs/design.md): a field is an array of shape ``shape`` = ``(D, H, W)`` or ``(H, W)``. A
coordinate x has d = len(shape) columns in [-1, 1]; **column 0 indexes the LAST array axis**, column 1 the
one before, ... (the order ``torch.nn.functional.grid_sample`` expects). Vertex j of an n-point axis sits at
``2 j / (n - 1) - 1`` (align_corners=True); an axis with a single vertex maps to 0. A flat voxel index is
the C-order index into ``shape``.

- ``grid_coords``                 every vertex coordinate of a lattice (torch, flat C order).
- ``index_to_coords``             integer (or fractional) array indices -> coordinates (numpy).
- ``coords_to_continuous_index``  coordinates -> fractional array indices (numpy), the inverse.
- ``linear_stencil``              corner indices and weights of multilinear interpolation (numpy).
- ``interp_gather``               exact multilinear interpolation of a stored field at points, reading
                                  the field through a ``get_values(flat_idx)`` callback (numpy; works for
                                  in-memory and memory-mapped storage alike).
- ``sample_grid``                 ``grid_sample`` wrapper for models (torch, differentiable).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from util.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["grid_coords", "axis_coords", "index_to_coords", "coords_to_continuous_index", "linear_stencil",
           "combine_stencil", "interp_gather", "interp_gather_index", "sample_grid"]

Shape = Sequence[int]


def _shape(shape: Shape) -> tuple:
    shape = tuple(int(n) for n in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be a non-empty sequence of positive sizes, got {shape}")
    return shape


def axis_coords(n: int) -> np.ndarray:
    """Vertex coordinates of one n-point axis, float64 (n,): ``2 j / (n - 1) - 1``; ``[0.]`` when n == 1."""
    if n == 1:
        return np.zeros(1)
    return 2.0 * np.arange(n, dtype=np.float64) / (n - 1) - 1.0


def grid_coords(shape: Shape, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Coordinates of all vertices of a lattice, in flat C order.

    Args:
        shape: array shape ``(D, H, W)`` or ``(H, W)`` (any number of axes >= 1).
        device: torch device of the result.

    Returns:
        float32 tensor (prod(shape), d); row r is the coordinate of flat voxel r, column 0 runs along
        the last array axis. Values equal ``index_to_coords`` of the same vertices.
    """
    shape = _shape(shape)
    axes = [torch.from_numpy(axis_coords(n).astype(np.float32)) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    out = torch.stack([m.reshape(-1) for m in reversed(mesh)], dim=-1)
    return out.to(device) if device is not None else out


def index_to_coords(index: np.ndarray, shape: Shape) -> np.ndarray:
    """Array indices -> coordinates.

    Args:
        index: (..., d) integer or fractional indices in ARRAY axis order (column k indexes axis k).
        shape: array shape (d axes).

    Returns:
        float64 (..., d) coordinates in x order (column 0 = last array axis).
    """
    shape = _shape(shape)
    index = np.asarray(index, dtype=np.float64)
    n = np.asarray(shape, dtype=np.float64)
    x = np.where(n > 1, 2.0 * index / np.maximum(n - 1.0, 1.0) - 1.0, 0.0)  # same arithmetic as axis_coords
    return x[..., ::-1].copy()


def coords_to_continuous_index(x: np.ndarray, shape: Shape) -> np.ndarray:
    """Coordinates -> fractional array indices (the inverse of ``index_to_coords``).

    Args:
        x: (..., d) coordinates, column 0 = last array axis. Not clamped.
        shape: array shape (d axes).

    Returns:
        float64 (..., d) fractional indices in ARRAY axis order (column k indexes axis k):
        ``(x + 1) / 2 * (n - 1)``; 0 on axes with a single vertex.
    """
    shape = _shape(shape)
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] != len(shape):
        raise ValueError(f"coordinates have {x.shape[-1]} columns but the field has {len(shape)} axes {shape}")
    n = np.asarray(shape, dtype=np.float64)
    return (x[..., ::-1] + 1.0) * 0.5 * (n - 1)


def linear_stencil(index: np.ndarray, shape: Shape) -> tuple:
    """Corners and weights of multilinear interpolation at fractional ARRAY indices.

    Args:
        index: (N, d) fractional indices in array axis order (column k indexes axis k); clamped to
            [0, n - 1] per axis.
        shape: array shape of the field (d axes).

    Returns:
        (flat int64 (2^d, N), weights float64 (2^d, N)): C-order flat indices of the 2^d corners of each point
        and their weights (summing to 1). On each axis the lower corner is ``i0 = min(floor(f), n - 2)`` and
        the upper-corner weight ``t = f - i0``, so ``f = n - 1`` (x = 1) gives ``t = 1`` and the lower corner
        weight exactly 0: interpolation is exact at every vertex, the upper boundary included. An axis with
        a single vertex uses it twice with weights 1 and 0.
    """
    shape = _shape(shape)
    index = np.asarray(index, dtype=np.float64)
    if index.ndim != 2 or index.shape[1] != len(shape):
        raise ValueError(f"index must have shape (N, {len(shape)}), got {index.shape}")
    d = len(shape)
    strides = np.cumprod((1,) + shape[::-1])[:-1][::-1].astype(np.int64)  # C-order strides in elements
    base = np.zeros(index.shape[0], dtype=np.int64)
    t = np.empty(index.shape, dtype=np.float64)
    step = np.zeros(d, dtype=np.int64)  # flat offset of the upper corner along each axis (0 if n == 1)
    for k, n in enumerate(shape):
        f = np.clip(index[:, k], 0.0, n - 1.0)
        lo = np.minimum(np.floor(f), max(n - 2, 0))
        t[:, k] = f - lo
        base += lo.astype(np.int64) * strides[k]
        step[k] = strides[k] if n > 1 else 0
    bits = np.array(np.meshgrid(*([[0, 1]] * d), indexing="ij")).reshape(d, -1).T  # (2^d, d)
    flat = base[None, :] + (bits @ step)[:, None]
    w = np.ones(flat.shape, dtype=np.float64)
    for c, b in enumerate(bits):
        for k in range(d):
            w[c] *= t[:, k] if b[k] else 1.0 - t[:, k]
    return flat, w


def combine_stencil(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float64 (N,) = sum over corners of weights * values, both (2^d, N), summed in corner order."""
    values = np.asarray(values, dtype=np.float64).reshape(weights.shape)
    out = weights[0] * values[0]
    for c in range(1, len(weights)):
        out += weights[c] * values[c]
    return out


def interp_gather_index(get_values: Callable[[np.ndarray], np.ndarray], index: np.ndarray,
                        shape: Shape) -> np.ndarray:
    """Multilinear interpolation at fractional ARRAY indices (``interp_gather`` without the coordinate step).

    Args:
        get_values: ``get_values(flat_idx int64 (K,)) -> values (K,)``: the stored field at C-order flat
            indices (any real dtype; called once, with all 2^d * N corner indices).
        index: (N, d) fractional indices in array axis order; clamped to [0, n - 1] per axis.
        shape: array shape of the field (d axes).

    Returns:
        float64 (N,) values; exact at vertices (see ``linear_stencil``).
    """
    flat, w = linear_stencil(index, shape)
    return combine_stencil(w, get_values(flat.reshape(-1)))


def interp_gather(get_values: Callable[[np.ndarray], np.ndarray], x: np.ndarray, shape: Shape) -> np.ndarray:
    """Exact multilinear (2D bilinear, 3D trilinear) interpolation of a stored field at points.

    Same result as ``grid_sample(..., mode='bilinear', align_corners=True)`` inside [-1, 1], computed in
    float64 from the 2^d corner values, which are read through ``get_values`` in ONE call (so the same code
    serves in-memory arrays and memory-mapped files).

    Args:
        get_values: ``get_values(flat_idx int64 (K,)) -> values (K,)``, the field at C-order flat indices.
        x: (N, d) coordinates, column 0 = last array axis; clamped to [-1, 1].
        shape: array shape of the field.

    Returns:
        float64 (N,) interpolated values; x = +-1 gives exactly the boundary vertex values.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, d), got {x.shape}")
    return interp_gather_index(get_values, coords_to_continuous_index(np.clip(x, -1.0, 1.0), shape), shape)


def sample_grid(grid: torch.Tensor, x: torch.Tensor, *, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample a feature grid at points: bilinear (2D) / trilinear (3D) with align_corners=True.

    The single place where models call ``grid_sample``: x columns follow the project convention (column 0 =
    last grid axis), vertex j of an n-point axis sits at ``2 j / (n - 1) - 1``. Differentiable w.r.t. the
    grid (and x).

    Args:
        grid: (C, *S) shared by the whole batch, or (B, C, *S) one grid per batch entry; len(S) = d in {2, 3}.
        x: (B, N, d) coordinates in [-1, 1].
        padding_mode: ``grid_sample`` padding outside [-1, 1]: "zeros" (default, as the reference), "border"
            or "reflection". Inside [-1, 1] all modes agree.

    Returns:
        (B, N, C) features, dtype of ``grid``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, N, d), got {tuple(x.shape)}")
    B, N, d = x.shape
    if d not in (2, 3):
        raise ValueError(f"sample_grid supports d = 2 or 3 coordinate columns, got {d}")
    if grid.dim() == d + 1:  # (C, *S): one grid for all batch entries -> one grid_sample call on B*N points
        C = grid.shape[0]
        pts = x.reshape(1, B * N, *([1] * (d - 1)), d).to(grid.dtype)
        out = F.grid_sample(grid[None], pts, mode="bilinear", padding_mode=padding_mode, align_corners=True)
        return out.reshape(C, B, N).permute(1, 2, 0)
    if grid.dim() == d + 2:  # (B, C, *S)
        if grid.shape[0] != B:
            raise ValueError(f"grid batch {grid.shape[0]} != x batch {B}")
        C = grid.shape[1]
        pts = x.reshape(B, N, *([1] * (d - 1)), d).to(grid.dtype)
        out = F.grid_sample(grid, pts, mode="bilinear", padding_mode=padding_mode, align_corners=True)
        return out.reshape(B, C, N).permute(0, 2, 1)
    raise ValueError(f"grid must have shape (C, *S) or (B, C, *S) with {d} spatial axes (x has d={d}), "
                     f"got {tuple(grid.shape)}")


def _unwrap_longitude(lon: np.ndarray) -> np.ndarray:
    """Longitudes (degrees) -> a contiguous interval: modulo 360, then shifted so that the widest gap between
    consecutive distinct longitudes (around the circle) lies at the interval's ends."""
    lon = np.mod(lon, 360.0)
    u = np.unique(lon)
    if u.size < 2:
        return lon
    gaps = np.diff(np.concatenate([u, u[:1] + 360.0]))  # gap after u[i], the last one wraps around
    start = u[(int(np.argmax(gaps)) + 1) % u.size]  # first longitude after the widest gap
    return np.mod(lon - start, 360.0) + start


def normalize_vertex_coords(coords: np.ndarray, spherical: bool = False, reverse_columns: bool = True,
                            name: str = "coords") -> np.ndarray:
    """Stored vertex coordinates (N, 3) -> float32 (N, 3) model coordinates in [-1, 1] (module docstring).

    Args:
        coords: (N, 3) stored coordinates.
        spherical: columns are (depth or radius, lon, lat) in degrees; lon is unwrapped (see module docstring).
        reverse_columns: reverse the column order (stored columns = array order -> x order).
        name: file name used in error messages.
    """
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 1:
        raise DataError(f"{name}: vertex coordinates must have shape (N, 3), got {list(c.shape)}")
    if not np.isfinite(c).all():
        raise DataError(f"{name}: vertex coordinates hold NaN/Inf")
    c = c.copy()
    if spherical:
        lat = c[:, 2]
        if np.abs(lat).max() > 90.0:
            raise DataError(f"{name}: coords_spherical expects columns (depth/radius, lon, lat) in degrees; "
                            f"column 2 (lat) reaches {np.abs(lat).max():g}")
        if np.abs(lat).max() <= np.pi / 2 and np.abs(c[:, 1]).max() <= 2 * np.pi and c.shape[0] > 100:
            log.warning("%s: lon/lat all lie within radian ranges; coords_spherical expects degrees", name)
        c[:, 1] = _unwrap_longitude(c[:, 1])
    lo, hi = c.min(axis=0), c.max(axis=0)
    span = hi - lo
    flat = span <= 0
    if flat.any():
        log.warning("%s: coordinate column(s) %s are constant; they map to 0", name, np.flatnonzero(flat).tolist())
    x = np.where(flat, 0.0, 2.0 * (c - lo) / np.where(flat, 1.0, span) - 1.0)
    x = np.clip(x, -1.0, 1.0)
    if reverse_columns:
        x = x[:, ::-1]
    return np.ascontiguousarray(x, dtype=np.float32)
