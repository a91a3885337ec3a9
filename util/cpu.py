"""What this CPU offers for bf16 matrix products: AMX-BF16, AVX512-BF16 or neither.

Read from the ``flags`` line of ``/proc/cpuinfo`` (Linux, x86_64). Where that file is absent or unreadable
(macOS, Windows, a sandbox) the answer is ``"unknown"``, never an error: the training loop records it in
meta.json and the benchmarks print it. Training never chooses a code path from it (``train.mixed_precision``
is the user's choice; ``auto`` stays fp32 on CPU); the explorer's 3D view computes its display volume with bf16
products where it says ``amx_bf16`` (``ExplorerModel.display_dtype``).

* ``"amx_bf16"``: AMX tiles with bf16 products (Intel Sapphire Rapids and later): bf16 matrix products run
  several times faster than fp32 through oneDNN.
* ``"avx512_bf16"``: AVX512-BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later): bf16 products run
  up to about 2x faster than fp32.
* ``"none"``: neither (bf16 is emulated: usually slower than fp32).
* ``"unknown"``: the flags could not be read.

:func:`tune_malloc` sets glibc's allocator up for a training loop on the CPU (see there).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Dict, Optional

CPUINFO = "/proc/cpuinfo"
KINDS = ("amx_bf16", "avx512_bf16", "none", "unknown")


def parse_cpuinfo(text: str) -> Dict[str, object]:
    """Features of the first processor listed in a ``/proc/cpuinfo`` text.

    Returns:
        dict with ``bf16`` (one of :data:`KINDS`; ``"unknown"`` when the text has no flags line),
        ``model`` (the ``model name`` line, or ``""``), ``amx_bf16``, ``amx_tile``, ``avx512_bf16``,
        ``avx512f`` (bools).
    """
    flags, model = None, ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
        if flags is not None and model:
            break
    have = {f: bool(flags) and f in flags for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")}
    if flags is None:
        kind = "unknown"
    elif have["amx_bf16"] and have["amx_tile"]:
        kind = "amx_bf16"
    elif have["avx512_bf16"]:
        kind = "avx512_bf16"
    else:
        kind = "none"
    return {"bf16": kind, "model": model, **have}


def cpu_features(path: Optional[str] = None) -> Dict[str, object]:
    """:func:`parse_cpuinfo` of ``path`` (default ``/proc/cpuinfo``) plus ``machine`` and ``cores``
    (``os.cpu_count()``); ``bf16`` is ``"unknown"`` and ``source`` names why when the file cannot be read."""
    path = CPUINFO if path is None else path
    try:
        with open(path, errors="replace") as f:
            text = f.read()
        out = parse_cpuinfo(text)
        out["source"] = path
    except OSError as e:
        out = parse_cpuinfo("")
        out["model"] = platform.processor() or ""
        out["source"] = f"unreadable ({type(e).__name__})"
    out["machine"] = platform.machine()
    out["cores"] = os.cpu_count() or 0
    return out


def cpu_model() -> str:
    """The CPU model (``model name`` of /proc/cpuinfo on Linux, else ``platform.processor()`` / machine)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe(features: Optional[Dict[str, object]] = None) -> str:
    """One line for benchmark output, e.g. ``cpu: Intel(R) Xeon(R) ... | bf16: amx_bf16 | 2 cores``."""
    f = cpu_features() if features is None else features
    return f"cpu: {f.get('model') or f.get('machine') or '?'} | bf16: {f['bf16']} | {f.get('cores', '?')} cores"


MALLOC_MMAP_THRESHOLD = 32 << 20
"""Bytes from which glibc's malloc maps memory of its own (its largest allowed value on 64-bit Linux)."""
MALLOC_TRIM_THRESHOLD = 256 << 20
"""Free bytes at the top of the heap above which glibc gives memory back to the system."""
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_malloc_state: Dict[str, str] = {}


def tune_malloc() -> str:
    """Keep the memory of a CPU training step's tensors in the process between steps (glibc only; once per process).

    A step allocates and frees tensors of 0.1-10 MB by the hundred. With glibc's defaults the blocks from 128 kB
    up are mapped from the system one by one, or the heap is trimmed after the large frees at the end of a step,
    so the next step touches fresh pages again: page faults and zeroing in every pass that writes a new tensor.
    ``mallopt``: blocks up to :data:`MALLOC_MMAP_THRESHOLD` come from the heap and up to
    :data:`MALLOC_TRIM_THRESHOLD` of free heap is kept. Measured on the demo config (2-core Xeon with AMX,
    train.py, steps 10-110): bf16 22.7 -> 30.8 steps/s, fp32 22.9 -> 23.9; setting only the trim threshold
    (which also switches glibc's own adaptive threshold off) halved the speed. Values only, never results.

    Not applied (and said so) where ``DRR_MALLOC=default``, where the user set glibc's own ``MALLOC_*_``
    variables, or where the C library is not glibc.

    Returns:
        what was done, one line (recorded in a run's meta.json).
    """
    if "state" in _malloc_state:
        return _malloc_state["state"]
    if os.environ.get("DRR_MALLOC", "").strip().lower() in ("default", "off", "0", "no"):
        state = "glibc defaults (DRR_MALLOC=default)"
    elif any(k in os.environ for k in _MALLOC_ENV):
        state = "the environment's MALLOC_* settings"
    else:
        state = _mallopt_thresholds()
    _malloc_state["state"] = state
    return state


def _mallopt_thresholds() -> str:
    if platform.system() != "Linux" or not platform.libc_ver()[0].startswith("glibc"):
        return "system allocator (not glibc: unchanged)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim, m_mmap = -1, -3                       # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
        ok = libc.mallopt(m_mmap, MALLOC_MMAP_THRESHOLD) == 1 and libc.mallopt(m_trim, MALLOC_TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        return f"glibc defaults (mallopt unavailable: {type(e).__name__})"
    if not ok:
        return "glibc defaults (mallopt refused the thresholds)"
    return f"glibc mmap threshold {MALLOC_MMAP_THRESHOLD >> 20} MiB, trim threshold {MALLOC_TRIM_THRESHOLD >> 20} MiB"
