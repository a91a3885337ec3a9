"""Result files and printed tables shared by every task's evaluation: one CSV writer, one text-table layout.

- :func:`write_csv`: rows (dicts) -> a CSV written atomically (util.files.atomic_write: an interrupted
  evaluation never leaves half a file); floats with 6 significant digits, None as an empty cell, NaN as ``nan_cell``.
- :func:`text_table`: already formatted cells (header first) -> aligned columns, optionally a rule under the
  header; :func:`fmt_cell` is the usual cell format (4 significant digits, ``-`` for missing).
"""
from __future__ import annotations

import csv
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

from util.files import atomic_write

__all__ = ["write_csv", "text_table", "fmt_cell"]


def write_csv(path: str, rows: Iterable[Dict[str, Any]], fields: Optional[Sequence[str]] = None,
              nan_cell: str = "nan") -> None:
    """Write ``rows`` to ``path`` atomically.

    Args:
        path: the CSV file.
        rows: one dict per line.
        fields: the columns in order (keys not listed are left out); default: every key, in first-seen order.
        nan_cell: what a float NaN becomes (None always becomes an empty cell).
    """
    rows = list(rows)
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return nan_cell if math.isnan(v) else f"{v:.6g}"
        return v

    def write(f):
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: cell(v) for k, v in r.items()})

    atomic_write(path, write, mode="w", newline="")


def fmt_cell(v) -> str:
    """A printed cell: ``-`` for None / NaN, floats with 4 significant digits (exponent from 1e4), else str."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def text_table(cells: List[List[str]], align: str = "left", rule: bool = False) -> str:
    """Aligned plain-text columns of ``cells`` (the header row first), two spaces apart.

    Args:
        cells: rows of strings, all of the header's length.
        align: ``left`` (trailing spaces stripped) or ``right``.
        rule: a line of dashes under the header.
    """
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    if align == "right":
        lines = ["  ".join(s.rjust(w) for s, w in zip(row, widths)) for row in cells]
    else:
        lines = ["  ".join(s.ljust(w) for s, w in zip(row, widths)).rstrip() for row in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
