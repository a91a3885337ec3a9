"""Camera rays of the Blender synthetic scenes (spec vision 3.1) and the ray / axis-aligned box slab test.

Cameras follow the OpenGL convention of the nerf_synthetic ``transforms_*.json`` files: a camera looks along its
local -z axis, +y is up on the image, +x to the right; ``transform_matrix`` is camera-to-world (c2w). Pixel
(x, y) (x = column, y = row from the top) has its centre at (x + 0.5, y + 0.5) and the camera-space direction
``((x + 0.5 - W / 2) / f, -(y + 0.5 - H / 2) / f, -1)``, rotated by c2w and normalized, so a ray parameter t is
a metric distance from the origin (the c2w translation). The focal length is ``f = 0.5 W / tan(0.5
camera_angle_x)``.

Every function has a plain per-ray twin (``*_reference``) that the tests compare against.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["blender_focal", "camera_rays", "image_rays", "camera_rays_reference", "ray_aabb_intersect",
           "ray_aabb_intersect_reference"]


def blender_focal(width: int, camera_angle_x: float) -> float:
    """Focal length in pixels: ``0.5 W / tan(0.5 camera_angle_x)`` (horizontal field of view in radians)."""
    if not (0.0 < float(camera_angle_x) < math.pi):
        raise ValueError(f"camera_angle_x must lie in (0, pi) radians, got {camera_angle_x!r}")
    return 0.5 * float(width) / math.tan(0.5 * float(camera_angle_x))


def camera_rays(c2w: Tensor, x: Tensor, y: Tensor, width: int, height: int, focal: float) -> Tuple[Tensor, Tensor]:
    """Rays through pixel centres.

    Args:
        c2w: camera-to-world matrices, ``(N, 3, 4)`` or ``(N, 4, 4)`` (one per ray) or ``(3|4, 4)`` (shared).
        x: pixel columns ``(N,)`` (integers; the centre x + 0.5 is used).
        y: pixel rows ``(N,)`` from the top.
        width, height: image size W, H in pixels.
        focal: focal length in pixels.

    Returns:
        ``(origins (N, 3), directions (N, 3))``: unit directions, in the dtype of ``c2w``.
    """
    dtype = c2w.dtype if c2w.dtype.is_floating_point else torch.float32
    c2w = c2w.to(dtype)
    xs = (x.to(dtype) + 0.5 - 0.5 * width) / focal
    ys = -(y.to(dtype) + 0.5 - 0.5 * height) / focal
    cam = torch.stack([xs, ys, -torch.ones_like(xs)], dim=-1)  # (N, 3)
    rot = c2w[..., :3, :3]
    if rot.dim() == 2:
        dirs = cam @ rot.T
        origins = c2w[:3, 3].expand_as(dirs)
    else:
        dirs = torch.einsum("nij,nj->ni", rot, cam)
        origins = c2w[:, :3, 3]
    dirs = dirs / torch.linalg.vector_norm(dirs, dim=-1, keepdim=True)
    return origins.contiguous(), dirs


def image_rays(c2w: Tensor, width: int, height: int, focal: float) -> Tuple[Tensor, Tensor]:
    """All rays of one camera in raster order: ``(origins (H, W, 3), directions (H, W, 3))``."""
    dev = c2w.device
    y, x = torch.meshgrid(torch.arange(height, device=dev), torch.arange(width, device=dev), indexing="ij")
    o, d = camera_rays(c2w, x.reshape(-1), y.reshape(-1), width, height, focal)
    return o.reshape(height, width, 3), d.reshape(height, width, 3)


def camera_rays_reference(c2w, x: int, y: int, width: int, height: int, focal: float):
    """One ray, written out in plain Python floats: ``(origin [3], direction [3])`` (lists)."""
    m = [[float(c2w[i][j]) for j in range(4)] for i in range(3)]
    cam = [(x + 0.5 - width / 2.0) / focal, -(y + 0.5 - height / 2.0) / focal, -1.0]
    d = [sum(m[i][j] * cam[j] for j in range(3)) for i in range(3)]
    n = math.sqrt(sum(v * v for v in d))
    return [m[i][3] for i in range(3)], [v / n for v in d]


def ray_aabb_intersect(rays_o: Tensor, rays_d: Tensor, aabb: Tensor, near: float = 0.0,
                       far: float = float("inf")) -> Tuple[Tensor, Tensor, Tensor]:
    """Slab test of rays against one axis-aligned box, clipped to ``[near, far]``.

    Args:
        rays_o: origins ``(N, 3)``.
        rays_d: directions ``(N, 3)`` (any length; t is in units of |d|). Zero components are allowed.
        aabb: ``(6,)`` = (xmin, ymin, zmin, xmax, ymax, zmax).
        near, far: the ray segment considered.

    Returns:
        ``(t_min (N,), t_max (N,), hit (N,) bool)``: the ray is inside the (closed) box for t in
        [t_min, t_max]; ``hit`` is False (and t_min = t_max = far) when that range within [near, far] is empty.
    """
    lo, hi = aabb[:3].to(rays_o), aabb[3:].to(rays_o)
    with torch.no_grad():
        inv = 1.0 / rays_d  # +-inf for zero components
        t0 = (lo - rays_o) * inv
        t1 = (hi - rays_o) * inv
        # a zero component: (lo - o) * inf may be nan when o lies on the plane; inside the slab -> no constraint
        tn = torch.minimum(t0, t1)
        tf = torch.maximum(t0, t1)
        zero = rays_d == 0
        inside = (rays_o >= lo) & (rays_o <= hi)
        tn = torch.where(zero, torch.where(inside, -torch.inf, torch.inf), tn)
        tf = torch.where(zero, torch.where(inside, torch.inf, -torch.inf), tf)
        t_min = torch.clamp(tn.amax(dim=-1), min=near)
        t_max = torch.clamp(tf.amin(dim=-1), max=far)
        hit = t_min <= t_max
        t_min = torch.where(hit, t_min, torch.full_like(t_min, far))
        t_max = torch.where(hit, t_max, torch.full_like(t_max, far))
    return t_min, t_max, hit


def ray_aabb_intersect_reference(o, d, aabb, near: float = 0.0, far: float = float("inf")):
    """One ray in plain Python floats: ``(t_min, t_max, hit)``, the same contract as :func:`ray_aabb_intersect`."""
    lo_t, hi_t = near, far
    for a in range(3):
        oa, da, lo, hi = float(o[a]), float(d[a]), float(aabb[a]), float(aabb[a + 3])
        if da == 0.0:
            if not (lo <= oa <= hi):
                return far, far, False
            continue
        ta, tb = (lo - oa) / da, (hi - oa) / da
        lo_t, hi_t = max(lo_t, min(ta, tb)), min(hi_t, max(ta, tb))
    if lo_t <= hi_t:
        return lo_t, hi_t, True
    return far, far, False
