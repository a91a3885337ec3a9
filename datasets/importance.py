"""Value-histogram importance sampling of members and coordinates (spec 3.3, from Explorable-INR).

For one member with normalized values v (at training resolution, flat C order):

- histogram of v with ``bins`` equal bins over [0, 1]; bin of a value = ``clip(floor(v * bins), 0, bins - 1)``
  (values outside [0, 1], e.g. of test members, fall in the edge bins);
- voxel weight = 1 / (count of its bin): every occupied bin gets the same total probability, so rare values
  are drawn as often as common ones;
- coordinates are drawn with replacement in proportion to the voxel weights. For large fields the weights
  are summed over clusters of ``cluster_size`` consecutive flat voxels (default: 1 up to 2^24 voxels, else
  ``ceil(voxels / 2^24)``; the last cluster may be shorter), a cluster is drawn in proportion to its weight
  and a voxel inside it uniformly;
- member weight = sum of its voxel weights (= the number of occupied bins), normalized across the training
  members; members are drawn with replacement in proportion to it (importance "member"/"both").

Draws are inverse-CDF: cumulative sum of the weights, ``searchsorted`` of uniform randoms from a numpy
Generator (equivalent to multinomial sampling with replacement).

Files (the reference implementation's format, so its files load here and ours load there):

- ``impsmp_cond_path``: ``.npy`` float64 (n_train,): member weights of the training members in the order of
  the split's ``cond_idx`` (sum 1). A file of length M (one weight per cond row) is also accepted.
- ``impsmp_coord_path``: a folder with one ``.npy`` per cond row (ALL rows, train and test), file k of the
  lexicographically sorted listing belonging to cond row k; written as ``point_imp_<row, zero-padded>.npy``.
  Each holds ``np.save`` of a pickled dict with ``'point_imp'``: float64 (n_clusters,) cluster weights in
  flat C order (sum 1) and ``'point_cluster_size'``: int; ours also carry ``'shape'`` (the field shape the
  weights belong to), ``'bins'`` and ``'row'`` (checked when present). The reference computes the
  cluster size as ``max(voxels // 2^24, 1)`` and needs it to divide the voxel count; ours is
  ``ceil(voxels / 2^24)`` (identical whenever the reference's works) and allows a shorter last cluster.

CLI::

    python -m datasets.importance --data_dir D --cond_path C --cond_split_path S --out_dir O \\
        [--dims 64 64 64] [--log_transform] [--bins 64] [--cluster_size N]

writes ``O/impsmp_cond.npy`` and ``O/impsmp_coord/``; pass them to the dataset as ``impsmp_cond_path`` and
``impsmp_coord_path`` (with ``importance: coord``, ``member`` or ``both``).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from util.errors import DataError

__all__ = ["DEFAULT_BINS", "MAX_CATEGORIES", "COND_FILE", "COORD_DIR", "default_cluster_size", "bin_index",
           "bin_counts", "voxel_weights", "cluster_weights", "member_weight", "field_importance",
           "sample_categorical", "CoordSampler", "coord_file_name", "save_coord_file", "load_coord_file",
           "load_coord_folder", "load_cond_weights", "write_importance", "main"]

DEFAULT_BINS = 64
#: most categories of one multinomial draw (the reference's torch.multinomial limit)
MAX_CATEGORIES = 1 << 24
COND_FILE = "impsmp_cond.npy"
COORD_DIR = "impsmp_coord"


# ------------------------------------------------------------------------------------------------ weights
def default_cluster_size(n_voxels: int, max_categories: int = MAX_CATEGORIES) -> int:
    """1 for fields of up to ``max_categories`` voxels, else ``ceil(n_voxels / max_categories)``."""
    return max(1, -(-int(n_voxels) // int(max_categories)))


def bin_index(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """int64 bin of each value: ``clip(floor(v * bins), 0, bins - 1)`` (bins over [0, 1])."""
    v = np.asarray(values, dtype=np.float64)
    return np.clip(np.floor(v * bins), 0, bins - 1).astype(np.int64)


def bin_counts(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """int64 (bins,) histogram of ``values`` (flattened) over [0, 1]."""
    return np.bincount(bin_index(np.ravel(values), bins), minlength=bins)


def voxel_weights(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """float64 weight 1 / (count of its bin) per value, same shape as ``values``."""
    idx = bin_index(values, bins)
    counts = np.bincount(idx.ravel(), minlength=bins).astype(np.float64)
    return 1.0 / counts[idx]


def cluster_weights(voxel_w: np.ndarray, cluster_size: int = 1) -> np.ndarray:
    """Sums of consecutive ``cluster_size`` flat weights: float64 (ceil(N / cluster_size),)."""
    w = np.ravel(np.asarray(voxel_w, dtype=np.float64))
    cs = int(cluster_size)
    if cs == 1:
        return w.copy()
    return np.add.reduceat(w, np.arange(0, w.size, cs))


def member_weight(values: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Unnormalized member weight: the sum of the voxel weights (= number of occupied bins)."""
    return float(np.count_nonzero(bin_counts(values, bins)))


def field_importance(values: np.ndarray, bins: int = DEFAULT_BINS,
                     cluster_size: Optional[int] = None) -> Tuple[np.ndarray, int, float]:
    """Everything importance sampling needs from one member's normalized field.

    Args:
        values: the member's normalized values, any shape (flattened in C order).
        bins: histogram bins over [0, 1].
        cluster_size: voxels per cluster; None: ``default_cluster_size``.

    Returns:
        (cluster weights float64 (n_clusters,) normalized to sum 1, cluster size, unnormalized member weight).
    """
    flat = np.ravel(values)
    cs = default_cluster_size(flat.size) if cluster_size is None else int(cluster_size)
    if cs < 1:
        raise ValueError(f"cluster_size must be >= 1, got {cluster_size}")
    vw = voxel_weights(flat, bins)
    cw = cluster_weights(vw, cs)
    return cw / cw.sum(), cs, float(vw.sum())


# ----------------------------------------------------------------------------------------------- sampling
def sample_categorical(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """n draws with replacement from categories with cumulative weights ``cdf`` (float64, non-decreasing,
    last entry > 0): int64 (n,) category indices (zero-weight categories are never drawn)."""
    u = rng.random(int(n)) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


class CoordSampler:
    """Inverse-CDF sampler of flat voxel indices of one member.

    Args:
        weights: float64 (n_clusters,) cluster weights (need not be normalized; all >= 0, sum > 0).
        cluster_size: voxels per cluster.
        n_voxels: voxels of the field (the last cluster holds ``n_voxels - (n_clusters - 1) * cluster_size``).

    Memory: one float64 per cluster (the cumulative sum).
    """

    def __init__(self, weights: np.ndarray, cluster_size: int, n_voxels: int):
        w = np.asarray(weights, dtype=np.float64).ravel()
        self.cluster_size, self.n_voxels = int(cluster_size), int(n_voxels)
        expect = -(-self.n_voxels // self.cluster_size)
        if w.size != expect:
            raise ValueError(f"{w.size} cluster weights, but {self.n_voxels} voxels in clusters of "
                             f"{self.cluster_size} need {expect}")
        if not np.all(np.isfinite(w)) or (w < 0).any() or not w.sum() > 0:
            raise ValueError("cluster weights must be finite, >= 0 and not all 0")
        self.cdf = np.cumsum(w)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """int64 (n,) flat voxel indices (C order), drawn with replacement."""
        k = sample_categorical(rng, self.cdf, n)
        if self.cluster_size == 1:
            return k
        start = k * self.cluster_size
        size = np.minimum(self.cluster_size, self.n_voxels - start)
        return start + np.floor(rng.random(int(n)) * size).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- files
def coord_file_name(row: int, n_rows: int) -> str:
    """``point_imp_<row>.npy``, zero-padded so that the lexicographic order is the row order."""
    width = max(6, len(str(max(int(n_rows) - 1, 0))))
    return f"point_imp_{int(row):0{width}d}.npy"


def save_coord_file(path: str, weights: np.ndarray, cluster_size: int, shape: Sequence[int], bins: int,
                    row: int) -> None:
    """Write one member's coordinate-importance file (reference keys plus shape, bins, row)."""
    np.save(path, {"point_imp": np.asarray(weights, dtype=np.float64), "point_cluster_size": int(cluster_size),
                   "shape": [int(s) for s in shape], "bins": int(bins), "row": int(row)}, allow_pickle=True)


def load_coord_file(path: str) -> Dict[str, object]:
    """One coordinate-importance file -> dict with ``point_imp`` (float64 numpy) and ``point_cluster_size``
    (int), plus ``shape``/``bins``/``row`` when present. Reads reference files (torch tensors inside too)."""
    try:
        obj = np.load(path, allow_pickle=True)
        d = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object else None
    except Exception as e:
        raise DataError(f"importance file '{path}': cannot read it ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or "point_imp" not in d or "point_cluster_size" not in d:
        raise DataError(f"importance file '{path}': expected a pickled dict with keys 'point_imp' and "
                        f"'point_cluster_size' (np.save of a dict)")
    w = d["point_imp"]
    if hasattr(w, "detach"):  # a torch tensor (reference files)
        w = w.detach().cpu().numpy()
    out = dict(d)
    out["point_imp"] = np.asarray(w, dtype=np.float64).ravel()
    out["point_cluster_size"] = int(d["point_cluster_size"])
    return out


def load_coord_folder(folder: str, n_rows: int) -> List[str]:
    """Sorted ``.npy`` files of a coordinate-importance folder; file k belongs to cond row k."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"impsmp_coord_path '{folder}' is not a folder (expected one .npy per cond row)")
    files = sorted(glob.glob(os.path.join(folder, "*.npy")))
    if len(files) != n_rows:
        raise DataError(f"impsmp_coord_path '{folder}' holds {len(files)} .npy files, expected one per cond row "
                        f"({n_rows}; file k of the sorted listing belongs to row k)")
    return files


def load_cond_weights(path: str, train_idx: np.ndarray, n_rows: int) -> np.ndarray:
    """Member weights of the training members (in ``train_idx`` order), normalized to sum 1.

    Args:
        path: ``.npy`` with n_train weights (train order, the reference format) or n_rows weights (one per row).
        train_idx: training rows of cond.npy.
        n_rows: rows of cond.npy.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"impsmp_cond_path '{path}' not found (expected a .npy of member weights)")
    try:
        w = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64).ravel()
    except Exception as e:
        raise DataError(f"impsmp_cond_path '{path}': cannot read it as a numeric .npy of member weights "
                        f"({type(e).__name__}: {e})") from e
    n_train = len(train_idx)
    if w.size == n_train:
        pass
    elif w.size == n_rows:
        w = w[np.asarray(train_idx)]
    else:
        raise DataError(f"impsmp_cond_path '{path}' holds {w.size} weights, expected {n_train} (one per training "
                        f"member, split order) or {n_rows} (one per cond row)")
    if not np.all(np.isfinite(w)) or (w < 0).any() or not w.sum() > 0:
        raise DataError(f"impsmp_cond_path '{path}': weights must be finite, >= 0 and not all 0")
    return w / w.sum()


def write_importance(data_dir: str, cond_path: str, cond_split_path: str, out_dir: str,
                     file_ext: Optional[str] = None, dims: Optional[Sequence[int]] = None, h5_key: str = "data",
                     file_pattern: Optional[str] = None,
                     log_transform: bool = False, bins: int = DEFAULT_BINS, cluster_size: Optional[int] = None,
                     value_min: Optional[float] = None, value_max: Optional[float] = None, downsample: int = 1,
                     progress: bool = True, coords_path: Optional[str] = None) -> Dict[str, str]:
    """Compute and write both importance files for an ensemble in the on-disk layout.

    Values are normalized exactly as ``EnsembleDataset`` does (train-member min/max unless given); the files
    equal the weights the dataset computes on the fly with the same settings.

    Args:
        data_dir, cond_path, cond_split_path, file_ext, file_pattern, dims, h5_key, log_transform, value_min,
            value_max, downsample: as for the ``ensemble`` dataset.
        out_dir: output folder (created); ``impsmp_cond.npy`` and ``impsmp_coord/`` are written into it.
        bins: histogram bins over [0, 1].
        cluster_size: voxels per cluster (None: 1 up to 2^24 voxels, more above).
        progress: tqdm progress bar over members.
        coords_path: the vertex coordinate file of an unstructured (mesh) ensemble (dataset type
            ``unstructured``): members are (N,) vertex values and the weights are per vertex; ``dims`` and
            ``downsample`` do not apply.

    Returns:
        {"impsmp_cond_path": file, "impsmp_coord_path": folder}.
    """
    from tqdm import tqdm

    from datasets.ensemble import EnsembleDataset  # lazy: ensemble imports this module

    common = dict(data_dir=data_dir, cond_path=cond_path, cond_split_path=cond_split_path, h5_key=h5_key,
                  file_ext=file_ext, file_pattern=file_pattern, log_transform=log_transform, value_min=value_min,
                  value_max=value_max, storage="mmap", downsample=downsample, impsmp_bins=bins,
                  impsmp_cluster_size=cluster_size)
    if coords_path is not None:
        from datasets.unstructured import UnstructuredDataset

        if dims:
            raise ValueError("--dims does not apply to a mesh ensemble (members are (N,) vertex values)")
        ds = UnstructuredDataset(coords_path=coords_path, **common)
    else:
        ds = EnsembleDataset(dims=dims, **common)
    os.makedirs(out_dir, exist_ok=True)
    coord_dir = os.path.join(out_dir, COORD_DIR)
    os.makedirs(coord_dir, exist_ok=True)
    for old in glob.glob(os.path.join(coord_dir, "*.npy")):  # stale files would shift the row <-> file order
        os.remove(old)
    n_rows = ds.num_rows
    train_pos = {int(r): i for i, r in enumerate(ds.train_idx)}
    member_w = np.zeros(len(ds.train_idx))
    for row in tqdm(range(n_rows), desc="importance", unit="member", disable=not progress):
        values = ds.train_values(row)
        w, cs, mw = field_importance(values, bins, cluster_size)
        save_coord_file(os.path.join(coord_dir, coord_file_name(row, n_rows)), w, cs, ds.train_shape, bins, row)
        if row in train_pos:
            member_w[train_pos[row]] = mw
    cond_file = os.path.join(out_dir, COND_FILE)
    np.save(cond_file, member_w / member_w.sum())
    return {"impsmp_cond_path": cond_file, "impsmp_coord_path": coord_dir}


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.importance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder with one file per member (sorted lexicographically)")
    p.add_argument("--cond_path", required=True, help="cond.npy: column 0 file index, then normalized parameters")
    p.add_argument("--cond_split_path", required=True,
                   help="split.npy: pickled dict {'cond_idx': train rows, 'cond_idx_unseen': test rows}")
    p.add_argument("--out_dir", required=True, help=f"output folder for {COND_FILE} and {COORD_DIR}/")
    p.add_argument("--dims", type=int, nargs="+", help="array shape of raw float32 member files, array order "
                                                       "(e.g. --dims 64 64 64)")
    p.add_argument("--file_ext", help="only member files with this extension (when data_dir holds other files)")
    p.add_argument("--file_pattern", help="only member files whose name matches this glob (e.g. 'member_*.npy')")
    p.add_argument("--h5_key", default="data", help="dataset/variable name in .h5/.hdf5/.nc members (default data)")
    p.add_argument("--log_transform", action="store_true", help="log the values before min-max normalization")
    p.add_argument("--value_min", type=float, help="normalization minimum (default: over training members)")
    p.add_argument("--value_max", type=float, help="normalization maximum (default: over training members)")
    p.add_argument("--bins", type=int, default=DEFAULT_BINS,
                   help=f"histogram bins over [0, 1] (default {DEFAULT_BINS})")
    p.add_argument("--cluster_size", type=int,
                   help="voxels per cluster (default 1 up to 2^24 voxels, ceil(voxels / 2^24) above)")
    p.add_argument("--downsample", type=int, default=1,
                   help="weights of the x-downsampled training fields (dataset key downsample; default 1 = off)")
    p.add_argument("--coords_path", help="vertex coordinates (N, 3) .npy of a mesh ensemble (dataset type "
                                          "unstructured): weights per vertex")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        out = write_importance(a.data_dir, a.cond_path, a.cond_split_path, a.out_dir, file_ext=a.file_ext,
                               file_pattern=a.file_pattern,
                               dims=a.dims, h5_key=a.h5_key, log_transform=a.log_transform, bins=a.bins,
                               cluster_size=a.cluster_size, value_min=a.value_min, value_max=a.value_max,
                               downsample=a.downsample, progress=not a.no_progress, coords_path=a.coords_path)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    for k, v in out.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    main()
