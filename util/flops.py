"""FLOPs per point with fvcore (spec 6): one multiply-add counts as one flop."""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Dict

import torch

log = logging.getLogger("flops")


@contextlib.contextmanager
def _quiet_fvcore():
    """fvcore uses torch.jit (at import and when tracing), which newer PyTorch marks deprecated: hide that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        yield


@torch.no_grad()
def count_flops(model: torch.nn.Module, cond_dim: int, spatial_dims: int, n_cond: int = 100,
                n_points: int = 1000, seed: int = 0, plain: bool = True) -> Dict[str, float]:
    """fvcore FlopCountAnalysis of one forward pass on ``n_cond`` conditions x ``n_points`` coordinates.

    Models with ``bake()`` are baked first: the bake is a one-time cost and is excluded (spec 6).
    ``plain=True`` counts the model's plain forward (``fast_paths = False`` where the model has fast paths),
    which is what the paper's numbers measure; the fast baked path folds the spatial fusion layer into the grid
    and costs fewer FLOPs per point.

    Returns:
        dict(flops (the whole batch), tflops_per_1e9_points, params (trainable parameter count before baking),
        uncounted (operator names fvcore skipped)).
    """
    with _quiet_fvcore():
        from fvcore.nn import FlopCountAnalysis

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    if plain:  # FieldModel.fast_paths (False already on models without a fast path)
        model.fast_paths = False
    # FieldModel.bake
    model.bake()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_cond, n_points, spatial_dims, generator=g) * 2 - 1
    c = torch.rand(n_cond, cond_dim, generator=g)
    fca = FlopCountAnalysis(model, (x, c))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with _quiet_fvcore():
        total = float(fca.total())
    per_point = total / (n_cond * n_points)
    return dict(flops=total, tflops_per_1e9_points=per_point * 1e9 / 1e12, params=params,
                uncounted=sorted(fca.unsupported_ops().keys()))
