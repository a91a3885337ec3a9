"""Results tables in the paper's layouts (spec 5-7) from finished, evaluated runs.

    python -m util.results runs/*                       # Markdown tables to stdout
    python -m util.results runs/ --out_dir results      # also results_<dataset>.md / .csv in results/
    python -m util.results "runs/nyx_*" --flops --title "Nyx, 50 epochs"

Each argument is a run directory, a glob pattern (quoted or expanded by the shell) or a folder holding run
directories (e.g. ``train.log_dir``). A run is used when it holds ``finished.json`` and ``eval/metrics.csv``
(written by test.py); other runs are skipped with a warning naming them.

Runs are grouped by dataset: ``dataset.type`` plus the basename of ``dataset.data_dir`` / ``dataset.root``
from the run's config.yaml (``--group_by`` picks another config key, or ``none`` for one group). Per group:

1. Conditional generalization (paper Table 2): runs trained on full-resolution fields (dataset.downsample
   <= 1), scored on the unseen members (split=test) at full resolution. One row per run: Rel L2, PSNR
   (dataset level), member-mean PSNR (mean of the member PSNRs), SSIM, wins vs IDW (members on which the
   model's PSNR is higher than the IDW predictor's, ``wins/members``), TFLOPs per 1e9 points (only with
   ``--flops``: fvcore on the loaded model), inference wall time (s), training time (h, timing.json: mean step
   time x total steps), trainable parameters. Under the models, the reference predictors (mean field, nearest
   member, IDW) with the model-specific columns blank; they depend on the data only, so they are read from the
   first run of the group (a warning says so if another run of the group disagrees).
2. Spatio-conditional (runs with dataset.downsample > 1, or whose metrics.csv has resolution=train rows):
   "unseen fields" (split=test, with member-mean PSNR and wins vs IDW) and "trained fields" (split=train) side
   by side, at full resolution and, when evaluated, at the training resolution.
3. Images (runs of task ``image``, evaluated by tasks/image/task.py; they form their own group, labelled
   ``image_<file stem>`` of ``dataset.path``, and are in neither table above): one row per run and evaluated
   resolution: the training resolution (``full``, or ``1/k`` for the super-resolution protocol,
   dataset.downsample = k), PSNR over the whole image, SSIM on true tiles, LPIPS (``-`` when its weights were
   not available), and where evaluated the reference's raster-chunk SSIM and chunk-averaged PSNR (spec 1.4);
   inference time (bake + forward chunks), bake time, training time, parameters (from the loaded model, else
   the ``params`` column of metrics.csv).

A run whose metrics.csv says it was scored with other weights than its final model.pt (test.py
``--checkpoint``; column ``weights``) is named in a note and a warning.

Markdown formatting follows the paper (Rel L2 ``3.18e-2``, PSNR ``44.69``, SSIM ``.986``, params ``8.9M``);
``-`` marks a value that is missing or not computed, an empty cell one that does not apply. The CSV files
hold the same rows in long form with unrounded values (one row per run x split x resolution, column
``table`` = conditional / spatio_conditional). Existing output files are not replaced unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from util.config import yaml_load

log = logging.getLogger("results")

__all__ = ["RunResult", "Table", "find_run_dirs", "collect_runs", "dataset_label", "read_metrics",
           "add_model_stats", "conditional_table", "spatio_table", "image_table", "group_report", "make_reports",
           "write_reports", "fmt_rel_l2", "fmt_psnr", "fmt_ssim", "fmt_params", "fmt_float", "fmt_wins", "model_display_name",
           "reference_display_name", "main"]

METRICS_REL = os.path.join("eval", "metrics.csv")

#: display names of the registered model types, in the paper's row order
MODEL_NAMES = {"kplanes": "K-Planes", "fainr": "FA-INR", "explorable_inr": "Explorable-INR", "drrnet": "DRR-Net",
               # image models, in the order of the paper's image configs (ids 0-5, spec vision 2.2)
               "mrgrid_drr": "MRGrid+DRR", "mrgrid": "MRGrid", "grid_drr": "Grid+DRR", "grid": "Grid", "ngp": "NGP",
               "siren": "SIREN"}
MODEL_ORDER = list(MODEL_NAMES)
REFERENCE_NAMES = {"mean_field": "Mean field", "nearest_member": "Nearest member"}
#: data_dir / root basenames too generic to name a dataset alone (the parent folder is prepended)
GENERIC_DIR_NAMES = {"data", "train", "test", "fields", "members", "volumes", "raw", "prepared", "processed",
                     "ensemble", "npy", "files"}

CSV_FIELDS = ["table", "dataset", "model", "run", "model_type", "predictor", "fields", "split", "resolution",
              "members", "rel_l2", "psnr", "psnr_member_mean", "ssim", "md", "wins_vs_mean", "wins_vs_nearest",
              "wins_vs_idw", "wins_of", "tflops_per_1e9_points", "infer_s", "bake_s", "train_h", "params", "weights",
              "step", "lpips", "ssim_raster", "psnr_chunked", "height", "width"]
#: metrics.csv columns read as integers (tasks.ensemble.evaluation.DATASET_FIELDS, tasks.image.IMAGE_FIELDS)
INT_KEYS = ("members", "wins_vs_mean", "wins_vs_nearest", "wins_vs_idw", "wins_of", "step", "total_steps", "height",
            "width", "channels", "params", "ssim_tile", "chunk_size")
#: metrics.csv columns kept as text
TEXT_KEYS = ("predictor", "split", "resolution", "weights", "ssim_protocol")


# ------------------------------------------------------------------------------------------------ formatting
def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_rel_l2(v) -> str:
    """3 significant digits in e-notation without exponent padding, as in the paper: ``3.18e-2``."""
    if _missing(v):
        return "-"
    mant, exp = f"{float(v):.2e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_psnr(v) -> str:
    """2 decimals: ``44.69``."""
    return "-" if _missing(v) else f"{float(v):.2f}"


def fmt_ssim(v) -> str:
    """3 decimals without the leading zero, as in the paper: ``.986`` (``1.000``, ``-.012``)."""
    if _missing(v):
        return "-"
    s = f"{float(v):.3f}"
    if s.startswith("0."):
        return s[1:]
    if s.startswith("-0."):
        return "-" + s[2:]
    return s


def fmt_float(v) -> str:
    """Times and TFLOPs: 1 decimal from 1 up (``57.2``), 3 significant digits below (``0.0523``)."""
    if _missing(v):
        return "-"
    v = float(v)
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"


def fmt_wins(v) -> str:
    """Wins ``(wins, members)`` as ``17/20``; ``-`` when missing (e.g. a metrics.csv from before the column)."""
    if v is None or _missing(v[0]) or _missing(v[1]):
        return "-"
    return f"{int(v[0])}/{int(v[1])}"


def fmt_params(v) -> str:
    """Parameter count: ``8.9M`` from 1e5 up (paper), ``4.7K`` from 1e3, else the integer."""
    if _missing(v):
        return "-"
    v = int(v)
    if v >= 100_000:
        return f"{v / 1e6:.1f}M"
    if v >= 1_000:
        return f"{v / 1e3:.1f}K"
    return str(v)


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


# --------------------------------------------------------------------------------------------- collecting
@dataclass
class RunResult:
    """One finished, evaluated run.

    Attributes:
        path: run directory.
        name: display name of the run (directory basename; ``parent/basename`` when basenames clash).
        config: config.yaml as written (not validated: the results need no registered dataset).
        metrics: rows of eval/metrics.csv (numbers parsed; NaN for empty / nan).
        timing: timing.json (empty dict when absent).
        group: dataset label (see :func:`dataset_label`).
        params: trainable parameters (None until :func:`add_model_stats`, or when the model cannot be built).
        tflops: fvcore TFLOPs per 1e9 points (None unless counted).
    """

    path: str
    name: str
    config: Dict[str, Any]
    metrics: List[Dict[str, Any]]
    timing: Dict[str, Any] = field(default_factory=dict)
    group: str = ""
    params: Optional[int] = None
    tflops: Optional[float] = None
    flops_uncounted: List[str] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return str((self.config.get("model") or {}).get("type", "?"))

    @property
    def downsample(self) -> int:
        try:
            return int((self.config.get("dataset") or {}).get("downsample", 1) or 1)
        except (TypeError, ValueError):
            return 1

    @property
    def train_h(self) -> Optional[float]:
        v = self.timing.get("estimated_train_h")
        return None if v is None else float(v)

    def row(self, predictor: str, split: str, resolution: str) -> Optional[Dict[str, Any]]:
        """The metrics row of (predictor, split, resolution), or None."""
        for r in self.metrics:
            if r.get("predictor") == predictor and r.get("split") == split and r.get("resolution") == resolution:
                return r
        return None

    def has_resolution(self, resolution: str) -> bool:
        return any(r.get("resolution") == resolution for r in self.metrics)

    def references(self, resolution: str) -> List[str]:
        """Reference predictor names with split=test rows at ``resolution``, in file order."""
        out = []
        for r in self.metrics:
            p = r.get("predictor")
            if p != "model" and r.get("split") == "test" and r.get("resolution") == resolution and p not in out:
                out.append(p)
        return out

    @property
    def task_type(self) -> str:
        return str((self.config.get("task") or {}).get("type", "ensemble"))

    @property
    def is_image(self) -> bool:
        """A run of the image task (config task.type image, or an image metrics.csv: split=image rows)."""
        return self.task_type == "image" or any(r.get("split") == "image" for r in self.metrics)

    @property
    def spatio(self) -> bool:
        """Part of the spatio-conditional task: trained downsampled, or evaluated at the training resolution."""
        return not self.is_image and (self.downsample > 1 or self.has_resolution("train"))


def _parse_value(k: str, v: str):
    if k in TEXT_KEYS:
        return v
    if v is None or v.strip() == "":
        return float("nan")
    try:
        return int(float(v)) if k in INT_KEYS else float(v)
    except (ValueError, OverflowError):
        try:
            return float(v)
        except ValueError:
            return v


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Rows of a dataset-level metrics.csv (tasks.ensemble.evaluation.DATASET_FIELDS) with numbers parsed."""
    with open(path, newline="") as f:
        return [{k: _parse_value(k, v) for k, v in r.items() if k is not None} for r in csv.DictReader(f)]


def find_run_dirs(patterns: Sequence[str]) -> List[str]:
    """Run directories named by ``patterns``: directories, glob patterns, or folders holding run directories.

    A directory with a config.yaml is a run; one without is searched one level down for runs. Paths that are
    neither are reported with a warning. Order: the patterns' order, each expanded sorted; no duplicates.
    """
    out: List[str] = []
    seen = set()

    def add(p):
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(os.path.normpath(p))

    for pat in patterns:
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else ([pat] if os.path.exists(pat) else [])
        if not matches:
            log.warning("no run directory matches '%s'", pat)
            continue
        found = False
        for m in matches:
            if not os.path.isdir(m):
                continue
            if os.path.isfile(os.path.join(m, "config.yaml")):
                add(m)
                found = True
                continue
            subs = sorted(d for d in (os.path.join(m, n) for n in os.listdir(m))
                          if os.path.isfile(os.path.join(d, "config.yaml")))
            for d in subs:
                add(d)
            found = found or bool(subs)
        if not found:
            log.warning("'%s' is not a run directory (no config.yaml) and holds none", pat)
    return out


def _get_path(cfg: Dict[str, Any], key: str):
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _safe(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_.")
    return s or "unnamed"


def _dir_label(path: str) -> str:
    p = os.path.normpath(str(path))
    base = os.path.basename(p)
    if base.lower() in GENERIC_DIR_NAMES:
        parent = os.path.basename(os.path.dirname(p))
        if parent:
            return f"{parent}-{base}"
    return base


def dataset_label(config: Dict[str, Any], group_by: str = "auto") -> str:
    """The group (dataset) label of a run, safe as a file name part.

    ``auto`` labels: ``demo_blast`` (type + data_dir/root basename), ``image_pearl`` (type + the stem of
    dataset.path), ``image_demo_astronaut`` (type + dataset.photo).

    Args:
        config: the run's config.yaml.
        group_by: ``auto`` = dataset.type plus the basename of dataset.data_dir, else of dataset.root (the type
            alone when the basename equals it; a generic basename such as ``data`` gets its parent prepended);
            ``none`` = one group ``all``; otherwise a dotted config key (``dataset.data_dir``, ``name``): its
            value (the basename for a path).
    """
    if group_by == "none":
        return "all"
    if group_by != "auto":
        v = _get_path(config, group_by)
        if v is None:
            return "unknown"
        s = str(v)
        return _safe(_dir_label(s) if ("/" in s or os.sep in s) else s)
    ds = config.get("dataset") or {}
    typ = str(ds.get("type", "unknown"))
    src = ds.get("data_dir") or ds.get("root")
    parts = [typ]
    if isinstance(ds.get("photo"), str) and ds["photo"]:  # image_demo: the bundled photo's name
        parts.append(ds["photo"])
    elif src:
        base = _dir_label(src)
        if base and base != typ:
            parts.append(base)
    elif isinstance(ds.get("path"), str) and ds["path"]:  # a one-file dataset (image): the file's stem
        stem = os.path.splitext(os.path.basename(os.path.normpath(ds["path"])))[0]
        if stem and stem != typ:
            parts.append(stem)
    return _safe("_".join(parts))


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def load_run(path: str, metrics_rel: str = METRICS_REL) -> Tuple[Optional[RunResult], str]:
    """A RunResult, or (None, reason) when the run is unfinished, not evaluated or unreadable."""
    if not os.path.isfile(os.path.join(path, "finished.json")):
        return None, "training not finished (no finished.json)"
    mpath = os.path.join(path, metrics_rel)
    if not os.path.isfile(mpath):
        return None, f"not evaluated (no {metrics_rel}; run: python test.py --run {path})"
    try:
        with open(os.path.join(path, "config.yaml")) as f:
            cfg = yaml_load(f) or {}
        metrics = read_metrics(mpath)
    except (OSError, yaml.YAMLError, csv.Error, ValueError) as e:
        return None, f"unreadable ({e})"
    if not metrics:
        return None, f"{metrics_rel} holds no rows"
    timing = {}
    tp = os.path.join(path, "timing.json")
    if os.path.isfile(tp):
        try:
            timing = _read_json(tp)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable timing.json (%s); training time left blank", path, e)
    return RunResult(path=path, name=os.path.basename(os.path.normpath(path)), config=cfg, metrics=metrics,
                     timing=timing), ""


def collect_runs(patterns: Sequence[str], group_by: str = "auto", metrics_rel: str = METRICS_REL
                 ) -> Tuple[List[RunResult], List[Tuple[str, str]]]:
    """Finished, evaluated runs named by ``patterns`` and the skipped ones.

    Returns:
        (runs, skipped): runs with their ``group`` set; skipped = [(run directory, reason)], each also logged
        as a warning.
    """
    runs, skipped = [], []
    for d in find_run_dirs(patterns):
        r, why = load_run(d, metrics_rel)
        if r is None:
            log.warning("skipping run '%s': %s", d, why)
            skipped.append((d, why))
            continue
        r.group = dataset_label(r.config, group_by)
        runs.append(r)
    # unique display names: parent/name where basenames clash
    counts: Dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(r.path)))
            r.name = f"{parent}/{r.name}"
    return runs, skipped


# ------------------------------------------------------------------------------------------- model stats
def _load_model(run: RunResult):
    """(model, meta) of a run: the trained model via util.runs.load_trained_model; if that fails (e.g. the
    dataset type of the config is not registered here), the architecture built from config.yaml and meta.json
    (the counts do not depend on the weights). None when neither works."""
    from util import runs as runs_mod

    try:
        model, _exp, meta = runs_mod.load_trained_model(run.path)
        return model, meta
    except Exception as e:  # noqa: BLE001 - any failure falls back to the architecture
        first = e
    try:
        meta = _read_json(os.path.join(run.path, "meta.json"))
        model = runs_mod.build_model(run.config, inputs=runs_mod.model_inputs_of(meta))
        log.warning("run '%s': trained model not loadable (%s); counting on the architecture built from "
                    "config.yaml and meta.json", run.name, first)
        return model, meta
    except Exception as e:  # noqa: BLE001
        log.warning("run '%s': cannot build the model (%s; %s); params/TFLOPs left blank", run.name, first, e)
        return None


def add_model_stats(runs: Sequence[RunResult], flops: bool = False, n_cond: int = 100,
                    n_points: int = 1000) -> None:
    """Fill ``params`` (trainable parameters; cheap) and, with ``flops``, ``tflops`` (util.flops.count_flops:
    fvcore on ``n_cond`` conditions x ``n_points`` points, after the bake) of each run."""
    for r in runs:
        got = _load_model(r)
        if got is None:
            continue
        model, meta = got
        r.params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
        if flops:
            from util.flops import count_flops

            try:
                from util.runs import model_inputs_of

                inputs = model_inputs_of(meta)
                res = count_flops(model, int(inputs["cond_dim"]), int(inputs["spatial_dims"]),
                                  n_cond=1 if int(inputs["cond_dim"]) == 0 else n_cond, n_points=n_points)
                r.tflops = float(res["tflops_per_1e9_points"])
                r.flops_uncounted = list(res.get("uncounted", []))
            except Exception as e:  # noqa: BLE001
                log.warning("run '%s': FLOP count failed (%s); TFLOPs left blank", r.name, e)
        del model


# ------------------------------------------------------------------------------------------------- tables
@dataclass
class Column:
    key: str
    header: str
    fmt: Any = str
    numeric: bool = True


@dataclass
class Table:
    """A paper table: ``rows`` hold raw values (None = missing, ``""`` = not applicable) under Column keys."""

    kind: str
    title: str
    columns: List[Column]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    csv_rows: List[Dict[str, Any]] = field(default_factory=list)

    def cells(self) -> List[List[str]]:
        out = []
        for r in self.rows:
            line = []
            for c in self.columns:
                v = r.get(c.key)
                line.append(v if isinstance(v, str) and (v == "" or not c.numeric) else c.fmt(v))
            out.append(line)
        return out

    def markdown(self) -> str:
        head = [c.header for c in self.columns]
        body = self.cells()
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]

        def line(cells):
            return "| " + " | ".join(s.rjust(w) if c.numeric else s.ljust(w)
                                     for s, w, c in zip(cells, widths, self.columns)) + " |"

        sep = "|" + "|".join(("-" * (w + 1) + ":") if c.numeric else ("-" * (w + 2))
                             for w, c in zip(widths, self.columns)) + "|"
        parts = [f"## {self.title}", "", line(head), sep] + [line(b) for b in body]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)


def _order_key(r: RunResult):
    t = r.model_type
    return (MODEL_ORDER.index(t) if t in MODEL_ORDER else len(MODEL_ORDER), t, r.name)


def _model_names(runs: Sequence[RunResult]) -> Dict[str, str]:
    """Display name per run path: the model type's name, ``name (run)`` when several runs share the type."""
    by_type: Dict[str, int] = {}
    for r in runs:
        by_type[r.model_type] = by_type.get(r.model_type, 0) + 1
    return {r.path: (model_display_name(r.model_type) if by_type[r.model_type] == 1
                     else f"{model_display_name(r.model_type)} ({r.name})") for r in runs}


def _v(row: Optional[Dict[str, Any]], key: str):
    if row is None:
        return None
    v = row.get(key)
    return None if _missing(v) else v


def _wins(row: Optional[Dict[str, Any]], ref: str = "idw"):
    """(wins, members) of a model row against reference ``ref`` (mean / nearest / idw), None when missing."""
    w, n = _v(row, f"wins_vs_{ref}"), _v(row, "wins_of")
    return None if w is None or n is None else (w, n)


def _weights_notes(runs: Sequence[RunResult]) -> List[str]:
    """Notes (and warnings) for runs whose metrics.csv was scored with other weights than the final model.pt."""
    notes = []
    for r in runs:
        seen = []
        for m in r.metrics:
            w = m.get("weights")
            if m.get("predictor") != "model" or not isinstance(w, str) or not w:
                continue
            step, total = _v(m, "step"), _v(m, "total_steps")
            if (w != "model.pt" or (step is not None and total is not None and step != total)) and w not in seen:
                seen.append(w)
                at = f" (step {step}{f' of {total}' if total is not None else ''})" if step is not None else ""
                msg = f"run '{r.name}' was scored with {w}{at}, not its final model.pt"
                log.warning("%s", msg)
                notes.append("WARNING: " + msg + ".")
    return notes


def _close(a, b, rtol=1e-4) -> bool:
    if _missing(a) and _missing(b):
        return True
    if _missing(a) or _missing(b):
        return False
    return abs(float(a) - float(b)) <= rtol * max(abs(float(a)), abs(float(b)), 1e-12)


def _reference_source(runs: Sequence[RunResult], resolutions: Sequence[str], table: str
                      ) -> Tuple[Optional[RunResult], List[str]]:
    """The first run with reference rows, and notes: where they come from, and any run that disagrees."""
    src = next((r for r in runs if any(r.references(res) for res in resolutions)), None)
    if src is None:
        return None, []
    notes = []
    differ = []
    for r in runs:
        if r is src:
            continue
        for res in resolutions:
            for p in src.references(res):
                a, b = src.row(p, "test", res), r.row(p, "test", res)
                if b is None:
                    continue
                if not all(_close(a.get(k), b.get(k)) for k in ("rel_l2", "psnr_dataset", "ssim")):
                    differ.append(r.name)
                    break
            else:
                continue
            break
    n_other = sum(1 for r in runs if r is not src and any(r.references(res) for res in resolutions))
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
        members=_v(m, "members"), rel_l2=_v(m, "rel_l2"), psnr=_v(m, "psnr_dataset"),
        psnr_member_mean=_v(m, "psnr_member_mean"), ssim=_v(m, "ssim"), md=_v(m, "md"),
        wins_vs_mean=_v(m, "wins_vs_mean") if is_model else None,
        wins_vs_nearest=_v(m, "wins_vs_nearest") if is_model else None,
        wins_vs_idw=_v(m, "wins_vs_idw") if is_model else None, wins_of=_v(m, "wins_of") if is_model else None,
        weights=_v(m, "weights") if is_model else None, step=_v(m, "step") if is_model else None,
        tflops_per_1e9_points=run.tflops if is_model and run is not None else None,
        infer_s=_v(m, "infer_s") if is_model else None, bake_s=_v(m, "bake_s") if is_model else None,
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
    runs = sorted([r for r in runs if r.downsample <= 1 and not r.is_image], key=_order_key)
    if not runs:
        return None
    names = _model_names(runs)
    t = Table("conditional", f"Conditional generalization: {group}", list(COND_COLUMNS))
    members = set()
    for r in runs:
        m = r.row("model", "test", "full")
        if m is None:
            log.warning("run '%s' has no model row for split=test, resolution=full in its metrics.csv", r.name)
        else:
            members.add(_v(m, "members"))
        t.rows.append(dict(dataset=group, model=names[r.path], rel_l2=_v(m, "rel_l2"), psnr=_v(m, "psnr_dataset"),
                           psnr_mm=_v(m, "psnr_member_mean"), ssim=_v(m, "ssim"), wins_idw=_wins(m),
                           tflops=r.tflops, infer_s=_v(m, "infer_s"), train_h=r.train_h, params=r.params))
        t.csv_rows.append(_csv_row("conditional", group, names[r.path], r, "model", "test", "full", m))
    src, ref_notes = _reference_source(runs, ["full"], "conditional")
    if src is not None:
        for p in src.references("full"):
            m = src.row(p, "test", "full")
            t.rows.append(dict(dataset=group, model=reference_display_name(p), rel_l2=_v(m, "rel_l2"),
                               psnr=_v(m, "psnr_dataset"), psnr_mm=_v(m, "psnr_member_mean"), ssim=_v(m, "ssim"),
                               wins_idw="", tflops="", infer_s="", train_h="", params=""))
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
    t.notes += _weights_notes(runs)
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
    runs = sorted([r for r in runs if r.spatio], key=_order_key)
    if not runs:
        return None
    names = _model_names(runs)
    t = Table("spatio_conditional", f"Spatio-conditional: {group}", list(SPATIO_COLUMNS))
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
                               u_rel_l2=_v(u, "rel_l2"), u_psnr=_v(u, "psnr_dataset"),
                               u_psnr_mm=_v(u, "psnr_member_mean"), u_ssim=_v(u, "ssim"), u_wins_idw=_wins(u),
                               t_rel_l2=_v(tr, "rel_l2"), t_psnr=_v(tr, "psnr_dataset"), t_ssim=_v(tr, "ssim"),
                               tflops=r.tflops, infer_s=_v(u, "infer_s"), train_h=r.train_h, params=r.params))
            for split, m in (("test", u), ("train", tr)):
                if m is not None:
                    t.csv_rows.append(_csv_row("spatio_conditional", group, names[r.path], r, "model", split, res, m))
    src, ref_notes = _reference_source(runs, resolutions, "spatio-conditional")
    if src is not None:
        for res in resolutions:
            for p in src.references(res):
                m = src.row(p, "test", res)
                t.rows.append(dict(dataset=group, model=reference_display_name(p),
                                   resolution=_res_label(res, src.downsample), u_rel_l2=_v(m, "rel_l2"),
                                   u_psnr=_v(m, "psnr_dataset"), u_psnr_mm=_v(m, "psnr_member_mean"),
                                   u_ssim=_v(m, "ssim"), u_wins_idw="", t_rel_l2="", t_psnr="",
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
    t.notes += _weights_notes(runs)
    if src is not None:
        t.notes.append("Reference predictors are scored on unseen members only (on a training member nearest "
                       "member and IDW return the member itself).")
    return t


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
    resolution (full first), the metrics of tasks/image/task.py. None if the group holds no image run."""
    runs = sorted([r for r in runs if r.is_image], key=_order_key)
    if not runs:
        return None
    names = _model_names(runs)
    rows, csv_rows = [], []
    for r in runs:
        model_rows = sorted((m for m in r.metrics if m.get("predictor") == "model"),
                            key=lambda m: (m.get("resolution") != "full", str(m.get("resolution"))))
        if not model_rows:
            log.warning("run '%s' has no model row in its metrics.csv", r.name)
            continue
        params = r.params if r.params is not None else _v(model_rows[0], "params")
        for m in model_rows:
            res = str(m.get("resolution", "full"))
            rows.append(dict(dataset=group, model=names[r.path],
                             trained_at="full" if r.downsample <= 1 else f"1/{r.downsample}",
                             resolution=_image_resolution_label(res, r), psnr=_v(m, "psnr"), ssim=_v(m, "ssim"),
                             lpips=_v(m, "lpips"), ssim_raster=_v(m, "ssim_raster"),
                             psnr_chunked=_v(m, "psnr_chunked"), tflops=r.tflops, infer_s=_v(m, "infer_s"),
                             bake_s=_v(m, "bake_s"), train_h=r.train_h, params=params))
            csv_rows.append(dict(table="image", dataset=group, model=names[r.path], run=r.path,
                                 model_type=r.model_type, predictor="model", fields="image",
                                 split=m.get("split", "image"), resolution=res, psnr=_v(m, "psnr"),
                                 ssim=_v(m, "ssim"), lpips=_v(m, "lpips"), ssim_raster=_v(m, "ssim_raster"),
                                 psnr_chunked=_v(m, "psnr_chunked"), height=_v(m, "height"), width=_v(m, "width"),
                                 tflops_per_1e9_points=r.tflops, infer_s=_v(m, "infer_s"), bake_s=_v(m, "bake_s"),
                                 train_h=r.train_h, params=params, weights=_v(m, "weights"), step=_v(m, "step")))
    if not rows:
        return None
    shown = [c for c in IMAGE_COLUMNS if c.key not in IMAGE_OPTIONAL or any(x.get(c.key) is not None for x in rows)]
    t = Table("image", f"Images: {group}", shown, rows=rows, csv_rows=csv_rows)
    protocols = sorted({str(m.get("ssim_protocol")) for r in runs for m in r.metrics
                        if m.get("predictor") == "model" and isinstance(m.get("ssim_protocol"), str)})
    tiles = sorted({int(m["ssim_tile"]) for r in runs for m in r.metrics
                    if m.get("predictor") == "model" and isinstance(m.get("ssim_tile"), int)})
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
    t.notes += _weights_notes(runs)
    return t


@dataclass
class GroupReport:
    group: str
    tables: List[Table]
    markdown: str
    csv_rows: List[Dict[str, Any]]


def group_report(group: str, runs: Sequence[RunResult], title: Optional[str] = None, flops: bool = False,
                 skipped: Sequence[Tuple[str, str]] = ()) -> GroupReport:
    """The tables of one dataset (conditional, spatio-conditional, image) as Markdown (with a title) and as CSV rows."""
    tables = [t for t in (conditional_table(group, runs, flops), spatio_table(group, runs, flops),
                          image_table(group, runs, flops)) if t is not None]
    head = f"# {title}: {group}" if title else f"# Results: {group}"
    parts = [head, "", f"Runs: {', '.join(sorted(r.name for r in runs))}."]
    if skipped:
        parts.append(f"Skipped (unfinished or not evaluated): {', '.join(p for p, _ in skipped)}.")
    for t in tables:
        parts += ["", t.markdown()]
    md = "\n".join(parts) + "\n"
    return GroupReport(group, tables, md, [row for t in tables for row in t.csv_rows])


def _group_of_dir(path: str, group_by: str) -> Optional[str]:
    try:
        with open(os.path.join(path, "config.yaml")) as f:
            return dataset_label(yaml_load(f) or {}, group_by)
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def make_reports(runs: Sequence[RunResult], title: Optional[str] = None, flops: bool = False,
                 skipped: Sequence[Tuple[str, str]] = (), group_by: str = "auto") -> List[GroupReport]:
    """One report per dataset group, groups in order of first appearance. A skipped run is listed in the
    report of its dataset (in every report when its config.yaml is unreadable)."""
    groups: Dict[str, List[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    sk = [(p, why, _group_of_dir(p, group_by)) for p, why in skipped]
    return [group_report(g, rs, title, flops, [(p, why) for p, why, sg in sk if sg in (None, g)])
            for g, rs in groups.items()]


def _csv_text(rows: Sequence[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if _missing(v) else (repr(v) if isinstance(v, float) else v)) for k, v in r.items()})
    return buf.getvalue()


def report_paths(out_dir: str, group: str) -> Tuple[str, str]:
    return (os.path.join(out_dir, f"results_{group}.md"), os.path.join(out_dir, f"results_{group}.csv"))


def write_reports(reports: Sequence[GroupReport], out_dir: str, overwrite: bool = False) -> List[str]:
    """Write ``results_<group>.md`` and ``.csv`` per report into ``out_dir``.

    Raises:
        FileExistsError: a target exists and not ``overwrite`` (checked for all targets before writing any).
    """
    from util.runs import atomic_write_text

    targets = [(p, rep) for rep in reports for p in report_paths(out_dir, rep.group)]
    existing = [p for p, _ in targets if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"results already exist: {', '.join(existing)}; pass --overwrite to replace them "
                              "or choose another --out_dir")
    os.makedirs(out_dir, exist_ok=True)
    for p, rep in targets:
        atomic_write_text(p, rep.markdown if p.endswith(".md") else _csv_text(rep.csv_rows))
    return [p for p, _ in targets]


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m util.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB",
                   help="run directories, glob patterns, or folders holding run directories")
    p.add_argument("--out_dir", help="also write results_<dataset>.md and .csv here (default: stdout only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results files in --out_dir")
    p.add_argument("--flops", action="store_true",
                   help="count TFLOPs per 1e9 points with fvcore on each run's model (slow for big models)")
    p.add_argument("--title", help="title of each Markdown report (default 'Results')")
    p.add_argument("--group_by", default="auto",
                   help="'auto' (dataset.type + data_dir/root basename), 'none' (one table), or a dotted config "
                        "key such as dataset.data_dir")
    p.add_argument("--metrics", default=METRICS_REL,
                   help=f"metrics file relative to each run directory (default {METRICS_REL}; test.py --out_dir)")
    p.add_argument("--no_params", action="store_true", help="do not load the models (params column blank)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    runs, skipped = collect_runs(args.runs, args.group_by, args.metrics)
    if not runs:
        print("error: no finished, evaluated run found", file=sys.stderr)
        return 1
    if not args.no_params or args.flops:
        add_model_stats(runs, flops=args.flops)
    reports = make_reports(runs, args.title, args.flops, skipped, args.group_by)
    print("\n".join(rep.markdown for rep in reports), end="")
    if args.out_dir:
        try:
            paths = write_reports(reports, args.out_dir, args.overwrite)
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"\nwritten: {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
