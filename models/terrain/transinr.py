"""TransINR (spec huvr 2): one transformer over the tile's patch tokens plus learnable weight tokens predicts the
weights of a ReLU MLP coordinate decoder; no separate encoder, no bottleneck.

The MLP has ``len(weight_groups)`` linear layers (input: the pixel coordinate with Fourier features; hidden
width ``mlp_width``; output 1). Layer l's base weight (with its bias as an extra input row), shape
(in_l + 1, out_l), is split into ``weight_groups[l]`` column groups, one weight token each; the token's output
is mapped by a per-layer linear head to a vector u in R^(in_l + 1) that multiplies the group's base columns,
and every column is then L2-normalized (the TransINR weight-grouping scheme, written from its description).
The payload is the specialized weight-token state: sum(weight_groups) x width floats (paper config:
257 x 768 = 197,376).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.terrain.common import AmortizedTerrainINR, TransformerBlock, _check_float, _check_int, fourier_features
from models.terrain.common import Stage, patchify, pixel_coords
from util.registry import ConfigError, register

__all__ = ["TransINR"]


@register("model", "transinr")
class TransINR(AmortizedTerrainINR):
    """TransINR: patch tokens + weight tokens -> transformer -> per-tile MLP weights (spec huvr 2).

    Args:
        tile_size: tile side T in pixels (injected from the data by the terrain task).
        spatial_dims: must be 2 (injected).
        patch_size: patch side of the input tokens (paper: ViT-style 16).
        width: transformer width (paper config 768; the payload is sum(weight_groups) x width).
        depth: transformer blocks (NR; 12 in the paper config, which fits Table 2's Enc. GFLOPs).
        heads: attention heads.
        mlp_ratio: MLP hidden width / width in every transformer block.
        mlp_width: hidden width of the ReLU coordinate MLP.
        weight_groups: weight tokens per MLP layer (one entry per linear layer; each hidden width must be
            divisible by its group count; the output layer has 1 column so its entry must be 1). Paper config:
            [64, 64, 64, 64, 1] = 257 tokens.
        coord_freqs: Fourier-feature octaves of the input coordinate.
    """

    def __init__(self, tile_size: int = 256, spatial_dims: int = 2, patch_size: int = 16, width: int = 768,
                 depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, mlp_width: int = 256,
                 weight_groups: List[int] = (64, 64, 64, 64, 1), coord_freqs: int = 8):
        super().__init__("transinr", tile_size, spatial_dims)
        for key, val, lo in (("patch_size", patch_size, 1), ("width", width, 1), ("depth", depth, 1),
                             ("heads", heads, 1), ("mlp_width", mlp_width, 1), ("coord_freqs", coord_freqs, 0)):
            _check_int("transinr", key, val, lo)
        _check_float("transinr", "mlp_ratio", mlp_ratio)
        if tile_size % patch_size:
            raise ConfigError(f"model.patch_size={patch_size} must divide the tile size {tile_size} (transinr)")
        groups = list(weight_groups)
        if len(groups) < 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in groups):
            raise ConfigError(f"model.weight_groups must list >= 2 positive integers (one per MLP layer), got "
                              f"{weight_groups!r}")
        in_dim = 2 * (1 + 2 * coord_freqs)
        dims = [in_dim] + [mlp_width] * (len(groups) - 1) + [1]
        for l, (g, out) in enumerate(zip(groups, dims[1:])):
            if out % g:
                raise ConfigError(f"model.weight_groups[{l}]={g} must divide that layer's output width {out}")
        self.patch_size, self.coord_freqs, self.dims, self.groups = int(patch_size), int(coord_freqs), dims, groups
        n = (tile_size // patch_size) ** 2
        self.n_wtok = sum(groups)
        self.payload_shape = (self.n_wtok, int(width))
        self.embed = nn.Linear(patch_size * patch_size, width)
        self.pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.wtokens = nn.Parameter(torch.randn(1, self.n_wtok, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.base = nn.ParameterList()
        self.heads = nn.ModuleList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(a + 1, b)
            nn.init.kaiming_uniform_(w.T, a=5 ** 0.5)  # nn.Linear's rule on the (out, in) view
            w[-1].zero_()
            self.base.append(nn.Parameter(w))
            head = nn.Linear(width, a + 1)
            nn.init.zeros_(head.weight)
            nn.init.ones_(head.bias)  # u = 1 at init: the base weights (normalized)
            self.heads.append(head)
        self.register_buffer("coords", pixel_coords(self.tile_size), persistent=False)

    def encode(self, tiles: Tensor) -> Tensor:
        """(B, 1, T, T) -> weight-token state (B, sum(weight_groups), width)."""
        self.check_tiles(tiles)
        B = tiles.shape[0]
        x = self.embed(patchify(tiles, self.patch_size)) + self.pos
        x = torch.cat([x, self.wtokens.expand(B, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, -self.n_wtok:]

    def weights(self, z: Tensor) -> List[Tensor]:
        """Per-tile MLP weights [(B, in_l + 1, out_l)] from the weight tokens z."""
        out, start = [], 0
        for base, head, g in zip(self.base, self.heads, self.groups):
            u = head(z[:, start:start + g])  # (B, g, in+1)
            start += g
            a1, b = base.shape
            w = base.reshape(a1, g, b // g)[None] * u.transpose(1, 2)[..., None]  # (B, in+1, g, b/g)
            out.append(F.normalize(w.reshape(-1, a1, b), dim=1))
        return out

    def decode_points(self, z: Tensor, x: Tensor) -> Tensor:
        if z.shape[1:] != self.payload_shape:
            raise ValueError(f"TransINR: payload must be (B, {self.payload_shape[0]}, {self.payload_shape[1]}), got "
                             f"{list(z.shape)}")
        h = fourier_features(x, self.coord_freqs)
        ws = self.weights(z)
        for i, w in enumerate(ws):
            h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1) @ w
            if i < len(ws) - 1:
                h = F.relu(h)
        return h

    def decode(self, z: Tensor) -> Tensor:
        B, T = z.shape[0], self.tile_size
        return self.decode_points(z, self.coords.expand(B, -1, -1)).reshape(B, 1, T, T)

    def flop_modules(self) -> Dict[str, nn.Module]:
        return {"enc": Stage(self, "encode"), "neudec": Stage(self, "decode")}
