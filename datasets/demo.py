"""The embedded demo ensemble: a synthetic blast-wave density field, generated deterministically (no download).

    python -m datasets.demo --root data/demo [--resolution 32 --n_train 40 --n_test 10 --spatial_dims 3]

Each member is the density of a spherical (2D: circular) blast wave expanding from a fixed off-centre
point into a stratified ambient medium that carries a smooth density wave. Four parameters:

================  ===========  ==============================================================
name              range        meaning
================  ===========  ==============================================================
front_radius      0.30 - 0.70  mean shock-front radius (box half-widths; the box is [-1, 1]^d)
sharpness         10 - 60      inverse front width: tanh(sharpness * (r - r_front)) profile
density_ratio     1.5 - 6.0    density jump across the shock (compressed shell / ambient)
wave_number       1.0 - 4.0    wave number of the ambient density wave and of the front ripple
================  ===========  ==============================================================

The fields mix sharp fronts (the shock: sub-cell to ~2 cells wide at 32^3) with smooth regions (the
rarefied interior, the stratified background wave). They depend nonlinearly on the parameters and the
parameters interact: the front ripple amplitude grows with the Atwood number of the density jump, the
ripple pattern and the background wave share ``wave_number``, the shell thickness falls with
``density_ratio``. Values are positive densities, roughly 0.1 to 5 at 32^3
(ambient about 1.2, like air in kg/m^3).

Parameters: training members are a Latin hypercube over the ranges above (numpy, fixed seed); test members
are a second Latin hypercube drawn inside the per-parameter [min, max] of the training members, so they
are interpolation cases.

Layout written (the reference on-disk format, see datasets/prepare.py): ``root/data/member_XXXX.npy``
(float32, shape (D, H, W) = resolution^3, or (H, W) when spatial_dims=2), ``root/params.csv``,
``root/cond.npy``, ``root/split.npy`` (first n_train members train, the rest test), ``root/cond_meta.json``
and the marker ``root/demo_settings.json`` holding the generator settings. The ensemble is written into a
temporary sibling folder and renamed into place, so an interrupted generation never leaves a half-written
``root``; an existing complete root with the same settings is reused. (A process killed outright may leave
a hidden ``.<name>.tmp-*`` sibling folder behind, never a partial ``root``; it is safe to delete.)

The default root ``data/demo`` is relative to the current working directory; ensembles with different
settings need different roots, which only change when you set ``root`` (dataset key) or ``--root``.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence

import numpy as np

from datasets.ensemble import EnsembleDataset
from util.config import NON_NEGATIVE, POSITIVE, VERTICES, one_of
from util.registry import ConfigError, register

__all__ = ["PARAM_NAMES", "PARAM_RANGES", "GENERATOR_VERSION", "demo_field", "demo_params", "generate_demo",
           "demo_paths", "demo", "DemoRootError", "main"]

log = logging.getLogger(__name__)

PARAM_NAMES = ("front_radius", "sharpness", "density_ratio", "wave_number")
PARAM_RANGES = ((0.30, 0.70), (10.0, 60.0), (1.5, 6.0), (1.0, 4.0))
#: bump when the generator's output changes, so stale ensembles on disk are detected
GENERATOR_VERSION = 1
MARKER = "demo_settings.json"

_CENTRE = (-0.22, -0.15, -0.10)  # blast origin (x, y, z)
_AMBIENT = 1.2                    # mean ambient density


class DemoRootError(RuntimeError):
    """The demo root exists but does not hold a demo ensemble with the requested settings."""


# ------------------------------------------------------------------------------------------------ physics
def demo_field(params: Sequence[float], resolution: int = 32, spatial_dims: int = 3) -> np.ndarray:
    """The density field of one member.

    Args:
        params: raw values (front_radius, sharpness, density_ratio, wave_number).
        resolution: vertices per axis; the grid spans [-1, 1] per axis (vertex j -> 2 j / (n - 1) - 1).
        spatial_dims: 3 -> array (D, H, W), 2 -> array (H, W); the last array axis is x.

    Returns:
        float32 array of shape (resolution,) * spatial_dims, all values > 0.
    """
    radius, sharp, ratio, k = (float(v) for v in params)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    ax = np.linspace(-1.0, 1.0, resolution)
    if spatial_dims == 3:
        z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    else:
        y, x = np.meshgrid(ax, ax, indexing="ij")
        z = np.zeros_like(x)
    dx, dy, dz = x - _CENTRE[0], y - _CENTRE[1], (z - _CENTRE[2]) if spatial_dims == 3 else z
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    rs = np.maximum(r, 1e-9)
    nx, ny = dx / rs, dy / rs
    # Ambient medium: stratified in y, carrying a smooth oblique density wave of wave number k.
    angle = 0.35 + 0.25 * k
    phase = np.pi * k * (np.cos(angle) * x + np.sin(angle) * y) + 0.3 * z
    ambient = _AMBIENT * np.exp(-0.25 * (y + 1.0)) * (1.0 + 0.15 * np.sin(phase))
    # Front with a ripple whose amplitude follows the Atwood number of the jump (interaction of parameters).
    atwood = (ratio - 1.0) / (ratio + 1.0)
    ripple = np.sin(np.pi * k * nx + 0.5) * np.cos(0.5 * np.pi * k * ny)
    r_front = radius * (1.0 + 0.18 * atwood * ripple)
    # Blast profile: rarefied interior rising steeply to the compressed shell (thinner for stronger shocks).
    q = 1.0 + 1.6 * ratio
    rel = np.minimum(r / r_front, 1.3)
    inside = 0.12 + (ratio - 0.12) * rel ** q
    h = 0.5 * (1.0 - np.tanh(sharp * (r - r_front)))
    rho = ambient * ((1.0 - h) + h * inside)
    return rho.astype(np.float32)


def _lhs(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Latin hypercube in [0, 1]^d: each axis split in n strata, one point per stratum."""
    u = np.empty((n, d))
    for j in range(d):
        u[:, j] = (rng.permutation(n) + rng.random(n)) / n
    return u


def demo_params(n_train: int = 40, n_test: int = 10, seed: int = 0) -> np.ndarray:
    """(n_train + n_test, 4) raw parameters (5 significant digits): a Latin hypercube for the training
    members, a second one inside the training members' per-parameter [min, max] for the test members."""
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    rng = np.random.default_rng([int(seed), 20260])
    lo = np.array([r[0] for r in PARAM_RANGES])
    hi = np.array([r[1] for r in PARAM_RANGES])
    train = lo + _lhs(rng, n_train, len(lo)) * (hi - lo)
    train = np.array([[float(f"{v:.5g}") for v in row] for row in train]).reshape(n_train, len(lo))
    tlo, thi = train.min(axis=0), train.max(axis=0)
    test = tlo + _lhs(rng, n_test, len(lo)) * (thi - tlo) if n_test else np.zeros((0, len(lo)))
    test = np.array([[float(f"{v:.5g}") for v in row] for row in test]).reshape(n_test, len(lo))
    return np.clip(np.concatenate([train, test]), tlo, thi) if n_test else train


# ------------------------------------------------------------------------------------------------ on disk
def _settings(n_train, n_test, resolution, spatial_dims, seed) -> Dict[str, int]:
    return {"generator": "blast_front", "version": GENERATOR_VERSION, "n_train": int(n_train),
            "n_test": int(n_test), "resolution": int(resolution), "spatial_dims": int(spatial_dims),
            "seed": int(seed)}


def demo_paths(root: str) -> Dict[str, str]:
    """The files of a demo root."""
    return {"root": root, "data_dir": os.path.join(root, "data"), "params_csv": os.path.join(root, "params.csv"),
            "cond_path": os.path.join(root, "cond.npy"), "cond_split_path": os.path.join(root, "split.npy"),
            "cond_meta_path": os.path.join(root, "cond_meta.json"), "marker": os.path.join(root, MARKER)}


def _read_marker(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check_existing(root: str, want: dict) -> bool:
    """True if root holds a complete ensemble with these settings; False if root is absent (or an empty
    folder, which is removed); DemoRootError otherwise."""
    if not os.path.exists(root):
        return False
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
        return False
    have = _read_marker(root)
    if have == want:
        return True
    if have is not None:
        diff = ", ".join(f"{k}={have.get(k)!r} on disk vs {v!r} requested" for k, v in want.items()
                         if have.get(k) != v)
        what = f"a demo ensemble generated with other settings ({diff})"
    else:
        what = f"something other than a complete demo ensemble (no valid {MARKER})"
    raise DemoRootError(f"demo root '{root}' holds {what}; delete it, choose another root, "
                        f"or pass overwrite=True (python -m datasets.demo --overwrite) to regenerate it")


def _write(tmp: str, params: np.ndarray, resolution: int, spatial_dims: int, n_train: int) -> None:
    p = demo_paths(tmp)
    os.makedirs(p["data_dir"])
    for i, row in enumerate(params):
        np.save(os.path.join(p["data_dir"], f"member_{i:04d}.npy"), demo_field(row, resolution, spatial_dims))
    with open(p["params_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PARAM_NAMES)
        w.writerows([[repr(float(v)) for v in row] for row in params])
    # looked up at call time (module attribute), so the one prep function is used and can be patched in tests
    from datasets import prepare as prep

    prep.prepare(p["data_dir"], p["params_csv"], tmp, n_train=n_train, progress=False)


def generate_demo(root: str, n_train: int = 40, n_test: int = 10, resolution: int = 32, spatial_dims: int = 3,
                  seed: int = 0, overwrite: bool = False) -> Dict[str, str]:
    """Write the demo ensemble into ``root`` (or reuse it there) and return its paths.

    Args:
        root: output folder (relative paths are relative to the current working directory).
        n_train: training members (the first n_train files/rows).
        n_test: test members (the following rows), parameters inside the training range.
        resolution: vertices per axis.
        spatial_dims: 3 (fields resolution^3, array order (D, H, W)) or 2 (resolution^2, (H, W)).
        seed: parameter-design seed.
        overwrite: replace an existing root whatever it holds.

    Returns:
        dict with ``root``, ``data_dir``, ``params_csv``, ``cond_path``, ``cond_split_path``,
        ``cond_meta_path``, ``marker`` and ``generated`` (False when an existing ensemble was reused).

    Raises:
        DemoRootError: root exists with other settings (or is not a demo ensemble) and not overwrite.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    root = os.path.normpath(root)
    want = _settings(n_train, n_test, resolution, spatial_dims, seed)
    paths = demo_paths(root)
    if not overwrite and _check_existing(root, want):
        return {**paths, "generated": False}
    params = demo_params(n_train, n_test, seed)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(root)}.tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the ensemble gets ordinary permissions
        _write(tmp, params, resolution, spatial_dims, n_train)
        with open(os.path.join(tmp, MARKER), "w") as f:  # written last: marks the ensemble complete
            json.dump(want, f, indent=1)
        _move_into_place(tmp, root, want, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**paths, "generated": True}


def _move_into_place(tmp: str, root: str, want: dict, overwrite: bool) -> None:
    old = None
    if overwrite and os.path.lexists(root):
        old = tempfile.mkdtemp(dir=os.path.dirname(tmp), prefix=f".{os.path.basename(root)}.old-")
        os.rmdir(old)
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        if old is not None and not os.path.lexists(root):
            os.rename(old, root)  # put the previous ensemble back
            raise
        # Another process finished the same generation first: use its ensemble if it matches.
        if not os.path.isdir(root) or not _check_existing(root, want):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


# ---------------------------------------------------------------------------------------------- registry
_SET_BY_DEMO = ("data_dir", "cond_path", "cond_split_path")


def _ensemble_keys(**kwargs):
    """Stand-in for EnsembleDataset in the registry: its config keys and docs minus the paths demo sets."""


# The registry validates a factory's extra keys against the class it forwards to; the file paths are supplied
# by ``demo`` itself, so they must be neither required nor accepted from a config.
_ensemble_keys.__signature__ = inspect.Signature(
    [p for n, p in inspect.signature(EnsembleDataset.__init__).parameters.items() if n != "self" and n not in
     _SET_BY_DEMO])
_ensemble_keys.__doc__ = "\n\n".join(inspect.cleandoc(d) for d in (EnsembleDataset.__doc__,
                                                                    EnsembleDataset.__init__.__doc__) if d)


# `python -m datasets.demo` runs this file a second time as __main__ after the package import registered it.
_register = register("dataset", "demo", forwards=_ensemble_keys) if __name__ != "__main__" else (lambda f: f)


@_register
def demo(root: str = "data/demo", n_train: int = 40, n_test: int = 10, resolution: int = 32, spatial_dims: int = 3,
         demo_seed: int = 0, **kwargs) -> EnsembleDataset:
    """The embedded demo ensemble (synthetic blast-wave densities, 4 parameters), generated on first use.

    The ensemble is written to ``root`` the first time (well under a second for 50 x 32^3) and reused after that;
    a root holding other settings is an error (delete it or choose another root). All other keys are those of
    the ``ensemble`` dataset type, which reads the generated files.

    Args:
        root: folder of the generated ensemble; a relative path is relative to the current working directory.
            Different generator settings need different roots (set it yourself).
        n_train: number of training members.
        n_test: number of test members (parameters inside the training range).
        resolution: grid vertices per axis of the demo fields.
        spatial_dims: 3 for resolution^3 volumes, 2 for resolution^2 images.
        demo_seed: seed of the demo's parameter design (not the batch seed).
    """
    clash = sorted(set(kwargs) & set(_SET_BY_DEMO))
    if clash:
        raise ConfigError(f"dataset type 'demo' sets {', '.join(clash)} itself (from root); use type 'ensemble' "
                          f"to read your own files")
    want = _settings(n_train, n_test, resolution, spatial_dims, demo_seed)
    if not _check_existing(os.path.normpath(root), want):
        log.info("generating the demo ensemble (%d members, %s fields) into %s (first use)", n_train + n_test,
                 "x".join([str(resolution)] * spatial_dims), os.path.abspath(root))
    p = generate_demo(root, n_train, n_test, resolution, spatial_dims, demo_seed)
    return EnsembleDataset(data_dir=p["data_dir"], cond_path=p["cond_path"], cond_split_path=p["cond_split_path"],
                          **kwargs)


def _demo_spatial_dims(section: Dict) -> Optional[int]:
    """Spatial axes of the demo fields from the dataset section (``spatial_dims``, default 3), for the config-load
    check of per-axis model keys (util.config.schema.check_spatial_axes)."""
    dims = section.get("spatial_dims", 3)
    return dims if dims in (2, 3) and not isinstance(dims, bool) else None


demo.config_spatial_dims = _demo_spatial_dims


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/demo", help="output folder (default data/demo, relative to the cwd)")
    ap.add_argument("--n_train", type=int, default=40)
    ap.add_argument("--n_test", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--spatial_dims", type=int, default=3, choices=(2, 3))
    ap.add_argument("--seed", type=int, default=0, help="parameter-design seed (the dataset key demo_seed)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing root")
    a = ap.parse_args(argv)
    try:
        p = generate_demo(a.root, a.n_train, a.n_test, a.resolution, a.spatial_dims, a.seed, a.overwrite)
    except DemoRootError as e:
        raise SystemExit(f"error: {e}")
    print(f"{'wrote' if p['generated'] else 'reused existing'} demo ensemble in {p['root']}: "
          f"{a.n_train} train + {a.n_test} test members, fields {'x'.join([str(a.resolution)] * a.spatial_dims)}")
    return 0


if __name__ == "__main__":
    main()


demo.config_rules = dict(EnsembleDataset.config_rules, n_train=POSITIVE, n_test=NON_NEGATIVE, resolution=VERTICES,
                         spatial_dims=one_of(2, 3))
"""Range rules of the demo's config keys (checked when a config is loaded)."""
