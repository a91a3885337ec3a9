"""Evaluation of a trained run (spec 5): bake, reconstruct members at full resolution, score, write CSVs.

Reported for the model and for the reference predictors (mean field, nearest member, inverse-distance
weighting of the k nearest training members; all computed from training members only):
Rel L2, PSNR (mean over members and dataset level -10 log10(mean member MSE)), SSIM, MD, bake time and
inference wall time. Reference predictors are scored on the test (unseen) members only: on a training
member the nearest-member and IDW predictors return the member itself.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from util.config import TestConfig
from util.metrics import dataset_metrics, is_constant, member_metrics
from util.reference import IDWPredictor, MeanFieldPredictor, NearestMemberPredictor
from util.runs import build_dataset, load_trained_model
from util.sampling import grid_coords

log = logging.getLogger("test")

MEMBER_FIELDS = ["predictor", "split", "resolution", "row", "mse", "psnr", "rel_l2", "ssim", "md", "infer_s"]
DATASET_FIELDS = ["predictor", "split", "resolution", "members", "rel_l2", "psnr_dataset", "psnr_member_mean",
                  "ssim", "md", "mse", "bake_s", "infer_s", "infer_s_per_member", "points_per_s"]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def predict_field(model, coords: torch.Tensor, c: torch.Tensor, shape, chunk_size: int,
                  autocast: bool = False) -> torch.Tensor:
    """Reconstruct one member: the model at every coordinate, in chunks.

    Args:
        model: surrogate, ``forward(x (1, N, d), c (1, d_c)) -> (1, N, 1)``.
        coords: (P, d) coordinates on the model's device.
        c: (d_c,) or (1, d_c) condition.
        shape: output array shape, prod(shape) == P.
        chunk_size: points per forward call.

    Returns:
        Tensor of ``shape`` (float32, on the model's device).
    """
    c = c.reshape(1, -1).to(coords.device)
    out = torch.empty(coords.shape[0], device=coords.device, dtype=torch.float32)
    for s in range(0, coords.shape[0], chunk_size):
        with torch.autocast(coords.device.type, dtype=torch.float16, enabled=autocast):
            out[s:s + chunk_size] = model(coords[None, s:s + chunk_size], c)[0, :, 0].float()
    return out.reshape(tuple(shape))


class _Scorer:
    """Collects per-member rows for one (predictor, split, resolution)."""

    def __init__(self, predictor: str, split: str, resolution: str, with_ssim: bool, win: int):
        self.key = (predictor, split, resolution)
        self.with_ssim, self.win = with_ssim, win
        self.rows: List[Dict[str, Any]] = []

    def add(self, row: int, pred: torch.Tensor, gt: torch.Tensor, infer_s: float = float("nan")):
        m = member_metrics(pred, gt, with_ssim=self.with_ssim, ssim_win_size=self.win)
        self.rows.append(dict(zip(MEMBER_FIELDS[:3], self.key), row=int(row), infer_s=infer_s, **m))


def _summary(sc: _Scorer, bake_s: float, n_points: int) -> Dict[str, Any]:
    agg = dataset_metrics(sc.rows)
    infer = [r["infer_s"] for r in sc.rows if not math.isnan(r["infer_s"])]
    total = float(sum(infer)) if infer else float("nan")
    out = dict(zip(DATASET_FIELDS[:3], sc.key), members=len(sc.rows), bake_s=bake_s, infer_s=total,
               infer_s_per_member=total / len(infer) if infer else float("nan"),
               points_per_s=(n_points * len(infer) / total) if infer and total > 0 else float("nan"))
    for k in ("rel_l2", "psnr_dataset", "psnr_member_mean", "ssim", "md", "mse"):
        out[k] = agg.get(k, float("nan"))
    return out


def _write_csv(path: str, fields: List[str], rows: List[Dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A plain-text table of dataset-level results."""
    cols = ["predictor", "split", "resolution", "members", "rel_l2", "psnr_dataset", "ssim", "md", "bake_s", "infer_s"]
    def fmt(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}")
        return str(v)
    table = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(t, widths)) for t in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate(run_dir: str, out_dir: Optional[str] = None, checkpoint: Optional[str] = None,
             overrides: Optional[Dict[str, Any]] = None, overwrite: bool = False, device: Optional[str] = None,
             progress: bool = True) -> List[Dict[str, Any]]:
    """Evaluate a trained run; writes ``metrics.csv`` and ``members.csv`` (and dumps) into ``out_dir``.

    Args:
        run_dir: run directory written by train.py.
        out_dir: output folder (default ``<run_dir>/eval``); existing result files are not replaced unless
            ``overwrite``.
        checkpoint: weights to use (default: final model.pt, else the latest checkpoint).
        overrides: keys of the ``test`` section to change for this evaluation.
        device: "cpu" / "cuda" (default: cuda when available).

    Returns:
        Dataset-level result rows (dicts with DATASET_FIELDS).
    """
    from tqdm.auto import tqdm

    model, exp, meta = load_trained_model(run_dir, checkpoint)
    tc = TestConfig(**{**exp.get("test", {}), **(overrides or {})})
    out_dir = out_dir or os.path.join(run_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    targets = [os.path.join(out_dir, n) for n in ("metrics.csv", "members.csv")]
    if not overwrite and any(os.path.exists(t) for t in targets):
        raise FileExistsError(f"results already in '{out_dir}'; pass --overwrite or --out_dir")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = build_dataset(exp)
    model.to(device)
    autocast = device.type == "cuda" and exp["train"].get("mixed_precision", "auto") in ("auto", "fp16")
    _sync(device)
    t0 = time.perf_counter()
    if hasattr(model, "bake"):
        model.bake()
    _sync(device)
    bake_s = time.perf_counter() - t0
    log.info("bake: %.3f s", bake_s)

    splits = {"test": np.asarray(dataset.test_idx), "train": np.asarray(dataset.train_idx)}
    scorers: List[_Scorer] = []
    member_rows: List[Dict[str, Any]] = []
    with_ssim = tc.ssim and getattr(dataset, "has_grid", True)
    dumps = set(int(r) for r in tc.dump_members)
    constant_members = 0
    n_pred = 0
    for res in tc.resolutions:
        shape = tuple(dataset.spatial_shape if res == "full" else dataset.train_shape)
        get_gt: Callable[[int], torch.Tensor] = dataset.full_field if res == "full" else dataset.train_field
        # gridded data: every vertex of the grid; unstructured data supplies its own vertex coordinates
        use_grid_path = (not hasattr(dataset, "eval_coords") and hasattr(model, "predict_grid")
                         and getattr(model, "is_baked", False))
        grid_chunk = tc.chunk_size if device.type == "cuda" else min(tc.chunk_size, 8192)
        coords = None
        if not use_grid_path:
            coords = (dataset.eval_coords(res) if hasattr(dataset, "eval_coords") else grid_coords(shape)).to(device)
        n_points = int(np.prod(shape))
        refs = []
        if tc.reference and "test" in tc.splits:
            tr_rows = splits["train"]
            tr_c = dataset.conds(tr_rows)
            fetch = lambda i, _g=get_gt, _r=tr_rows: _g(int(_r[i]))
            refs = [MeanFieldPredictor(tr_c, fetch), NearestMemberPredictor(tr_c, fetch),
                    IDWPredictor(tr_c, fetch, k=tc.ref_k, power=tc.ref_power)]
        for split in tc.splits:
            rows = splits[split]
            model_sc = _Scorer("model", split, res, with_ssim, tc.ssim_win_size)
            ref_sc = [_Scorer(r.name, split, res, with_ssim, tc.ssim_win_size) for r in refs] if split == "test" else []
            for row in tqdm(rows, desc=f"{split}@{res}", disable=not progress):
                c = dataset.conds([int(row)])[0]
                _sync(device)
                t = time.perf_counter()
                if use_grid_path:  # baked DRR-Net: folded grid, per-member condition term, chunked lattice
                    pred = model.predict_grid(shape, c.to(device), grid_chunk,
                                              dtype=torch.float16 if autocast else None)
                else:
                    pred = predict_field(model, coords, c.to(device), shape, tc.chunk_size, autocast)
                _sync(device)
                dt = time.perf_counter() - t
                gt = get_gt(int(row)).to(device)
                model_sc.add(row, pred, gt, dt)
                n_pred += 1
                constant_members += int(is_constant(pred))
                for r, sc in zip(refs, ref_sc):
                    sc.add(row, r.predict(c).to(device), gt)
                if int(row) in dumps:
                    _dump(out_dir, int(row), res, pred, gt, dataset, tc)
            scorers += [model_sc] + ref_sc
    results = [_summary(sc, bake_s if sc.key[0] == "model" else float("nan"), n_points_of(sc, dataset))
               for sc in scorers]
    for sc in scorers:
        member_rows += sc.rows
    _write_csv(targets[0], DATASET_FIELDS, results)
    _write_csv(targets[1], MEMBER_FIELDS, member_rows)
    if n_pred and constant_members == n_pred:
        log.warning("the model's prediction is constant for every member: the model has collapsed "
                    "(compare with the mean-field reference row)")
    return results


def n_points_of(sc: _Scorer, dataset) -> int:
    shape = dataset.spatial_shape if sc.key[2] == "full" else dataset.train_shape
    return int(np.prod(shape))


def _dump(out_dir: str, row: int, res: str, pred: torch.Tensor, gt: torch.Tensor, dataset, tc: TestConfig) -> None:
    """Write predicted and true volumes of one member in data units (.npy, optional .vti and PNG slices)."""
    from util.volume_io import write_slice_pngs, write_vti

    d = os.path.join(out_dir, "dumps")
    os.makedirs(d, exist_ok=True)
    stem = os.path.join(d, f"member{row:04d}_{res}")
    p = dataset.denormalize_values(pred.float().cpu().numpy())
    g = dataset.denormalize_values(gt.float().cpu().numpy())
    np.save(stem + "_pred.npy", p)
    np.save(stem + "_true.npy", g)
    if tc.dump_vti:
        write_vti(stem + "_pred.vti", p)
        write_vti(stem + "_true.vti", g)
    if tc.dump_png:
        write_slice_pngs(stem, p, g)
