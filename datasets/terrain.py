"""Terrain tiles (dataset type ``terrain``): DEM heightfields -> square tiles -> per-tile normalized batches.

Spec ``huvr.md`` 1, 3 and 8:

- **Sources** (``path``): one heightfield file, a folder of them (each file is a *region*), or a named source:
  ``demo`` (the generated terrain of :mod:`datasets.terrain_gen`, written on first use under ``demo_root``),
  ``mpl:jacksboro_fault_dem`` / ``mpl:topobathy`` (matplotlib's sample DEMs: real elevation models in
  geographic coordinates, ~92.7 x 74.4 m and ~2.43 x 2.43 km pixels),
  ``skimage:motorcycle_disp`` (scikit-image's stereo disparity map: a measured 2.5-D range field, not an
  elevation model; the only elevation-like real sample that ships with an installed dependency here).
  File formats: ``.npy`` (2-D, or 3-D with one channel), ``.npz`` (the array under ``elevation`` / ``topo`` /
  ``dem`` / ``z`` / ``arr_0`` or the only 2-D array), GeoTIFF ``.tif/.tiff`` (needs ``tifffile``; the pixel
  size is read from ModelPixelScaleTag and the nodata value from GDAL_NODATA when present), raw
  ``.raw/.bin/.dat`` (needs ``raw_shape``, dtype ``raw_dtype``).
- **Pixel size** (metres, per region, rows and columns apart: slope angles need it): ``dataset.gsd`` when set,
  else read from the file (:func:`read_heightfield`): .npz ``latitude`` / ``longitude`` axis arrays (degrees,
  matplotlib's ``topobathy``), ``dx`` / ``dy`` (metres; degrees when the file also holds ``ymin`` / ``ymax``
  and ``dx`` < 0.01, matplotlib's Jacksboro DEM), ``gsd`` / ``pixel_size``; GeoTIFF ModelPixelScaleTag (degrees
  converted when the GeoKey directory says the model is geographic). Degrees become metres on a spherical Earth
  (:func:`geographic_pixel_m`, within ~0.5% of the ellipsoid). Unknown: 1 m, with a warning.
- **Tiling**: non-overlapping ``tile_size`` x ``tile_size`` windows in row-major order from the top-left corner
  (a remainder narrower than a tile is dropped); windows holding NaN / Inf / ``nodata`` are dropped.
- **Splits** (``split_by``): ``region`` (default; regions shuffled with ``split_seed``, the last
  ``test_fraction`` of them test, the ``val_fraction`` before them validation: no spatial overlap or adjacency
  across splits, spec 3), ``tile`` (tiles shuffled; tiles never overlap but neighbours may fall in different
  splits), ``none`` (every tile is a test tile: out-of-domain evaluation sets).
- **Normalization** (spec 3): per tile, zero mean and unit variance, ``t' = (t - mu) / sigma``; mu and sigma
  (metres) are kept to de-normalize; sigma is floored at ``min_sigma`` metres for flat tiles. Data whose every
  tile is constant (a constant DEM, or one all nodata without ``nodata`` set) is refused with a DataError naming
  the height; some constant tiles only give a warning (their PSNR is undefined, see tasks/terrain/task.py).
- **Ground truth derivatives** (spec 3, metrics): central differences of the tile in metres,
  :func:`central_gradient` (m/px) and the 5-point :func:`laplacian_5pt` (m/px^2), on interior pixels.

Batches (``sample_batch(step, rank)``, a function of (seed, step, rank) only): ``tile`` (B, 1, T, T) float32
normalized training tiles drawn with replacement, ``mu`` / ``sigma`` (B,) float32 metres, ``index`` (B,) int64
rows of the training split; ``tile_augment: dihedral`` applies a random rotation by k x 90 degrees and a random
flip per tile (HUVR's augmentation policy is NR in the paper; this is our choice).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from datasets.base import Dataset
from util.errors import DataError
from util.registry import ConfigError, register

__all__ = ["TerrainDataset", "read_heightfield", "cut_tiles", "split_tiles", "central_gradient", "laplacian_5pt",
           "slope_degrees", "slope_angle", "geographic_pixel_m", "pixel_pair", "SPLITS", "SPLIT_MODES", "TERRAIN_AUGMENT_MODES", "NAMED_SOURCES"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("region", "tile", "none")
TERRAIN_AUGMENT_MODES = ("none", "dihedral")
NAMED_SOURCES = ("demo", "mpl:jacksboro_fault_dem", "mpl:topobathy", "skimage:motorcycle_disp")
HEIGHT_EXTS = (".npy", ".npz", ".tif", ".tiff", ".raw", ".bin", ".dat")
_NPZ_KEYS = ("elevation", "topo", "dem", "z", "height", "arr_0")
EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), metres
PixelSize = Tuple[float, float]  # (row spacing, column spacing) in metres


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def pixel_pair(gsd, what: str = "gsd") -> PixelSize:
    """A pixel size as (row, column) metres from a number or a [row, column] pair (ValueError naming ``what``)."""
    vals = list(gsd) if isinstance(gsd, (list, tuple, np.ndarray)) else [gsd]
    if len(vals) == 1:
        vals = vals * 2
    ok = len(vals) == 2 and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                                and math.isfinite(float(v)) and float(v) > 0 for v in vals)
    if not ok:
        raise ValueError(f"{what} must be a number > 0 or a [row, column] pair of them (metres per pixel), "
                         f"got {gsd!r}")
    return float(vals[0]), float(vals[1])


def geographic_pixel_m(d_lat_deg: float, d_lon_deg: float, lat_deg: float) -> PixelSize:
    """(row, column) metres of a pixel d_lat x d_lon degrees wide at latitude ``lat_deg`` (spherical Earth).

    A degree of latitude is R pi / 180 = 111.195 km; a degree of longitude that times cos(latitude). Within
    ~0.5% of the WGS84 ellipsoid, which is below what a slope-angle comparison between methods can notice.
    """
    m = EARTH_RADIUS_M * math.pi / 180.0
    return abs(float(d_lat_deg)) * m, abs(float(d_lon_deg)) * m * math.cos(math.radians(float(lat_deg)))


# ------------------------------------------------------------------------------------------------ reading
def _npz_pixel_m(name: str, npz, shape: Tuple[int, int]) -> Optional[PixelSize]:
    """The pixel size an .npz declares (see the module docstring), or None."""
    f = npz.files
    scalar = lambda k: k in f and np.size(npz[k]) == 1 and float(np.asarray(npz[k]).ravel()[0]) != 0  # noqa: E731
    if "latitude" in f and "longitude" in f:
        lat, lon = np.asarray(npz["latitude"], np.float64), np.asarray(npz["longitude"], np.float64)
        if lat.ndim == 1 and lon.ndim == 1 and (len(lat), len(lon)) == tuple(shape) and min(shape) >= 2:
            return geographic_pixel_m(np.abs(np.diff(lat)).mean(), np.abs(np.diff(lon)).mean(), lat.mean())
    if scalar("dx"):
        dx = abs(float(npz["dx"]))
        dy = abs(float(npz["dy"])) if scalar("dy") else dx
        if dx < 0.01 and scalar("ymin") and scalar("ymax"):
            lat = 0.5 * (float(npz["ymin"]) + float(npz["ymax"]))
            if abs(lat) <= 90.0:
                log.info("%s: dx = %g with ymin / ymax bounds: read as degrees at latitude %.3f", name, dx, lat)
                return geographic_pixel_m(dy, dx, lat)
        return dy, dx
    for k in ("gsd", "pixel_size"):
        if k in f and np.size(npz[k]) in (1, 2):
            try:
                return pixel_pair(np.asarray(npz[k], np.float64).ravel().tolist(), f"{name}: {k}")
            except ValueError as e:
                raise DataError(str(e)) from None
    return None


def _geotiff_geographic(page) -> bool:
    """True when the GeoKey directory declares a geographic model (GTModelTypeGeoKey 1024 = 2)."""
    tag = page.tags.get("GeoKeyDirectoryTag") or page.tags.get(34735)
    if tag is None:
        return False
    v = [int(x) for x in tag.value]
    for i in range(4, len(v) - 3, 4):
        if v[i] == 1024 and v[i + 1] == 0:
            return v[i + 3] == 2
    return False


def _npz_array(path: str, npz) -> np.ndarray:
    name = os.path.basename(path)
    for k in _NPZ_KEYS:
        if k in npz.files and np.ndim(npz[k]) == 2:
            return np.asarray(npz[k])
    two_d = [k for k in npz.files if np.ndim(npz[k]) == 2]
    if len(two_d) == 1:
        return np.asarray(npz[two_d[0]])
    raise DataError(f"{name}: no 2-D heightfield array found (arrays: {', '.join(npz.files) or 'none'}); "
                    f"expected one named {' / '.join(_NPZ_KEYS)} or a single 2-D array")


def _read_tiff(path: str) -> Tuple[np.ndarray, Optional[PixelSize], Optional[float]]:
    try:
        import tifffile
    except ImportError:
        raise DataError(f"{os.path.basename(path)}: reading GeoTIFF DEMs needs the optional package tifffile "
                        f"(pip install tifffile), or convert the file to .npy") from None
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        arr = page.asarray()
        gsd = nodata = None
        tag = page.tags.get("ModelPixelScaleTag") or page.tags.get(33550)
        if tag is not None and len(tag.value) >= 2 and tag.value[0] and tag.value[1]:
            sx, sy = abs(float(tag.value[0])), abs(float(tag.value[1]))
            if _geotiff_geographic(page):
                tie = page.tags.get("ModelTiepointTag") or page.tags.get(33922)
                if tie is not None and len(tie.value) >= 6:
                    # tie point (I, J, K, X, Y, Z): pixel row J sits at latitude Y; rows go south
                    lat = float(tie.value[4]) - sy * (arr.shape[0] / 2.0 - float(tie.value[1]))
                    gsd = geographic_pixel_m(sy, sx, lat)
                else:
                    log.warning("%s: geographic GeoTIFF without a tie point: pixel size unknown (set dataset.gsd)",
                                os.path.basename(path))
            else:
                gsd = (sy, sx)
        tag = page.tags.get("GDAL_NODATA") or page.tags.get(42113)
        if tag is not None:
            try:
                nodata = float(str(tag.value).strip().strip("\x00"))
            except ValueError:
                nodata = None
    return arr, gsd, nodata


def read_heightfield(path: str, raw_shape: Optional[Sequence[int]] = None,
                     raw_dtype: str = "float32") -> Tuple[np.ndarray, Optional[PixelSize], Optional[float]]:
    """One heightfield file -> (2-D array, (row, column) pixel size in metres or None, nodata value or None).

    Raises:
        DataError naming the file: unknown extension, not 2-D, raw size mismatch, unreadable, missing tifffile.
    """
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    gsd = nodata = None
    try:
        if ext == ".npy":
            arr = np.load(path, mmap_mode="r")
        elif ext == ".npz":
            with np.load(path) as npz:
                arr = _npz_array(path, npz)
                shape2 = arr.shape if arr.ndim == 2 else tuple(d for d in arr.shape if d != 1)[:2]
                gsd = _npz_pixel_m(name, npz, shape2)
        elif ext in (".tif", ".tiff"):
            arr, gsd, nodata = _read_tiff(path)
        elif ext in (".raw", ".bin", ".dat"):
            if raw_shape is None or len(raw_shape) != 2:
                raise DataError(f"{name}: raw heightfields need dataset.raw_shape [rows, columns]; got {raw_shape!r}")
            dt = np.dtype(raw_dtype)
            need = int(raw_shape[0]) * int(raw_shape[1]) * dt.itemsize
            size = os.path.getsize(path)
            if size != need:
                raise DataError(f"{name}: {size} bytes, but raw_shape {list(raw_shape)} of {dt} needs {need} bytes")
            arr = np.memmap(path, dtype=dt, mode="r", shape=tuple(int(s) for s in raw_shape))
        else:
            raise DataError(f"{name}: unknown heightfield format '{ext}'; expected one of {', '.join(HEIGHT_EXTS)}")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the file is the problem, name it
        raise DataError(f"{name}: cannot be read as a heightfield ({type(e).__name__}: {e})") from None
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"{name}: a heightfield must be 2-D (rows, columns); got shape {list(arr.shape)}")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name}: heights must be numeric; got dtype {arr.dtype}")
    return arr, gsd, nodata


def _named_source(path: str, demo_root: str, demo_regions: int,
                  demo_size: int) -> List[Tuple[str, np.ndarray, Optional[PixelSize]]]:
    """(name, array, (row, column) pixel metres or None) of the named sources."""
    if path == "demo":
        from datasets.terrain_gen import GSD_M, generate_terrain_demo

        files = generate_terrain_demo(demo_root, regions=demo_regions, size=demo_size)
        return [(os.path.basename(f), np.load(f, mmap_mode="r"), (GSD_M, GSD_M)) for f in files]
    if path.startswith("mpl:"):
        try:
            from matplotlib import cbook
        except ImportError:
            raise DataError(f"dataset.path '{path}': matplotlib's sample DEMs need matplotlib (in requirements.txt; "
                            f"pip install matplotlib); it is not installed") from None
        stem = path[4:]
        with cbook.get_sample_data(f"{stem}.npz") as npz:
            arr = _npz_array(stem, npz)
            gsd = _npz_pixel_m(stem, npz, arr.shape)
        return [(stem, np.asarray(arr, dtype=np.float64), gsd)]
    if path == "skimage:motorcycle_disp":
        try:
            import skimage
        except ImportError:
            raise DataError("dataset.path 'skimage:motorcycle_disp' needs scikit-image (pip install scikit-image)") from None
        f = os.path.join(os.path.dirname(skimage.__file__), "data", "motorcycle_disp.npz")
        if not os.path.isfile(f):
            raise DataError(f"dataset.path 'skimage:motorcycle_disp': {f} is not part of this scikit-image install")
        arr, _, _ = read_heightfield(f)
        return [("motorcycle_disp", arr, (1.0, 1.0))]  # disparity units per pixel: slope angles are nominal
    raise DataError(f"dataset.path '{path}': unknown named source; expected a file, a folder or one of "
                    f"{', '.join(NAMED_SOURCES)}")


# ------------------------------------------------------------------------------------------------ tiling
def cut_tiles(arr: np.ndarray, tile_size: int, nodata: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of a 2-D array, row-major from the top-left; windows with NaN / Inf / nodata dropped.

    Returns:
        (tiles float32 (n, T, T), origins int64 (n, 2) = (row, column) of each window's top-left pixel).
    """
    T = int(tile_size)
    rows, cols = arr.shape[0] // T, arr.shape[1] // T
    tiles, origins = [], []
    for r in range(rows):
        band = np.asarray(arr[r * T:(r + 1) * T, :cols * T], dtype=np.float64)
        for c in range(cols):
            w = band[:, c * T:(c + 1) * T]
            if not np.isfinite(w).all() or (nodata is not None and np.any(w == nodata)):
                continue
            tiles.append(w.astype(np.float32))
            origins.append((r * T, c * T))
    if not tiles:
        return np.zeros((0, T, T), np.float32), np.zeros((0, 2), np.int64)
    return np.stack(tiles), np.asarray(origins, dtype=np.int64)


def split_tiles(region_of_tile: np.ndarray, split_by: str, val_fraction: float, test_fraction: float,
                seed: int) -> Dict[str, np.ndarray]:
    """Tile indices of each split (sorted).

    ``region``: regions are shuffled and assigned whole (test = the last round(test_fraction R) regions, at least
    one when test_fraction > 0; val likewise before them); ``tile``: tiles are shuffled and assigned;
    ``none``: every tile is test.
    """
    n = len(region_of_tile)
    rng = np.random.default_rng(seed)
    if split_by == "none":
        return {"train": np.zeros(0, np.int64), "val": np.zeros(0, np.int64), "test": np.arange(n)}
    units = np.unique(region_of_tile) if split_by == "region" else np.arange(n)
    perm = rng.permutation(units)
    nu = len(units)
    n_test = 0 if test_fraction <= 0 else max(1, int(round(test_fraction * nu)))
    n_val = 0 if val_fraction <= 0 else max(1, int(round(val_fraction * nu)))
    if n_test + n_val >= nu:
        what = "regions (files)" if split_by == "region" else "tiles"
        raise DataError(f"dataset.split_by={split_by!r}: {nu} {what} cannot give {n_val} validation and {n_test} test "
                        f"{what} and keep training ones; add data, lower val_fraction/test_fraction"
                        + (", or use split_by: tile" if split_by == "region" else ""))
    test_u, val_u, train_u = perm[nu - n_test:], perm[nu - n_test - n_val:nu - n_test], perm[:nu - n_test - n_val]
    if split_by == "region":
        pick = lambda u: np.flatnonzero(np.isin(region_of_tile, u))  # noqa: E731
    else:
        pick = lambda u: np.sort(u).astype(np.int64)  # noqa: E731
    return {"train": pick(train_u), "val": pick(val_u), "test": pick(test_u)}


# ------------------------------------------------------------------------------------------- derivatives
def central_gradient(h, spacing: float = 1.0):
    """Central differences on interior pixels: (d/drow, d/dcol), each (..., H-2, W-2), per ``spacing`` units.

    Works on numpy arrays and torch tensors; the last two axes are (row, column).
    """
    g_col = (h[..., 1:-1, 2:] - h[..., 1:-1, :-2]) / (2.0 * spacing)
    g_row = (h[..., 2:, 1:-1] - h[..., :-2, 1:-1]) / (2.0 * spacing)
    return g_row, g_col


def laplacian_5pt(h, spacing: float = 1.0):
    """5-point Laplacian on interior pixels, (..., H-2, W-2), per ``spacing``^2 units (numpy or torch)."""
    c = h[..., 1:-1, 1:-1]
    return (h[..., 2:, 1:-1] + h[..., :-2, 1:-1] + h[..., 1:-1, 2:] + h[..., 1:-1, :-2] - 4.0 * c) / (spacing ** 2)


def slope_angle(g_row, g_col, gsd_row, gsd_col):
    """Slope angle in degrees from height steps per pixel (metres / px) and the pixel size (metres) per axis.

    ``gsd_row`` / ``gsd_col``: numbers or arrays broadcasting against the gradients (per-tile sizes).
    """
    if isinstance(g_row, torch.Tensor):
        return torch.rad2deg(torch.atan(torch.sqrt((g_row / gsd_row) ** 2 + (g_col / gsd_col) ** 2)))
    return np.degrees(np.arctan(np.sqrt((g_row / gsd_row) ** 2 + (g_col / gsd_col) ** 2)))


def slope_degrees(h, gsd):
    """Slope angle in degrees on interior pixels of a heightfield in metres; ``gsd``: metres per pixel, a number
    or a (row, column) pair."""
    g_row, g_col = central_gradient(h, 1.0)
    sr, sc = pixel_pair(gsd)
    return slope_angle(g_row, g_col, sr, sc)


# ------------------------------------------------------------------------------------------- cutting
def _cut_sources(sources, tiling: Dict, sink=None) -> Dict:
    """Cut every source, one at a time: tiles (in memory, or handed to ``sink(region, tiles)`` which keeps
    them), origins, region_of_tile, per-tile mu / sd (float64), names, shapes and file pixel sizes."""
    T, nodata, cap = tiling["tile_size"], tiling["nodata"], tiling["max_tiles_per_region"]
    tiles, origins, regions, mus, sds, names, shapes, gsds = [], [], [], [], [], [], [], []
    for r, (name, _, load) in enumerate(sources):
        arr, file_gsd, file_nodata = load()
        t, o = cut_tiles(arr, T, nodata if nodata is not None else file_nodata)
        shapes.append(tuple(arr.shape))
        del arr
        if cap is not None and len(t) > cap:
            keep = np.linspace(0, len(t) - 1, cap).round().astype(np.int64)
            t, o = t[keep], o[keep]
        flat = t.reshape(len(t), T * T).astype(np.float64)
        mus.append(flat.mean(axis=1))
        sds.append(flat.std(axis=1))
        del flat
        names.append(name)
        origins.append(o)
        regions.append(np.full(len(t), r, np.int64))
        gsds.append(file_gsd)
        if sink is None:
            tiles.append(t)
        else:
            sink(r, t)
    cat = (lambda xs, empty: np.concatenate(xs) if xs else empty)  # noqa: E731
    return {"tiles": cat(tiles, np.zeros((0, T, T), np.float32)) if sink is None else None,
            "origins": cat(origins, np.zeros((0, 2), np.int64)), "region_of_tile": cat(regions, np.zeros(0, np.int64)),
            "mu": cat(mus, np.zeros(0)), "sd": cat(sds, np.zeros(0)), "names": names, "shapes": shapes, "gsds": gsds}


TILE_CACHE_VERSION = 1


def _cache_key(path: str, sources, settings: Dict) -> str:
    import hashlib
    import json

    files = []
    for name, f, _ in sources:
        if f is None:
            files.append([name])
        else:
            st = os.stat(f)
            files.append([name, os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": TILE_CACHE_VERSION, "path": path, "files": files, "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _cached_cut(cache_dir: str, path: str, sources, settings: Dict) -> Dict:
    """:func:`_cut_sources` through the tile cache (see ``TerrainDataset(tile_cache=...)``): tiles memory-mapped."""
    from util.files import publish_folder

    key = _cache_key(path, sources, settings)
    final = os.path.join(cache_dir, key)

    def fill(tmp: str) -> None:
        counts: List[int] = []

        def sink(r: int, t: np.ndarray) -> None:
            np.save(os.path.join(tmp, f"region_{r}.npy"), t)
            counts.append(len(t))

        cut = _cut_sources(sources, settings, sink=sink)
        T = settings["tile_size"]
        out = np.lib.format.open_memmap(os.path.join(tmp, "tiles.npy"), mode="w+", dtype=np.float32,
                                        shape=(int(sum(counts)), T, T))
        at = 0
        for r, n in enumerate(counts):
            rf = os.path.join(tmp, f"region_{r}.npy")
            out[at:at + n] = np.load(rf, mmap_mode="r")
            at += n
            os.remove(rf)
        out.flush()
        del out
        pix = np.array([g if g is not None else (np.nan, np.nan) for g in cut["gsds"]], np.float64).reshape(-1, 2)
        np.savez(os.path.join(tmp, "index.npz"), origins=cut["origins"], region_of_tile=cut["region_of_tile"],
                 mu=cut["mu"], sd=cut["sd"], names=np.array(cut["names"]), shapes=np.array(cut["shapes"]).reshape(-1, 2),
                 pixel_m=pix)

    # another process may finish the same cache first: its folder is used
    if os.path.isfile(os.path.join(final, "index.npz")) or not publish_folder(final, fill):
        log.info("terrain tile cache reused: %s", final)
    else:
        log.info("terrain tile cache written: %s", final)
    with np.load(os.path.join(final, "index.npz")) as idx:
        pix = idx["pixel_m"]
        return {"tiles": np.load(os.path.join(final, "tiles.npy"), mmap_mode="r"), "origins": idx["origins"],
                "region_of_tile": idx["region_of_tile"], "mu": idx["mu"], "sd": idx["sd"],
                "names": [str(n) for n in idx["names"]], "shapes": [tuple(s) for s in idx["shapes"]],
                "gsds": [None if np.isnan(g).any() else (float(g[0]), float(g[1])) for g in pix]}


def _few_values(values: np.ndarray, k: int = 5) -> str:
    more = f" and {len(values) - k} more" if len(values) > k else ""
    return ", ".join(f"{float(x):g}" for x in values[:k]) + more


def _no_tile_message(path: str, T: int, names: Sequence[str], shapes: Sequence[Sequence[int]],
                     nodata: Optional[float]) -> str:
    """Why no tile was cut: each region smaller than one tile (its size and the tile size), or whose windows all
    hold missing values (NaN / Inf / nodata)."""
    small, missing = [], []
    for name, shape in zip(names, shapes):
        h, w = int(shape[0]), int(shape[1])
        if h < T or w < T:
            small.append(f"{name} is {h} x {w} pixels")
        else:
            missing.append(f"{name} ({h} x {w} pixels): all {(h // T) * (w // T)} windows hold NaN / Inf"
                           + (f" / nodata {nodata:g}" if nodata is not None else " / the file's nodata value"))
    parts, fixes = [], []
    if small:
        side = min(min(int(s[0]), int(s[1])) for s in shapes)
        parts.append(f"smaller than one tile: {', '.join(small[:5])}" + (f" and {len(small) - 5} more"
                                                                         if len(small) > 5 else ""))
        fixes.append(f"lower dataset.tile_size to at most {side} (the smallest side)" if side >= 4
                     else "use a larger DEM")
    if missing:
        parts.append("; ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        fixes.append("check dataset.nodata and the files' missing values")
    return (f"dataset.path '{path}': no complete {T} x {T} tile (dataset.tile_size: {T}) without missing values; "
            f"{'; '.join(parts)}. Fix: {'; or '.join(fixes)}")


# ------------------------------------------------------------------------------------------------ dataset
@register("dataset", "terrain")
class TerrainDataset(Dataset):
    """DEM tiles for amortized terrain INRs (spec huvr 1, 3, 8).

    Args:
        path: a heightfield file (.npy / .npz / .tif / .tiff / .raw), a folder of them (one region per file,
            sorted by name), or a named source: ``demo`` (generated terrain, written on first use under
            ``demo_root``), ``mpl:jacksboro_fault_dem``, ``mpl:topobathy`` (matplotlib's sample DEMs),
            ``skimage:motorcycle_disp`` (a stereo disparity map; real but not an elevation model).
        tile_size: tile side T in pixels (the paper: 256).
        split_by: ``region`` (whole files per split, spec 3), ``tile`` (tiles shuffled into splits) or ``none``
            (every tile is test: out-of-domain sets).
        val_fraction: fraction of regions (or tiles) in the validation split.
        test_fraction: fraction of regions (or tiles) in the test split.
        split_seed: seed of the split shuffle (independent of the batch seed).
        batch_size: tiles per training batch (the paper: 8 for TransINR / Functa, 32 for HUVR).
        tile_augment: ``none`` or ``dihedral`` (random k x 90 degree rotation and flip per tile; HUVR's policy is NR).
        nodata: height value marking missing pixels (besides NaN / Inf); windows holding it are dropped.
            Default: the GeoTIFF's GDAL_NODATA tag when present, else none.
        raw_shape: [rows, columns] of raw (.raw/.bin/.dat) files.
        raw_dtype: numpy dtype of raw files.
        gsd: ground sampling distance in metres per pixel for slope angles: a number or a [row, column] pair,
            for every region; default: from each file (GeoTIFF ModelPixelScaleTag, .npz ``dx`` / ``dy`` or
            ``latitude`` / ``longitude``, degrees converted to metres; 5 m for ``demo``), else 1 with a warning.
        min_sigma: floor of the per-tile standard deviation in metres (flat tiles).
        max_tiles_per_region: keep at most this many tiles of each region (evenly spaced; null = all).
        demo_root: folder of the generated terrain for ``path: demo``.
        demo_regions: regions generated for ``path: demo``.
        demo_size: side in pixels of each generated region.
        tile_cache: folder of a tile cache (null: none). The tiles are cut once, region by region, into
            ``<tile_cache>/<key>/tiles.npy`` (float32) and memory-mapped from then on, so a DEM collection larger
            than memory works and later runs skip the reading and cutting; ``key`` changes with the source files
            (path, size, modification time) and the tiling keys, so a stale cache is never used.
        seed: batch seed (injected from train.seed).
    """

    def __init__(self, path: str = "demo", tile_size: int = 256, split_by: str = "region",
                 val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0, batch_size: int = 8,
                 tile_augment: str = "none", nodata: Optional[float] = None, raw_shape: Optional[List[int]] = None,
                 raw_dtype: str = "float32", gsd: Optional[Union[float, List[float]]] = None, min_sigma: float = 1e-3,
                 max_tiles_per_region: Optional[int] = None, demo_root: str = os.path.join("data", "terrain_demo"),
                 demo_regions: int = 12, demo_size: int = 384, tile_cache: Optional[str] = None, seed: int = 0):
        for key, val, allowed in (("split_by", split_by, SPLIT_MODES), ("tile_augment", tile_augment, TERRAIN_AUGMENT_MODES)):
            if val not in allowed:
                raise ConfigError(f"dataset.{key} must be one of {', '.join(allowed)}; got {val!r}")
        for key, val, lo in (("tile_size", tile_size, 4), ("batch_size", batch_size, 1), ("split_seed", split_seed, 0),
                             ("seed", seed, 0), ("demo_regions", demo_regions, 1), ("demo_size", demo_size, 16)):
            if not _is_int(val) or val < lo:
                raise ConfigError(f"dataset.{key} must be an integer >= {lo}, got {val!r}")
        if max_tiles_per_region is not None and (not _is_int(max_tiles_per_region) or max_tiles_per_region < 1):
            raise ConfigError(f"dataset.max_tiles_per_region must be null or an integer >= 1, got {max_tiles_per_region!r}")
        for key, val in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= val < 1.0:
                raise ConfigError(f"dataset.{key} must be a number in [0, 1), got {val!r}")
        if isinstance(min_sigma, bool) or not isinstance(min_sigma, (int, float)) or not min_sigma > 0:
            raise ConfigError(f"dataset.min_sigma must be a number > 0 (metres), got {min_sigma!r}")
        if gsd is not None:
            try:
                gsd = pixel_pair(gsd, "dataset.gsd")
            except ValueError as e:
                raise ConfigError(f"{e} (or null: read from the files)") from None
        try:
            np.dtype(raw_dtype)
        except TypeError:
            raise ConfigError(f"dataset.raw_dtype: {raw_dtype!r} is not a numpy dtype") from None
        self.path, self.tile_size, self.split_by = str(path), int(tile_size), split_by
        self.batch_size, self.augment, self.seed = int(batch_size), tile_augment, int(seed)
        self.min_sigma = float(min_sigma)

        if tile_cache is not None and not isinstance(tile_cache, str):
            raise ConfigError(f"dataset.tile_cache must be null or a folder path, got {tile_cache!r}")
        sources = self._sources(raw_shape, raw_dtype, demo_root, demo_regions, demo_size)
        tiling = {"tile_size": self.tile_size, "nodata": nodata, "max_tiles_per_region": max_tiles_per_region}
        if tile_cache is None:
            cut = _cut_sources(sources, tiling, sink=None)
        else:
            cut = _cached_cut(tile_cache, self.path, sources, {**tiling, "raw_shape": raw_shape,
                                                               "raw_dtype": raw_dtype, "demo_regions": demo_regions,
                                                               "demo_size": demo_size})
        self.tiles_m, self.origins, self.region_of_tile = cut["tiles"], cut["origins"], cut["region_of_tile"]
        self.region_names: List[str] = list(cut["names"])
        gsds = cut["gsds"]
        if len(self.tiles_m) == 0:
            raise DataError(_no_tile_message(self.path, self.tile_size, cut["names"], cut["shapes"], nodata))
        self._check_not_constant(cut["sd"], nodata)
        unknown = [n for n, g in zip(self.region_names, gsds) if g is None]
        if gsd is None and unknown:
            log.warning("terrain %s: pixel size unknown for %s; slope angles assume 1 m per pixel (set dataset.gsd)",
                        self.path, ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
        #: (regions, 2) metres per pixel along rows and columns (dataset.gsd, else each file's own)
        self.pixel_m = np.array([gsd if gsd is not None else (g if g is not None else (1.0, 1.0)) for g in gsds],
                                dtype=np.float64).reshape(len(gsds), 2)
        self.mu = cut["mu"].astype(np.float64)
        self.sigma = np.maximum(cut["sd"].astype(np.float64), self.min_sigma)
        self.splits = split_tiles(self.region_of_tile, split_by, float(val_fraction), float(test_fraction),
                                  int(split_seed))
        if split_by != "none" and len(self.splits["train"]) == 0:
            raise DataError(f"dataset.path '{self.path}': the training split is empty")
        px = np.unique(self.pixel_m.round(4), axis=0)
        px_s = " x ".join(f"{v:g}" for v in px[0]) + " m" if len(px) == 1 else f"{len(px)} sizes"
        log.info("terrain %s: %d regions, %d tiles of %d x %d (train %d, val %d, test %d), pixel %s", self.path,
                 len(sources), len(self.tiles_m), self.tile_size, self.tile_size, len(self.splits["train"]),
                 len(self.splits["val"]), len(self.splits["test"]), px_s)

    def _check_not_constant(self, sd: np.ndarray, nodata: Optional[float]) -> None:
        """DataError when every tile is flat (the DEM is constant, e.g. all nodata without ``dataset.nodata``):
        per-tile normalization and the PSNR (peak = the tile's range) need heights that vary; a warning when
        some tiles are flat (their PSNR is undefined and left out of the PSNR means)."""
        flat = np.flatnonzero(np.asarray(sd) == 0)
        if flat.size == 0:
            return
        values = np.unique(np.asarray(self.tiles_m[flat[:1000], 0, 0], dtype=np.float64))
        v = float(values[0])
        hint = (f"; if {v:g} marks missing pixels, set dataset.nodata: {v:g}" if nodata is None and values.size == 1
                else "")
        n = len(self.tiles_m)
        if flat.size == n:
            what = f"height {v:g} everywhere" if values.size == 1 else f"heights {_few_values(values)}"
            raise DataError(f"dataset.path '{self.path}': every one of the {n} {self.tile_size} x {self.tile_size} "
                            f"tiles is constant ({what}): per-tile normalization and the PSNR (peak = the tile's "
                            f"range) need heights that vary within a tile{hint}")
        region = self.region_names[int(self.region_of_tile[flat[0]])]
        log.warning("terrain %s: %d of %d tiles are constant (e.g. tile %d of %s, height %g): their PSNR is "
                    "undefined and left out of the PSNR means (counted in the column psnr_flat_tiles)%s",
                    self.path, flat.size, n, int(flat[0]), region, v, hint)

    def _sources(self, raw_shape, raw_dtype, demo_root, demo_regions, demo_size):
        """[(name, file or None, load)] of the configured path; ``load()`` -> (2-D array, (row, column) pixel
        metres or None, nodata or None). Files are read one at a time, when cut."""
        p = self.path
        if p in NAMED_SOURCES or p.startswith(("mpl:", "skimage:")):
            return [(n, None, (lambda a=a, g=g: (a, g, None)))
                    for n, a, g in _named_source(p, demo_root, demo_regions, demo_size)]
        if os.path.isdir(p):
            files = sorted(f for f in os.listdir(p) if os.path.splitext(f)[1].lower() in HEIGHT_EXTS)
            if not files:
                raise DataError(f"dataset.path '{p}': no heightfield files ({', '.join(HEIGHT_EXTS)}) in this folder")
            paths = [os.path.join(p, f) for f in files]
        elif os.path.isfile(p):
            paths = [p]
        else:
            raise DataError(f"dataset.path '{p}' not found (expected a heightfield file, a folder of them or one of "
                            f"{', '.join(NAMED_SOURCES)})")
        return [(os.path.basename(f), f, (lambda f=f: read_heightfield(f, raw_shape, raw_dtype))) for f in paths]

    # ------------------------------------------------------------------------------------------ shapes
    @property
    def spatial_dims(self) -> int:
        return 2

    @property
    def spatial_shape(self) -> Tuple[int, int]:
        return (self.tile_size, self.tile_size)

    @property
    def steps_per_epoch(self) -> int:
        """ceil(training tiles / batch_size)."""
        return max(1, math.ceil(len(self.splits["train"]) / self.batch_size))

    @property
    def train_value_mean(self) -> float:
        """0: every tile is normalized to zero mean."""
        return 0.0

    def meta(self) -> dict:
        """JSON-serializable facts of the data (path, tile_size, tile counts per split, pixel sizes, region names)."""
        return {"path": self.path, "tile_size": self.tile_size, "spatial_shape": [self.tile_size, self.tile_size],
                "spatial_dims": 2, "cond_dim": 0, "out_dim": 1, "split_by": self.split_by,
                "n_tiles": int(len(self.tiles_m)), **{f"n_{k}": int(len(v)) for k, v in self.splits.items()},
                "pixel_m": self.pixel_m.tolist(), "regions": self.region_names, "batch_size": self.batch_size,
                "steps_per_epoch": self.steps_per_epoch, "augment": self.augment, "train_value_mean": 0.0}

    # ----------------------------------------------------------------------------------------- access
    def split_indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return self.splits[split]

    def tiles(self, idx: np.ndarray) -> Dict[str, torch.Tensor]:
        """Tiles by global index: ``tile`` (n, 1, T, T) normalized, ``metres`` (n, T, T), ``mu``, ``sigma`` (n,),
        ``pixel_m`` (n, 2) metres per pixel along rows and columns."""
        idx = np.asarray(idx, dtype=np.int64)
        m = self.tiles_m[idx].astype(np.float64)
        mu, sd = self.mu[idx], self.sigma[idx]
        t = (m - mu[:, None, None]) / sd[:, None, None]
        return {"tile": torch.from_numpy(t.astype(np.float32))[:, None], "metres": torch.from_numpy(m),
                "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sd), "index": torch.from_numpy(idx),
                "pixel_m": torch.from_numpy(self.pixel_m[self.region_of_tile[idx]])}

    def sample_batch(self, step: int, rank: int = 0) -> Dict[str, torch.Tensor]:
        """The training batch of (seed, step, rank): ``tile`` (B, 1, T, T), ``mu``, ``sigma`` (B,), ``index`` (B,)."""
        if not (_is_int(step) and step >= 0 and _is_int(rank) and rank >= 0):
            raise ValueError(f"step and rank must be integers >= 0, got step={step!r}, rank={rank!r}")
        train = self.splits["train"]
        if len(train) == 0:
            raise DataError(f"dataset.path '{self.path}': no training tiles (split_by: {self.split_by})")
        rng = np.random.default_rng([self.seed, int(step), int(rank)])
        pick = train[rng.integers(0, len(train), size=self.batch_size)]
        b = self.tiles(pick)
        t = b["tile"]
        if self.augment == "dihedral":
            k = rng.integers(0, 4, size=len(pick))
            flip = rng.integers(0, 2, size=len(pick))
            t = torch.stack([torch.rot90(ti, int(ki), dims=(-2, -1)).flip(-1) if fi else
                             torch.rot90(ti, int(ki), dims=(-2, -1)) for ti, ki, fi in zip(t, k, flip)])
        return {"tile": t.contiguous(), "mu": b["mu"].float(), "sigma": b["sigma"].float(), "index": b["index"]}

    def __len__(self) -> int:
        return int(len(self.tiles_m))

    def __repr__(self) -> str:
        return (f"TerrainDataset({self.path!r}, tiles={len(self.tiles_m)}, tile_size={self.tile_size}, "
                f"split_by={self.split_by!r})")
