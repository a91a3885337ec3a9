"""The embedded NeRF demo scene: a few colored solids, rendered by ``rendering/`` into the Blender synthetic layout.

    python -m datasets.nerf_demo --root data/nerf_demo [--size 64 --n_train 50 --n_test 20]

Scene (inside the spec's box [-1.5, 1.5]^3, z up): a red sphere, a blue rounded box, a green torus lying flat on
top and a yellow upright cylinder. Each solid i has a signed distance s_i(x) and an analytic soft density
``sigma_i = SIGMA_MAX * clamp(1/2 - s_i / (2 EDGE), 0, 1)`` (zero outside ``s_i > EDGE``, SIGMA_MAX inside
``s_i < -EDGE``, a linear ramp between: a soft surface of compact support); the density is
``sum_i sigma_i`` and the color the density-weighted mean of the solids' colors, each shaded with a fixed
directional light and no specular term (``albedo_i (AMBIENT + (1 - AMBIENT) max(0, n_i . l))``, n_i the unit
gradient of s_i), so colors do not depend on the viewing direction.

Views: cameras on a sphere of radius 4 looking at the origin (up = +z), camera_angle_x of the nerf_synthetic
scenes (0.6911 rad). Train views spiral over elevations 5-75 degrees (golden-angle azimuths), test views ring the
scene at 30 degrees elevation between them. Each view is rendered with :func:`rendering.render_rays` (a 128^3
occupancy grid marked from the distance functions: the cells within reach of a surface, step 5e-3, early stop
1e-4) with no background; the PNG stores RGBA
with rgb = color / opacity (straight alpha, as Blender writes them), so reading it with a white background gives
the white-background rendering up to 8-bit rounding.

Output (the layout of ``datasets.blender``): ``root/transforms_{train,test}.json``, ``root/{train,test}/r_<i>.png``
and the marker ``root/nerf_demo_settings.json`` (generator settings). The scene is written into a temporary
sibling folder and renamed into place; an existing root with the same settings is reused, other settings are an
error. Deterministic: the same settings give the same files.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from datasets.blender import BlenderDataset
from rendering.occupancy import OccupancyGrid
from rendering.rays import blender_focal, image_rays
from rendering.renderer import render_rays
from util.registry import ConfigError, register

__all__ = ["SCENE_AABB", "CAMERA_ANGLE_X", "GENERATOR_VERSION", "scene_sdfs", "scene_density", "scene_rgb_sigma",
           "demo_cameras", "look_at", "generate_nerf_demo", "nerf_demo", "main"]

log = logging.getLogger(__name__)

# ``python -m datasets.nerf_demo``: the package import (datasets/__init__.py) has already imported this module to
# register its type, so runpy warns before running it again as __main__; harmless here (see datasets/__init__.py).
warnings.filterwarnings("ignore", message=r"'datasets\.nerf_demo' found in sys\.modules", category=RuntimeWarning)

GENERATOR_VERSION = 1
SCENE_AABB = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5)
CAMERA_ANGLE_X = 0.6911112070083618
CAMERA_RADIUS = 4.0
SIGMA_MAX = 200.0
EDGE = 0.02
DEPTH = 0.1
AMBIENT = 0.35
LIGHT = (0.4, -0.3, 0.866)
STEP = 5e-3
SETTINGS_FILE = "nerf_demo_settings.json"

# (kind, centre, parameters, albedo)
SOLIDS = (
    ("sphere", (-0.4, -0.35, -0.1), (0.5,), (0.85, 0.18, 0.15)),
    ("roundbox", (0.45, 0.35, -0.2), (0.3, 0.3, 0.3, 0.06), (0.15, 0.4, 0.85)),
    ("torus", (0.0, 0.1, 0.5), (0.45, 0.12), (0.2, 0.72, 0.3)),
    ("cylinder", (0.35, -0.6, -0.3), (0.18, 0.35), (0.95, 0.8, 0.15)),
)


def _sdf(kind: str, p, prm):
    if kind == "sphere":
        return torch.linalg.vector_norm(p, dim=-1) - prm[0]
    if kind == "roundbox":
        q = p.abs() - p.new_tensor(prm[:3])
        outside = torch.linalg.vector_norm(q.clamp_min(0), dim=-1)
        return outside + q.amax(dim=-1).clamp_max(0) - prm[3]
    if kind == "torus":  # axis z
        q = torch.stack([torch.linalg.vector_norm(p[..., :2], dim=-1) - prm[0], p[..., 2]], dim=-1)
        return torch.linalg.vector_norm(q, dim=-1) - prm[1]
    if kind == "cylinder":  # axis z, radius, half height
        d = torch.stack([torch.linalg.vector_norm(p[..., :2], dim=-1) - prm[0], p[..., 2].abs() - prm[1]], dim=-1)
        return d.amax(dim=-1).clamp_max(0) + torch.linalg.vector_norm(d.clamp_min(0), dim=-1)
    raise ValueError(kind)


def scene_sdfs(x: torch.Tensor) -> torch.Tensor:
    """Signed distances of the solids at points ``(M, 3)``: ``(M, n_solids)``."""
    return torch.stack([_sdf(k, x - x.new_tensor(c), prm) for k, c, prm, _ in SOLIDS], dim=-1)


def _ramp(s: torch.Tensor) -> torch.Tensor:
    return SIGMA_MAX * (0.5 - s / (2 * EDGE)).clamp(0, 1)


def scene_density(x: torch.Tensor) -> torch.Tensor:
    """Density at points ``(M, 3)``: ``(M,)``."""
    return _ramp(scene_sdfs(x)).sum(dim=-1)


def scene_rgb_sigma(x: torch.Tensor, d: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rgb (M, 3), sigma (M,))`` at points ``(M, 3)`` (the view direction ``d`` is ignored: diffuse only)."""
    s = scene_sdfs(x)
    sig = _ramp(s)  # (M, K)
    h = 1e-3
    grads = []
    for a in range(3):
        e = x.new_zeros(3)
        e[a] = h
        grads.append((scene_sdfs(x + e) - scene_sdfs(x - e)) / (2 * h))
    n = torch.stack(grads, dim=-1)  # (M, K, 3)
    n = n / torch.linalg.vector_norm(n, dim=-1, keepdim=True).clamp_min(1e-9)
    light = x.new_tensor(LIGHT)
    light = light / torch.linalg.vector_norm(light)
    shade = AMBIENT + (1 - AMBIENT) * (n @ light).clamp_min(0)  # (M, K)
    albedo = x.new_tensor([a for *_, a in SOLIDS])  # (K, 3)
    total = sig.sum(dim=-1)
    rgb = ((sig * shade) @ albedo) / total.clamp_min(1e-12)[:, None]
    return rgb.clamp(0, 1), total


def look_at(position, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenGL camera-to-world ``(4, 4)``: the camera at ``position`` looks at ``target`` (its -z axis)."""
    pos = np.asarray(position, np.float64)
    z = pos - np.asarray(target, np.float64)
    z /= np.linalg.norm(z)
    x = np.cross(np.asarray(up, np.float64), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, pos
    return m


def demo_cameras(n_train: int, n_test: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """c2w matrices of the train views (spiral, elevations 5-75 degrees) and the test views (ring at 30)."""
    golden = math.pi * (3.0 - math.sqrt(5.0))
    lo, hi = math.sin(math.radians(5)), math.sin(math.radians(75))
    train = []
    for i in range(n_train):
        el = math.asin(lo + (hi - lo) * (i + 0.5) / n_train)
        az = i * golden
        train.append(look_at(CAMERA_RADIUS * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az),
                                                       math.sin(el)])))
    test = []
    el = math.radians(30)
    for i in range(n_test):
        az = 2 * math.pi * (i + 0.5) / n_test
        test.append(look_at(CAMERA_RADIUS * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az),
                                                      math.sin(el)])))
    return train, test


def _scene_grid(resolution: int = 128) -> OccupancyGrid:
    """Occupancy grid of the scene: the cells within reach of a surface.

    A cell is occupied when the smallest signed distance at its centre lies in ``(-DEPTH - r, EDGE + r)`` (r = half
    the cell diagonal; the distances are 1-Lipschitz). Outside ``EDGE`` the density is 0; a ray reaching depth
    ``DEPTH`` = 0.1 inside a solid has crossed at least 0.08 of density SIGMA_MAX (transmittance < 1e-6), so the
    cells deeper inside are never seen and are left empty.
    """
    grid = OccupancyGrid(SCENE_AABB, resolution)
    R = resolution
    idx = torch.arange(R ** 3)
    lo, hi = grid.aabb[:3], grid.aabb[3:]
    centres = lo + (grid.cell_coords(idx).float() + 0.5) / R * (hi - lo)
    r = 0.5 * math.sqrt(3) * float((hi - lo).max()) / R
    s = scene_sdfs(centres).amin(dim=-1)
    occ = (s < EDGE + r) & (s > -DEPTH - r)
    grid.binaries.copy_(occ.reshape(R, R, R))
    grid.occs.copy_(occ.float())
    return grid


def render_view(grid: OccupancyGrid, c2w: np.ndarray, size: int) -> np.ndarray:
    """One view as uint8 RGBA ``(size, size, 4)`` (straight alpha)."""
    focal = blender_focal(size, CAMERA_ANGLE_X)
    o, d = image_rays(torch.from_numpy(c2w.astype(np.float32)), size, size, focal)
    out = render_rays(grid, o.reshape(-1, 3), d.reshape(-1, 3), scene_rgb_sigma, scene_density,
                      render_step_size=STEP, stratified=False, render_bkgd=None)
    a = out["opacities"].clamp(0, 1)
    rgb = torch.where(a > 0, out["colors"] / a.clamp_min(1e-8), torch.zeros_like(out["colors"])).clamp(0, 1)
    rgba = torch.cat([rgb, a], dim=-1).reshape(size, size, 4).numpy()
    return np.round(rgba * 255.0).astype(np.uint8)


def _settings(size: int, n_train: int, n_test: int) -> Dict:
    return {"generator_version": GENERATOR_VERSION, "size": size, "n_train": n_train, "n_test": n_test}


def generate_nerf_demo(root: str, size: int = 64, n_train: int = 50, n_test: int = 20) -> str:
    """Write the demo scene to ``root`` (reused when it already holds the same settings); returns ``root``.

    Raises:
        ConfigError: bad settings, or ``root`` holds something else (another scene or other settings).
    """
    for key, val, lo in (("size", size, 4), ("n_train", n_train, 1), ("n_test", n_test, 1)):
        if not isinstance(val, int) or isinstance(val, bool) or val < lo:
            raise ConfigError(f"nerf_demo {key} must be an integer >= {lo}, got {val!r}")
    settings = _settings(size, n_train, n_test)
    marker = os.path.join(root, SETTINGS_FILE)
    if os.path.exists(root):
        if os.path.isfile(marker):
            with open(marker) as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError:
                    old = None
            if old == settings:
                return root
            raise ConfigError(f"'{root}' holds a NeRF demo scene with other settings ({old}, asked for {settings}); "
                              f"delete it or choose another root")
        if os.listdir(root):
            raise ConfigError(f"'{root}' exists and is not a NeRF demo scene folder (no {SETTINGS_FILE}); choose "
                              f"another root")
    from util.files import publish_folder

    def fill(tmp: str) -> None:
        from PIL import Image

        with torch.no_grad():
            grid = _scene_grid()
            train, test = demo_cameras(n_train, n_test)
            for split, cams in (("train", train), ("test", test)):
                os.makedirs(os.path.join(tmp, split))
                frames = []
                for i, c2w in enumerate(cams):
                    Image.fromarray(render_view(grid, c2w, size), "RGBA").save(os.path.join(tmp, split, f"r_{i}.png"))
                    frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
                with open(os.path.join(tmp, f"transforms_{split}.json"), "w") as f:
                    json.dump({"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}, f, indent=1)
        with open(os.path.join(tmp, SETTINGS_FILE), "w") as f:
            json.dump(settings, f)

    if not publish_folder(root, fill):  # another process finished first: reuse it if the settings match
        return generate_nerf_demo(root, size, n_train, n_test)
    log.info("NeRF demo scene written to %s (%d train, %d test views, %d px)", root, n_train, n_test, size)
    return root


# `python -m datasets.nerf_demo` runs this file a second time as __main__ after the package import registered it.
_register = register("dataset", "nerf_demo", forwards=BlenderDataset) if __name__ != "__main__" else (lambda f: f)


@_register
def nerf_demo(root: str = "data/nerf_demo", size: int = 64, n_train: int = 50, n_test: int = 20,
              **kwargs) -> BlenderDataset:
    """The embedded NeRF demo scene (colored solids), generated on first use, read as a ``blender`` dataset.

    The scene is written to ``root`` the first time (a few seconds at 64 px) and reused after that; a root holding
    other settings is an error. All other keys are those of the ``blender`` dataset type.

    Args:
        root: folder of the generated scene (relative to the current working directory).
        size: width and height of the views in pixels.
        n_train: number of training views.
        n_test: number of test views.
    """
    generate_nerf_demo(root, size=size, n_train=n_train, n_test=n_test)
    return BlenderDataset(root, **kwargs)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Write the NeRF demo scene (Blender synthetic layout).")
    p.add_argument("--root", default="data/nerf_demo")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n_train", type=int, default=50)
    p.add_argument("--n_test", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        generate_nerf_demo(a.root, a.size, a.n_train, a.n_test)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    print(f"NeRF demo scene in {a.root}")


if __name__ == "__main__":
    main()
