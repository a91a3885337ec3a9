"""Run directories: what a run directory holds, the rules for creating and replacing one, its lock, and the
resolved experiment saved in it.

A run directory ``<train.log_dir>/<run name>/`` holds::

    config.yaml          the resolved experiment (after --set overrides)
    meta.json            data normalization facts needed to query the model (dataset.meta())
    checkpoints/step_0000100/   Accelerate state (model, optimizer, scaler, RNG) + trainer_state.json
    checkpoints/latest   text file naming the newest complete checkpoint (replaced atomically)
    log.csv              step, loss, psnr, lr (main process)
    timing.json          step-time measurement (spec 5.6)
    model.pt             final model weights (state_dict), written at the end of training
    finished.json        marker written last; its presence means the run completed
    tb/                  TensorBoard event files
    train.lock           present while a process trains into the run (pid, host); see :class:`RunLock`

Safety rules (train.py): a run name is a plain folder name (util.config); ``--overwrite`` deletes nothing until
the config, the data and the model have been validated, and never deletes a folder that does not look like a run
directory (:func:`looks_like_run_dir`); one process at a time trains into a run directory (:class:`RunLock`); a
damaged checkpoint is named and skipped for the previous intact one (util.checkpoints).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Any, Dict, List, Optional

import yaml

from util.checkpoints import CKPT_DIR, newest_intact_checkpoint
from util.config import run_name, validate_experiment, yaml_load
from util.files import atomic_write_text

log = logging.getLogger("run_dir")

LOCK_FILE = "train.lock"
RUN_MARKERS = ("config.yaml", "finished.json", CKPT_DIR)
"""Entries of which at least one is in every folder train.py has written into (what --overwrite may delete)."""


def run_dir_of(exp: Dict[str, Any]) -> str:
    """``<train.log_dir>/<run name>`` of a validated experiment."""
    return os.path.join(exp["train"].get("log_dir", "runs"), run_name(exp))


def _entries(path: str) -> List[str]:
    """Entries of a folder other than the lock file (none when it does not exist)."""
    if not os.path.isdir(path):
        return []
    return [e for e in os.listdir(path) if e != LOCK_FILE]


def looks_like_run_dir(path: str) -> bool:
    """True when ``path`` holds at least one of the files train.py writes first (config.yaml, finished.json,
    checkpoints/): the only kind of folder ``--overwrite`` deletes."""
    return any(os.path.exists(os.path.join(path, m)) for m in RUN_MARKERS)


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
            f"--overwrite: '{path}' does not look like a run directory (none of {', '.join(RUN_MARKERS)} in it; "
            f"it holds {shown}); refusing to delete it. Check train.log_dir and train.run_name, or delete the "
            f"folder yourself")


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

