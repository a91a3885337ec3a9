"""Experiment configuration: YAML lists of experiments, validation and command-line overrides.

A config file is a YAML list; each entry is one experiment::

    - name: drrnet_demo            # optional: run name (default: <file stem>_<config_id>)
      model:     {type: drrnet, ...}      # keyword arguments of the registered model
      dataset:   {type: demo, ...}        # keyword arguments of the registered dataset
      optim:     {type: adam, lr: 1e-4}   # optional (defaults below)
      scheduler: {type: cosine}           # optional
      train:     {epochs: 50}             # optional, keys of TrainConfig
      test:      {chunk_size: 262144}     # optional, keys of TestConfig

YAML anchors (``&base`` / ``*base``) and merge keys (``<<: *base``) work, so experiments can share sections.
``--config FILE --config_id N`` selects entry N (0-based); ``--set section.key=value`` (repeatable) overrides a
key, the value parsed as YAML (``--set train.max_steps=10 --set dataset.tau_x=[0.01,0.01,0.01]``);
``--set 'dataset={type: ensemble, data_dir: ...}'`` replaces a whole section.
Every key is checked when the config is loaded: unknown section, unknown or missing key, unknown type; the
error names the file, the config id, the section and the key.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from util.registry import ConfigError, accepted_keys, get, names

__all__ = ["TrainConfig", "TestConfig", "load_config", "apply_overrides", "validate_experiment", "ConfigError",
           "COMPONENT_SECTIONS", "INJECTED", "DEFAULT_SECTIONS", "yaml_load"]


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``1e-3`` / ``5E+4`` (no dot) as floats, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``) and ``1e-3`` is the string "1e-3".
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def yaml_load(stream: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats (``1e-3`` -> 0.001); used for every config and run file."""
    return yaml.load(stream, Loader=_Loader)


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
            fp16 is refused on CPU.
        grad_clip: clip the global gradient norm to this value (None: off).
        timing_steps: number of steady steps (after 10 warm-up steps) whose mean time gives the
            paper-convention training-time estimate (spec 5.6): mean step time x total steps.
        collapse_check_steps: during the first this many steps, stop training with an error when the model
            has collapsed (constant output over the batch, or every gradient exactly 0) at
            ``collapse_patience`` consecutive log intervals. 0 = off.
        collapse_patience: consecutive log intervals (of ``log_every`` steps) a collapse must persist.
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

    def __post_init__(self):
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


@dataclass
class TestConfig:
    """Keys of the ``test`` section (what test.py evaluates and writes).

    Attributes:
        chunk_size: points per forward call when reconstructing a full field.
        splits: which members to reconstruct: any of "test" (unseen) and "train".
        resolutions: "full" (original resolution) and/or "train" (the training resolution; differs from
            full only in the spatio-conditional task, dataset.downsample > 1).
        ssim: compute 3D/2D SSIM (Gaussian window, data range 1).
        ssim_win_size: SSIM window size (odd).
        reference: also score the reference predictors (mean field, nearest member, IDW).
        ref_k: neighbours of the IDW reference predictor.
        ref_power: distance power of the IDW reference predictor (weights 1 / d^power).
        dump_members: cond rows whose predicted and true volumes are written (.npy, .vti, PNG slices).
        dump_vti: write .vti files for dumped members.
        dump_png: write PNG middle slices (prediction, truth, error) for dumped members.
    """

    chunk_size: int = 262144
    splits: List[str] = field(default_factory=lambda: ["test", "train"])
    resolutions: List[str] = field(default_factory=lambda: ["full"])
    ssim: bool = True
    ssim_win_size: int = 11
    reference: bool = True
    ref_k: int = 8
    ref_power: float = 2.0
    dump_members: List[int] = field(default_factory=list)
    dump_vti: bool = True
    dump_png: bool = True

    def __post_init__(self):
        if int(self.chunk_size) < 1:
            raise ConfigError(f"test.chunk_size must be >= 1, got {self.chunk_size}")
        for s in self.splits:
            if s not in ("test", "train"):
                raise ConfigError(f"test.splits: unknown split '{s}', expected 'test' and/or 'train'")
        for r in self.resolutions:
            if r not in ("full", "train"):
                raise ConfigError(f"test.resolutions: unknown resolution '{r}', expected 'full' and/or 'train'")
        if self.ssim_win_size < 3 or self.ssim_win_size % 2 == 0:
            raise ConfigError(f"test.ssim_win_size must be an odd number >= 3, got {self.ssim_win_size}")
        if self.ref_k < 1:
            raise ConfigError(f"test.ref_k must be >= 1, got {self.ref_k}")


COMPONENT_SECTIONS = {"model": "model", "dataset": "dataset", "optim": "optimizer", "scheduler": "scheduler"}
"""Config section -> registry kind."""

INJECTED = {
    "model": ("cond_dim", "spatial_dims"),
    "dataset": ("seed",),
    "optimizer": ("model",),
    "scheduler": ("optimizer", "total_steps"),
}
"""Arguments the program supplies (from the data or other components); a config may not set them."""

DEFAULT_SECTIONS = {"optim": {"type": "adam"}, "scheduler": {"type": "cosine"}, "train": {}, "test": {}}
DATACLASS_SECTIONS = {"train": TrainConfig, "test": TestConfig}
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
    for sec, kind in COMPONENT_SECTIONS.items():
        body = out[sec]
        if not isinstance(body, dict):
            raise ConfigError(f"section '{sec}'{loc} must be a mapping, got {type(body).__name__}")
        if "type" not in body:
            raise ConfigError(f"missing key '{sec}.type'{loc}; registered {kind} types: {', '.join(names(kind))}")
        typ = body["type"]
        get(kind, typ)  # unknown type -> error listing the registered names
        keys = accepted_keys(kind, typ, INJECTED.get(kind, ()))
        for k in body:
            if k == "type":
                continue
            if k in INJECTED.get(kind, ()):
                raise ConfigError(f"key '{sec}.{k}'{loc} is set by the program for {kind} '{typ}'; remove it")
            if k not in keys:
                raise ConfigError(f"unknown key '{sec}.{k}'{loc} for {kind} type '{typ}'; "
                                  f"accepted keys: {', '.join(sorted(keys))}")
        import inspect

        for k, default in keys.items():
            if default is inspect.Parameter.empty and k not in body:
                raise ConfigError(f"missing key '{sec}.{k}'{loc}: required by {kind} type '{typ}'")
    for sec, cls in DATACLASS_SECTIONS.items():
        body = out[sec]
        if not isinstance(body, dict):
            raise ConfigError(f"section '{sec}'{loc} must be a mapping, got {type(body).__name__}")
        fields = _dataclass_keys(cls)
        for k in body:
            if k not in fields:
                raise ConfigError(f"unknown key '{sec}.{k}'{loc}; accepted keys: {', '.join(sorted(fields))}")
        try:
            cls(**body)
        except ConfigError as e:
            raise ConfigError(f"{e}{loc}") from None
        except TypeError as e:
            raise ConfigError(f"section '{sec}'{loc}: {e}") from None
    return out


def _parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected section.key=value")
    path, raw = item.split("=", 1)
    parts = path.strip().split(".")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set '{item}': value is not valid YAML ({e})") from None
    if not all(parts) or (len(parts) < 2 and not isinstance(value, dict)):
        raise ConfigError(f"--set '{item}': expected section.key=value (e.g. train.max_steps=10) "
                          f"or section={{key: value, ...}} to replace a whole section")
    return parts, value


def apply_overrides(exp: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key[.sub]=value`` overrides (values parsed as YAML) to a copy of ``exp``.

    ``section={...}`` (a YAML mapping) replaces a whole section. The full validation runs afterwards in
    :func:`validate_experiment`, so an unknown key is still an error.
    """
    out = copy.deepcopy(exp)
    for item in overrides or ():
        parts, value = _parse_override(item)
        node = out
        for p in parts[:-1]:
            if p not in node or node[p] is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set '{item}': '{p}' is not a section or mapping")
            node = node[p]
        node[parts[-1]] = value
    return out


def read_config_file(path: str) -> List[Dict[str, Any]]:
    """Read a YAML config file: a list of experiment dicts (anchors and merge keys resolved)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found")
    with open(path) as f:
        try:
            data = yaml_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"config file '{path}' must hold a non-empty YAML list of experiments")
    return data


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
    exp = apply_overrides(entries[config_id], overrides)
    exp = validate_experiment(exp, where)
    exp["_source"] = {"file": path, "config_id": config_id, "overrides": list(overrides or ())}
    return exp


def run_name(exp: Dict[str, Any]) -> str:
    """Run directory name: train.run_name, else the entry's name, else <file stem>_<config_id>."""
    tr = exp.get("train", {})
    if tr.get("run_name"):
        return str(tr["run_name"])
    if exp.get("name"):
        return str(exp["name"])
    src = exp.get("_source", {})
    stem = os.path.splitext(os.path.basename(src.get("file", "config")))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(src.get("file", "config"))))
    return f"{parent}_{stem}_{src.get('config_id', 0)}"


def section_kwargs(exp: Dict[str, Any], section: str) -> Dict[str, Any]:
    """The keys of a component section without ``type``."""
    return {k: v for k, v in exp[section].items() if k != "type"}
