"""The task contract: what a run learns (kind ``task`` in the registry; config section ``task:``, default
``{type: ensemble}``).

A run is one straight line: load and validate the config (util/config.py) -> build the components
(util/runs.build_components: dataset, then the task around it, then the model with the arguments the task
reads from the data) -> the one training loop (util/training.py). The loop knows nothing about batch keys or
losses; per step it asks the task::

    batch = task.batch(step, rank, device)
    out = task.training_step(model, batch, step)     # StepOutput(loss, terms, output), or None: skip the step

and it logs ``out.terms`` (a term named ``mse`` also gives the logged PSNR). After training, test.py calls the
task class's :meth:`Task.evaluate` on the run directory and prints :meth:`Task.format_table`. A task's state
that must survive a resume (:meth:`Task.state_dict`) is saved in every checkpoint.

To add a task: subclass :class:`Task`, register it (``@register("task", "name")``), list its module in
``tasks/__init__.py``, give it a ``test_config`` dataclass (the keys of the ``test:`` section) and an
``evaluate`` class method.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor


class StepOutput(NamedTuple):
    """What :meth:`Task.training_step` returns.

    Attributes:
        loss: the scalar to minimize (fp32).
        terms: named detached scalars logged at every log interval (``mse`` also gives the logged PSNR).
        output: the model output the collapse detector looks at (None: not checked).
    """

    loss: Tensor
    terms: Dict[str, Tensor]
    output: Optional[Tensor] = None


class Task:
    """Base class of every task: regression of a field f(x, c) -> v with the MSE loss.

    Batches are dicts of tensors ``x (B, N, d)``, ``c (B, d_c)``, ``v (B, N, C)`` (the dataset's
    ``sample_batch(step, rank)``); subclasses override what differs.

    Class attributes:
        test_config: dataclass of the ``test:`` section's keys (validated when the config is loaded).
        model_arguments: model constructor arguments the program sets from the data (never from a config);
            :meth:`model_inputs` gives their values, injected where the model's signature accepts them.
        ddp_find_unused_parameters: True when some parameters get no gradient in some steps (e.g. MoE-INR's
            experts in its label pre-training): multi-process training then tells DDP to look for them.
        has_validation: True when :meth:`validate` scores a validation split (``train.val_every_steps``).

    Multi-process training (``accelerate launch``): :meth:`training_step` receives the DDP-wrapped model and must
    run every forward pass through it (``model(...)``), never through the unwrapped module, or the processes'
    gradients are not averaged; the loop checks at every checkpoint that all processes hold the same weights.
    """

    test_config: Optional[type] = None
    ddp_find_unused_parameters: bool = False
    has_validation: bool = False
    model_arguments = ("cond_dim", "spatial_dims", "out_dim")

    def __init__(self, dataset):
        self.dataset = dataset

    # ------------------------------------------------------------------------------------- model inputs
    def model_inputs(self) -> Dict[str, int]:
        """Model arguments set by the program from the data (see ``model_arguments``)."""
        ds = self.dataset
        return {"cond_dim": int(ds.cond_dim), "spatial_dims": int(ds.spatial_dims),
                "out_dim": int(getattr(ds, "out_dim", 1))}

    @classmethod
    def model_inputs_without_data(cls, exp: Dict[str, Any]) -> Optional[Dict[str, int]]:
        """The model inputs when they follow from the config alone (None: the data is needed), e.g. for FLOP
        counts of a paper config whose data is not here."""
        return None

    @property
    def output_mean(self) -> Optional[float]:
        """Training mean of the normalized targets (replaces ``init_output_mean: auto``); None if unknown."""
        return getattr(self.dataset, "train_value_mean", None)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch (``train.epochs`` counts these)."""
        return int(self.dataset.steps_per_epoch)

    # ----------------------------------------------------------------------------------------- training
    def batch(self, step: int, rank: int, device) -> Dict[str, Tensor]:
        """The training batch of (step, rank), moved to ``device``."""
        return {k: v.to(device, non_blocking=True) for k, v in self.dataset.sample_batch(step, rank=rank).items()}

    def predict(self, model, batch: Dict[str, Tensor]) -> Tensor:
        """Model output for a batch: (B, N, C)."""
        return model(batch["x"], batch["c"])

    def loss(self, pred: Tensor, batch: Dict[str, Tensor]) -> StepOutput:
        """MSE in fp32 over every point and channel."""
        mse = F.mse_loss(pred.float(), batch["v"])
        return StepOutput(mse, {"mse": mse.detach()}, pred)

    def training_step(self, model, batch: Dict[str, Tensor], step: int) -> Optional[StepOutput]:
        """Forward and loss of one step (the loop runs it under autocast, then backward and the optimizer).

        Return None to skip the step (no backward, no optimizer or scheduler step), e.g. when a batch holds no
        samples.
        """
        return self.loss(self.predict(model, batch), batch)

    def validate(self, model) -> Optional[Dict[str, float]]:
        """Scores of the model (in eval mode, no gradients needed) on the dataset's validation split, for
        ``train.val_every_steps``: {name: value}, e.g. ``mse`` and ``psnr``. Tasks that implement it set
        ``has_validation = True``; the base task has none."""
        return None

    @classmethod
    def count_flops(cls, model, inputs: Dict[str, Any], n_cond: int = 100, n_points: int = 1000) -> Dict[str, Any]:
        """test_flops.py's row for one model: fvcore multiply-adds of one query per point, as
        ``{"tflops_per_1e9_points", "params", "uncounted"}`` (default: f(x, c) on ``n_cond`` conditions x
        ``n_points`` coordinates, util.flops.count_flops); tasks whose query is not f(x, c) override it."""
        from util.flops import count_flops

        return count_flops(model, inputs["cond_dim"], inputs["spatial_dims"], n_cond, n_points)

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Task state saved in every checkpoint (default: none)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""

    # --------------------------------------------------------------------------------------- evaluation
    @classmethod
    def evaluate(cls, run_dir: str, out_dir: Optional[str] = None, checkpoint: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, overwrite: bool = False, device: Optional[str] = None,
                 progress: bool = True) -> List[Dict[str, Any]]:
        """Score a trained run, write its result files (``<run_dir>/eval`` by default) and return the rows."""
        raise NotImplementedError(f"task {cls.__name__} has no evaluation")

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        """The printed table of :meth:`evaluate`'s rows."""
        keys = list(rows[0]) if rows else []
        lines = ["  ".join(keys)] + ["  ".join(str(r.get(k, "")) for k in keys) for r in rows]
        return "\n".join(lines)
