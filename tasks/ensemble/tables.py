"""The ensemble task's result tables (``python -m util.results``; spec 5-7), built from runs collected by
util.results and asked for through :meth:`tasks.base.Task.report_tables`.

1. Conditional generalization (paper Table 2): runs trained on full-resolution fields (dataset.downsample
   <= 1), scored on the unseen members (split=test) at full resolution. One row per run: Rel L2, PSNR
   (dataset level), member-mean PSNR (mean of the member PSNRs), SSIM, wins vs IDW (members on which the
   model's PSNR is higher than the IDW predictor's, ``wins/members``), TFLOPs per 1e9 points (only with
   ``--flops``), inference wall time (s), training time (h, timing.json), trainable parameters. Under the
   models, the reference predictors (mean field, nearest member, IDW) with the model-specific columns blank;
   they depend on the data only, so they are read from the first run of the group (a warning says so if another
   run of the group disagrees).
2. Spatio-conditional (runs with dataset.downsample > 1, or whose metrics.csv has resolution=train rows):
   "unseen fields" (split=test, with member-mean PSNR and wins vs IDW) and "trained fields" (split=train) side
   by side, at full resolution and, when evaluated, at the training resolution.

The rows come from each run's eval/metrics.csv (tasks.ensemble.evaluation.DATASET_FIELDS). The CSV rows are in
long form (one per run x split x resolution; column ``table`` = conditional / spatio_conditional).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from util.results import (Column, RunResult, Table, display_names, fmt_float, fmt_params, fmt_psnr, fmt_rel_l2,
                          fmt_ssim, int_value, is_missing, order_runs, value, weights_notes)

log = logging.getLogger("results")

__all__ = ["MODEL_NAMES", "REFERENCE_NAMES", "CSV_FIELDS", "COND_COLUMNS", "SPATIO_COLUMNS", "fmt_wins",
           "model_display_name", "reference_display_name", "is_spatio", "references", "conditional_table",
           "spatio_table", "report_tables"]

#: display names of the ensemble models, in the paper's row order
MODEL_NAMES = {"kplanes": "K-Planes", "fainr": "FA-INR", "explorable_inr": "Explorable-INR", "drrnet": "DRR-Net"}
REFERENCE_NAMES = {"mean_field": "Mean field", "nearest_member": "Nearest member"}

#: the CSV columns of both tables, after util.results.CSV_LEADING
CSV_FIELDS = ["members", "rel_l2", "psnr", "psnr_member_mean", "ssim", "md", "wins_vs_mean", "wins_vs_nearest",
              "wins_vs_idw", "wins_of", "tflops_per_1e9_points", "infer_s", "bake_s", "train_h", "params", "weights",
              "step"]


def fmt_wins(v) -> str:
    """Wins ``(wins, members)`` as ``17/20``; ``-`` when missing (e.g. a metrics.csv from before the column)."""
    if v is None or is_missing(v[0]) or is_missing(v[1]):
        return "-"
    return f"{int(v[0])}/{int(v[1])}"


def model_display_name(model_type: str) -> str:
    return MODEL_NAMES.get(model_type, model_type)


def reference_display_name(predictor: str) -> str:
    """``mean_field`` -> Mean field, ``idw_k8_p2`` -> IDW (k=8, p=2); other names unchanged."""
    if predictor in REFERENCE_NAMES:
        return REFERENCE_NAMES[predictor]
    m = re.fullmatch(r"idw_k(\d+)_p(.+)", predictor)
    if m:
        return f"IDW (k={m.group(1)}, p={m.group(2)})"
    return predictor


def is_spatio(run: RunResult) -> bool:
    """Part of the spatio-conditional task: trained downsampled, or evaluated at the training resolution."""
    return run.downsample > 1 or run.has_resolution("train")


def references(run: RunResult, resolution: str) -> List[str]:
    """Reference predictor names with split=test rows at ``resolution``, in file order."""
    out = []
    for r in run.metrics:
        p = r.get("predictor")
        if p != "model" and r.get("split") == "test" and r.get("resolution") == resolution and p not in out:
            out.append(p)
    return out


def _wins(row: Optional[Dict[str, Any]], ref: str = "idw"):
    """(wins, members) of a model row against reference ``ref`` (mean / nearest / idw), None when missing."""
    w, n = int_value(row, f"wins_vs_{ref}"), int_value(row, "wins_of")
    return None if w is None or n is None else (w, n)


def _close(a, b, rtol=1e-4) -> bool:
    if is_missing(a) and is_missing(b):
        return True
    if is_missing(a) or is_missing(b):
        return False
    return abs(float(a) - float(b)) <= rtol * max(abs(float(a)), abs(float(b)), 1e-12)


def _reference_source(runs: Sequence[RunResult], resolutions: Sequence[str], table: str
                      ) -> Tuple[Optional[RunResult], List[str]]:
    """The first run with reference rows, and notes: where they come from, and any run that disagrees."""
    src = next((r for r in runs if any(references(r, res) for res in resolutions)), None)
    if src is None:
        return None, []
    notes = []
    differ = []
    for r in runs:
        if r is src:
            continue
        for res in resolutions:
            for p in references(src, res):
                a, b = src.row(p, "test", res), r.row(p, "test", res)
                if b is None:
                    continue
                if not all(_close(a.get(k), b.get(k)) for k in ("rel_l2", "psnr_dataset", "ssim")):
                    differ.append(r.name)
                    break
            else:
                continue
            break
    n_other = sum(1 for r in runs if r is not src and any(references(r, res) for res in resolutions))
    msg = (f"Reference predictors (model-free, from the training members): taken from run '{src.name}'"
           + (f"; identical in the other {n_other} run(s) of this dataset" if n_other and not differ else
              "; they depend only on the data, so any run of this dataset gives the same rows" if not differ
              else ""))
    notes.append(msg + ".")
    if differ:
        w = (f"reference predictor rows of run(s) {', '.join(sorted(set(differ)))} differ from those of "
             f"'{src.name}' ({table} table): different test members or test.ref_k/ref_power? Rows shown: '{src.name}'")
        log.warning("%s", w)
        notes.append("WARNING: " + w + ".")
    return src, notes


def _csv_row(table: str, dataset: str, model: str, run: Optional[RunResult], predictor: str, split: str,
             resolution: str, m: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    is_model = predictor == "model"
    return dict(
        table=table, dataset=dataset, model=model, run=run.path if run is not None and is_model else "",
        model_type=run.model_type if run is not None and is_model else "", predictor=predictor,
        fields={"test": "unseen", "train": "trained"}.get(split, split), split=split, resolution=resolution,
        members=int_value(m, "members"), rel_l2=value(m, "rel_l2"), psnr=value(m, "psnr_dataset"),
        psnr_member_mean=value(m, "psnr_member_mean"), ssim=value(m, "ssim"), md=value(m, "md"),
        wins_vs_mean=int_value(m, "wins_vs_mean") if is_model else None,
        wins_vs_nearest=int_value(m, "wins_vs_nearest") if is_model else None,
        wins_vs_idw=int_value(m, "wins_vs_idw") if is_model else None,
        wins_of=int_value(m, "wins_of") if is_model else None,
        weights=value(m, "weights") if is_model else None, step=int_value(m, "step") if is_model else None,
        tflops_per_1e9_points=run.tflops if is_model and run is not None else None,
        infer_s=value(m, "infer_s") if is_model else None, bake_s=value(m, "bake_s") if is_model else None,
        train_h=run.train_h if is_model and run is not None else None,
        params=run.params if is_model and run is not None else None)


COND_COLUMNS = [Column("dataset", "dataset", numeric=False), Column("model", "model", numeric=False),
                Column("rel_l2", "Rel L2", fmt_rel_l2), Column("psnr", "PSNR", fmt_psnr),
                Column("psnr_mm", "member-mean PSNR", fmt_psnr), Column("ssim", "SSIM", fmt_ssim),
                Column("wins_idw", "wins vs IDW", fmt_wins), Column("tflops", "TFLOPs/1e9 pts", fmt_float),
                Column("infer_s", "infer s", fmt_float), Column("train_h", "training h", fmt_float),
                Column("params", "params", fmt_params)]


def conditional_table(group: str, runs: Sequence[RunResult], flops: bool = False) -> Optional[Table]:
    """Paper Table 2 (conditional generalization) for the runs of one dataset trained at full resolution:
    split=test, resolution=full; the reference predictors below the models. None if no such run."""
    runs = order_runs([r for r in runs if r.downsample <= 1], MODEL_NAMES)
    if not runs:
        return None
    names = display_names(runs, MODEL_NAMES)
    t = Table("conditional", f"Conditional generalization: {group}", list(COND_COLUMNS), csv_fields=list(CSV_FIELDS))
    members = set()
    for r in runs:
        m = r.row("model", "test", "full")
        if m is None:
            log.warning("run '%s' has no model row for split=test, resolution=full in its metrics.csv", r.name)
        else:
            members.add(int_value(m, "members"))
        t.rows.append(dict(dataset=group, model=names[r.path], rel_l2=value(m, "rel_l2"),
                           psnr=value(m, "psnr_dataset"), psnr_mm=value(m, "psnr_member_mean"), ssim=value(m, "ssim"),
                           wins_idw=_wins(m), tflops=r.tflops, infer_s=value(m, "infer_s"), train_h=r.train_h,
                           params=r.params))
        t.csv_rows.append(_csv_row("conditional", group, names[r.path], r, "model", "test", "full", m))
    src, ref_notes = _reference_source(runs, ["full"], "conditional")
    if src is not None:
        for p in references(src, "full"):
            m = src.row(p, "test", "full")
            t.rows.append(dict(dataset=group, model=reference_display_name(p), rel_l2=value(m, "rel_l2"),
                               psnr=value(m, "psnr_dataset"), psnr_mm=value(m, "psnr_member_mean"),
                               ssim=value(m, "ssim"), wins_idw="", tflops="", infer_s="", train_h="", params=""))
            t.csv_rows.append(_csv_row("conditional", group, reference_display_name(p), None, p, "test", "full", m))
    n = ", ".join(str(x) for x in sorted(x for x in members if x is not None))
    t.notes.append(f"Unseen members (split=test{', ' + n + ' members' if n else ''}) at full resolution. "
                   "PSNR: dataset level, -10 log10(mean member MSE); member-mean PSNR: mean of the member PSNRs; "
                   "Rel L2 and SSIM: member means; data normalized to [0, 1]. wins vs IDW: members on which the "
                   "model's PSNR is higher than the IDW predictor's / members compared (the CSV also has the wins "
                   "vs the mean field and the nearest member).")
    if len(members - {None}) > 1:
        t.notes.append("WARNING: the runs were scored on different numbers of test members.")
    t.notes.append("infer s: wall time to reconstruct all test members at full resolution (after the bake); "
                   "training h: mean step time x total steps (timing.json).")
    if not flops:
        t.notes.append("TFLOPs/1e9 pts not computed (pass --flops).")
    t.notes += ref_notes
    t.notes += weights_notes(runs)
    return t


SPATIO_COLUMNS = [Column("dataset", "dataset", numeric=False), Column("model", "model", numeric=False),
                  Column("resolution", "resolution", numeric=False),
                  Column("u_rel_l2", "unseen Rel L2", fmt_rel_l2), Column("u_psnr", "unseen PSNR", fmt_psnr),
                  Column("u_psnr_mm", "unseen member-mean PSNR", fmt_psnr), Column("u_ssim", "unseen SSIM", fmt_ssim),
                  Column("u_wins_idw", "unseen wins vs IDW", fmt_wins),
                  Column("t_rel_l2", "trained Rel L2", fmt_rel_l2), Column("t_psnr", "trained PSNR", fmt_psnr),
                  Column("t_ssim", "trained SSIM", fmt_ssim),
                  Column("tflops", "TFLOPs/1e9 pts", fmt_float), Column("infer_s", "infer s", fmt_float),
                  Column("train_h", "training h", fmt_float), Column("params", "params", fmt_params)]


def _res_label(res: str, downsample: int) -> str:
    if res == "train":
        return f"train (1/{downsample})" if downsample > 1 else "train"
    return res


def spatio_table(group: str, runs: Sequence[RunResult], flops: bool = False) -> Optional[Table]:
    """The spatio-conditional table for one dataset: unseen (split=test) and trained (split=train) fields at
    full resolution, then at the training resolution where evaluated; reference rows (unseen only) below.
    None if no run of the group belongs to the task."""
    runs = order_runs([r for r in runs if is_spatio(r)], MODEL_NAMES)
    if not runs:
        return None
    names = display_names(runs, MODEL_NAMES)
    t = Table("spatio_conditional", f"Spatio-conditional: {group}", list(SPATIO_COLUMNS), csv_fields=list(CSV_FIELDS))
    resolutions = [res for res in ("full", "train") if any(r.has_resolution(res) for r in runs)]
    ds = sorted({r.downsample for r in runs})
    for r in runs:
        for res in resolutions:
            if not r.has_resolution(res):
                continue
            u, tr = r.row("model", "test", res), r.row("model", "train", res)
            if u is None and tr is None:
                continue
            t.rows.append(dict(dataset=group, model=names[r.path], resolution=_res_label(res, r.downsample),
                               u_rel_l2=value(u, "rel_l2"), u_psnr=value(u, "psnr_dataset"),
                               u_psnr_mm=value(u, "psnr_member_mean"), u_ssim=value(u, "ssim"), u_wins_idw=_wins(u),
                               t_rel_l2=value(tr, "rel_l2"), t_psnr=value(tr, "psnr_dataset"),
                               t_ssim=value(tr, "ssim"), tflops=r.tflops, infer_s=value(u, "infer_s"),
                               train_h=r.train_h, params=r.params))
            for split, m in (("test", u), ("train", tr)):
                if m is not None:
                    t.csv_rows.append(_csv_row("spatio_conditional", group, names[r.path], r, "model", split, res, m))
    src, ref_notes = _reference_source(runs, resolutions, "spatio-conditional")
    if src is not None:
        for res in resolutions:
            for p in references(src, res):
                m = src.row(p, "test", res)
                t.rows.append(dict(dataset=group, model=reference_display_name(p),
                                   resolution=_res_label(res, src.downsample), u_rel_l2=value(m, "rel_l2"),
                                   u_psnr=value(m, "psnr_dataset"), u_psnr_mm=value(m, "psnr_member_mean"),
                                   u_ssim=value(m, "ssim"), u_wins_idw="", t_rel_l2="", t_psnr="",
                                   t_ssim="", tflops="", infer_s="", train_h="", params=""))
                t.csv_rows.append(_csv_row("spatio_conditional", group, reference_display_name(p), None, p, "test",
                                           res, m))
    t.notes.append("unseen: test members; trained: training members (the model saw them only at the training "
                   f"resolution{', downsample ' + '/'.join(str(d) for d in ds) if any(d > 1 for d in ds) else ''}). "
                   "full: original resolution; train: the training resolution. PSNR: dataset level; member-mean "
                   "PSNR: mean of the member PSNRs; wins vs IDW: unseen members on which the model's PSNR is higher "
                   "than the IDW predictor's / members compared.")
    t.notes.append("infer s: wall time for all unseen members at that resolution; training h: timing.json.")
    if not flops:
        t.notes.append("TFLOPs/1e9 pts not computed (pass --flops).")
    t.notes += ref_notes
    t.notes += weights_notes(runs)
    if src is not None:
        t.notes.append("Reference predictors are scored on unseen members only (on a training member nearest "
                       "member and IDW return the member itself).")
    return t


def report_tables(group: str, runs: Sequence[RunResult], flops: bool = False) -> List[Table]:
    """The tables of the ensemble runs of one group: conditional generalization, then spatio-conditional (each
    only when some run belongs to it)."""
    return [t for t in (conditional_table(group, runs, flops), spatio_table(group, runs, flops)) if t is not None]
