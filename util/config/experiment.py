"""Experiments: the ``train`` section, validation of a whole experiment, loading one from a file, run names.

A config file is a YAML list; each entry is one experiment (see :mod:`util.config`). :func:`load_config` reads
the file (:mod:`util.config.reader`), applies ``--set`` overrides and validates every section
(:func:`validate_experiment`, with the value checks of :mod:`util.config.schema`).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from util.config.reader import apply_overrides, read_config_file
from util.config.schema import check_dataclass_fields, check_component_values, check_run_name, show_value
from util.registry import ConfigError, accepted_keys, get, names

def merge_test_config(cls, section: Optional[Dict[str, Any]], overrides: Optional[Dict[str, Any]], task: str):
    """A task's test-config dataclass from the run's ``test`` section updated with ``overrides`` (test.py --test
    and flags); an unknown key is a ConfigError naming it, the task and the accepted keys."""
    merged = {**(section or {}), **(overrides or {})}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in merged if k not in known)
    if unknown:
        raise ConfigError(f"unknown key 'test.{unknown[0]}' for task type '{task}'; accepted keys: "
                          f"{', '.join(sorted(known))}")
    return cls(**merged)


@dataclass
class TrainConfig:
    """Keys of the ``train`` section.

    Attributes:
        epochs: training length in epochs (spec 3.2: one epoch = n_train * voxels / (N_c * N_x) steps).
            Exactly one of ``epochs`` and ``max_steps`` may be set; with neither, 50 epochs (paper).
        max_steps: training length in optimizer steps (overrides the epoch definition).
        seed: seed of model initialization and of every batch (batches depend on (seed, step, rank) only).
        log_dir: folder that holds run directories.
        run_name: run directory name; default ``<config file stem>_<config_id>`` or the entry's ``name``.
        checkpoint_every: save a checkpoint every this many epochs (float allowed), and always at the end.
        checkpoint_every_steps: alternative to ``checkpoint_every`` in steps (takes precedence when set).
        keep_checkpoints: number of most recent checkpoints kept on disk (older ones are deleted).
        log_every: TensorBoard/progress-bar logging interval in steps.
        mixed_precision: "auto" (fp16 autocast + grad scaling on CUDA, fp32 on CPU), "no", "fp16", "bf16".
            fp16 is refused on CPU. On CPU, "bf16" runs DRR-Net's fused paths with bf16 products (float32 master
            weights and sums): 3.2x the plain step on the demo against 2.4x for fused fp32 on a Xeon with AMX,
            at a fidelity cost (README, Speed, fourth round); "auto" stays fp32.
        grad_clip: clip the global gradient norm to this value (None: off).
        timing_steps: number of steady steps (after 10 warm-up steps) whose mean time gives the
            paper-convention training-time estimate (spec 5.6): mean step time x total steps. 0: no step is
            timed and no timing.json is written (the run says so when it starts).
        collapse_check_steps: during the first this many steps, stop training with an error when the model
            has collapsed (constant output over the batch, or every gradient exactly 0) at
            ``collapse_patience`` consecutive log intervals. 0 = off.
        collapse_patience: consecutive log intervals (of ``log_every`` steps) a collapse must persist.
        val_every_steps: score the task's validation split every this many steps and at the end (``val.csv``
            and TensorBoard ``val/*`` in the run directory), to see when training plateaus; null: off. Only
            tasks with a validation (``Task.validate``: terrain) accept it.
    """

    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    seed: int = 0
    log_dir: str = "runs"
    run_name: Optional[str] = None
    checkpoint_every: float = 10.0
    checkpoint_every_steps: Optional[int] = None
    keep_checkpoints: int = 2
    log_every: int = 10
    mixed_precision: str = "auto"
    grad_clip: Optional[float] = None
    timing_steps: int = 100
    collapse_check_steps: int = 1000
    collapse_patience: int = 3
    val_every_steps: Optional[int] = None

    def __post_init__(self):
        check_dataclass_fields(self, "train")
        check_run_name(self.run_name, "train.run_name")
        if not self.log_dir.strip():
            raise ConfigError("train.log_dir must not be empty (use '.' for the current folder)")
        for k, lo in (("seed", 0), ("checkpoint_every_steps", 1), ("timing_steps", 0), ("val_every_steps", 1)):
            if getattr(self, k) is not None and getattr(self, k) < lo:
                raise ConfigError(f"train.{k} must be >= {lo}, got {getattr(self, k)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null (off), got {self.grad_clip}")
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError("train: set only one of 'epochs' and 'max_steps'")
        if self.epochs is None and self.max_steps is None:
            self.epochs = 50.0
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision must be one of auto, no, fp16, bf16; got '{self.mixed_precision}'")
        if int(self.collapse_check_steps) < 0:
            raise ConfigError(f"train.collapse_check_steps must be >= 0, got {self.collapse_check_steps}")
        for k in ("log_every", "keep_checkpoints", "collapse_patience"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if not self.checkpoint_every > 0:
            raise ConfigError(f"train.checkpoint_every must be > 0 epochs, got {self.checkpoint_every}")


COMPONENT_SECTIONS = {"task": "task", "model": "model", "dataset": "dataset", "optim": "optimizer",
                      "scheduler": "scheduler"}
"""Config section -> registry kind (validated in this order: the task decides what the model gets injected)."""

INJECTED = {
    "task": ("dataset",),
    "model": ("cond_dim", "spatial_dims", "out_dim"),
    "dataset": ("seed",),
    "optimizer": ("model",),
    "scheduler": ("optimizer", "total_steps"),
}
"""Arguments the program supplies (from the data or other components); a config may not set them. The model's
come from its task (``Task.model_arguments``); the ones listed here are those of the default task."""

DEFAULT_SECTIONS = {"task": {"type": "ensemble"}, "optim": {"type": "adam"}, "scheduler": {"type": "cosine"},
                    "train": {}, "test": {}}
DATACLASS_SECTIONS = {"train": TrainConfig, "test": None}
"""Sections holding plain keys; ``test`` is validated against the run's task's ``test_config`` dataclass
(e.g. tasks/ensemble/config.EnsembleTestConfig)."""


def injected_keys(kind: str, task_type: str = "ensemble") -> tuple:
    """Arguments of a component of ``kind`` the program supplies (the model's depend on the task)."""
    if kind == "model":
        return tuple(getattr(get("task", task_type), "model_arguments", INJECTED["model"]))
    return INJECTED.get(kind, ())


def test_config_class(task_type: str = "ensemble") -> type:
    """The dataclass of the ``test`` section's keys for a task type."""
    cls = getattr(get("task", task_type), "test_config", None)
    if cls is None:
        raise ConfigError(f"task '{task_type}' declares no test_config (the dataclass of its test section)")
    return cls


OTHER_KEYS = ("name", "description")


def _dataclass_keys(cls) -> Dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def validate_experiment(exp: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """Check an experiment dict and fill default sections. Returns a new dict.

    Raises:
        ConfigError naming the section/key for: unknown top-level section, missing ``model``/``dataset``,
        missing ``type``, unknown type (lists registered names), unknown or missing key, bad value.
    """
    loc = f" ({where})" if where else ""
    if not isinstance(exp, dict):
        raise ConfigError(f"config entry{loc} must be a mapping of sections, got {type(exp).__name__}")
    allowed = set(COMPONENT_SECTIONS) | set(DATACLASS_SECTIONS) | set(OTHER_KEYS)
    for key in exp:
        if key not in allowed:
            raise ConfigError(f"unknown section '{key}'{loc}; expected sections: {', '.join(sorted(allowed))}")
    out = copy.deepcopy(exp)
    for sec in ("model", "dataset"):
        if sec not in out:
            raise ConfigError(f"missing section '{sec}'{loc}")
    for sec, default in DEFAULT_SECTIONS.items():
        out.setdefault(sec, copy.deepcopy(default))
        if out[sec] is None:
            out[sec] = copy.deepcopy(default)
    task_type = out["task"].get("type") if isinstance(out["task"], dict) else None
    for sec, kind in COMPONENT_SECTIONS.items():
        body = out[sec]
        if not isinstance(body, dict):
            raise ConfigError(f"section '{sec}'{loc} must be a mapping, got {type(body).__name__}")
        if "type" not in body:
            raise ConfigError(f"missing key '{sec}.type'{loc}; registered {kind} types: {', '.join(names(kind))}")
        typ = body["type"]
        if not isinstance(typ, str):
            raise ConfigError(f"{sec}.type{loc} must be a string naming a registered {kind} type "
                              f"({', '.join(names(kind))}), got {show_value(typ)}")
        get(kind, typ)  # unknown type -> error listing the registered names
        injected = injected_keys(kind, task_type)
        keys = accepted_keys(kind, typ, injected)
        for k in body:
            if k == "type":
                continue
            if k in injected:
                raise ConfigError(f"key '{sec}.{k}'{loc} is set by the program for {kind} '{typ}'; remove it")
            if k not in keys:
                raise ConfigError(f"unknown key '{sec}.{k}'{loc} for {kind} type '{typ}'; "
                                  f"accepted keys: {', '.join(sorted(keys))}")
        for k, default in keys.items():
            if default is inspect.Parameter.empty and k not in body:
                raise ConfigError(f"missing key '{sec}.{k}'{loc}: required by {kind} type '{typ}'")
        out[sec] = check_component_values(sec, kind, typ, body, where, injected)
    from util.config.schema import check_spatial_axes  # per-axis model keys vs the data's axes, when known

    check_spatial_axes(out, where)
    for sec, cls in DATACLASS_SECTIONS.items():
        if sec == "test":
            cls = test_config_class(task_type)
        body = out[sec]
        if not isinstance(body, dict):
            raise ConfigError(f"section '{sec}'{loc} must be a mapping, got {type(body).__name__}")
        fields = _dataclass_keys(cls)
        for k in body:
            if k not in fields:
                raise ConfigError(f"unknown key '{sec}.{k}'{loc}; accepted keys: {', '.join(sorted(fields))}")
        try:
            inst = cls(**body)
        except ConfigError as e:
            raise ConfigError(f"{e}{loc}") from None
        except TypeError as e:
            raise ConfigError(f"section '{sec}'{loc}: {e}") from None
        out[sec] = {k: getattr(inst, k) for k in body}  # as checked (e.g. max_steps: 1e4 -> 10000)
    if out["train"].get("val_every_steps") is not None and not getattr(get("task", task_type), "has_validation",
                                                                        False):
        raise ConfigError(f"train.val_every_steps{loc}: task '{task_type}' has no validation split to score; "
                          f"remove the key")
    for key in ("name", "description"):
        if out.get(key) is not None and not isinstance(out[key], str):
            raise ConfigError(f"'{key}'{loc} must be a string, got {show_value(out[key])}")
    check_run_name(out.get("name"), "name", where)
    return out


def load_config(path: str, config_id: int = 0, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Load, select, override and validate one experiment.

    Returns:
        The validated experiment dict with every section present, plus ``_source`` = {file, config_id}.
    """
    entries = read_config_file(path)
    if not isinstance(config_id, int) or not 0 <= config_id < len(entries):
        raise ConfigError(f"config_id {config_id} out of range: '{path}' holds {len(entries)} config(s) "
                          f"(valid ids 0..{len(entries) - 1})")
    where = f"{path}, config_id {config_id}"
    if not isinstance(entries[config_id], dict):  # the entry's own error, with or without --set
        validate_experiment(entries[config_id], where)
    exp = apply_overrides(entries[config_id], overrides)
    exp = validate_experiment(exp, where)
    exp["_source"] = {"file": path, "config_id": config_id, "overrides": list(overrides or ())}
    return exp


def run_name(exp: Dict[str, Any]) -> str:
    """Run directory name: train.run_name, else the entry's name, else <file stem>_<config_id>."""
    tr = exp.get("train", {})
    if tr.get("run_name") is not None:
        return str(tr["run_name"])
    if exp.get("name") is not None:
        return str(exp["name"])
    src = exp.get("_source", {})
    stem = os.path.splitext(os.path.basename(src.get("file", "config")))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(src.get("file", "config"))))
    return f"{parent}_{stem}_{src.get('config_id', 0)}"


def section_kwargs(exp: Dict[str, Any], section: str) -> Dict[str, Any]:
    """The keys of a component section without ``type``."""
    return {k: v for k, v in exp[section].items() if k != "type"}
