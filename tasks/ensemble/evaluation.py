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
units (normalization undone).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from tasks.ensemble.config import EnsembleTestConfig
from util.config import merge_test_config
from util.tables import fmt_cell, text_table, write_csv
from util.metrics import count_wins, dataset_metrics, is_constant, member_metrics
from tasks.ensemble.reference import IDWPredictor, MeanFieldPredictor, NearestMemberPredictor
from util.runs import build_dataset, latest_checkpoint, load_trained_model, read_json
from util.sampling import grid_coords

log = logging.getLogger("test")

MEMBER_FIELDS = ["predictor", "split", "resolution", "row", "mse", "psnr", "rel_l2", "ssim", "md", "infer_s"]
#: short names of the reference predictors in the wins columns (``wins_vs_<short>``)
WINS_REFERENCES = ("mean", "nearest", "idw")
WINS_FIELDS = [f"wins_vs_{k}" for k in WINS_REFERENCES] + ["wins_of"]
WEIGHTS_FIELDS = ["weights", "step", "total_steps"]
DATASET_FIELDS = ["predictor", "split", "resolution", "members", "rel_l2", "psnr_dataset", "psnr_member_mean",
                  "ssim", "md", "mse", "bake_s", "infer_s", "infer_s_per_member", "points_per_s"
                  ] + WINS_FIELDS + WEIGHTS_FIELDS


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


def weights_line(r: Dict[str, Any]) -> str:
    """``weights: model.pt (step 1200 of 1200)`` for a result row, with a warning when not the final weights."""
    step, total = r.get("step"), r.get("total_steps")
    where = f"step {step if step is not None else '?'}" + (f" of {total}" if total is not None else "")
    line = f"weights: {r.get('weights', '?')} ({where})"
    if not r.get("final_weights", True):
        line += ": NOT the final weights of a finished run"
    return line


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


def scored_weights(run_dir: str, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """Which weights ``load_trained_model(run_dir, checkpoint)`` scores, and at which training step.

    The default is resolved by the same rule as :func:`util.runs.load_trained_model`: ``model.pt`` when present,
    else the checkpoint named by ``checkpoints/latest``.

    Returns:
        ``dict(weights, step, total_steps, final_weights)``: ``weights`` = ``"model.pt"``,
        ``"checkpoint <folder name>"`` or the ``.pt`` path given; ``step`` = the step of a checkpoint
        (trainer_state.json, else the folder name), the total steps for the final model.pt, None when unknown;
        ``total_steps`` from finished.json or the checkpoint's trainer_state.json (None when unknown);
        ``final_weights`` = True only for model.pt of a finished run (finished.json present).
    """
    fin_p = os.path.join(run_dir, "finished.json")
    finished = os.path.isfile(fin_p)
    total = None
    if finished:
        try:
            total = int(read_json(fin_p)["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            total = None
    final_pt = os.path.join(run_dir, "model.pt")
    path = checkpoint
    if path is None:
        try:
            path = final_pt if os.path.isfile(final_pt) else latest_checkpoint(run_dir)
        except FileNotFoundError:
            path = None

    def state_of(ck: Optional[str]) -> Dict[str, Any]:
        try:
            return read_json(os.path.join(ck, "trainer_state.json")) if ck else {}
        except (OSError, ValueError):
            return {}

    step = None
    if path is not None and os.path.isdir(path):
        name = os.path.basename(os.path.normpath(path))
        st = state_of(path)
        step = st.get("step")
        if step is None and name.startswith("step_") and name[5:].isdigit():
            step = int(name[5:])
        total = total if total is not None else st.get("total_steps")
        weights = f"checkpoint {name}"
    elif path is not None and os.path.isfile(final_pt) and os.path.isfile(path) and os.path.samefile(path, final_pt):
        weights = "model.pt"
        if finished:
            step = total
        else:  # model.pt is written just before finished.json: take the latest checkpoint's record
            try:
                st = state_of(latest_checkpoint(run_dir))
            except FileNotFoundError:
                st = {}
            total = st.get("total_steps")
            step = st.get("step") if st.get("step") == total else None
    else:
        weights = str(path)
    if total is None:
        try:
            total = state_of(latest_checkpoint(run_dir)).get("total_steps")
        except FileNotFoundError:
            pass
    return dict(weights=weights, step=None if step is None else int(step),
                total_steps=None if total is None else int(total), final_weights=finished and weights == "model.pt")


def _warn_if_not_final(run_dir: str, w: Dict[str, Any]) -> None:
    if w["final_weights"]:
        return
    at = f"step {w['step'] if w['step'] is not None else '?'}" + (
        f" of {w['total_steps']}" if w["total_steps"] is not None else "")
    if not os.path.isfile(os.path.join(run_dir, "finished.json")):
        log.warning("training of '%s' has not finished (no finished.json): scoring %s (%s); the metrics describe "
                    "an unfinished model (column 'weights'/'step' of metrics.csv)", run_dir, w["weights"], at)
    else:
        log.warning("scoring %s (%s), not the final model.pt of '%s' (recorded in metrics.csv, columns "
                    "'weights'/'step')", w["weights"], at, run_dir)


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


def _nice_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    raw = (hi - lo) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


WIN_COLOR = (31, 119, 180)
LOSS_COLOR = (214, 39, 40)


def psnr_scatter_png(path: str, ref_psnr, model_psnr, title: str, xlabel: str,
                     ylabel: str = "model PSNR (dB)", size: int = 640) -> Dict[str, Any]:
    """Scatter plot PNG of per-member PSNR, model (y) against a reference predictor (x), with the diagonal.

    Drawn with Pillow (a dependency of scikit-image; no matplotlib needed). Both axes share one range, so the
    diagonal (equal PSNR) runs at 45 degrees; a point above it is a member the model wins (blue), on or below it
    one it does not win (red). Members with a non-finite PSNR (an exact prediction) are not drawn.

    Args:
        path: output .png (written through a temporary file).
        ref_psnr, model_psnr: per-member PSNRs, same order.
        title: first title line; a second line gives the wins count.
        xlabel, ylabel: axis labels.
        size: image width and height in pixels.

    Returns:
        ``dict(points=[(px, py) or None per member], wins=int, members=int, path=path)``: pixel centres of the
        drawn points.
    """
    from PIL import Image, ImageDraw, ImageFont

    x = np.asarray(ref_psnr, dtype=np.float64).ravel()
    y = np.asarray(model_psnr, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} reference PSNRs for {y.size} model PSNRs")
    ok = np.isfinite(x) & np.isfinite(y)
    wins = int(np.sum(y > x))
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    W = H = int(size)
    left, right, top, bottom = 80, 40, 62, 62  # a square plot area: one dB is as long on both axes
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    vals = np.concatenate([x[ok], y[ok]])
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 1.0, hi + 1.0
    pad = 0.06 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def px(v):
        return left + (v - lo) / (hi - lo) * (W - left - right)

    def py(v):
        return H - bottom - (v - lo) / (hi - lo) * (H - top - bottom)

    def text_size(t):
        b = d.textbbox((0, 0), t, font=font)
        return b[2] - b[0], b[3] - b[1]

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in _nice_ticks(lo, hi):
        lab = f"{t:g}"
        tw, th = text_size(lab)
        X, Y = px(t), py(t)
        d.line([X, H - bottom, X, H - bottom + 5], fill="black")
        d.text((X - tw / 2, H - bottom + 8), lab, fill="black", font=font)
        d.line([left - 5, Y, left, Y], fill="black")
        d.text((left - 8 - tw, Y - th / 2 - 2), lab, fill="black", font=font)
    d.line([px(lo), py(lo), px(hi), py(hi)], fill=(150, 150, 150), width=1)
    r = 4
    points: List[Any] = []
    for xi, yi, good in zip(x, y, ok):
        if not good:
            points.append(None)
            continue
        X, Y = px(xi), py(yi)
        col = WIN_COLOR if yi > xi else LOSS_COLOR
        d.ellipse([X - r, Y - r, X + r, Y + r], fill=col, outline=col)
        points.append((int(round(X)), int(round(Y))))
    hidden = int(np.sum(~ok))
    sub = (f"model better on {wins}/{x.size} members (blue, above the diagonal)"
           + (f"; {hidden} exact member(s) not drawn" if hidden else ""))
    for i, line in enumerate((title, sub)):
        tw, _ = text_size(line)
        d.text(((W - tw) / 2, 10 + 20 * i), line, fill="black", font=font)
    tw, _ = text_size(xlabel)
    d.text((left + (W - left - right - tw) / 2, H - bottom + 30), xlabel, fill="black", font=font)
    tw, th = text_size(ylabel)
    lab = Image.new("RGB", (tw + 4, th + 6), "white")
    ImageDraw.Draw(lab).text((2, 0), ylabel, fill="black", font=font)
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (8, int(top + (H - top - bottom - lab.size[1]) / 2)))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        img.save(f, format="PNG")
    os.replace(tmp, path)
    return dict(points=points, wins=wins, members=int(x.size), path=path)


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
        except ImportError as e:  # pragma: no cover - Pillow comes with scikit-image
            log.info("no PSNR scatter plot (%s)", e)
            continue
        written.append(path)
    return written


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
        Dataset-level result rows (dicts with DATASET_FIELDS, plus ``final_weights``: True when the final
        model.pt of a finished run was scored).
    """
    from tqdm.auto import tqdm

    model, exp, meta = load_trained_model(run_dir, checkpoint)
    # the path really loaded when load_trained_model records it (its default rule may skip a damaged file)
    weights = scored_weights(run_dir, model.weights_path or checkpoint)
    _warn_if_not_final(run_dir, weights)
    tc = merge_test_config(EnsembleTestConfig, exp.get("test"), overrides, "ensemble")
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
    # every model has bake() (models.base.FieldModel; a no-op when there is nothing to cache)
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
        # (every model has the contract's predict_grid; only a baked model with fast paths (DRR-Net's folded
        # lattice) reconstructs through its own, the others go through forward as before)
        use_grid_path = (not hasattr(dataset, "eval_coords") and model.fast_paths and model.is_baked)
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
    _add_wins(results, scorers)
    for r in results:
        r.update(weights)
    for sc in scorers:
        member_rows += sc.rows
    write_csv(targets[0], results, DATASET_FIELDS)
    write_csv(targets[1], member_rows, MEMBER_FIELDS)
    for p in _write_scatters(out_dir, scorers):
        log.info("PSNR scatter: %s", p)
    if n_pred and constant_members == n_pred:
        log.warning("the model's prediction is constant for every member: the model has collapsed "
                    "(compare with the mean-field reference row)")
    return results


def n_points_of(sc: _Scorer, dataset) -> int:
    shape = dataset.spatial_shape if sc.key[2] == "full" else dataset.train_shape
    return int(np.prod(shape))


def _dump(out_dir: str, row: int, res: str, pred: torch.Tensor, gt: torch.Tensor, dataset, tc: EnsembleTestConfig) -> None:
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
