"""The ensemble task (default): f(x, c) over the members of a simulation ensemble, MSE loss, and the
evaluation of tasks/ensemble/evaluation.py (members at full resolution beside the reference predictors)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from tasks.base import Task
from tasks.ensemble.config import EnsembleTestConfig
from util.registry import register


@register("task", "ensemble")
class EnsembleTask(Task):
    """Surrogate of a simulation ensemble: one field per parameter setting (the paper's main task).

    Batches ``x (N_c, N_x, d)``, ``c (N_c, d_c)``, ``v (N_c, N_x, 1)``; loss: MSE. Evaluation (test.py): every
    test and train member reconstructed at full resolution, scored with the reference predictors (mean
    field, nearest member, IDW) beside the model; options in the ``test`` section (keys of EnsembleTestConfig).

    Args:
        dataset: the run's dataset (injected).
    """

    test_config = EnsembleTestConfig

    def __init__(self, dataset):
        super().__init__(dataset)

    @classmethod
    def evaluate(cls, run_dir: str, out_dir: Optional[str] = None, checkpoint: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, overwrite: bool = False, device: Optional[str] = None,
                 progress: bool = True) -> List[Dict[str, Any]]:
        from tasks.ensemble.evaluation import evaluate

        return evaluate(run_dir, out_dir=out_dir, checkpoint=checkpoint, overrides=overrides, overwrite=overwrite,
                        device=device, progress=progress)

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        from tasks.ensemble.evaluation import format_table

        return format_table(rows)
