"""Training-batch augmentation: variational coordinates (VC) and value-preserving perturbations (spec 3.4).

Modes:

- ``none``: the batch as sampled.
- ``vc`` (Variational Coordinates, baseline): x~ = clamp(x + eps_x, -1, 1); the value is kept (v~ = v).
- ``vp_s``: x~ as for VC; v~ = exact multilinear (2D bilinear / 3D trilinear) interpolation of the member's
  own field at x~ (``util.sampling.interp_gather``).
- ``vp_c``: c~ = clip(c + eps_c, 0, 1), x unchanged; v~ = inverse-distance weighting (IDW) over the K
  nearest TRAINING conditions of c~ (Euclidean) of each neighbour's value at x.
- ``vp_sc``: both: v~ = IDW over the K nearest training conditions of c~ of each neighbour's field
  interpolated at x~.

Noise: eps ~ N(0, sigma^2) per component, then **clipped** to [-tau, tau] (not resampled), so |eps| <= tau.
sigma and tau are scalars or one value per coordinate column (x order: column 0 = last array axis) /
per condition parameter. sigma defaults to 0.6 tau, the ratio of every setting in the paper
(Cloverleaf tau_x = 1/128, sigma_x = 0.6 tau_x, tau_c = 0.0016665, sigma_c = 0.001).

IDW weights: w_k = d_k^-power / sum_j d_j^-power over the K neighbours (paper Eq. 7: power 1; reference
code: power 2, the default here). If a neighbour is at distance 0, that member alone is used (weight 1).

All randomness comes from the numpy Generator passed in; x noise is drawn before c noise, each only when
the mode uses it. The API is functional (``make_augmentation`` + ``apply_augmentation``) so it can be tested
without a dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from util.registry import ConfigError
from util.sampling import combine_stencil, coords_to_continuous_index, linear_stencil

__all__ = ["MODES", "SIGMA_OVER_TAU", "Augmentation", "make_augmentation", "truncated_noise", "knn",
           "idw_weights", "apply_augmentation"]

MODES = ("none", "vc", "vp_s", "vp_c", "vp_sc")
#: default sigma / tau when only tau is given (the paper's settings all use 0.6)
SIGMA_OVER_TAU = 0.6

Scalars = Union[None, float, Sequence[float]]
#: ``values_of(member_pos, flat_idx int64 (K,)) -> values (K,)``: a training member's stored field
ValuesOf = Callable[[int, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Augmentation:
    """Validated augmentation settings (build with ``make_augmentation``).

    Attributes:
        mode: one of ``MODES``.
        sigma_x, tau_x: float64 (d,) coordinate noise std and clip bound, None when x is not perturbed.
        sigma_c, tau_c: float64 (d_c,) condition noise std and clip bound, None when c is not perturbed.
        k: number of nearest training conditions for IDW.
        power: IDW power.
    """

    mode: str = "none"
    sigma_x: Optional[np.ndarray] = None
    tau_x: Optional[np.ndarray] = None
    sigma_c: Optional[np.ndarray] = None
    tau_c: Optional[np.ndarray] = None
    k: int = 8
    power: float = 2.0

    @property
    def perturbs_x(self) -> bool:
        return self.mode in ("vc", "vp_s", "vp_sc")

    @property
    def perturbs_c(self) -> bool:
        return self.mode in ("vp_c", "vp_sc")


def _per_component(value: Scalars, n: int, key: str) -> np.ndarray:
    """A scalar or n values -> float64 (n,), all finite and >= 0."""
    try:  # numeric strings are accepted: PyYAML reads 1e-3 (no dot) as a string
        arr = None if isinstance(value, bool) else np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or arr.size not in (1, n):
        raise ConfigError(f"{key} must be a number or a list of {n} numbers, got {value!r}")
    if not np.all(np.isfinite(arr)) or (arr < 0).any():
        raise ConfigError(f"{key} must be finite and >= 0, got {value!r}")
    return np.broadcast_to(arr, (n,)).copy()


def make_augmentation(mode: str = "none", spatial_dims: int = 3, cond_dim: int = 1, sigma_x: Scalars = None,
                      tau_x: Scalars = None, sigma_c: Scalars = None, tau_c: Scalars = None, k: int = 8,
                      power: float = 2.0, key_prefix: str = "") -> Augmentation:
    """Validate augmentation options.

    Args:
        mode: "none", "vc", "vp_s", "vp_c" or "vp_sc".
        spatial_dims: d, the number of coordinate columns.
        cond_dim: d_c, the number of condition parameters.
        sigma_x: std of the coordinate noise (normalized units, [-1, 1] box): a number or d numbers in x column
            order. Default 0.6 * tau_x.
        tau_x: clip bound of the coordinate noise; required by vc, vp_s, vp_sc.
        sigma_c: std of the condition noise ([0, 1] units): a number or d_c numbers. Default 0.6 * tau_c.
        tau_c: clip bound of the condition noise; required by vp_c, vp_sc.
        k: nearest training conditions used by IDW (>= 1; fewer if there are fewer training members).
        power: IDW power (> 0): 2 as the reference code, 1 as the paper's Eq. 7.
        key_prefix: prefix of the option names in error messages (e.g. "dataset.").

    Returns:
        an ``Augmentation``; the noise settings a mode does not use are dropped (None).
    """
    if mode not in MODES:
        raise ConfigError(f"{key_prefix}augment must be one of {', '.join(MODES)}; got '{mode}'")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{key_prefix}vp_k must be an integer >= 1, got {k!r}")
    try:
        power_f = float(power) if not isinstance(power, bool) else math.nan
    except (TypeError, ValueError):
        power_f = math.nan
    if not (math.isfinite(power_f) and power_f > 0):
        raise ConfigError(f"{key_prefix}vp_power must be a number > 0, got {power!r}")
    out = dict(mode=mode, k=int(k), power=power_f)
    aug = Augmentation(mode=mode)
    for name, sigma, tau, n, used in (("x", sigma_x, tau_x, spatial_dims, aug.perturbs_x),
                                      ("c", sigma_c, tau_c, cond_dim, aug.perturbs_c)):
        if not used:
            continue
        if tau is None:
            raise ConfigError(f"{key_prefix}tau_{name} is required by augment='{mode}' (clip bound of the "
                              f"{'coordinate' if name == 'x' else 'condition'} noise, normalized units)")
        t = _per_component(tau, n, f"{key_prefix}tau_{name}")
        s = SIGMA_OVER_TAU * t if sigma is None else _per_component(sigma, n, f"{key_prefix}sigma_{name}")
        out[f"sigma_{name}"], out[f"tau_{name}"] = s, t
    return Augmentation(**out)


def truncated_noise(rng: np.random.Generator, shape: Tuple[int, ...], sigma: np.ndarray,
                    tau: np.ndarray) -> np.ndarray:
    """float64 N(0, sigma^2) noise clipped to [-tau, tau]; sigma and tau broadcast over the last axis."""
    return np.clip(rng.standard_normal(shape) * sigma, -tau, tau)


def knn(query: np.ndarray, points: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """K nearest points (Euclidean) of each query.

    Args:
        query: (B, d_c).
        points: (M, d_c).
        k: neighbours; min(k, M) are returned.

    Returns:
        (dist float64 (B, k'), idx int64 (B, k')), nearest first; ties broken by the lower index.
    """
    q = np.asarray(query, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    dist = np.sqrt(((q[:, None, :] - p[None, :, :]) ** 2).sum(-1))  # (B, M)
    k = min(int(k), p.shape[0])
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, idx, axis=1), idx.astype(np.int64)


def idw_weights(dist: np.ndarray, power: float = 2.0) -> np.ndarray:
    """Inverse-distance weights (..., K) from distances (..., K) >= 0, summing to 1 over the last axis.

    w_k = d_k^-power / sum_j d_j^-power (computed as (d_min / d_k)^power, free of overflow); a row with a zero
    distance puts weight 1 on its first zero-distance entry and 0 elsewhere.
    """
    d = np.asarray(dist, dtype=np.float64)
    zero = d == 0
    has_zero = zero.any(axis=-1, keepdims=True)
    dmin = np.where(has_zero, 1.0, d.min(axis=-1, keepdims=True))
    with np.errstate(divide="ignore"):
        inv = (dmin / np.where(zero, 1.0, d)) ** power
    w = inv / inv.sum(axis=-1, keepdims=True)
    first_zero = np.arange(d.shape[-1]) == np.argmax(zero, axis=-1)[..., None]
    return np.where(has_zero, first_zero.astype(np.float64), w)


def apply_augmentation(aug: Augmentation, rng: np.random.Generator, x: np.ndarray, c: np.ndarray, v: np.ndarray,
                       flat: np.ndarray, member_pos: np.ndarray, values_of: ValuesOf, shape: Sequence[int],
                       train_conds: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augment one batch.

    Args:
        aug: settings from ``make_augmentation``.
        rng: the batch's numpy Generator (x noise drawn first, then c noise).
        x: (B, N, d) vertex coordinates of the sampled voxels (float64 preferred).
        c: (B, d_c) conditions of the sampled members.
        v: (B, N) their values.
        flat: (B, N) int64 C-order flat indices of the sampled voxels in a field of ``shape``.
        member_pos: (B,) position of each sampled member in ``train_conds`` (its own field for VP-S).
        values_of: ``values_of(pos, flat_idx) -> values``: the stored field of training member ``pos``.
        shape: array shape of the stored fields.
        train_conds: (M, d_c) conditions of the training members (IDW neighbours for VP-C/VP-SC).

    Returns:
        (x~ (B, N, d) float64, c~ (B, d_c) float64, v~ (B, N)); inputs are returned unchanged for "none".
    """
    if aug.mode == "none":
        return x, c, v
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    if aug.perturbs_x:
        x = np.clip(x + truncated_noise(rng, x.shape, aug.sigma_x, aug.tau_x), -1.0, 1.0)
    if aug.perturbs_c:
        c = np.clip(c + truncated_noise(rng, c.shape, aug.sigma_c, aug.tau_c), 0.0, 1.0)
    if aug.mode == "vc":
        return x, c, v
    B, N = flat.shape
    out = np.empty((B, N), dtype=np.float64)
    if aug.mode == "vp_c":
        dist, nbr = knn(c, train_conds, aug.k)
        w = idw_weights(dist, aug.power)
        for b in range(B):
            acc = np.zeros(N, dtype=np.float64)
            for j in np.flatnonzero(w[b]):
                acc += w[b, j] * np.asarray(values_of(int(nbr[b, j]), flat[b]), dtype=np.float64)
            out[b] = acc
        return x, c, out
    # vp_s and vp_sc: interpolate at x~; the stencil is shared by all fields read at the same points.
    if aug.mode == "vp_sc":
        dist, nbr = knn(c, train_conds, aug.k)
        w = idw_weights(dist, aug.power)
    else:
        nbr = np.asarray(member_pos, dtype=np.int64)[:, None]
        w = np.ones((B, 1))
    for b in range(B):
        corners, cw = linear_stencil(coords_to_continuous_index(x[b], shape), shape)
        acc = np.zeros(N, dtype=np.float64)
        for j in np.flatnonzero(w[b]):
            acc += w[b, j] * combine_stencil(cw, values_of(int(nbr[b, j]), corners.reshape(-1)))
        out[b] = acc
    return x, c, out
