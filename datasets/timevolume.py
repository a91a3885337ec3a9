"""Time-varying volume dataset (MoE-INR spec 1, 10): one scalar variable v(t, z, y, x) -> normalized samples.

Files (``path``):

- one 4-D file [T, Z, Y, X]: ``.npy`` (memory-mapped), raw float32 ``.raw/.bin/.dat`` (needs ``dims`` =
  [T, Z, Y, X]), ``.h5/.hdf5`` (dataset ``h5_key``; memory-mapped when contiguous and unfiltered) or ``.nc``
  (variable ``h5_key``);
- or a folder with one 3-D file [Z, Y, X] per time step (the same formats; raw files need ``dims`` = [Z, Y, X]),
  sorted lexicographically, selected by ``file_pattern`` (glob; default every file with a known extension).

Files are opened with ``datasets.ensemble.open_member`` (the project's member reader). Nothing is copied into
RAM unless ``mmap: false`` (or the format cannot be mapped: compressed HDF5, NetCDF-3): batches read only the
sampled voxels of the memory-mapped arrays, and the construction-time scan (min/max, NaN/Inf check, mean)
streams one time step at a time, so volumes larger than RAM work.

Normalization (spec 10): coordinates (x, y, z, t) in [-1, 1], index i of an n-point axis -> 2 i / (n - 1) - 1
(0 for an axis of one point); ``x`` column 0 = X (last array axis), 1 = Y, 2 = Z, 3 = T (the project's
"column 0 indexes the last array axis" rule). Values: v' = 2 (v - min) / (max - min) - 1 in [-1, 1], with one
global min/max over all steps (``value_norm: global``, default) or one per time step (``per_step``; the paper
leaves it open). ``value_min`` / ``value_max`` (lists for per_step) are kept to de-normalize.

A batch depends only on (seed, step, rank): ``batch_size`` voxels drawn uniformly with replacement over all
T Z Y X voxels (numpy ``default_rng([seed, step, rank])``); ``steps_per_epoch`` = ceil(voxels / batch_size).
What one paper epoch covers is not stated; this makes an epoch one voxel count's worth of samples.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from datasets.base import Dataset
from datasets.ensemble import H5_EXTS, NC_EXTS, RAW_EXTS, open_member
from util.errors import DataError
from util.registry import ConfigError, register

__all__ = ["TimeVolumeDataset", "VALUE_NORMS", "time_coords", "VOLUME_EXTS"]

log = logging.getLogger(__name__)

VALUE_NORMS = ("global", "per_step")
VOLUME_EXTS = (".npy",) + RAW_EXTS + H5_EXTS + NC_EXTS


def _axis(n: int) -> np.ndarray:
    """Vertex coordinates 2 i / (n - 1) - 1 of an n-point axis (float64; [0] for n = 1)."""
    if n == 1:
        return np.zeros(1)
    return 2.0 * np.arange(n) / (n - 1) - 1.0


def time_coords(index: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Coordinates (N, 4) float64 of C-order flat indices into ``shape`` = (T, Z, Y, X): columns (x, y, z, t)."""
    idx = np.unravel_index(np.asarray(index, dtype=np.int64), tuple(int(s) for s in shape))
    cols = [_axis(int(s))[i] for s, i in zip(shape, idx)]  # (t, z, y, x)
    return np.stack(cols[::-1], axis=-1)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@register("dataset", "time_volume")
class TimeVolumeDataset(Dataset):
    """One scalar variable of a time-varying volume [T, Z, Y, X] for single-field INR compression (MoE-INR).

    Batches: ``x`` (1, N, 4) float32 (x, y, z, t) in [-1, 1], ``v`` (1, N, 1) normalized values in [-1, 1],
    ``c`` (1, 0), ``index`` (1, N) int64 C-order flat voxel indices into [T, Z, Y, X].

    Args:
        path: a 4-D file [T, Z, Y, X] (.npy, raw float32 .raw/.bin/.dat, .h5/.hdf5, .nc) or a folder of 3-D
            [Z, Y, X] files, one per time step, sorted by name.
        dims: array shape of raw float32 files: [T, Z, Y, X] for one file, [Z, Y, X] per time-step file; for
            other formats it is checked against the stored shape when given.
        h5_key: dataset / variable name in HDF5 and NetCDF files.
        file_pattern: glob selecting the time-step files of a folder (default: every file with a known
            extension).
        value_norm: "global" (one min/max over all steps, default) or "per_step" (min/max of each time step).
        batch_size: voxels per training batch (paper: 16,000).
        mmap: memory-map files where the format allows it (false: read them into RAM).
        seed: batch seed (injected from train.seed).
    """

    def __init__(self, path: str, dims: Optional[Sequence[int]] = None, h5_key: str = "data",
                 file_pattern: Optional[str] = None, value_norm: str = "global", batch_size: int = 16000,
                 mmap: bool = True, seed: int = 0):
        if value_norm not in VALUE_NORMS:
            raise ConfigError(f"dataset.value_norm must be one of {', '.join(VALUE_NORMS)}; got {value_norm!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"dataset.batch_size must be an integer >= 1, got {batch_size!r}")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"dataset.seed must be an integer >= 0, got {seed!r}")
        if dims is not None and (not isinstance(dims, (list, tuple)) or not all(_is_int(d) and d >= 1 for d in dims)):
            raise ConfigError(f"dataset.dims must be a list of positive integers, got {dims!r}")
        self.path, self.h5_key, self.value_norm = str(path), h5_key, value_norm
        self.batch_size, self.seed, self.mmap = int(batch_size), int(seed), bool(mmap)
        self.files: List[str] = []
        if os.path.isdir(self.path):
            names = sorted(n for n in os.listdir(self.path) if os.path.isfile(os.path.join(self.path, n)))
            if file_pattern:
                names = [n for n in names if fnmatch.fnmatch(n, file_pattern)]
            else:
                names = [n for n in names if os.path.splitext(n)[1].lower() in VOLUME_EXTS]
            if not names:
                raise DataError(f"dataset.path '{self.path}': no time-step files"
                                + (f" match dataset.file_pattern '{file_pattern}'" if file_pattern else
                                   f" with a known extension ({', '.join(VOLUME_EXTS)})"))
            if dims is not None and len(dims) != 3:
                raise ConfigError(f"dataset.dims: per-time-step files need [Z, Y, X] (3 values), got {list(dims)}")
            self.files = [os.path.join(self.path, n) for n in names]
            self._steps = [open_member(f, dims, h5_key, mmap=self.mmap) for f in self.files]
            for f, a in zip(self.files, self._steps):
                if a.ndim != 3:
                    raise DataError(f"{os.path.basename(f)}: shape {list(a.shape)}; a time-step file must hold a "
                                    f"3-D array [Z, Y, X]")
                if a.shape != self._steps[0].shape:
                    raise DataError(f"{os.path.basename(f)}: shape {list(a.shape)} differs from "
                                    f"{os.path.basename(self.files[0])}'s {list(self._steps[0].shape)}; every time "
                                    f"step must have the same grid")
            self._array = None
            self.shape: Tuple[int, ...] = (len(self._steps),) + tuple(int(s) for s in self._steps[0].shape)
        else:
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"dataset.path '{self.path}' not found (a 4-D file or a folder of "
                                        f"time-step files)")
            if dims is not None and len(dims) != 4:
                raise ConfigError(f"dataset.dims: a single file needs [T, Z, Y, X] (4 values), got {list(dims)}")
            self.files = [self.path]
            self._array = open_member(self.path, dims, h5_key, mmap=self.mmap)
            if self._array.ndim != 4:
                raise DataError(f"{os.path.basename(self.path)}: shape {list(self._array.shape)}; expected a 4-D "
                                f"array [T, Z, Y, X] (or a folder of 3-D [Z, Y, X] files, one per time step)")
            self._steps = None
            self.shape = tuple(int(s) for s in self._array.shape)
        if min(self.shape[1:]) < 2:
            raise DataError(f"dataset.path '{self.path}': grid {list(self.shape[1:])}; every spatial axis needs at "
                            f"least 2 points")
        self.n_voxels = int(np.prod(self.shape))
        self._scan()
        log.info("time volume %s: [T, Z, Y, X] = %s, values [%g, %g] (%s), batch %d", self.path, list(self.shape),
                 float(np.min(self._lo)), float(np.max(self._hi)), value_norm, self.batch_size)

    # ----------------------------------------------------------------------------------------- set-up
    def raw_step(self, t: int) -> np.ndarray:
        """Stored values of time step t, [Z, Y, X] (a view of the memory map where possible)."""
        if not (_is_int(t) and 0 <= t < self.shape[0]):
            raise IndexError(f"time step {t} out of range [0, {self.shape[0]})")
        return self._array[t] if self._array is not None else self._steps[t]

    def _step_name(self, t: int) -> str:
        if self._steps is not None:
            return os.path.basename(self.files[t])
        return f"{os.path.basename(self.path)} time step {t}"

    def _scan(self) -> None:
        """Per-step min/max/sum (float64, streamed per step); NaN/Inf is an error naming the file and step."""
        T = self.shape[0]
        lo, hi, total = np.empty(T), np.empty(T), np.empty(T)
        for t in range(T):
            a = np.asarray(self.raw_step(t), dtype=np.float64)
            if not np.isfinite(a).all():
                bad = int(np.count_nonzero(~np.isfinite(a)))
                raise DataError(f"{self._step_name(t)}: {bad} NaN or Inf values; the volume must be finite")
            lo[t], hi[t], total[t] = a.min(), a.max(), a.sum()
        self._step_lo, self._step_hi = lo, hi
        if self.value_norm == "global":
            g_lo, g_hi = float(lo.min()), float(hi.max())
            if not g_hi > g_lo:
                raise DataError(f"dataset.path '{self.path}': the volume is constant ({g_lo:g}); min-max "
                                f"normalization needs two different values")
            self._lo, self._hi = np.full(T, g_lo), np.full(T, g_hi)
        else:
            flat = np.nonzero(~(hi > lo))[0]
            if flat.size:
                raise DataError(f"{self._step_name(int(flat[0]))}: constant ({lo[flat[0]]:g}); "
                                f"value_norm 'per_step' needs two different values in every time step")
            self._lo, self._hi = lo, hi
        per_voxel = self.n_voxels // T
        self._mean = float(np.mean(2.0 * (total / per_voxel - self._lo) / (self._hi - self._lo) - 1.0))

    # ----------------------------------------------------------------------------------------- shapes
    @property
    def spatial_dims(self) -> int:
        """4 coordinate columns (x, y, z, t)."""
        return 4

    @property
    def spatial_shape(self) -> Tuple[int, ...]:
        """(T, Z, Y, X): the lattice the 4 coordinate columns index (column 0 = X)."""
        return self.shape

    @property
    def steps_per_epoch(self) -> int:
        """ceil(T Z Y X / batch_size)."""
        return max(1, -(-self.n_voxels // self.batch_size))

    @property
    def train_value_mean(self) -> float:
        """Mean normalized value over all voxels."""
        return self._mean

    @property
    def value_min(self):
        """Normalization minimum (data units): a float (global) or a per-step list."""
        return float(self._lo[0]) if self.value_norm == "global" else [float(v) for v in self._lo]

    @property
    def value_max(self):
        return float(self._hi[0]) if self.value_norm == "global" else [float(v) for v in self._hi]

    @property
    def raw_nbytes(self) -> int:
        """Size of the volume as float32: T Z Y X x 4 bytes (the CR numerator)."""
        return 4 * self.n_voxels

    # ----------------------------------------------------------------------------------------- values
    def normalize(self, v, t) -> np.ndarray:
        """Data units -> [-1, 1] (float64); ``t`` a time index (scalar or array broadcasting with v)."""
        lo, hi = self._lo[t], self._hi[t]
        return 2.0 * (np.asarray(v, dtype=np.float64) - lo) / (hi - lo) - 1.0

    def denormalize(self, v, t) -> np.ndarray:
        """[-1, 1] -> data units (float64)."""
        lo, hi = self._lo[t], self._hi[t]
        return (np.asarray(v, dtype=np.float64) + 1.0) * 0.5 * (hi - lo) + lo

    def volume(self, t: int) -> np.ndarray:
        """Normalized time step t, float32 [Z, Y, X]."""
        return self.normalize(self.raw_step(t), t).astype(np.float32)

    def gather(self, flat: np.ndarray) -> np.ndarray:
        """Normalized values (float64) at C-order flat indices into [T, Z, Y, X]; reads only those voxels."""
        flat = np.asarray(flat, dtype=np.int64)
        per = self.n_voxels // self.shape[0]
        t = flat // per
        if self._array is not None and self._array.flags.c_contiguous:
            raw = self._array.reshape(-1)[flat]
        elif self._array is not None:
            raw = self._array[np.unravel_index(flat, self.shape)]
        else:
            raw = np.empty(flat.shape, dtype=np.float64)
            for s in np.unique(t):
                sel = t == s
                a = self._steps[int(s)]
                rest = flat[sel] - int(s) * per
                raw[sel] = a.reshape(-1)[rest] if a.flags.c_contiguous else a[np.unravel_index(rest, a.shape)]
        return self.normalize(raw, t)

    def meta(self) -> dict:
        """JSON facts: path, files, shape, spatial_shape, spatial_dims, cond_dim, value_norm, value_min/max,
        batch_size, steps_per_epoch, raw_nbytes, train_value_mean."""
        return {"path": os.path.abspath(self.path), "files": [os.path.basename(f) for f in self.files],
                "shape": list(self.shape), "spatial_shape": list(self.shape), "spatial_dims": 4, "cond_dim": 0,
                "value_norm": self.value_norm, "value_min": self.value_min, "value_max": self.value_max,
                "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "raw_nbytes": self.raw_nbytes, "train_value_mean": self.train_value_mean}

    # ----------------------------------------------------------------------------------------- batches
    def sample_batch(self, step: int, rank: int = 0) -> Dict[str, torch.Tensor]:
        """The training batch of (seed, step, rank): ``batch_size`` voxels uniformly with replacement."""
        if not (_is_int(step) and step >= 0 and _is_int(rank) and rank >= 0):
            raise ValueError(f"step and rank must be integers >= 0, got step={step!r}, rank={rank!r}")
        rng = np.random.default_rng([self.seed, int(step), int(rank)])
        flat = rng.integers(0, self.n_voxels, size=self.batch_size, dtype=np.int64)
        x = time_coords(flat, self.shape).astype(np.float32)
        v = self.gather(flat).astype(np.float32)
        return {"x": torch.from_numpy(x[None]), "v": torch.from_numpy(v[None, :, None]),
                "c": torch.zeros((1, 0), dtype=torch.float32), "index": torch.from_numpy(flat[None])}

    def __repr__(self) -> str:
        return f"TimeVolumeDataset({self.path!r}, shape={list(self.shape)}, value_norm={self.value_norm!r})"
