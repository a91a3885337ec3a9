"""Optional compiled CPU kernels of the training fast paths (source: ``models/csrc/fused_cpu.c``).

The fused CPU paths of DRR-Net (``models/fast_ops``: vertex_pipeline, fused_head, gather_interp,
corner_stencil; the touched-vertex mask of ``DRRNet``) spend much of their non-matmul time in elementwise
passes that PyTorch runs as several operators each: the PE, RMSNorm, the ReLU-gated GLU and their
derivatives, bias + ReLU and its backward with the bias sums, the corner stencil, the weighted corner gather
and its scatter. The C file does each of them in one pass over the rows (OpenMP over rows or channels,
SIMD along them; reductions in a fixed order, so results repeat bitwise for a given thread count). It is
compiled with the system C compiler the first time it is needed and cached; the training step's matrix products
stay PyTorch's. Baked inference (``DRRNet.predict_grid``) has its own one-pass kernels with their own products:
:func:`baked_mlp` (float32, register-blocked, the gather and the whole decoder per block of rows) and
:func:`baked_mlp_amx` (bf16 products on AMX tiles where the CPU has them); without them predict_grid runs its
per-pass loop. :func:`cond_bias_lines` gives a baked model's condition bias from its folded condition lines.

Nothing is required: without a C compiler with OpenMP, or when the build or the load fails, a warning says
why once and the same functions run as PyTorch operators, ``models.fast_ops._TorchPrims`` (same values to
fp32 rounding; tests/test_cpu_kernels.py compares each kernel with its twin, tests/test_fast_paths.py runs
the fused paths with both against autograd).

Environment:

* ``DRR_CPU_KERNELS``: ``auto`` (default: build / load on first use, fall back with a warning) or ``off``
  (``0``, ``never``: always the PyTorch operators). Read until the library is loaded, then no more (the fused
  paths ask for it hundreds of times a step; :func:`reset` makes the next call read it again).
* ``DRR_KERNEL_CACHE``: folder of the compiled libraries (default ``$XDG_CACHE_HOME/drrnet_kernels``, i.e.
  ``~/.cache/drrnet_kernels``). A library is named by a hash of the source, the compiler, its flags and the
  CPU's feature flags (it is built with ``-march=native``), so machines sharing a home folder do not mix.
* ``CC``: the compiler (default ``cc``).

The library links the OpenMP runtime by its soname ``libgomp.so.1``, which resolves to the one PyTorch has
already loaded, so the kernels and PyTorch's operators share one thread pool and thread count
(``torch.set_num_threads``).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "fused_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_OFF = {"0", "off", "never", "false", "no"}

_lock = threading.Lock()
_state = {"lib": None, "tried": False, "error": None, "vector_math": False}

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "rms_norm_fwd": [_I64, _I64, _PTR, _F32, _PTR, _PTR],
    "rms_norm_bwd": [_I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "glu_fwd": [_I64, _I64, _PTR, _PTR],
    "glu_bwd": [_I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "scatter_corners": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "gather_corners": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "bias_relu": [_I64, _I64, _I64, _PTR, _PTR, _PTR],
    "relu_bwd_segsum": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "pe_fwd": [_I64, _I64, _I64, _I64, _PTR, _PTR, _PTR],
    "pe_bwd": [_I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "corner_stencil": [_I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "mark_touched": [_I64, _PTR, _PTR, _I64, _PTR],
    "has_vector_math": [],
    "f32_to_bf16": [_I64, _PTR, _PTR],
    "rms_norm_fwd_lp": [_I64, _I64, _PTR, ctypes.c_float, _PTR, _PTR, _PTR],
    "glu_fwd_lp": [_I64, _I64, _PTR, _PTR],
    "glu_bwd_lp": [_I64, _I64, _PTR, _PTR, _PTR, _PTR],
    "rms_norm_bwd_lp": [_I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "add_bf16": [_I64, _PTR, _PTR, _PTR],
    "add_to_bf16": [_I64, _PTR, _PTR, _PTR],
    "relu_bwd_segsum_lp": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "bias_relu_lp": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "bf16_to_f32": [_I64, _PTR, _PTR],
    "grid_gather_bias_relu": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR],
    "grid_gather_bias_relu_bf16t": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR],
    "grid_gather_bias_relu_lp": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR],
    "mlp_panel_width": [],
    "has_amx": [],
    "baked_mlp_amx": [_I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _F32, _I64, _PTR],
    "cond_bias_lines": [_I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR],
    "baked_mlp": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _F32,
                  _PTR],
    "baked_mlp_bf16t": [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR,
                        _F32, _PTR],
}
_RESTYPES = {"mark_touched": ctypes.c_int64, "grid_gather_bias_relu_lp": ctypes.c_int64,
             "has_vector_math": ctypes.c_int, "mlp_panel_width": ctypes.c_int64, "has_amx": ctypes.c_int64,
             "baked_mlp": ctypes.c_int64, "baked_mlp_bf16t": ctypes.c_int64, "baked_mlp_amx": ctypes.c_int64,
             "cond_bias_lines": ctypes.c_int64}


def switched_off(var: str) -> bool:
    """Whether the environment variable ``var`` is set to off (0, off, never, false, no; any case): the one reading
    of the DRR_* switches of the compiled paths (DRR_CPU_KERNELS, DRR_BAKED_MLP, DRR_ONEDNN_LINEAR)."""
    return os.environ.get(var, "auto").strip().lower() in _OFF


def enabled_by_env() -> bool:
    return not switched_off("DRR_CPU_KERNELS")


def cache_dir() -> str:
    d = os.environ.get("DRR_KERNEL_CACHE")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "drrnet_kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str) -> str:
    """Compile SOURCE into the cache (atomically: build to a temporary name, then rename); return the path."""
    with open(SOURCE, "rb") as f:
        src = f.read()
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([src, ver.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, delete=True)
        probe.close()
    except OSError:                                   # cache not writable: a private temporary folder
        out_dir = tempfile.mkdtemp(prefix="drrnet_kernels_")
    path = os.path.join(out_dir, f"fused_cpu-{key}.so")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        err = ""
        for extra in (["-DDRR_MVEC", "-lmvec"], []):               # vector sin/cos (glibc libmvec) if present
            cmd = [cc, *FLAGS, "-o", tmp, SOURCE, *extra, "-lm"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode == 0:
                break
            err = f"'{' '.join(cmd)}' failed:\n{res.stderr.strip()[-2000:]}"
        else:
            raise RuntimeError(err)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; None when disabled or unavailable (warned once)."""
    if _state["tried"]:
        return _state["lib"]
    if not enabled_by_env():
        return None
    with _lock:
        if not _state["tried"]:
            try:
                cc = os.environ.get("CC", "cc")
                if shutil.which(cc) is None:
                    raise RuntimeError(f"no C compiler '{cc}' on PATH (set CC)")
                lib = ctypes.CDLL(_build(cc))
                for name, args in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = args, _RESTYPES.get(name)
                _state["lib"], _state["vector_math"] = lib, bool(lib.has_vector_math())
            except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch operators
                _state["error"] = str(e)
                warnings.warn(f"models.cpu_kernels: compiled CPU kernels unavailable, using PyTorch operators "
                              f"(same results, slower CPU training; DRR_CPU_KERNELS=off silences this): {e}",
                              RuntimeWarning, stacklevel=2)
            _state["tried"] = True
    return _state["lib"]


def reset() -> None:
    """Forget the loaded library (tests: re-read the environment on the next :func:`library` call)."""
    with _lock:
        _state.update(lib=None, tried=False, error=None, vector_math=False)


def available() -> bool:
    return library() is not None


def vector_math() -> bool:
    """Whether the loaded library has vectorized sin / cos (else :func:`pe_fwd` is not faster than PyTorch)."""
    return library() is not None and _state["vector_math"]


# ----------------------------------------------------------------------------------------------------
# Tensor wrappers (CPU float32, contiguous; shapes checked). Each has a PyTorch twin in models/fast_ops.py.
# ----------------------------------------------------------------------------------------------------
def _check(name: str, *ts: Tensor, dtype: torch.dtype = torch.float32) -> None:
    for t in ts:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"cpu_kernels.{name}: expected contiguous {str(dtype).replace('torch.', '')} CPU "
                             f"tensors, got {t.dtype} on {t.device} (contiguous={t.is_contiguous()})")


def rms_norm_fwd(x: Tensor, eps: float):
    """(xh, r): r = rsqrt(mean(x^2, -1) + eps) (n, 1), xh = x * r."""
    _check("rms_norm_fwd", x)
    n, D = x.shape
    xh, r = torch.empty_like(x), torch.empty(n, 1, dtype=x.dtype)
    library().rms_norm_fwd(n, D, x.data_ptr(), float(eps), xh.data_ptr(), r.data_ptr())
    return xh, r


def rms_norm_bwd(gx: Tensor, gxh: Tensor, xh: Tensor, r: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """gx + r * gxh - r * mean(gxh * xh, -1) * xh, into ``out`` (may be gx; default a new tensor); gxh float32 or
    bfloat16 (a bf16 product's result, read as float32)."""
    out = torch.empty_like(gx) if out is None else out
    bf = gxh.dtype == torch.bfloat16
    _check("rms_norm_bwd", gx, xh, r, out, *([] if bf else [gxh]))
    if bf:
        _check("rms_norm_bwd", gxh, dtype=torch.bfloat16)
        if gxh.shape != gx.shape or xh.shape != gx.shape or out.shape != gx.shape:
            raise ValueError(f"cpu_kernels.rms_norm_bwd: shapes gx {tuple(gx.shape)}, gxh {tuple(gxh.shape)}, "
                             f"xh {tuple(xh.shape)}, out {tuple(out.shape)} differ")
    n, D = gx.shape
    fn = library().rms_norm_bwd_lp if bf else library().rms_norm_bwd
    fn(n, D, gx.data_ptr(), gxh.data_ptr(), xh.data_ptr(), r.data_ptr(), out.data_ptr())
    return out


def glu_fwd(ab: Tensor) -> Tensor:
    """relu(a) * b for ab = [a | b] (n, 2H), float32; or bfloat16 (a bf16 product's result), computed in float32
    and rounded to bf16 (the next product's operand)."""
    bf = ab.dtype == torch.bfloat16
    _check("glu_fwd", ab, dtype=ab.dtype if bf else torch.float32)
    n, H2 = ab.shape
    h = torch.empty(n, H2 // 2, dtype=ab.dtype)
    (library().glu_fwd_lp if bf else library().glu_fwd)(n, H2 // 2, ab.data_ptr(), h.data_ptr())
    return h


def glu_bwd(gh: Tensor, ab: Tensor):
    """(gab, h): gab = [gh * b * (a > 0) | gh * relu(a)] (n, 2H) and h = relu(a) * b (n, H) recomputed; float32,
    or bfloat16 gh and ab (products' results) with gab and h rounded to bf16 (products' operands)."""
    bf = gh.dtype == torch.bfloat16
    _check("glu_bwd", gh, ab, dtype=gh.dtype if bf else torch.float32)
    n, H = gh.shape
    if tuple(ab.shape) != (n, 2 * H):
        raise ValueError(f"cpu_kernels.glu_bwd: ab {tuple(ab.shape)} must be ({n}, {2 * H})")
    gab, h = torch.empty_like(ab), torch.empty_like(gh)
    (library().glu_bwd_lp if bf else library().glu_bwd)(n, H, gh.data_ptr(), ab.data_ptr(), gab.data_ptr(),
                                                         h.data_ptr())
    return gab, h


def _check_stencil(name: str, P: int, idx: Tensor, w: Tensor) -> None:
    if idx.dtype != torch.int64 or not idx.is_contiguous() or idx.dim() != 2:
        raise ValueError(f"cpu_kernels.{name}: idx must be a contiguous (M, K) int64 tensor")
    if tuple(w.shape) != tuple(idx.shape):
        raise ValueError(f"cpu_kernels.{name}: w {tuple(w.shape)} must have idx's shape {tuple(idx.shape)}")
    lo, hi = torch.aminmax(idx) if idx.numel() else (0, 0)
    if idx.numel() and (int(lo) < 0 or int(hi) >= P):
        raise IndexError(f"cpu_kernels.{name}: row index outside [0, {P})")


def scatter_corners_(out: Tensor, idx: Tensor, w: Tensor, go: Tensor) -> Tensor:
    """out[idx[m, k]] += w[m, k] * go[m] (in place); out (P, C), idx / w (M, K), go (M, C)."""
    _check("scatter_corners_", out, w, go)
    _check_stencil("scatter_corners_", out.shape[0], idx, w)
    M, K = idx.shape
    C = out.shape[1]
    if tuple(go.shape) != (M, C):
        raise ValueError(f"cpu_kernels.scatter_corners_: go {tuple(go.shape)} must be ({M}, {C})")
    library().scatter_corners(M, K, C, idx.data_ptr(), w.data_ptr(), go.data_ptr(), out.data_ptr())
    return out


def gather_corners(table: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """out[m] = sum_k w[m, k] * table[idx[m, k]]: table (P, C), idx / w (M, K) -> (M, C)."""
    _check("gather_corners", table, w)
    _check_stencil("gather_corners", table.shape[0], idx, w)
    M, K = idx.shape
    C = table.shape[1]
    out = torch.empty(M, C, dtype=table.dtype)
    library().gather_corners(M, K, C, idx.data_ptr(), w.data_ptr(), table.data_ptr(), out.data_ptr())
    return out


def bias_relu(x: Tensor, bias: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """relu(x + bias[segment]): x (nb * n_per, H) in nb segments of rows, bias (nb, H); out may be x."""
    out = torch.empty_like(x) if out is None else out
    _check("bias_relu", x, bias, out)
    nb, H = bias.shape
    if x.dim() != 2 or x.shape[1] != H or x.shape[0] % nb or out.shape != x.shape:
        raise ValueError(f"cpu_kernels.bias_relu: x {tuple(x.shape)} / out {tuple(out.shape)} do not match "
                         f"bias {tuple(bias.shape)}")
    library().bias_relu(nb, x.shape[0] // nb, H, x.data_ptr(), bias.data_ptr(), out.data_ptr())
    return out


def linear_relu(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """relu(h @ weight^T + bias): one matrix product, then bias and ReLU in one pass (in place)."""
    a = h @ weight.t()
    return bias_relu(a, bias.view(1, -1), out=a)


def relu_bwd_segsum(g: Tensor, h: Tensor, segsum: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """out = g * (h > 0); segsum[b] += the sum of out's rows of segment b (nb = segsum's rows, in place)."""
    out = torch.empty_like(g) if out is None else out
    _check("relu_bwd_segsum", g, h, segsum, out)
    nb, H = segsum.shape
    if g.dim() != 2 or g.shape[1] != H or g.shape[0] % nb or h.shape != g.shape or out.shape != g.shape:
        raise ValueError(f"cpu_kernels.relu_bwd_segsum: g {tuple(g.shape)}, h {tuple(h.shape)}, out "
                         f"{tuple(out.shape)} do not match segsum {tuple(segsum.shape)}")
    library().relu_bwd_segsum(nb, g.shape[0] // nb, H, g.data_ptr(), h.data_ptr(), out.data_ptr(),
                              segsum.data_ptr())
    return out


def pe_fwd(u: Tensor, coeff: Tensor, include_input: bool) -> Tensor:
    """Positional encoding of rows u (n, C): (n, C * (2K + inc)), per channel [u], sin(u * coeff), cos(...)."""
    _check("pe_fwd", u, coeff)
    n, C = u.shape
    K, inc = coeff.numel(), int(bool(include_input))
    x0 = torch.empty(n, C * (2 * K + inc), dtype=u.dtype)
    library().pe_fwd(n, C, K, inc, u.data_ptr(), coeff.data_ptr(), x0.data_ptr())
    return x0


def pe_bwd(g1: Tensor, g2: Optional[Tensor], x0: Tensor, coeff: Tensor, include_input: bool) -> Tensor:
    """Gradient (n, C) of :func:`pe_fwd`'s input for the output gradient g1 + g2 (g2 may be None); x0 its output."""
    _check("pe_bwd", g1, x0, coeff, *([g2] if g2 is not None else []))
    K, inc = coeff.numel(), int(bool(include_input))
    n, D = x0.shape
    C = D // (2 * K + inc)
    if D != C * (2 * K + inc) or g1.shape != x0.shape or (g2 is not None and g2.shape != x0.shape):
        raise ValueError(f"cpu_kernels.pe_bwd: shapes g1 {tuple(g1.shape)}, x0 {tuple(x0.shape)} do not match "
                         f"{K} frequencies (include_input={bool(include_input)})")
    gu = torch.empty(n, C, dtype=x0.dtype)
    library().pe_bwd(n, C, K, inc, g1.data_ptr(), 0 if g2 is None else g2.data_ptr(), x0.data_ptr(),
                     coeff.data_ptr(), gu.data_ptr())
    return gu


def corner_stencil(x: Tensor, shape) -> tuple:
    """(idx (M, 2^d) int64, w (M, 2^d)) of models/fast_ops.corner_stencil for float32 points x (M, d)."""
    _check("corner_stencil", x)
    M, d = x.shape
    if not 1 <= d <= 8 or len(shape) != d:
        raise ValueError(f"cpu_kernels.corner_stencil: {d} coordinates for lattice shape {tuple(shape)}")
    K = 1 << d
    sh = torch.tensor([int(n) for n in shape], dtype=torch.int64)
    idx, w = torch.empty(M, K, dtype=torch.int64), torch.empty(M, K, dtype=x.dtype)
    library().corner_stencil(M, d, sh.data_ptr(), x.data_ptr(), idx.data_ptr(), w.data_ptr())
    return idx, w


def grid_gather_bias_relu(q, start: int, stop: int, table: Tensor, bias: Tensor, out: Tensor,
                          relu: bool = True) -> Tensor:
    """relu(gather_corners(table, *q.stencil(start, stop)) + bias) into ``out`` (stop - start, C) without the
    stencil tensors: q a models.fast_ops.GridQuery (its per-axis tables), table (P, C), bias (C,); ``relu``
    False: without the ReLU.

    ``table`` float32, or bfloat16 (rows read as float32 exactly and accumulated in float32 in the same order:
    bitwise the float32 kernel on ``table.float()``, with half the bytes read). bfloat16 ``table``, ``bias`` and
    ``out`` (bf16 products' operands): out = bf16(relu(float(bf16(interp)) + float(bias))) with interp that float32
    corner sum: the rows are rounded to bf16 before the bias, as rows resampled once (bias 0, no ReLU) and then
    added to a bf16 bias by PyTorch, so both give the same bits."""
    name = "grid_gather_bias_relu"
    lowp = out.dtype == torch.bfloat16
    bf16 = table.dtype == torch.bfloat16
    if lowp:
        _check(name, table, bias, out, dtype=torch.bfloat16)
    elif bf16 and (table.device.type != "cpu" or not table.is_contiguous()):
        raise ValueError(f"cpu_kernels.{name}: a bfloat16 table must be a contiguous CPU tensor")
    _check(name, *([] if bf16 else [table]), *([] if lowp else [bias, out]), *q.axis_w)
    M, C = stop - start, table.shape[1]
    if not (0 <= start <= stop <= q.num_points) or out.shape != (M, C) or bias.shape != (C,) \
            or q.corners > 256 or table.shape[0] != math.prod(q.lattice_shape):
        raise ValueError(f"cpu_kernels.{name}: rows {start}..{stop} of {q.num_points}, out "
                         f"{tuple(out.shape)}, bias {tuple(bias.shape)}, table {tuple(table.shape)}")
    lib = library()
    fn = lib.grid_gather_bias_relu_lp if lowp else lib.grid_gather_bias_relu_bf16t if bf16 else \
        lib.grid_gather_bias_relu
    keep, args = _query_args(q, name)
    if fn(start, M, *args, C, table.data_ptr(), bias.data_ptr(), int(bool(relu)), out.data_ptr()):
        raise MemoryError(f"cpu_kernels.{name}: could not allocate the per-thread rows ({C} columns)")
    return out


def _query_args(q, name: str) -> tuple:
    """(keep, args): a GridQuery as C arguments (d, query strides, corners per axis, per-axis rows, per-axis
    weights) and the objects they point into, which the caller holds while the call runs."""
    for t in q.axis_idx:
        if t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"cpu_kernels.{name}: per-axis rows must be contiguous int64 on the CPU")
    d = len(q.query_shape)
    if d > 64:
        raise ValueError(f"cpu_kernels.{name}: {d} lattice axes (at most 64)")
    ka = torch.tensor([t.shape[1] for t in q.axis_idx], dtype=torch.int64)
    qs = torch.tensor(q.q_strides, dtype=torch.int64)
    pi = (ctypes.c_void_p * d)(*[t.data_ptr() for t in q.axis_idx])
    pw = (ctypes.c_void_p * d)(*[t.data_ptr() for t in q.axis_w])
    return (ka, qs, pi, pw), (d, qs.data_ptr(), ka.data_ptr(), ctypes.addressof(pi), ctypes.addressof(pw))


def panel_width() -> int:
    """Columns per weight panel of :func:`baked_mlp` (32 with AVX-512, 16 with AVX2 + FMA, else 8); hidden
    widths must be multiples of it."""
    return int(library().mlp_panel_width())


def pack_panels(weight: Tensor) -> Tensor:
    """A (H, H) ``nn.Linear`` weight (out, in) packed for :func:`baked_mlp`: panels of ``panel_width()`` output
    columns, each (in, columns) row-major: packed[p, k, j] = weight[p * NR + j, k]."""
    nr = panel_width()
    H_out, H_in = weight.shape
    if H_out % nr:
        raise ValueError(f"cpu_kernels.pack_panels: {H_out} output columns are not a multiple of {nr}")
    return weight.detach().float().t().reshape(H_in, H_out // nr, nr).permute(1, 0, 2).contiguous()


def _members(name: str, bias0: Tensor, out: Tensor, H: int, M: int) -> int:
    """K of a one-pass inference call: bias0 (H,) with out (M,), or bias0 (K, H) with out (K, M)."""
    K = bias0.shape[0] if bias0.dim() == 2 else 1
    if bias0.shape[-1] != H or bias0.dim() not in (1, 2) or tuple(out.shape) != ((M,) if bias0.dim() == 1 else (K, M)):
        raise ValueError(f"cpu_kernels.{name}: bias0 {tuple(bias0.shape)} and out {tuple(out.shape)} must be ({H},) "
                         f"and ({M},), or (K, {H}) and (K, {M})")
    return K


def baked_mlp(q, start: int, stop: int, table: Tensor, bias0: Tensor, packed: Tensor, hbias: Tensor,
              w_out: Tensor, b_out: float, out: Tensor) -> Tensor:
    """Baked inference of query vertices ``start .. stop - 1`` in one pass per block of rows (no (rows, H)
    activation through memory): h = relu(gather(table) + bias0) as :func:`grid_gather_bias_relu`, then for each
    of the L hidden layers h = relu(h W_l^T + b_l) (register-blocked products, fused multiply-adds in input
    order, then the bias, then the ReLU), then out = h . w_out + b_out.

    q a models.fast_ops.GridQuery; table (P, H) float32 or bfloat16 (read as float32); bias0 (H,) with out
    (stop - start,), or K members' biases (K, H) with out (K, stop - start) float32 (each block's rows gathered
    once for all of them; bitwise K calls of one member); packed (L, H / NR, H, NR) from :func:`pack_panels` (L
    may be 0); hbias (L, H); w_out (H,). Values differ from PyTorch's products by their summation order only; they
    do not depend on the chunking, the row's block or the thread count."""
    bf16 = table.dtype == torch.bfloat16
    if table.device.type != "cpu" or not table.is_contiguous() or table.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("cpu_kernels.baked_mlp: table must be a contiguous float32 or bfloat16 CPU tensor")
    _check("baked_mlp", bias0, packed, hbias, w_out, out, *q.axis_w)
    M, H = stop - start, table.shape[1]
    L = packed.shape[0] if packed.dim() == 4 else -1
    nr = panel_width()
    if not (0 <= start <= stop <= q.num_points) or H % nr or tuple(packed.shape) != (L, H // nr, H, nr) \
            or tuple(hbias.shape) != (L, H) or w_out.shape != (H,) or q.corners > 256 \
            or table.shape[0] != math.prod(q.lattice_shape):
        raise ValueError(f"cpu_kernels.baked_mlp: rows {start}..{stop} of {q.num_points}, table {tuple(table.shape)}"
                         f", packed {tuple(packed.shape)} (expected (L, {H // nr}, {H}, {nr})), hbias "
                         f"{tuple(hbias.shape)}, w_out {tuple(w_out.shape)}")
    K = _members("baked_mlp", bias0, out, H, M)
    fn = library().baked_mlp_bf16t if bf16 else library().baked_mlp
    keep, args = _query_args(q, "baked_mlp")
    rc = fn(start, M, *args, H, table.data_ptr(), K, bias0.data_ptr(), L, packed.data_ptr(), hbias.data_ptr(),
            w_out.data_ptr(), float(b_out), out.data_ptr())
    del keep
    if rc != 0:
        raise MemoryError(f"cpu_kernels.baked_mlp: could not allocate the per-thread block buffers ({H} columns)")
    return out


def cond_bias_lines(c: Tensor, tables: Tensor, index: Tensor, bias: Tensor) -> Optional[Tensor]:
    """out[b] = bias + the sum over lines j (in order) of line j of ``tables`` interpolated at c[b, param_j], as
    ``models.components.grids.lerp_lines`` (clamp) does: a baked DRR-Net's condition bias from its folded lines
    (``DRRNet._fold_condition``). c (B, d_c) float32; tables (rows, H); index (3, lines) int64: each line's parameter,
    first row and length (>= 2); bias (H,). The same bits as those float operations in PyTorch. None where the
    library is missing (then the caller computes them in PyTorch)."""
    lib = library()
    if lib is None:
        return None
    _check("cond_bias_lines", c, tables, bias)
    _check("cond_bias_lines", index, dtype=torch.int64)
    if index.dim() != 2 or index.shape[0] != 3 or c.dim() != 2 or tables.dim() != 2 or \
            bias.shape != (tables.shape[1],):
        raise ValueError(f"cpu_kernels.cond_bias_lines: c {tuple(c.shape)}, tables {tuple(tables.shape)}, index "
                         f"{tuple(index.shape)}, bias {tuple(bias.shape)} do not fit")
    out = torch.empty(c.shape[0], tables.shape[1])
    n, ptr = index.shape[1], index.data_ptr()
    rc = lib.cond_bias_lines(c.shape[0], c.shape[1], c.data_ptr(), n, ptr, ptr + 8 * n, ptr + 16 * n,
                             tables.shape[0], tables.data_ptr(), tables.shape[1], bias.data_ptr(), out.data_ptr())
    if rc == -2:
        raise ValueError(f"cpu_kernels.cond_bias_lines: index {index.tolist()} has a line out of the {tables.shape[0]} "
                         f"rows or parameters (d_c = {c.shape[1]}), or shorter than 2")
    if rc:
        raise ValueError("cpu_kernels.cond_bias_lines: a condition is NaN (conditions are parameters scaled to "
                         "[0, 1])")
    return out


def has_amx() -> bool:
    """Whether the library was built with the AMX-BF16 kernel (:func:`baked_mlp_amx`; -march=native on a CPU
    with AMX tiles, AMX-BF16 and AVX512-BF16, Linux)."""
    return library() is not None and bool(library().has_amx())


def pack_amx(weight: Tensor) -> Tensor:
    """A (H_out, H_in) ``nn.Linear`` weight in the AMX tiles' bf16 pair layout of :func:`baked_mlp_amx`: for each
    32-wide input block kb and 16-wide output block nb one 16 x 16 x 2 tile,
    packed[kb, nb, r, n, p] = weight[nb * 16 + n, kb * 32 + 2 r + p] (rounded to bf16)."""
    H_out, H_in = weight.shape
    if H_out % 16 or H_in % 32:
        raise ValueError(f"cpu_kernels.pack_amx: weight {tuple(weight.shape)} needs outputs a multiple of 16 and "
                         f"inputs a multiple of 32")
    w = weight.detach().float().reshape(H_out // 16, 16, H_in // 32, 16, 2)       # nb, n, kb, r, p
    return w.permute(2, 0, 3, 1, 4).contiguous().to(torch.bfloat16)


_ACTIVATIONS = {"none": 0, "sigmoid": 1, "clamp": 2}


def baked_mlp_amx(rows: Tensor, bias0: Tensor, packed: Tensor, hbias: Tensor, w_out: Tensor, b_out: float,
                  out: Tensor, activation: str = "none") -> bool:
    """The baked decoder with bf16 products on AMX tiles, for rows (M, H) bfloat16 read in order (the identity
    lattice's table rows, or rows resampled once): out = act(relu(... relu(relu(rows + bias0) W_1^T + b_1) ...)
    . w_out + b_out), each layer's input rounded to bf16, products accumulated in float32, bias / ReLU / output
    layer in float32; ``activation`` the model's output activation ("none", "sigmoid": within 2 float32 ulp of
    torch.sigmoid, "clamp": to [0, 1]). bias0 (H,) with out (M,), or K members' biases (K, H) with out (K, M)
    float32 (bitwise K calls of one member); packed (L, H / 32, H / 16, 16, 16, 2) from :func:`pack_amx`; hbias
    (L, H); w_out (H,). Returns False (and writes nothing) where the library has no AMX kernel or the OS refuses
    the AMX state; then use the PyTorch products."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"cpu_kernels.baked_mlp_amx: activation {activation!r} not in {sorted(_ACTIVATIONS)}")
    if rows.device.type != "cpu" or rows.dtype != torch.bfloat16 or not rows.is_contiguous() or rows.dim() != 2:
        raise ValueError("cpu_kernels.baked_mlp_amx: rows must be a contiguous (M, H) bfloat16 CPU tensor")
    _check("baked_mlp_amx", bias0, hbias, w_out, out)
    M, H = rows.shape
    L = packed.shape[0] if packed.dim() == 6 else -1
    if H % 32 or tuple(packed.shape) != (L, H // 32, H // 16, 16, 16, 2) or packed.dtype != torch.bfloat16 \
            or not packed.is_contiguous() or tuple(hbias.shape) != (L, H) or w_out.shape != (H,):
        raise ValueError(f"cpu_kernels.baked_mlp_amx: rows {tuple(rows.shape)}, packed {tuple(packed.shape)} "
                         f"{packed.dtype} (expected (L, {H // 32}, {H // 16}, 16, 16, 2) bfloat16), hbias "
                         f"{tuple(hbias.shape)}, w_out {tuple(w_out.shape)}")
    K = _members("baked_mlp_amx", bias0, out, H, M)
    rc = library().baked_mlp_amx(M, H, rows.data_ptr(), K, bias0.data_ptr(), L, packed.data_ptr(), hbias.data_ptr(),
                                 w_out.data_ptr(), float(b_out), _ACTIVATIONS[activation], out.data_ptr())
    if rc > 0:
        raise MemoryError("cpu_kernels.baked_mlp_amx: could not allocate the per-thread block buffers")
    return rc == 0


def mark_touched(idx: Tensor, w: Tensor, P: int):
    """(mask (P,) bool of the rows idx[m, k] with w[m, k] != 0, their number)."""
    _check("mark_touched", w)
    _check_stencil("mark_touched", P, idx, w)
    mask = torch.empty(P, dtype=torch.bool)
    u = library().mark_touched(idx.numel(), idx.data_ptr(), w.data_ptr(), int(P), mask.data_ptr())
    return mask, int(u)


def to_bf16(x: Tensor) -> Tensor:
    """x (contiguous float32) as bfloat16, round to nearest even: bitwise ``x.to(torch.bfloat16)``, in one pass."""
    _check("to_bf16", x)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    library().f32_to_bf16(x.numel(), x.data_ptr(), out.data_ptr())
    return out


def from_bf16(x: Tensor) -> Tensor:
    """x (contiguous bfloat16 CPU tensor) as float32 (exact): ``x.float()`` in one pass."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise ValueError(f"cpu_kernels.from_bf16: expected a contiguous bfloat16 CPU tensor, got {x.dtype} on "
                         f"{x.device} (contiguous={x.is_contiguous()})")
    out = torch.empty(x.shape, dtype=torch.float32)
    library().bf16_to_f32(x.numel(), x.data_ptr(), out.data_ptr())
    return out


# ----------------------------------------------------------------------------------------------------
# bf16 training: the passes around a bf16 product read its bf16 result / write its bf16 operands (each the
# float32 twin's bits, rounded to bf16 where the result is an operand; twins in models/fast_ops._TorchPrims).
# ----------------------------------------------------------------------------------------------------
def rms_norm_fwd_lp(x: Tensor, eps: float):
    """(xh, xh as bf16, r) of :func:`rms_norm_fwd`."""
    _check("rms_norm_fwd_lp", x)
    n, D = x.shape
    xh, xhb, r = torch.empty_like(x), torch.empty(n, D, dtype=torch.bfloat16), torch.empty(n, 1, dtype=x.dtype)
    library().rms_norm_fwd_lp(n, D, x.data_ptr(), float(eps), xh.data_ptr(), xhb.data_ptr(), r.data_ptr())
    return xh, xhb, r


def add_bf16(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """a + b for a float32 and b bfloat16 of one shape, into ``out`` (may be a; default a new tensor)."""
    out = torch.empty_like(a) if out is None else out
    _check("add_bf16", a, out)
    _check("add_bf16", b, dtype=torch.bfloat16)
    if b.shape != a.shape or out.shape != a.shape:
        raise ValueError(f"cpu_kernels.add_bf16: shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(out.shape)}")
    library().add_bf16(a.numel(), a.data_ptr(), b.data_ptr(), out.data_ptr())
    return out


def add_to_bf16(a: Tensor, b: Tensor) -> Tensor:
    """bf16(a + b) for float32 a and b of one shape."""
    _check("add_to_bf16", a, b)
    if b.shape != a.shape:
        raise ValueError(f"cpu_kernels.add_to_bf16: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    out = torch.empty(a.shape, dtype=torch.bfloat16)
    library().add_to_bf16(a.numel(), a.data_ptr(), b.data_ptr(), out.data_ptr())
    return out


def bias_relu_lp(x: Tensor, bias: Tensor, operand: bool = True):
    """(:func:`bias_relu` of x, the result as bf16 or None): x float32 or bfloat16 (a product's result);
    ``operand`` False: no bf16 copy."""
    nb, H = bias.shape
    _check("bias_relu_lp", bias)
    _check("bias_relu_lp", x, dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
    if x.dim() != 2 or x.shape[1] != H or x.shape[0] % nb:
        raise ValueError(f"cpu_kernels.bias_relu_lp: x {tuple(x.shape)} does not match bias {tuple(bias.shape)}")
    out = torch.empty(x.shape, dtype=torch.float32)
    outb = torch.empty(x.shape, dtype=torch.bfloat16) if operand else None
    bf = x.dtype == torch.bfloat16
    library().bias_relu_lp(nb, x.shape[0] // nb, H, None if bf else x.data_ptr(), x.data_ptr() if bf else None,
                           bias.data_ptr(), out.data_ptr(), outb.data_ptr() if operand else None)
    return out, outb


def relu_bwd_segsum_lp(g: Tensor, h: Tensor, segsum: Tensor, out: Optional[Tensor] = None, operand: bool = True):
    """(:func:`relu_bwd_segsum` of a bf16 g into ``out`` (default a new float32 tensor), the result as bf16 or
    None (``operand`` False))."""
    _check("relu_bwd_segsum_lp", g, dtype=torch.bfloat16)
    out = torch.empty(g.shape, dtype=torch.float32) if out is None else out
    _check("relu_bwd_segsum_lp", h, segsum, out)
    nb, H = segsum.shape
    if g.dim() != 2 or g.shape[1] != H or g.shape[0] % nb or h.shape != g.shape or out.shape != g.shape:
        raise ValueError(f"cpu_kernels.relu_bwd_segsum_lp: g {tuple(g.shape)}, h {tuple(h.shape)}, out "
                         f"{tuple(out.shape)} do not match segsum {tuple(segsum.shape)}")
    outb = torch.empty(g.shape, dtype=torch.bfloat16) if operand else None
    library().relu_bwd_segsum_lp(nb, g.shape[0] // nb, H, g.data_ptr(), h.data_ptr(), out.data_ptr(),
                                 outb.data_ptr() if operand else None, segsum.data_ptr())
    return out, outb
