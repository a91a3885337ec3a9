"""Terrain regimes (spec huvr 3, Table 9): the evaluated tiles split into three equal-count bins by a
reference run's per-tile gradient error (a ruggedness proxy: flat, hilly, rugged), and every run scored per bin.

    python benchmarks/terrain_regimes.py runs/terrain_huvr runs/terrain_functa ... [--eval_name eval]
        [--reference runs/terrain_huvr] [--out regimes.csv]

Reads each run's ``<run>/<eval_name>/tiles.csv`` (written by ``test.py``); the reference (default: the first
run, the paper uses HUVR) decides the bins: tiles sorted by its ``rmse_grad``, cut into thirds (the first
``n mod 3`` bins take one tile more). Per run and bin: tiles, mean PSNR, RMSE_z (pooled over the bin's tiles:
the root of the mean of squared per-tile RMSEs) and the same for the gradient RMSE. All runs must have scored
the same tiles (same data and ``test.max_tiles``); otherwise the error names the run.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from typing import Dict, List

REGIMES = ("flat", "hilly", "rugged")


def read_tiles(run: str, eval_name: str = "eval") -> Dict[int, Dict[str, float]]:
    """{tile index: {psnr, rmse_z_m, rmse_grad}} of a run's tiles.csv (FileNotFoundError naming it)."""
    path = os.path.join(run, eval_name, "tiles.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: evaluate the run first (python test.py --run {run})")
    with open(path) as f:
        return {int(r["index"]): {k: float(r[k]) for k in ("psnr", "rmse_z_m", "rmse_grad")}
                for r in csv.DictReader(f)}


def regime_bins(reference: Dict[int, Dict[str, float]]) -> Dict[str, List[int]]:
    """Tile indices of each regime: the reference's tiles by rising gradient error, in thirds."""
    order = sorted(reference, key=lambda i: (reference[i]["rmse_grad"], i))
    n = len(order)
    sizes = [n // 3 + (1 if k < n % 3 else 0) for k in range(3)]
    out, at = {}, 0
    for name, size in zip(REGIMES, sizes):
        out[name] = order[at:at + size]
        at += size
    return out


def regime_rows(runs: Dict[str, Dict[int, Dict[str, float]]], bins: Dict[str, List[int]]) -> List[Dict]:
    """One row per (run, regime): tiles, psnr (mean), rmse_z_m and rmse_grad (pooled)."""
    rows = []
    for name, tiles in runs.items():
        for regime, idx in bins.items():
            if not idx:
                continue
            sel = [tiles[i] for i in idx]
            rows.append({"run": name, "regime": regime, "tiles": len(sel),
                         "psnr": sum(t["psnr"] for t in sel) / len(sel),
                         "rmse_z_m": math.sqrt(sum(t["rmse_z_m"] ** 2 for t in sel) / len(sel)),
                         "rmse_grad": math.sqrt(sum(t["rmse_grad"] ** 2 for t in sel) / len(sel))})
    return rows


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="evaluated terrain runs")
    p.add_argument("--eval_name", default="eval", help="the evaluation folder inside each run (test.py --out_name)")
    p.add_argument("--reference", help="the run whose gradient error defines the bins (default: the first)")
    p.add_argument("--out", help="also write the rows to this CSV")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from util.tables import fmt_cell, text_table, write_csv

    try:
        runs = {os.path.basename(os.path.normpath(r)): read_tiles(r, a.eval_name) for r in a.runs}
        ref_name = os.path.basename(os.path.normpath(a.reference or a.runs[0]))
        ref = runs.get(ref_name) or read_tiles(a.reference, a.eval_name)
        for name, tiles in runs.items():
            if set(tiles) != set(ref):
                raise ValueError(f"run '{name}' scored other tiles than the reference '{ref_name}' ({len(tiles)} vs "
                                 f"{len(ref)}); evaluate all runs on the same data and test.max_tiles")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    rows = regime_rows(runs, regime_bins(ref))
    cols = ["run", "regime", "tiles", "psnr", "rmse_z_m", "rmse_grad"]
    print(f"regimes by the per-tile gradient error of '{ref_name}'")
    print(text_table([cols] + [[fmt_cell(r[c]) for c in cols] for r in rows], rule=True))
    if a.out:
        write_csv(a.out, rows, cols)
    return rows


if __name__ == "__main__":
    main()
