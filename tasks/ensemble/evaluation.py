"""Evaluation of a trained run (spec 5): bake, reconstruct members at full resolution, score, write CSVs.

Reported for the model and for the reference predictors (mean field, nearest member, inverse-distance
weighting of the k nearest training members; all computed from training members only):
Rel L2, PSNR (mean over members and dataset level -10 log10(mean member MSE)), SSIM, MD, bake time and
inference wall time, and for the model the number of members on which it beats each reference predictor.
Reference predictors are scored on the test (unseen) members only: on a training member the nearest-member
and IDW predictors return the member itself. All metrics are on normalized values (data range 1).

Files written into the output folder (``<run>/eval`` by default):

``metrics.csv``: one row per (predictor, split, resolution):

- ``predictor``: ``model`` or a reference predictor (``mean_field``, ``nearest_member``, ``idw_k<k>_p<p>``);
  ``split`` (test = unseen members, train), ``resolution`` (full, train), ``members`` (members scored);
- ``rel_l2``, ``ssim``, ``md``, ``mse``: means over members; ``psnr_dataset``: -10 log10(mean member MSE) (the
  paper's PSNR, dominated by the hardest members); ``psnr_member_mean``: mean over members of the member PSNR;
- ``bake_s``, ``infer_s`` (all members), ``infer_s_per_member``, ``points_per_s``: model rows;
- ``wins_vs_mean``, ``wins_vs_nearest``, ``wins_vs_idw``: on model rows that have reference rows (split test),
  the number of members on which the model's member PSNR is strictly higher than that of the mean-field,
  nearest-member and IDW predictor; ``wins_of``: the number of members compared (the same for all three).
  Empty on reference rows and on rows without references (split train, ``--no_reference``). The printed table
  shows them as ``wins/wins_of`` (e.g. ``17/20``);
- ``weights``: which weights were scored: ``model.pt`` (the final weights), ``checkpoint step_0000120`` (a
  checkpoint folder: training unfinished, or ``--checkpoint``) or the ``.pt`` path given with ``--checkpoint``;
  ``step``: the training step of those weights (the total for the final model.pt; empty when unknown);
  ``total_steps``: the run's total training steps. Scoring anything but the final model.pt of a finished run
  logs a warning.

``members.csv``: one row per (predictor, split, resolution, member): ``row`` (the member's cond.npy row), ``mse``,
``psnr``, ``rel_l2``, ``ssim``, ``md``, ``infer_s``; the wins counts follow from its ``psnr`` column.

``psnr_vs_idw.png`` (``psnr_vs_idw_train.png`` for resolution train): scatter of the member PSNR of the model
(y) against the IDW predictor (x), one point per test member, with the diagonal; the title gives the wins count.

``dumps/member<row>_<resolution>_{pred,true}.npy`` (and .vti / PNG slices) for ``test.dump_members``: in data
units (normalization undone). A listed row that would not be dumped (not a row of cond.npy, or a member of no
split in ``test.splits``) is a ConfigError naming it, raised once the data is read and before any model work.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from tasks.base import CsvFile, EvalContext, Scores
from tasks.ensemble.config import EnsembleTestConfig
from util.evaluation_common import WEIGHTS_FIELDS, weights_line
from util.files import atomic_save_npy
from util.registry import ConfigError
from util.tables import fmt_cell, text_table
from util.metrics import count_wins, dataset_metrics, is_constant, member_metrics
from tasks.ensemble.reference import IDWPredictor, MeanFieldPredictor, NearestMemberPredictor
from util.sampling import grid_coords
from util.timing import synchronize

log = logging.getLogger("test")

MEMBER_FIELDS = ["predictor", "split", "resolution", "row", "mse", "psnr", "rel_l2", "ssim", "md", "infer_s"]
#: short names of the reference predictors in the wins columns (``wins_vs_<short>``)
WINS_REFERENCES = ("mean", "nearest", "idw")
WINS_FIELDS = [f"wins_vs_{k}" for k in WINS_REFERENCES] + ["wins_of"]
DATASET_FIELDS = ["predictor", "split", "resolution", "members", "rel_l2", "psnr_dataset", "psnr_member_mean",
                  "ssim", "md", "mse", "bake_s", "infer_s", "infer_s_per_member", "points_per_s"
                  ] + WINS_FIELDS + WEIGHTS_FIELDS


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


def wins_key(predictor: str) -> Optional[str]:
    """Short name of a reference predictor in the wins columns: mean_field -> mean, nearest_member -> nearest,
    idw_k8_p2 -> idw; None for anything else."""
    if predictor == "mean_field":
        return "mean"
    if predictor == "nearest_member":
        return "nearest"
    if predictor.startswith("idw"):
        return "idw"
    return None


def _fmt_wins(r: Dict[str, Any], key: str) -> str:
    w, n = r.get(key), r.get("wins_of")
    if w is None or n is None or (isinstance(w, float) and math.isnan(w)):
        return ""
    return f"{int(w)}/{int(n)}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A plain-text table of dataset-level results; wins columns as ``wins/members``; a last line names the
    weights scored."""
    cols = ["predictor", "split", "resolution", "members", "rel_l2", "psnr_dataset", "psnr_member_mean", "ssim",
            "md"] + [f"wins_vs_{k}" for k in WINS_REFERENCES] + ["bake_s", "infer_s"]

    def fmt(r, c):
        if c.startswith("wins_vs_"):
            return _fmt_wins(r, c)
        return "" if r.get(c) is None else fmt_cell(r[c])
    table = text_table([cols] + [[fmt(r, c) for c in cols] for r in rows], rule=True)
    return table + ("\n" + weights_line(rows[0]) if rows and "weights" in rows[0] else "")


def _add_wins(results: List[Dict[str, Any]], scorers: List["_Scorer"]) -> None:
    """Fill the wins columns of each model row from the member PSNRs of the reference rows of its split and
    resolution."""
    by_key = {sc.key: sc for sc in scorers}
    for res in results:
        if res["predictor"] != "model":
            continue
        model_psnr = {r["row"]: r["psnr"] for r in by_key[(res["predictor"], res["split"], res["resolution"])].rows}
        for (pred, split, resolution), sc in by_key.items():
            key = wins_key(pred) if pred != "model" else None
            if key is None or split != res["split"] or resolution != res["resolution"]:
                continue
            wins, n = count_wins(model_psnr, {r["row"]: r["psnr"] for r in sc.rows})
            res[f"wins_vs_{key}"] = wins
            res["wins_of"] = n


WIN_COLOR = (31, 119, 180)   # RGB of a member the model wins (above the diagonal)
LOSS_COLOR = (214, 39, 40)   # RGB of a member it does not win (on or below the diagonal)


def psnr_scatter_png(path: str, ref_psnr, model_psnr, title: str, xlabel: str,
                     ylabel: str = "model PSNR (dB)", size: int = 640) -> Dict[str, Any]:
    """Scatter plot PNG of per-member PSNR, model (y) against a reference predictor (x), with the diagonal.

    Drawn with matplotlib (Agg canvas, no pyplot state). Both axes share one range and one scale, so the diagonal
    (equal PSNR) runs at 45 degrees; a point above it is a member the model wins (``WIN_COLOR``), on or below it one
    it does not win (``LOSS_COLOR``). The title's second line gives the wins count. Members with a non-finite PSNR
    (an exact prediction) are not drawn.

    Args:
        path: output .png (written through a temporary file).
        ref_psnr, model_psnr: per-member PSNRs, same order.
        title: first title line; a second line gives the wins count.
        xlabel, ylabel: axis labels.
        size: image width and height in pixels.

    Returns:
        ``dict(points, xy, diagonal, wins, members, path)``: ``xy`` the drawn points in data space (reference
        PSNR, model PSNR) and ``points`` their pixel centres ``(column, row)`` in the PNG (row 0 at the top), each
        None for a member not drawn; ``diagonal`` the pixel ``(column, row)`` of the diagonal's two ends.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(ref_psnr, dtype=np.float64).ravel()
    y = np.asarray(model_psnr, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} reference PSNRs for {y.size} model PSNRs")
    ok = np.isfinite(x) & np.isfinite(y)
    wins = int(np.sum(y > x))
    vals = np.concatenate([x[ok], y[ok]])
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.06 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    dpi = 100
    fig = Figure(figsize=(size / dpi, size / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.14, 0.12, 0.78, 0.74))  # square in a square figure: one dB is as long on both axes
    ax.plot([lo, hi], [lo, hi], color="0.6", linewidth=1, zorder=1)
    win = ok & (y > x)
    for mask, rgb in ((win, WIN_COLOR), (ok & ~win, LOSS_COLOR)):
        col = tuple(v / 255.0 for v in rgb)
        ax.scatter(x[mask], y[mask], s=(8 * 72.0 / dpi) ** 2, c=[col], edgecolors=[col], linewidths=0, zorder=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    hidden = int(np.sum(~ok))
    sub = (f"model better on {wins}/{x.size} members (blue, above the diagonal)"
           + (f"; {hidden} exact member(s) not drawn" if hidden else ""))
    fig.suptitle(f"{title}\n{sub}", fontsize=9, y=0.96)
    canvas.draw()  # fixes the layout, so the transform below gives the pixels of the saved image
    height = canvas.get_width_height()[1]

    def pixel(xv: float, yv: float) -> Tuple[int, int]:
        X, Y = ax.transData.transform((xv, yv))
        return int(math.floor(X)), int(math.floor(height - Y))

    xy = [(float(a), float(b)) if good else None for a, b, good in zip(x, y, ok)]
    points = [pixel(*p) if p is not None else None for p in xy]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    os.replace(tmp, path)
    return dict(points=points, xy=xy, diagonal=(pixel(lo, lo), pixel(hi, hi)), wins=wins, members=int(x.size),
                path=path)


def _write_scatters(out_dir: str, scorers: List["_Scorer"]) -> List[str]:
    """psnr_vs_idw[_<resolution>].png for each resolution with model and IDW rows on the test split."""
    written = []
    by_key = {sc.key: sc for sc in scorers}
    for (pred, split, res), sc in by_key.items():
        if split != "test" or wins_key(pred) != "idw" or ("model", split, res) not in by_key:
            continue
        ref = {r["row"]: r["psnr"] for r in sc.rows}
        rows = [r for r in by_key[("model", split, res)].rows if r["row"] in ref]
        name = "psnr_vs_idw.png" if res == "full" else f"psnr_vs_idw_{res}.png"
        path = os.path.join(out_dir, name)
        try:
            psnr_scatter_png(path, [ref[r["row"]] for r in rows], [r["psnr"] for r in rows],
                             title=f"member PSNR on unseen members ({res} resolution): model vs {pred}",
                             xlabel=f"{pred} PSNR (dB)")
        except ImportError as e:  # pragma: no cover - matplotlib is a dependency
            log.info("no PSNR scatter plot (%s)", e)
            continue
        written.append(path)
    return written


RESULT_FILES = ("metrics.csv", "members.csv")
"""The ensemble evaluation's tables (their presence means results are there)."""


def evaluate(run_dir: str, out_dir: Optional[str] = None, checkpoint: Optional[str] = None,
             overrides: Optional[Dict[str, Any]] = None, overwrite: bool = False, device: Optional[str] = None,
             progress: bool = True) -> List[Dict[str, Any]]:
    """``EnsembleTask.evaluate`` (the template of tasks.base.Task.evaluate with :func:`score`)."""
    from tasks.ensemble.task import EnsembleTask

    return EnsembleTask.evaluate(run_dir, out_dir=out_dir, checkpoint=checkpoint, overrides=overrides,
                                 overwrite=overwrite, device=device, progress=progress)


def score(ctx: EvalContext) -> Scores:
    """Score a trained ensemble run (``EnsembleTask.score``): bake (timed), reconstruct every member of
    ``test.splits`` at each of ``test.resolutions``, score the model and the reference predictors, dumps and PSNR
    scatters into ``ctx.out_dir``.

    Returns:
        rows: the dataset-level rows (DATASET_FIELDS); files: ``metrics.csv`` (those rows) and ``members.csv``
        (MEMBER_FIELDS, one row per predictor, split, resolution and member).
    """
    from tqdm.auto import tqdm

    model, tc, out_dir, progress = ctx.model, ctx.test_config, ctx.out_dir, ctx.progress
    device, autocast = ctx.device, ctx.autocast
    dataset = ctx.dataset()
    check_dump_members(tc, dataset)  # before any model work: the member count is known only with the data
    model.to(device)
    synchronize(device)
    t0 = time.perf_counter()
    # every model has bake() (models.base.FieldModel; a no-op when there is nothing to cache)
    model.bake()
    synchronize(device)
    bake_s = time.perf_counter() - t0
    log.info("bake: %.3f s", bake_s)

    splits = {"test": np.asarray(dataset.test_idx), "train": np.asarray(dataset.train_idx)}
    scorers: List[_Scorer] = []
    member_rows: List[Dict[str, Any]] = []
    with_ssim = tc.ssim and dataset.has_grid
    dumps = set(int(r) for r in tc.dump_members)
    constant_members = 0
    n_pred = 0
    for res in tc.resolutions:
        shape = tuple(dataset.spatial_shape if res == "full" else dataset.train_shape)
        get_gt: Callable[[int], torch.Tensor] = dataset.full_field if res == "full" else dataset.train_field
        # gridded data: every vertex of the grid; unstructured data supplies its own vertex coordinates
        # (every model has the contract's predict_grid; only a baked model with fast paths (DRR-Net's folded
        # lattice) reconstructs through its own, the others go through forward as before)
        own_coords = dataset.eval_coords(res)  # None: every vertex of the regular grid
        use_grid_path = (own_coords is None and model.fast_paths and model.is_baked)
        grid_chunk = tc.chunk_size if device.type == "cuda" else min(tc.chunk_size, 8192)
        coords = None
        if not use_grid_path:
            coords = (own_coords if own_coords is not None else grid_coords(shape)).to(device)
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
                synchronize(device)
                t = time.perf_counter()
                if use_grid_path:  # baked DRR-Net: folded grid, per-member condition term, chunked lattice
                    pred = model.predict_grid(shape, c.to(device), grid_chunk,
                                              dtype=torch.float16 if autocast else None)
                else:
                    pred = predict_field(model, coords, c.to(device), shape, tc.chunk_size, autocast)
                synchronize(device)
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
    _add_wins(results, scorers)
    for sc in scorers:
        member_rows += sc.rows
    for p in _write_scatters(out_dir, scorers):
        log.info("PSNR scatter: %s", p)
    if n_pred and constant_members == n_pred:
        log.warning("the model's prediction is constant for every member: the model has collapsed "
                    "(compare with the mean-field reference row)")
    return Scores(results, {RESULT_FILES[0]: CsvFile(results, DATASET_FIELDS),
                            RESULT_FILES[1]: CsvFile(member_rows, MEMBER_FIELDS)})


def n_points_of(sc: _Scorer, dataset) -> int:
    shape = dataset.spatial_shape if sc.key[2] == "full" else dataset.train_shape
    return int(np.prod(shape))


def check_dump_members(tc: EnsembleTestConfig, dataset) -> None:
    """ConfigError naming every row of ``test.dump_members`` that this evaluation would not dump: not a row of
    cond.npy, or a member of no split in ``test.splits`` (only evaluated members are reconstructed)."""
    if not tc.dump_members:
        return
    split_of = {"test": np.asarray(dataset.test_idx), "train": np.asarray(dataset.train_idx)}
    evaluated = set(int(r) for s in tc.splits for r in split_of[s])
    m = int(dataset.num_rows)
    problems = []
    for row in dict.fromkeys(int(r) for r in tc.dump_members):
        if row in evaluated:
            continue
        if not 0 <= row < m:
            problems.append(f"{row} (not a row of cond.npy: the data has {m} rows, 0..{m - 1})")
            continue
        other = [s for s in ("test", "train") if s not in tc.splits and row in set(split_of[s].tolist())]
        problems.append(f"{row} (a {other[0]} member; test.splits is {list(tc.splits)}: add '{other[0]}')" if other
                        else f"{row} (in neither the training nor the test rows of split.npy)")
    if problems:
        raise ConfigError(f"test.dump_members: cannot dump {'; '.join(problems)}. Only members of the evaluated "
                          f"splits are reconstructed, so nothing would be written for these rows")


def _dump(out_dir: str, row: int, res: str, pred: torch.Tensor, gt: torch.Tensor, dataset, tc: EnsembleTestConfig) -> None:
    """Write predicted and true volumes of one member in data units (.npy, optional .vti and PNG slices)."""
    from util.volume_io import write_slice_pngs, write_vti

    d = os.path.join(out_dir, "dumps")
    os.makedirs(d, exist_ok=True)
    stem = os.path.join(d, f"member{row:04d}_{res}")
    p = dataset.denormalize_values(pred.float().cpu().numpy())
    g = dataset.denormalize_values(gt.float().cpu().numpy())
    atomic_save_npy(stem + "_pred.npy", p)
    atomic_save_npy(stem + "_true.npy", g)
    if tc.dump_vti:
        write_vti(stem + "_pred.vti", p)
        write_vti(stem + "_true.vti", g)
    if tc.dump_png:
        write_slice_pngs(stem, p, g)
