"""Config value checks: type annotations, range rules and the checks of dataclass sections.

Every config value is checked against the type annotation of its key (the registered component's signature, the
TrainConfig field or the task's test_config) and against the range rules below when the config is loaded, before
any data is read or any model is built. Each rule lives in one place: a rule that means the same for every type
of a section in :data:`RANGE_RULES`; a rule of one component in its ``config_rules`` attribute; a rule of a
dataclass section (``train``, ``test``) in the dataclass's ``__post_init__``.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import os
import sys
import types
import typing
from typing import Any, Dict, Iterable

from util.registry import ConfigError, accepted_keys, get

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


def show_value(value) -> str:
    """A config value for an error message, in YAML words (null, true / false; else its repr)."""
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
        raise ConfigError(f"{key}{loc} must be {describe_type(annotation)}, got {show_value(value)}") from None
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


def _axes_of(entry):
    """Axes a per-axis resolution entry names: None for an int (any number of axes), else its length."""
    return None if isinstance(entry, (int, float)) and not isinstance(entry, bool) else len(entry)


def _per_axis_entry(value):
    """A resolution of a spatial grid: an int (every axis) or one value per spatial axis (2 or 3)."""
    n = _axes_of(value)
    if n is not None and n not in (2, 3):
        return (f"has {n} value{'s' if n != 1 else ''}; it must be an integer or one value per spatial axis (2 or "
                f"3 values, array order)")


def _per_axis_levels(value):
    """Resolutions of several grid levels: each entry an int or 2 or 3 values, and the per-axis entries agree on
    the number of spatial axes (a field has one)."""
    if not isinstance(value, (list, tuple)):
        return None
    for i, entry in enumerate(value):
        problem = _per_axis_entry(entry)
        if problem:
            return f"entry {i} ({show_value(entry)}) {problem}"
    axes = {_axes_of(e) for e in value} - {None}
    if len(axes) > 1:
        return (f"mixes entries of {' and '.join(str(a) for a in sorted(axes))} spatial axes (a field has one "
                f"number of axes)")


SPATIAL_AXIS_KEYS: Dict[str, str] = {"spatial_resolutions": "levels", "ssr_resolution": "one"}
"""Model keys whose per-axis entries are one value per spatial axis of the data ("levels": a list of such entries,
one per grid level; "one": a single entry). Checked against the data's number of spatial axes at config load when
the dataset section tells it (:func:`check_spatial_axes`)."""


def check_spatial_axes(exp: Dict[str, Any], where: str = "") -> None:
    """ConfigError when a per-axis model resolution (:data:`SPATIAL_AXIS_KEYS`) has another number of values than
    the data has spatial axes, where the dataset section alone tells that number (the registered dataset's
    ``config_spatial_dims(section)``, e.g. the demo's ``spatial_dims``, or ``dims`` of an ensemble); without it,
    the model checks its resolutions when it is built."""
    model, data = exp.get("model") or {}, exp.get("dataset") or {}
    if not any(k in model for k in SPATIAL_AXIS_KEYS) or not isinstance(data.get("type"), str):
        return
    of = getattr(get("dataset", data["type"]), "config_spatial_dims", None)
    dims = of(data) if of is not None else None
    if dims is None:
        return
    loc = f" ({where})" if where else ""
    for key, form in SPATIAL_AXIS_KEYS.items():
        value = model.get(key)
        if value is None:
            continue
        entries = list(value) if form == "levels" and isinstance(value, (list, tuple)) else [value]
        for i, entry in enumerate(entries):
            n = _axes_of(entry)
            if n is not None and n != dims:
                at = f"entry {i} ({show_value(entry)})" if form == "levels" else show_value(entry)
                raise ConfigError(f"model.{key}{loc}: {at} has {n} values, but the data of dataset type "
                                  f"'{data['type']}' has {dims} spatial axes; give an integer or {dims} values "
                                  f"(array order), got {show_value(value)}")


_POS = _at_least(1)
_NONNEG = _at_least(0)
_VERTICES = _at_least(2)  # a grid axis or line needs >= 2 vertices to interpolate

RANGE_RULES: Dict[str, Dict[str, Any]] = {
    "model": dict(init_output_mean=_number_or_auto, spatial_resolutions=_per_axis_levels,
                  ssr_resolution=_per_axis_entry),
    "dataset": dict(cond_batch=_POS, spatial_log2batch=_in_range(0, 30, hi_inclusive=True), impsmp_bins=_POS,
                    impsmp_cluster_size=_POS, vp_k=_POS, vp_power=_above(0), downsample=_POS, dims=_POS,
                    sigma_x=_NONNEG, tau_x=_NONNEG, sigma_c=_NONNEG, tau_c=_NONNEG),
    "optim": dict(lr=_above(0), eps=_NONNEG, weight_decay=_NONNEG, betas=_betas),
    "scheduler": dict(warmup_steps=_NONNEG, eta_min=_NONNEG),
}
"""Range rules of component keys that mean the same for every type of a section: {section: {key: rule}}.
A component declares the rules of its own keys as a class (or function) attribute ``config_rules`` ({key: rule};
a rule returns None or what the value must be, built with the public helpers below), checked after these."""

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
        raise ConfigError(f"{section}.{key}{loc} {problem}, got {show_value(value)}")


def check_component_values(section: str, kind: str, typ: str, body: Dict[str, Any], where: str = "",
                           injected: Iterable[str] = ()) -> Dict[str, Any]:
    """Type- and range-check the keys of a component section; returns the section with integral floats as ints.

    ``injected``: the component's program-supplied arguments (not config keys)."""
    loc = f" ({where})" if where else ""
    hints = component_types(kind, typ)
    defaults = accepted_keys(kind, typ, tuple(injected))
    out = dict(body)
    for key, value in body.items():
        if key == "type":
            continue
        if key in hints:
            value = check_value(value, hints[key], f"{section}.{key}", defaults.get(key, inspect.Parameter.empty),
                                where)
        for rules in (RANGE_RULES.get(section, {}), getattr(get(kind, typ), "config_rules", None) or {}):
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
        raise ConfigError(f"{key}{loc} {bad}, got {show_value(value)}")


def check_dataclass_fields(obj, section: str) -> None:
    """Type-check every field of a TrainConfig or test_config instance (integral floats for int fields made ints)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
        setattr(obj, f.name, check_value(value, hints[f.name], f"{section}.{f.name}", default))
