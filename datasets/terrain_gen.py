"""Embedded demo terrain: deterministic synthetic DEM regions with valleys and ridges (no download).

    python -m datasets.terrain_gen --root data/terrain_demo [--regions 12 --size 384 --seed 0]

Each region is a square heightfield in metres (float32, ``region_XXX.npy``), made in three stages:

1. **Fractal base** (spec huvr 8, "procedural fractal heightfields"): spectral synthesis, random phases and a
   power-law amplitude spectrum |k|^(-beta/2) (``beta`` ~ 3.0-3.6 per region, as measured on real DEMs), blended with a ridged
   multifractal (1 - |n| softened at 0, squared, over 3 octaves) for mountain crests; the blend and the relief vary per
   region and, through a smooth mask, inside a region, so there are flat, hilly and rugged parts.
2. **Hydraulic erosion** (stream-power law, ``iterations`` passes): each pixel drains to its steepest-descent
   neighbour (D8, the region border is the outlet); drainage area A accumulates downstream (pixels visited
   from high to low); the bed lowers by ``dt * K * A^m * S`` (m = 0.5, S = slope to the receiver, never below
   the receiver's height), which cuts a dendritic valley network with ridges between the valleys.
3. **Thermal erosion** after each hydraulic pass: material moves down where the slope to a 4-neighbour
   exceeds the talus slope (a fraction of the excess), softening crests and valley walls.

Reliefs of roughly 100-600 m per region, with a declared ground sampling distance of 5 m per pixel
(``GSD_M``): regions of 1.9 km, mean slope ~30 deg, 90th percentile ~55 deg, as mountainous terrain. (Until
2026-12 the same heights were declared at 2 m, which made them steeper than real terrain: mean slope 51 deg.
The erosion works in fixed units of 2 m per pixel, ``_EROSION_PX_M``, so the heights did not change.)
The files are written into a temporary sibling folder and renamed into place with a ``terrain_settings.json``
marker holding the settings; an existing root with the same height settings (version, regions, size, seed,
iterations) is reused, a root with others is an error naming the folder.

Timing (2-core shared VM): the default 12 regions of 384 x 384 take about 20-40 s; cut into 32 x 32 tiles
they give 1,728 tiles (6,912 at 16 x 16).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

import numpy as np

__all__ = ["fractal_surface", "erode", "generate_region", "generate_terrain_demo", "DEFAULT_ROOT", "GSD_M",
           "SETTINGS_FILE"]

DEFAULT_ROOT = os.path.join("data", "terrain_demo")
SETTINGS_FILE = "terrain_settings.json"
GSD_M = 5.0  # declared ground sampling distance of the generated terrain, metres per pixel
_EROSION_PX_M = 2.0  # the erosion's height-per-pixel unit (heights depend on it, the declared GSD does not)
_VERSION = 1  # bump when the generator's output (the heights) changes
_HEIGHT_KEYS = ("version", "regions", "size", "seed", "iterations")  # the settings that decide the heights


def _spectral(rng: np.random.Generator, n: int, beta: float, kmin: float = 1.0) -> np.ndarray:
    """Zero-mean unit-std periodic noise with amplitude spectrum |k|^(-beta/2) (random phases)."""
    ky = np.fft.fftfreq(n)[:, None] * n
    kx = np.fft.rfftfreq(n)[None, :] * n
    k = np.sqrt(kx * kx + ky * ky)
    amp = np.where(k >= kmin, np.maximum(k, 1e-9) ** (-beta / 2.0), 0.0)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=amp.shape)
    spec = amp * np.exp(1j * phase)
    f = np.fft.irfft2(spec, s=(n, n))
    f -= f.mean()
    return f / (f.std() + 1e-12)


def fractal_surface(n: int, seed: int, beta: float = 3.3, ridge: float = 0.5) -> np.ndarray:
    """A (n, n) fractal heightfield in [0, 1]: spectral noise blended with a ridged multifractal.

    Args:
        n: side in pixels.
        seed: random seed (the result depends only on (n, seed, beta, ridge)).
        beta: spectral exponent of the base noise (amplitude |k|^(-beta/2); real DEMs ~3-4, larger = smoother).
        ridge: weight of the ridged multifractal component (0 = none).
    """
    rng = np.random.default_rng(seed)
    base = _spectral(rng, n, beta)
    ridged = np.zeros((n, n))
    amp, total = 1.0, 0.0
    for octave in range(3):
        noise = _spectral(rng, n, 5.0, kmin=2.0 ** octave)
        ridged += amp * (1.0 - np.sqrt(noise * noise + 0.05) / 2.5).clip(0.0, 1.0) ** 2
        total += amp
        amp *= 0.5
    ridged /= total
    # a smooth mask varies the ruggedness inside the region (flat plains next to mountains)
    mask = 1.0 / (1.0 + np.exp(-2.5 * _spectral(rng, n, 4.5)))
    h = (1.0 - ridge) * base * (0.35 + 0.65 * mask) + ridge * 3.0 * ridged * mask
    h -= h.min()
    return h / (h.max() + 1e-12)


_NEIGH = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _receivers(h: np.ndarray):
    """Steepest-descent (D8) receiver of every pixel (flat index, -1 for pits and border outlets) and the slope."""
    n0, n1 = h.shape
    pad = np.pad(h, 1, mode="edge")
    best = np.zeros_like(h)
    rec = np.full(h.shape, -1, dtype=np.int64)
    ii, jj = np.meshgrid(np.arange(n0), np.arange(n1), indexing="ij")
    for di, dj in _NEIGH:
        nb = pad[1 + di:1 + di + n0, 1 + dj:1 + dj + n1]
        s = (h - nb) / (np.hypot(di, dj))
        better = s > best
        best = np.where(better, s, best)
        tgt = (ii + di).clip(0, n0 - 1) * n1 + (jj + dj).clip(0, n1 - 1)
        rec = np.where(better, tgt, rec)
    border = np.zeros(h.shape, dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    rec[border] = -1  # the border is the outlet
    return rec.ravel(), best.ravel()


def _drainage_area(h: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Pixels draining through each pixel (itself included), accumulated from high to low."""
    order = np.argsort(-h.ravel(), kind="stable").tolist()
    area = [1.0] * h.size
    r = rec.tolist()
    for i in order:
        t = r[i]
        if t >= 0:
            area[t] += area[i]
    return np.asarray(area)


def erode(h: np.ndarray, iterations: int = 30, k: float = 4e-2, m: float = 0.5, dt: float = 1.0,
          talus: float = 0.012, thermal_rate: float = 0.25) -> np.ndarray:
    """Stream-power hydraulic erosion plus thermal (talus) erosion on a heightfield in [0, 1] units per pixel.

    Args:
        h: (n0, n1) heights (relative units; the slopes are per pixel).
        iterations: hydraulic passes (each followed by one thermal pass).
        k, m, dt: erodibility, area exponent and time step of dh = -dt k A^m S.
        talus: slope (height units per pixel) above which thermal erosion moves material.
        thermal_rate: fraction of the excess over the talus slope moved per pass.
    """
    h = np.array(h, dtype=np.float64)
    n1 = h.shape[1]
    for _ in range(int(iterations)):
        rec, slope = _receivers(h)
        area = _drainage_area(h, rec)
        flat = h.ravel()
        drop = dt * k * area ** m * slope
        has = rec >= 0
        floor = np.where(has, flat[np.where(has, rec, 0)], flat)
        new = np.where(has, np.maximum(flat - drop, floor + 1e-6), flat)
        h = new.reshape(h.shape)
        # thermal pass: 4-neighbour material exchange above the talus slope (mass conserving)
        delta = np.zeros_like(h)
        for axis in (0, 1):
            d = np.diff(h, axis=axis)  # h[i+1] - h[i]
            move = thermal_rate * 0.25 * np.sign(d) * np.maximum(np.abs(d) - talus, 0.0)
            if axis == 0:
                delta[1:, :] -= move
                delta[:-1, :] += move
            else:
                delta[:, 1:] -= move
                delta[:, :-1] += move
        h = h + delta
    del n1
    return h


def generate_region(size: int, seed: int, iterations: int = 30) -> np.ndarray:
    """One (size, size) float32 region in metres (relief ~100-600 m, base elevation 400-1800 m).

    The spectral exponent, ridge weight and relief are drawn per region from ``seed``.
    """
    rng = np.random.default_rng([seed, 7])
    beta = float(rng.uniform(3.0, 3.6))
    ridge = float(rng.uniform(0.2, 0.7))
    relief = float(rng.uniform(100.0, 600.0))
    base = float(rng.uniform(400.0, 1800.0))
    h = fractal_surface(size, seed, beta=beta, ridge=ridge)
    # erosion works in "height per pixel" units: scale the relief to metres / unit, erode, scale back
    scale = relief / _EROSION_PX_M
    h = erode(h * scale, iterations=iterations, k=4e-2, talus=0.6) / scale
    return (base + relief * h).astype(np.float32)


def _settings(regions: int, size: int, seed: int, iterations: int) -> Dict[str, object]:
    return {"version": _VERSION, "regions": int(regions), "size": int(size), "seed": int(seed),
            "iterations": int(iterations), "gsd_m": GSD_M}


def region_files(root: str) -> List[str]:
    """Sorted region files of a generated root."""
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.startswith("region_") and f.endswith(".npy"))


def generate_terrain_demo(root: str = DEFAULT_ROOT, regions: int = 12, size: int = 384, seed: int = 0,
                          iterations: int = 30, log=print) -> List[str]:
    """Write the demo regions under ``root`` unless a complete root with these settings exists; the file list.

    Raises:
        FileExistsError: ``root`` exists with other settings or is not a generated root.
    """
    for key, val, lo in (("regions", regions, 1), ("size", size, 16), ("iterations", iterations, 0)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
            raise ValueError(f"terrain demo: {key} must be an integer >= {lo}, got {val!r}")
    want = _settings(regions, size, seed, iterations)
    marker = os.path.join(root, SETTINGS_FILE)
    if os.path.isdir(root):
        have = None
        if os.path.isfile(marker):
            with open(marker) as f:
                have = json.load(f)
        # the heights' settings decide (a root written when the declared GSD was 2 m holds the same heights)
        if have is not None and all(have.get(k) == want[k] for k in _HEIGHT_KEYS) \
                and len(region_files(root)) == regions:
            return region_files(root)
        raise FileExistsError(f"terrain demo root '{root}' exists with other settings ({have}) than requested "
                              f"({want}); delete it or choose another dataset.demo_root")
    from util.files import publish_folder

    def fill(tmp: str) -> None:
        if log:
            log(f"generating the demo terrain ({regions} regions of {size} x {size}) under {root} ...")
        for r in range(regions):
            np.save(os.path.join(tmp, f"region_{r:03d}.npy"), generate_region(size, seed * 1000 + r, iterations))
        with open(os.path.join(tmp, SETTINGS_FILE), "w") as f:
            json.dump(want, f, indent=1)

    if not publish_folder(root, fill):  # another process finished first: use its root if it matches
        return generate_terrain_demo(root, regions, size, seed, iterations, log=None)
    return region_files(root)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--regions", type=int, default=12)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=30)
    a = p.parse_args(argv)
    files = generate_terrain_demo(a.root, a.regions, a.size, a.seed, a.iterations)
    print(f"{len(files)} regions under {a.root}")


if __name__ == "__main__":
    main()
