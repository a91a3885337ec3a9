"""The task contract: what a run learns (kind ``task`` in the registry; config section ``task:``, default
``{type: ensemble}``).

A run is one straight line: load and validate the config (util/config/) -> build the components
(util/build.build_components: dataset, then the task around it, then the model with the arguments the task
reads from the data) -> the one training loop (util/training.py). The loop knows nothing about batch keys or
losses; per step it asks the task::

    batch = task.batch(step, rank, device)
    out = task.training_step(model, batch, step)     # StepOutput(loss, terms, output), or None: skip the step

and it logs ``out.terms`` (a term named ``mse`` also gives the logged PSNR). After training, test.py calls the
task class's :meth:`Task.evaluate` on the run directory and prints :meth:`Task.format_table`. A task's state
that must survive a resume (:meth:`Task.state_dict`) is saved in every checkpoint (``task_state.pt``, read back
by ``util.checkpoints.load_task_state``).

Evaluation is one template, :meth:`Task.evaluate` (test config, overwrite refusal, weights, device, the record of
the weights scored in every row, atomic result files); a task supplies only its scoring::

    score(ctx: EvalContext) -> Scores       # class method: rows, plus the tables the template writes
    result_files(test_config) -> names      # class method: the files the overwrite check looks for
    format_table(rows) -> str               # static method: what test.py prints

To add a task: subclass :class:`Task`, register it (``@register("task", "name")``), list its module in
``tasks/__init__.py``, give it a ``test_config`` dataclass (the keys of the ``test:`` section), ``score`` and
``result_files``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


class StepOutput(NamedTuple):
    """What :meth:`Task.training_step` returns.

    Attributes:
        loss: the scalar to minimize (fp32).
        terms: named detached scalars logged at every log interval (``mse`` also gives the logged PSNR).
        output: the model output the collapse detector looks at (None: not checked).
    """

    loss: Tensor
    terms: Dict[str, Tensor]
    output: Optional[Tensor] = None


class CsvFile(NamedTuple):
    """A CSV result file of :class:`Scores` (util.tables.write_csv).

    Attributes:
        rows: one dict per line.
        fields: the columns in order (None: every key in first-seen order, less ``final_weights``).
        nan_cell: what a float NaN becomes.
    """

    rows: List[Dict[str, Any]]
    fields: Optional[Sequence[str]] = None
    nan_cell: str = "nan"


class JsonFile(NamedTuple):
    """A JSON result file of :class:`Scores` (``json.dump(obj, indent=indent)``)."""

    obj: Any
    indent: Optional[int] = 1


@dataclass
class Scores:
    """What a task's :meth:`Task.score` returns.

    Attributes:
        rows: the rows :meth:`Task.evaluate` returns (and :meth:`Task.format_table` prints); the template adds the
            weights scored (``weights``, ``step``, ``total_steps``, ``final_weights``) to each of them, in place, so
            result files holding these dicts record them too.
        files: result files the template writes after scoring, atomically, in this order: name (in the output
            folder) -> :class:`CsvFile` / :class:`JsonFile`. Each must be one of :meth:`Task.result_files`.
    """

    rows: List[Dict[str, Any]]
    files: Dict[str, Union[CsvFile, JsonFile]] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What :meth:`Task.evaluate` hands a task's :meth:`Task.score`.

    Attributes:
        run_dir: the run directory; out_dir: the output folder (created; result files named by
            :meth:`Task.result_files` are not in it, or ``overwrite`` was given).
        exp: the run's experiment (config.yaml); meta: its meta.json.
        model: the trained model in eval mode, on the CPU (the task moves it).
        test_config: the task's ``test_config`` dataclass: the run's ``test`` section with the overrides.
        device: the evaluation device; autocast: fp16 autocast allowed (CUDA and ``train.mixed_precision``
            auto / fp16); tasks that never autocast ignore it.
        progress: show progress (bars / per-item log lines).
        weights: the weights scored (util.evaluation_common.scored_weights).
        weights_path: the weights file or checkpoint folder loaded (``model.weights_path``).
        data_check: compares a dataset with the fingerprint stored at training
            (util.evaluation_common.DataCheck); :meth:`dataset` applies it.
    """

    run_dir: str
    out_dir: str
    exp: Dict[str, Any]
    meta: Dict[str, Any]
    model: Any
    test_config: Any
    device: torch.device
    autocast: bool
    progress: bool
    weights: Dict[str, Any]
    weights_path: Optional[str] = None
    data_check: Optional[Callable[[Any], None]] = None

    def dataset(self):
        """The run's dataset (util.build.build_dataset), checked against the fingerprint stored at training: the
        scoring's one way to read the run's data."""
        from util.build import build_dataset

        ds = build_dataset(self.exp)
        if self.data_check is not None:
            self.data_check(ds)
        return ds

    def path(self, name: str) -> str:
        """A file of the output folder."""
        return os.path.join(self.out_dir, name)


class Task:
    """Base class of every task: regression of a field f(x, c) -> v with the MSE loss.

    Batches are dicts of tensors ``x (B, N, d)``, ``c (B, d_c)``, ``v (B, N, C)`` (the dataset's
    ``sample_batch(step, rank)``); subclasses override what differs.

    Class attributes:
        test_config: dataclass of the ``test:`` section's keys (validated when the config is loaded).
        model_arguments: model constructor arguments the program sets from the data (never from a config);
            :meth:`model_inputs` gives their values, injected where the model's signature accepts them.
        ddp_find_unused_parameters: True when some parameters get no gradient in some steps (e.g. MoE-INR's
            experts in its label pre-training): multi-process training then tells DDP to look for them.
        has_validation: True when :meth:`validate` scores a validation split (``train.val_every_steps``).

    Multi-process training (``accelerate launch``): :meth:`training_step` receives the DDP-wrapped model and must
    run every forward pass through it (``model(...)``), never through the unwrapped module, or the processes'
    gradients are not averaged; the loop checks at every checkpoint that all processes hold the same weights.
    """

    test_config: Optional[type] = None
    ddp_find_unused_parameters: bool = False
    has_validation: bool = False
    model_arguments = ("cond_dim", "spatial_dims", "out_dim")

    def __init__(self, dataset):
        self.dataset = dataset

    # ------------------------------------------------------------------------------------- model inputs
    def model_inputs(self) -> Dict[str, int]:
        """Model arguments set by the program from the data (see ``model_arguments``)."""
        ds = self.dataset
        return {"cond_dim": int(ds.cond_dim), "spatial_dims": int(ds.spatial_dims), "out_dim": int(ds.out_dim)}

    @classmethod
    def model_inputs_without_data(cls, exp: Dict[str, Any]) -> Optional[Dict[str, int]]:
        """The model inputs when they follow from the config alone (None: the data is needed), e.g. for FLOP
        counts of a paper config whose data is not here."""
        return None

    @property
    def output_mean(self) -> Optional[float]:
        """Training mean of the normalized targets (replaces ``init_output_mean: auto``); None if unknown."""
        return self.dataset.train_value_mean  # datasets.base.Dataset: None unless the dataset knows it

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch (``train.epochs`` counts these)."""
        return int(self.dataset.steps_per_epoch)

    # ----------------------------------------------------------------------------------------- training
    def batch(self, step: int, rank: int, device) -> Dict[str, Tensor]:
        """The training batch of (step, rank), moved to ``device``."""
        return {k: v.to(device, non_blocking=True) for k, v in self.dataset.sample_batch(step, rank=rank).items()}

    def predict(self, model, batch: Dict[str, Tensor]) -> Tensor:
        """Model output for a batch: (B, N, C)."""
        return model(batch["x"], batch["c"])

    def loss(self, pred: Tensor, batch: Dict[str, Tensor]) -> StepOutput:
        """MSE in fp32 over every point and channel."""
        mse = F.mse_loss(pred.float(), batch["v"])
        return StepOutput(mse, {"mse": mse.detach()}, pred)

    def training_step(self, model, batch: Dict[str, Tensor], step: int) -> Optional[StepOutput]:
        """Forward and loss of one step (the loop runs it under autocast, then backward and the optimizer).

        Return None to skip the step (no backward, no optimizer or scheduler step), e.g. when a batch holds no
        samples.
        """
        return self.loss(self.predict(model, batch), batch)

    def validate(self, model) -> Optional[Dict[str, float]]:
        """Scores of the model (in eval mode, no gradients needed) on the dataset's validation split, for
        ``train.val_every_steps``: {name: value}, e.g. ``mse`` and ``psnr``. Tasks that implement it set
        ``has_validation = True``; the base task has none."""
        return None

    @classmethod
    def count_flops(cls, model, inputs: Dict[str, Any], n_cond: int = 100, n_points: int = 1000) -> Dict[str, Any]:
        """test_flops.py's row for one model: fvcore multiply-adds of one query per point, as
        ``{"tflops_per_1e9_points", "params", "uncounted"}`` (default: f(x, c) on ``n_cond`` conditions x
        ``n_points`` coordinates, util.flops.count_flops); tasks whose query is not f(x, c) override it."""
        from util.flops import count_flops

        return count_flops(model, inputs["cond_dim"], inputs["spatial_dims"], n_cond, n_points)

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Task state saved in every checkpoint (default: none)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""

    # --------------------------------------------------------------------------------------- evaluation
    @classmethod
    def evaluate(cls, run_dir: str, out_dir: Optional[str] = None, checkpoint: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, overwrite: bool = False, device: Optional[str] = None,
                 progress: bool = True, allow_changed_data: bool = False) -> List[Dict[str, Any]]:
        """Score a trained run, write its result files (``<run_dir>/eval`` by default) and return the rows.

        The one evaluation of every task (a template: the task supplies :meth:`score`, :meth:`result_files` and
        :meth:`format_table`): merge the run's ``test`` section with ``overrides`` into ``test_config`` (an
        unknown key is a ConfigError); refuse, before any work, when result files are already in ``out_dir``
        (FileExistsError naming the folder and the files) unless ``overwrite``; load the weights
        (util.build.load_trained_model) and record which ones (a warning unless the final model.pt of a finished
        run); :meth:`score`, during which the run's dataset, when the scoring reads it
        (:meth:`EvalContext.dataset`), is checked against the fingerprint stored in meta.json at training
        (util.evaluation_common.DataCheck: a difference is a DataError naming what changed unless
        ``allow_changed_data``; a run without a fingerprint gets a one-line warning); add to every row the weights
        columns, the machine columns (``cpu``, ``threads``) and the data check (``data_fingerprint``); write the
        files of the :class:`Scores` atomically (an exception in scoring leaves none of them behind; a CSV file
        with its own column list that holds the rows gets these columns appended).

        Args:
            run_dir: run directory written by train.py.
            out_dir: output folder (default ``<run_dir>/eval``).
            checkpoint: weights to use (default: the final model.pt, else the latest intact checkpoint); a
                checkpoint folder or a ``.pt`` file.
            overrides: keys of the ``test`` section to change for this evaluation.
            overwrite: replace existing result files.
            device: "cpu" / "cuda" (default: CUDA when available).
            progress: show progress.
            allow_changed_data: score even when the run's data differs from its fingerprint at training
                (recorded in the rows, column ``data_fingerprint``).

        Returns:
            The rows of :meth:`score`, with ``weights``, ``step``, ``total_steps``, ``final_weights``, ``cpu``,
            ``threads`` and ``data_fingerprint``.
        """
        from util.config import merge_test_config
        from util.build import load_trained_model, task_type_of
        from util.device import default_device
        from util.evaluation_common import (DATA_FIELD, MACHINE_FIELDS, DataCheck, machine_columns, scored_weights,
                                            warn_if_not_final)
        from util.files import write_json
        from util.run_dir import load_experiment
        from util.tables import write_csv

        if cls.test_config is None or cls.score.__func__ is Task.score.__func__:
            raise NotImplementedError(f"task {cls.__name__} has no evaluation (no test_config / score)")
        exp = load_experiment(run_dir)
        tc = merge_test_config(cls.test_config, exp.get("test"), overrides, task_type_of(exp))
        out_dir = out_dir or os.path.join(run_dir, "eval")
        names = list(cls.result_files(tc))
        existing = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
        if existing and not overwrite:
            raise FileExistsError(f"results already in '{out_dir}' ({', '.join(existing)}); pass --overwrite "
                                  f"or --out_dir")
        model, exp, meta = load_trained_model(run_dir, checkpoint)
        weights_path = getattr(model, "weights_path", None) or checkpoint
        weights = scored_weights(run_dir, weights_path)
        warn_if_not_final(run_dir, weights)
        dev = default_device(device)
        autocast = dev.type == "cuda" and exp["train"].get("mixed_precision", "auto") in ("auto", "fp16")
        os.makedirs(out_dir, exist_ok=True)
        data_check = DataCheck(run_dir, meta, allow_changed=allow_changed_data)
        ctx = EvalContext(run_dir=run_dir, out_dir=out_dir, exp=exp, meta=meta, model=model, test_config=tc,
                          device=dev, autocast=autocast, progress=progress, weights=weights,
                          weights_path=weights_path, data_check=data_check)
        scores = cls.score(ctx)
        undeclared = [n for n in scores.files if n not in names]
        if undeclared:
            raise RuntimeError(f"task {cls.__name__} writes {undeclared} but result_files() does not name them "
                               f"(the overwrite check would miss them)")
        machine = machine_columns()
        for r in scores.rows:
            r.update(weights)
            r.update(machine)
            r[DATA_FIELD] = data_check.column
        row_ids = {id(r) for r in scores.rows}
        for name, f in scores.files.items():
            path = os.path.join(out_dir, name)
            if isinstance(f, CsvFile):
                fields = f.fields
                if fields is None:  # every key; final_weights is a row key, not a column (weights/step say it)
                    fields = []
                    for r in f.rows:
                        fields += [k for k in r if k not in fields and k != "final_weights"]
                elif any(id(r) in row_ids for r in f.rows):  # the rows: the machine and data columns too
                    fields = list(fields) + [k for k in MACHINE_FIELDS + [DATA_FIELD] if k not in fields]
                write_csv(path, f.rows, fields, nan_cell=f.nan_cell)
            elif isinstance(f, JsonFile):
                write_json(path, f.obj, indent=f.indent)
            else:
                raise TypeError(f"task {cls.__name__}: result file {name!r} is a {type(f).__name__}, not a "
                                f"CsvFile or JsonFile")
        return scores.rows

    @classmethod
    def result_files(cls, test_config) -> Sequence[str]:
        """Names of the result files an evaluation with ``test_config`` writes into its output folder: the files
        of :attr:`Scores.files` and any other file whose presence means results are there (e.g. PNGs).
        :meth:`evaluate` refuses to replace them without ``overwrite``. Default: ``metrics.csv``."""
        return ("metrics.csv",)

    @classmethod
    def score(cls, ctx: EvalContext) -> Scores:
        """Score the trained model of ``ctx`` (:class:`EvalContext`): the task's own evaluation. Files written
        while scoring (PNGs, dumps) go into ``ctx.out_dir`` through an atomic writer
        (util.files.atomic_write); tables go into :attr:`Scores.files`, written by :meth:`evaluate`."""
        raise NotImplementedError(f"task {cls.__name__} has no evaluation")

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        """The printed table of :meth:`evaluate`'s rows."""
        keys = list(rows[0]) if rows else []
        lines = ["  ".join(keys)] + ["  ".join(str(r.get(k, "")) for k in keys) for r in rows]
        return "\n".join(lines)

    @classmethod
    def report_tables(cls, group: str, runs: Sequence[Any], flops: bool = False) -> List[Any]:
        """The result tables (``util.results.Table``) of this task's finished, evaluated runs of one dataset group,
        for ``python -m util.results``; ``runs`` are ``util.results.RunResult`` of this task only, ``flops`` says
        whether TFLOPs were counted. Default: no table (a task with tables overrides this, e.g. the ensemble task
        with tasks/ensemble/tables.py)."""
        return []
