"""Query a trained surrogate in the simulation's own units (no training data needed).

    >>> s = Surrogate.load("runs/demo_drrnet_0")
    >>> s.param_names
    ['front_radius', ...]
    >>> field = s.predict({"front_radius": 0.4, ...}, resolution=64)   # numpy array (64, 64, 64), data units

The run directory's ``meta.json`` (written by train.py from the dataset) holds the parameter names and raw
ranges (from the prep CLI's ``cond_meta.json``) and the value normalization, so a query needs only the run.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from util.build import load_trained_model
from util.device import default_device
from util.evaluation_common import scored_weights
from util.sampling import grid_coords

log = logging.getLogger("predict")

__all__ = ["Surrogate", "denormalize"]


def denormalize(v: np.ndarray, meta: dict) -> np.ndarray:
    """Normalized values in [0, 1] -> data units (inverse of min-max, then of the log transform)."""
    out = np.asarray(v, dtype=np.float64) * (meta["value_max"] - meta["value_min"]) + meta["value_min"]
    if meta.get("log_transform"):
        out = np.exp(out)
    return out.astype(np.float32)


def warn_unless_final_weights(run_dir: str, weights_path: Optional[str]) -> None:
    """One warning line unless ``weights_path`` is the final model.pt of a finished run (the rule of test.py,
    :func:`util.evaluation_common.scored_weights`): training unfinished, model.pt missing or damaged, or other
    weights given."""
    w = scored_weights(run_dir, weights_path)
    if w["final_weights"]:
        return
    at = f"step {w['step'] if w['step'] is not None else '?'}" + (
        f" of {w['total_steps']}" if w["total_steps"] is not None else "")
    final = os.path.join(run_dir, "model.pt")
    if not os.path.isfile(os.path.join(run_dir, "finished.json")):
        log.warning("training of '%s' has not finished (no finished.json): predicting with %s (%s), not the final "
                    "model of a finished run", run_dir, w["weights"], at)
    elif w["weights"] != "model.pt" and not os.path.isfile(final):
        log.warning("the final weights '%s' are missing: predicting with %s (%s) instead", final, w["weights"], at)
    else:
        log.warning("predicting with %s (%s), not the final model.pt of '%s'", w["weights"], at, run_dir)


def _checked_points(points, name: str, d: int) -> np.ndarray:
    """``points`` as an (N, d) numeric array with N >= 1 and every value finite, else a ValueError naming ``name``."""
    a = np.asarray(points)
    if a.dtype.kind not in "iuf":
        first = a.reshape(-1)[0] if a.size else None
        raise ValueError(f"{name} must hold numbers, got an array of {a.dtype} (e.g. {first!r})")
    if a.ndim != 2 or a.shape[1] != d:
        raise ValueError(f"{name} must have shape (N, {d}), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} hold no points (shape {a.shape}); give at least one row")
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name}: {int((~finite).sum())} of {len(a)} points are not finite (first: row {row} = "
                         f"{a[row].tolist()})")
    return a


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation on this machine (``MemAvailable``), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(shape: Sequence[int], d: int, device: torch.device) -> None:
    """Refuse a grid whose prediction would not fit in memory: per point its d float32 coordinates, the float32
    field, the float64 data-unit copies and the float32 result (on CUDA: coordinates and field on the GPU)."""
    n = math.prod(int(s) for s in shape)
    out_bytes, host = n * 4, n * (4 * d + 4 + 2 * 8 + 4)
    checks = [("memory", host, available_memory())]
    if device.type == "cuda":
        checks.append(("GPU memory", n * (4 * d + 4), int(torch.cuda.mem_get_info(device)[0])))
    for what, need, avail in checks:
        if avail is not None and need > avail:
            raise ValueError(f"resolution {list(shape)} ({n} points) does not fit in {what}: the output alone is "
                             f"{out_bytes} bytes ({out_bytes / 2 ** 30:.3g} GiB) and predicting it needs about {need} "
                             f"bytes, more than the available {what} ({avail} bytes, {avail / 2 ** 30:.3g} GiB); "
                             f"give a smaller resolution")


class Surrogate:
    """A trained, baked surrogate with unit conversions.

    Attributes:
        model: the model (baked, eval mode).
        meta: the run's meta.json.
        param_names: parameter names (None when the data had no cond_meta.json: then pass normalized values).
    """

    def __init__(self, model, meta: dict, device: Union[str, torch.device] = "cpu", chunk_size: int = 262144):
        self.model, self.meta = model, meta
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self.model.to(self.device)
        # FieldModel.bake: a no-op for models without a cache
        self.model.bake()
        self.param_names = meta.get("param_names")
        self.spatial_shape = tuple(meta["spatial_shape"])
        self.spatial_dims = int(meta.get("spatial_dims", len(self.spatial_shape)))
        self.has_grid = bool(meta.get("has_grid", True))     # False: an unstructured (mesh) ensemble

    @classmethod
    def load(cls, run_dir: str, checkpoint: Optional[str] = None, device: Optional[str] = None,
             chunk_size: int = 262144) -> "Surrogate":
        """The run's model with its weights (``checkpoint``: None = the final model.pt, else the latest checkpoint)
        and the normalization recorded in its meta.json (the data files are not read).

        Weights other than the final model.pt of a finished run (training unfinished, model.pt missing, another
        ``checkpoint``) are used with a one-line warning naming them and their step.
        """
        model, _, meta = load_trained_model(run_dir, checkpoint)
        task = meta.get("task", "ensemble")  # meta.json records the task (runs from before tasks: ensemble)
        if task != "ensemble":
            raise ValueError(f"'{run_dir}' is a '{task}' run: predict.py and Surrogate predict ensemble members at "
                             f"new parameters; evaluate a '{task}' run with test.py (and load its model with "
                             f"util.build.load_trained_model)")
        warn_unless_final_weights(run_dir, getattr(model, "weights_path", None) or checkpoint)
        return cls(model, meta, default_device(device), chunk_size)

    # -- conditions -------------------------------------------------------------------------------------
    def normalize_params(self, params: Union[Dict[str, float], Sequence[float]], normalized: bool = False) -> torch.Tensor:
        """Parameters -> normalized condition (d_c,) in [0, 1] (unchecked extrapolation outside, with a warning).

        Args:
            params: {name: value} in the simulation's units, or a sequence in the CSV's column order.
            normalized: the values are already normalized to [0, 1] (the only option without parameter names).
        """
        d_c = int(self.meta["cond_dim"])
        names = self.param_names
        if isinstance(params, dict):
            if names is None:
                raise ValueError("this run's data has no parameter names (no cond_meta.json next to cond.npy); "
                                 f"pass {d_c} normalized values as a list")
            unknown = [k for k in params if k not in names]
            missing = [k for k in names if k not in params]
            if unknown or missing:
                raise ValueError(f"parameters: unknown {unknown}, missing {missing}; expected names: {names}")
            vals = [float(params[k]) for k in names]
        else:
            vals = [float(v) for v in params]
            if len(vals) != d_c:
                raise ValueError(f"expected {d_c} parameter values"
                                 f"{' (' + ', '.join(names) + ')' if names else ''}, got {len(vals)}")
        if normalized or names is None:
            if not normalized:
                raise ValueError("this run's data has no parameter ranges (no cond_meta.json): pass normalized=True")
            c = np.asarray(vals, dtype=np.float64)
            lo, hi = np.zeros(d_c), np.ones(d_c)
            labels = [f"c{i}" for i in range(d_c)]
        else:
            lo = np.asarray(self.meta["param_min"], dtype=np.float64)
            hi = np.asarray(self.meta["param_max"], dtype=np.float64)
            raw = np.asarray(vals, dtype=np.float64)
            span = np.where(hi > lo, hi - lo, 1.0)
            c = np.where(hi > lo, (raw - lo) / span, 0.0)
            labels = names
        for i, v in enumerate(vals):
            if not math.isfinite(v):
                raise ValueError(f"parameter {labels[i]} is {v}")
            if c[i] < -1e-9 or c[i] > 1 + 1e-9:
                log.warning("parameter %s = %g is outside the training range [%g, %g]: extrapolating",
                            labels[i], v, lo[i], hi[i])
        return torch.as_tensor(c, dtype=torch.float32)

    def mesh_coords(self) -> np.ndarray:
        """A mesh ensemble's vertex coordinates (N, 3) in model coordinates, normalized as in training.

        Read from the run's ``meta.json`` ``coords_path`` (the dataset's coordinate file) with the same
        normalization (``util.sampling.normalize_vertex_coords``).
        """
        from util.sampling import normalize_vertex_coords

        path = self.meta.get("coords_path")
        if self.has_grid or not path:
            raise ValueError("this run's data is gridded; mesh coordinates exist only for unstructured ensembles")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the run's mesh coordinate file '{path}' (meta.json coords_path) is missing; "
                                    "pass coords in [-1, 1] instead")
        return normalize_vertex_coords(np.load(path, allow_pickle=False), bool(self.meta.get("coords_spherical")),
                                       name=os.path.basename(path))

    # -- fields -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, params, resolution: Union[None, int, Sequence[int]] = None, coords: Optional[np.ndarray] = None,
                index_coords: Optional[np.ndarray] = None, normalized_params: bool = False,
                normalized_output: bool = False) -> np.ndarray:
        """Predict a field for one parameter setting.

        Args:
            params: {name: value} in simulation units (or a list, see :meth:`normalize_params`).
            resolution: output grid: None = the data's resolution (for a mesh ensemble: its own vertices), an
                int (the same on every axis) or a shape in array order ((D, H, W) or (H, W)); for a mesh
                ensemble a grid over the box of its normalized vertex coordinates. Not with coordinates (an
                error), nor larger than the available memory (an error naming both sizes in bytes).
            coords: (N, d) points in [-1, 1], column 0 along the last array axis (the model's convention).
            index_coords: (N, d) points as fractional array indices in array order (i along the first axis),
                relative to the data's resolution ``spatial_shape`` (gridded ensembles only), in [0, n - 1].
                Points must be numbers, at least one, finite and inside the domain (else a ValueError naming the
                first bad row): outside it the model gives a constant field, not an extrapolation.
            normalized_params: params are already normalized to [0, 1].
            normalized_output: return values in [0, 1] instead of data units.

        Returns:
            float32 array: the grid shape, or (N,) for given coordinates and for a mesh's own vertices.
        """
        from tasks.ensemble.evaluation import predict_field

        c = self.normalize_params(params, normalized=normalized_params).to(self.device)
        d = self.spatial_dims
        if coords is not None and index_coords is not None:
            raise ValueError("give coords or index_coords, not both")
        if resolution is not None and (coords is not None or index_coords is not None):
            raise ValueError("a resolution applies to grid output only: it cannot be combined with coords / "
                             "index_coords (the field is predicted at the points given)")
        if index_coords is not None and not self.has_grid:
            raise ValueError("index_coords need a gridded ensemble; this run's data is a mesh: pass coords in "
                             "[-1, 1] or nothing (the mesh's own vertices)")
        if coords is None and index_coords is None and resolution is None and not self.has_grid:
            coords = self.mesh_coords()
        if index_coords is not None:
            idx = np.asarray(_checked_points(index_coords, "index_coords", d), dtype=np.float64)
            n = np.asarray(self.spatial_shape, dtype=np.float64)
            bad = (idx < -1e-6) | (idx > n - 1 + 1e-6)
            if bad.any():
                row, axis = (int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"index_coords: {int(bad.any(axis=1).sum())} of {len(idx)} points lie outside the "
                                 f"grid {list(self.spatial_shape)} (first: row {row}, axis {axis} = "
                                 f"{idx[row, axis]:g}, outside [0, {int(n[axis]) - 1}]); the model is defined on the "
                                 f"data's domain only (outside it, a constant field)")
            coords = (2 * idx / np.maximum(n - 1, 1) - 1)[:, ::-1]
        if coords is not None:
            x = np.asarray(_checked_points(coords, "coords", d), dtype=np.float32)
            out_of_range = np.abs(x).max(axis=1) > 1 + 1e-6
            if out_of_range.any():
                row = int(np.flatnonzero(out_of_range)[0])
                raise ValueError(f"coords: {int(out_of_range.sum())} of {len(x)} points lie outside the data's "
                                 f"domain [-1, 1] (first: row {row} = {x[row].tolist()}); the model is defined on "
                                 f"[-1, 1] only (outside it, a constant field)")
            xs = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
            shape = (x.shape[0],)
        else:
            if resolution is None:
                shape = self.spatial_shape
            elif isinstance(resolution, int):
                shape = (int(resolution),) * d
            else:
                shape = tuple(int(r) for r in resolution)
            if len(shape) != d or min(shape) < 1:
                raise ValueError(f"resolution must be an int or {d} positive sizes, got {resolution}")
            _check_memory(shape, d, self.device)
            xs = grid_coords(shape).to(self.device)
        v = predict_field(self.model, xs, c, shape, self.chunk_size).cpu().numpy()
        return v.astype(np.float32) if normalized_output else denormalize(v, self.meta)
