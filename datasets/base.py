"""The dataset contract: the base class every registered dataset subclasses.

The training loop, the tasks and the run tools know a dataset only through what this class declares (the
shape properties, ``steps_per_epoch``, ``sample_batch``, ``meta``), so they never probe a dataset with
``hasattr`` / ``getattr(..., default)``: the defaults are declared here once, and a dataset overrides only what
differs (a property or a plain class attribute both do).

Shape properties (the model arguments the program injects, ``tasks.base.Task.model_arguments``):

- ``cond_dim``: d_c, condition parameters of a batch's ``c`` (0: a single field, ``c`` is (N_c, 0));
- ``spatial_dims``: d, coordinate columns of a batch's ``x``;
- ``out_dim``: value channels of a batch's ``v`` (default 1);
- ``has_grid``: fields live on a regular grid, so SSIM and grid coordinates apply (default True);
- ``train_value_mean``: mean of the normalized training values (``model.init_output_mean: auto``), None when the
  dataset does not know it (the default).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

__all__ = ["Dataset"]


class Dataset:
    """Base class of the registered datasets (see the module docstring).

    Batches: ``sample_batch(step, rank)`` depends only on (seed, step, rank) (``docs/design.md``, "Batches"), so a
    resumed run sees the same batches; ``steps_per_epoch`` is what ``train.epochs`` counts.
    """

    #: d_c, condition parameters (0 for a single field)
    cond_dim: int = 0
    #: d, coordinate columns of ``x`` (no default: every dataset declares it)
    spatial_dims: int
    #: value channels of ``v``
    out_dim: int = 1
    #: fields live on a regular grid (SSIM and grid coordinates apply)
    has_grid: bool = True
    #: mean of the normalized training values (``init_output_mean: auto``); None: unknown
    train_value_mean: Optional[float] = None

    @property
    def steps_per_epoch(self) -> int:
        """Training steps of one epoch (``train.epochs`` counts these)."""
        raise NotImplementedError(f"{type(self).__name__} does not define steps_per_epoch")

    def sample_batch(self, step: int, rank: int = 0) -> Dict[str, torch.Tensor]:
        """The training batch of (seed, step, rank): a dict of tensors (``x``, ``c``, ``v``, ... per dataset)."""
        raise NotImplementedError(f"{type(self).__name__} does not define sample_batch")

    def meta(self) -> dict:
        """JSON-serializable facts a trained model needs without the data (written to the run's meta.json)."""
        return {}

    def fingerprint(self) -> dict:
        """A JSON fingerprint of the data this dataset read (util.fingerprint): train.py stores it in meta.json
        (``data_fingerprint``); test.py's evaluation (``tasks.base.Task.evaluate``) and ``--resume`` compare it with
        the current data's and name what changed.

        Generic default: the data facts of :meth:`meta` (value range, member counts, shapes; entries that only say
        where the data lives are left out) and the size and content digest of every file named by a string (or
        list of strings) attribute of the dataset, e.g. ``cond_path`` or the member ``files``. A dataset whose
        files are not such attributes, or that knows a cheaper or stronger fingerprint, overrides this.
        """
        from util.fingerprint import data_fingerprint

        return data_fingerprint(self.meta(), _named_files(self))

    def eval_coords(self, resolution: str = "full") -> Optional[torch.Tensor]:
        """Coordinates at which an evaluation predicts a member at ``resolution`` ("full" / "train"), float32
        (N, d) in [-1, 1]; None (the default): every vertex of the regular grid of that resolution."""
        return None


def _named_files(obj) -> List[str]:
    """Existing files named by the instance attributes of ``obj`` that hold a path or a list of paths."""
    out: List[str] = []
    for value in vars(obj).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        if items and all(isinstance(v, str) for v in items):
            out += [v for v in items if v and os.path.isfile(v)]
    return out
