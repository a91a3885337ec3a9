"""What every task's evaluation shares (``tasks.base.Task.evaluate`` uses it): the record of which weights were
scored (``weights``, ``step``, ``total_steps``, ``final_weights``) with its warning and its table line, the machine
that scored them (``cpu``, ``threads``: summation order, hence the last digits, depends on both), the check of the
training data against the fingerprint stored at training (``data_fingerprint``). (The CPU model is
util.cpu.cpu_model, the atomic JSON writer util.files.write_json, the evaluation device's default
util.device.default_device.)
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

from util.checkpoints import latest_checkpoint
from util.cpu import cpu_model
from util.files import read_json

__all__ = ["WEIGHTS_FIELDS", "MACHINE_FIELDS", "DATA_FIELD", "scored_weights", "warn_if_not_final", "weights_line",
           "machine_columns", "DataCheck"]

log = logging.getLogger("test")

WEIGHTS_FIELDS = ["weights", "step", "total_steps"]
"""Columns of every task's metrics that name the weights scored (the rows also hold ``final_weights``)."""
MACHINE_FIELDS = ["cpu", "threads"]
"""Columns of every task's metrics that name the machine that scored: the CPU model and torch's thread count."""
DATA_FIELD = "data_fingerprint"
"""Column of every task's metrics saying whether the data read matched the fingerprint stored at training:
``same``, ``CHANGED: ...`` (scored with --allow_changed_data), ``not stored`` (a run trained before fingerprints)
or ``not read`` (the evaluation did not read the run's data)."""


def machine_columns() -> Dict[str, Any]:
    """``{"cpu": cpu_model(), "threads": torch.get_num_threads()}`` for the metrics rows."""
    import torch

    return {"cpu": cpu_model(), "threads": int(torch.get_num_threads())}


class DataCheck:
    """The training-data check of one evaluation: ``check(dataset)`` (called when the scoring builds the run's
    dataset through tasks.base.EvalContext.dataset) compares ``dataset.fingerprint()`` with the one stored in meta.json.

    A difference is a DataError naming what changed, unless ``allow_changed`` (then a warning); a run trained before
    fingerprints gets a one-line warning. :attr:`column` is the value of the :data:`DATA_FIELD` column.
    """

    def __init__(self, run_dir: str, meta: Dict[str, Any], allow_changed: bool = False):
        self.run_dir, self.stored, self.allow_changed = run_dir, meta.get("data_fingerprint"), allow_changed
        self.column = "not read"
        self.changes: List[str] = []

    def __call__(self, dataset) -> None:
        from util.errors import DataError
        from util.fingerprint import compare_fingerprints

        if self.stored is None:
            if self.column != "not stored":
                log.warning("'%s' was trained before data fingerprints were stored: cannot check that its data is "
                            "unchanged since training", self.run_dir)
            self.column = "not stored"
            return
        self.changes = compare_fingerprints(self.stored, dataset.fingerprint())
        if not self.changes:
            self.column = "same"
            return
        what = "; ".join(self.changes)
        if not self.allow_changed:
            raise DataError(f"the data of '{self.run_dir}' changed since training: {what}. The scores would not "
                            f"describe the trained model on its data (the normalization is recomputed from the "
                            f"current files); restore the data, or pass --allow_changed_data to score anyway "
                            f"(recorded in the metrics, column '{DATA_FIELD}')")
        log.warning("scoring '%s' on data that changed since training (--allow_changed_data): %s", self.run_dir, what)
        self.column = f"CHANGED: {what}"


def scored_weights(run_dir: str, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """Which weights ``load_trained_model(run_dir, checkpoint)`` scores, and at which training step.

    The default is resolved by the same rule as :func:`util.build.load_trained_model`: ``model.pt`` when present,
    else the checkpoint named by ``checkpoints/latest``. Pass the path really loaded (``model.weights_path``)
    when there is one: the default rule may skip a damaged file.

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


def warn_if_not_final(run_dir: str, w: Dict[str, Any]) -> None:
    """Log a warning unless ``w`` (:func:`scored_weights`) is the final model.pt of a finished run."""
    if w["final_weights"]:
        return
    at = f"step {w['step'] if w['step'] is not None else '?'}" + (
        f" of {w['total_steps']}" if w["total_steps"] is not None else "")
    if not os.path.isfile(os.path.join(run_dir, "finished.json")):
        log.warning("training of '%s' has not finished (no finished.json): scoring %s (%s), not the final model.pt "
                    "of a finished run; the metrics describe an unfinished model (columns 'weights'/'step')",
                    run_dir, w["weights"], at)
    else:
        log.warning("scoring %s (%s), not the final model.pt of '%s' (recorded in the metrics, columns "
                    "'weights'/'step')", w["weights"], at, run_dir)


def weights_line(r: Dict[str, Any]) -> str:
    """``weights: model.pt (step 1200 of 1200)`` for a result row, with a warning when not the final weights."""
    step, total = r.get("step"), r.get("total_steps")
    where = f"step {step if step is not None else '?'}" + (f" of {total}" if total is not None else "")
    line = f"weights: {r.get('weights', '?')} ({where})"
    if not r.get("final_weights", True):
        line += ": NOT the final weights of a finished run"
    return line
