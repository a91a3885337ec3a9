"""K-Planes baseline (reference ``KPlaneField``), registered as model ``kplanes``.

Every axis of the flat input u = [x, c] (spatial_dims + cond_dim axes) is a grid axis. One feature plane per
unordered axis pair, at several spatial scales; planes are multiplied within a scale and the scales are
concatenated, then a ReLU MLP decodes one value. Facts: spec/baselines.md section 1; quirks: section 5 items 1-2.

Built from models/components: the planes are :class:`~models.components.grids.Planes`, the decoder an
:class:`~models.components.mlp.MLP`, the flat input ``u = [x, c]`` that of
:class:`~models.components.flat.FlatInputModel` (shared by the three baselines).
Grid lookups go through ``util.sampling.sample_grid`` (bilinear/trilinear, align_corners=True).
"""
from __future__ import annotations

import itertools
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

from models.components.flat import FlatInputModel, flat_input  # noqa: F401  (flat_input: public here too)
from models.components.grids import Planes, per_axis
from models.components.mlp import MLP, output_activation
from util.config import NON_NEGATIVE, POSITIVE, VERTICES, low_high, one_of
from util.registry import ConfigError, register

__all__ = ["KPlanes", "PAPER_CONFIGS"]

# Paper configurations (configs/*/baselines.yaml, config_id 0): constructor kwargs plus the data's cond_dim.
# Trainable parameters: nyx 12,101,505, mpas 13,493,505, clover 6,794,625 (spec 1.5).
PAPER_CONFIGS = {
    "nyx": dict(cond_dim=3, spatial_resolution=32, cond_resolution=25, feature_dim=32, multiscale=(1, 2, 4, 8)),
    "mpas": dict(cond_dim=4, spatial_resolution=32, cond_resolution=25, feature_dim=32, multiscale=(1, 2, 4, 8)),
    "clover": dict(cond_dim=6, spatial_resolution=16, cond_resolution=25, feature_dim=32, multiscale=(1, 2, 4, 8)),
}


@register("model", "kplanes")
class KPlanes(FlatInputModel):
    """K-Planes over the joint (space, condition) domain, as in the DRR-Net reference baseline.

    The defaults reproduce the reference (and the paper's K-Planes numbers) including its quirks
    (spec 5.1-5.2); ``cond_mapping='full'`` and ``plane_init='ones'``/``'kplanes'`` are the corrected variants.

    Input u = [x (spatial_dims columns, column 0 = W axis), c (cond_dim columns)] has D = spatial_dims + cond_dim
    axes. Axis a has resolution R_a * m at scale m for spatial axes and R_a for condition axes. For every pair
    a < b (itertools.combinations order) the plane tensor has shape (F, R_b, R_a) and is sampled at
    (u_a, u_b): bilinear, align_corners=True, padding 'border'. Features: Hadamard product over the D(D-1)/2
    planes of a scale, concatenated over the scales (or summed, ``concat_features=False``). Decoder:
    ``decoder_layers`` x [Linear-ReLU] of width ``decoder_width``, then Linear(., 1); no output activation.

    Not reproduced: the reference's frozen, unused 2-element ``aabb`` parameter, so ``parameters()`` counts
    exactly the trainable parameters (the reference's ``parameters()`` count is 2 higher).
    2D fields (spatial_dims=2) work the same way, with 2 + cond_dim axes.

    Args:
        cond_dim: number of condition parameters d_c (injected from the data).
        spatial_dims: number of spatial dims d (injected from the data; any d >= 1 works, 2 and 3 are tested).
        spatial_resolution: base plane resolution of the spatial axes at scale 1, an int or d values in
            coordinate-column order (W axis first). Paper: 32 (Nyx, MPAS), 16 (Clover).
        cond_resolution: resolution of each condition axis (never multiplied by the scale), int or d_c values.
            Paper: 25.
        feature_dim: F, channels per plane. Paper: 32.
        multiscale: spatial resolution multipliers, one plane set per entry. Paper: (1, 2, 4, 8).
        concat_features: concatenate the scales (paper, decoder input F * len(multiscale)); False sums them.
        decoder_width: hidden width of the decoder. Paper: 128.
        decoder_layers: number of hidden Linear-ReLU layers. Paper: 3.
        plane_init: 'reference' (paper): every plane U(init_range). The product over 15-36 planes is ~0.3^P,
            i.e. 1e-8 (Nyx) to 1e-19 (Clover) at init (spec 5.2). 'kplanes': original K-Planes rule, planes
            that touch a condition axis = 1, space-only planes U(init_range). 'ones': every plane 1 + U(-0.1, 0.1).
        init_range: (low, high) of the uniform init. Paper: (0.1, 0.5).
        cond_mapping: 'reference' (paper): c goes into grid_sample as is, so c in [0, 1] reaches only the upper
            half of each condition axis (texels (R-1)/2 .. R-1, spec 5.1). 'full': use 2c - 1, the whole axis.
        output_sigmoid: end with a sigmoid (the other two baselines do; the paper's K-Planes does not).
    """

    config_rules = dict(
        spatial_resolution=VERTICES, cond_resolution=VERTICES, feature_dim=POSITIVE, multiscale=POSITIVE,
        decoder_width=POSITIVE, decoder_layers=NON_NEGATIVE, init_range=low_high,
        plane_init=one_of("reference", "kplanes", "ones"), cond_mapping=one_of("reference", "full"))
    """Range rules of the config keys (checked when a config is loaded)."""

    def __init__(self, cond_dim: int, spatial_dims: int = 3, spatial_resolution: Union[int, Sequence[int]] = 32,
                 cond_resolution: Union[int, Sequence[int]] = 25, feature_dim: int = 32,
                 multiscale: Sequence[int] = (1, 2, 4, 8), concat_features: bool = True, decoder_width: int = 128,
                 decoder_layers: int = 3, plane_init: str = "reference", init_range: Sequence[float] = (0.1, 0.5),
                 cond_mapping: str = "reference", output_sigmoid: bool = False):
        super().__init__()
        if spatial_dims < 1 or cond_dim < 0 or spatial_dims + cond_dim < 2:
            raise ConfigError(f"kplanes needs at least 2 input axes, got spatial_dims={spatial_dims}, "
                              f"cond_dim={cond_dim}")
        if plane_init not in ("reference", "kplanes", "ones"):
            raise ConfigError(f"model.plane_init must be 'reference', 'kplanes' or 'ones', got {plane_init!r}")
        if cond_mapping not in ("reference", "full"):
            raise ConfigError(f"model.cond_mapping must be 'reference' or 'full', got {cond_mapping!r}")
        self.spatial_dims, self.cond_dim = spatial_dims, cond_dim
        self.cond_mapping = cond_mapping
        self.output_sigmoid = output_sigmoid
        self.concat_features = concat_features
        self.multiscale = [int(m) for m in multiscale]
        res = per_axis(spatial_resolution, spatial_dims, "model.spatial_resolution") + \
            per_axis(cond_resolution, cond_dim, "model.cond_resolution", "one value per condition parameter")
        D = spatial_dims + cond_dim
        self.pairs: List[Tuple[int, int]] = list(itertools.combinations(range(D), 2))
        lo, hi = float(init_range[0]), float(init_range[1])
        self.scales = nn.ModuleList()  # scales[s]: Planes, plane i (F, R_b, R_a) sampled at (u_a, u_b)
        for m in self.multiscale:
            r = [res[a] * m if a < spatial_dims else res[a] for a in range(D)]
            planes = []
            for a, b in self.pairs:
                p = torch.empty(feature_dim, r[b], r[a])
                if plane_init == "ones":
                    nn.init.uniform_(p, 0.9, 1.1)
                elif plane_init == "kplanes" and b >= spatial_dims:
                    nn.init.ones_(p)
                else:
                    nn.init.uniform_(p, lo, hi)
                planes.append(p)
            self.scales.append(Planes(planes, self.pairs, padding_mode="border"))
        in_dim = feature_dim * (len(self.multiscale) if concat_features else 1)
        self.decoder = MLP([in_dim] + [decoder_width] * decoder_layers + [1])  # PyTorch's default init

    def features(self, u: torch.Tensor) -> torch.Tensor:
        """Plane features f of flat inputs u: (n, D) -> (n, F * n_scales) (or (n, F) when summed)."""
        if self.cond_mapping == "full":
            u = torch.cat([u[:, :self.spatial_dims], 2 * u[:, self.spatial_dims:] - 1], dim=-1)
        u = u[None]  # (1, n, D)
        feats = [planes.product(u)[0] for planes in self.scales]  # (n, F) each
        return torch.cat(feats, dim=-1) if self.concat_features else torch.stack(feats).sum(0)

    def forward_flat(self, u: torch.Tensor) -> torch.Tensor:
        """u: (n, spatial_dims + cond_dim) -> (n, 1)."""
        return output_activation(self.decoder(self.features(u)), "sigmoid" if self.output_sigmoid else "none")
