"""Fingerprints of a run's training data: what ``datasets.base.Dataset.fingerprint`` builds, what train.py stores
in meta.json (``data_fingerprint``) and what test.py / ``--resume`` compare it with.

A fingerprint is a JSON dict ``{"version": 1, "facts": {...}, "files": {name: [size, digest]}}``:

- ``facts``: the dataset's data facts (its ``meta()`` less the entries that only say where the data lives, e.g.
  ``path`` / ``root`` / ``*_path`` / ``*_dir``): value range, member counts, shapes, normalization. A member
  scaled by 10 moves the value range or the training mean.
- ``files``: for each data file, its size in bytes and a BLAKE2b digest of its content; files up to
  :data:`FULL_HASH_BYTES` are hashed whole, larger ones on their first and last MiB plus :data:`SAMPLES` blocks
  spread evenly (cheap on terabyte ensembles; an edit confined to a few bytes between the sampled blocks of a
  large file is not seen). Names are relative to the files' common folder, so data moved or copied elsewhere
  (other paths, other mtimes) keeps its fingerprint.

:func:`compare_fingerprints` names what differs, in one line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["FINGERPRINT_VERSION", "file_digest", "files_fingerprint", "data_fingerprint", "compare_fingerprints"]

FINGERPRINT_VERSION = 1
FULL_HASH_BYTES = 4 << 20
"""Files up to this size are hashed whole."""
EDGE_BYTES = 1 << 20
SAMPLES = 64
SAMPLE_BYTES = 64 << 10
MAX_FILES = 100_000
_WHERE_KEYS = ("path", "root", "files")


def file_digest(path: str) -> str:
    """BLAKE2b (16 bytes, hex) of a file's content: the whole file up to :data:`FULL_HASH_BYTES`, else its first
    and last :data:`EDGE_BYTES` and :data:`SAMPLES` evenly spread blocks of :data:`SAMPLE_BYTES`."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            offsets = [0, size - EDGE_BYTES] + [EDGE_BYTES + (size - 2 * EDGE_BYTES - SAMPLE_BYTES) * i // (SAMPLES - 1)
                                                for i in range(SAMPLES)]
            for i, off in enumerate(offsets):
                f.seek(off)
                h.update(f.read(EDGE_BYTES if i < 2 else SAMPLE_BYTES))
    return h.hexdigest()


def files_fingerprint(paths: Iterable[str]) -> Dict[str, List[Any]]:
    """``{name: [size, digest]}`` of existing files (names relative to their common folder; each file once)."""
    real = sorted({os.path.abspath(p) for p in paths if isinstance(p, str) and os.path.isfile(p)})[:MAX_FILES]
    if not real:
        return {}
    base = os.path.commonpath([os.path.dirname(p) for p in real])
    return {os.path.relpath(p, base): [os.path.getsize(p), file_digest(p)] for p in real}


def _is_where(key: str) -> bool:
    return key in _WHERE_KEYS or key.endswith(("_path", "_dir"))


def data_fingerprint(facts: Dict[str, Any], paths: Iterable[str] = ()) -> Dict[str, Any]:
    """The fingerprint of data whose facts (a dataset's ``meta()``) and files are given (see the module docstring).
    Facts are kept as JSON gives them back (so a stored fingerprint compares equal to a fresh one)."""
    kept = {k: v for k, v in (facts or {}).items() if not _is_where(str(k))}
    kept = json.loads(json.dumps(kept, default=str))
    return {"version": FINGERPRINT_VERSION, "facts": kept, "files": files_fingerprint(paths)}


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= n else s[:n - 3] + "..."


def _names(names: List[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _same(a: Any, b: Any) -> bool:
    """Equal, with floats equal to a relative 1e-6 (a mean summed in another order on another machine)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def compare_fingerprints(stored: Optional[Dict[str, Any]], current: Dict[str, Any]) -> List[str]:
    """What differs between a stored fingerprint and the current one, one short phrase per difference (empty:
    the same data). Only what both fingerprints record is compared (a dataset that gives no files compares its
    facts)."""
    if not stored:
        return []
    out = []
    a, b = stored.get("facts", {}) or {}, current.get("facts", {}) or {}
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            continue  # a fact one side does not record (e.g. a key added to meta() since): not a data change
        if not _same(a[k], b[k]):
            out.append(f"{k} {_short(a[k])} -> {_short(b[k])}")
    fa, fb = stored.get("files", {}) or {}, current.get("files", {}) or {}
    if fa and fb:
        changed = sorted(k for k in set(fa) & set(fb) if list(fa[k]) != list(fb[k]))
        gone, new = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
        if changed:
            out.append(f"files changed: {_names(changed)}")
        if gone:
            out.append(f"files missing: {_names(gone)}")
        if new:
            out.append(f"files added: {_names(new)}")
    elif fa and not fb:
        out.append(f"none of the {len(fa)} data files found")
    return out
