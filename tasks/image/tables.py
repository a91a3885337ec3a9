"""The image task's result table (``python -m util.results``), built from runs collected by util.results and
asked for through :meth:`tasks.base.Task.report_tables`.

Image runs form their own group (labelled ``image_<file stem>`` of ``dataset.path``, see
util.results.dataset_label). One row per run and evaluated resolution: the training resolution (``full``, or
``1/k`` for the super-resolution protocol, dataset.downsample = k), PSNR over the whole image, SSIM on true tiles,
LPIPS (``-`` when its weights were not available), and where evaluated the reference's raster-chunk SSIM and
chunk-averaged PSNR (spec 1.4); inference time (bake + forward chunks), bake time, training time, parameters
(from the loaded model, else the ``params`` column of metrics.csv, tasks.image.task.IMAGE_FIELDS).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

from util.results import (Column, RunResult, Table, display_names, fmt_float, fmt_params, fmt_psnr, fmt_ssim,
                          int_value, order_runs, value, weights_notes)

log = logging.getLogger("results")

__all__ = ["MODEL_NAMES", "CSV_FIELDS", "IMAGE_COLUMNS", "IMAGE_OPTIONAL", "image_table", "report_tables"]

#: display names of the image models, in the order of the paper's image configs (ids 0-5, spec vision 2.2)
MODEL_NAMES = {"mrgrid_drr": "MRGrid+DRR", "mrgrid": "MRGrid", "grid_drr": "Grid+DRR", "grid": "Grid", "ngp": "NGP",
               "siren": "SIREN"}

#: the CSV columns of the image table, after util.results.CSV_LEADING
CSV_FIELDS = ["psnr", "ssim", "tflops_per_1e9_points", "infer_s", "bake_s", "train_h", "params", "weights", "step",
              "lpips", "ssim_raster", "psnr_chunked", "height", "width"]

IMAGE_COLUMNS = [Column("dataset", "dataset", numeric=False), Column("model", "model", numeric=False),
                 Column("trained_at", "trained at", numeric=False), Column("resolution", "resolution", numeric=False),
                 Column("psnr", "PSNR", fmt_psnr), Column("ssim", "SSIM", fmt_ssim), Column("lpips", "LPIPS", fmt_ssim),
                 Column("ssim_raster", "SSIM (raster)", fmt_ssim), Column("psnr_chunked", "PSNR (chunked)", fmt_psnr),
                 Column("tflops", "TFLOPs/1e9 pts", fmt_float), Column("infer_s", "infer s", fmt_float),
                 Column("bake_s", "bake s", fmt_float), Column("train_h", "training h", fmt_float),
                 Column("params", "params", fmt_params)]
#: image columns shown only when some row has a value
IMAGE_OPTIONAL = ("ssim_raster", "psnr_chunked", "tflops")


def _image_resolution_label(res: str, run: RunResult) -> str:
    if res == "train" and run.downsample > 1:
        return f"train (1/{run.downsample})"
    return res


def image_table(group: str, runs: Sequence[RunResult], flops: bool = False) -> Optional[Table]:
    """The image table of one group: per image run (model order of the paper's image configs) and evaluated
    resolution (full first), the metrics of tasks/image/task.py. None if no run has a model row."""
    runs = order_runs(runs, MODEL_NAMES)
    if not runs:
        return None
    names = display_names(runs, MODEL_NAMES)
    rows, csv_rows = [], []
    for r in runs:
        model_rows = sorted((m for m in r.metrics if m.get("predictor") == "model"),
                            key=lambda m: (m.get("resolution") != "full", str(m.get("resolution"))))
        if not model_rows:
            log.warning("run '%s' has no model row in its metrics.csv", r.name)
            continue
        params = r.params if r.params is not None else int_value(model_rows[0], "params")
        for m in model_rows:
            res = str(m.get("resolution", "full"))
            rows.append(dict(dataset=group, model=names[r.path],
                             trained_at="full" if r.downsample <= 1 else f"1/{r.downsample}",
                             resolution=_image_resolution_label(res, r), psnr=value(m, "psnr"), ssim=value(m, "ssim"),
                             lpips=value(m, "lpips"), ssim_raster=value(m, "ssim_raster"),
                             psnr_chunked=value(m, "psnr_chunked"), tflops=r.tflops, infer_s=value(m, "infer_s"),
                             bake_s=value(m, "bake_s"), train_h=r.train_h, params=params))
            csv_rows.append(dict(table="image", dataset=group, model=names[r.path], run=r.path,
                                 model_type=r.model_type, predictor="model", fields="image",
                                 split=m.get("split", "image"), resolution=res, psnr=value(m, "psnr"),
                                 ssim=value(m, "ssim"), lpips=value(m, "lpips"), ssim_raster=value(m, "ssim_raster"),
                                 psnr_chunked=value(m, "psnr_chunked"), height=int_value(m, "height"),
                                 width=int_value(m, "width"), tflops_per_1e9_points=r.tflops,
                                 infer_s=value(m, "infer_s"), bake_s=value(m, "bake_s"), train_h=r.train_h,
                                 params=params, weights=value(m, "weights"), step=int_value(m, "step")))
    if not rows:
        return None
    shown = [c for c in IMAGE_COLUMNS if c.key not in IMAGE_OPTIONAL or any(x.get(c.key) is not None for x in rows)]
    t = Table("image", f"Images: {group}", shown, rows=rows, csv_rows=csv_rows, csv_fields=list(CSV_FIELDS))
    protocols = sorted({str(m.get("ssim_protocol")) for r in runs for m in r.metrics
                        if m.get("predictor") == "model" and isinstance(m.get("ssim_protocol"), str)})
    tiles = sorted({int_value(m, "ssim_tile") for r in runs for m in r.metrics
                    if m.get("predictor") == "model" and int_value(m, "ssim_tile") is not None})
    t.notes.append("PSNR over the whole image, normalized values (data range 1); SSIM and LPIPS (VGG) on true "
                   f"image tiles{' of at most ' + '/'.join(str(x) for x in tiles) + ' pixels a side' if tiles else ''}"
                   "; LPIPS '-': its weights were not available where the run was evaluated. trained at: the "
                   "training image (1/k: the x1/k bilinear downsample, super-resolution protocol); resolution: "
                   "where it was scored.")
    if any(c.key in ("ssim_raster", "psnr_chunked") for c in shown):
        t.notes.append("SSIM (raster), PSNR (chunked): the reference implementation's protocols (raster chunks "
                       "re-wrapped to a window, chunk-averaged MSE), to compare with the paper's numbers.")
    if protocols and protocols != ["tiles"]:
        t.notes.append(f"SSIM protocols used: {', '.join(protocols)}.")
    t.notes.append("infer s: bake + all forward chunks of the full reconstruction at that resolution; bake s: the "
                   "bake alone; training h: timing.json.")
    if not flops:
        t.notes.append("TFLOPs/1e9 pts not computed (pass --flops).")
    t.notes += weights_notes(runs)
    return t


def report_tables(group: str, runs: Sequence[RunResult], flops: bool = False) -> List[Table]:
    """The table of the image runs of one group (none when no run has a model row)."""
    t = image_table(group, runs, flops)
    return [] if t is None else [t]
