"""Image evaluation (spec vision 1.4): chunked reconstruction, PSNR, SSIM, LPIPS, PNG dumps, one streaming driver.

Conventions: images are (H, W, C) arrays of normalized values (data range 1); pixel (row i, col j) has the
model coordinate x = (2 j / (W - 1) - 1, 2 i / (H - 1) - 1) (column first, align corners, as
``datasets.image``); "row-major" flat pixel p = i W + j. A model is any callable
``model_fn(x: (1, n, 2) float32 tensor) -> (1, n, C)`` (e.g. ``lambda x: model(x, c_empty)``).

Two protocols for every region-based metric:

- **ours (default)**: PSNR over the whole image; SSIM (and LPIPS) on true image tiles: the image is cut into
  ceil(H / tile) x ceil(W / tile) tiles of near-equal size (at most ``tile`` pixels a side, edges from
  ``tile_edges``), SSIM per tile and channel, averaged over channels, then plain mean over tiles.
- **reference** (to compare with the paper's numbers): ``chunked_mse`` (mean over consecutive row-major chunks of
  2^21 pixels of each chunk's MSE, the short last chunk weighted like a full one) and ``ssim_raster``: the
  row-major pixel stream cut into consecutive chunks of h_w * w_w pixels (``raster_window``; a trailing partial
  chunk is dropped), each chunk re-wrapped to (h_w, w_w) per channel (pixel k of a chunk -> (k // w_w, k % w_w);
  these are not image tiles), SSIM per chunk and channel, averaged over channels then chunks. LPIPS likewise on
  the raster chunks, with [0, 1] inputs not rescaled to [-1, 1] (the reference's); on tiles it is rescaled.
  Whether the reference re-wraps per channel (as here) or reshapes the interleaved (pixel, channel) memory is
  not stated by the spec; per channel is what "each chunk is ~105 image rows re-wrapped" describes.

SSIM: ``util.metrics.ssim`` (11-tap Gaussian window, sigma 1.5, K = (0.01, 0.03), population covariances, valid
region only, float64), which is pytorch-msssim's (the reference's) formula. On one tile covering the whole image
it equals ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=-1)`` (skimage filters with reflect padding and then
crops the 5-pixel border, which leaves exactly the valid region; tested). Differences: for a tile or raster
window shorter than 11 pixels on an axis, ``util.metrics.ssim`` shrinks the window to the largest odd size that
fits, whereas pytorch-msssim skips smoothing on that axis (only tiny images are affected).

LPIPS (VGG) runs only when the ``lpips`` package, torchvision, lpips' linear-layer weights and torchvision's
cached VGG16 checkpoint are all present locally (``lpips_status``); nothing is ever downloaded. Otherwise the
value is None and one log line says why.

Inference time (``evaluate_image`` / ``inference_time``) = bake + the forward calls of all chunks (wall clock,
CUDA synchronized around each call; coordinate generation, device-to-host copies and metrics excluded), as the
reference reports it.

Memory of ``evaluate_image``: one band of rows at a time (band height = the tile height, or chunk_size / W rows
without tiles): prediction and truth float32 (2 x band x W x C x 4 bytes; Pearl with 512-pixel tiles: ~0.25 GB)
plus float64 temporaries of the same band (the difference, the dataset's read of the rows: ~0.5 GB more for
Pearl), the raster buffer (< 2 raster chunks), and with ``out_dir`` the uint8 prediction (H W C bytes, Pearl
1.41 GB) and error image ("hot": 3 H W bytes, "gray": H W); saving a PNG makes Pillow hold one more copy.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from util.files import atomic_write
from util.metrics import psnr_from_mse
from util.metrics import ssim as ssim_2d
from util.timing import synchronize

__all__ = ["DEFAULT_CHUNK", "PROTOCOLS", "image_coords", "iter_predictions", "reconstruct", "inference_time",
           "mse", "psnr", "chunked_mse", "psnr_chunked", "raster_window", "tile_edges", "ssim_image", "ssim_tiles",
           "ssim_raster", "lpips_status", "load_lpips", "lpips_tiles", "lpips_raster", "to_uint8", "save_png",
           "error_image", "save_error_png", "evaluate_image"]

log = logging.getLogger(__name__)

#: the reference's eval_batch_size: points per forward chunk, pixels per MSE chunk, area of a raster window
DEFAULT_CHUNK = 1 << 21
PROTOCOLS = ("tiles", "raster", "both")
ModelFn = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------- reconstruction
def image_coords(H: int, W: int, start: int, stop: int, device=None) -> torch.Tensor:
    """Coordinates of row-major flat pixels [start, stop) of an H x W image: float32 (stop - start, 2), column 0
    = 2 col / (W - 1) - 1, column 1 = 2 row / (H - 1) - 1 (an axis of one pixel maps to 0)."""
    if H < 1 or W < 1 or not 0 <= start <= stop <= H * W:
        raise ValueError(f"pixel range [{start}, {stop}) out of range for an image of {H} x {W}")
    p = torch.arange(start, stop, dtype=torch.int64)
    row, col = (p // W).double(), (p % W).double()
    x = 2.0 * col / (W - 1) - 1.0 if W > 1 else torch.zeros_like(col)
    y = 2.0 * row / (H - 1) - 1.0 if H > 1 else torch.zeros_like(row)
    out = torch.stack([x, y], dim=-1).float()
    return out.to(device) if device is not None else out


@torch.no_grad()
def _forward(model_fn: ModelFn, x: torch.Tensor, autocast: bool) -> Tuple[torch.Tensor, float]:
    """One timed model call on (n, 2) coordinates -> ((n, C) float32 on the device, seconds)."""
    dev = x.device
    synchronize(dev)
    t0 = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.float16, enabled=autocast):
        out = model_fn(x[None])
    out = out.float()
    synchronize(dev)
    dt = time.perf_counter() - t0
    if out.dim() != 3 or out.shape[0] != 1 or out.shape[1] != x.shape[0]:
        raise ValueError(f"model_fn must map x (1, n, 2) to (1, n, C); for n = {x.shape[0]} it returned "
                         f"{tuple(out.shape)}")
    return out[0], dt


def iter_predictions(model_fn: ModelFn, H: int, W: int, chunk_size: int = DEFAULT_CHUNK, device="cpu",
                     autocast: bool = False, start: int = 0, stop: Optional[int] = None
                     ) -> Iterator[Tuple[int, np.ndarray, float]]:
    """Predictions of row-major flat pixels [start, stop) (default the whole image) in chunks.

    Args:
        model_fn: ``(1, n, 2) -> (1, n, C)``.
        H, W: image size.
        chunk_size: points per model call.
        device: where the coordinates are made (the model's device).
        autocast: fp16 autocast around the model call (the reference's CUDA evaluation).
        start, stop: flat pixel range.

    Yields:
        (first flat pixel, float32 numpy (n, C), seconds of the model call).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    stop = H * W if stop is None else stop
    for s in range(start, stop, chunk_size):
        x = image_coords(H, W, s, min(stop, s + chunk_size), device)
        out, dt = _forward(model_fn, x, autocast)
        yield s, out.cpu().numpy(), dt


def reconstruct(model_fn: ModelFn, H: int, W: int, chunk_size: int = DEFAULT_CHUNK, device="cpu",
                autocast: bool = False) -> np.ndarray:
    """The whole predicted image, float32 (H, W, C) (for images that fit in memory; ``evaluate_image`` streams)."""
    parts = [p for _, p, _ in iter_predictions(model_fn, H, W, chunk_size, device, autocast)]
    return np.concatenate(parts).reshape(H, W, -1)


def inference_time(model_fn: ModelFn, H: int, W: int, chunk_size: int = DEFAULT_CHUNK, device="cpu",
                   autocast: bool = False, bake: Optional[Callable[[], Any]] = None) -> Dict[str, float]:
    """Time a full reconstruction the reference's way: bake (if given) + every forward chunk.

    Returns:
        dict bake_s, forward_s (sum of the synchronized model calls), infer_s = bake_s + forward_s, points,
        points_per_s (points / infer_s).
    """
    bake_s = _timed_bake(bake, device)
    forward_s = sum(dt for _, _, dt in iter_predictions(model_fn, H, W, chunk_size, device, autocast))
    return _timing(bake_s, forward_s, H * W)


def _timed_bake(bake: Optional[Callable[[], Any]], device) -> float:
    if bake is None:
        return 0.0
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        bake()
    synchronize(device)
    return time.perf_counter() - t0


def _timing(bake_s: float, forward_s: float, points: int) -> Dict[str, float]:
    infer = bake_s + forward_s
    return {"bake_s": bake_s, "forward_s": forward_s, "infer_s": infer, "points": int(points),
            "points_per_s": points / infer if infer > 0 else math.inf}


# ------------------------------------------------------------------------------------------------ PSNR
def _pair(pred, truth) -> Tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(truth)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs truth {t.shape}")
    if p.size == 0:
        raise ValueError("empty images")
    if p.ndim == 2:
        p, t = p[..., None], t[..., None]
    if p.ndim != 3:
        raise ValueError(f"images must be (H, W) or (H, W, C), got {p.shape}")
    return p, t


def _sse(p: np.ndarray, t: np.ndarray) -> float:
    d = (np.asarray(p, dtype=np.float64) - np.asarray(t, dtype=np.float64)).ravel()
    return float(np.dot(d, d))


def mse(pred, truth) -> float:
    """Mean squared error over all pixels and channels (float64)."""
    p, t = _pair(pred, truth)
    return _sse(p, t) / p.size


def psnr(pred, truth, data_range: float = 1.0) -> float:
    """PSNR over the whole image: 10 log10(data_range^2 / MSE); +inf for identical images."""
    return psnr_from_mse(mse(pred, truth), data_range)


def chunked_mse(pred, truth, chunk: int = DEFAULT_CHUNK) -> float:
    """The reference's MSE (spec 1.4 item 4): the mean over consecutive row-major chunks of ``chunk`` pixels of
    each chunk's MSE (over its pixels and channels); the short last chunk is weighted like a full one."""
    p, t = _pair(pred, truth)
    C = p.shape[2]
    pf, tf = p.reshape(-1, C), t.reshape(-1, C)
    vals = [_sse(pf[s:s + chunk], tf[s:s + chunk]) / (min(chunk, len(pf) - s) * C) for s in range(0, len(pf), chunk)]
    return float(np.mean(vals))


def psnr_chunked(pred, truth, chunk: int = DEFAULT_CHUNK, data_range: float = 1.0) -> float:
    """PSNR of ``chunked_mse`` (the reference's PSNR)."""
    return psnr_from_mse(chunked_mse(pred, truth, chunk), data_range)


# ------------------------------------------------------------------------------------------------ SSIM
def raster_window(H: int, W: int, chunk: int = DEFAULT_CHUNK) -> Tuple[int, int]:
    """The reference's SSIM/LPIPS window (h_w, w_w) = round(sqrt(chunk) (H, W) / sqrt(H W)), each at least 1
    (Pearl 23466 x 20000 -> (1569, 1337); Tokyo 21450 x 56718 -> (891, 2355))."""
    s = math.sqrt(chunk) / math.sqrt(H * W)
    return max(1, int(round(s * H))), max(1, int(round(s * W)))


def tile_edges(n: int, tile: int) -> np.ndarray:
    """Edges of ceil(n / tile) near-equal parts of an n-pixel axis (sizes differ by at most 1, each <= tile):
    int64 (parts + 1,) from 0 to n."""
    if tile < 1 or n < 1:
        raise ValueError(f"tile and n must be >= 1, got tile={tile}, n={n}")
    parts = -(-n // tile)
    return np.array([k * n // parts for k in range(parts + 1)], dtype=np.int64)


def _ssim_kw(win_size: int, sigma: float, k1: float, k2: float, data_range: float) -> Dict[str, Any]:
    return dict(win_size=win_size, sigma=sigma, k1=k1, k2=k2, data_range=data_range)


def ssim_image(pred, truth, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
               data_range: float = 1.0, device=None) -> float:
    """SSIM of one (h, w, C) image region: ``util.metrics.ssim`` per channel (valid region), mean over channels."""
    p, t = _pair(pred, truth)
    kw = _ssim_kw(win_size, sigma, k1, k2, data_range)
    vals = []
    for c in range(p.shape[2]):
        pc = torch.from_numpy(np.ascontiguousarray(p[..., c], dtype=np.float64))
        tc = torch.from_numpy(np.ascontiguousarray(t[..., c], dtype=np.float64))
        if device is not None:
            pc, tc = pc.to(device), tc.to(device)
        vals.append(ssim_2d(pc, tc, **kw))
    return float(np.mean(vals))


def ssim_tiles(pred, truth, tile: int = 512, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
               k2: float = 0.03, data_range: float = 1.0, device=None) -> float:
    """SSIM on true image tiles (our default protocol): near-equal tiles of at most ``tile`` x ``tile`` pixels
    (``tile_edges``), ``ssim_image`` per tile, plain mean over tiles."""
    p, t = _pair(pred, truth)
    re, ce = tile_edges(p.shape[0], tile), tile_edges(p.shape[1], tile)
    vals = [ssim_image(p[r0:r1, c0:c1], t[r0:r1, c0:c1], win_size, sigma, k1, k2, data_range, device)
            for r0, r1 in zip(re[:-1], re[1:]) for c0, c1 in zip(ce[:-1], ce[1:])]
    return float(np.mean(vals))


def _raster_chunks(pf: np.ndarray, tf: np.ndarray, window: Tuple[int, int]):
    """(pred, truth) (h_w, w_w, C) re-wraps of the complete consecutive h_w * w_w-pixel chunks of flat (n, C)."""
    h_w, w_w = window
    L = h_w * w_w
    for s in range(0, len(pf) - L + 1, L):
        yield pf[s:s + L].reshape(h_w, w_w, -1), tf[s:s + L].reshape(h_w, w_w, -1)


def ssim_raster(pred, truth, window: Optional[Tuple[int, int]] = None, chunk: int = DEFAULT_CHUNK,
                win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
                data_range: float = 1.0, device=None) -> float:
    """The reference's SSIM protocol (spec 1.4 item 5): consecutive row-major chunks of h_w * w_w pixels
    (``window``, default ``raster_window(H, W, chunk)``) re-wrapped to (h_w, w_w) per channel, the trailing partial
    chunk dropped; mean over chunks of ``ssim_image``. NaN when the image holds no complete chunk."""
    p, t = _pair(pred, truth)
    window = raster_window(p.shape[0], p.shape[1], chunk) if window is None else tuple(window)
    C = p.shape[2]
    vals = [ssim_image(a, b, win_size, sigma, k1, k2, data_range, device)
            for a, b in _raster_chunks(p.reshape(-1, C), t.reshape(-1, C), window)]
    return float(np.mean(vals)) if vals else math.nan


# ------------------------------------------------------------------------------------------------ LPIPS
def lpips_status() -> Tuple[bool, str]:
    """Whether LPIPS-VGG can run without downloading anything: (available, reason in one line)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return False, "LPIPS skipped: the lpips package is not installed (pip install lpips, with its VGG weights cached)"
    if importlib.util.find_spec("torchvision") is None:
        return False, "LPIPS skipped: torchvision (needed by lpips) is not installed"
    pkg = list(spec.submodule_search_locations)[0]
    lin = os.path.join(pkg, "weights", "v0.1", "vgg.pth")
    if not os.path.isfile(lin):
        return False, f"LPIPS skipped: lpips' VGG linear-layer weights {lin} are missing"
    ckpt = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not glob.glob(os.path.join(ckpt, "vgg16-*.pth")):
        return False, (f"LPIPS skipped: torchvision's VGG16 weights are not cached in {ckpt} (lpips would download "
                       f"them; this program never downloads)")
    return True, "LPIPS-VGG weights found locally"


def load_lpips(device="cpu"):
    """An LPIPS-VGG module on ``device`` when ``lpips_status`` allows it, else None (one log line says why)."""
    ok, why = lpips_status()
    if not ok:
        log.info(why)
        return None
    import lpips

    return lpips.LPIPS(net="vgg", verbose=False).to(device).eval()


@torch.no_grad()
def _lpips_one(model, p: np.ndarray, t: np.ndarray, rescale: bool, device) -> float:
    """LPIPS of one (h, w, C) pair; grayscale repeated to 3 channels; rescale: [0, 1] -> [-1, 1] (lpips'
    normalize=True), else the values go in as they are (the reference)."""
    def prep(a):
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)[None]
        return (x.expand(1, 3, *x.shape[2:]) if x.shape[1] == 1 else x).to(device)

    return float(model(prep(p), prep(t), normalize=rescale).mean())


def lpips_tiles(pred, truth, model=None, tile: int = 512, device="cpu") -> Optional[float]:
    """LPIPS-VGG on true tiles (inputs rescaled to [-1, 1]), mean over tiles; None when unavailable."""
    model = load_lpips(device) if model is None else model
    if model is None:
        return None
    p, t = _pair(pred, truth)
    re, ce = tile_edges(p.shape[0], tile), tile_edges(p.shape[1], tile)
    return float(np.mean([_lpips_one(model, p[r0:r1, c0:c1], t[r0:r1, c0:c1], True, device)
                          for r0, r1 in zip(re[:-1], re[1:]) for c0, c1 in zip(ce[:-1], ce[1:])]))


def lpips_raster(pred, truth, model=None, window: Optional[Tuple[int, int]] = None, chunk: int = DEFAULT_CHUNK,
                 device="cpu") -> Optional[float]:
    """The reference's LPIPS: raster chunks as ``ssim_raster``, [0, 1] inputs not rescaled; None when
    unavailable, NaN without a complete chunk."""
    model = load_lpips(device) if model is None else model
    if model is None:
        return None
    p, t = _pair(pred, truth)
    window = raster_window(p.shape[0], p.shape[1], chunk) if window is None else tuple(window)
    C = p.shape[2]
    vals = [_lpips_one(model, a, b, False, device) for a, b in _raster_chunks(p.reshape(-1, C), t.reshape(-1, C),
                                                                              window)]
    return float(np.mean(vals)) if vals else math.nan


# ------------------------------------------------------------------------------------------------ images
def to_uint8(img) -> np.ndarray:
    """Normalized values -> uint8: round(clip(v, 0, 1) * 255); uint8 input is returned as is."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    return np.rint(np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(path: str, img) -> str:
    """Write an (H, W), (H, W, 1) or (H, W, 3) image (normalized floats or uint8) as an 8-bit PNG; returns path."""
    from PIL import Image

    a = to_uint8(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"save_png: expected (H, W), (H, W, 1) or (H, W, 3), got {a.shape}")
    img = Image.fromarray(np.ascontiguousarray(a))
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def _hot(e: np.ndarray) -> np.ndarray:
    """Black -> red -> yellow -> white colormap of values in [0, 1]: uint8 (..., 3)."""
    rgb = np.stack([np.clip(3 * e, 0, 1), np.clip(3 * e - 1, 0, 1), np.clip(3 * e - 2, 0, 1)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


def error_image(pred, truth, gain: float = 10.0, colormap: str = "hot") -> np.ndarray:
    """|pred - truth| averaged over channels, times ``gain``, clipped to [0, 1] and mapped to uint8:
    ``colormap`` "gray" -> (H, W), "hot" (black-red-yellow-white) -> (H, W, 3). gain 10: an error of 0.1 (and
    more) is full scale."""
    if colormap not in ("gray", "hot"):
        raise ValueError(f"colormap must be 'gray' or 'hot', got {colormap!r}")
    p, t = _pair(pred, truth)
    e = np.clip(np.abs(p.astype(np.float32) - t.astype(np.float32)).mean(axis=2) * gain, 0.0, 1.0)
    return _hot(e) if colormap == "hot" else np.rint(e * 255).astype(np.uint8)


def save_error_png(path: str, pred, truth, gain: float = 10.0, colormap: str = "hot") -> str:
    """``error_image`` written as PNG; returns path."""
    return save_png(path, error_image(pred, truth, gain, colormap))


# ------------------------------------------------------------------------------------------------ driver
class _Truth:
    """Ground truth rows from an (H, W[, C]) array or a dataset (``image_shape`` and ``rows(start, stop)``)."""

    def __init__(self, truth, raw: bool):
        if hasattr(truth, "rows") and hasattr(truth, "image_shape"):
            self.H, self.W = (int(s) for s in truth.image_shape)
            self._get = (lambda a, b: truth.rows(a, b, raw=True)) if raw else truth.rows
        else:
            arr = np.asarray(truth)
            arr = arr[..., None] if arr.ndim == 2 else arr
            if arr.ndim != 3:
                raise ValueError(f"truth must be (H, W[, C]) or a dataset with rows(); got shape {arr.shape}")
            self.H, self.W = arr.shape[:2]
            self._get = lambda a, b: arr[a:b]

    def rows(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self._get(a, b), dtype=np.float32)


def evaluate_image(model_fn: ModelFn, truth, chunk_size: int = DEFAULT_CHUNK, device="cpu", autocast: bool = False,
                   bake: Optional[Callable[[], Any]] = None, protocol: str = "tiles", tile: int = 512,
                   mse_chunk: int = DEFAULT_CHUNK, raster_chunk: int = DEFAULT_CHUNK, lpips: bool = True,
                   raw_truth: bool = False, metric_device=None, out_dir: Optional[str] = None,
                   prefix: str = "image", error_gain: float = 10.0, colormap: str = "hot") -> Dict[str, Any]:
    """Reconstruct the full image in chunks and score it, streaming band by band (gigapixel-safe).

    The image is processed in bands of rows (the tile rows with the tile protocol, else about ``chunk_size``
    pixels); forward chunks never span two bands, so the last chunk of each band may be short (the timing counts
    every call). Equals the pure functions on the whole arrays: ``psnr``, ``chunked_mse`` (chunk ``mse_chunk``),
    ``ssim_tiles`` (``tile``), ``ssim_raster`` (window ``raster_window(H, W, raster_chunk)``), ``lpips_tiles``,
    ``lpips_raster``.

    Args:
        model_fn: ``(1, n, 2) -> (1, n, C)`` normalized predictions.
        truth: (H, W[, C]) normalized array, or a dataset with ``image_shape`` and ``rows(start, stop)`` (e.g.
            ``datasets.image.ImageDataset``: full resolution, also with downsample).
        chunk_size: points per model call (the reference: 2^21).
        device: the model's device (coordinates are made there).
        autocast: fp16 autocast around model calls (the reference's CUDA evaluation).
        bake: called once before the first chunk and timed (e.g. ``model.bake``).
        protocol: SSIM / LPIPS protocol: "tiles" (ours), "raster" (the reference's) or "both".
        tile: tile side of the tile protocol.
        mse_chunk: pixels per chunk of the reference's chunked MSE.
        raster_chunk: area of the reference's raster window.
        lpips: compute LPIPS when its weights are available locally (else None and one log line).
        raw_truth: with a dataset truth, use ``rows(..., raw=True)`` (the reference's un-normalized SR targets).
        metric_device: device of the SSIM computation (default CPU).
        out_dir: when given, write ``<prefix>_pred.png`` and ``<prefix>_error.png`` there.
        prefix: file name prefix of the PNGs.
        error_gain, colormap: see ``error_image``.

    Returns:
        dict: psnr, mse (whole image), psnr_chunked, mse_chunked (reference), ssim (tiles) and ssim_raster
        (NaN when not requested), lpips and lpips_raster (None when unavailable or not requested), protocol,
        tile, raster_window, bake_s, forward_s, infer_s, points, points_per_s, height, width, channels,
        pred_png, error_png (paths or None).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    src = _Truth(truth, raw_truth)
    H, W = src.H, src.W
    use_tiles, use_raster = protocol in ("tiles", "both"), protocol in ("raster", "both")
    lp_model = load_lpips(device) if lpips else None
    window = raster_window(H, W, raster_chunk)
    L = window[0] * window[1]

    if use_tiles:
        row_edges, col_edges = tile_edges(H, tile), tile_edges(W, tile)
    else:
        step = max(1, chunk_size // W)
        row_edges = np.array(list(range(0, H, step)) + [H], dtype=np.int64)
        col_edges = None

    bake_s = _timed_bake(bake, device)
    forward_s = 0.0
    sse, n_vals = 0.0, 0
    mse_chunks: List[float] = []
    cur_sse, cur_n = 0.0, 0  # the open MSE chunk
    ssim_t, lp_t, ssim_r, lp_r = [], [], [], []
    pend_p: List[np.ndarray] = []  # raster buffer (flat (n, C) pieces)
    pend_t: List[np.ndarray] = []
    pend_n = 0
    C = None
    pred_u8 = err_u8 = None

    for r0, r1 in zip(row_edges[:-1], row_edges[1:]):
        r0, r1 = int(r0), int(r1)
        parts = []
        for _, pr, dt in iter_predictions(model_fn, H, W, chunk_size, device, autocast, r0 * W, r1 * W):
            parts.append(pr)
            forward_s += dt
        pf = np.concatenate(parts)
        tb = src.rows(r0, r1)
        if C is None:
            C = tb.shape[2]
            if out_dir is not None:
                pred_u8 = np.empty((H, W, C), dtype=np.uint8)
                err_u8 = np.empty((H, W, 3) if colormap == "hot" else (H, W), dtype=np.uint8)
        if pf.shape[1] != C or tb.shape != (r1 - r0, W, C):
            raise ValueError(f"prediction has {pf.shape[1]} channels, truth rows {r0}..{r1} have shape "
                             f"{tb.shape} (expected ({r1 - r0}, {W}, C))")
        tf = tb.reshape(-1, C)
        # whole-image and chunked MSE
        d = pf.astype(np.float64) - tf
        sq = np.einsum("ij,ij->i", d, d)  # per pixel
        sse += float(sq.sum())
        n_vals += d.size
        pos = 0
        while pos < len(sq):
            take = min(mse_chunk - cur_n, len(sq) - pos)
            cur_sse += float(sq[pos:pos + take].sum())
            cur_n += take
            pos += take
            if cur_n == mse_chunk:
                mse_chunks.append(cur_sse / (cur_n * C))
                cur_sse, cur_n = 0.0, 0
        pb = pf.reshape(r1 - r0, W, C)
        if use_tiles:
            for c0, c1 in zip(col_edges[:-1], col_edges[1:]):
                a, b = pb[:, c0:c1], tb[:, c0:c1]
                ssim_t.append(ssim_image(a, b, device=metric_device))
                if lp_model is not None:
                    lp_t.append(_lpips_one(lp_model, a, b, True, device))
        if use_raster:
            pend_p.append(pf)
            pend_t.append(tf)
            pend_n += len(pf)
            if pend_n >= L:
                bp, bt = np.concatenate(pend_p), np.concatenate(pend_t)
                n_full = (pend_n // L) * L
                for a, b in _raster_chunks(bp[:n_full], bt[:n_full], window):
                    ssim_r.append(ssim_image(a, b, device=metric_device))
                    if lp_model is not None:
                        lp_r.append(_lpips_one(lp_model, a, b, False, device))
                pend_p, pend_t, pend_n = [bp[n_full:]], [bt[n_full:]], pend_n - n_full
        if pred_u8 is not None:
            pred_u8[r0:r1] = to_uint8(pb)
            err_u8[r0:r1] = error_image(pb, tb, error_gain, colormap)
    if cur_n:
        mse_chunks.append(cur_sse / (cur_n * C))  # the short last chunk, weighted like a full one

    m = sse / n_vals
    mc = float(np.mean(mse_chunks))
    out: Dict[str, Any] = {
        "psnr": psnr_from_mse(m), "mse": m, "psnr_chunked": psnr_from_mse(mc), "mse_chunked": mc,
        "ssim": float(np.mean(ssim_t)) if ssim_t else math.nan,
        "ssim_raster": float(np.mean(ssim_r)) if ssim_r else math.nan,
        "lpips": float(np.mean(lp_t)) if lp_t else None,
        "lpips_raster": float(np.mean(lp_r)) if lp_r else None,
        "protocol": protocol, "tile": int(tile), "raster_window": list(window),
        "height": H, "width": W, "channels": int(C), "pred_png": None, "error_png": None,
        **_timing(bake_s, forward_s, H * W)}
    if out_dir is not None:
        out["pred_png"] = save_png(os.path.join(out_dir, f"{prefix}_pred.png"), pred_u8)
        out["error_png"] = save_png(os.path.join(out_dir, f"{prefix}_error.png"), err_u8)
    return out
