"""The ensemble task (default): f(x, c) over the members of a simulation ensemble, MSE loss, and the
evaluation of tasks/ensemble/evaluation.py (members at full resolution beside the reference predictors)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from tasks.base import EvalContext, Scores, Task
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
    def score(cls, ctx: EvalContext) -> Scores:
        """tasks/ensemble/evaluation.score: every member reconstructed and scored beside the reference
        predictors; ``metrics.csv`` and ``members.csv``."""
        from tasks.ensemble.evaluation import score

        return score(ctx)

    @classmethod
    def result_files(cls, test_config) -> Sequence[str]:
        from tasks.ensemble.evaluation import RESULT_FILES

        return RESULT_FILES

    @classmethod
    def report_tables(cls, group, runs, flops: bool = False):
        """``python -m util.results``: this task's tables (tasks/ensemble/tables.py)."""
        from tasks.ensemble.tables import report_tables

        return report_tables(group, runs, flops)

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        from tasks.ensemble.evaluation import format_table

        return format_table(rows)
