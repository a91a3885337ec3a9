"""The model contract, written down once: every registered model is a :class:`FieldModel`.

A field model maps coordinates (and, for conditional fields, a condition vector) to values::

    forward(x: (B, N, d), c: (B, d_c)) -> (B, N, C)        # d_c = 0 for a single field (images, NeRF)

The program (util/, tasks/) relies only on what is declared here, never on ``hasattr`` probes:

- ``bake()`` / ``unbake()`` / ``is_baked``: models with an offline refinement stage (DRR) cache it in
  ``bake`` (eval mode, no grad) and drop the cache in ``unbake``; entering training mode unbakes. The default
  is "nothing to bake" (``is_baked`` is True after ``bake()`` so callers treat every model alike).
- ``param_groups()``: parameters by component name, for ``optim.param_groups`` (default: none named).
- ``training_stats()``: scalars logged to TensorBoard at each log interval (default: none).
- ``predict_grid(shape, c, chunk_size)``: one field on the vertices of a lattice, in chunks (the default
  generates coordinates per chunk and calls ``forward``; fast models override it).
- ``fast_paths``: a switch benchmarks and FLOP counts turn off to measure the plain path (default: no fast path).
- ``weights_path``: set by util.build.load_trained_model to the file whose weights were loaded.

Coordinates follow docs/design.md: column 0 indexes the last array axis, [-1, 1], align corners.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from util.sampling import axis_coords

__all__ = ["FieldModel"]


class FieldModel(nn.Module):
    """Base class of every registered model (see the module docstring for the contract)."""

    #: False on models without an alternative fast path; models with one set an instance attribute.
    fast_paths: bool = False
    #: file the weights were loaded from (set by util.build.load_trained_model), None when built fresh.
    weights_path: Optional[str] = None

    def __init__(self):
        super().__init__()
        self._field_baked = False

    # ------------------------------------------------------------------------------------------ baking
    def bake(self) -> None:
        """Switch to eval mode and cache whatever does not depend on the query (default: nothing to cache)."""
        self.eval()
        self._field_baked = True

    def unbake(self) -> None:
        """Drop the cache made by :meth:`bake`."""
        self._field_baked = False

    @property
    def is_baked(self) -> bool:
        """True between :meth:`bake` and :meth:`unbake` (or the next ``train()``)."""
        return bool(getattr(self, "_field_baked", False))

    def train(self, mode: bool = True):
        """``nn.Module.train``; entering training mode drops the bake cache."""
        if mode:
            self.unbake()
        return super().train(mode)

    # ----------------------------------------------------------------------------------- optimization
    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Parameters by component name (keys usable in ``optim.param_groups``); default: none named."""
        return {}

    def training_stats(self) -> Dict[str, float]:
        """Scalars logged to TensorBoard at each log interval (name -> value); default: none."""
        return {}

    # ------------------------------------------------------------------------------------------ queries
    def predict_grid(self, shape: Sequence[int], c: Tensor, chunk_size: int = 1 << 16,
                     dtype: Optional[torch.dtype] = None, out: Optional[Tensor] = None) -> Tensor:
        """One field on the vertices of the lattice ``shape`` (array order).

        Same values as ``forward(grid_coords(shape)[None], c)`` reshaped to the lattice, computed in chunks;
        coordinates are generated per chunk, never all at once.

        Args:
            shape: lattice shape, ``(D, H, W)`` or ``(H, W)``.
            c: condition of the field, ``(d_c,)`` or ``(1, d_c)`` (``d_c`` may be 0).
            chunk_size: points per ``forward`` call.
            dtype: reduced compute precision (autocast to this dtype; None: the model's own).
            out: optional preallocated result tensor to fill.

        Returns:
            ``shape`` for a single-channel field, ``(*shape, C)`` otherwise, on the model's device.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        shape = [int(s) for s in shape]
        n = 1
        for s in shape:
            n *= s
        c = c.reshape(1, -1)
        device = c.device
        strides = []
        acc = 1
        for s in reversed(shape):
            strides.append(acc)
            acc *= s
        strides = strides[::-1]
        axes = [torch.from_numpy(axis_coords(s).astype(np.float32)).to(device) for s in shape]
        flat = None
        for start in range(0, n, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, n), device=device)
            cols = [axes[a][(idx // strides[a]) % shape[a]] for a in range(len(shape))]
            x = torch.stack(cols[::-1], dim=-1)  # column 0 = last array axis
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                y = self(x[None], c)[0]
            if flat is None:
                flat = torch.empty(n, y.shape[-1], dtype=y.dtype, device=y.device)
            flat[start:start + len(idx)] = y
        res = flat.reshape(*shape) if flat.shape[-1] == 1 else flat.reshape(*shape, flat.shape[-1])
        if out is not None:
            out.copy_(res)
            return out
        return res
