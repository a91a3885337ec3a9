"""The ensemble dataset: member files on disk -> normalized fields -> deterministic training batches.

On-disk layout (spec 3.1, the reference implementation's): ``data_dir`` with one file per member (sorted
lexicographically; ``.npy``, raw float32 ``.raw/.bin/.dat``, ``.h5/.hdf5``, NetCDF ``.nc``; ``file_ext`` /
``file_pattern`` select them when data_dir holds other files), ``cond.npy``
(M, 1 + d_c) whose column 0 is the index of the member's file in the sorted listing and whose other columns
are the normalized parameters, and ``split.npy`` (pickled dict ``{'cond_idx': train rows,
'cond_idx_unseen': test rows}``). ``datasets/prepare.py`` writes cond.npy/split.npy/cond_meta.json from a
parameter CSV; ``datasets/importance.py`` writes the optional importance files.

Normalization (spec 1): values v -> (f(v) - value_min) / (value_max - value_min) with f = log when
``log_transform`` else identity, value_min/max over the TRAINING members (in f units); conditions are taken
from cond.npy as they are; coordinates follow ``util.sampling`` (column 0 = last array axis, align_corners).

A batch (``sample_batch(step, rank)``) depends only on (seed, step, rank): N_c training members drawn with
replacement (uniformly, or by member importance), N_x vertices per member drawn with replacement (uniformly
over the vertices of the training-resolution field, or by coordinate importance), then augmentation
(``datasets.augment``). In-memory and memory-mapped storage read the same values through the same
arithmetic, so they give identical batches.

Checks at construction (before any training): more listed member files than cond.npy rows is refused (an extra
file would shift every member after it), split.npy must hold exactly the two keys above, each a list of whole row
numbers of cond.npy without repeats (a boolean mask is refused, not read as rows 0 and 1), and every member file
of the split, test members included, is opened cheaply (header, shape, dtype, size); the test members' values
are also scanned for NaN/Inf when they hold at most ``TEST_SCAN_BYTES``. Data problems raise
``util.errors.DataError`` (a ValueError) naming the file and what was expected.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from datasets.augment import MODES as AUGMENT_MODES
from datasets.augment import apply_augmentation, make_augmentation
from datasets.base import Dataset
from util.config import one_of
from util.errors import DataError
from util.registry import ConfigError, register
from util.sampling import index_to_coords, interp_gather_index

__all__ = ["EnsembleDataset", "open_member", "DataError", "IMPORTANCE_MODES", "STORAGE_MODES", "AUGMENT_MODES",
           "downsampled_shape"]

log = logging.getLogger(__name__)

IMPORTANCE_MODES = ("none", "coord", "member", "both")
STORAGE_MODES = ("memory", "mmap")
RAW_EXTS = (".raw", ".bin", ".dat")
H5_EXTS = (".h5", ".hdf5")
NC_EXTS = (".nc",)
_CHUNK = 1 << 22  # values per slab of streaming passes / per chunk of whole-field resampling
#: at construction the values of the test members are scanned for NaN/Inf (and log positivity) when they hold
#: at most this many bytes together; above it only their headers/sizes are checked
TEST_SCAN_BYTES = 1 << 29

ArrayLike = Union[np.ndarray, torch.Tensor]


def _importance():
    """datasets.importance, imported on use: importing it here at load time would make
    ``python -m datasets.importance`` (which imports this package first) run it twice."""
    from datasets import importance

    return importance


# ------------------------------------------------------------------------------------------ member files
def _placeholder(shape, dtype) -> np.ndarray:
    """A zero-memory read-only array of ``shape`` and ``dtype`` (stands for a member whose values were not read)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), tuple(int(s) for s in shape))


def _open_h5(path: str, key: str, mmap: bool, header_only: bool = False) -> np.ndarray:
    """An HDF5 (or NetCDF-4) dataset; memory-mapped when it is stored contiguous and unfiltered."""
    name = os.path.basename(path)
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a requirement
        raise DataError(f"{name}: reading HDF5/NetCDF-4 member files needs h5py (pip install h5py)") from e
    with h5py.File(path, "r") as f:
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise DataError(f"{name}: no dataset '{key}' (it has: {', '.join(f.keys()) or 'nothing'}); set "
                            f"dataset.h5_key")
        ds = f[key]
        if header_only:
            return _placeholder(ds.shape, ds.dtype)
        if mmap and ds.chunks is None and ds.dtype.kind in "fiu":
            offset = ds.id.get_offset()
            if offset is not None:
                return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)
        return ds[()]


def _open_netcdf(path: str, key: str, mmap: bool, header_only: bool = False) -> np.ndarray:
    """NetCDF-4 (HDF5-based, via h5py, memory-mapped when possible) or classic NetCDF-3 (via scipy, read)."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"\x89HDF":
        return _open_h5(path, key, mmap, header_only)
    if magic[:3] != b"CDF":
        raise DataError(f"{name}: not a NetCDF file (neither NetCDF-4/HDF5 nor classic NetCDF); convert it "
                        f"to .npy or NetCDF-4")
    from scipy.io import netcdf_file

    with netcdf_file(path, "r", mmap=False) as nc:
        if key not in nc.variables:
            raise DataError(f"{name}: no variable '{key}' (it has: {', '.join(nc.variables)}); set dataset.h5_key")
        return np.array(nc.variables[key].data)


def _npy_diagnosis(path: str) -> str:
    """Why a .npy file does not load, from its magic bytes, header and size ("" when no reason is found)."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                return "not a .npy file (it does not start with the NumPy magic bytes); corrupt or another format"
            f.seek(0)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            header = f.tell()
        size = os.path.getsize(path)
    except Exception as e:  # noqa: BLE001 - an unreadable header is the diagnosis
        return f"the .npy header is unreadable ({type(e).__name__}: {e}); the file is truncated or corrupt"
    if dtype.hasobject:
        return f"its header declares dtype {dtype}; expected a numeric array"
    need = header + dtype.itemsize * int(np.prod(shape))
    if size < need:
        return (f"truncated: its header declares {dtype} {list(shape)}, {need} bytes in all, but the file has "
                f"{size} bytes (copied or written incompletely?)")
    return ""


def open_member(path: str, dims: Optional[Sequence[int]] = None, h5_key: str = "data",
                mmap: bool = True, header_only: bool = False) -> np.ndarray:
    """One member's array (memory-mapped where the format allows it and ``mmap``).

    Args:
        path: ``.npy`` (``np.load(mmap_mode='r')``), raw float32 ``.raw/.bin/.dat`` (``np.memmap``, needs
            ``dims``), ``.h5/.hdf5`` (dataset ``h5_key``; memory-mapped when contiguous and unfiltered) or
            ``.nc`` (NetCDF-4 like HDF5; classic NetCDF-3 via scipy, read into memory).
        dims: array shape (array order, C order: last axis fastest). Required for raw files; for the other
            formats, checked against the stored shape when given.
        h5_key: dataset / variable name in HDF5 and NetCDF files.
        mmap: memory-map when possible (False: read into memory).
        header_only: a cheap check of the file without reading its values: the header, shape, dtype and (for
            .npy and raw files) the file size are checked as for a read; HDF5 / NetCDF-4 members then return a
            zero placeholder of the stored shape and dtype instead of their values (.npy and raw files return
            their memory map, which reads nothing).

    Returns:
        numeric array (possibly an ``np.memmap``) of the stored shape and dtype.

    Raises:
        FileNotFoundError: the file is missing. DataError (a ValueError): unreadable, truncated, wrong
        size/shape/dtype (the message names the file and what was expected). ConfigError: a raw file without
        ``dims``.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"member file '{path}' not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            arr = np.load(path, mmap_mode="r" if (mmap or header_only) else None, allow_pickle=False)
            if not isinstance(arr, np.ndarray):
                raise DataError(f"{name}: holds an .npz archive, expected a single .npy array")
        elif ext in RAW_EXTS:
            if not dims:
                raise ConfigError(f"{name}: raw float32 member files need dataset.dims, the array shape in array "
                                  f"order (e.g. [64, 64, 64])")
            shape = tuple(int(d) for d in dims)
            size, need = os.path.getsize(path), 4 * int(np.prod(shape))
            if size != need:
                raise DataError(f"{name}: {size} bytes, but dataset.dims {list(shape)} of float32 needs {need} bytes"
                                + (" (truncated?)" if size < need else ""))
            arr = (np.memmap(path, dtype=np.float32, mode="r") if (mmap or header_only)
                   else np.fromfile(path, dtype=np.float32)).reshape(shape)
        elif ext in H5_EXTS:
            arr = _open_h5(path, h5_key, mmap, header_only)
        elif ext in NC_EXTS:
            arr = _open_netcdf(path, h5_key, mmap, header_only)
        else:
            raise DataError(f"{name}: unknown member file type '{ext}' (known: .npy, {', '.join(RAW_EXTS)}, "
                            f"{', '.join(H5_EXTS + NC_EXTS)}); set dataset.file_ext or dataset.file_pattern to "
                            f"select the member files")
    except (DataError, ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # unreadable, truncated or garbage file: name it and say what was expected
        why = f"{type(e).__name__}: {e}"
        if os.path.getsize(path) == 0:
            why = "the file is empty (0 bytes)"
        elif ext == ".npy":
            why = _npy_diagnosis(path) or why
        elif ext in H5_EXTS:
            why += f"; expected an HDF5 file with dataset '{h5_key}': the file is truncated, corrupt or not HDF5"
        elif ext in NC_EXTS:
            why += f"; expected a NetCDF file with variable '{h5_key}': the file is truncated or corrupt"
        raise DataError(f"{name}: cannot read member file: {why}") from e
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name}: dtype {arr.dtype} is not numeric")
    if dims and ext not in RAW_EXTS and tuple(arr.shape) != tuple(int(d) for d in dims):
        raise DataError(f"{name}: stored shape {list(arr.shape)} differs from dataset.dims {list(dims)}")
    return arr


def _gather_raw(arr: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Stored values at C-order flat indices (reads only those elements of a memory-mapped array)."""
    if arr.flags.c_contiguous:
        return arr.reshape(-1)[flat]
    return arr[np.unravel_index(flat, arr.shape)]


def _slabs(arr: np.ndarray):
    """Consecutive slabs along axis 0 of about ``_CHUNK`` values each (streams memory-mapped files)."""
    per = max(1, _CHUNK // max(1, int(np.prod(arr.shape[1:]))))
    for i in range(0, arr.shape[0], per):
        yield np.asarray(arr[i:i + per])


def downsampled_shape(shape: Sequence[int], factor: int) -> tuple:
    """Training shape of an x``factor`` downsampling: ``(n - 1) // factor + 1`` vertices per axis.

    Vertex j' of the coarse axis sits at the same coordinate ``2 j' / (n' - 1) - 1`` as position
    ``j' (n - 1) / (n' - 1)`` of the fine axis (align_corners); for odd n this is exactly every factor-th
    vertex, for even n and factor 2 it is n / 2 vertices like the reference's ``dim_scale_factor: 0.5``
    (``F.interpolate(scale_factor=0.5, align_corners=True)``).
    """
    return tuple((int(n) - 1) // int(factor) + 1 for n in shape)


# --------------------------------------------------------------------------------------------- dataset
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _as_float(val, key: str) -> float:
    """A finite float from a number or a numeric string (configs built in Python, or read by plain PyYAML, may
    hold "1e-3")."""
    try:
        out = math.nan if isinstance(val, bool) else float(val)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise ConfigError(f"dataset.{key} must be a finite number, got {val!r}")
    return out


def _refuse_bool_rows(val, key: str, where: str, m: int) -> None:
    """DataError for a split entry holding booleans: split.npy lists row numbers, and a boolean mask read as
    numbers gives rows 0 and 1 only (np.ones(16, bool) would train on row 1 sixteen times)."""
    items = val.ravel().tolist() if isinstance(val, np.ndarray) else val
    try:
        is_bool = (isinstance(val, np.ndarray) and val.dtype == bool) or (
            isinstance(items, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in items))
    except TypeError:
        is_bool = False
    if not is_bool:
        return
    mask = np.asarray(items, dtype=bool).ravel()
    raise DataError(f"{where}: '{key}' holds booleans ({mask.size} entries, {int(mask.sum())} true), expected row "
                    f"numbers of cond.npy (0..{m - 1}); a boolean mask is not read as one. For a mask over the "
                    f"cond.npy rows, save np.flatnonzero(mask) instead")


def _few(names: Sequence[str], k: int = 5) -> str:
    """Up to k names, then how many more."""
    names = list(names)
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more if names else "none"


def _odd_names(names: Sequence[str]) -> tuple:
    """(names whose shape, digits aside, differs from the most common one; a glob of the most common shape: one
    '?' per digit when its digit runs have equal lengths in every such name, else '*')."""
    shapes = [re.sub(r"\d+", "#", n) for n in names]
    common = max(set(shapes), key=lambda t: (shapes.count(t), t)) if shapes else ""
    odd = [n for n, t in zip(names, shapes) if t != common]
    runs = {tuple(len(d) for d in re.findall(r"\d+", n)) for n, t in zip(names, shapes) if t == common}
    lengths = iter(next(iter(runs)) if len(runs) == 1 else ())
    pattern = re.sub(r"([*?\[])", r"[\1]", common)
    pattern = re.sub("#", lambda _: "?" * next(lengths, 0) or "*", pattern)
    return odd, pattern


@register("dataset", "ensemble")
class EnsembleDataset(Dataset):
    """An ensemble of scalar fields in the reference on-disk layout (spec 3), 2D ``(H, W)`` or 3D ``(D, H, W)``.

    Args:
        data_dir: folder with one file per member, sorted lexicographically (.npy, raw float32 .raw/.bin/.dat,
            .h5/.hdf5, NetCDF .nc).
        cond_path: cond.npy, (M, 1 + d_c): column 0 = index of the member's file in the sorted listing of
            data_dir, columns 1.. = the parameters normalized to [0, 1].
        cond_split_path: split.npy, a pickled dict {'cond_idx': training rows of cond.npy,
            'cond_idx_unseen': test rows}.
        dims: array shape of the member files in array order ([D, H, W] or [H, W]); required for raw files,
            checked against the stored shape for the other formats.
        h5_key: dataset (variable) name inside .h5/.hdf5/.nc member files.
        file_ext: only the files of data_dir ending in this extension (e.g. ".npy") are members (needed when
            data_dir holds other files too).
        file_pattern: only the files of data_dir whose name matches this glob (e.g. "member_*.npy"; fnmatch,
            case-sensitive, combined with file_ext when both are set) are members. The listing must not hold
            more files than cond.npy has rows (an extra file would shift every member after it): such a
            data_dir is refused, naming the extra files, unless file_ext / file_pattern select exactly the
            member files; a count that differs from the files cond.npy references is a warning.
        log_transform: take the natural log of the values before min-max normalization (Nyx); every value of
            the training members must then be > 0.
        value_min: normalization minimum (in log units with log_transform); default: over the training members.
            Give both value_min and value_max or neither.
        value_max: normalization maximum (in log units with log_transform); default: over the training members.
        cond_batch: N_c, members per training batch.
        spatial_log2batch: log2 of N_x, coordinates per member per batch (12 -> 4096).
        importance: importance sampling (spec 3.3): "none" (uniform), "coord" (coordinates by value-histogram
            weights), "member" (members by member weight) or "both".
        impsmp_cond_path: .npy of member weights (one per training member, split order, the reference format;
            or one per cond row); default: computed when importance needs it.
        impsmp_coord_path: folder of per-member coordinate-weight files (datasets.importance format, one file
            per cond row); default: computed when importance needs it.
        impsmp_bins: histogram bins over [0, 1] for weights computed on the fly.
        impsmp_cluster_size: voxels per cluster for coordinate weights computed on the fly (default: 1 up to
            2^24 voxels, more above). Memory: 8 bytes per cluster per training member.
        augment: batch augmentation (spec 3.4): "none", "vc" (perturb x, keep v), "vp_s" (perturb x,
            interpolate v), "vp_c" (perturb c, IDW of the nearest training members), "vp_sc" (both).
        sigma_x: std of the coordinate noise in [-1, 1] units; a number or one per coordinate column (column 0 =
            last array axis); default 0.6 * tau_x.
        tau_x: clip bound of the coordinate noise (number or per column); required by vc, vp_s, vp_sc. About a
            quarter of the grid spacing 2 / (n - 1) is safe.
        sigma_c: std of the condition noise in [0, 1] units (number or per parameter); default 0.6 * tau_c.
        tau_c: clip bound of the condition noise (number or per parameter); required by vp_c, vp_sc.
        vp_k: nearest training conditions combined by IDW in vp_c / vp_sc.
        vp_power: IDW power: weights 1 / d^power (2 as the reference code, 1 as the paper's Eq. 7).
        storage: "memory" (the normalized training fields in RAM as float32) or "mmap" (member files
            memory-mapped, only the sampled values read; for .npy, raw and contiguous HDF5). Both give
            identical batches. With mmap and downsample > 1 each training value is interpolated from 2^d stored
            values on every read (vp_s / vp_sc then read 4^d per point: slow; prefer memory there).
        downsample: integer factor of the spatio-conditional task (1 = off; 2 = the reference's
            dim_scale_factor 0.5): training batches come from fields resampled (multilinear, align_corners) to
            (n - 1) // downsample + 1 vertices per axis; full_field still gives full resolution.
        seed: batch seed: batch = f(seed, step, rank).
    """

    config_rules = dict(importance=one_of(*IMPORTANCE_MODES), storage=one_of(*STORAGE_MODES),
                        augment=one_of(*AUGMENT_MODES))
    """Range rules of the config keys (checked when a config is loaded)."""

    @staticmethod
    def config_spatial_dims(section: Dict) -> Optional[int]:
        """Spatial axes of the data as the dataset section alone tells them (``dims``), else None (read with the
        data); util.config.schema.check_spatial_axes checks per-axis model keys against it at config load."""
        dims = section.get("dims")
        return len(dims) if isinstance(dims, (list, tuple)) and len(dims) in (2, 3) else None

    def __init__(self, data_dir: str, cond_path: str, cond_split_path: str, dims: Optional[Sequence[int]] = None,
                 h5_key: str = "data", file_ext: Optional[str] = None, file_pattern: Optional[str] = None,
                 log_transform: bool = False, value_min: Optional[float] = None, value_max: Optional[float] = None,
                 cond_batch: int = 16, spatial_log2batch: int = 12, importance: str = "none",
                 impsmp_cond_path: Optional[str] = None, impsmp_coord_path: Optional[str] = None, impsmp_bins: int = 64,
                 impsmp_cluster_size: Optional[int] = None, augment: str = "none",
                 sigma_x: Union[None, float, Sequence[float]] = None, tau_x: Union[None, float, Sequence[float]] = None,
                 sigma_c: Union[None, float, Sequence[float]] = None, tau_c: Union[None, float, Sequence[float]] = None,
                 vp_k: int = 8, vp_power: float = 2.0, storage: str = "memory", downsample: int = 1, seed: int = 0):
        self._check_options(importance, storage, augment, downsample, cond_batch, spatial_log2batch, impsmp_bins,
                            impsmp_cluster_size, seed, value_min, value_max, dims)
        self.data_dir, self.cond_path, self.cond_split_path = data_dir, cond_path, cond_split_path
        self.dims = None if dims is None else [int(d) for d in dims]
        self.h5_key, self.log_transform = str(h5_key), bool(log_transform)
        self.cond_batch, self.spatial_log2batch = int(cond_batch), int(spatial_log2batch)
        self.importance, self.storage, self.downsample, self.seed = importance, storage, int(downsample), int(seed)
        self.impsmp_bins = int(impsmp_bins)
        self.impsmp_cluster_size = None if impsmp_cluster_size is None else int(impsmp_cluster_size)

        self._load_layout(file_ext, file_pattern)

        # Shapes, option checks and every member file's header first (cheap), then the value range and the
        # storage (read the training members).
        first = self._open_row(int(self.train_idx[0]), header_only=True)
        self.spatial_shape = tuple(int(s) for s in first.shape)
        del first
        if len(self.spatial_shape) not in (2, 3):
            raise DataError(f"{self._name(self.train_idx[0])}: fields must be 2D (H, W) or 3D (D, H, W), got shape "
                            f"{list(self.spatial_shape)}")
        self._check_member_files()
        self.train_shape = downsampled_shape(self.spatial_shape, self.downsample)
        if self.downsample > 1 and min(self.train_shape) < 2:
            raise ConfigError(f"dataset.downsample={self.downsample} leaves fewer than 2 vertices on an axis of "
                              f"{list(self.spatial_shape)} (training shape {list(self.train_shape)})")
        self._aug = make_augmentation(augment, self.spatial_dims, self.cond_dim, sigma_x, tau_x, sigma_c, tau_c,
                                      vp_k, vp_power, key_prefix="dataset.")
        for key, val, used in (("sigma_x", sigma_x, self._aug.perturbs_x), ("tau_x", tau_x, self._aug.perturbs_x),
                               ("sigma_c", sigma_c, self._aug.perturbs_c), ("tau_c", tau_c, self._aug.perturbs_c)):
            if val is not None and not used:
                log.warning("dataset.%s is set but augment='%s' does not use it", key, augment)

        if value_min is None:
            value_min, value_max = self._scan_value_range()
        self.value_min, self.value_max = _as_float(value_min, "value_min"), _as_float(value_max, "value_max")
        if not self.value_max > self.value_min:
            raise DataError(f"the training members in '{self.data_dir}' have a constant value {self.value_min:g}"
                            f"{' (log units)' if self.log_transform else ''}: min-max normalization needs "
                            f"value_max > value_min")
        self._span = self.value_max - self.value_min
        self._handles: Optional[List[np.ndarray]] = None  # storage "mmap": one array per training member
        self._store: Optional[np.ndarray] = None  # storage "memory": (n_train, prod(train_shape)) float32
        if storage == "mmap":
            self._handles = [self._open_row(int(r)) for r in self.train_idx]
            for r, h in zip(self.train_idx, self._handles):
                self._check_shape(int(r), h)
            held = [self._name(int(r)) for r, h in zip(self.train_idx, self._handles) if not isinstance(h, np.memmap)]
            if held:
                log.warning("storage 'mmap': %d member files cannot be memory-mapped (chunked/compressed HDF5, "
                            "NetCDF-3; e.g. %s) and are held in memory", len(held), held[0])
        else:
            self._store = np.empty((len(self.train_idx), self.n_train_voxels), dtype=np.float32)
            for pos, row in enumerate(self.train_idx):
                self._store[pos] = self._resampled_values(int(row))

        self._train_conds = self._params[self.train_idx].astype(np.float64)
        self._setup_importance(impsmp_cond_path, impsmp_coord_path)
        log.info("ensemble %s: %d train + %d test members, fields %s (training %s), %d parameters, values [%g, %g]%s, "
                 "storage %s, importance %s, augment %s", data_dir, len(self.train_idx), len(self.test_idx),
                 list(self.spatial_shape), list(self.train_shape), self.cond_dim, self.value_min, self.value_max,
                 " (log)" if self.log_transform else "", storage, importance, augment)

    # ------------------------------------------------------------------------------------- validation
    @staticmethod
    def _check_options(importance, storage, augment, downsample, cond_batch, spatial_log2batch, bins, cluster_size,
                       seed, value_min, value_max, dims) -> None:
        for key, val, allowed in (("importance", importance, IMPORTANCE_MODES), ("storage", storage, STORAGE_MODES),
                                  ("augment", augment, AUGMENT_MODES)):
            if val not in allowed:
                raise ConfigError(f"dataset.{key} must be one of {', '.join(allowed)}; got {val!r}")
        if not _is_int(downsample) or downsample < 1:
            raise ConfigError(f"dataset.downsample must be an integer factor >= 1 (2 = the reference's "
                              f"dim_scale_factor 0.5), got {downsample!r}")
        for key, val, lo, hi in (("cond_batch", cond_batch, 1, None), ("spatial_log2batch", spatial_log2batch, 0, 30),
                                 ("impsmp_bins", bins, 1, None), ("seed", seed, 0, None)):
            if not _is_int(val) or val < lo or (hi is not None and val > hi):
                raise ConfigError(f"dataset.{key} must be an integer >= {lo}{f' and <= {hi}' if hi else ''}, "
                                  f"got {val!r}")
        if cluster_size is not None and (not _is_int(cluster_size) or cluster_size < 1):
            raise ConfigError(f"dataset.impsmp_cluster_size must be an integer >= 1 or null, got {cluster_size!r}")
        if (value_min is None) != (value_max is None):
            raise ConfigError("dataset.value_min and dataset.value_max: give both or neither")
        if value_min is not None:
            value_min, value_max = _as_float(value_min, "value_min"), _as_float(value_max, "value_max")
            if not value_max > value_min:
                raise ConfigError(f"dataset.value_max ({value_max}) must be > dataset.value_min ({value_min})")
        if dims is not None:
            if (isinstance(dims, (str, bytes)) or not hasattr(dims, "__len__") or len(dims) not in (2, 3)
                    or not all(_is_int(d) and d >= 1 for d in dims)):
                raise ConfigError(f"dataset.dims must be the array shape, a list of 2 or 3 positive integers "
                                  f"([D, H, W] or [H, W]), got {dims!r}")

    def _load_layout(self, file_ext: Optional[str], file_pattern: Optional[str],
                     extra_paths: Sequence[tuple] = ()) -> None:
        """The on-disk layout: paths exist, member listing, cond.npy, listing vs cond.npy, split.npy.

        ``extra_paths``: further (key, file path) pairs that must exist (checked after data_dir)."""
        for key, val in (("file_ext", file_ext), ("file_pattern", file_pattern)):
            if val is not None and not (isinstance(val, str) and val.strip()):
                raise ConfigError(f"dataset.{key} must be a non-empty string or null, got {val!r}")
        paths = ((("data_dir", self.data_dir),) + tuple(extra_paths)
                 + (("cond_path", self.cond_path), ("cond_split_path", self.cond_split_path)))
        for key, path in paths:
            if not isinstance(path, (str, os.PathLike)):
                raise ConfigError(f"dataset.{key} must be a path, got {path!r}")
            exists = os.path.isdir(path) if key == "data_dir" else os.path.isfile(path)
            if not exists:
                raise FileNotFoundError(f"dataset.{key} '{path}' not found (expected "
                                        f"{'a folder of member files' if key == 'data_dir' else 'a .npy file'})")
        from datasets.prepare import list_member_files  # on use, for the reason given in _importance()

        try:
            names = list_member_files(self.data_dir, file_ext, file_pattern)
        except DataError as e:  # the message speaks of prepare's flags
            raise DataError(str(e).replace("--file_ext", "dataset.file_ext (or dataset.file_pattern)")) from e
        self.files: List[str] = [os.path.join(self.data_dir, n) for n in names]
        self._load_cond()
        self._check_listing(file_ext, file_pattern)
        self._load_split()

    def _check_listing(self, file_ext: Optional[str], file_pattern: Optional[str]) -> None:
        """Member listing vs cond.npy: refuse more files than rows (an extra file shifts every member after it);
        warn when the listing and the files cond.npy references differ in number."""
        names = [os.path.basename(f) for f in self.files]
        n_files, n_rows = len(names), self.num_rows
        ref = np.unique(self._file_of_row)
        unref = [names[i] for i in np.setdiff1d(np.arange(n_files), ref)]
        selected = " and ".join(f"dataset.{k}={v!r}" for k, v in (("file_ext", file_ext),
                                                                   ("file_pattern", file_pattern)) if v)
        listing = f"data_dir '{self.data_dir}' lists {n_files} member files" + (f" ({selected})" if selected else "")
        if n_files > n_rows:
            odd, pattern = _odd_names(names)
            hint = ""
            if odd:
                n_match = sum(fnmatch.fnmatchcase(n, pattern) for n in names)
                hint = (f" Names unlike the others: {_few(odd)}; dataset.file_pattern: '{pattern}' would select "
                        f"{n_match} files.")
            raise DataError(
                f"{listing} but cond_path '{self.cond_path}' has {n_rows} rows: column 0 of cond.npy pairs each row "
                f"with a file by its index in the sorted listing, so an extra file shifts every member after it. "
                f"Files no row references: {_few(unref)}.{hint} Remove the files that are not members from "
                f"data_dir, or set dataset.file_pattern (a glob on the file names) and/or dataset.file_ext so that "
                f"exactly the member files are listed.")
        if len(ref) != n_files:
            log.warning("%s but cond.npy (%s, %d rows) references %d of them%s; check that row i of cond.npy "
                        "describes file i of the sorted listing", listing, self.cond_path, n_rows, len(ref),
                        f" (not referenced: {_few(unref)})" if unref else " (several rows share a file)")

    def _check_member_files(self) -> None:
        """Every member file of the split (test members too) opened cheaply (header, shape, dtype, size; no values
        read), so a truncated or garbage file fails at construction, not at test time; the values of the test
        members are also scanned for NaN/Inf (and log positivity) when they are at most ``TEST_SCAN_BYTES``."""
        rows = np.unique(np.concatenate([self.train_idx, self.test_idx]))
        test_only = set(np.setdiff1d(self.test_idx, self.train_idx).tolist())
        test_bytes = 0
        for row in rows:
            arr = self._open_row(int(row), header_only=True)
            self._check_shape(int(row), arr)
            if int(row) in test_only:
                test_bytes += int(arr.size) * arr.dtype.itemsize
            del arr
        if not test_only:
            return
        if test_bytes > TEST_SCAN_BYTES:
            log.info("test members: %d files (%.1f GB) checked by header and size; their values are checked "
                     "when they are read", len(test_only), test_bytes / 1e9)
            return
        for row in sorted(test_only):
            for slab in _slabs(self._open_row(row)):
                self._transform(slab, row)

    def _load_cond(self) -> None:
        where = f"dataset.cond_path '{self.cond_path}'"
        try:
            cond = np.load(self.cond_path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{where}: cannot read it as a numeric .npy ({type(e).__name__}: {e})") from e
        if (not isinstance(cond, np.ndarray) or cond.ndim != 2 or cond.shape[1] < 2 or cond.shape[0] < 1
                or cond.dtype.kind not in "fiu"):
            got = f"{cond.dtype} {list(cond.shape)}" if isinstance(cond, np.ndarray) else type(cond).__name__
            raise DataError(f"{where}: expected a numeric array (M, 1 + d_c) with d_c >= 1 (column 0 = file index), "
                            f"got {got}")
        cond = cond.astype(np.float64)
        if not np.isfinite(cond).all():
            r = int(np.argwhere(~np.isfinite(cond))[0, 0])
            raise DataError(f"{where}: row {r} holds NaN/Inf")
        col0 = cond[:, 0]
        n_files = len(self.files)
        bad = np.flatnonzero((col0 != np.round(col0)) | (col0 < 0) | (col0 >= n_files))
        if bad.size:
            r = int(bad[0])
            first, last = os.path.basename(self.files[0]), os.path.basename(self.files[-1])
            raise DataError(f"{where}: row {r} column 0 is {col0[r]:g}, but it must be the index of a member file in "
                            f"the sorted listing of '{self.data_dir}' (0..{n_files - 1}: {n_files} files, {first} .. "
                            f"{last}; cond.npy has {len(col0)} rows); is a member file missing?")
        self._file_of_row = col0.astype(np.int64)
        self._params = cond[:, 1:].astype(np.float32)  # (M, d_c)
        if (self._params < 0).any() or (self._params > 1).any():
            log.warning("%s: some parameters lie outside [0, 1] (expected min-max normalized conditions)",
                        self.cond_path)

    SPLIT_KEYS = ("cond_idx", "cond_idx_unseen")

    def _load_split(self) -> None:
        where = f"dataset.cond_split_path '{self.cond_split_path}'"
        expected = "np.save of a dict {'cond_idx': training rows of cond.npy, 'cond_idx_unseen': test rows}"
        try:
            obj = np.load(self.cond_split_path, allow_pickle=True)
            split = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0 else obj
        except Exception as e:
            raise DataError(f"{where}: cannot read it ({type(e).__name__}: {e}); expected {expected}") from e
        if not isinstance(split, dict):
            got = f"an array {obj.dtype} {list(obj.shape)}" if isinstance(obj, np.ndarray) else type(split).__name__
            raise DataError(f"{where}: got {got}; expected {expected}")
        found = [str(k) for k in split]
        unknown = [k for k in found if k not in self.SPLIT_KEYS]
        missing = [k for k in self.SPLIT_KEYS if k not in split]
        if unknown or missing:
            raise DataError(f"{where}: keys {found} found, expected exactly {list(self.SPLIT_KEYS)} ('cond_idx': "
                            f"training rows, 'cond_idx_unseen': test rows, possibly empty)"
                            + (f"; unknown: {unknown}" if unknown else "")
                            + (f"; missing: {missing}" if missing else ""))
        m = self.num_rows
        rows = {}
        for key in self.SPLIT_KEYS:
            val = split[key]
            if hasattr(val, "detach"):  # a torch tensor
                val = val.detach().cpu().numpy()
            _refuse_bool_rows(val, key, where, m)
            try:
                r = np.asarray(val, dtype=np.float64).ravel()
            except (TypeError, ValueError) as e:
                raise DataError(f"{where}: '{key}' must hold row numbers of cond.npy, got {type(val).__name__} "
                                f"({e})") from e
            if r.size and (not np.isfinite(r).all() or (r != np.round(r)).any() or r.min() < 0 or r.max() >= m):
                frac = np.flatnonzero(~np.isfinite(r) | (r != np.round(r)))
                out = np.flatnonzero(np.isfinite(r) & ((r < 0) | (r >= m)))
                what = "; ".join(
                    f"{label}: " + ", ".join(f"{r[i]:g} (entry {i})" for i in idx[:5])
                    + (f" and {idx.size - 5} more" if idx.size > 5 else "")
                    for label, idx in (("not whole row numbers", frac), ("outside 0..%d" % (m - 1), out)) if idx.size)
                raise DataError(f"{where}: '{key}' must hold row numbers of cond.npy (0..{m - 1}), got values "
                                f"from {r.min():g} to {r.max():g}; {what}")
            rows[key] = r.astype(np.int64)
            uniq, counts = np.unique(rows[key], return_counts=True)
            if (counts > 1).any():
                rep = uniq[counts > 1]
                listed = ", ".join(f"{int(u)} ({int(c)} times)" for u, c in zip(rep[:5], counts[counts > 1][:5]))
                raise DataError(f"{where}: '{key}' lists rows more than once: {listed}"
                                + (f" and {rep.size - 5} more" if rep.size > 5 else "")
                                + "; each member must appear once (a repeated row would be "
                                + ("drawn more often than the others in training" if key == "cond_idx"
                                   else "scored more than once") + ")")
        if rows["cond_idx"].size == 0:
            raise DataError(f"{where}: 'cond_idx' (the training rows) is empty")
        if np.intersect1d(rows["cond_idx"], rows["cond_idx_unseen"]).size:
            log.warning("%s: some rows are both training and test members", self.cond_split_path)
        self.train_idx, self.test_idx = rows["cond_idx"], rows["cond_idx_unseen"]
        self._pos_of_row: Dict[int, int] = {}
        for pos, r in enumerate(self.train_idx):
            self._pos_of_row.setdefault(int(r), pos)

    # ------------------------------------------------------------------------------------ reading values
    def _name(self, row: int) -> str:
        return os.path.basename(self.files[self._file_of_row[row]])

    def _open_row(self, row: int, mmap: bool = True, header_only: bool = False) -> np.ndarray:
        return open_member(self.files[self._file_of_row[row]], self.dims, self.h5_key, mmap=mmap,
                           header_only=header_only)

    def _check_shape(self, row: int, arr: np.ndarray) -> None:
        if tuple(arr.shape) != self.spatial_shape:
            raise DataError(f"{self._name(row)} has shape {list(arr.shape)} but the first training member "
                            f"{self._name(self.train_idx[0])} has {list(self.spatial_shape)}; all members must have "
                            f"the same shape")

    def _scan_value_range(self) -> tuple:
        """Streaming min/max (in f units) over the training members, one memory-mapped member at a time; checks
        shapes, finiteness and log positivity."""
        lo, hi = math.inf, -math.inf
        for row in self.train_idx:
            arr = self._open_row(int(row))
            self._check_shape(int(row), arr)
            for slab in _slabs(arr):
                v = self._transform(slab, int(row))
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        return lo, hi

    def _transform(self, raw: np.ndarray, row: int) -> np.ndarray:
        """float64 f(raw) (log when log_transform); errors name the file for NaN/Inf or non-positive log input."""
        v = np.asarray(raw, dtype=np.float64)
        finite = np.isfinite(v)
        if not finite.all():
            raise DataError(f"{self._name(row)}: {int(np.isnan(v).sum())} NaN and {int(np.isinf(v).sum())} Inf "
                            f"values among {v.size} read; member fields must be finite")
        if self.log_transform:
            if (v <= 0).any():
                raise DataError(f"{self._name(row)}: log_transform needs values > 0, found {float(v.min()):g}")
            v = np.log(v)
        return v

    def _normalize_raw(self, raw: np.ndarray, row: int) -> np.ndarray:
        """float32 normalized values of stored values ``raw`` of cond row ``row``."""
        return ((self._transform(raw, row) - self.value_min) / self._span).astype(np.float32)

    def _full_getter(self, row: int, arr: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda flat: self._normalize_raw(_gather_raw(arr, flat), row)

    def _coarse_values(self, full_get: Callable[[np.ndarray], np.ndarray], flat: np.ndarray) -> np.ndarray:
        """float32 values of the downsampled field at its flat vertex indices ``flat``, interpolated from the
        full-resolution field read through ``full_get``."""
        idx = np.stack(np.unravel_index(flat, self.train_shape), axis=-1).astype(np.float64)
        n = np.asarray(self.spatial_shape, dtype=np.float64)
        m = np.asarray(self.train_shape, dtype=np.float64)
        frac = idx * (n - 1.0) / (m - 1.0)  # exact for integer ratios
        return interp_gather_index(full_get, frac, self.spatial_shape).astype(np.float32)

    def _resampled_values(self, row: int) -> np.ndarray:
        """float32 (prod(train_shape),) normalized values of cond row ``row`` at training resolution."""
        arr = self._open_row(row)
        self._check_shape(row, arr)
        full = self._normalize_raw(np.ravel(np.asarray(arr)), row)
        if self.downsample == 1:
            return full
        out = np.empty(self.n_train_voxels, dtype=np.float32)
        get = full.__getitem__
        per = max(1, _CHUNK >> self.spatial_dims)
        for s in range(0, out.size, per):
            out[s:s + per] = self._coarse_values(get, np.arange(s, min(s + per, out.size)))
        return out

    def _member_values(self, pos: int, flat: np.ndarray) -> np.ndarray:
        """float32 normalized training-resolution values of training member ``pos`` at flat indices ``flat``."""
        if self._store is not None:
            return self._store[pos, flat]
        row = int(self.train_idx[pos])
        get = self._full_getter(row, self._handles[pos])
        return get(flat) if self.downsample == 1 else self._coarse_values(get, flat)

    # ---------------------------------------------------------------------------------------- importance
    def _setup_importance(self, cond_path: Optional[str], coord_path: Optional[str]) -> None:
        imp = _importance()
        use_coord = self.importance in ("coord", "both")
        use_member = self.importance in ("member", "both")
        if coord_path is not None and not use_coord:
            log.warning("dataset.impsmp_coord_path is set but importance='%s' does not use it", self.importance)
        if cond_path is not None and not use_member:
            log.warning("dataset.impsmp_cond_path is set but importance='%s' does not use it", self.importance)
        self._coord_samplers: Optional[list] = None  # one importance.CoordSampler per training member
        self._member_cdf: Optional[np.ndarray] = None
        if use_coord and coord_path is not None:
            files = imp.load_coord_folder(coord_path, self.num_rows)
            self._coord_samplers = [self._load_coord_sampler(files[int(r)]) for r in self.train_idx]
        if use_member and cond_path is not None:
            self._member_cdf = np.cumsum(imp.load_cond_weights(cond_path, self.train_idx, self.num_rows))
        need_coord = use_coord and self._coord_samplers is None
        need_member = use_member and self._member_cdf is None
        if not (need_coord or need_member):
            return
        samplers, member_w = [], np.zeros(len(self.train_idx))
        for pos in range(len(self.train_idx)):
            values = self._store[pos] if self._store is not None else self.train_values(int(self.train_idx[pos]))
            if need_coord:
                w, cs, member_w[pos] = imp.field_importance(values, self.impsmp_bins, self.impsmp_cluster_size)
                samplers.append(imp.CoordSampler(w, cs, values.size))
            else:
                member_w[pos] = imp.member_weight(values, self.impsmp_bins)
        if need_coord:
            self._coord_samplers = samplers
        if need_member:
            self._member_cdf = np.cumsum(member_w / member_w.sum())

    def _load_coord_sampler(self, path: str):
        imp = _importance()
        d = imp.load_coord_file(path)
        if "shape" in d and tuple(int(s) for s in d["shape"]) != self.train_shape:
            raise DataError(f"importance file '{path}' was computed for fields of shape {list(d['shape'])}, the "
                            f"training fields have shape {list(self.train_shape)}")
        if self.impsmp_cluster_size is not None and d["point_cluster_size"] != self.impsmp_cluster_size:
            log.warning("%s: cluster size %d (file) differs from dataset.impsmp_cluster_size %d; using the file's",
                        path, d["point_cluster_size"], self.impsmp_cluster_size)
        try:
            return imp.CoordSampler(d["point_imp"], d["point_cluster_size"], self.n_train_voxels)
        except ValueError as e:
            raise DataError(f"importance file '{path}': {e} (training shape {list(self.train_shape)})") from e

    # -------------------------------------------------------------------------------------------- shapes
    @property
    def spatial_dims(self) -> int:
        """d: 2 or 3."""
        return len(self.spatial_shape)

    @property
    def cond_dim(self) -> int:
        """d_c: number of condition parameters."""
        return int(self._params.shape[1])

    @property
    def num_rows(self) -> int:
        """M: rows of cond.npy (train + test members)."""
        return int(self._params.shape[0])

    @property
    def n_train_voxels(self) -> int:
        """Vertices of a training-resolution field: prod(train_shape)."""
        return int(np.prod(self.train_shape))

    @property
    def spatial_batch(self) -> int:
        """N_x = 2 ** spatial_log2batch."""
        return 1 << self.spatial_log2batch

    @property
    def steps_per_epoch(self) -> int:
        """Spec 3.2: ceil(n_train * voxels per member at training resolution / N_x / N_c), at least 1."""
        return max(1, -(-len(self.train_idx) * self.n_train_voxels // (self.spatial_batch * self.cond_batch)))

    # --------------------------------------------------------------------------------------------- access
    def _check_row(self, row) -> int:
        r = int(row)
        if r != row or not 0 <= r < self.num_rows:
            raise IndexError(f"cond row {row!r} out of range (0..{self.num_rows - 1})")
        return r

    def conds(self, rows: Union[Sequence[int], np.ndarray, torch.Tensor]) -> torch.Tensor:
        """Normalized conditions of cond rows: float32 tensor (n, d_c)."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).ravel()
        for r in rows:
            self._check_row(r)
        return torch.from_numpy(self._params[rows].copy())

    def train_values(self, row: int) -> np.ndarray:
        """float32 (prod(train_shape),) normalized values of any cond row at training resolution, flat C order."""
        row = self._check_row(row)
        pos = self._pos_of_row.get(row)
        if self._store is not None and pos is not None:
            return self._store[pos].copy()
        return self._resampled_values(row)

    def full_field(self, row: int) -> torch.Tensor:
        """Normalized field of cond row ``row`` at full resolution: float32 tensor of ``spatial_shape``."""
        row = self._check_row(row)
        arr = self._open_row(row)
        self._check_shape(row, arr)
        return torch.from_numpy(self._normalize_raw(np.ravel(np.asarray(arr)), row).reshape(self.spatial_shape))

    def train_field(self, row: int) -> torch.Tensor:
        """Normalized field of cond row ``row`` at training resolution: float32 tensor of ``train_shape`` (the
        values training batches sample; equals ``full_field`` when downsample = 1)."""
        return torch.from_numpy(self.train_values(row).reshape(self.train_shape))

    def normalize_values(self, v: ArrayLike) -> ArrayLike:
        """Data units -> normalized: (f(v) - value_min) / (value_max - value_min), f = log with log_transform.
        numpy in -> numpy out (float32 stays float32, else float64); torch in -> torch out (same float dtype)."""
        if isinstance(v, torch.Tensor):
            t = v.double()
            t = torch.log(t) if self.log_transform else t
            out = (t - self.value_min) / self._span
            return out.to(v.dtype if v.is_floating_point() else torch.float32)
        a = np.asarray(v)
        t = np.asarray(a, dtype=np.float64)
        t = np.log(t) if self.log_transform else t
        out = (t - self.value_min) / self._span
        return out.astype(np.float32) if a.dtype == np.float32 else out

    def denormalize_values(self, v: ArrayLike) -> ArrayLike:
        """Normalized -> data units (inverse of ``normalize_values``); same type conventions."""
        if isinstance(v, torch.Tensor):
            t = v.double() * self._span + self.value_min
            t = torch.exp(t) if self.log_transform else t
            return t.to(v.dtype if v.is_floating_point() else torch.float32)
        a = np.asarray(v)
        t = np.asarray(a, dtype=np.float64) * self._span + self.value_min
        t = np.exp(t) if self.log_transform else t
        return t.astype(np.float32) if a.dtype == np.float32 else t

    @property
    def train_value_mean(self) -> float:
        """Mean of the normalized training values (training resolution, every training member); computed once.

        Used by ``model.init_output_mean: auto`` to start a model's output at the data mean."""
        if getattr(self, "_train_mean", None) is None:
            if self._store is not None:
                self._train_mean = float(self._store.mean(dtype=np.float64))
            else:
                total, count = 0.0, 0
                for pos in range(len(self.train_idx)):
                    for s in range(0, self.n_train_voxels, _CHUNK):
                        vals = self._member_values(pos, np.arange(s, min(s + _CHUNK, self.n_train_voxels)))
                        total += float(vals.sum(dtype=np.float64))
                        count += vals.size
                self._train_mean = total / max(count, 1)
        return self._train_mean

    def meta(self) -> dict:
        """JSON-serializable facts needed to use a trained model: value_min, value_max, log_transform,
        spatial_shape, train_shape, downsample, cond_dim, n_train, n_test, and param_names / param_min /
        param_max when a ``cond_meta.json`` ({"names", "min", "max"}) sits next to cond_path."""
        out = {"value_min": self.value_min, "value_max": self.value_max, "log_transform": self.log_transform,
               "spatial_shape": list(self.spatial_shape), "train_shape": list(self.train_shape),
               "downsample": self.downsample, "cond_dim": self.cond_dim, "n_train": int(len(self.train_idx)),
               "n_test": int(len(self.test_idx)),
               "train_value_mean": self.train_value_mean}
        path = os.path.join(os.path.dirname(os.path.abspath(self.cond_path)), "cond_meta.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    cm = json.load(f)
                names, lo, hi = list(cm["names"]), [float(v) for v in cm["min"]], [float(v) for v in cm["max"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"'{path}': expected JSON {{\"names\": [...], \"min\": [...], \"max\": [...]}} "
                                f"({type(e).__name__}: {e})") from e
            if not len(names) == len(lo) == len(hi) == self.cond_dim:
                raise DataError(f"'{path}': names/min/max must each hold {self.cond_dim} entries (cond_dim), got "
                                f"{len(names)}/{len(lo)}/{len(hi)}")
            out.update(param_names=[str(n) for n in names], param_min=lo, param_max=hi)
        return out

    # -------------------------------------------------------------------------------------------- batches
    def sample_batch(self, step: int, rank: int = 0) -> Dict[str, torch.Tensor]:
        """The training batch of (seed, step, rank).

        Returns:
            dict with ``x`` float32 (N_c, N_x, d) coordinates in [-1, 1] (column 0 = last array axis),
            ``c`` float32 (N_c, d_c) conditions, ``v`` float32 (N_c, N_x, 1) normalized values and ``member``
            int64 (N_c,) the cond rows of the drawn members.
        """
        if not (_is_int(step) and step >= 0 and _is_int(rank) and rank >= 0):
            raise ValueError(f"step and rank must be integers >= 0, got step={step!r}, rank={rank!r}")
        rng = np.random.default_rng([self.seed, int(step), int(rank)])
        n_c, n_x = self.cond_batch, self.spatial_batch
        if self._member_cdf is not None:
            pos = _importance().sample_categorical(rng, self._member_cdf, n_c)
        else:
            pos = rng.integers(0, len(self.train_idx), size=n_c, dtype=np.int64)
        if self._coord_samplers is not None:
            flat = np.stack([self._coord_samplers[p].sample(rng, n_x) for p in pos])
        else:
            flat = rng.integers(0, self.n_train_voxels, size=(n_c, n_x), dtype=np.int64)
        x = self._coords_of(flat)
        v = np.stack([self._member_values(int(p), flat[b]) for b, p in enumerate(pos)])
        c = self._train_conds[pos]
        x, c, v = apply_augmentation(self._aug, rng, x, c, v, flat, pos, self._member_values, self.train_shape,
                                     self._train_conds)
        return {"x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                "c": torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)),
                "v": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)[..., None]),
                "member": torch.from_numpy(self.train_idx[pos].astype(np.int64))}

    def _coords_of(self, flat: np.ndarray) -> np.ndarray:
        """Coordinates (..., d) of flat voxel indices (...) of the training grid."""
        return index_to_coords(np.stack(np.unravel_index(flat, self.train_shape), axis=-1), self.train_shape)

    def __repr__(self) -> str:
        return (f"EnsembleDataset({self.data_dir!r}, train={len(self.train_idx)}, test={len(self.test_idx)}, "
                f"shape={list(self.spatial_shape)}, train_shape={list(self.train_shape)}, cond_dim={self.cond_dim}, "
                f"storage={self.storage!r}, importance={self.importance!r}, augment={self._aug.mode!r})")
