"""Files written whole or not at all: the one atomic writer of the project, and folders published at once.

:func:`atomic_write` is the single implementation (temporary file in the target's folder, fsync, ``os.replace``,
ordinary permissions); :func:`atomic_write_text`, :func:`atomic_torch_save` and :func:`atomic_save_npy` are its
usual uses, and every other writer of result files goes through it (``util.tables.write_csv``, the
``util.volume_io`` writers). :func:`publish_folder` does the same for a whole folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "atomic_save_npy", "publish_folder",
           "read_json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb", newline: Optional[str] = None) -> str:
    """Call ``write(file)`` on a temporary file next to ``path`` (its folder is created), fsync, then
    ``os.replace`` it onto ``path``, so that a reader sees either the old or the whole new file. On an error the
    temporary file is removed and the error raised. The file gets the usual permissions (not mkstemp's 0600).

    Args:
        path: the file to write.
        write: writes the content into the open file object.
        mode: ``"wb"`` or ``"w"`` (text).
        newline: the text mode's newline translation (``""`` for the csv module).

    Returns:
        ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": newline})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_npy(path: str, array: Any) -> str:
    """``np.save`` an array (or tensor) to exactly ``path`` (no ``.npy`` appended) atomically (:func:`atomic_write`)."""
    import numpy as np

    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    return atomic_write(path, lambda f: np.save(f, a, allow_pickle=False))


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
        os.chmod(tmp, 0o777 & ~_umask())
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


def write_json(path: str, obj: Any, indent: Optional[int] = 1) -> None:
    """``json.dump(obj, indent=indent)`` into ``path`` atomically (a reader sees the old or the whole new file)."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent), mode="w")


def read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)
