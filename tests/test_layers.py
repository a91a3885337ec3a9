"""The import graph respects the layers of docs/design.md: util/ (lowest) <- rendering/ <- datasets/, models/ <-
tasks/ <- entry scripts and benchmarks/.

Every import of every .py file of the repository is read with ``ast`` (imports inside functions and classes
included, relative imports resolved, ``importlib.import_module("literal")`` / ``__import__("literal")`` counted
as imports); nothing is imported or run. Rules:

- util/ never imports tasks/, models/, datasets/, rendering/, benchmarks/ or an entry script. The registry's
  ``PLUGIN_MODULES`` names the plugin packages as strings and imports them by a variable name on first lookup,
  which is not an import of the source (the one exception by design).
- rendering/ imports only util/, itself, torch, numpy, the standard library and the optional nerfacc (its CUDA
  backend, rendering/nerfacc_backend.py).
- datasets/ and models/ never import tasks/, benchmarks/ or an entry script.
- tasks/ never imports benchmarks/ or an entry script.
- nothing below the entry scripts imports one (a .py file at the repository root: train.py, test.py, ...); entry
  scripts may import each other (train_mlp_nerf.py and train_ngp_nerf_occ.py are train.py under the reference's
  command names) and tests/ runs their functions to test them.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Iterator, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_SCRIPTS = sorted(os.path.splitext(n)[0] for n in os.listdir(ROOT)
                       if n.endswith(".py") and os.path.isfile(os.path.join(ROOT, n)))
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

#: package -> project packages it must not import
FORBIDDEN = {
    "util": {"tasks", "models", "datasets", "rendering", "benchmarks"},
    "rendering": {"tasks", "models", "datasets", "benchmarks"},
    "datasets": {"tasks", "benchmarks"},
    "models": {"tasks", "benchmarks"},
    "tasks": {"benchmarks"},
}
#: third-party modules rendering/ may import (besides the standard library)
RENDERING_THIRD_PARTY = {"torch", "numpy", "nerfacc"}
SKIP_DIRS = {"__pycache__", "build", "dist", "site-packages", "node_modules"}


def python_files() -> List[str]:
    """Repository-relative paths of every .py file (hidden folders and build output left out)."""
    out = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in SKIP_DIRS)
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in sorted(files) if f.endswith(".py")]
    return out


def module_name(rel: str) -> str:
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _literal_import(node: ast.Call) -> Optional[str]:
    """The module of ``importlib.import_module("m")`` / ``import_module("m")`` / ``__import__("m")``."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
        return node.args[0].value
    return None


def imports(rel: str) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in the file ``rel``."""
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=rel)
    mod = module_name(rel)
    package = mod if rel.endswith("__init__.py") else mod.rpartition(".")[0]
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom, ast.Call))),
                       key=lambda n: (n.lineno, n.col_offset)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            if not node.module:  # from . import x: the submodules x
                for a in node.names:
                    yield node.lineno, f"{target}.{a.name}" if target else a.name
        elif isinstance(node, ast.Call):
            lit = _literal_import(node)
            if lit:
                yield node.lineno, lit


def violations() -> List[str]:
    out = []
    for rel in python_files():
        top = rel.split(os.sep)[0]
        layer = top if os.sep in rel else None  # None: an entry script at the root
        for line, target in imports(rel):
            head = target.split(".")[0]
            if not head:
                continue
            where = f"{rel}:{line}: imports {target}"
            if head in ENTRY_SCRIPTS and layer not in ("tests", None) and not os.path.isdir(os.path.join(ROOT, head)):
                out.append(f"{where} (an entry script)")
            elif layer in FORBIDDEN and head in FORBIDDEN[layer]:
                out.append(f"{where} ({layer}/ must not import {head}/)")
            elif layer == "rendering" and head not in ("util", "rendering") and head not in STDLIB \
                    and head not in RENDERING_THIRD_PARTY:
                out.append(f"{where} (rendering/ imports only util/, torch, numpy, nerfacc and the standard library)")
    return out


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The parser itself: top-level, in-function, relative and importlib imports are all found."""
    pkg = tmp_path / "util"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("import os\n"
                                "def f():\n"
                                "    from tasks.ensemble import tables\n"
                                "    from ..models import drrnet\n"
                                "    import importlib\n"
                                "    importlib.import_module('datasets.image')\n"
                                "    from . import registry\n"
                                "    import train\n")
    (tmp_path / "train.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "ENTRY_SCRIPTS", ["train"])
    found = dict(imports(os.path.join("util", "bad.py")))
    assert set(found.values()) >= {"os", "tasks.ensemble", "models", "datasets.image", "util.registry", "train"}
    assert found[3] == "tasks.ensemble" and found[6] == "datasets.image"
    bad = violations()
    assert [v.split(": ")[0] for v in bad] == ["util/bad.py:3", "util/bad.py:4", "util/bad.py:6", "util/bad.py:8"]


def test_import_graph_respects_the_layers():
    files = python_files()
    assert any(f.startswith("util" + os.sep) for f in files) and "train.py" in files
    bad = violations()
    assert not bad, "imports against the layers of docs/design.md:\n" + "\n".join(bad)
