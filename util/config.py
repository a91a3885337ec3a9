"""Experiment configuration: YAML lists of experiments, validation and command-line overrides.

A config file is a YAML list; each entry is one experiment::

    - name: drrnet_demo            # optional: run name (default: <file stem>_<config_id>)
      model:     {type: drrnet, ...}      # keyword arguments of the registered model
      dataset:   {type: demo, ...}        # keyword arguments of the registered dataset
      optim:     {type: adam, lr: 1e-4}   # optional (defaults below)
      scheduler: {type: cosine}           # optional
      train:     {epochs: 50}             # optional, keys of TrainConfig
      test:      {chunk_size: 262144}     # optional, keys of the task's test_config (ensemble: EnsembleTestConfig)

YAML anchors (``&base`` / ``*base``) and merge keys (``<<: *base``) work, so experiments can share sections.
``--config FILE --config_id N`` selects entry N (0-based); ``--set section.key=value`` (repeatable) overrides a
key, the value parsed as YAML (``--set train.max_steps=10 --set dataset.tau_x=[0.01,0.01,0.01]``);
``--set 'dataset={type: ensemble, data_dir: ...}'`` replaces a whole section.
Every key is checked when the config is loaded: unknown section, unknown or missing key, unknown type; the
error names the file, the config id, the section and the key.
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
import inspect
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from util.registry import ConfigError, accepted_keys, get, names

__all__ = ["TrainConfig", "load_config", "apply_overrides", "validate_experiment", "ConfigError",
           "COMPONENT_SECTIONS", "INJECTED", "DEFAULT_SECTIONS", "yaml_load"]


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``1e-3`` / ``5E+4`` (no dot) as floats, as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``) and ``1e-3`` is the string "1e-3".
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names the same key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: Any, line: int, first_line: int):
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(f"duplicate key '{key}' on line {line} (already set on line {first_line} of the same "
                         f"mapping); remove one of them")


def _check_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    seen: Dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden by explicit keys
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        try:
            first = seen.get(key)
        except TypeError:  # unhashable key: PyYAML reports it itself
            continue
        line = key_node.start_mark.line + 1
        if first is not None:
            raise DuplicateKeyError(key, line, first)
        seen[key] = line


def _construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
        _check_duplicate_keys(self, node)
    return yaml.SafeLoader.construct_mapping(self, node, deep=deep)


_Loader.construct_mapping = _construct_mapping


def yaml_load(stream: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats (``1e-3`` -> 0.001); used for every config and run file.

    A mapping that repeats a key raises :class:`DuplicateKeyError` (a ``yaml.YAMLError``) naming the key and line.
    """
    return yaml.load(stream, Loader=_Loader)


# ---------------------------------------------------------------------------------------------- value checks
# Every config value is checked against the type annotation of the key (the registered component's signature, or
# the TrainConfig field or the task's test_config) and against the range rules below, when the config is loaded: before any
# data is read or any model is built.


class _Mismatch(Exception):
    pass


_NONE = type(None)
_SEQUENCE_ORIGINS = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPING_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans (true / false)"}


def _is_union(tp) -> bool:
    return typing.get_origin(tp) is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType))


def describe_type(tp) -> str:
    """Plain-words description of a type annotation ("an integer, a list of integers or null")."""
    if tp is Any or tp is inspect.Parameter.empty:
        return "any value"
    if _is_union(tp):
        parts = [describe_type(a) for a in typing.get_args(tp) if a is not _NONE]
        if _NONE in typing.get_args(tp):
            parts.append("null")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if tp is _NONE:
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (list, tuple) or origin in _SEQUENCE_ORIGINS:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
        elem = args[0] if args else Any
        if elem in _PLURAL:
            return f"a list of {_PLURAL[elem]}"
        return "a list" if elem is Any else f"a list (each entry {describe_type(elem)})"
    if tp is dict or origin in _MAPPING_ORIGINS:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _conform(value, tp):
    """``value`` if it fits the annotation ``tp`` (an integral float becomes an int for ``int``); else _Mismatch."""
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, (str, typing.TypeVar)):
        return value
    if _is_union(tp):
        for alt in sorted(typing.get_args(tp), key=lambda a: a is not _NONE):
            try:
                return _conform(value, alt)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is _NONE:
        if value is None:
            return None
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 1e4 in YAML is a float
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (list, tuple) or origin in _SEQUENCE_ORIGINS:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return [_conform(v, a) for v, a in zip(value, args)]
        elem = args[0] if args else Any
        return [_conform(v, elem) for v in value]
    if tp is dict or origin in _MAPPING_ORIGINS:
        if not isinstance(value, dict):
            raise _Mismatch
        if len(args) == 2:
            return {_conform(k, args[0]): _conform(v, args[1]) for k, v in value.items()}
        return value
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    return value  # a class the config cannot express (e.g. program-supplied objects): not checked


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def check_value(value, annotation, key: str, default=inspect.Parameter.empty, where: str = ""):
    """Check one config value against its type annotation; returns it (integral floats made ints for ints).

    A null value is accepted where the default is null. An empty list is an error (no config key is a list that
    may be empty, except the ones in ``EMPTY_LIST_OK``).

    Raises:
        ConfigError: ``"<key> must be <type>, got <value>"``.
    """
    loc = f" ({where})" if where else ""
    if value is None and default is None:
        return None
    try:
        out = _conform(value, annotation)
    except _Mismatch:
        raise ConfigError(f"{key}{loc} must be {describe_type(annotation)}, got {_show(value)}") from None
    if isinstance(out, list) and not out and key not in EMPTY_LIST_OK:
        raise ConfigError(f"{key}{loc} must not be an empty list")
    return out


EMPTY_LIST_OK = {"test.dump_members", "test.ptq_bits", "test.cd_steps", "test.baselines", "test.isovalues"}
"""Config keys whose value may be an empty list."""


def _numbers(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _at_least(lo):
    def rule(value):
        if any(v < lo for v in _numbers(value)):
            return f"must be >= {lo}" + (" (every entry)" if isinstance(value, (list, tuple)) else "")
    return rule


def _above(lo):
    def rule(value):
        if any(not v > lo for v in _numbers(value)):
            return f"must be > {lo}" + (" (every entry)" if isinstance(value, (list, tuple)) else "")
    return rule


def _in_range(lo, hi, hi_inclusive=False):
    def rule(value):
        if any(not (lo <= v and (v <= hi if hi_inclusive else v < hi)) for v in _numbers(value)):
            return f"must be in [{lo}, {hi}{']' if hi_inclusive else ')'}" + \
                (" (every entry)" if isinstance(value, (list, tuple)) else "")
    return rule


def _one_of(*allowed):
    def rule(value):
        if value not in allowed:
            return f"must be one of {', '.join(map(str, allowed))}"
    return rule


def _number_or_auto(value):
    if isinstance(value, str) and value != "auto":
        return "must be a number, 'auto' or null"


def _betas(value):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return "must be a list of two numbers [beta1, beta2]"
    return _in_range(0, 1)(value)


def _low_high(value):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return "must be a list of two numbers [low, high]"
    if not value[0] <= value[1]:
        return "must be [low, high] with low <= high"


_POS = _at_least(1)
_NONNEG = _at_least(0)
_VERTICES = _at_least(2)  # a grid axis or line needs >= 2 vertices to interpolate

RANGE_RULES: Dict[str, Dict[str, Any]] = {
    "model": dict(init_output_mean=_number_or_auto),
    "dataset": dict(cond_batch=_POS, spatial_log2batch=_in_range(0, 30, hi_inclusive=True), impsmp_bins=_POS,
                    impsmp_cluster_size=_POS, vp_k=_POS, vp_power=_above(0), downsample=_POS, dims=_POS,
                    sigma_x=_NONNEG, tau_x=_NONNEG, sigma_c=_NONNEG, tau_c=_NONNEG),
    "optim": dict(lr=_above(0), eps=_NONNEG, weight_decay=_NONNEG, betas=_betas),
    "scheduler": dict(warmup_steps=_NONNEG, eta_min=_NONNEG),
}
"""Range rules of component keys that mean the same for every type of a section: {section: {key: rule}}."""

TYPE_RANGE_RULES: Dict[tuple, Dict[str, Any]] = {}
"""Range rules of one component type kept here: {(section, type): {key: rule}} (checked after the section's
rules). Components declare their own as a class (or function) attribute ``config_rules`` ({key: rule}; a rule
returns None or what the value must be, built with the public helpers below), checked last."""

# public rule helpers for components' ``config_rules``
at_least, above, in_range, one_of, low_high = _at_least, _above, _in_range, _one_of, _low_high
POSITIVE, NON_NEGATIVE, VERTICES = _POS, _NONNEG, _VERTICES


def _annotations(target) -> Dict[str, Any]:
    """{parameter: type annotation} of a registered callable (string annotations evaluated; unknown ones skipped)."""
    func = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        hints = {}
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return hints
    namespace = dict(vars(typing))
    namespace.update(getattr(sys.modules.get(getattr(target, "__module__", None)), "__dict__", {}))
    for p in params:
        if p.name in hints or p.annotation is inspect.Parameter.empty:
            continue
        ann = p.annotation
        if isinstance(ann, str):  # e.g. a signature copied from a module with postponed annotations
            try:
                ann = eval(ann, namespace)  # noqa: S307 (annotation text of our own registered code)
            except Exception:
                continue
        hints[p.name] = ann
    return hints


def component_types(kind: str, name: str) -> Dict[str, Any]:
    """{config key: type annotation} of a registered component (its own signature, then what it forwards to)."""
    obj = get(kind, name)
    out: Dict[str, Any] = {}
    for target in (obj, getattr(obj, "__config_forwards__", None)):
        if target is not None:
            for k, v in _annotations(target).items():
                out.setdefault(k, v)
    out.pop("return", None)
    return out


def _check_range(rules: Dict[str, Any], section: str, key: str, value, loc: str) -> None:
    rule = rules.get(key)
    if rule is None or value is None:
        return
    problem = rule(value)
    if problem:
        raise ConfigError(f"{section}.{key}{loc} {problem}, got {_show(value)}")


def check_component_values(section: str, kind: str, typ: str, body: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """Type- and range-check the keys of a component section; returns the section with integral floats as ints."""
    loc = f" ({where})" if where else ""
    hints = component_types(kind, typ)
    defaults = accepted_keys(kind, typ, INJECTED.get(kind, ()))
    out = dict(body)
    for key, value in body.items():
        if key == "type":
            continue
        if key in hints:
            value = check_value(value, hints[key], f"{section}.{key}", defaults.get(key, inspect.Parameter.empty),
                                where)
        for rules in (RANGE_RULES.get(section, {}), TYPE_RANGE_RULES.get((section, typ), {}),
                      getattr(get(kind, typ), "config_rules", None) or {}):
            _check_range(rules, section, key, value, loc)
        out[key] = value
    return out


def check_run_name(value, key: str, where: str = "") -> None:
    """A run name must be a plain folder name: a non-empty string other than '.' / '..' without path separators."""
    loc = f" ({where})" if where else ""
    if value is None:
        return
    bad = None
    if not isinstance(value, str):
        bad = "must be a string (quote it in YAML)"
    elif not value.strip():
        bad = "must not be empty"
    elif value.strip() in (".", ".."):
        bad = "must not be '.' or '..' (it would name the log folder or its parent)"
    elif "/" in value or "\\" in value or (os.altsep and os.altsep in value) or "\0" in value:
        bad = "must be a plain folder name without path separators ('/' or '\\\\'); use train.log_dir for the folder"
    if bad:
        raise ConfigError(f"{key}{loc} {bad}, got {_show(value)}")


def _check_dataclass_fields(obj, section: str) -> None:
    """Type-check every field of a TrainConfig or test_config instance (integral floats for int fields made ints)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
        setattr(obj, f.name, check_value(value, hints[f.name], f"{section}.{f.name}", default))


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
            fp16 is refused on CPU.
        grad_clip: clip the global gradient norm to this value (None: off).
        timing_steps: number of steady steps (after 10 warm-up steps) whose mean time gives the
            paper-convention training-time estimate (spec 5.6): mean step time x total steps.
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
        _check_dataclass_fields(self, "train")
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
                              f"({', '.join(names(kind))}), got {_show(typ)}")
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
        import inspect

        for k, default in keys.items():
            if default is inspect.Parameter.empty and k not in body:
                raise ConfigError(f"missing key '{sec}.{k}'{loc}: required by {kind} type '{typ}'")
        out[sec] = check_component_values(sec, kind, typ, body, where)
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
            raise ConfigError(f"'{key}'{loc} must be a string, got {_show(out[key])}")
    check_run_name(out.get("name"), "name", where)
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
        except DuplicateKeyError as e:
            raise ConfigError(f"config file '{path}': {e}") from None
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
    if tr.get("run_name") is not None:
        check_run_name(tr["run_name"], "train.run_name")
        return str(tr["run_name"])
    if exp.get("name") is not None:
        check_run_name(exp["name"], "name")
        return str(exp["name"])
    src = exp.get("_source", {})
    stem = os.path.splitext(os.path.basename(src.get("file", "config")))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(src.get("file", "config"))))
    return f"{parent}_{stem}_{src.get('config_id', 0)}"


def section_kwargs(exp: Dict[str, Any], section: str) -> Dict[str, Any]:
    """The keys of a component section without ``type``."""
    return {k: v for k, v in exp[section].items() if k != "type"}
