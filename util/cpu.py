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
"""
from __future__ import annotations

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
