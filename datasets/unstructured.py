"""Ensembles on unstructured meshes (MPAS-Ocean style, spec 3.5): one value per mesh vertex.

On-disk layout: ``data_dir`` with one file per member holding the N vertex values (``.npy`` of shape (N,), raw
float32 ``.raw/.bin/.dat`` of 4 N bytes, or ``.h5/.nc`` with dataset ``h5_key``), sorted lexicographically as
for the gridded ensembles; ``coords_path``: one ``.npy`` (N, 3) with the coordinates of vertex j in row j (the
same for every member); ``cond.npy`` and ``split.npy`` exactly as in ``datasets.ensemble``.

Coordinates (exactly what the model sees, float32 (N, 3) in [-1, 1]):

1. The stored columns (s0, s1, s2) are read as float64.
2. ``coords_spherical: true``: the columns are (depth or radius, lon, lat) with lon/lat in degrees. The triple
   is treated as a 3D Cartesian box (spec 3.5; no conversion to x, y, z, so no grid cells are wasted on the
   empty inside of a shell). The only spherical handling is longitude: lon is taken modulo 360 and rotated so
   that the widest empty longitude gap lies at the box edge, i.e. a mesh that crosses the 180/-180 (or 0/360)
   seam gets one contiguous lon interval. Latitudes outside [-90, 90] are an error.
3. Every column is min-max normalized to [-1, 1] on its own: ``2 (s - min) / (max - min) - 1`` (a constant
   column maps to 0, with a warning).
4. Column order: the stored columns are taken as ARRAY order (like the (D, H, W) index tuple of a grid) and
   reversed to the project convention (column 0 of x = last array axis, docs/design.md), as the reference
   implementation does: ``x = (s2, s1, s0)`` with ``reverse_columns: true`` (default); ``x = (s0, s1, s2)``
   with false. For the spherical layout this gives x = (lat, lon, depth): a model grid of array shape
   (D, H, W) then spans depth along D, lon along H and lat along W.

Values, normalization, conditions, batches (N_c members x N_x vertices drawn by the same (seed, step, rank)
rule), importance sampling (same weights, ``datasets.importance``) and storage ("memory" / "mmap") are those of
``EnsembleDataset``; the vertex index plays the role of the flat voxel index. Differences: ``spatial_shape`` =
``train_shape`` = (N,), ``spatial_dims`` = 3, ``has_grid`` = False (no SSIM, no grid coordinates; evaluation
asks ``eval_coords``), ``downsample`` must be 1, and augmentation is limited to "none", "vc" and "vp_c" (VP-S
and VP-SC interpolate values at perturbed positions, which a mesh does not define). Importance files written
by ``python -m datasets.importance`` for gridded data do not apply; weights are computed on the fly unless
reference-format files (one per cond row, N weights or clusters) are given.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from datasets.augment import make_augmentation
from datasets.ensemble import EnsembleDataset, _as_float, _is_int
from util.config import one_of
from util.errors import DataError
from util.sampling import normalize_vertex_coords  # noqa: F401  (its home is util/sampling.py)
from util.registry import ConfigError, register

__all__ = ["UnstructuredDataset", "UNSTRUCTURED_AUGMENT_MODES", "normalize_vertex_coords"]

log = logging.getLogger(__name__)

UNSTRUCTURED_AUGMENT_MODES = ("none", "vc", "vp_c")


@register("dataset", "unstructured")
class UnstructuredDataset(EnsembleDataset):
    """An ensemble of scalar fields given per vertex of one unstructured mesh (spec 3.5, MPAS-Ocean).

    Args:
        data_dir: folder with one file per member holding its N vertex values (.npy (N,), raw float32
            .raw/.bin/.dat, .h5/.hdf5, .nc), sorted lexicographically.
        coords_path: .npy (N, 3): the coordinates of vertex j in row j, shared by all members.
        cond_path: cond.npy, (M, 1 + d_c): column 0 = index of the member's file in the sorted listing of
            data_dir, columns 1.. = the parameters normalized to [0, 1].
        cond_split_path: split.npy, a pickled dict {'cond_idx': training rows, 'cond_idx_unseen': test rows}.
        coords_spherical: the coordinate columns are (depth or radius, lon, lat), lon/lat in degrees; they are
            treated as a box (no conversion to x, y, z) and the longitudes are unwrapped across the seam.
        reverse_columns: reverse the stored column order to the project's x order (column 0 = last array
            axis), as the reference does: x = (s2, s1, s0); false keeps x = (s0, s1, s2).
        h5_key: dataset (variable) name inside .h5/.hdf5/.nc member files.
        file_ext: only the files of data_dir ending in this extension are members.
        file_pattern: only the files of data_dir whose name matches this glob (e.g. "member_*.npy") are members.
            As for the ensemble dataset, a listing with more files than cond.npy rows is refused (naming the
            extra files) unless file_ext / file_pattern select exactly the member files.
        log_transform: natural log of the values before min-max normalization; values must be > 0.
        value_min: normalization minimum (in log units with log_transform); default: over the training members.
            Give both value_min and value_max or neither.
        value_max: normalization maximum; default: over the training members.
        cond_batch: N_c, members per training batch.
        spatial_log2batch: log2 of N_x, vertices per member per batch.
        importance: "none", "coord" (vertices by value-histogram weights), "member" or "both" (spec 3.3).
        impsmp_cond_path: .npy of member weights (reference format); default: computed when needed.
        impsmp_coord_path: folder of per-member vertex-weight files (reference format, one per cond row);
            default: computed when needed.
        impsmp_bins: histogram bins over [0, 1] for weights computed on the fly.
        impsmp_cluster_size: vertices per cluster for weights computed on the fly (default: 1 up to 2^24).
        augment: "none", "vc" (perturb x, keep v) or "vp_c" (perturb c, IDW of the nearest training members at
            the same vertices). "vp_s" / "vp_sc" are refused: no value interpolation on a mesh.
        sigma_x: std of the coordinate noise in [-1, 1] units (number or 3 values in x column order);
            default 0.6 * tau_x.
        tau_x: clip bound of the coordinate noise; required by vc.
        sigma_c: std of the condition noise in [0, 1] units; default 0.6 * tau_c.
        tau_c: clip bound of the condition noise; required by vp_c.
        vp_k: nearest training conditions combined by IDW in vp_c.
        vp_power: IDW power (weights 1 / d^power).
        storage: "memory" (normalized training fields in RAM) or "mmap" (only the sampled values read).
        downsample: must be 1 (no resampling on a mesh; the spatio-conditional task needs gridded data).
        seed: batch seed: batch = f(seed, step, rank).
    """

    config_rules = dict(EnsembleDataset.config_rules, augment=one_of(*UNSTRUCTURED_AUGMENT_MODES), downsample=one_of(1))
    """Range rules of the config keys (checked when a config is loaded)."""

    def __init__(self, data_dir: str, coords_path: str, cond_path: str, cond_split_path: str,
                 coords_spherical: bool = False, reverse_columns: bool = True, h5_key: str = "data",
                 file_ext: Optional[str] = None, file_pattern: Optional[str] = None, log_transform: bool = False,
                 value_min: Optional[float] = None, value_max: Optional[float] = None, cond_batch: int = 16,
                 spatial_log2batch: int = 12,
                 importance: str = "none", impsmp_cond_path: Optional[str] = None,
                 impsmp_coord_path: Optional[str] = None, impsmp_bins: int = 64,
                 impsmp_cluster_size: Optional[int] = None, augment: str = "none",
                 sigma_x: Union[None, float, Sequence[float]] = None, tau_x: Union[None, float, Sequence[float]] = None,
                 sigma_c: Union[None, float, Sequence[float]] = None, tau_c: Union[None, float, Sequence[float]] = None,
                 vp_k: int = 8, vp_power: float = 2.0, storage: str = "memory", downsample: int = 1, seed: int = 0):
        if augment in ("vp_s", "vp_sc"):
            raise ConfigError(f"dataset.augment='{augment}' interpolates values at perturbed positions, which an "
                              f"unstructured mesh does not define; use one of {', '.join(UNSTRUCTURED_AUGMENT_MODES)}")
        if not (_is_int(downsample) and downsample == 1):
            raise ConfigError(f"dataset.downsample must be 1 for unstructured data (no resampling on a mesh), got "
                              f"{downsample!r}")
        self._check_options(importance, storage, augment, 1, cond_batch, spatial_log2batch, impsmp_bins,
                            impsmp_cluster_size, seed, value_min, value_max, None)
        self.data_dir, self.cond_path, self.cond_split_path = data_dir, cond_path, cond_split_path
        self.coords_path, self.coords_spherical = coords_path, bool(coords_spherical)
        self.h5_key, self.log_transform = str(h5_key), bool(log_transform)
        self.cond_batch, self.spatial_log2batch = int(cond_batch), int(spatial_log2batch)
        self.importance, self.storage, self.downsample, self.seed = importance, storage, 1, int(seed)
        self.impsmp_bins = int(impsmp_bins)
        self.impsmp_cluster_size = None if impsmp_cluster_size is None else int(impsmp_cluster_size)
        self._load_layout(file_ext, file_pattern, extra_paths=(("coords_path", coords_path),))
        try:
            raw = np.load(coords_path, mmap_mode="r", allow_pickle=False)
            if not isinstance(raw, np.ndarray) or raw.dtype.kind not in "fiu":
                raise DataError(f"dataset.coords_path '{coords_path}': expected a numeric (N, 3) array")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"dataset.coords_path '{coords_path}': cannot read it as a numeric .npy (N, 3) "
                            f"({type(e).__name__}: {e})") from e
        self._coords = normalize_vertex_coords(raw, self.coords_spherical, bool(reverse_columns),
                                               os.path.basename(coords_path))
        n = int(self._coords.shape[0])
        self.dims = [n]  # every member file must hold exactly N values (raw files: 4 N bytes)
        self.spatial_shape = self.train_shape = (n,)
        self._check_member_files()  # header / size of every member (test members too), test values when small

        self._aug = make_augmentation(augment, self.spatial_dims, self.cond_dim, sigma_x, tau_x, sigma_c, tau_c,
                                      vp_k, vp_power, key_prefix="dataset.")
        if value_min is None:
            value_min, value_max = self._scan_value_range()
        self.value_min, self.value_max = _as_float(value_min, "value_min"), _as_float(value_max, "value_max")
        if not self.value_max > self.value_min:
            raise DataError(f"the training members in '{data_dir}' have a constant value {self.value_min:g}: "
                            f"min-max normalization needs value_max > value_min")
        self._span = self.value_max - self.value_min
        self._handles: Optional[List[np.ndarray]] = None
        self._store: Optional[np.ndarray] = None
        if storage == "mmap":
            self._handles = [self._open_row(int(r)) for r in self.train_idx]
            for r, h in zip(self.train_idx, self._handles):
                self._check_shape(int(r), h)
        else:
            self._store = np.stack([self._resampled_values(int(r)) for r in self.train_idx])
        self._train_conds = self._params[self.train_idx].astype(np.float64)
        self._setup_importance(impsmp_cond_path, impsmp_coord_path)
        log.info("unstructured ensemble %s: %d train + %d test members, %d vertices, %d parameters, values "
                 "[%g, %g]%s, storage %s, importance %s, augment %s", data_dir, len(self.train_idx),
                 len(self.test_idx), n, self.cond_dim, self.value_min, self.value_max,
                 " (log)" if self.log_transform else "", storage, importance, augment)

    # ------------------------------------------------------------------------------------------ mesh facts
    @property
    def spatial_dims(self) -> int:
        """d = 3: vertices carry 3 coordinates although fields are 1-D arrays (N,)."""
        return 3

    @property
    def has_grid(self) -> bool:
        """False: no regular grid (no SSIM; evaluation uses ``eval_coords``)."""
        return False

    @property
    def n_vertices(self) -> int:
        """N, vertices of the mesh."""
        return int(self._coords.shape[0])

    def eval_coords(self, resolution: str = "full") -> torch.Tensor:
        """float32 (N, 3) coordinates of every vertex in x order, [-1, 1]; the same for "full" and "train"."""
        if resolution not in ("full", "train"):
            raise ValueError(f"resolution must be 'full' or 'train', got {resolution!r}")
        return torch.from_numpy(self._coords)

    def meta(self) -> dict:
        """``EnsembleDataset.meta()`` plus spatial_dims (3: spatial_shape is (N,)), has_grid False and the
        coordinate settings."""
        out = super().meta()
        out.update(spatial_dims=3, has_grid=False, coords_path=os.path.abspath(self.coords_path),
                   coords_spherical=self.coords_spherical)
        return out

    # -------------------------------------------------------------------------------------------- batches
    def _coords_of(self, flat: np.ndarray) -> np.ndarray:
        """Mesh coordinates (..., 3) of vertex indices (...): ``sample_batch`` of ``EnsembleDataset`` then draws
        vertex indices in place of flat voxel indices."""
        return self._coords[flat]

    def __repr__(self) -> str:
        return (f"UnstructuredDataset({self.data_dir!r}, train={len(self.train_idx)}, test={len(self.test_idx)}, "
                f"vertices={self.n_vertices}, cond_dim={self.cond_dim}, storage={self.storage!r}, "
                f"importance={self.importance!r}, augment={self._aug.mode!r})")
