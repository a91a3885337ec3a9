"""Results tables in the paper's layouts (spec 5-7) from finished, evaluated runs.

    python -m util.results runs/*                       # Markdown tables to stdout
    python -m util.results runs/ --out_dir results      # also results_<dataset>.md / .csv in results/
    python -m util.results "runs/nyx_*" --flops --title "Nyx, 50 epochs"

Each argument is a run directory, a glob pattern (quoted or expanded by the shell) or a folder holding run
directories (e.g. ``train.log_dir``). A run is used when it holds ``finished.json`` and ``eval/metrics.csv``
(written by test.py); other runs are skipped with a warning naming them.

Runs are grouped by dataset: ``dataset.type`` plus the basename of ``dataset.data_dir`` / ``dataset.root``
(or the file stem of ``dataset.path``, e.g. ``image_<file stem>``) from the run's config.yaml (``--group_by``
picks another config key, or ``none`` for one group). Per group, the runs of each task (config ``task.type``)
get that task's tables (:meth:`tasks.base.Task.report_tables`, asked for through the registry; tasks in name
order): the ensemble task the conditional-generalization (paper Table 2) and spatio-conditional tables
(tasks/ensemble/tables.py), the image task the image table (tasks/image/tables.py). A task without tables adds
none.

A run whose metrics.csv says it was scored with other weights than its final model.pt (test.py
``--checkpoint``; column ``weights``) is named in a note and a warning.

Markdown formatting follows the paper (Rel L2 ``3.18e-2``, PSNR ``44.69``, SSIM ``.986``, params ``8.9M``);
``-`` marks a value that is missing or not computed, an empty cell one that does not apply. The CSV files
hold the same rows in long form with unrounded values (the columns :data:`CSV_LEADING`, e.g. ``table`` =
conditional / spatio_conditional / image, then those of the group's tables). Existing output files are not
replaced unless ``--overwrite``.
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

from util import registry
from util.config import yaml_load

log = logging.getLogger("results")

__all__ = ["RunResult", "Column", "Table", "find_run_dirs", "collect_runs", "dataset_label", "read_metrics",
           "add_model_stats", "task_tables", "group_report", "make_reports", "write_reports", "fmt_rel_l2",
           "fmt_psnr", "fmt_ssim", "fmt_params", "fmt_float", "is_missing", "value", "int_value",
           "order_runs", "display_names", "weights_notes", "main"]

METRICS_REL = os.path.join("eval", "metrics.csv")

#: data_dir / root basenames too generic to name a dataset alone (the parent folder is prepended)
GENERIC_DIR_NAMES = {"data", "train", "test", "fields", "members", "volumes", "raw", "prepared", "processed",
                     "ensemble", "npy", "files"}

#: the first CSV columns of every table (which table, which run); each table adds its own (Table.csv_fields)
CSV_LEADING = ["table", "dataset", "model", "run", "model_type", "predictor", "fields", "split", "resolution"]


# ------------------------------------------------------------------------------------------------ formatting
def is_missing(v) -> bool:
    """None or a float NaN (an empty metrics.csv cell reads as NaN)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_rel_l2(v) -> str:
    """3 significant digits in e-notation without exponent padding, as in the paper: ``3.18e-2``."""
    if is_missing(v):
        return "-"
    mant, exp = f"{float(v):.2e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_psnr(v) -> str:
    """2 decimals: ``44.69``."""
    return "-" if is_missing(v) else f"{float(v):.2f}"


def fmt_ssim(v) -> str:
    """3 decimals without the leading zero, as in the paper: ``.986`` (``1.000``, ``-.012``)."""
    if is_missing(v):
        return "-"
    s = f"{float(v):.3f}"
    if s.startswith("0."):
        return s[1:]
    if s.startswith("-0."):
        return "-" + s[2:]
    return s


def fmt_float(v) -> str:
    """Times and TFLOPs: 1 decimal from 1 up (``57.2``), 3 significant digits below (``0.0523``)."""
    if is_missing(v):
        return "-"
    v = float(v)
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"


def fmt_params(v) -> str:
    """Parameter count: ``8.9M`` from 1e5 up (paper), ``4.7K`` from 1e3, else the integer."""
    if is_missing(v):
        return "-"
    v = int(v)
    if v >= 100_000:
        return f"{v / 1e6:.1f}M"
    if v >= 1_000:
        return f"{v / 1e3:.1f}K"
    return str(v)


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
        """``dataset.downsample`` (the training resolution is 1/downsample of the data's); 1 when not set."""
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

    @property
    def task_type(self) -> str:
        """The run's task (config ``task.type``; the default task when the config has no task section)."""
        return str((self.config.get("task") or {}).get("type", "ensemble"))


def _parse_value(v: Optional[str]):
    if v is None or v.strip() == "":
        return float("nan")
    try:
        return float(v)
    except ValueError:
        return v


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Rows of a run's metrics.csv: a cell that reads as a number becomes a float (see :func:`int_value` for
    counts), an empty one NaN, any other text stays text."""
    with open(path, newline="") as f:
        return [{k: _parse_value(v) for k, v in r.items() if k is not None} for r in csv.DictReader(f)]


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
    """(model, meta) of a run: the trained model via util.build.load_trained_model; if that fails (e.g. the
    dataset type of the config is not registered here), the architecture built from config.yaml and meta.json
    (the counts do not depend on the weights). None when neither works."""
    from util import build as build_mod

    try:
        model, _exp, meta = build_mod.load_trained_model(run.path)
        return model, meta
    except Exception as e:  # noqa: BLE001 - any failure falls back to the architecture
        first = e
    try:
        meta = _read_json(os.path.join(run.path, "meta.json"))
        model = build_mod.build_model(run.config, inputs=build_mod.model_inputs_of(meta))
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
                from util.build import model_inputs_of

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
    """A paper table: ``rows`` hold raw values (None = missing, ``""`` = not applicable) under Column keys;
    ``csv_rows`` the same rows in long form (keys: :data:`CSV_LEADING` plus ``csv_fields``, the table's own CSV
    columns in order)."""

    kind: str
    title: str
    columns: List[Column]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    csv_rows: List[Dict[str, Any]] = field(default_factory=list)
    csv_fields: List[str] = field(default_factory=list)

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


def value(row: Optional[Dict[str, Any]], key: str):
    """``row[key]``, None when the row or the value is missing (NaN: an empty cell)."""
    if row is None:
        return None
    v = row.get(key)
    return None if is_missing(v) else v


def int_value(row: Optional[Dict[str, Any]], key: str) -> Optional[int]:
    """A count (members, step, pixels ...) of a metrics row as an int; None when missing or not a number."""
    v = value(row, key)
    if isinstance(v, str):
        return None
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError, OverflowError):
        return None


def order_runs(runs: Sequence[RunResult], model_names: Dict[str, str]) -> List[RunResult]:
    """Runs in the order of their model types in ``model_names`` (a task's display names, in the paper's row
    order), other model types after them by name; then by run name."""
    order = list(model_names)

    def key(r: RunResult):
        t = r.model_type
        return (order.index(t) if t in order else len(order), t, r.name)

    return sorted(runs, key=key)


def display_names(runs: Sequence[RunResult], model_names: Dict[str, str]) -> Dict[str, str]:
    """Display name per run path: the model type's name in ``model_names`` (else the type), ``name (run)`` when
    several runs share the type."""
    by_type: Dict[str, int] = {}
    for r in runs:
        by_type[r.model_type] = by_type.get(r.model_type, 0) + 1

    def name(t: str) -> str:
        return model_names.get(t, t)

    return {r.path: (name(r.model_type) if by_type[r.model_type] == 1 else f"{name(r.model_type)} ({r.name})")
            for r in runs}


def weights_notes(runs: Sequence[RunResult]) -> List[str]:
    """Notes (and warnings) for runs whose metrics.csv was scored with other weights than the final model.pt
    (model rows' ``weights``, ``step``, ``total_steps``)."""
    notes = []
    for r in runs:
        seen = []
        for m in r.metrics:
            w = m.get("weights")
            if m.get("predictor") != "model" or not isinstance(w, str) or not w:
                continue
            step, total = int_value(m, "step"), int_value(m, "total_steps")
            if (w != "model.pt" or (step is not None and total is not None and step != total)) and w not in seen:
                seen.append(w)
                at = f" (step {step}{f' of {total}' if total is not None else ''})" if step is not None else ""
                msg = f"run '{r.name}' was scored with {w}{at}, not its final model.pt"
                log.warning("%s", msg)
                notes.append("WARNING: " + msg + ".")
    return notes


def task_tables(group: str, runs: Sequence[RunResult], flops: bool = False) -> List[Table]:
    """The tables of one group: per task type (in name order), the task class's
    :meth:`~tasks.base.Task.report_tables` of the group's runs of that task, found through the registry. Runs of
    a task type not registered here are named in a warning and get no table."""
    by_task: Dict[str, List[RunResult]] = {}
    for r in runs:
        by_task.setdefault(r.task_type, []).append(r)
    tables: List[Table] = []
    for task_type in sorted(by_task):
        try:
            task_cls = registry.get("task", task_type)
        except registry.ConfigError as e:
            log.warning("no table for run(s) %s: %s", ", ".join(r.name for r in by_task[task_type]), e)
            continue
        tables += list(task_cls.report_tables(group, by_task[task_type], flops))
    return tables


@dataclass
class GroupReport:
    group: str
    tables: List[Table]
    markdown: str
    csv_rows: List[Dict[str, Any]]
    csv_fields: List[str] = field(default_factory=lambda: list(CSV_LEADING))


def group_report(group: str, runs: Sequence[RunResult], title: Optional[str] = None, flops: bool = False,
                 skipped: Sequence[Tuple[str, str]] = ()) -> GroupReport:
    """The tables of one dataset (those of each task, :func:`task_tables`) as Markdown (with a title) and as CSV
    rows."""
    tables = task_tables(group, runs, flops)
    head = f"# {title}: {group}" if title else f"# Results: {group}"
    parts = [head, "", f"Runs: {', '.join(sorted(r.name for r in runs))}."]
    if skipped:
        parts.append(f"Skipped (unfinished or not evaluated): {', '.join(p for p, _ in skipped)}.")
    for t in tables:
        parts += ["", t.markdown()]
    md = "\n".join(parts) + "\n"
    fields = list(CSV_LEADING)
    for t in tables:
        fields += [k for k in t.csv_fields if k not in fields]
    return GroupReport(group, tables, md, [row for t in tables for row in t.csv_rows], fields)


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


def _csv_text(rows: Sequence[Dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if is_missing(v) else (repr(v) if isinstance(v, float) else v)) for k, v in r.items()})
    return buf.getvalue()


def report_paths(out_dir: str, group: str) -> Tuple[str, str]:
    return (os.path.join(out_dir, f"results_{group}.md"), os.path.join(out_dir, f"results_{group}.csv"))


def write_reports(reports: Sequence[GroupReport], out_dir: str, overwrite: bool = False) -> List[str]:
    """Write ``results_<group>.md`` and ``.csv`` per report into ``out_dir``.

    Raises:
        FileExistsError: a target exists and not ``overwrite`` (checked for all targets before writing any).
    """
    from util.files import atomic_write_text

    targets = [(p, rep) for rep in reports for p in report_paths(out_dir, rep.group)]
    existing = [p for p, _ in targets if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"results already exist: {', '.join(existing)}; pass --overwrite to replace them "
                              "or choose another --out_dir")
    os.makedirs(out_dir, exist_ok=True)
    for p, rep in targets:
        atomic_write_text(p, rep.markdown if p.endswith(".md") else _csv_text(rep.csv_rows, rep.csv_fields))
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
