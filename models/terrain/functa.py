"""Functa (spec huvr 2): a shared SIREN with shift modulations from one global latent, fitted per tile by a few
meta-learned inner gradient steps (no hypernetwork; the payload is the latent, 512 floats in the paper).

    shift_l = M_l z                     (per-layer linear maps, z in R^latent_dim)
    h_{l+1} = sin(omega_0 (W_l h_l + b_l + shift_l))     for every sine layer; out = W_out h + b_out

(whether the shift sits inside the omega_0 product is NR: ours.) Encoding a tile: z_0 = 0, then ``inner_steps``
steps z_{k+1} = z_k - lr (.) grad_z MSE(decode(z_k), tile) with a meta-learned per-element learning rate ``lr``
(Meta-SGD). Training back-propagates through the inner loop (second order; ``first_order: true`` drops the
second-order terms). Evaluation runs the same inner loop (it needs gradients also under ``torch.no_grad``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.components.siren import SIREN_INITS, SirenMLP
from models.terrain.common import AmortizedTerrainINR, Stage, _check_float, _check_int, pixel_coords
from util.registry import ConfigError, register

__all__ = ["Functa"]


@register("model", "functa")
class Functa(AmortizedTerrainINR):
    """Functa: meta-learned shared SIREN + per-tile shift-modulation latent (spec huvr 2).

    Args:
        tile_size: tile side T in pixels (injected from the data by the terrain task).
        spatial_dims: must be 2 (injected).
        latent_dim: size of the per-tile latent z (paper 512 = the payload).
        width: SIREN width (NR; 512 in the paper config, the Functa image default, which fits Table 2).
        hidden_layers: sine layers after the first (NR; 14 in the paper config: 15 sine layers, Table 2).
        omega_0: SIREN frequency.
        inner_steps: inner-loop gradient steps per tile (NR; 3 fits Table 2's Infer = 10 x one decoder pass).
        inner_lr_init: initial value of every per-element inner learning rate (meta-learned).
        first_order: drop the second-order terms of the meta-gradient (cheaper; the paper is second order).
        siren_init: SirenMLP weight init (``siren``, ``reference``, ``xavier``).
    """

    continuous = True
    inner_loop = True

    def __init__(self, tile_size: int = 256, spatial_dims: int = 2, latent_dim: int = 512, width: int = 512,
                 hidden_layers: int = 14, omega_0: float = 30.0, inner_steps: int = 3, inner_lr_init: float = 1e-2,
                 first_order: bool = False, siren_init: str = "siren"):
        super().__init__("functa", tile_size, spatial_dims)
        for key, val, lo in (("latent_dim", latent_dim, 1), ("width", width, 1), ("hidden_layers", hidden_layers, 0),
                             ("inner_steps", inner_steps, 1)):
            _check_int("functa", key, val, lo)
        _check_float("functa", "omega_0", omega_0)
        _check_float("functa", "inner_lr_init", inner_lr_init)
        if not isinstance(first_order, bool):
            raise ConfigError(f"model.first_order must be true or false, got {first_order!r}")
        if siren_init not in SIREN_INITS:
            raise ConfigError(f"model.siren_init must be one of {', '.join(SIREN_INITS)}; got {siren_init!r}")
        self.payload_shape = (1, int(latent_dim))
        self.inner_steps, self.first_order = int(inner_steps), first_order
        self.siren = SirenMLP(2, width, hidden_layers, 1, omega_0=omega_0, init=siren_init, bias_init="default")
        n_sine = hidden_layers + 1
        self.shift_maps = nn.Linear(latent_dim, n_sine * width)  # the per-layer maps, stacked
        nn.init.zeros_(self.shift_maps.bias)
        self.inner_lr = nn.Parameter(torch.full((latent_dim,), float(inner_lr_init)))
        self.width, self.n_sine = int(width), n_sine
        self.register_buffer("coords", pixel_coords(self.tile_size), persistent=False)

    def decode_points(self, z: Tensor, x: Tensor) -> Tensor:
        """Modulated SIREN at x (B, M, 2) with latent z (B, 1, latent_dim) -> (B, M, 1)."""
        shifts = self.shift_maps(z[:, 0]).reshape(z.shape[0], self.n_sine, 1, self.width)
        w0 = self.siren.omega_0
        h = x
        W, b = self.siren.weights, self.siren.biases
        for layer in range(self.n_sine):
            h = torch.sin(w0 * (F.linear(h, W[layer], b[layer]) + shifts[:, layer]))
        return F.linear(h, W[-1], b[-1])

    def decode(self, z: Tensor) -> Tensor:
        B, T = z.shape[0], self.tile_size
        return self.decode_points(z, self.coords.expand(B, -1, -1)).reshape(B, 1, T, T)

    def inner_loss(self, z: Tensor, tiles: Tensor) -> Tensor:
        """Sum over tiles of the per-tile mean squared error (each tile's latent sees its own MSE gradient)."""
        return ((self.decode(z) - tiles) ** 2).mean(dim=(1, 2, 3)).sum()

    def encode(self, tiles: Tensor, steps: int = None) -> Tensor:
        """The inner loop from z = 0; differentiable (second order) in training mode."""
        self.check_tiles(tiles)
        steps = self.inner_steps if steps is None else int(steps)
        create = self.training and not self.first_order
        with torch.enable_grad():
            z = torch.zeros(tiles.shape[0], 1, self.payload_shape[1], device=tiles.device, dtype=tiles.dtype,
                            requires_grad=True)
            for _ in range(steps):
                loss = self.inner_loss(z, tiles)
                (g,) = torch.autograd.grad(loss, z, create_graph=create)
                z = z - self.inner_lr * g
                if not self.training:
                    z = z.detach().requires_grad_(True)
        return z if self.training else z.detach()

    def training_stats(self) -> Dict[str, float]:
        return {"inner_lr_mean": float(self.inner_lr.detach().mean())}

    def flop_modules(self) -> Dict[str, nn.Module]:
        return {"neudec": Stage(self, "decode")}
