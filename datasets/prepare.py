"""Turn a folder of member files and a parameter CSV into the reference on-disk layout (spec 1, 3.1).

    python -m datasets.prepare --data_dir D --params P.csv --out_dir O --n_train 100
    python -m datasets.prepare --data_dir D --params P.csv --out_dir O --train_list 0-79,90,95 --importance

Writes into ``out_dir``:

- ``cond.npy``: (M, 1 + d_c) float32. Column 0 = index of the member's file in the lexicographically
  sorted list of member files in ``data_dir``; columns 1.. = the CSV parameters min-max normalized to
  [0, 1] with min and max over ALL members (train and test).
- ``split.npy``: ``np.save`` of a dict ``{'cond_idx': train rows, 'cond_idx_unseen': test rows}`` (int64
  rows of cond.npy); read it with ``np.load(p, allow_pickle=True).item()``.
- ``cond_meta.json``: ``{"names": [...], "min": [...], "max": [...]}``, the CSV header and the raw ranges,
  so that predictions can take parameters in the simulation's units.
- with ``--importance``: the importance-sampling files of ``datasets.importance`` (spec 3.3),
  ``impsmp_cond.npy`` and ``impsmp_coord/`` (dataset keys ``impsmp_cond_path``, ``impsmp_coord_path``).

Row i of the CSV (after its header line) describes the i-th member file in sorted order, so the number
of data rows must equal the number of member files. Numbered names whose text order is not their numeric
order (``member_0 .. member_19`` without zero padding) are refused, naming the fix. Every member is opened once, one at a time (never
all in memory), to check that all have the same shape and dtype and hold only finite values.

A parameter column with a single value (constant over all members) carries no information; it is
normalized to 0 (not divided by zero) and a ``UserWarning`` names the column. Its min and max in
cond_meta.json are then equal.

The CSV is read as UTF-8; a byte-order mark (Excel's "CSV UTF-8") is dropped, duplicate parameter names are
an error. ``--file_pattern`` (a glob on the file names) selects the member files when data_dir holds others.

Errors (``PrepareError``, a ``util.errors.DataError``, itself a ``ValueError``) name the offending file (also a
truncated or unreadable member file), CSV row or column; the command prints them as one line.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import math
import os
import re
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from util.errors import DataError

__all__ = ["prepare", "PrepareError", "check_numeric_order", "list_member_files", "read_params_csv", "read_member", "parse_train_list",
           "normalize_params", "MEMBER_EXTS", "main"]

log = logging.getLogger(__name__)

#: file extensions recognised as member files (lower case)
MEMBER_EXTS = (".npy", ".raw", ".bin", ".dat", ".h5", ".hdf5", ".nc")
RAW_EXTS = (".raw", ".bin", ".dat")
H5_EXTS = (".h5", ".hdf5", ".nc")


#: files prepare() writes into out_dir (and, with importance, IMPORTANCE_OUTPUT_NAMES)
OUTPUT_NAMES = ("cond.npy", "split.npy", "cond_meta.json")
IMPORTANCE_OUTPUT_NAMES = ("impsmp_cond.npy", "impsmp_coord")


class PrepareError(DataError):
    """Bad input to the data preparation (the message names the file, row or column); a ``DataError``."""


# ----------------------------------------------------------------------------------------------- members
def list_member_files(data_dir: str, file_ext: Optional[str] = None,
                      file_pattern: Optional[str] = None) -> List[str]:
    """Sorted (lexicographic) names of the member files in ``data_dir``.

    Args:
        data_dir: folder with one file per member.
        file_ext: only files ending in this extension (e.g. ``.npy``; the dot is optional; case-insensitive).
        file_pattern: only files whose name matches this glob (``fnmatch``, case-sensitive, the name only,
            e.g. ``member_*.npy``). Without file_ext and file_pattern: every non-hidden regular file with a
            recognised extension (``MEMBER_EXTS``), which must all share one extension.
    """
    if not os.path.isdir(data_dir):
        raise PrepareError(f"data_dir '{data_dir}' is not a folder")
    names = sorted(n for n in os.listdir(data_dir)
                   if not n.startswith(".") and os.path.isfile(os.path.join(data_dir, n)))
    if file_ext or file_pattern:
        files = names
        what = []
        if file_ext:
            ext = file_ext if file_ext.startswith(".") else "." + file_ext
            files = [n for n in files if n.lower().endswith(ext.lower())]
            what.append(f"ending in '{ext}'")
        if file_pattern:
            files = [n for n in files if fnmatch.fnmatchcase(n, file_pattern)]
            what.append(f"matching '{file_pattern}'")
        if not files:
            raise PrepareError(f"data_dir '{data_dir}' holds no member files {' and '.join(what)}"
                               + (f" (it holds {len(names)} other files, e.g. {names[0]})" if names
                                  else " (it is empty)"))
        return files
    files = [n for n in names if os.path.splitext(n)[1].lower() in MEMBER_EXTS]
    if not files:
        raise PrepareError(f"data_dir '{data_dir}' holds no member files (looked for {', '.join(MEMBER_EXTS)})"
                           + (f"; it holds {len(names)} other files, pass --file_ext" if names else "; it is empty"))
    exts = sorted({os.path.splitext(n)[1].lower() for n in files})
    if len(exts) > 1:
        raise PrepareError(f"data_dir '{data_dir}' mixes member file types {exts}; pick one with --file_ext")
    return files


def read_member(path: str, dims: Optional[Sequence[int]] = None, h5_key: str = "data",
                mmap: bool = True) -> np.ndarray:
    """One member's array: :func:`datasets.ensemble.open_member` (the reader training uses), with errors as
    ``PrepareError`` naming this command's flags.

    Args:
        path: ``.npy`` (memory-mapped when ``mmap``), raw float32 ``.raw/.bin/.dat`` (needs ``dims``),
            ``.h5/.hdf5`` or ``.nc`` (dataset ``h5_key``).
        dims: array shape in array order, e.g. ``(D, H, W)`` (C order, W fastest); required for raw files,
            checked against the stored shape of the other formats.
        h5_key: dataset name in HDF5 / NetCDF files.
    """
    from datasets.ensemble import open_member

    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in RAW_EXTS and not dims:
        raise PrepareError(f"{name}: raw files need --dims (the array shape, e.g. --dims 64 64 64)")
    try:
        return open_member(path, dims, h5_key, mmap)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        for key, flag in (("dataset.dims", "--dims"), ("dataset.h5_key", "--h5_key"),
                          ("dataset.file_ext", "--file_ext")):
            msg = msg.replace(key, flag)
        raise PrepareError(msg) from e


def _check_members(data_dir: str, files: List[str], dims, h5_key: str, train_set: set, log_transform: bool,
                   progress: bool) -> Dict[str, object]:
    """Open each member once: same shape/dtype as the first, finite values; train value range."""
    from tqdm import tqdm

    shape = dtype = None
    vmin, vmax = math.inf, -math.inf
    for i, name in enumerate(tqdm(files, desc="checking members", unit="file", disable=not progress)):
        path = os.path.join(data_dir, name)
        arr = read_member(path, dims, h5_key)
        if shape is None:
            shape, dtype = arr.shape, arr.dtype
            if arr.dtype.kind not in "fiu":
                raise PrepareError(f"{name}: dtype {arr.dtype} is not numeric")
        elif arr.shape != shape:
            raise PrepareError(f"{name} has shape {arr.shape} but the first member file {files[0]} has shape "
                               f"{shape}; all members must have the same shape")
        elif arr.dtype != dtype:
            raise PrepareError(f"{name} has dtype {arr.dtype} but the first member file {files[0]} has dtype "
                               f"{dtype}; all members must have the same dtype")
        a = np.asarray(arr)
        finite = np.isfinite(a)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            raise PrepareError(f"{name}: {n_nan} NaN and {n_inf} Inf values (first at index {tuple(bad.tolist())})")
        if i in train_set:
            lo, hi = float(a.min()), float(a.max())
            if log_transform and lo <= 0:
                raise PrepareError(f"{name}: log_transform needs positive values, found minimum {lo}")
            vmin, vmax = min(vmin, lo), max(vmax, hi)
        del a, arr
    if log_transform:
        vmin, vmax = math.log(vmin), math.log(vmax)
    return {"shape": tuple(int(s) for s in shape), "dtype": str(dtype), "value_min": vmin, "value_max": vmax}


# ------------------------------------------------------------------------------------------------ params
def read_params_csv(path: str) -> Tuple[List[str], np.ndarray]:
    """(names, values (M, d_c) float64) of a parameter CSV with a header line; blank lines are skipped.

    Raises PrepareError naming the row (1-based data row and file line) and column of a bad cell.
    """
    if not os.path.isfile(path):
        raise PrepareError(f"parameter CSV '{path}' not found")
    fname = os.path.basename(path)
    try:  # utf-8-sig: a byte-order mark (a CSV saved by Excel) is not part of the first name
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(lineno, r) for lineno, r in enumerate(csv.reader(f), start=1) if any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise PrepareError(f"{fname}: not UTF-8 text (byte {e.start}: {e.reason}); save the CSV as UTF-8") from None
    except csv.Error as e:
        raise PrepareError(f"{fname}: not a readable CSV ({e})") from None
    if not rows:
        raise PrepareError(f"{fname}: empty file (expected a header line with the parameter names)")
    _, header = rows[0]
    names = [h.strip() for h in header]
    if any(not n for n in names):
        raise PrepareError(f"{fname}: header line has an empty column name (column {names.index('') + 1})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PrepareError(f"{fname}: duplicate parameter names {dup} in the header; each column needs its own name")
    try:  # a header of numbers means the header line is missing
        [float(n) for n in names]
        raise PrepareError(f"{fname}: the first line {names} looks like numbers; the CSV needs a header line "
                           f"with the parameter names")
    except ValueError as e:
        if isinstance(e, PrepareError):
            raise
    data = rows[1:]
    if not data:
        raise PrepareError(f"{fname}: no data rows after the header")
    vals = np.empty((len(data), len(names)), dtype=np.float64)
    for r, (lineno, row) in enumerate(data):
        if len(row) != len(names):
            raise PrepareError(f"{fname}: data row {r} (line {lineno}) has {len(row)} cells, the header has "
                               f"{len(names)}")
        for j, cell in enumerate(row):
            try:
                v = float(cell)
            except ValueError:
                raise PrepareError(f"{fname}: data row {r} (line {lineno}), column '{names[j]}': "
                                   f"'{cell.strip()}' is not a number") from None
            if not math.isfinite(v):
                raise PrepareError(f"{fname}: data row {r} (line {lineno}), column '{names[j]}': "
                                   f"'{cell.strip()}' is not finite")
            vals[r, j] = v
    return names, vals


def normalize_params(names: List[str], vals: np.ndarray, source: str = "params") -> Tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """(normalized (M, d_c) float32, min, max): min-max over all rows; a constant column -> 0 with a warning."""
    lo, hi = vals.min(axis=0), vals.max(axis=0)
    span = hi - lo
    const = span == 0
    for j in np.flatnonzero(const):
        warnings.warn(f"{source}: column '{names[j]}' is constant ({lo[j]:g} for every member); it is normalized "
                      f"to 0 and carries no information", UserWarning, stacklevel=3)
    norm = (vals - lo) / np.where(const, 1.0, span)
    norm[:, const] = 0.0
    return norm.astype(np.float32), lo, hi


def parse_train_list(spec: Union[str, Sequence[int]]) -> List[int]:
    """Train rows from a list, a comma/whitespace-separated string (ranges ``a-b`` inclusive allowed) or a
    text file of such items (``#`` comments allowed)."""
    if not isinstance(spec, str):
        return [int(i) for i in spec]
    text = spec
    if os.path.isfile(spec):
        with open(spec) as f:
            text = "\n".join(line.split("#", 1)[0] for line in f)
    out = []
    for tok in text.replace(",", " ").split():
        m = re.fullmatch(r"(\d+)-(\d+)", tok)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise PrepareError(f"train list: range '{tok}' is empty (end before start)")
            out.extend(range(a, b + 1))
            continue
        try:
            out.append(int(tok))
        except ValueError:
            raise PrepareError(f"train list: '{tok}' is not a row number or a range a-b") from None
    if not out:
        raise PrepareError(f"train list '{spec}' is empty")
    return out


_NUMBERED = re.compile(r"(\d+)")


def check_numeric_order(files: Sequence[str]) -> None:
    """Refuse numbered member names whose string order differs from their numeric order.

    Row i of the CSV is paired with the i-th file in sorted (string) order. Names that differ only in a number
    written without zero padding (``member_0 .. member_19``) sort as member_0, member_1, member_10, ..., so a CSV
    written in numeric order would be paired with the wrong files without a word: a PrepareError names two
    files out of order and the fix.
    """
    if len(files) < 2:
        return
    skeletons = {_NUMBERED.sub("#", n) for n in files}
    if len(skeletons) != 1:  # not one naming scheme with numbers: nothing to compare
        return
    numbers = [tuple(int(g) for g in _NUMBERED.findall(n)) for n in files]
    if not numbers[0]:
        return
    width = len(str(max(max(t) for t in numbers)))
    for a, b, na, nb in zip(files, files[1:], numbers, numbers[1:]):
        if nb < na:
            padded = _NUMBERED.sub(lambda g: g.group(1).zfill(width), b)
            raise PrepareError(
                f"member files are numbered without zero padding: '{a}' sorts before '{b}' as text, and CSV row i "
                f"describes the i-th file in text order ({', '.join(files[:3])}, ...), not in numeric order; "
                f"rename the files with zero-padded numbers (e.g. '{b}' -> '{padded}') so that both orders agree")


def _check_out_dir(out_dir: str, data_dir: str, overwrite: bool, importance: bool) -> None:
    """out_dir must not be data_dir or a file; existing outputs are replaced only with ``overwrite``."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"--out_dir '{out_dir}' is an existing file, not a folder")
    if os.path.isdir(out_dir) and os.path.isdir(data_dir) and os.path.samefile(out_dir, data_dir):
        raise PrepareError(f"--out_dir '{out_dir}' is the member folder --data_dir: write the prepared files into "
                           f"a folder of their own")
    names = list(OUTPUT_NAMES) + (list(IMPORTANCE_OUTPUT_NAMES) if importance else [])
    existing = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if existing and not overwrite:
        raise PrepareError(f"--out_dir '{out_dir}' already holds {', '.join(existing)}; pass --overwrite to replace "
                           f"them (or choose another --out_dir)")


def _split(m: int, n_train: Optional[int], train_rows) -> Tuple[np.ndarray, np.ndarray]:
    if (n_train is None) == (train_rows is None):
        raise PrepareError("give exactly one of n_train (first N rows train) and train_rows (a list of rows)")
    if n_train is not None:
        n_train = int(n_train)
        if not 1 <= n_train <= m:
            raise PrepareError(f"n_train={n_train} is out of range: there are {m} members (need 1 <= n_train <= {m})")
        train = np.arange(n_train, dtype=np.int64)
    else:
        rows = parse_train_list(train_rows)
        seen = set()
        for r in rows:
            if not 0 <= r < m:
                raise PrepareError(f"train row {r} is out of range: rows are 0..{m - 1} ({m} members)")
            if r in seen:
                raise PrepareError(f"train row {r} is listed twice")
            seen.add(r)
        train = np.sort(np.asarray(rows, dtype=np.int64))
    test = np.setdiff1d(np.arange(m, dtype=np.int64), train)
    if test.size == 0:
        warnings.warn("every member is a training member: the test split (cond_idx_unseen) is empty",
                      UserWarning, stacklevel=3)
    return train, test


# ----------------------------------------------------------------------------------------------- prepare
def prepare(data_dir: str, params_csv: str, out_dir: str, n_train: Optional[int] = None,
            train_rows: Union[None, str, Sequence[int]] = None, file_ext: Optional[str] = None,
            file_pattern: Optional[str] = None, dims: Optional[Sequence[int]] = None, h5_key: str = "data",
            importance: bool = False, log_transform: bool = False, bins: int = 64,
            progress: bool = True, overwrite: bool = False) -> Dict[str, str]:
    """Write cond.npy, split.npy, cond_meta.json (and importance files) for an ensemble.

    Args:
        data_dir: folder with one file per member; row i of the CSV is the i-th file in sorted order.
        params_csv: CSV with a header line of parameter names and one row of raw values per member.
        out_dir: output folder (created if missing); not ``data_dir``; existing outputs (cond.npy, split.npy,
            cond_meta.json, importance files) are an error unless ``overwrite``.
        n_train: the first ``n_train`` rows are training members, the rest test members.
        train_rows: instead of n_train, the training rows (list of ints, a string like ``"0-79,90"`` or a
            file of such items); the other rows are test members.
        file_ext: member file extension (default: the one recognised extension present).
        file_pattern: only member files whose name matches this glob (e.g. ``member_*.npy``); the dataset key
            of the same name must then be set to the same glob.
        dims: array shape of raw ``.raw/.bin/.dat`` float32 member files, in array order.
        h5_key: dataset name for ``.h5``/``.nc`` members.
        importance: also write importance-sampling files (``datasets.importance``) into out_dir.
        log_transform: values are log-transformed before normalization (for the importance files and the
            reported value range).
        bins: histogram bins of the importance weights.
        progress: show tqdm progress bars.
        overwrite: replace outputs already in ``out_dir``.

    Returns:
        dict of written paths: ``cond_path``, ``cond_split_path``, ``cond_meta_path`` (+ importance paths),
        and ``info``: shape, dtype and train value range of the members.
    """
    _check_out_dir(out_dir, data_dir, overwrite, importance)
    files = list_member_files(data_dir, file_ext, file_pattern)
    check_numeric_order(files)
    names, vals = read_params_csv(params_csv)
    m = len(files)
    if vals.shape[0] != m:
        from datasets.ensemble import _few, _odd_names

        odd, pattern = _odd_names(files)
        hint = ""
        if odd and m > vals.shape[0]:
            n_match = sum(fnmatch.fnmatchcase(n, pattern) for n in files)
            hint = (f"; names unlike the others: {_few(odd)} (--file_pattern '{pattern}' would select {n_match} "
                    f"files)")
        raise PrepareError(f"data_dir '{data_dir}' holds {m} member files but {os.path.basename(params_csv)} has "
                           f"{vals.shape[0]} data rows; row i of the CSV must describe the i-th file in sorted "
                           f"order ({files[0]} .. {files[-1]}){hint}")
    train, test = _split(m, n_train, train_rows)
    info = _check_members(data_dir, files, dims, h5_key, set(train.tolist()), log_transform, progress)
    norm, lo, hi = normalize_params(names, vals, os.path.basename(params_csv))
    cond = np.concatenate([np.arange(m, dtype=np.float32)[:, None], norm], axis=1).astype(np.float32)

    os.makedirs(out_dir, exist_ok=True)
    paths = {"cond_path": os.path.join(out_dir, "cond.npy"),
             "cond_split_path": os.path.join(out_dir, "split.npy"),
             "cond_meta_path": os.path.join(out_dir, "cond_meta.json")}
    np.save(paths["cond_path"], cond)
    np.save(paths["cond_split_path"], {"cond_idx": train, "cond_idx_unseen": test}, allow_pickle=True)
    with open(paths["cond_meta_path"], "w") as f:
        json.dump({"names": names, "min": [float(v) for v in lo], "max": [float(v) for v in hi]}, f, indent=1)
    if importance:
        paths.update(_write_importance(data_dir, paths, out_dir, file_ext, file_pattern, dims, h5_key, log_transform,
                                       bins, progress))
    log.info("prepared %d members (%d train, %d test), %d parameters, field shape %s -> %s", m, train.size,
             test.size, len(names), info["shape"], out_dir)
    paths["info"] = info
    return paths


def _write_importance(data_dir, paths, out_dir, file_ext, file_pattern, dims, h5_key, log_transform, bins, progress):
    """Importance files via datasets.importance (imported here: it is optional for plain preparation)."""
    from datasets import importance as imp  # noqa: WPS433 (lazy on purpose)

    # The value normalization is left to the dataset class (train-member min/max), so the files equal the
    # weights the dataset would compute on the fly.
    out = imp.write_importance(data_dir=data_dir, cond_path=paths["cond_path"],
                               cond_split_path=paths["cond_split_path"], out_dir=out_dir, file_ext=file_ext,
                               file_pattern=file_pattern, dims=dims, h5_key=h5_key, log_transform=log_transform,
                               bins=bins, progress=progress)
    return dict(out)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder with one file per member")
    p.add_argument("--params", required=True, help="CSV: header of parameter names, one row per member")
    p.add_argument("--out_dir", required=True, help="where cond.npy, split.npy, cond_meta.json are written")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--n_train", type=int, help="the first N rows are training members, the rest test")
    g.add_argument("--train_list", help="training rows: a comma list ('0-79,90,95') or a file of row numbers")
    p.add_argument("--file_ext", help="member file extension (default: the recognised one present)")
    p.add_argument("--file_pattern", help="only member files whose name matches this glob, e.g. 'member_*.npy' "
                                          "(set dataset.file_pattern to the same glob)")
    p.add_argument("--dims", type=int, nargs="+", help="array shape of raw float32 members, array order")
    p.add_argument("--h5_key", default="data", help="dataset name in .h5/.nc members (default: data)")
    p.add_argument("--importance", action="store_true", help="also write importance-sampling files")
    p.add_argument("--log_transform", action="store_true", help="log values before normalizing (importance)")
    p.add_argument("--bins", type=int, default=64, help="importance histogram bins (default 64)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out_dir")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *args, **kw: print(f"warning: {msg}", file=sys.stderr)
            out = prepare(a.data_dir, a.params, a.out_dir, n_train=a.n_train, train_rows=a.train_list,
                          file_ext=a.file_ext, file_pattern=a.file_pattern, dims=a.dims, h5_key=a.h5_key,
                          importance=a.importance, log_transform=a.log_transform, bins=a.bins,
                          progress=not a.no_progress, overwrite=a.overwrite)
    except (ValueError, FileNotFoundError) as e:  # PrepareError / DataError name the file; no traceback
        sys.exit(f"error: {e}")
    for k, v in out.items():
        if k != "info":
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    main()
