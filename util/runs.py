"""Run directories: creation rules, resolved config, atomic files, checkpoints and model loading.

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
damaged checkpoint is named and skipped for the previous intact one (:func:`newest_intact_checkpoint`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable, Dict, List, Optional

import torch
import yaml

from util.config import ConfigError, run_name, section_kwargs, validate_experiment, yaml_load
from util.errors import DataError
from util.registry import accepted_keys, build

log = logging.getLogger("runs")

CKPT_DIR = "checkpoints"
LATEST = "latest"
LOCK_FILE = "train.lock"
RUN_MARKERS = ("config.yaml", "finished.json", CKPT_DIR)
"""Entries of which at least one is in every folder train.py has written into (what --overwrite may delete)."""


def _atomic_write(path: str, mode: str, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync, then ``os.replace`` it onto ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees either the old or the whole new file."""
    _atomic_write(path, "w", lambda f: f.write(text))


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through a temporary file and os.replace."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_save_npy(path: str, array: Any) -> None:
    """np.save to exactly ``path`` (no ``.npy`` appended) through a temporary file and os.replace."""
    import numpy as np

    _atomic_write(path, "wb", lambda f: np.save(f, array, allow_pickle=False))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)  # a user's output file: the usual permissions, not mkstemp's 0600


def publish_folder(root: str, fill: Callable[[str], None]) -> bool:
    """Create the folder ``root`` all at once: ``fill(tmp)`` writes into a fresh hidden sibling, which is then
    renamed to ``root`` (an empty ``root`` is replaced), so a reader never sees a half-written folder. On an
    error the sibling is removed and the error raised. The folder gets ordinary permissions (not mkdtemp's
    private ones).

    Returns:
        True, or False when another process put ``root`` in place first (the sibling is discarded: use theirs).
    """
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(root))}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        fill(tmp)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isdir(root):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def run_dir_of(exp: Dict[str, Any]) -> str:
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


def prepare_run_dir(path: str, overwrite: bool = False, resume: bool = False) -> None:
    """Check (:func:`check_run_dir`), clear on ``overwrite`` and create a run directory in one go.

    train() does not use it: there the old run is cleared only after the data has been validated.
    """
    check_run_dir(path, overwrite=overwrite, resume=resume)
    if overwrite:
        clear_run_dir(path)
    os.makedirs(path, exist_ok=True)


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


def checkpoint_dirs(run_dir: str):
    """Complete checkpoints, oldest first: list of (step, path)."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("step_") and os.path.isfile(os.path.join(root, name, "trainer_state.json")):
            out.append((int(name[5:]), os.path.join(root, name)))
    return sorted(out)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Model weights inside an Accelerate checkpoint folder, in the order they are looked for."""


def verify_weights_file(path: str) -> None:
    """Check that a weights file is complete without loading its tensors (cheap: header / zip directory only).

    ``.safetensors``: the header must parse and the file size must equal header + data. Other files
    (``torch.save`` zip archives: ``pytorch_model.bin``, ``model.pt``, ``optimizer.bin``): the zip directory at the
    end of the file must be there (a truncated file has none) and every member must lie inside the file; a
    non-zip (legacy) file is loaded with torch.load.

    Raises:
        DataError naming the file: missing, truncated or not a weights file.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: weights file not found")
    size = os.path.getsize(path)
    try:
        if path.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise DataError(f"{path}: truncated ({size} bytes, no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise DataError(f"{path}: truncated ({size} bytes; the header alone needs {8 + n})")
                header = json.loads(f.read(n))
            end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
            if size != 8 + n + end:
                raise DataError(f"{path}: truncated or damaged ({size} bytes, the header describes {8 + n + end})")
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.header_offset + info.compress_size > size:
                        raise DataError(f"{path}: damaged (member {info.filename} lies beyond the end of the file)")
        else:
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise DataError(f"{path}: truncated or not a weights file ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OSError, zipfile.BadZipFile, struct.error) as e:
        raise DataError(f"{path}: damaged weights file ({type(e).__name__}: {e})") from None


def verify_checkpoint(path: str) -> int:
    """Check a checkpoint folder: trainer_state.json readable with its step, model weights and optimizer state
    complete (:func:`verify_weights_file`). Returns the step.

    Raises:
        DataError naming the damaged or missing file.
    """
    ts = os.path.join(path, "trainer_state.json")
    try:
        with open(ts) as f:
            step = json.load(f)["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step is {step!r}")
    except FileNotFoundError:
        raise DataError(f"{ts}: missing (incomplete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ts}: truncated or damaged ({type(e).__name__}: {e})") from None
    weights = [os.path.join(path, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(path, w))]
    if not weights:
        raise DataError(f"{path}: no model weights ({' or '.join(WEIGHT_FILES)})")
    verify_weights_file(weights[0])
    for name in sorted(os.listdir(path)):
        if name.startswith("optimizer") and name.endswith(".bin"):
            verify_weights_file(os.path.join(path, name))
    return step


def _pointer(run_dir: str) -> Optional[str]:
    p = os.path.join(run_dir, CKPT_DIR, LATEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return f.read().strip()


def intact_checkpoints(run_dir: str, warn: bool = True) -> List[str]:
    """Checkpoints that pass :func:`verify_checkpoint`, newest first: the one ``checkpoints/latest`` names, then
    the older ones by step. Each damaged one is skipped with a warning naming the damaged file."""
    root = os.path.join(run_dir, CKPT_DIR)
    found = checkpoint_dirs(run_dir)
    name = _pointer(run_dir)
    order = [p for _, p in reversed(found)]
    if name:
        target = os.path.join(root, name)
        if os.path.isdir(target):
            step_of = {p: s for s, p in found}
            limit = step_of.get(target)
            order = [target] + [p for p in order if p != target and (limit is None or step_of[p] < limit)]
        elif warn:
            log.warning("%s names '%s', which does not exist; using the newest checkpoint found",
                        os.path.join(root, LATEST), name)
    out = []
    for p in order:
        try:
            verify_checkpoint(p)
        except DataError as e:
            if warn:
                log.warning("skipping damaged checkpoint %s: %s", p, e)
            continue
        out.append(p)
    return out


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Path of the checkpoint named by ``checkpoints/latest`` (None if there is none).

    The folder is not checked for damage: :func:`newest_intact_checkpoint` does that.
    """
    p = os.path.join(run_dir, CKPT_DIR, LATEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        name = f.read().strip()
    path = os.path.join(run_dir, CKPT_DIR, name)
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"{p} names '{name}', which is not a complete checkpoint")
    return path


def newest_intact_checkpoint(run_dir: str) -> Optional[str]:
    """The newest intact checkpoint: the one ``checkpoints/latest`` names, or, when that one is damaged (a
    truncated weights or trainer_state.json file) or missing, the previous intact one, with a warning naming the
    damaged file. None when the run has no checkpoint.

    Raises:
        DataError: checkpoints exist but every one is damaged (the message names each damaged file).
    """
    if _pointer(run_dir) is None and not checkpoint_dirs(run_dir):
        return None
    good = intact_checkpoints(run_dir)
    if good:
        return good[0]
    problems = []
    for _, p in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_checkpoint(p)
        except DataError as e:
            problems.append(str(e))
    if not problems:
        return None
    raise DataError(f"no intact checkpoint in '{run_dir}': " + "; ".join(problems))


def load_resume_state(accelerator, run_dir: str) -> tuple:
    """``accelerator.load_state`` from the newest checkpoint that loads, falling back to older ones with a warning.

    Returns:
        (checkpoint path, step).

    Raises:
        DataError: no checkpoint of the run can be loaded (each failure named).
    """
    problems = []
    for ck in intact_checkpoints(run_dir):
        try:
            step = verify_checkpoint(ck)
            accelerator.load_state(ck)
        except Exception as e:  # a file the cheap check does not cover (e.g. a damaged RNG state)
            msg = f"{ck}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            log.warning("skipping checkpoint %s", msg)
            problems.append(msg)
            continue
        if problems:
            log.warning("resuming from the older checkpoint %s (step %d)", ck, step)
        return ck, step
    raise DataError(f"--resume: no checkpoint of '{run_dir}' can be loaded"
                    + (": " + "; ".join(problems) if problems else " (all are damaged, see the warnings above)"))


def read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def build_dataset(exp: Dict[str, Any]):
    """The experiment's dataset (seed injected from train.seed)."""
    return build("dataset", exp["dataset"]["type"], section="dataset",
                 injected={"seed": int(exp["train"].get("seed", 0))}, **section_kwargs(exp, "dataset"))


def task_type_of(exp: Dict[str, Any]) -> str:
    return (exp.get("task") or {}).get("type", "ensemble")


def build_task(exp: Dict[str, Any], dataset):
    """The experiment's task around its dataset."""
    task = exp.get("task") or {"type": "ensemble"}
    return build("task", task["type"], section="task", injected={"dataset": dataset},
                 **{k: v for k, v in task.items() if k != "type"})


def build_model(exp: Dict[str, Any], cond_dim: Optional[int] = None, spatial_dims: Optional[int] = None,
                output_mean: Optional[float] = None, inputs: Optional[Dict[str, Any]] = None):
    """The experiment's model with the data-derived arguments injected.

    Args:
        exp: validated experiment.
        cond_dim, spatial_dims: shorthand for ``inputs`` (the ensemble task's arguments).
        output_mean: the training mean of the normalized values (``task.output_mean``); it replaces
            ``init_output_mean: auto`` (explicit or the model's default). None (e.g. when weights are loaded
            next, so the init does not matter) leaves the model's own init.
        inputs: the task's ``model_inputs()``; each is injected where the model's signature accepts it.
    """
    inputs = dict(inputs or {})
    if cond_dim is not None:
        inputs["cond_dim"] = int(cond_dim)
    if spatial_dims is not None:
        inputs["spatial_dims"] = int(spatial_dims)
    kwargs = section_kwargs(exp, "model")
    typ = exp["model"]["type"]
    signature = accepted_keys("model", typ, ())
    injected = {k: v for k, v in inputs.items() if k in signature}
    keys = accepted_keys("model", typ, tuple(injected))
    if "init_output_mean" in keys and kwargs.get("init_output_mean", keys["init_output_mean"]) == "auto":
        kwargs["init_output_mean"] = None if output_mean is None else float(output_mean)
    return build("model", typ, section="model", injected=injected, **kwargs)


def build_components(exp: Dict[str, Any], data_context: Callable[[], Any] = contextlib.nullcontext):
    """Dataset -> task -> model of a validated experiment: the one place a run's components are built.

    Args:
        exp: validated experiment (util.config.load_config).
        data_context: context manager factory entered while the dataset is built (e.g. Accelerate's
            ``main_process_first``, so generated demo data is written once).

    Returns:
        (dataset, task, model).
    """
    with data_context():
        dataset = build_dataset(exp)
    task = build_task(exp, dataset)
    model = build_model(exp, inputs=task.model_inputs(), output_mean=task.output_mean)
    return dataset, task, model


def model_inputs_of(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The model arguments recorded in a run's meta.json (runs written before tasks: cond/spatial dims)."""
    if "model_inputs" in meta:
        return dict(meta["model_inputs"])
    return {"cond_dim": int(meta["cond_dim"]),
            "spatial_dims": int(meta.get("spatial_dims", len(meta["spatial_shape"]))),
            "out_dim": int(meta.get("out_dim", 1))}


def load_trained_model(run_dir: str, checkpoint: Optional[str] = None, map_location="cpu"):
    """Rebuild a run's model and load its weights.

    Args:
        run_dir: run directory written by train.py.
        checkpoint: None = ``model.pt`` if training finished, else the latest checkpoint (a damaged file is
            skipped with a warning naming it, for the previous intact checkpoint); or a path to a checkpoint
            directory or to a ``.pt`` state dict (no fallback: DataError naming the file when it is damaged).

    Returns:
        (model, exp, meta): the model in eval mode, the experiment dict and the data meta dict.
    """
    exp = load_experiment(run_dir)
    meta_p = os.path.join(run_dir, "meta.json")
    if not os.path.isfile(meta_p):
        raise FileNotFoundError(f"{meta_p} not found: was '{run_dir}' written by train.py?")
    meta = read_json(meta_p)
    model = build_model(exp, inputs=model_inputs_of(meta))
    if checkpoint is None:
        checkpoint, state = _load_default_weights(run_dir, map_location)
    else:
        state = load_weights(checkpoint, map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights in '{checkpoint}' do not fit the model of '{run_dir}': "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    model.weights_path = checkpoint  # what was loaded (the default rule may have fallen back to a checkpoint)
    return model, exp, meta


def load_weights(path: str, map_location="cpu") -> Dict[str, Any]:
    """State dict of a ``.pt`` file or of a checkpoint folder (model.safetensors / pytorch_model.bin).

    Raises:
        FileNotFoundError: ``path`` does not exist. DataError naming the file: it is damaged or truncated.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights '{path}' not found")
    f = path
    if os.path.isdir(path):
        found = [os.path.join(path, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(path, w))]
        if not found:
            raise DataError(f"{path}: no model weights ({' or '.join(WEIGHT_FILES)}) in this checkpoint folder")
        f = found[0]
    verify_weights_file(f)
    try:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(f, device=str(map_location))
        return torch.load(f, map_location=map_location)
    except Exception as e:
        raise DataError(f"{f}: cannot be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def default_weights(run_dir: str) -> Optional[str]:
    """The weights :func:`load_trained_model` uses by default: ``model.pt`` when present and complete, else the
    newest intact checkpoint (:func:`newest_intact_checkpoint`); None when there are none."""
    final = os.path.join(run_dir, "model.pt")
    if os.path.isfile(final):
        try:
            verify_weights_file(final)
            return final
        except DataError as e:
            log.warning("%s; using the latest intact checkpoint instead", e)
    return newest_intact_checkpoint(run_dir)


def _load_default_weights(run_dir: str, map_location):
    """(path, state dict) by the default rule, skipping (with a warning) weights that fail to load."""
    final = os.path.join(run_dir, "model.pt")

    def candidates():
        if os.path.isfile(final):
            yield final
        yield from intact_checkpoints(run_dir)  # verified only when model.pt is missing or damaged

    problems = []
    for path in candidates():
        try:
            state = load_weights(path, map_location)
        except DataError as e:
            log.warning("skipping damaged weights: %s", e)
            problems.append(str(e))
            continue
        if problems:
            log.warning("loading the previous intact weights %s instead", path)
        return path, state
    if not problems:
        newest_intact_checkpoint(run_dir)  # raises DataError naming the damaged checkpoints, if any
        raise FileNotFoundError(f"no trained weights in '{run_dir}' (no model.pt, no checkpoint)")
    raise DataError(f"no loadable weights in '{run_dir}': " + "; ".join(problems)
                    + (" (and no intact checkpoint)" if not intact_checkpoints(run_dir, warn=False) else ""))
