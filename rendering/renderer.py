"""Rendering rays through a field: occupancy-grid sampling + volume rendering (the training renderer of spec
vision 3.4, also used, chunked and not stratified, for evaluation).

A *field* is given as callbacks on world points:

- ``rgb_sigma_fn(positions (S, 3), directions (S, 3)) -> (rgbs (S, 3), sigmas (S,))``;
- ``sigma_fn(positions (S, 3)) -> sigmas (S,)`` (optional; the visibility pass, run under no_grad; default:
  the sigma of ``rgb_sigma_fn``).

A sample's point is ``o + d (t_start + t_end) / 2``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from rendering.occupancy import OccupancyGrid
from rendering.volume import rendering

__all__ = ["render_rays", "BACKENDS"]

BACKENDS = ("torch", "nerfacc")


def render_rays(grid: OccupancyGrid, rays_o: Tensor, rays_d: Tensor, rgb_sigma_fn: Callable,
                sigma_fn: Optional[Callable] = None, render_step_size: float = 5e-3, near_plane: float = 0.0,
                far_plane: float = 1e10, stratified: bool = False, render_bkgd: Optional[Tensor] = None,
                alpha_thre: float = 0.0, early_stop_eps: float = 1e-4, generator: Optional[torch.Generator] = None,
                backend: str = "torch", chunk: Optional[int] = None) -> Dict[str, Tensor]:
    """Render rays ``(N, 3)``.

    Args:
        grid: the occupancy grid (its box and occupied cells decide where samples go).
        rays_o, rays_d: origins and unit directions ``(N, 3)``.
        rgb_sigma_fn, sigma_fn: the field (see the module docstring).
        render_step_size, near_plane, far_plane, stratified, alpha_thre, early_stop_eps: sampling (see
            :meth:`OccupancyGrid.sampling`).
        render_bkgd: background color ``(3,)``.
        generator: random numbers of the stratified jitter.
        backend: "torch" (this package) or "nerfacc" (nerfacc's kernels, CUDA only; the optional package).
        chunk: rays rendered at a time (None: all at once); results are concatenated.

    Returns:
        dict with ``colors (N, 3)``, ``opacities (N, 1)``, ``depths (N, 1)`` and ``n_samples`` (int tensor: samples
        kept after the early stop, summed over chunks).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    n = rays_o.shape[0]
    if chunk is not None and n > chunk:
        parts = [render_rays(grid, rays_o[s:s + chunk], rays_d[s:s + chunk], rgb_sigma_fn, sigma_fn,
                             render_step_size, near_plane, far_plane, stratified, render_bkgd, alpha_thre,
                             early_stop_eps, generator, backend, None) for s in range(0, n, chunk)]
        out = {k: torch.cat([p[k] for p in parts]) for k in ("colors", "opacities", "depths")}
        out["n_samples"] = sum(p["n_samples"] for p in parts)
        return out

    def points(t_starts, t_ends, ray_indices):
        return rays_o[ray_indices] + rays_d[ray_indices] * ((t_starts + t_ends) * 0.5)[:, None]

    def vis_sigma(t_starts, t_ends, ray_indices):
        x = points(t_starts, t_ends, ray_indices)
        if sigma_fn is not None:
            return sigma_fn(x).reshape(-1)
        return rgb_sigma_fn(x, rays_d[ray_indices])[1].reshape(-1)

    def rgb_sigma(t_starts, t_ends, ray_indices):
        rgbs, sigmas = rgb_sigma_fn(points(t_starts, t_ends, ray_indices), rays_d[ray_indices])
        return rgbs, sigmas.reshape(-1)

    kwargs = dict(near_plane=near_plane, far_plane=far_plane, render_step_size=render_step_size,
                  stratified=stratified, alpha_thre=alpha_thre, early_stop_eps=early_stop_eps)
    if backend == "nerfacc":
        from rendering.nerfacc_backend import nerfacc_rendering, nerfacc_sampling

        ray_indices, t_starts, t_ends = nerfacc_sampling(grid, rays_o, rays_d, sigma_fn=vis_sigma, **kwargs)
        colors, opac, depths, _ = nerfacc_rendering(t_starts, t_ends, ray_indices, n, rgb_sigma, render_bkgd)
    else:
        ray_indices, t_starts, t_ends = grid.sampling(rays_o, rays_d, sigma_fn=vis_sigma, generator=generator,
                                                      **kwargs)
        colors, opac, depths, _ = rendering(t_starts, t_ends, ray_indices, n, rgb_sigma, render_bkgd)
    return {"colors": colors, "opacities": opac, "depths": depths,
            "n_samples": torch.tensor(int(t_starts.shape[0]))}
