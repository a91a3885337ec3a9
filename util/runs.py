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
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

import torch
import yaml

from util.config import ConfigError, run_name, section_kwargs, validate_experiment, yaml_load
from util.registry import accepted_keys, build

CKPT_DIR = "checkpoints"
LATEST = "latest"


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


def run_dir_of(exp: Dict[str, Any]) -> str:
    return os.path.join(exp["train"].get("log_dir", "runs"), run_name(exp))


def prepare_run_dir(path: str, overwrite: bool = False, resume: bool = False) -> None:
    """Create a run directory, refusing to touch an existing one unless told.

    Raises:
        FileExistsError: the directory exists and holds files, and neither ``overwrite`` nor ``resume``.
    """
    if os.path.isdir(path) and os.listdir(path):
        if resume:
            return
        if not overwrite:
            raise FileExistsError(
                f"run directory '{path}' already exists; pass --resume to continue it, --overwrite to delete it "
                f"and start again, or set train.run_name / --set train.run_name=NAME for a new run")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


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


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Path of the checkpoint named by ``checkpoints/latest`` (None if there is none)."""
    p = os.path.join(run_dir, CKPT_DIR, LATEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        name = f.read().strip()
    path = os.path.join(run_dir, CKPT_DIR, name)
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"{p} names '{name}', which is not a complete checkpoint")
    return path


def read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def build_dataset(exp: Dict[str, Any]):
    """The experiment's dataset (seed injected from train.seed)."""
    return build("dataset", exp["dataset"]["type"], section="dataset",
                 injected={"seed": int(exp["train"].get("seed", 0))}, **section_kwargs(exp, "dataset"))


def build_model(exp: Dict[str, Any], cond_dim: int, spatial_dims: int, output_mean: Optional[float] = None):
    """The experiment's model with the data-derived arguments injected.

    ``output_mean``: the training mean of the normalized values (``dataset.train_value_mean``); it replaces
    ``init_output_mean: auto`` (explicit or the model's default). None (e.g. when weights are loaded next, so
    the init does not matter) leaves the model's own init.
    """
    kwargs = section_kwargs(exp, "model")
    typ = exp["model"]["type"]
    keys = accepted_keys("model", typ, ("cond_dim", "spatial_dims"))
    if "init_output_mean" in keys and kwargs.get("init_output_mean", keys["init_output_mean"]) == "auto":
        kwargs["init_output_mean"] = None if output_mean is None else float(output_mean)
    return build("model", typ, section="model",
                 injected={"cond_dim": int(cond_dim), "spatial_dims": int(spatial_dims)}, **kwargs)


def load_trained_model(run_dir: str, checkpoint: Optional[str] = None, map_location="cpu"):
    """Rebuild a run's model and load its weights.

    Args:
        run_dir: run directory written by train.py.
        checkpoint: None = ``model.pt`` if training finished, else the latest checkpoint; or a path to a
            checkpoint directory or to a ``.pt`` state dict.

    Returns:
        (model, exp, meta): the model in eval mode, the experiment dict and the data meta dict.
    """
    exp = load_experiment(run_dir)
    meta_p = os.path.join(run_dir, "meta.json")
    if not os.path.isfile(meta_p):
        raise FileNotFoundError(f"{meta_p} not found: was '{run_dir}' written by train.py?")
    meta = read_json(meta_p)
    model = build_model(exp, meta["cond_dim"], int(meta.get("spatial_dims", len(meta["spatial_shape"]))))
    if checkpoint is None:
        final = os.path.join(run_dir, "model.pt")
        checkpoint = final if os.path.isfile(final) else latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"no trained weights in '{run_dir}' (no model.pt, no checkpoint)")
    if os.path.isdir(checkpoint):
        from safetensors.torch import load_file

        f = os.path.join(checkpoint, "model.safetensors")
        state = load_file(f, device=str(map_location)) if os.path.isfile(f) else \
            torch.load(os.path.join(checkpoint, "pytorch_model.bin"), map_location=map_location)
    else:
        state = torch.load(checkpoint, map_location=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights in '{checkpoint}' do not fit the model of '{run_dir}': "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, exp, meta
