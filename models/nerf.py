"""Radiance fields for NeRF (spec vision 3.2-3.3): the contract the NeRF task renders through, and vanilla NeRF.

A radiance field maps world points (and view directions) to a density and a color. On top of the
:class:`models.base.FieldModel` contract it provides::

    density(x: (S, 3)) -> sigma (S,)                                  # visibility / occupancy passes (no grad)
    rgb_sigma(x: (S, 3), d: (S, 3)) -> (rgb (S, 3), sigma (S,))       # the rendering pass
    forward(x: (B, N, 3), c: (B, 0), d: (B, N, 3)) -> (B, N, 4)       # [r, g, b, sigma], for generic callers

``d`` are unit view directions (camera to point). The NeRF task (tasks/nerf.py) calls ``forward`` for the
rendering pass (so a wrapped data-parallel model synchronizes its gradients) and ``density`` on the unwrapped
model.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from models.base import FieldModel
from util.registry import register

__all__ = ["RadianceField", "frequency_encoding", "VanillaNeRF"]


class RadianceField(FieldModel):
    """Base class of the radiance fields (see the module docstring)."""

    def density(self, x: Tensor) -> Tensor:
        """Density at world points ``(S, 3)``: ``(S,)``, >= 0."""
        raise NotImplementedError

    def rgb_sigma(self, x: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
        """Color in [0, 1] ``(S, 3)`` and density ``(S,)`` at world points ``x (S, 3)`` seen along ``d (S, 3)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, c: Optional[Tensor] = None, d: Optional[Tensor] = None) -> Tensor:
        """``(B, N, 4)`` = [rgb, sigma] at points ``x (B, N, 3)`` along directions ``d (B, N, 3)`` (default +z:
        fields whose color depends on the direction need ``d``); ``c (B, 0)`` is unused (a single scene)."""
        if d is None:
            d = torch.zeros_like(x)
            d[..., 2] = 1.0
        rgb, sigma = self.rgb_sigma(x.reshape(-1, 3), d.reshape(-1, 3))
        return torch.cat([rgb, sigma[:, None].to(rgb.dtype)], dim=-1).reshape(*x.shape[:-1], 4)


def frequency_encoding(x: Tensor, n_freqs: int) -> Tensor:
    """``[x, sin(2^k x) for k < n_freqs, cos(2^k x) for k < n_freqs]`` (all sines first, frequency-major, no pi):
    ``(..., D)`` -> ``(..., D (1 + 2 n_freqs))`` (spec vision 3.2)."""
    if n_freqs == 0:
        return x
    freqs = 2.0 ** torch.arange(n_freqs, dtype=x.dtype, device=x.device)
    xb = (x[..., None, :] * freqs[:, None]).reshape(*x.shape[:-1], n_freqs * x.shape[-1])
    return torch.cat([x, torch.sin(xb), torch.cos(xb)], dim=-1)


@register("model", "vanilla_nerf")
class VanillaNeRF(RadianceField):
    """Vanilla NeRF MLP (spec vision 3.2, config 3 of ``train_mlp_nerf.py``; ~596k parameters with the defaults).

    Raw world positions (no box normalization, no inside mask), position encoding with ``pos_freqs`` octaves (63
    values), direction encoding with ``dir_freqs`` (27). Trunk: ``depth`` Linear+ReLU layers of ``width``, the
    position encoding concatenated again to the input of layer ``skip_layer + 1``; density ReLU(Linear width ->
    1); color: Linear width -> width (bottleneck, no activation) || direction encoding -> Linear ->
    ``width // 2`` + ReLU -> Linear -> 3 -> sigmoid. Xavier-uniform weights, zero biases.

    Args:
        width: trunk width (256).
        depth: trunk layers (8).
        skip_layer: the position encoding re-enters after this many trunk layers (5; 0 disables).
        pos_freqs: octaves of the position encoding (10).
        dir_freqs: octaves of the direction encoding (4).
    """

    def __init__(self, width: int = 256, depth: int = 8, skip_layer: int = 5, pos_freqs: int = 10,
                 dir_freqs: int = 4):
        super().__init__()
        for key, val, lo in (("width", width, 2), ("depth", depth, 1), ("skip_layer", skip_layer, 0),
                             ("pos_freqs", pos_freqs, 0), ("dir_freqs", dir_freqs, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ValueError(f"model.{key} must be an integer >= {lo}, got {val!r}")
        if skip_layer >= depth:
            raise ValueError(f"model.skip_layer must be < model.depth ({depth}), got {skip_layer}")
        self.pos_freqs, self.dir_freqs, self.skip_layer = pos_freqs, dir_freqs, skip_layer
        p_dim, d_dim = 3 * (1 + 2 * pos_freqs), 3 * (1 + 2 * dir_freqs)
        layers = []
        for i in range(depth):
            fan_in = p_dim if i == 0 else width + (p_dim if skip_layer and i == skip_layer else 0)
            layers.append(nn.Linear(fan_in, width))
        self.trunk = nn.ModuleList(layers)
        self.sigma_head = nn.Linear(width, 1)
        self.bottleneck = nn.Linear(width, width)
        self.color_hidden = nn.Linear(width + d_dim, width // 2)
        self.color_out = nn.Linear(width // 2, 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _trunk(self, x: Tensor) -> Tensor:
        enc = frequency_encoding(x, self.pos_freqs)
        h = enc
        for i, layer in enumerate(self.trunk):
            if self.skip_layer and i == self.skip_layer:
                h = torch.cat([h, enc], dim=-1)
            h = torch.relu(layer(h))
        return h

    def density(self, x: Tensor) -> Tensor:
        return torch.relu(self.sigma_head(self._trunk(x)))[:, 0]

    def rgb_sigma(self, x: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
        h = self._trunk(x)
        sigma = torch.relu(self.sigma_head(h))[:, 0]
        g = torch.cat([self.bottleneck(h), frequency_encoding(d, self.dir_freqs)], dim=-1)
        rgb = torch.sigmoid(self.color_out(torch.relu(self.color_hidden(g))))
        return rgb, sigma
