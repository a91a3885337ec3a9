"""Compression outputs and evaluation of MoE-INR runs (spec moe_inr.md 1, 5, 6, 9, 10).

Artifact and ratios
-------------------
The stored artifact is the network's weights in fp16 (:func:`save_fp16`: an 8-byte magic, a little-endian
uint64 header length, a JSON header with each tensor's name and shape, then the fp16 values in state-dict order).
Metrics are computed from these weights cast back to fp32 (:func:`load_fp16`), so they describe what is stored.
CR = raw float32 bytes (T Z Y X x 4) / stored bytes, reported twice: over 2 x #params (the paper's definition)
and over the artifact's real file size (header included).

Decompression = evaluating the network at every voxel of every time step (top-1 routing in "top1" mode),
timed on the evaluation device (CUDA synchronized).

Metrics (normalized [-1, 1] values; "NR" choices of the paper are documented here)
--------------------------------------------------------------------------------
- PSNR per time step with peak = the data range 2 (``util.metrics.psnr(data_range=2)``), and their mean (the
  paper's "average PSNR").
- SSIM (``util.metrics.ssim``, Gaussian window, data range 2) on the middle slice of each spatial axis of each
  time step, averaged.
- CD (:func:`chamfer_distance`): isosurfaces by marching cubes (scikit-image) at each isovalue, vertices in voxel
  units (subsampled to ``cd_max_points`` with seed 0), symmetric mean of nearest-neighbour L2 distances (SciPy
  cKDTree): CD = (mean_a d(a, B) + mean_b d(b, A)) / 2. Averaged over the evaluated time steps where both
  surfaces exist; a step whose truth does not cross the isovalue is skipped; a prediction without a surface
  where the truth has one scores the grid diagonal (a bounded penalty, counted in ``cd_missing``).
- Uncertainty mode (model.mode "average"): PC = Pearson correlation of per-voxel variance and absolute error
  over all voxels; JI-ST (:func:`jaccard_tolerance`, our definition, RMDSRN's is not in the text): U = voxels
  whose variance is above its ``ji_quantile`` quantile, E = same for the error; with D_r the dilation by r voxels
  (cube), TP = (|U & D_r(E)| + |E & D_r(U)|) / 2 and JI = TP / (|U| + |E| - TP) (r = 0: the plain Jaccard index).
- LPIPS needs rendered images and AlexNet weights that are not downloaded: not computed here.

Error-bounded compressors (spec 9)
----------------------------------
SZ3 (package ``pysz``, absolute error bound), ZFP (package ``zfpy``, fixed-accuracy tolerance) and ZFP in
fixed-rate mode (``zfp_rate``, bits per value) compress each normalized float32 time step separately (the paper
does not say per step or 4-D). :func:`match_psnr` bisects the error bound (or the rate) on a log scale until the
mean PSNR is within ``psnr_tol`` dB of the target (the INR's), then
reports CR (raw float32 bytes / compressed bytes), compression and decompression time and the maximum error.
A missing package raises an ImportError naming it.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from datasets.timevolume import time_coords
from util.metrics import psnr as _psnr
from util.metrics import ssim as _ssim
from util.tables import text_table

__all__ = ["save_fp16", "load_fp16", "compression_ratios", "decompress_step", "psnr_steps", "slice_ssim",
           "isosurface", "chamfer_distance", "pearson", "PearsonSums", "jaccard_tolerance", "SZ3Compressor", "ZFPCompressor",
           "get_compressor", "match_psnr", "evaluate_volumes", "score", "result_files", "format_table", "DATA_RANGE"]

log = logging.getLogger(__name__)

DATA_RANGE = 2.0  # normalized values live in [-1, 1]
_MAGIC = b"MOEFP16\0"


# ------------------------------------------------------------------------------------------- artifact
def save_fp16(model: torch.nn.Module, path: str) -> Dict[str, int]:
    """Write the model's floating-point state as fp16 (format in the module docstring).

    Returns:
        ``{"n_params": values stored, "file_bytes": size of the file}``.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}
    names = list(state)
    header = json.dumps({"names": names, "shapes": [list(state[n].shape) for n in names]}).encode()
    body = b"".join(state[n].to(torch.float16).numpy().astype("<f2").tobytes() for n in names)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_MAGIC + struct.pack("<Q", len(header)) + header + body)
    os.replace(tmp, path)
    return {"n_params": sum(state[n].numel() for n in names), "file_bytes": os.path.getsize(path)}


def load_fp16(path: str) -> Dict[str, torch.Tensor]:
    """The fp16 artifact as a float32 state dict (the values that were stored)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != _MAGIC:
        raise ValueError(f"{path}: not an fp16 weights file (magic bytes {data[:8]!r})")
    (n,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16:16 + n])
    pos, out = 16 + n, {}
    for name, shape in zip(header["names"], header["shapes"]):
        count = int(np.prod(shape)) if shape else 1
        a = np.frombuffer(data, "<f2", count, pos).astype(np.float32).reshape(shape)
        out[name] = torch.from_numpy(a.copy())
        pos += 2 * count
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} bytes after the last tensor (corrupt header?)")
    return out


def compression_ratios(raw_bytes: int, n_params: int, file_bytes: Optional[int] = None) -> Dict[str, float]:
    """CR over 2 x #params (fp16, the paper's) and over the artifact's file size."""
    out = {"cr_params": raw_bytes / (2.0 * n_params)}
    if file_bytes is not None:
        out["cr_file"] = raw_bytes / float(file_bytes)
    return out


# ------------------------------------------------------------------------------------------ decompress
@torch.no_grad()
def decompress_step(model, shape: Sequence[int], t: int, chunk_size: int = 65536, device=None,
                    with_var: bool = False):
    """Normalized prediction of time step t, float32 [Z, Y, X] (and the variance in "average" mode)."""
    device = torch.device(device or next(model.parameters()).device)
    T, Z, Y, X = (int(s) for s in shape)
    per = Z * Y * X
    pred = np.empty(per, dtype=np.float32)
    var = np.empty(per, dtype=np.float32) if with_var else None
    c = torch.zeros(1, 0, device=device)
    for s in range(0, per, chunk_size):
        flat = np.arange(t * per + s, t * per + min(per, s + chunk_size), dtype=np.int64)
        x = torch.from_numpy(time_coords(flat, shape).astype(np.float32)).to(device)[None]
        if with_var:
            m, v = model.mean_var(x, c)
            var[s:s + len(flat)] = v.reshape(-1).float().cpu().numpy()
        else:
            m = model(x, c)
        pred[s:s + len(flat)] = m.reshape(-1).float().cpu().numpy()
    pred = pred.reshape(Z, Y, X)
    return (pred, var.reshape(Z, Y, X)) if with_var else pred


# ------------------------------------------------------------------------------------------- metrics
def psnr_steps(pred: Iterable[np.ndarray], gt: Iterable[np.ndarray]) -> List[float]:
    """PSNR of each time step (peak = data range 2)."""
    return [_psnr(torch.from_numpy(np.asarray(p)), torch.from_numpy(np.asarray(g)), data_range=DATA_RANGE)
            for p, g in zip(pred, gt)]


def slice_ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean SSIM (data range 2) of the middle slices along each axis of a [Z, Y, X] step."""
    vals = []
    for axis in range(3):
        i = pred.shape[axis] // 2
        vals.append(_ssim(torch.from_numpy(np.ascontiguousarray(np.take(pred, i, axis))),
                          torch.from_numpy(np.ascontiguousarray(np.take(gt, i, axis))), data_range=DATA_RANGE))
    return float(np.mean(vals))


def slice_lpips(pred: np.ndarray, gt: np.ndarray, model, device="cpu") -> float:
    """Mean LPIPS of the middle slices along each axis of a [Z, Y, X] step (values in [-1, 1] -> [0, 1], gray
    repeated to three channels, lpips' own rescale to [-1, 1])."""
    from tasks.image.evaluation import _lpips_one

    vals = []
    for axis in range(3):
        i = pred.shape[axis] // 2
        a = (np.take(pred, i, axis)[..., None] + 1.0) / 2.0
        b = (np.take(gt, i, axis)[..., None] + 1.0) / 2.0
        vals.append(_lpips_one(model, a, b, True, device))
    return float(np.mean(vals))


def isosurface(vol: np.ndarray, level: float, max_points: Optional[int] = None, seed: int = 0) -> Optional[np.ndarray]:
    """Marching-cubes vertices (n, 3) in voxel units (array axis order), None when the volume does not cross
    ``level``; subsampled to ``max_points`` (seed) when larger."""
    from skimage.measure import marching_cubes

    vol = np.asarray(vol, dtype=np.float32)
    if not (vol.min() < level < vol.max()):
        return None
    verts = marching_cubes(vol, level=float(level))[0]
    if max_points is not None and len(verts) > max_points:
        verts = verts[np.random.default_rng(seed).choice(len(verts), max_points, replace=False)]
    return verts


def chamfer_distance(a: np.ndarray, b: np.ndarray, symmetric: bool = True) -> float:
    """Chamfer distance of point sets a (n, 3), b (m, 3): mean nearest-neighbour L2 distance a -> b, averaged
    with b -> a when ``symmetric``."""
    from scipy.spatial import cKDTree

    d_ab = cKDTree(b).query(a, k=1)[0].mean()
    if not symmetric:
        return float(d_ab)
    d_ba = cKDTree(a).query(b, k=1)[0].mean()
    return float(0.5 * (d_ab + d_ba))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation coefficient of two arrays (flattened, float64); nan when one is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


class PearsonSums:
    """Pearson correlation accumulated over chunks (float64 sums), equal to :func:`pearson` of the
    concatenation."""

    def __init__(self):
        self.n, self.a, self.b, self.aa, self.bb, self.ab = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.float64).ravel()
        b = np.asarray(b, dtype=np.float64).ravel()
        self.n += a.size
        self.a += float(a.sum())
        self.b += float(b.sum())
        self.aa += float(a @ a)
        self.bb += float(b @ b)
        self.ab += float(a @ b)

    def value(self) -> float:
        n = self.n
        if n == 0:
            return math.nan
        cov = self.ab - self.a * self.b / n
        va, vb = self.aa - self.a ** 2 / n, self.bb - self.b ** 2 / n
        return float(cov / math.sqrt(va * vb)) if va > 0 and vb > 0 else math.nan


def jaccard_tolerance(var: np.ndarray, err: np.ndarray, quantile: float = 0.9, tolerance: int = 1) -> float:
    """Jaccard index with spatial tolerance between the high-variance and high-error voxel sets (module doc)."""
    from scipy.ndimage import binary_dilation

    u = var > np.quantile(var, quantile)
    e = err > np.quantile(err, quantile)
    if tolerance > 0:
        st = np.ones((2 * tolerance + 1,) * u.ndim, dtype=bool)
        tp = 0.5 * (np.count_nonzero(u & binary_dilation(e, st)) + np.count_nonzero(e & binary_dilation(u, st)))
    else:
        tp = float(np.count_nonzero(u & e))
    den = np.count_nonzero(u) + np.count_nonzero(e) - tp
    return float(tp / den) if den > 0 else math.nan


# ---------------------------------------------------------------------------------------- compressors
class SZ3Compressor:
    """SZ3 with an absolute error bound (package ``pysz``).

    Every compressor names the ``setting`` :func:`match_psnr` bisects, its ``setting_range`` and whether quality
    rises with it (``quality_up``)."""

    name, package = "sz3", "pysz"
    setting, setting_range, quality_up = "error_bound", (1e-8 * DATA_RANGE, DATA_RANGE), False

    def __init__(self):
        try:
            from pysz import sz, szConfig, szErrorBoundMode
        except ImportError as e:
            raise ImportError("the SZ3 baseline needs the optional package 'pysz' (pip install pysz)") from e
        self._sz, self._cfg, self._mode = sz, szConfig, szErrorBoundMode

    def compress(self, a: np.ndarray, eb: float) -> bytes:
        cfg = self._cfg()
        cfg.errorBoundMode = self._mode.ABS
        cfg.absErrorBound = float(eb)
        return np.asarray(self._sz.compress(np.ascontiguousarray(a, dtype=np.float32), cfg)[0]).tobytes()

    def decompress(self, blob: bytes, shape, dtype=np.float32) -> np.ndarray:
        return self._sz.decompress(np.frombuffer(blob, np.uint8), dtype, tuple(shape))[0]


class ZFPCompressor:
    """ZFP fixed-accuracy mode (``tolerance`` = absolute error bound; package ``zfpy``). ZFP rounds the
    tolerance to a power of two, so the PSNR moves in ~6 dB steps and a target in between is not reached; the
    fixed-rate mode (:class:`ZFPRateCompressor`) moves in steps of 1/64 bit per value."""

    name, package = "zfp", "zfpy"
    setting, setting_range, quality_up = "error_bound", (1e-8 * DATA_RANGE, DATA_RANGE), False

    def __init__(self):
        try:
            import zfpy
        except ImportError as e:
            raise ImportError("the ZFP baseline needs the optional package 'zfpy' (pip install zfpy)") from e
        self._zfpy = zfpy

    def compress(self, a: np.ndarray, eb: float) -> bytes:
        return self._zfpy.compress_numpy(np.ascontiguousarray(a, dtype=np.float32), tolerance=float(eb))

    def decompress(self, blob: bytes, shape, dtype=np.float32) -> np.ndarray:
        return np.asarray(self._zfpy.decompress_numpy(blob)).reshape(shape)


class ZFPRateCompressor(ZFPCompressor):
    """ZFP fixed-rate mode (``rate`` = bits per value; package ``zfpy``): no error bound, but a size set in
    1/64-bit steps (3-D blocks of 4^3 values), so a PSNR target is met closely."""

    name = "zfp_rate"
    setting, setting_range, quality_up = "rate", (0.05, 32.0), True

    def compress(self, a: np.ndarray, rate: float) -> bytes:
        return self._zfpy.compress_numpy(np.ascontiguousarray(a, dtype=np.float32), rate=float(rate))


_COMPRESSORS = {"sz3": SZ3Compressor, "zfp": ZFPCompressor, "zfp_rate": ZFPRateCompressor}


def get_compressor(name: str):
    """A compressor by name ("sz3", "zfp", "zfp_rate"); ImportError naming the package when missing."""
    if name not in _COMPRESSORS:
        raise ValueError(f"unknown compressor '{name}', expected one of {', '.join(_COMPRESSORS)}")
    return _COMPRESSORS[name]()


def _run_compressor(comp, steps: Sequence[np.ndarray], eb: float, keep: bool = False) -> Dict[str, Any]:
    """Compress and decompress every step with setting ``eb`` (the compressor's ``setting``: an error bound or
    a rate); the result holds it under that name."""
    nbytes, psnrs, max_err, t_c, t_d, recon, raw = 0, [], 0.0, 0.0, 0.0, [], 0
    for a in steps:
        a = np.ascontiguousarray(a, dtype=np.float32)
        raw += 4 * a.size
        t0 = time.perf_counter()
        blob = comp.compress(a, eb)
        t1 = time.perf_counter()
        r = np.asarray(comp.decompress(blob, a.shape), dtype=np.float32).reshape(a.shape)
        t_d += time.perf_counter() - t1
        t_c += t1 - t0
        nbytes += len(blob)
        psnrs.append(_psnr(torch.from_numpy(r), torch.from_numpy(a), data_range=DATA_RANGE))
        max_err = max(max_err, float(np.abs(r.astype(np.float64) - a).max()))
        if keep:
            recon.append(r)
    out = {getattr(comp, "setting", "error_bound"): float(eb), "psnr": float(np.mean(psnrs)), "psnr_steps": psnrs, "bytes": nbytes,
           "cr": raw / max(1, nbytes), "compress_s": t_c, "decompress_s": t_d, "max_error": max_err}
    if keep:
        out["recon"] = recon
    return out


def match_psnr(comp, steps: Sequence[np.ndarray], target: float, tol: float = 0.05, iters: int = 40
               ) -> Dict[str, Any]:
    """Bisect the compressor's setting (log scale within its ``setting_range``; default: an error bound in
    [1e-8, 1] x the data range, quality falling as it grows) until the mean PSNR over ``steps`` is within
    ``tol`` dB of ``target``.

    Returns:
        the run at the chosen setting: the setting (``error_bound`` or ``rate``), psnr, psnr_steps, bytes, cr,
        compress_s, decompress_s, max_error, recon (the reconstructed steps), iterations, matched (whether
        |psnr - target| <= tol). Without a match the closest run with PSNR >= target is returned (else the
        closest one).
    """
    if not math.isfinite(target):
        raise ValueError(f"target PSNR must be finite, got {target}")
    key = getattr(comp, "setting", "error_bound")
    s_lo, s_hi = getattr(comp, "setting_range", (1e-8 * DATA_RANGE, DATA_RANGE))
    up = bool(getattr(comp, "quality_up", False))
    lo, hi = math.log(s_lo), math.log(s_hi)
    best, tried = None, []
    for it in range(1, int(iters) + 1):
        mid = 0.5 * (lo + hi)
        run = _run_compressor(comp, steps, math.exp(mid))
        run["iterations"] = it
        tried.append(run)
        if abs(run["psnr"] - target) <= tol:
            best = run
            break
        if (run["psnr"] > target) != up:
            lo = mid  # quality to spare with a bound (or too little with a rate): a larger setting
        else:
            hi = mid
    if best is None:
        above = [r for r in tried if r["psnr"] >= target]
        pool = above or tried
        best = min(pool, key=lambda r: abs(r["psnr"] - target))
    final = _run_compressor(comp, steps, best[key], keep=True)
    final["iterations"] = len(tried)
    final["matched"] = abs(final["psnr"] - target) <= tol
    return final


# ------------------------------------------------------------------------------------------- evaluation
def _cd_for(pred: np.ndarray, gt: np.ndarray, levels: Sequence[float], max_points: int
            ) -> Dict[float, Tuple[Optional[float], bool]]:
    """{isovalue: (CD or None when the truth has no surface, prediction surface missing)}."""
    out = {}
    diag = float(np.linalg.norm(np.array(gt.shape) - 1))
    for lv in levels:
        g = isosurface(gt, lv, max_points)
        if g is None:
            out[lv] = (None, False)
            continue
        p = isosurface(pred, lv, max_points)
        out[lv] = (diag, True) if p is None else (chamfer_distance(p, g), False)
    return out


def _step_row(p: np.ndarray, g: np.ndarray, t: int, isovalues: Sequence[float], with_cd: bool,
              cd_max_points: int, with_ssim: bool) -> Dict[str, Any]:
    """Metrics of one time step; CD entries are (distance or None, prediction surface missing)."""
    row: Dict[str, Any] = {"t": t, "psnr": psnr_steps([p], [g])[0]}
    if with_ssim:
        row["ssim"] = slice_ssim(p, g)
    if with_cd:
        for lv, pair in _cd_for(p, g, isovalues, cd_max_points).items():
            row[f"cd@{lv:g}"] = pair
    return row


def _summarize(rows: List[Dict[str, Any]], isovalues: Sequence[float], with_ssim: bool
               ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    summary: Dict[str, Any] = {"psnr": float(np.mean([r["psnr"] for r in rows])),
                               "psnr_min": float(np.min([r["psnr"] for r in rows]))}
    if with_ssim:
        summary["ssim"] = float(np.mean([r["ssim"] for r in rows]))
    missing = 0
    for lv in isovalues:
        key = f"cd@{lv:g}"
        vals = []
        for r in rows:
            if key in r:
                d, miss = r[key]
                r[key] = d
                if d is not None:
                    vals.append(d)
                    missing += int(miss)
        summary[key] = float(np.mean(vals)) if vals else None
    summary["cd_missing"] = missing
    return summary, rows


def evaluate_volumes(pred_steps: Sequence[np.ndarray], gt_steps: Sequence[np.ndarray], isovalues: Sequence[float],
                     cd_steps: Sequence[int] = (), cd_max_points: int = 20000, with_ssim: bool = True
                     ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Metrics of a reconstruction against the truth (sequences of normalized [Z, Y, X] steps, read one at a
    time).

    Returns:
        (summary: psnr (mean over steps), psnr_min, ssim, cd@<iso>, cd_missing; per-step rows).
    """
    steps = set(int(s) for s in cd_steps) if cd_steps else set(range(len(gt_steps)))
    rows = [_step_row(pred_steps[t], gt_steps[t], t, isovalues, t in steps, cd_max_points, with_ssim)
            for t in range(len(gt_steps))]
    return _summarize(rows, isovalues, with_ssim)


class _Steps:
    """The dataset's normalized time steps as a lazy sequence (each read from the file when indexed)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.shape[0]

    def __getitem__(self, t: int) -> np.ndarray:
        if not 0 <= t < len(self):
            raise IndexError(t)
        return self.dataset.volume(t)


ARTIFACT = "weights_fp16.bin"
VOLUME = "decompressed.npy"


def result_files(tc) -> List[str]:
    """The files of an evaluation with test config ``tc`` (MoETestConfig): ``metrics.json``, ``per_step.csv``, the
    artifact and, with ``save_volume``, the decompressed volume."""
    return ["metrics.json", "per_step.csv", ARTIFACT] + ([VOLUME] if tc.save_volume else [])


def score(ctx):
    """Score a trained MoE-INR run (``MoETask.score``; ``ctx``: tasks.base.EvalContext).

    Memory: the INR is decompressed and scored one time step at a time (ground truth read from the dataset's
    memory map per step); the baseline compressors keep their reconstructed steps in memory.

    Writes into the output folder: ``weights_fp16.bin`` (the artifact) and, with ``test.save_volume``,
    ``decompressed.npy`` (both atomically); returns the rows and the files the template writes, ``metrics.json``
    (the rows) and ``per_step.csv``.

    Returns:
        rows: one for the INR (method "moe_inr") and one per matched baseline compressor.
    """
    from tasks.base import CsvFile, JsonFile, Scores

    model, tc, out_dir, run_dir = ctx.model, ctx.test_config, ctx.out_dir, ctx.run_dir
    dataset = ctx.dataset()
    device = ctx.device

    art = save_fp16(model, os.path.join(out_dir, ARTIFACT))
    model.load_state_dict(load_fp16(os.path.join(out_dir, ARTIFACT)), strict=False)
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    average = getattr(model, "mode", "top1") == "average"

    T = dataset.shape[0]
    gt = _Steps(dataset)
    cd_set = set(int(s) for s in tc.cd_steps) if tc.cd_steps else set(range(T))
    saved = None
    staged = os.path.join(out_dir, f".{VOLUME}.tmp")  # renamed to VOLUME once every step is in
    if tc.save_volume:
        saved = np.lib.format.open_memmap(staged, mode="w+", dtype=np.float32, shape=tuple(dataset.shape))
    rows_t, dec_s = [], 0.0
    lpips_model = None
    if tc.lpips:
        from tasks.image.evaluation import load_lpips

        lpips_model = load_lpips(device)  # None (and one log line saying why) without local weights
    pc = PearsonSums()
    ji = []
    try:
        for t in range(T):  # one time step in memory at a time; decompression timed alone
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = decompress_step(model, dataset.shape, t, tc.chunk_size, device, with_var=average)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dec_s += time.perf_counter() - t0
            pred, var = out if average else (out, None)
            g = gt[t]
            rows_t.append(_step_row(pred, g, t, tc.isovalues, t in cd_set, tc.cd_max_points, tc.ssim))
            if lpips_model is not None:
                rows_t[-1]["lpips"] = slice_lpips(pred, g, lpips_model, device)
            if saved is not None:
                saved[t] = pred
            if average:
                err = np.abs(pred.astype(np.float64) - g)
                v64 = var.astype(np.float64)
                pc.add(v64, err)
                ji.append(jaccard_tolerance(v64, err, tc.ji_quantile, tc.ji_tolerance))
    except BaseException:  # no partial volume left behind
        if saved is not None:
            del saved
            os.remove(staged)
        raise
    if saved is not None:
        saved.flush()
        del saved
        os.chmod(staged, 0o666 & ~_umask())
        os.replace(staged, os.path.join(out_dir, VOLUME))
    summary, per_step = _summarize(rows_t, tc.isovalues, tc.ssim)
    row: Dict[str, Any] = {"method": "moe_inr", **summary, "params": n_params, "file_bytes": art["file_bytes"],
                           "raw_bytes": dataset.raw_nbytes,
                           **compression_ratios(dataset.raw_nbytes, n_params, art["file_bytes"]),
                           "decompress_s": dec_s,
                           "lpips": float(np.mean([r["lpips"] for r in rows_t])) if lpips_model is not None else None}
    if average:
        row["pc"] = pc.value()
        row["ji_st"] = float(np.mean(ji))
    timing = os.path.join(run_dir, "timing.json")
    if os.path.isfile(timing):
        with open(timing) as f:
            row["fit_h_estimated"] = json.load(f).get("estimated_train_h")
    rows = [row]
    for name in tc.baselines:
        try:
            comp = get_compressor(name)
        except ImportError as e:
            log.warning("%s", e)
            rows.append({"method": name, "error": str(e)})
            continue
        m = match_psnr(comp, gt, row["psnr"], tc.psnr_tol, tc.bisect_iters)
        s, _ = evaluate_volumes(m["recon"], gt, tc.isovalues, tc.cd_steps, tc.cd_max_points, tc.ssim)
        rows.append({"method": name, **s, "cr_params": m["cr"], "bytes": m["bytes"],
                     "error_bound": m.get("error_bound"), "rate": m.get("rate"), "max_error": m["max_error"], "compress_s": m["compress_s"],
                     "decompress_s": m["decompress_s"], "matched": m["matched"], "iterations": m["iterations"]})
    keys = sorted({k for r in per_step for k in r}, key=lambda k: (k != "t", k))
    return Scores(rows, {"metrics.json": JsonFile(rows, indent=1), "per_step.csv": CsvFile(per_step, keys)})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A plain-text table of the rows (method, PSNR, SSIM, CDs, CR, times)."""
    cols = ["method", "psnr", "ssim"] + sorted({k for r in rows for k in r if k.startswith("cd@")}) + \
        ["cr_params", "cr_file", "decompress_s", "compress_s", "pc", "ji_st"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    buf = io.StringIO()
    buf.write(text_table([cols] + [[fmt(r.get(c)) for c in cols] for r in rows], align="right") + "\n")
    for r in rows:
        if "error" in r:
            buf.write(f"{r['method']}: {r['error']}\n")
    return buf.getvalue()
