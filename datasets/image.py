"""The image dataset: one RGB or grayscale picture (up to gigapixel) -> normalized pixels -> random-pixel batches.

Spec ``vision.md`` 1.1-1.5 (single-field INR training for images):

- **Files**: PNG / JPEG / any format Pillow reads (decoded once into a uint8 / uint16 array), TIFF (tifffile,
  memory-mapped when the file is uncompressed and contiguous; Pillow when tifffile is missing), ``.npy``
  (uint8 / uint16 / float, shape (H, W) or (H, W, C), memory-mapped with ``np.load(mmap_mode='r')``).
  Channels: 1 (grayscale) or 3 (RGB); RGBA (4) loses its alpha channel with a logged warning; 2 or more than
  4 channels are an error (the channel axis must be last).
- **Normalization** (1.1): v' = (v - min) / (max - min), one global min/max over every pixel and channel of
  the training image (identity for a uint8 image that spans 0..255, up to the /255).
- **Coordinates** (1.1): pixel (row i, col j) of an (h, w) image -> x = (2 j / (w - 1) - 1, 2 i / (h - 1) - 1):
  column 0 = column (width axis), column 1 = row (align corners), the ``grid_sample`` / ``util.sampling`` order.
- **Batches** (1.2): N = 2^log2batch pixels drawn with replacement (row and column independent), one batch per
  (seed, step, rank) (numpy ``default_rng([seed, step, rank])``, like ``datasets.ensemble``).
- **VP-S** (1.2): x~ = clamp(x + eps, -1, 1), eps ~ N(0, sigma^2) per axis clipped to [-tau, tau]; target =
  bilinear interpolation (align corners) of the training image at x~, from the stored pixels at the 4 corners
  (float64 arithmetic). tau = 1 / (min(h, w) - 1), sigma = 0.6 tau by default. ``vp_lattice: pixel`` (default)
  jitters the true pixel positions; ``vp_lattice: reference`` reproduces the reference's transposed lattice
  (the un-jittered input is (row-norm, col-norm), so column 0 takes h distinct values and column 1 takes w).
- **Super-resolution** (1.5): ``downsample: 2`` trains on the bilinear (align corners) downsample of size
  (H // 2, W // 2) (the reference's ``F.interpolate(scale_factor=0.5, align_corners=True)``), normalized by its
  own min/max; evaluation reads the full-resolution image (``rows``), normalized with the training min/max
  (``rows(..., raw=True)`` gives the reference's un-normalized targets). steps_per_epoch stays
  ceil(H W / N) from the full-resolution size (1.3, as the reference).

Memory (no float32 copy of a whole image is ever made):

- Pixels stay in their stored dtype: a uint8 RGB image takes 3 bytes per pixel, in RAM (decoded PNG / JPEG /
  compressed TIFF) or memory-mapped (``.npy``, uncompressed TIFF, or the ``cache_dir`` copy of a decoded file).
  Pearl (23466 x 20000 RGB): 1.41 GB; Tokyo (21450 x 56718): 3.65 GB.
- Decoding a PNG / JPEG: Pillow holds its own decoded copy (RGB: 4 bytes per pixel, Pearl 1.88 GB) while it is
  copied into the array strip by strip, so the load peak is about 7 bytes per pixel (Pearl ~3.3 GB), then
  3 bytes per pixel. With ``cache_dir`` the array is written to ``<cache_dir>/<name>-<key>.npy`` as it is
  decoded (the load peak is then Pillow's copy only) and later runs memory-map it without decoding.
- ``downsample > 1``: the training image is computed in strips of rows and stored as float16 in [0, 1]
  (2 bytes per value; Pearl x0.5: 11733 x 10000 x 3 -> 0.70 GB) next to the full-resolution pixels that
  evaluation reads (Pearl peak ~2.1 GB plus the decode peak above). float16 rounding (at most 2.4e-4 of the
  range) limits the training targets to about 77 dB PSNR; ``sr_dtype: float32`` stores 4 bytes per value.
- A batch of N pixels needs O(N) memory (VP-S gathers 4 corners: ~ 4 N (C + 16) bytes).
- Streaming passes (min/max, mean, downsample) read about 2^22 values at a time (float64 temporaries, ~100 MB
  fixed overhead).
- Measured (peak RSS over the interpreter's, 12M and 48M-pixel RGB images, the slope per pixel): PNG decode
  ~6-7 bytes/pixel at load (also when writing the cache: its freshly written pages are resident), .npy or a
  cached copy 3 bytes/pixel (memory-mapped pages, reclaimable page cache), downsample 2 from .npy
  4.5 bytes/pixel (3 + 1.5 for the float16 quarter-size image). Extrapolated to Pearl (469M pixels): PNG load
  ~3.3 GB peak, training 1.41 GB (+0.70 GB with downsample 2).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from datasets.base import Dataset
from datasets.augment import make_augmentation, truncated_noise
from util.errors import DataError
from util.registry import ConfigError, register
from util.sampling import linear_stencil

__all__ = ["ImageDataset", "open_image", "downsample_image", "downsampled_image_shape", "IMAGE_AUGMENT_MODES",
           "VP_LATTICES"]

log = logging.getLogger(__name__)

IMAGE_AUGMENT_MODES = ("none", "vc", "vp_s")
VP_LATTICES = ("pixel", "reference")
SR_DTYPES = ("float16", "float32")
TIFF_EXTS = (".tif", ".tiff")
_CHUNK = 1 << 22  # values per strip of the streaming passes
# Pillow modes converted on load (the rest are read as they are or rejected by the channel check)
_PIL_CONVERT = {"1": "L", "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB",
                "La": "LA", "RGBa": "RGBA", "RGBX": "RGB"}


# ------------------------------------------------------------------------------------------------ reading
def _strip_rows(shape: Sequence[int], chunk: int = _CHUNK) -> int:
    """Rows per strip so that a strip holds about ``chunk`` values."""
    per_row = max(1, int(np.prod(shape[1:])))
    return max(1, chunk // per_row)


def _cache_file(path: str, cache_dir: str) -> str:
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir, f"{stem}-{key}.npy")


def _read_pil(path: str, cache_path: Optional[str]) -> np.ndarray:
    """Decode with Pillow (decompression-bomb guard off) into a uint8/uint16/int32/float32 array, strip by strip
    (into ``cache_path`` as a .npy when given)."""
    from PIL import Image

    name = os.path.basename(path)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # gigapixel images are the point (the reference disables the guard too)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            elif mode in _PIL_CONVERT:
                im = im.convert(_PIL_CONVERT[mode])
            W, H = im.size
            probe = np.asarray(im.crop((0, 0, W, min(H, 1))))
            shape = (H, W) + tuple(probe.shape[2:])
            if cache_path is not None:
                os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
                tmp = cache_path + f".tmp{os.getpid()}"
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=probe.dtype, shape=shape)
            else:
                out = np.empty(shape, dtype=probe.dtype)
            step = _strip_rows(shape)
            for r in range(0, H, step):
                out[r:r + step] = np.asarray(im.crop((0, r, W, min(H, r + step))))
            del im
    except Exception as e:  # unreadable / truncated / unknown format
        if cache_path is not None and os.path.exists(cache_path + f".tmp{os.getpid()}"):
            os.remove(cache_path + f".tmp{os.getpid()}")
        raise DataError(f"dataset.path '{path}': cannot read {name} as an image ({type(e).__name__}: {e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = old
    if cache_path is not None:
        out.flush()
        del out
        os.replace(tmp, cache_path)
        log.info("decoded %s into the cache %s", name, cache_path)
        return np.load(cache_path, mmap_mode="r")
    return out


def _read_tiff(path: str, cache_path: Optional[str]) -> np.ndarray:
    """A TIFF: memory-mapped by tifffile when uncompressed and contiguous, else read by tifffile; without
    tifffile, Pillow (which reads common TIFFs only)."""
    try:
        import tifffile
    except ImportError:
        try:
            return _read_pil(path, cache_path)
        except DataError as e:
            raise DataError(f"{e}; reading this TIFF needs the optional package tifffile (pip install tifffile)") \
                from e
    try:
        return tifffile.memmap(path, mode="r")
    except Exception:  # compressed / tiled / not contiguous: decode
        pass
    try:
        arr = tifffile.imread(path)
    except Exception as e:
        raise DataError(f"dataset.path '{path}': tifffile cannot read it ({type(e).__name__}: {e})") from e
    if cache_path is not None:
        os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
        tmp = cache_path + f".tmp{os.getpid()}"
        np.save(tmp, arr)
        os.replace(tmp if tmp.endswith(".npy") else tmp + ".npy", cache_path)
        del arr
        return np.load(cache_path, mmap_mode="r")
    return arr


def open_image(path: str, cache_dir: Optional[str] = None) -> Tuple[np.ndarray, bool]:
    """The pixels of an image file as an (H, W, C) array in its stored dtype, C in {1, 3}.

    Args:
        path: ``.npy`` (memory-mapped), ``.tif/.tiff`` (tifffile, memory-mapped when possible), or any format
            Pillow reads (PNG, JPEG, ...: decoded into RAM, or into ``cache_dir``).
        cache_dir: folder for a ``.npy`` copy of a decoded image (reused while the file's path, size and mtime
            are unchanged); None: decode into RAM on every load.

    Returns:
        (pixels, alpha_dropped): pixels (H, W, C), possibly a memory-mapped view; alpha_dropped is True when a
        4th (alpha) channel was dropped.

    Raises:
        DataError: missing or unreadable file, non-numeric dtype, not 2D/3D, 2 or > 4 channels, smaller than
            2 x 2 pixels (the message names the file).
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DataError(f"dataset.path '{path}': file not found (expected a PNG, JPEG, TIFF or .npy image)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DataError(f"dataset.path '{path}': cannot read {name} as a numeric .npy array "
                            f"({type(e).__name__}: {e})") from e
    else:
        cache_path = None
        if cache_dir is not None:
            cache_path = _cache_file(path, cache_dir)
            if os.path.isfile(cache_path):
                try:
                    arr = np.load(cache_path, mmap_mode="r", allow_pickle=False)
                    return _check_pixels(arr, path)
                except (ValueError, OSError) as e:  # a broken cache file: decode again
                    log.warning("ignoring the unreadable cache file %s (%s)", cache_path, e)
        arr = _read_tiff(path, cache_path) if ext in TIFF_EXTS else _read_pil(path, cache_path)
    return _check_pixels(arr, path)


def _check_pixels(arr: np.ndarray, path: str) -> Tuple[np.ndarray, bool]:
    name = os.path.basename(path)
    if arr.dtype.kind not in "uif" or arr.dtype.itemsize > 8:
        raise DataError(f"dataset.path '{path}': pixel dtype {arr.dtype} of {name} is not numeric "
                        f"(expected uint8, uint16 or float)")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise DataError(f"dataset.path '{path}': {name} has shape {list(arr.shape)}; expected an image (H, W) or "
                        f"(H, W, C) with the channels last")
    c = arr.shape[2]
    if c == 2 or c > 4:
        hint = ("grayscale + alpha? convert it to grayscale or RGB" if c == 2 else
                "the channel axis must be the last one, (H, W, C), with C = 1, 3 or 4")
        raise DataError(f"dataset.path '{path}': {name} has {c} channels (shape {list(arr.shape)}); expected 1 "
                        f"(grayscale), 3 (RGB) or 4 (RGBA, alpha dropped): {hint}")
    alpha = c == 4
    if alpha:
        arr = arr[..., :3]
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DataError(f"dataset.path '{path}': {name} is {arr.shape[0]} x {arr.shape[1]} pixels; an image needs "
                        f"at least 2 x 2 (coordinates 2 j / (n - 1) - 1)")
    return arr, alpha


# ----------------------------------------------------------------------------------------------- resampling
def downsampled_image_shape(shape: Sequence[int], factor: int) -> Tuple[int, int]:
    """(H // factor, W // factor): the output size of ``F.interpolate(scale_factor=1 / factor)`` (spec 1.5:
    Pearl 23466 x 20000 -> 11733 x 10000)."""
    return int(shape[0]) // int(factor), int(shape[1]) // int(factor)


def _axis_stencil(n_out: int, n_in: int, start: int = 0, stop: Optional[int] = None):
    """Lower input index and upper weight of output samples [start, stop) of an align-corners resampling of an
    n_in-point axis to n_out points: position p = k (n_in - 1) / (n_out - 1), i0 = min(floor(p), n_in - 2)."""
    stop = n_out if stop is None else stop
    k = np.arange(start, stop, dtype=np.float64)
    p = k * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(k)
    i0 = np.minimum(np.floor(p), n_in - 2).astype(np.int64)
    return i0, p - i0


def downsample_image(src: np.ndarray, out_shape: Tuple[int, int], rows: Optional[Tuple[int, int]] = None
                     ) -> np.ndarray:
    """Bilinear, align-corners resampling of an (H, W, C) image to ``out_shape`` (h, w), float32.

    Equals ``F.interpolate(img, size=(h, w), mode='bilinear', align_corners=True)`` up to rounding; reads only
    the source rows the requested output rows need.

    Args:
        src: (H, W, C) array (any numeric dtype; memory-mapped is fine), H, W >= 2.
        out_shape: (h, w), each >= 2.
        rows: output rows [r0, r1) to compute (default all).

    Returns:
        float32 (r1 - r0, w, C).
    """
    H, W = src.shape[:2]
    h, w = out_shape
    r0, r1 = (0, h) if rows is None else rows
    i0, t = _axis_stencil(h, H, r0, r1)
    j0, s = _axis_stencil(w, W, 0, w)
    lo, hi = int(i0.min()), int(i0.max()) + 2
    strip = np.asarray(src[lo:hi], dtype=np.float64)
    top, bot = strip[i0 - lo], strip[i0 - lo + 1]
    vert = top + t[:, None, None] * (bot - top)  # (r, W, C)
    left, right = vert[:, j0], vert[:, j0 + 1]
    return (left + s[None, :, None] * (right - left)).astype(np.float32)


# --------------------------------------------------------------------------------------------- dataset
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@register("dataset", "image")
class ImageDataset(Dataset):
    """One image (RGB or grayscale, up to gigapixel) for single-field INR training (spec vision 1).

    Batches are ``{"x": (1, N, 2), "v": (1, N, C), "c": (1, 0)}`` float32 tensors: N = 2^log2batch random pixels
    of the training image, x = (column, row) in [-1, 1] (align corners), v = normalized pixel values.

    Args:
        path: the image: .png, .jpg/.jpeg or any format Pillow reads (decoded once), .tif/.tiff (tifffile,
            optional; memory-mapped when uncompressed), or .npy (uint8 / uint16 / float, (H, W) or (H, W, C),
            memory-mapped). 1 or 3 channels; a 4th (alpha) channel is dropped with a warning.
        log2batch: log2 of N, the pixels per training batch (18 -> 262,144 as the reference).
        augment: "vp_s" (jitter x and interpolate the value there, spec 1.2, as every reference image config),
            "vc" (jitter x, keep the pixel's value) or "none".
        vp_lattice: positions VP-S / VC jitter: "pixel" (the true pixel lattice, x = (col, row)) or "reference"
            (the reference's transposed lattice: the pair (row-norm, col-norm) is jittered and used as x).
        tau_x: clip bound of the coordinate noise in [-1, 1] units, a number or [column axis, row axis];
            default 1 / (min(h, w) - 1) of the training image (half the shorter axis' pixel spacing, spec 1.2).
        sigma_x: std of the coordinate noise (number or 2 numbers); default 0.6 * tau_x.
        downsample: integer factor of the super-resolution protocol (spec 1.5): 1 = off; 2 = train on the
            bilinear (align corners) downsample of size (H // 2, W // 2), evaluate at full resolution.
        sr_dtype: storage of the downsampled training image: "float16" (values in [0, 1], 2 bytes each) or
            "float32".
        cache_dir: folder for a .npy copy of a decoded PNG / JPEG / compressed TIFF, memory-mapped by later
            runs (null: decode into RAM each time).
        seed: batch seed: batch = f(seed, step, rank).
    """

    def __init__(self, path: str, log2batch: int = 18, augment: str = "vp_s", vp_lattice: str = "pixel",
                 tau_x: Union[None, float, Sequence[float]] = None,
                 sigma_x: Union[None, float, Sequence[float]] = None, downsample: int = 1, sr_dtype: str = "float16",
                 cache_dir: Optional[str] = None, seed: int = 0):
        for key, val, allowed in (("augment", augment, IMAGE_AUGMENT_MODES), ("vp_lattice", vp_lattice, VP_LATTICES),
                                  ("sr_dtype", sr_dtype, SR_DTYPES)):
            if val not in allowed:
                raise ConfigError(f"dataset.{key} must be one of {', '.join(allowed)}; got {val!r}")
        for key, val, lo, hi in (("log2batch", log2batch, 0, 30), ("downsample", downsample, 1, None),
                                 ("seed", seed, 0, None)):
            if not _is_int(val) or val < lo or (hi is not None and val > hi):
                raise ConfigError(f"dataset.{key} must be an integer >= {lo}{f' and <= {hi}' if hi else ''}, "
                                  f"got {val!r}")
        self.path = str(path)
        self.log2batch, self.downsample, self.seed = int(log2batch), int(downsample), int(seed)
        self.augment, self.vp_lattice, self.sr_dtype = augment, vp_lattice, sr_dtype
        self.cache_dir = cache_dir
        self._name = os.path.basename(self.path)

        self._full, self.alpha_dropped = open_image(self.path, cache_dir)
        if self.alpha_dropped:
            log.warning("%s: RGBA image, the alpha channel is dropped (RGB used)", self._name)
        self.image_shape: Tuple[int, int] = (int(self._full.shape[0]), int(self._full.shape[1]))
        self.out_dim = int(self._full.shape[2])
        self.dtype = str(self._full.dtype)
        if self.downsample == 1:
            self.train_shape = self.image_shape
        else:
            self.train_shape = downsampled_image_shape(self.image_shape, self.downsample)
            if min(self.train_shape) < 2:
                raise DataError(f"dataset.path '{self.path}': {self._name} is {self.image_shape[0]} x "
                                f"{self.image_shape[1]} pixels; dataset.downsample={self.downsample} leaves "
                                f"{self.train_shape[0]} x {self.train_shape[1]} (at least 2 x 2 needed)")

        # Full-image range (checks finiteness); the training image (downsampled or the full one) and its range.
        full_lo, full_hi = self._scan_range(self._full)
        if self.downsample == 1:
            self._train = self._full
            self._train_lo, self._train_span = full_lo, full_hi - full_lo
            self.value_min, self.value_max = full_lo, full_hi
        else:
            if not full_hi > full_lo:
                raise DataError(f"dataset.path '{self.path}': {self._name} is constant ({full_lo:g}); min-max "
                                f"normalization needs at least two different values")
            self._train = self._make_downsample(full_lo, full_hi)
            lo, hi = self._scan_range(self._train)
            # stored values s are (v - full_lo) / (full_hi - full_lo); training values (s - lo) / (hi - lo)
            self._train_lo, self._train_span = lo, hi - lo
            self.value_min = full_lo + lo * (full_hi - full_lo)
            self.value_max = full_lo + hi * (full_hi - full_lo)
        if not self._train_span > 0:
            raise DataError(f"dataset.path '{self.path}': the training image of {self._name} is constant "
                            f"({self.value_min:g}); min-max normalization needs at least two different values")
        self._span = self.value_max - self.value_min

        self._aug = None
        if augment != "none":
            tau = 1.0 / (min(self.train_shape) - 1) if tau_x is None else tau_x
            self._aug = make_augmentation(augment, 2, 0, sigma_x, tau, key_prefix="dataset.")
        elif tau_x is not None or sigma_x is not None:
            log.warning("dataset.tau_x / sigma_x are set but augment='none' does not use them")
        if vp_lattice != "pixel" and augment == "none":
            log.warning("dataset.vp_lattice='%s' has no effect with augment='none'", vp_lattice)
        self._mean: Optional[np.ndarray] = None
        log.info("image %s: %d x %d x %d %s, training %d x %d, values [%g, %g], batch 2^%d, augment %s (%s lattice)",
                 self._name, *self.image_shape, self.out_dim, self.dtype, *self.train_shape, self.value_min,
                 self.value_max, self.log2batch, augment, vp_lattice)

    # ------------------------------------------------------------------------------------------ set-up
    def _scan_range(self, arr: np.ndarray) -> Tuple[float, float]:
        """Streaming global min/max over all pixels and channels; NaN/Inf is an error naming the file."""
        lo, hi = math.inf, -math.inf
        step = _strip_rows(arr.shape)
        for r in range(0, arr.shape[0], step):
            s = np.asarray(arr[r:r + step])
            if s.dtype.kind == "f" and not np.isfinite(s).all():
                raise DataError(f"dataset.path '{self.path}': {self._name} holds NaN or Inf values (first in rows "
                                f"{r}..{r + s.shape[0] - 1}); pixels must be finite")
            lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        return lo, hi

    def _make_downsample(self, full_lo: float, full_hi: float) -> np.ndarray:
        """The training image of the SR protocol, stored as (v - full_lo) / (full_hi - full_lo) in sr_dtype."""
        h, w = self.train_shape
        out = np.empty((h, w, self.out_dim), dtype=np.dtype(self.sr_dtype))
        step = max(1, _strip_rows(self._full.shape) // (2 * self.downsample))
        for r in range(0, h, step):
            block = downsample_image(self._full, self.train_shape, (r, min(h, r + step)))
            out[r:r + step] = (block - full_lo) / (full_hi - full_lo)
        return out

    # ------------------------------------------------------------------------------------------ shapes
    @property
    def spatial_dims(self) -> int:
        """d = 2 (x = column, row)."""
        return 2

    @property
    def channels(self) -> int:
        """C, the same as ``out_dim``."""
        return self.out_dim

    @property
    def spatial_shape(self) -> Tuple[int, int]:
        """(H, W) of the full-resolution image (alias of ``image_shape``)."""
        return self.image_shape

    @property
    def batch_size(self) -> int:
        """N = 2 ** log2batch pixels per batch."""
        return 1 << self.log2batch

    @property
    def steps_per_epoch(self) -> int:
        """Spec 1.3: ceil(H W / N) from the FULL-resolution size (also with downsample, as the reference)."""
        H, W = self.image_shape
        return max(1, -(-H * W // self.batch_size))

    @property
    def tau_x(self) -> Optional[np.ndarray]:
        """Clip bound of the coordinate noise per x column, None without augmentation."""
        return None if self._aug is None else self._aug.tau_x

    @property
    def sigma_x(self) -> Optional[np.ndarray]:
        return None if self._aug is None else self._aug.sigma_x

    # ------------------------------------------------------------------------------------------ values
    def _normalize_train(self, raw: np.ndarray) -> np.ndarray:
        """float64 normalized training values of stored training-image values."""
        return (np.asarray(raw, dtype=np.float64) - self._train_lo) / self._train_span

    def normalize_values(self, v: np.ndarray) -> np.ndarray:
        """Data units (the stored pixel values, e.g. 0..255) -> normalized: (v - value_min) / (value_max -
        value_min), float64."""
        return (np.asarray(v, dtype=np.float64) - self.value_min) / self._span

    def denormalize_values(self, v: np.ndarray) -> np.ndarray:
        """Normalized -> data units, float64."""
        return np.asarray(v, dtype=np.float64) * self._span + self.value_min

    def _check_rows(self, start: int, stop: int) -> Tuple[int, int]:
        H = self.image_shape[0]
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= H):
            raise IndexError(f"rows [{start}, {stop}) out of range for an image of {H} rows")
        return int(start), int(stop)

    def rows(self, start: int, stop: int, raw: bool = False) -> np.ndarray:
        """Full-resolution ground truth rows [start, stop): float32 (stop - start, W, C).

        Args:
            start, stop: row range of the full-resolution image.
            raw: False (default): normalized with the training min/max (with downsample > 1 the full image can
                leave [0, 1] slightly). True: the reference's SR targets, not min-max normalized: uint8 / 255,
                uint16 / 65535, other dtypes as stored.
        """
        start, stop = self._check_rows(start, stop)
        block = np.asarray(self._full[start:stop], dtype=np.float64)
        if raw:
            kind = self._full.dtype
            if kind == np.uint8:
                block = block / 255.0
            elif kind == np.uint16:
                block = block / 65535.0
        else:
            block = (block - self.value_min) / self._span
        return block.astype(np.float32)

    def iter_rows(self, rows_per_chunk: Optional[int] = None, raw: bool = False
                  ) -> Iterator[Tuple[int, np.ndarray]]:
        """(start row, float32 (h, W, C) block) over the full-resolution image, top to bottom; default chunks
        hold about 2^22 values."""
        H = self.image_shape[0]
        step = rows_per_chunk or _strip_rows(self._full.shape)
        for r in range(0, H, step):
            yield r, self.rows(r, min(H, r + step), raw=raw)

    def train_rows(self, start: int, stop: int) -> np.ndarray:
        """Normalized training-image rows [start, stop) (the values batches sample): float32 (h', w, C)."""
        h = self.train_shape[0]
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= h):
            raise IndexError(f"rows [{start}, {stop}) out of range for a training image of {h} rows")
        return self._normalize_train(self._train[start:stop]).astype(np.float32)

    def _channel_means(self) -> np.ndarray:
        if self._mean is None:
            total = np.zeros(self.out_dim, dtype=np.float64)
            step = _strip_rows(self._train.shape)
            for r in range(0, self.train_shape[0], step):
                total += self._normalize_train(self._train[r:r + step]).sum(axis=(0, 1))
            self._mean = total / (self.train_shape[0] * self.train_shape[1])
        return self._mean

    @property
    def train_value_mean(self) -> float:
        """Mean of the normalized training pixels over all pixels and channels (computed once, in strips)."""
        return float(self._channel_means().mean())

    @property
    def train_channel_means(self) -> list:
        """Per-channel means of the normalized training pixels."""
        return [float(m) for m in self._channel_means()]

    def meta(self) -> dict:
        """JSON-serializable facts: path, image_shape, train_shape, channels, dtype, value_min, value_max (data
        units, the normalization of the training image), downsample, log2batch, steps_per_epoch, augment,
        vp_lattice, tau_x, sigma_x, alpha_dropped, train_value_mean, train_channel_means."""
        return {"path": os.path.abspath(self.path), "image_shape": list(self.image_shape),
                "train_shape": list(self.train_shape), "channels": self.out_dim, "dtype": self.dtype,
                "value_min": self.value_min, "value_max": self.value_max, "downsample": self.downsample,
                "log2batch": self.log2batch, "steps_per_epoch": self.steps_per_epoch, "augment": self.augment,
                "vp_lattice": self.vp_lattice,
                "tau_x": None if self.tau_x is None else [float(t) for t in self.tau_x],
                "sigma_x": None if self.sigma_x is None else [float(s) for s in self.sigma_x],
                "alpha_dropped": self.alpha_dropped, "train_value_mean": self.train_value_mean,
                "train_channel_means": self.train_channel_means}

    # ------------------------------------------------------------------------------------------ batches
    def interpolate(self, x: np.ndarray) -> np.ndarray:
        """Bilinear (align corners) interpolation of the normalized training image at coordinates.

        Args:
            x: (N, 2) coordinates (column, row) in [-1, 1] (clamped).

        Returns:
            float64 (N, C); exact at pixel positions; computed from the stored pixels at the 4 corners.
        """
        x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
        h, w = self.train_shape
        index = np.stack([(x[:, 1] + 1.0) * 0.5 * (h - 1), (x[:, 0] + 1.0) * 0.5 * (w - 1)], axis=-1)
        flat, wts = linear_stencil(index, (h, w))  # (4, N) corners in C order of (h, w), weights
        vals = np.asarray(self._train[flat // w, flat % w], dtype=np.float64)  # (4, N, C)
        out = wts[0][:, None] * vals[0]
        for k in range(1, 4):
            out += wts[k][:, None] * vals[k]
        return self._normalize_train(out)

    def sample_batch(self, step: int, rank: int = 0) -> Dict[str, torch.Tensor]:
        """The training batch of (seed, step, rank).

        Draws N rows and N columns (independent, with replacement) of the training image; without augmentation
        the targets are those pixels, with VP-S the bilinear interpolation at the jittered coordinates.

        Returns:
            dict with float32 tensors ``x`` (1, N, 2) (column 0 = column / width axis, column 1 = row),
            ``v`` (1, N, C) normalized values, ``c`` (1, 0).
        """
        if not (_is_int(step) and step >= 0 and _is_int(rank) and rank >= 0):
            raise ValueError(f"step and rank must be integers >= 0, got step={step!r}, rank={rank!r}")
        rng = np.random.default_rng([self.seed, int(step), int(rank)])
        h, w = self.train_shape
        n = self.batch_size
        i = rng.integers(0, h, size=n, dtype=np.int64)
        j = rng.integers(0, w, size=n, dtype=np.int64)
        col = 2.0 * j / (w - 1) - 1.0
        row = 2.0 * i / (h - 1) - 1.0
        if self._aug is None:
            x = np.stack([col, row], axis=-1).astype(np.float32)
            v = self._normalize_train(self._train[i, j])
        else:
            x0 = np.stack([col, row] if self.vp_lattice == "pixel" else [row, col], axis=-1)
            x = np.clip(x0 + truncated_noise(rng, x0.shape, self._aug.sigma_x, self._aug.tau_x), -1.0, 1.0)
            x = x.astype(np.float32)
            if self._aug.mode == "vp_s":
                v = self.interpolate(x)  # at the float32 coordinates the model sees
            elif self.vp_lattice == "pixel":  # vc: the pixel's own value
                v = self._normalize_train(self._train[i, j])
            else:  # vc on the reference lattice: the value at the un-jittered (transposed) position
                v = self.interpolate(x0)
        return {"x": torch.from_numpy(np.ascontiguousarray(x[None])),
                "v": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)[None]),
                "c": torch.zeros((1, 0), dtype=torch.float32)}

    def __repr__(self) -> str:
        return (f"ImageDataset({self.path!r}, shape={list(self.image_shape)}, channels={self.out_dim}, "
                f"train_shape={list(self.train_shape)}, augment={self.augment!r}, vp_lattice={self.vp_lattice!r})")
