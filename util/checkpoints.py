"""Checkpoints of a run: where they are, whether they are intact, and loading weights and resume state.

``<run>/checkpoints/step_NNNNNNN/`` holds Accelerate's state (model, optimizer, scaler, RNG, registered objects)
and ``trainer_state.json``; ``checkpoints/latest`` is a text file naming the newest complete checkpoint (replaced
atomically, util.training writes both). A damaged checkpoint is named and skipped for the previous intact one
(:func:`newest_intact_checkpoint`, :func:`load_resume_state`, :func:`load_default_weights`).
"""
from __future__ import annotations

import json
import logging
import os
import struct
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch

from util.errors import DataError

log = logging.getLogger("checkpoints")

CKPT_DIR = "checkpoints"
LATEST = "latest"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Model weights inside an Accelerate checkpoint folder, in the order they are looked for."""
TASK_STATE_FILE = "task_state.pt"
"""The task's ``state_dict()`` inside a checkpoint folder (util.training writes it; :func:`load_task_state`)."""


def checkpoint_dirs(run_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints, oldest first: list of (step, path)."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("step_") and os.path.isfile(os.path.join(root, name, "trainer_state.json")):
            out.append((int(name[5:]), os.path.join(root, name)))
    return sorted(out)



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
        if (name.startswith("optimizer") and name.endswith(".bin")) or name == TASK_STATE_FILE:
            verify_weights_file(os.path.join(path, name))
    return step


def _pointer(run_dir: str) -> Optional[str]:
    """The checkpoint name ``checkpoints/latest`` holds (None without that file)."""
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
    name = _pointer(run_dir)
    if name is None:
        return None
    path = os.path.join(run_dir, CKPT_DIR, name)
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"{os.path.join(run_dir, CKPT_DIR, LATEST)} names '{name}', which is not a "
                                f"complete checkpoint")
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


def load_resume_state(accelerator, run_dir: str) -> Tuple[str, int]:
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



def first_tensor_mismatch(saved: Dict[str, Any], own: Dict[str, Any]
                          ) -> Optional[Tuple[str, Optional[List[int]], Optional[List[int]]]]:
    """The first tensor on which a saved state dict and a model's own disagree, in the model's order, then the names
    only the saved one holds: ``(name, shape in saved or None when absent, shape in own or None when absent)``;
    None when every name and shape agree (what ``load_state_dict`` needs)."""
    def shape(t):
        return list(getattr(t, "shape", ()))

    for k, v in own.items():
        if k not in saved:
            return k, None, shape(v)
        if shape(saved[k]) != shape(v):
            return k, shape(saved[k]), shape(v)
    for k, v in saved.items():
        if k not in own:
            return k, shape(v), None
    return None


def load_default_weights(run_dir: str, map_location="cpu") -> Tuple[str, Dict[str, Any]]:
    """(path, state dict) of a run's default weights: ``model.pt`` when present and loadable, else the newest
    checkpoint that loads; each damaged file is skipped with a warning naming it.

    Raises:
        FileNotFoundError: the run has no weights. DataError: every weights file is damaged (each named).
    """
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


def load_task_state(run_dir: str, checkpoint: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The task's ``state_dict()`` saved with the weights scored (e.g. the NeRF occupancy grid), None when the run
    saved none.

    Args:
        run_dir: the run directory.
        checkpoint: the weights scored: a checkpoint folder -> the state saved in it; None, ``model.pt`` or another
            ``.pt`` file -> the newest intact checkpoint's (for a finished run: the final step's, saved with the
            weights of model.pt).

    Read from the checkpoint's ``task_state.pt``; a checkpoint written before that file existed is read by
    :func:`read_legacy_task_state`.

    Raises:
        DataError: ``task_state.pt`` is there but cannot be loaded (the message names it).
    """
    if checkpoint is not None and os.path.isdir(checkpoint):
        ck = checkpoint
    else:
        try:
            ck = newest_intact_checkpoint(run_dir)
        except DataError as e:
            log.warning("no task state: %s", e)
            return None
    if ck is None:
        return None
    path = os.path.join(ck, TASK_STATE_FILE)
    if not os.path.isfile(path):
        return read_legacy_task_state(ck)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # written by util.training
    except Exception as e:
        raise DataError(f"{path}: cannot be loaded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


LEGACY_TASK_STATE_INDEX = 1
"""Registration index of the task in the loop's ``accelerator.register_for_checkpointing`` calls (the scheduler
is 0, the task 1): keep this order, or resuming old runs breaks too."""


def read_legacy_task_state(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The task state of a checkpoint written before ``task_state.pt`` existed (the only reader of Accelerate's
    own files outside resume): Accelerate's ``save_state`` writes each object registered with
    ``register_for_checkpointing`` as ``custom_checkpoint_<i>.pkl``, ``i`` its registration index (its documented
    naming), and the loop registers the task as :data:`LEGACY_TASK_STATE_INDEX`. None when the file is missing or
    does not hold a dict (with a warning when it cannot be read)."""
    path = os.path.join(checkpoint, f"custom_checkpoint_{LEGACY_TASK_STATE_INDEX}.pkl")
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged file: the caller decides what to do without it
        log.warning("%s: cannot be loaded (%s: %s); no task state", path, type(e).__name__, e)
        return None
    return state if isinstance(state, dict) else None
