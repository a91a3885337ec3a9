"""The one YAML reader of the project: config files, ``--set`` values, ``--test`` values and run files.

Every YAML text the program reads goes through :func:`yaml_load`, so ``1e-3`` is the float 0.001 (YAML 1.2)
wherever it is written (a config file, ``train.py --set optim.lr=1e-3``, ``test.py --test error_gain=1e-3``),
and a mapping that names a key twice is an error instead of PyYAML's silent last-one-wins.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Dict, List, Sequence, Tuple

import yaml

from util.registry import ConfigError

__all__ = ["yaml_load", "DuplicateKeyError", "parse_value", "read_yaml_file", "read_config_file", "apply_overrides",
           "parse_test_overrides"]


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


def parse_value(raw: str, what: str) -> Any:
    """A command-line value (``--set`` / ``--test``) read as YAML by :func:`yaml_load`; an empty value is null.

    Raises:
        ConfigError: ``"<what>: the value is not valid YAML (...)"``.
    """
    if not raw.strip():
        return None
    try:
        return yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: the value is not valid YAML ({e})") from None


def read_yaml_file(path: str, what: str = "file") -> Any:
    """Read one YAML file (UTF-8 text) by :func:`yaml_load`.

    Args:
        path: the file.
        what: how error messages name it (``"config file"``, ``"jobs file"``).

    Raises:
        ConfigError naming the file: a folder (a YAML file was expected), missing, not UTF-8 text (the byte
        position of the first bad byte, e.g. an image given as a config), not valid YAML, a duplicate key.
    """
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith((".yaml", ".yml")))[:3]
        hint = f" (e.g. {', '.join(os.path.join(path, n) for n in found)})" if found else ""
        raise ConfigError(f"{what} '{path}' is a folder; expected a YAML file{hint}")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} '{path}' not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte position "
                          f"{e.start}, line {line}); expected a YAML file in UTF-8") from None
    with open(path, encoding="utf-8") as f:
        try:
            return yaml_load(f)
        except DuplicateKeyError as e:
            raise ConfigError(f"{what} '{path}': {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{what} '{path}' is not valid YAML: {e}") from None


def read_config_file(path: str) -> List[Dict[str, Any]]:
    """Read a YAML config file: a list of experiment dicts (anchors and merge keys resolved).

    Raises:
        ConfigError naming the file (see :func:`read_yaml_file`), or when it does not hold a non-empty list.
    """
    data = read_yaml_file(path, "config file")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        got = "nothing" if data is None or data == [] else f"a {type(data).__name__}"
        raise ConfigError(f"config file '{path}' must hold a non-empty YAML list of experiments (got {got}); "
                          f"expected a YAML file like configs/demo/drrnet.yaml")
    return data


def _parse_override(item: str) -> Tuple[List[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected section.key=value")
    path, raw = item.split("=", 1)
    parts = path.strip().split(".")
    value = parse_value(raw, f"--set '{item}'")
    if not all(parts) or (len(parts) < 2 and not isinstance(value, dict)):
        raise ConfigError(f"--set '{item}': expected section.key=value (e.g. train.max_steps=10) "
                          f"or section={{key: value, ...}} to replace a whole section")
    return parts, value


def apply_overrides(exp: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key[.sub]=value`` overrides (values read by :func:`yaml_load`) to a copy of ``exp``.

    ``section={...}`` (a YAML mapping) replaces a whole section. The full validation runs afterwards in
    ``validate_experiment``, so an unknown key is still an error.
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


def parse_test_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """test.py ``--test KEY=VALUE`` strings (``test.`` prefix optional) -> {key: value read by :func:`yaml_load`}.

    Raises:
        ConfigError: an item is not KEY=VALUE with a plain key, or its value is not valid YAML.
    """
    out = {}
    for item in items or ():
        key, eq, val = item.partition("=")
        key = key.strip()
        key = key[len("test."):] if key.startswith("test.") else key
        if not eq or not key or "." in key:
            raise ConfigError(f"--test {item!r}: expected KEY=VALUE with a key of the test section (e.g. "
                              f"--test max_tiles=32)")
        out[key] = parse_value(val, f"--test {item!r}")
    return out
