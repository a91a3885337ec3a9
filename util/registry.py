"""One registry for every configurable component.

A component is a class or function registered under a *kind* and a *name*::

    @register("model", "drrnet")
    class DRRNet(nn.Module):
        def __init__(self, cond_dim: int, spatial_dims: int = 3, ...): ...

Its keyword arguments *are* its config keys: ``build("model", "drrnet", section="model",
cond_dim=6)`` checks the given keys against the signature, so a misspelt or missing key is an
error that names the key, the config section and the accepted keys, and a default in the signature
is the documented default of the config key. Arguments named in ``injected`` are supplied by the
program (e.g. ``params`` of an optimizer, ``cond_dim`` of a model, read from the data) and may not
be set from a config file.

Kinds used by the project: ``model``, ``dataset``, ``task``, ``optimizer``, ``scheduler``.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Iterable, Optional

__all__ = ["register", "build", "get", "names", "accepted_keys", "ConfigError"]

_REGISTRY: Dict[str, Dict[str, Callable]] = {}


class ConfigError(ValueError):
    """A configuration problem: unknown type, unknown/missing key, bad value."""


def register(kind: str, name: str, forwards: Optional[Callable] = None):
    """Decorator filing a class or function under ``(kind, name)``; re-registering a name is an error.

    ``forwards``: for a factory function taking ``**kwargs`` that it passes on to another class, that
    class; keys not in the factory's own signature are then validated against the class's signature.
    """

    def deco(obj):
        if forwards is not None:
            obj.__config_forwards__ = forwards
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} '{name}' is already registered ({table[name]!r})")
        table[name] = obj
        return obj

    return deco


PLUGIN_MODULES: Dict[str, tuple] = {
    "model": ("models",),
    "dataset": ("datasets",),
    "task": ("tasks",),
    "optimizer": ("util.optim",),
    "scheduler": ("util.optim",),
}
"""Kind -> the modules whose import registers its components. This table is the registry's only knowledge of
the packages that fill it (by name, imported on first lookup); nothing else in util/ imports models/, datasets/
or tasks/."""


def _ensure_imported(kind: str) -> None:
    # Importing the modules runs their @register decorators.
    for module in PLUGIN_MODULES.get(kind, ()):
        importlib.import_module(module)


def names(kind: str) -> list:
    """Sorted registered names of a kind."""
    _ensure_imported(kind)
    return sorted(_REGISTRY.get(kind, {}))


def get(kind: str, name: str) -> Callable:
    """The registered callable, or a ConfigError listing the registered names."""
    _ensure_imported(kind)
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise ConfigError(
            f"unknown {kind} type '{name}'; registered {kind} types: {', '.join(sorted(table)) or '(none)'}"
        )
    return table[name]


def _signature(obj: Callable) -> inspect.Signature:
    return inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)


def accepted_keys(kind: str, name: str, injected: Iterable[str] = ()) -> Dict[str, Any]:
    """Config keys of a component: {key: default or inspect.Parameter.empty}."""
    obj = get(kind, name)
    out = {}
    for target in (obj, getattr(obj, "__config_forwards__", None)):
        if target is None:
            continue
        for p in _signature(target).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in injected:
                continue
            out.setdefault(p.name, p.default)
    return out


def build(kind: str, name: str, *args, section: Optional[str] = None, injected: Dict[str, Any] = None,
          where: str = "", **cfg):
    """Instantiate ``(kind, name)`` from config keys ``cfg`` plus program-supplied ``injected`` kwargs.

    Args:
        kind, name: registry entry.
        *args: positional arguments supplied by the program (e.g. optimizer parameters).
        section: config section the keys came from, used in error messages (default: kind).
        injected: keyword arguments supplied by the program; a config may not set them.
        where: extra location text for errors (e.g. "configs/demo/drrnet.yaml, config_id 0").
        **cfg: keys from the config section (without ``type``).
    """
    obj = get(kind, name)
    injected = dict(injected or {})
    section = section or kind
    loc = f" ({where})" if where else ""
    sig = _signature(obj)
    params = {p.name: p for p in sig.parameters.values() if p.name != "self"}
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values()) and not hasattr(obj, "__config_forwards__")
    allowed = accepted_keys(kind, name, injected)
    for key in cfg:
        if key in injected:
            raise ConfigError(f"{section}.{key}{loc}: set by the program for {kind} '{name}', remove it from the config")
        if key not in allowed and not has_var_kw:
            raise ConfigError(
                f"unknown key '{section}.{key}'{loc} for {kind} type '{name}'; accepted keys: {', '.join(sorted(allowed))}"
            )
    n_pos = len(args)
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n_pos]
    for key, p in allowed.items():
        if p is inspect.Parameter.empty and key not in cfg and key not in {q.name for q in positional}:
            raise ConfigError(f"missing key '{section}.{key}'{loc}: required by {kind} type '{name}'")
    return obj(*args, **injected, **cfg)
