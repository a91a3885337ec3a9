"""Volume rendering of packed samples (nerfacc 0.5.3's semantics, spec vision 3.4), in plain PyTorch.

Samples are *packed*: flat tensors of length S sorted by ray, ``ray_indices (S,)`` int64 naming each sample's ray
(non-decreasing), intervals ``[t_starts, t_ends]`` along the ray. For sample i of a ray with densities sigma:

- optical thickness  tau_i = sigma_i (t_end_i - t_start_i)
- alpha              a_i = 1 - exp(-tau_i)
- transmittance      T_i = exp(-sum_{j < i on the same ray} tau_j)   (exclusive)
- weight             w_i = T_i a_i            (so sum_i w_i = 1 - exp(-sum_i tau_i) <= 1)
- color              C = sum_i w_i c_i + bkgd (1 - sum_i w_i); opacity = sum_i w_i;
                     depth = sum_i w_i (t_start_i + t_end_i) / 2 / max(opacity, eps)

The segmented (per-ray) exclusive sum is a flat cumulative sum in float64 minus its value at each ray's first
sample, so rays never mix and float32 round-off does not accumulate over many rays. Every function here is
differentiable (the transmittance pass of the estimator calls them under no_grad).

``*_reference`` functions are plain per-ray loops over Python floats for the tests.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["check_packed", "ray_first_sample", "exclusive_sum_packed", "render_transmittance_from_density",
           "render_weight_from_density", "render_visibility_from_density", "accumulate_along_rays", "rendering",
           "render_weight_reference", "rendering_reference"]


def check_packed(ray_indices: Tensor, n_rays: int) -> None:
    """Raise ValueError unless ``ray_indices`` is a 1-D int tensor, non-decreasing, within [0, n_rays)."""
    if ray_indices.dim() != 1 or ray_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ray_indices must be a 1-D int64 tensor, got shape {tuple(ray_indices.shape)} "
                         f"{ray_indices.dtype}")
    if ray_indices.numel():
        if bool((ray_indices[1:] < ray_indices[:-1]).any()):
            raise ValueError("ray_indices must be sorted (samples packed ray by ray)")
        if int(ray_indices[0]) < 0 or int(ray_indices[-1]) >= n_rays:
            raise ValueError(f"ray_indices must lie in [0, {n_rays}), got [{int(ray_indices[0])}, "
                             f"{int(ray_indices[-1])}]")


def ray_first_sample(ray_indices: Tensor, n_rays: int) -> Tensor:
    """For each sample, the flat index of its ray's first sample: ``(S,)`` int64."""
    counts = torch.bincount(ray_indices, minlength=n_rays)
    starts = torch.cumsum(counts, 0) - counts
    return starts[ray_indices]


def exclusive_sum_packed(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Per-ray exclusive cumulative sum of ``values (S,)``: ``out_i = sum_{j < i, same ray} values_j``.

    Computed in float64 and returned in the dtype of ``values`` (differentiable).
    """
    if values.numel() == 0:
        return values.clone()
    v = values.double()
    excl = torch.cumsum(v, 0) - v
    first = ray_first_sample(ray_indices, n_rays)
    return (excl - excl[first]).to(values.dtype)


def render_transmittance_from_density(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor,
                                      n_rays: int) -> Tuple[Tensor, Tensor]:
    """``(trans (S,), alphas (S,))``: exclusive transmittance T_i and alpha a_i of each sample."""
    tau = sigmas * (t_ends - t_starts)
    trans = torch.exp(-exclusive_sum_packed(tau, ray_indices, n_rays))
    alphas = 1.0 - torch.exp(-tau)
    return trans, alphas


def render_weight_from_density(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor,
                               n_rays: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(weights (S,), trans (S,), alphas (S,))`` with w_i = T_i a_i.

    Args:
        t_starts, t_ends: interval bounds ``(S,)``.
        sigmas: densities ``(S,)`` (>= 0).
        ray_indices: ``(S,)`` int64, sorted.
        n_rays: number of rays.
    """
    trans, alphas = render_transmittance_from_density(t_starts, t_ends, sigmas, ray_indices, n_rays)
    return trans * alphas, trans, alphas


def render_visibility_from_density(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor,
                                   n_rays: int, early_stop_eps: float = 1e-4, alpha_thre: float = 0.0) -> Tensor:
    """Samples still visible: ``T_i >= early_stop_eps`` (and ``a_i >= alpha_thre`` when alpha_thre > 0), ``(S,)``
    bool (the transmittance early stop of nerfacc's ``sampling``)."""
    trans, alphas = render_transmittance_from_density(t_starts, t_ends, sigmas, ray_indices, n_rays)
    mask = trans >= early_stop_eps
    if alpha_thre > 0:
        mask = mask & (alphas >= alpha_thre)
    return mask


def accumulate_along_rays(weights: Tensor, ray_indices: Tensor, n_rays: int,
                          values: Optional[Tensor] = None) -> Tensor:
    """``sum_i w_i v_i`` per ray: ``(n_rays, C)`` (``values (S, C)``) or ``(n_rays, 1)`` when values is None."""
    src = weights[:, None] if values is None else weights[:, None] * values
    out = torch.zeros(n_rays, src.shape[-1], dtype=src.dtype, device=src.device)
    return out.index_add(0, ray_indices, src)


def rendering(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor, n_rays: int,
              rgb_sigma_fn: Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]],
              render_bkgd: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Tensor]]:
    """Render packed samples.

    Args:
        t_starts, t_ends, ray_indices: packed samples ``(S,)`` (ray_indices sorted).
        n_rays: number of rays.
        rgb_sigma_fn: ``(t_starts, t_ends, ray_indices) -> (rgbs (S, 3), sigmas (S,))``.
        render_bkgd: background color ``(3,)`` (or ``(n_rays, 3)``) blended with weight ``1 - opacity``.

    Returns:
        ``(colors (n_rays, 3), opacities (n_rays, 1), depths (n_rays, 1), extras)``; extras holds the per-sample
        ``weights``, ``trans``, ``alphas``, ``sigmas`` and ``rgbs``.
    """
    rgbs, sigmas = rgb_sigma_fn(t_starts, t_ends, ray_indices)
    sigmas = sigmas.reshape(-1)
    if rgbs.shape != (t_starts.shape[0], rgbs.shape[-1]) or sigmas.shape[0] != t_starts.shape[0]:
        raise ValueError(f"rgb_sigma_fn must return rgbs (S, C) and sigmas (S,) for S={t_starts.shape[0]} samples, "
                         f"got {tuple(rgbs.shape)} and {tuple(sigmas.shape)}")
    weights, trans, alphas = render_weight_from_density(t_starts, t_ends, sigmas, ray_indices, n_rays)
    colors = accumulate_along_rays(weights, ray_indices, n_rays, rgbs)
    opacities = accumulate_along_rays(weights, ray_indices, n_rays)
    depths = accumulate_along_rays(weights, ray_indices, n_rays, ((t_starts + t_ends) * 0.5)[:, None])
    depths = depths / opacities.clamp_min(torch.finfo(opacities.dtype).eps)
    if render_bkgd is not None:
        colors = colors + render_bkgd.to(colors) * (1.0 - opacities)
    extras = {"weights": weights, "trans": trans, "alphas": alphas, "sigmas": sigmas, "rgbs": rgbs}
    return colors, opacities, depths, extras


# ------------------------------------------------------------------------------------------- brute force
def render_weight_reference(t_starts: Sequence[float], t_ends: Sequence[float], sigmas: Sequence[float],
                            ray_indices: Sequence[int]):
    """Per-sample ``(weights, trans, alphas)`` as Python lists, one ray at a time with T_i = prod_{j<i}(1 - a_j)."""
    w, tr, al = [], [], []
    T, prev = 1.0, None
    for s0, s1, sg, r in zip(t_starts, t_ends, sigmas, ray_indices):
        if r != prev:
            T, prev = 1.0, r
        a = 1.0 - math.exp(-float(sg) * (float(s1) - float(s0)))
        w.append(T * a)
        tr.append(T)
        al.append(a)
        T *= 1.0 - a
    return w, tr, al


def rendering_reference(t_starts, t_ends, sigmas, rgbs, ray_indices, n_rays: int, bkgd=(1.0, 1.0, 1.0)):
    """Colors, opacities and depths per ray (Python lists) from per-sample values, looping over samples."""
    w, _, _ = render_weight_reference(t_starts, t_ends, sigmas, ray_indices)
    colors = [[0.0, 0.0, 0.0] for _ in range(n_rays)]
    opac = [0.0] * n_rays
    depth = [0.0] * n_rays
    for wi, s0, s1, c, r in zip(w, t_starts, t_ends, rgbs, ray_indices):
        r = int(r)
        for k in range(3):
            colors[r][k] += wi * float(c[k])
        opac[r] += wi
        depth[r] += wi * 0.5 * (float(s0) + float(s1))
    for r in range(n_rays):
        for k in range(3):
            colors[r][k] += float(bkgd[k]) * (1.0 - opac[r])
        depth[r] = depth[r] / max(opac[r], 1.1920929e-07)
    return colors, opac, depth
