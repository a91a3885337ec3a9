"""Building a run's components from its experiment: dataset -> task -> model, the model's data-derived arguments,
and a trained run's model rebuilt from its run directory.

The model inputs (the arguments the program sets from the data: ``cond_dim``, ``spatial_dims``, ``out_dim`` and
whatever else the task's ``model_arguments`` name) are resolved in one place, :func:`resolve_model_inputs`, for
training, test_flops.py and the benchmarks; a trained run's are read back from its meta.json
(:func:`model_inputs_of`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Optional

from util.checkpoints import first_tensor_mismatch, load_default_weights, load_weights
from util.config import ConfigError, section_kwargs
from util.files import read_json
from util.registry import accepted_keys, build, get
from util.run_dir import load_experiment


def build_dataset(exp: Dict[str, Any]):
    """The experiment's dataset (seed injected from train.seed)."""
    return build("dataset", exp["dataset"]["type"], section="dataset",
                 injected={"seed": int(exp["train"].get("seed", 0))}, **section_kwargs(exp, "dataset"))


def task_type_of(exp: Dict[str, Any]) -> str:
    """The experiment's task type (``ensemble`` when it has no task section)."""
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
    try:
        return build("model", typ, section="model", injected=injected, **kwargs)
    except ConfigError as e:   # checks only the data can make (e.g. per-axis sizes vs its axes): name the config
        src = exp.get("_source") or {}
        if src.get("file") is None or str(src["file"]) in str(e):
            raise
        raise ConfigError(f"{e} ({src['file']}, config_id {src.get('config_id', 0)})") from e



def resolve_model_inputs(exp: Dict[str, Any], task=None, given: Optional[Dict[str, Any]] = None, data: bool = True,
                         defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The model's data-derived arguments (``cond_dim``, ``spatial_dims``, ``out_dim`` ...): the one rule.

    The values come from the first of: the built ``task``'s ``model_inputs()`` (training); the task class's
    ``model_inputs_without_data(exp)`` (e.g. the image task: 2D, no condition, the configured channels); the data
    (dataset and task are built; only with ``data`` and when ``given`` lacks ``cond_dim`` or ``spatial_dims``);
    ``defaults`` (with ``out_dim`` 1). Values in ``given`` that are not None (e.g. from the command line) replace
    them.

    Args:
        exp: validated experiment.
        task: the experiment's built task, when there is one.
        given: values set by the caller, over any other.
        data: whether the data may be read when the task class cannot tell without it.
        defaults: the values when neither the task nor the data gives them.
    """
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if task is not None:
        inputs = task.model_inputs()
    else:
        inputs = get("task", task_type_of(exp)).model_inputs_without_data(exp)
        if inputs is None and data and not {"cond_dim", "spatial_dims"} <= set(given):
            inputs = build_task(exp, build_dataset(exp)).model_inputs()
    if inputs is None:
        inputs = {"out_dim": 1, **(defaults or {})}
    return {**inputs, **given}


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
    model = build_model(exp, inputs=resolve_model_inputs(exp, task=task), output_mean=task.output_mean)
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
        checkpoint, state = load_default_weights(run_dir, map_location)
    else:
        state = load_weights(checkpoint, map_location)
    # a checkpoint of another architecture: name the first differing tensor (not PyTorch's state-dict dump)
    if not isinstance(state, dict):
        raise ConfigError(f"weights '{checkpoint}' hold a {type(state).__name__}, not a state dict of tensors")
    diff = first_tensor_mismatch(state, model.state_dict())
    if diff is not None:
        k, saved, own = diff
        what = (f"tensor '{k}' of the model is missing from the checkpoint" if saved is None else
                f"the checkpoint holds tensor '{k}', which the model does not have" if own is None else
                f"tensor '{k}' has shape {saved} in the checkpoint, {own} in the model built from the config")
        raise ConfigError(f"the model in checkpoint '{checkpoint}' differs from the model of the run's config "
                          f"('{os.path.join(run_dir, 'config.yaml')}', model type '{exp['model']['type']}'): "
                          f"{what}; is it another run's checkpoint?")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights in '{checkpoint}' do not fit the model of '{run_dir}': "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    model.weights_path = checkpoint  # what was loaded (the default rule may have fallen back to a checkpoint)
    return model, exp, meta

