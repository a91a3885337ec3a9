"""Optional nerfacc backend (CUDA only): the same sampling and rendering through nerfacc's compiled kernels.

``nerfacc`` is optional: :func:`nerfacc_status` says whether it can be used here (and why not), and the functions
below raise a one-line ImportError naming the package when it is missing. The occupancy values stay in our
:class:`rendering.occupancy.OccupancyGrid` (the state that checkpoints save); :func:`nerfacc_sampling` copies them
into a nerfacc ``OccGridEstimator`` of the same box and resolution before marching.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["nerfacc_status", "nerfacc_sampling", "nerfacc_rendering"]

_ESTIMATORS = {}


def nerfacc_status() -> Tuple[bool, str]:
    """``(usable, reason)``: nerfacc imports and CUDA is available."""
    try:
        import nerfacc  # noqa: F401
    except Exception as e:  # ImportError, or a failed extension build
        return False, f"the optional package nerfacc is not usable ({type(e).__name__}: {e}); pip install nerfacc"
    if not torch.cuda.is_available():
        return False, "nerfacc's kernels need CUDA, which is not available"
    return True, f"nerfacc {getattr(nerfacc, '__version__', '?')} with CUDA"


def _import():
    try:
        import nerfacc
    except Exception as e:
        raise ImportError(f"the nerfacc backend needs the optional package nerfacc (pip install nerfacc): {e}") from e
    return nerfacc


def nerfacc_sampling(grid, rays_o: Tensor, rays_d: Tensor, sigma_fn: Optional[Callable] = None,
                     near_plane: float = 0.0, far_plane: float = 1e10, render_step_size: float = 5e-3,
                     stratified: bool = False, alpha_thre: float = 0.0,
                     early_stop_eps: float = 1e-4) -> Tuple[Tensor, Tensor, Tensor]:
    """:meth:`OccupancyGrid.sampling` through nerfacc's ``OccGridEstimator.sampling`` (same arguments)."""
    nerfacc = _import()
    key = (id(grid), str(rays_o.device))
    est = _ESTIMATORS.get(key)
    if est is None or est.resolution.tolist() != [grid.resolution] * 3:
        est = nerfacc.OccGridEstimator(roi_aabb=grid.aabb.tolist(), resolution=grid.resolution,
                                       levels=1).to(rays_o.device)
        _ESTIMATORS[key] = est
    est.occs.copy_(grid.occs.reshape(-1).to(est.occs))
    est.binaries.copy_(grid.binaries.reshape(est.binaries.shape).to(est.binaries.device))
    return est.sampling(rays_o, rays_d, sigma_fn=sigma_fn, near_plane=near_plane, far_plane=far_plane,
                        render_step_size=render_step_size, stratified=stratified, cone_angle=0.0,
                        alpha_thre=alpha_thre, early_stop_eps=early_stop_eps)


def nerfacc_rendering(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor, n_rays: int,
                      rgb_sigma_fn: Callable, render_bkgd: Optional[Tensor] = None):
    """:func:`rendering.volume.rendering` through ``nerfacc.rendering`` (same arguments and results)."""
    nerfacc = _import()
    return nerfacc.rendering(t_starts, t_ends, ray_indices, n_rays=n_rays, rgb_sigma_fn=rgb_sigma_fn,
                             render_bkgd=render_bkgd)
