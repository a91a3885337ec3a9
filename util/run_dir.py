"""Run directories: what a run directory holds, the rules for creating and replacing one, its lock, and the
resolved experiment saved in it.

A run directory ``<train.log_dir>/<run name>/`` holds::

    meta.json            written first: the run marker (RUN_MARKER_KEY), data normalization facts needed to query
                         the model (dataset.meta()), task, model inputs, the data's fingerprint
                         (``data_fingerprint``, util.fingerprint) and the ``resumes`` list
    config.yaml          the resolved experiment (after --set overrides)
    checkpoints/step_0000100/   Accelerate state (model, optimizer, scaler, RNG) + trainer_state.json
    checkpoints/latest   text file naming the newest complete checkpoint (replaced atomically)
    log.csv              step, loss, psnr, lr (main process)
    timing.json          step-time measurement (spec 5.6)
    model.pt             final model weights (state_dict), written at the end of training
    finished.json        marker written last; its presence means the run completed
    tb/                  TensorBoard event files
    train.lock           present while a process trains into the run (pid, host); see :class:`RunLock`

Safety rules (train.py): a run name is a plain folder name (util.config); ``--overwrite`` deletes nothing until
the config, the data and the model have been validated, and never deletes a folder train.py did not write (its
meta.json carries :data:`RUN_MARKER_KEY`, :func:`looks_like_run_dir`); ``--resume`` continues a run only with the
config it was trained with, or with keys safe to change on resume (:func:`resume_changes`); one process at a time trains into a run directory (:class:`RunLock`); a
damaged checkpoint is named and skipped for the previous intact one (util.checkpoints).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import yaml

from util.checkpoints import newest_intact_checkpoint
from util.config import TrainConfig, run_name, validate_experiment, yaml_load
from util.files import atomic_write_text
from util.registry import accepted_keys

log = logging.getLogger("run_dir")

LOCK_FILE = "train.lock"
META_FILE = "meta.json"
RUN_MARKER_KEY = "neural_fields_run"
"""Key of the meta.json that train.py writes first into every run directory (value: the format version): the mark
of a folder train.py wrote, the only kind --overwrite deletes."""
RUN_MARKER_VERSION = 1
RUN_MARKERS = (f"{META_FILE} with the key '{RUN_MARKER_KEY}'",)
"""What --overwrite looks for (named in its refusal)."""


def run_dir_of(exp: Dict[str, Any]) -> str:
    """``<train.log_dir>/<run name>`` of a validated experiment."""
    return os.path.join(exp["train"].get("log_dir", "runs"), run_name(exp))


def _entries(path: str) -> List[str]:
    """Entries of a folder other than the lock file (none when it does not exist)."""
    if not os.path.isdir(path):
        return []
    return [e for e in os.listdir(path) if e != LOCK_FILE]


def read_meta(path: str) -> Optional[Dict[str, Any]]:
    """The meta.json of a run directory as a dict, None when missing, unreadable or not a JSON object."""
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def looks_like_run_dir(path: str) -> bool:
    """True when ``path`` holds the meta.json train.py writes first into a run directory: with the key
    :data:`RUN_MARKER_KEY`, or, for runs written before that key, with both ``task`` and ``model_inputs`` and a
    config.yaml beside it. The only kind of folder ``--overwrite`` deletes; a config.yaml alone is not enough."""
    meta = read_meta(path)
    if meta is None:
        return False
    if RUN_MARKER_KEY in meta:
        return True
    return {"task", "model_inputs"} <= set(meta) and os.path.isfile(os.path.join(path, "config.yaml"))


def check_run_dir(path: str, overwrite: bool = False, resume: bool = False) -> None:
    """Check what train() may do with its run directory; deletes and creates nothing.

    Raises:
        FileExistsError: ``path`` is a file; or it holds files and neither ``overwrite`` nor ``resume`` is given;
            or ``overwrite`` is given for a folder that does not look like a run directory.
        FileNotFoundError: ``resume`` without a checkpoint (DataError when every checkpoint is damaged).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"run directory '{path}' exists and is not a folder")
    existing = _entries(path)
    if resume:
        if newest_intact_checkpoint(path) is None:
            raise FileNotFoundError(f"--resume: no checkpoint in '{path}'")
        return
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"run directory '{path}' already exists; pass --resume to continue it, --overwrite to delete it "
            f"and start again, or set train.run_name / --set train.run_name=NAME for a new run")
    if not looks_like_run_dir(path):
        shown = ", ".join(sorted(existing)[:5]) + (", ..." if len(existing) > 5 else "")
        raise FileExistsError(
            f"--overwrite: '{path}' does not look like a run directory written by train.py (no {RUN_MARKERS[0]} "
            f"in it; it holds {shown}); refusing to delete it. Check train.log_dir and train.run_name, or delete "
            f"the folder yourself")


def clear_run_dir(path: str) -> None:
    """Delete the contents of a run directory for ``--overwrite`` (the lock file stays).

    Called only after the new config and data have been validated; checks again that ``path`` looks like a run
    directory (FileExistsError otherwise).
    """
    if not _entries(path):
        return
    check_run_dir(path, overwrite=True)
    log.info("--overwrite: deleting the previous contents of %s", path)
    for e in _entries(path):
        p = os.path.join(path, e)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


# --------------------------------------------------------------------------------------------------- locking
class RunLockedError(FileExistsError):
    """Another process trains into the run directory."""


_HELD: set = set()  # lock files this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


def read_lock(run_dir: str) -> Optional[Dict[str, Any]]:
    """The lock record of a run directory ({pid, host, started, command}), None when unlocked or unreadable."""
    try:
        with open(os.path.join(run_dir, LOCK_FILE)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """Exclusive lock of a run directory: ``<run>/train.lock`` holding the pid and host of the training process.

    ``acquire()`` creates the run directory if needed and the lock file atomically (O_EXCL). A lock left by a
    process that no longer exists on this host is taken over with a warning; a live one (or one from another
    host, which cannot be checked) is refused with :class:`RunLockedError` naming the holder. ``release()``
    removes the lock (only our own), and the run directory too when it created the folder and it is still empty
    (e.g. the data failed validation). Use as a context manager or call both.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.held = False
        self._created_dir = False

    def _record(self) -> Dict[str, Any]:
        return dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                    command=" ".join(sys.argv))

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        if not os.path.isdir(self.run_dir):
            if os.path.exists(self.run_dir):
                raise FileExistsError(f"run directory '{self.run_dir}' exists and is not a folder")
            os.makedirs(self.run_dir, exist_ok=True)
            self._created_dir = True
        host = socket.gethostname()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = read_lock(self.run_dir)
                if other is None:
                    age = time.time() - os.path.getmtime(self.path) if os.path.exists(self.path) else 1e9
                    if age < 10:  # being written right now
                        time.sleep(0.2)
                        continue
                    raise RunLockedError(
                        f"run directory '{self.run_dir}' is locked ({self.path} exists but cannot be read); if no "
                        f"process trains into this run, delete {self.path}")
                pid, other_host = other.get("pid"), other.get("host")
                ours = os.path.realpath(self.path) in _HELD
                stale = other_host == host and isinstance(pid, int) and (
                    not _pid_alive(pid) or (pid == os.getpid() and not ours))
                if not stale:
                    where = "this host" if other_host == host else f"host '{other_host}'"
                    raise RunLockedError(
                        f"run directory '{self.run_dir}' is in use: process {pid} on {where} has been training into "
                        f"it since {other.get('started', '?')} ({self.path}); wait for it to finish, stop it, or "
                        f"choose another run name (--set train.run_name=NAME). If that process is gone, delete "
                        f"{self.path}")
                log.warning("taking over the stale lock of %s: process %s on this host no longer runs",
                            self.run_dir, pid)
                if read_lock(self.run_dir) == other:  # not replaced meanwhile by another process taking it over
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            _HELD.add(os.path.realpath(self.path))
            return self
        raise RunLockedError(f"could not lock run directory '{self.run_dir}' ({self.path}): another process keeps "
                             f"creating it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(os.path.realpath(self.path))
        info = read_lock(self.run_dir)
        if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        if self._created_dir:
            try:
                os.rmdir(self.run_dir)  # only when still empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def save_experiment(exp: Dict[str, Any], path: str) -> None:
    """Write the resolved experiment (and where it came from, ``_source``) to ``<path>/config.yaml``."""
    clean = {k: v for k, v in exp.items() if not k.startswith("_")}
    clean["_source"] = exp.get("_source", {})
    atomic_write_text(os.path.join(path, "config.yaml"), yaml.safe_dump(clean, sort_keys=False))


def load_experiment(run_dir: str) -> Dict[str, Any]:
    """The resolved experiment saved in a run directory (validated again)."""
    p = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"'{run_dir}' is not a run directory: {p} not found")
    with open(p) as f:
        exp = yaml_load(f)
    src = exp.pop("_source", {})
    exp = validate_experiment(exp, where=p)
    exp["_source"] = src
    return exp


# ---------------------------------------------------------------------------------------------------- resume
SAFE_ON_RESUME = ("train.log_every", "train.checkpoint_every", "train.checkpoint_every_steps",
                  "train.keep_checkpoints", "train.timing_steps", "train.log_dir", "train.run_name")
"""Config keys a ``--resume`` may change freely: they decide where the run lives, how often it logs and saves and
what it times, never the weights. ``train.max_steps`` / ``train.epochs`` may grow (train longer), and the keys of
the ``test`` section (evaluation only) may change too; any other change needs ``--resume_changed``."""
_ABSENT = "<absent>"


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_KINDS = {"task": "task", "dataset": "dataset", "model": "model", "optim": "optimizer", "scheduler": "scheduler"}


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)


def with_defaults(exp: Dict[str, Any]) -> Dict[str, Any]:
    """A validated experiment with every default spelled out (the component sections' signature defaults, the
    train section's TrainConfig), so that an omitted key and its default compare equal; ``_`` keys left out."""
    out = {k: v for k, v in exp.items() if not str(k).startswith("_")}
    for section, kind in _KINDS.items():
        sec = out.get(section)
        if isinstance(sec, dict) and "type" in sec:
            try:
                keys = accepted_keys(kind, sec["type"])
            except Exception:  # noqa: BLE001 - an unknown type: compare what is written
                continue
            out[section] = {**{k: d for k, d in keys.items() if d is not inspect.Parameter.empty}, **sec}
    if isinstance(out.get("train"), dict):
        out["train"] = dataclasses.asdict(TrainConfig(**out["train"]))
    return _plain(out)


def config_differences(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, List[Any]]:
    """``{"section.key": [old value, new value]}`` for every key whose value differs between two resolved
    experiments, defaults spelled out (:func:`with_defaults`; keys starting with ``_``, e.g. ``_source``, are left
    out; a key one side lacks reads ``<absent>``)."""
    def plain(e):
        return _flat(with_defaults(e))

    a, b = plain(old), plain(new)
    return {k: [a.get(k, _ABSENT), b.get(k, _ABSENT)] for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def safe_on_resume(key: str, old: Any, new: Any) -> bool:
    """Whether changing ``key`` from ``old`` to ``new`` is safe on ``--resume`` (see :data:`SAFE_ON_RESUME`)."""
    if key in SAFE_ON_RESUME or key == "test" or key.startswith("test."):
        return True
    if key in ("train.max_steps", "train.epochs"):
        return _number(old) and _number(new) and new > old
    return False


def resume_changes(run_dir: str, exp: Dict[str, Any]) -> Tuple[Dict[str, List[Any]], Dict[str, List[Any]]]:
    """``(safe, other)``: the config keys whose value differs between the run's config.yaml and ``exp``, split into
    those safe to change on resume (:func:`safe_on_resume`) and the others; each ``{key: [old, new]}``.

    Raises:
        FileNotFoundError: the run has no config.yaml. ConfigError: it no longer validates.
    """
    diff = config_differences(load_experiment(run_dir), exp)
    safe = {k: v for k, v in diff.items() if safe_on_resume(k, *v)}
    return safe, {k: v for k, v in diff.items() if k not in safe}


def describe_changes(changes: Dict[str, List[Any]], limit: int = 8) -> str:
    """``model.hidden_dim 16 -> 32, optim.lr 0.001 -> 0.01`` (values shortened, at most ``limit`` keys)."""
    def short(v):
        t = v if isinstance(v, str) else json.dumps(v)
        return t if len(t) <= 40 else t[:37] + "..."

    items = [f"{k} {short(a)} -> {short(b)}" for k, (a, b) in changes.items()]
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
