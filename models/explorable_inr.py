"""Explorable-INR baseline (reference ``INR_FG`` with its ``DecompGrid`` encoder), registered as
``explorable_inr``.

Spatial feature: a coarse dense grid times three fine axis-aligned planes (Hadamard product); condition feature:
the product of one feature line per condition parameter; the two are concatenated and decoded by a ReLU MLP with
a sigmoid. Facts: spec/baselines.md section 2; quirks: section 5 items 6-7.

Built from models/components: the planes are :class:`~models.components.grids.Planes`, the condition feature
:func:`~models.components.grids.line_product`, the decoder an :class:`~models.components.mlp.MLP` with the
reference's Xavier-normal init.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from models.components.flat import FlatInputModel
from models.components.grids import Planes, line_product, per_axis, uniform_parameter
from models.components.mlp import AUTO_OUTPUT_MEAN, MLP, check_init_output_mean, init_output_bias, output_activation
from util.config import POSITIVE, VERTICES, in_range
from util.registry import ConfigError, register
from util.sampling import sample_grid

__all__ = ["ExplorableINR", "PAPER_CONFIGS"]

# Paper configurations (configs/*/baselines.yaml, config_id 1): constructor kwargs plus the data's cond_dim.
# Parameters: nyx 14,720,257, mpas 14,720,513, clover 4,464,641 (spec 2.3).
PAPER_CONFIGS = {
    "nyx": dict(cond_dim=3, grid_size=64, plane_size=256, line_size=16),
    "mpas": dict(cond_dim=4, grid_size=64, plane_size=256, line_size=16),
    "clover": dict(cond_dim=6, grid_size=48, plane_size=96, line_size=16),
}


@register("model", "explorable_inr")
class ExplorableINR(FlatInputModel):
    """Explorable-INR: decomposed grid encoder + condition lines + ReLU MLP with sigmoid.

    The defaults reproduce the reference and the paper's Explorable-INR numbers; the only option that changes
    results, ``clamp_conditions``, is off by default (conditions from the loader are in [0, 1] so it changes
    nothing there).

    3D (spatial_dims=3), with x = column 0 (W axis), y, z:
      - grid V (F3, G0, G1, G2) sampled trilinearly at (x, y, z): x indexes G2, z indexes G0;
      - planes P0 (F2, H0, H1) at (y, z), P1 (F2, H0, H2) at (x, z), P2 (F2, H1, H2) at (x, y)
        (the reference comment says "xy, xz, yz"; these are the actual pairs, spec 5.6);
      - all lookups align_corners=True, padding zeros; s = V * P0 * P1 * P2 (F3 == F2 required).
    2D (spatial_dims=2): a 2D grid V (F3, G0, G1) and one plane P (F2, H0, H1), both sampled at
    (x, y), s = V * P: the coarse dense grid times one fine plane, the natural reduction of the 3D design
    (a 2D field has a single axis-aligned plane).
    Condition feature q = prod_k lerp(line_k, c_k) in R^F1; encoder output [s ; q] (spatial first).
    Decoder: fc1 (F3+F1 -> w), ReLU, fc2, ReLU, fc3, ReLU, [dropout], fc4 (w -> 1), sigmoid; Xavier-normal
    weights, biases N(0, 1e-3). Init: V ~ U(-1e-3, 1e-3), planes ~ U(0.999, 1.001), lines ~ U(0.01, 0.25).

    Args:
        cond_dim: number of condition parameters d_c (injected from the data).
        spatial_dims: 2 or 3 (injected from the data).
        grid_size: dense grid size, int or spatial_dims values in array order (D, H, W) = (G0, G1, G2).
            Paper: 64 (Nyx, MPAS), 48 (Clover).
        plane_size: plane axis sizes, int or spatial_dims values in array order (H0, H1, H2).
            Paper: 256 (Nyx, MPAS), 96 (Clover).
        line_size: condition line length, int or cond_dim values. Paper: 16.
        grid_features: F3, channels of the grid. Paper: 32.
        plane_features: F2, channels of the planes; must equal grid_features. Paper: 32.
        line_features: F1, channels of the condition lines. Paper: 16.
        decoder_width: hidden width of the decoder (hard-coded 128 in the reference). Paper: 128.
        dropout: dropout probability after fc3 (reference option, off in every paper config). Paper: 0.
        out_sigmoid: end with a sigmoid (paper: True). False returns fc4's output (the reference would skip
            fc4 and return the 128-d hidden vector, a bug no config triggers; not reproduced).
        clamp_conditions: clamp c to [0, 1] before the line lookups (corrected, spec 5.7). Paper: False.
        init_output_mean: None (default: the reference init), a number, or "auto" (the training mean of the
            normalized values, supplied by the program): the last decoder bias starts where the output equals
            it (logit, through the sigmoid). The guard against an early collapse of the sigmoid output.
    """

    config_rules = dict(
        grid_size=VERTICES, plane_size=VERTICES, line_size=VERTICES, grid_features=POSITIVE,
        plane_features=POSITIVE, line_features=POSITIVE, decoder_width=POSITIVE, dropout=in_range(0, 1))
    """Range rules of the config keys (checked when a config is loaded)."""

    def __init__(self, cond_dim: int, spatial_dims: int = 3, grid_size: Union[int, Sequence[int]] = 64,
                 plane_size: Union[int, Sequence[int]] = 256, line_size: Union[int, Sequence[int]] = 16,
                 grid_features: int = 32, plane_features: int = 32, line_features: int = 16,
                 decoder_width: int = 128, dropout: float = 0.0, out_sigmoid: bool = True,
                 clamp_conditions: bool = False,
                 init_output_mean: Union[float, str, None] = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"explorable_inr supports spatial_dims 2 or 3, got {spatial_dims}")
        if grid_features != plane_features:
            raise ConfigError(f"explorable_inr needs grid_features == plane_features, got {grid_features} and "
                              f"{plane_features}")
        if cond_dim < 1:
            raise ConfigError("explorable_inr needs cond_dim >= 1")
        self.spatial_dims, self.cond_dim = spatial_dims, cond_dim
        self.out_sigmoid = out_sigmoid
        self.clamp_conditions = clamp_conditions
        G = per_axis(grid_size, spatial_dims, "model.grid_size")
        H = per_axis(plane_size, spatial_dims, "model.plane_size")
        L = per_axis(line_size, cond_dim, "model.line_size", "one value per condition parameter")
        self.grid = uniform_parameter((grid_features, *G), -1e-3, 1e-3)  # (F3, G0, G1[, G2])
        if spatial_dims == 3:
            # (array axes of the plane, coordinate columns it is sampled at): z<->H0, y<->H1, x<->H2.
            layout = [((0, 1), (1, 2)), ((0, 2), (0, 2)), ((1, 2), (0, 1))]
        else:
            layout = [((0, 1), (0, 1))]
        self.planes = Planes([torch.empty(plane_features, H[i], H[j]).uniform_(0.999, 1.001)  # (F2, H_i, H_j)
                              for (i, j), _ in layout], [cols for _, cols in layout], padding_mode="zeros")
        self.lines = torch.nn.ParameterList([uniform_parameter((Lk, line_features), 0.01, 0.25) for Lk in L])
        w = decoder_width  # fc1..fc4; Xavier-normal weights, N(0, 1e-3) biases
        self.decoder = MLP([grid_features + line_features, w, w, w, 1], dropout=dropout, init="xavier_normal")
        if check_init_output_mean(init_output_mean) not in (None, AUTO_OUTPUT_MEAN):
            init_output_bias(self.decoder[-1], init_output_mean, sigmoid=self.out_sigmoid)

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """Encoder output [s ; q]: (n, d + d_c) -> (n, F3 + F1)."""
        x = u[None, :, :self.spatial_dims]  # (1, n, d)
        s = sample_grid(self.grid, x, padding_mode="zeros")  # (1, n, F3)
        s = self.planes.product(x, start=s)[0]               # (n, F3)
        q = line_product(self.lines, u[:, self.spatial_dims:], clamp=self.clamp_conditions)  # (n, F1)
        return torch.cat([s, q.to(s.dtype)], dim=-1)

    def forward_flat(self, u: torch.Tensor) -> torch.Tensor:
        """u: (n, spatial_dims + cond_dim) -> (n, 1)."""
        return output_activation(self.decoder(self.encode(u)), "sigmoid" if self.out_sigmoid else "none")
