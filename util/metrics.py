"""Field metrics on normalized data (spec 5.3): MSE, PSNR, relative L2, SSIM, maximum difference.

All functions take torch tensors (CPU or CUDA; numpy arrays are accepted too) of identical shape,
holding values normalized to [0, 1] (data range 1 unless ``data_range`` says otherwise). Reductions
are accumulated in float64 on the tensors' device, and scalar results are returned as Python floats.

Conventions for degenerate cases:
- ``psnr`` / ``psnr_from_mse``: MSE 0 gives ``+inf`` (no warning, no exception) unless a ``floor`` is given;
  ``psnr_from_mse`` is every task's PSNR (its docstring lists each task's peak, floor and formula).
- ``rel_l2``: ``||gt|| = 0`` gives 0.0 when ``pred`` equals ``gt`` (both zero) and ``+inf`` otherwise.
- ``ssim``: computed on the *valid* region (no padding), which matches
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
  exactly, see :func:`ssim`.
- empty tensors are an error (``ValueError``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["mse", "psnr", "psnr_from_mse", "PSNR_FORMS", "rel_l2", "max_diff", "ssim", "gaussian_window",
           "member_metrics", "dataset_metrics", "is_constant", "count_wins", "MEMBER_METRIC_KEYS"]

TensorLike = Union[torch.Tensor, np.ndarray]

#: keys of :func:`member_metrics`, averaged by :func:`dataset_metrics`.
MEMBER_METRIC_KEYS: Tuple[str, ...] = ("mse", "psnr", "rel_l2", "ssim", "md")


def _pair(pred: TensorLike, gt: TensorLike, dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as ``dtype`` (float64) tensors on one device (gt moves to pred's device); shapes must match."""
    p = torch.as_tensor(pred)
    g = torch.as_tensor(gt)
    if tuple(p.shape) != tuple(g.shape):
        raise ValueError(f"shape mismatch: pred {tuple(p.shape)} vs gt {tuple(g.shape)}")
    if p.numel() == 0:
        raise ValueError("empty tensors")
    g = g.to(p.device)
    return p.to(dtype), g.to(dtype)


def mse(pred: TensorLike, gt: TensorLike, dtype: torch.dtype = torch.float64) -> float:
    """Mean squared error ``mean((pred - gt)^2)``.

    Args:
        pred, gt: same shape (tensors on any device, or numpy arrays).
        dtype: precision of the difference and the mean: float64 (default), or e.g. float32 to reproduce a
            mean taken in single precision (the NeRF views).
    """
    p, g = _pair(pred, gt, dtype)
    return float(torch.mean((p - g) ** 2))


#: formulas of :func:`psnr_from_mse`
PSNR_FORMS = ("ratio", "difference")


def psnr_from_mse(m: Union[float, np.ndarray, torch.Tensor], data_range: Union[float, torch.Tensor] = 1.0,
                  floor: Optional[float] = None, form: str = "ratio", float64: bool = True):
    """PSNR in dB from an MSE: ``10 log10(peak^2 / MSE)``, the one PSNR of every task.

    The tasks' conventions differ in the last bits, so each is a parameter (results stay bitwise what each
    task wrote before):

    - ensemble, image, MoE-INR (data range 2): ``form="ratio"``, no floor;
    - NeRF views: ``form="difference"``, ``floor=1e-20`` (MSE of float32 images);
    - the training log's PSNR (term ``mse``): ``form="difference"``, ``floor=1e-30``;
    - terrain tiles: tensors, ``data_range`` = each tile's range (a tensor), ``floor=1e-20``,
      ``float64=False`` (the MSE's own dtype).

    Args:
        m: an MSE: a Python/numpy scalar (returns a float) or a tensor/array (returns the same type,
            elementwise).
        data_range: the peak, i.e. the value range of the data (1 for normalized fields, 2 for data in
            [-1, 1]); a tensor of peaks broadcasts against a tensor ``m``.
        floor: MSEs below ``floor`` are raised to it, so the PSNR is capped at ``10 log10(peak^2 / floor)``
            (e.g. 200 dB for peak 1 and floor 1e-20). None: no floor, MSE 0 gives ``+inf`` (no warning).
        form: "ratio": ``10 log10(peak^2 / MSE)``; "difference": ``20 log10(peak) - 10 log10(MSE)``, where
            for peak 1 the first term is left out (exactly ``-10 log10(MSE)``). The two agree to rounding.
        float64: compute in float64 (tensors and arrays are converted); False keeps a tensor's dtype.

    Returns:
        PSNR in dB; ``+inf`` where the MSE is 0 and no floor is given; NaN for a NaN MSE. A negative MSE is an
        error (``ValueError``).
    """
    if form not in PSNR_FORMS:
        raise ValueError(f"psnr_from_mse: form must be one of {PSNR_FORMS}, got {form!r}")
    if isinstance(m, torch.Tensor):
        m_t = m.to(torch.float64) if float64 else m
        if bool((m_t < 0).any()):
            raise ValueError("negative MSE")
        if floor is not None:
            m_t = m_t.clamp_min(floor)
        if form == "ratio":
            return 10.0 * torch.log10(data_range ** 2 / m_t)  # x / 0 -> inf, log10(inf) = inf
        out = -10.0 * torch.log10(m_t)
        return out if _is_one(data_range) else 20.0 * torch.log10(torch.as_tensor(data_range)) + out
    if isinstance(m, np.ndarray) and m.ndim > 0:
        m_a = m.astype(np.float64) if float64 else m
        if (m_a < 0).any():
            raise ValueError("negative MSE")
        if floor is not None:
            m_a = np.maximum(m_a, floor)
        with np.errstate(divide="ignore"):
            if form == "ratio":
                return 10.0 * np.log10(data_range ** 2 / m_a)
            out = -10.0 * np.log10(m_a)
        return out if _is_one(data_range) else 20.0 * np.log10(data_range) + out
    m = float(m)
    if m < 0:
        raise ValueError(f"negative MSE {m}")
    if math.isnan(m):
        return math.nan
    if floor is not None:
        m = max(m, floor)
    if m == 0.0:
        return math.inf
    if form == "ratio":
        return 10.0 * math.log10(data_range ** 2 / m)
    out = -10.0 * math.log10(m)
    return out if _is_one(data_range) else 20.0 * math.log10(data_range) + out


def _is_one(data_range) -> bool:
    return not isinstance(data_range, torch.Tensor) and float(data_range) == 1.0


def psnr(pred: TensorLike, gt: TensorLike, data_range: float = 1.0) -> float:
    """PSNR in dB, ``-10 log10(MSE)`` for data range 1; ``+inf`` for identical fields."""
    return psnr_from_mse(mse(pred, gt), data_range)


def rel_l2(pred: TensorLike, gt: TensorLike) -> float:
    """Relative L2 error ``||pred - gt||_2 / ||gt||_2``.

    If ``||gt||_2 = 0`` the result is 0.0 when ``pred`` is zero too and ``+inf`` otherwise.
    """
    p, g = _pair(pred, gt)
    num = float(torch.linalg.vector_norm(p - g))
    den = float(torch.linalg.vector_norm(g))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def max_diff(pred: TensorLike, gt: TensorLike) -> float:
    """Maximum absolute difference ``max |pred - gt|`` (the "MD" of the FA-INR paper, on normalized data)."""
    p, g = _pair(pred, gt)
    return float(torch.max(torch.abs(p - g)))


def gaussian_window(size: int, sigma: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalized 1D Gaussian taps ``exp(-j^2 / (2 sigma^2))``, j = -(size-1)/2 .. (size-1)/2, sum 1."""
    if size < 1 or size % 2 != 1:
        raise ValueError(f"window size must be a positive odd integer, got {size}")
    r = (size - 1) // 2
    j = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (j / float(sigma)) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _filter_valid(x: torch.Tensor, taps: Sequence[float], axis: int) -> torch.Tensor:
    """Valid (unpadded) correlation of ``x`` with 1D ``taps`` along ``axis``, as a sum of shifted slices."""
    k = len(taps)
    if k == 1:
        return x * taps[0] if taps[0] != 1.0 else x
    m = x.shape[axis] - k + 1
    out = x.narrow(axis, 0, m) * taps[0]
    for j in range(1, k):
        out.add_(x.narrow(axis, j, m), alpha=taps[j])
    return out


def _window_sizes(shape: Sequence[int], win_size: int, shrink: bool) -> List[int]:
    sizes = []
    for n in shape:
        if n >= win_size:
            sizes.append(win_size)
        elif shrink:
            sizes.append(n if n % 2 == 1 else n - 1)  # largest odd size that fits
        else:
            raise ValueError(f"SSIM window {win_size} larger than the volume extent {tuple(shape)}; "
                             "pass a smaller win_size or shrink=True")
    return sizes


def ssim(pred: TensorLike, gt: TensorLike, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, shrink: bool = True, chunk_voxels: int = 1 << 22) -> float:
    """Structural similarity (Wang et al. 2004) with a separable Gaussian window, 2D or 3D.

    ``S = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, L = ``data_range``, local means/(co)variances weighted by a normalized
    Gaussian window (``win_size`` taps per axis, standard deviation ``sigma``) and population covariances.
    The SSIM map is evaluated on the **valid region** only (window centres at least ``(win_size - 1) / 2``
    voxels from every border, no padding) and averaged. With the defaults this equals
    ``skimage.metrics.structural_similarity(pred, gt, data_range=1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``, which filters with an 11-tap (truncate 3.5) Gaussian and crops 5 voxels per
    border, so its padding never enters the mean.

    Memory: the volume is processed in slabs along the first axis; a slab holds about ``chunk_voxels`` input
    voxels (plus a halo of ``win_size - 1`` planes). The slab work holds the 5 stacked float64 moments
    (x, y, x^2, y^2, xy) and one filtered copy at a time, ~ ``80 * chunk_voxels`` bytes at most (~ 250-320 MiB
    for the default 2^22), on the tensors' device, plus one float64 copy of each input (2 x 128 MiB for 256^3).
    Measured on CPU for 256^3 float32 inputs: ~ 500 MiB peak extra memory, ~ 4 s on 2 cores.
    2D inputs are one slab.

    Args:
        pred, gt: fields of shape (H, W) or (D, H, W) (tensors on any device, or numpy arrays).
        data_range: value range L (1 for normalized data).
        win_size: odd number of window taps per axis.
        sigma: standard deviation of the Gaussian window, in voxels.
        k1, k2: stabilizing constants.
        shrink: if an axis is shorter than ``win_size``, use the largest odd window that fits along that
            axis (same ``sigma``, renormalized); if False raise ``ValueError`` instead.
        chunk_voxels: input voxels per slab (memory bound, see above).

    Returns:
        Mean SSIM as a float.
    """
    p, g = _pair(pred, gt)
    if p.ndim not in (2, 3):
        raise ValueError(f"ssim expects a 2D (H, W) or 3D (D, H, W) field, got shape {tuple(p.shape)}")
    if win_size < 1 or win_size % 2 != 1:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    if p.ndim == 2:
        p, g = p[None], g[None]
        sizes = [1] + _window_sizes(p.shape[1:], win_size, shrink)
    else:
        sizes = _window_sizes(p.shape, win_size, shrink)
    taps = [gaussian_window(s, sigma).tolist() for s in sizes]
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    d, h, w = p.shape
    kd = sizes[0]
    out_d = d - kd + 1
    plane = h * w
    step = max(1, min(out_d, chunk_voxels // max(plane, 1) - (kd - 1)))
    total = torch.zeros((), dtype=torch.float64, device=p.device)
    count = 0
    for z0 in range(0, out_d, step):
        z1 = min(out_d, z0 + step)
        xs = p[z0:z1 + kd - 1]
        ys = g[z0:z1 + kd - 1]
        mom = torch.stack((xs, ys, xs * xs, ys * ys, xs * ys))  # (5, slab, H, W)
        for axis, t in zip((1, 2, 3), taps):
            mom = _filter_valid(mom, t, axis)
        ux, uy, uxx, uyy, uxy = mom.unbind(0)
        vx = uxx - ux * ux
        vy = uyy - uy * uy
        vxy = uxy - ux * uy
        num = (2 * ux * uy + c1) * (2 * vxy + c2)
        den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
        s = num / den
        total += s.sum()
        count += s.numel()
        del mom, ux, uy, uxx, uyy, uxy, vx, vy, vxy, num, den, s
    return float(total / count)


def member_metrics(pred: TensorLike, gt: TensorLike, with_ssim: bool = True, data_range: float = 1.0,
                   ssim_win_size: int = 11, ssim_sigma: float = 1.5) -> Dict[str, float]:
    """All per-member metrics of one predicted field.

    Args:
        pred, gt: predicted and true normalized fields, same shape.
        with_ssim: compute SSIM (only for 2D/3D grid fields; otherwise, e.g. unstructured vertices of
            shape (N,), ``ssim`` is NaN).
        data_range: value range (1 for normalized data).
        ssim_win_size, ssim_sigma: SSIM window (see :func:`ssim`).

    Returns:
        ``dict(mse, psnr, rel_l2, ssim, md)`` of floats; ``ssim`` is NaN when not computed.
    """
    m = mse(pred, gt)
    out = {"mse": m, "psnr": psnr_from_mse(m, data_range), "rel_l2": rel_l2(pred, gt), "ssim": math.nan,
           "md": max_diff(pred, gt)}
    if with_ssim and torch.as_tensor(pred).ndim in (2, 3):
        out["ssim"] = ssim(pred, gt, data_range=data_range, win_size=ssim_win_size, sigma=ssim_sigma)
    return out


def dataset_metrics(per_member: Iterable[Mapping[str, Any]], data_range: float = 1.0,
                    keys: Sequence[str] = MEMBER_METRIC_KEYS) -> Dict[str, float]:
    """Dataset-level metrics from per-member metric dicts (e.g. rows of :func:`member_metrics`).

    Other keys in the rows (predictor name, row index, timings) are ignored.

    Args:
        per_member: one mapping per member with (a subset of) ``keys``.
        data_range: value range, for the dataset-level PSNR.
        keys: metrics to average.

    Returns:
        ``members``: number of members;
        ``mse``, ``rel_l2``, ``ssim``, ``md``: plain means over members (NaN if a member lacks the value or
        it is NaN; NaN for no members);
        ``psnr_member_mean``: mean of the member PSNRs (``+inf`` if any member is exact);
        ``psnr_dataset``: the paper's dataset-level PSNR ``-10 log10(mean of member MSEs)`` (spec 5.3).
    """
    rows = list(per_member)
    out: Dict[str, float] = {"members": len(rows)}
    for k in keys:
        vals = [float(r.get(k, math.nan)) for r in rows]
        name = "psnr_member_mean" if k == "psnr" else k
        out[name] = float(np.mean(vals)) if vals else math.nan
    if "mse" in keys:
        m = out["mse"]
        out["psnr_dataset"] = math.nan if math.isnan(m) else psnr_from_mse(m, data_range)
    return out


def count_wins(model: Mapping[Any, float], reference: Mapping[Any, float]) -> Tuple[int, int]:
    """How many members the model wins against a reference predictor, member by member.

    Args:
        model: per-member score of the model (e.g. PSNR), keyed by member (cond row).
        reference: the same score of the reference predictor, same keys.

    Returns:
        ``(wins, compared)``: ``compared`` = members present in both mappings; ``wins`` = those where the
        model's score is strictly higher (a tie, including two exact members with PSNR ``+inf``, is no win;
        a NaN score never wins).
    """
    common = [k for k in model if k in reference]
    wins = sum(1 for k in common if float(model[k]) > float(reference[k]))
    return wins, len(common)


def is_constant(pred: TensorLike, tol: float = 1e-6) -> bool:
    """True if the field is constant up to ``tol`` (max - min <= tol): the signature of a collapsed model.

    A field containing NaN is not reported as constant (check for NaN separately).
    """
    p = torch.as_tensor(pred)
    if p.numel() == 0:
        raise ValueError("empty tensor")
    rng = torch.max(p).to(torch.float64) - torch.min(p).to(torch.float64)
    return bool(rng <= tol)
