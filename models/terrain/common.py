"""Shared parts of the amortized terrain INRs (spec huvr 1-2): the model contract, a plain ViT, Fourier features,
the frozen-teacher (DINOv3) distillation path.

Every amortized model maps a batch of normalized tiles ``(B, 1, T, T)`` to a payload ``z`` of shape
``(B, n_tokens, token_dim)`` (:meth:`AmortizedTerrainINR.encode`; the only per-tile stored object) and back to
a raster ``(B, 1, T, T)`` (:meth:`AmortizedTerrainINR.decode`). As a :class:`models.base.FieldModel`,
``forward(x, c)`` reads the flattened payload as the condition ``c (B, n_tokens * token_dim)`` and returns the
height at coordinates ``x (B, N, 2)`` (column, row) in [-1, 1] (align corners over the tile's T pixels).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import FieldModel
from util.registry import ConfigError

__all__ = ["AmortizedTerrainINR", "ViT", "TransformerBlock", "fourier_features", "pixel_coords", "patchify",
           "Teacher", "load_teacher", "DISTILL_LOSSES", "Stage"]

DISTILL_LOSSES = ("cosine", "mse")


def _check_int(model: str, key: str, val, lo: int = 1) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        raise ConfigError(f"model.{key} must be an integer >= {lo} for model type '{model}', got {val!r}")
    return int(val)


def _check_float(model: str, key: str, val, lo: float = 0.0, strict: bool = True) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)) or (val <= lo if strict else val < lo):
        raise ConfigError(f"model.{key} must be a number {'>' if strict else '>='} {lo} for model type '{model}', "
                          f"got {val!r}")
    return float(val)


def pixel_coords(T: int, device=None, dtype=torch.float32) -> Tensor:
    """(T*T, 2) coordinates of a T x T tile's pixels in C order: column 0 = column, column 1 = row, [-1, 1]."""
    a = torch.linspace(-1.0, 1.0, T, device=device, dtype=dtype)
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1)


def patchify(t: Tensor, p: int) -> Tensor:
    """(B, C, T, T) -> (B, (T/p)^2, C p p) patches in row-major patch order."""
    B, C, H, W = t.shape
    x = t.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def fourier_features(x: Tensor, n_freq: int) -> Tensor:
    """[x, sin(2^k pi x), cos(2^k pi x)] for k < n_freq: (..., d) -> (..., d (1 + 2 n_freq))."""
    if n_freq == 0:
        return x
    freqs = (2.0 ** torch.arange(n_freq, device=x.device, dtype=x.dtype)) * math.pi
    ang = x[..., None] * freqs  # (..., d, F)
    return torch.cat([x, torch.sin(ang).flatten(-2), torch.cos(ang).flatten(-2)], dim=-1)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)) (GELU, ``mlp_ratio`` x width)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ConfigError(f"transformer width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        #: fused scaled-dot-product attention (False: explicit matmuls, which fvcore counts)
        self.use_sdpa = True

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.use_sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1)
            a = w @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Plain ViT encoder: p x p patches -> linear embedding, [CLS] token, learned position embeddings, ``depth``
    pre-norm blocks, final LayerNorm. Output (B, 1 + N, width), token 0 = [CLS]. ViT-B/16: width 768, depth 12,
    heads 12."""

    def __init__(self, tile_size: int, patch_size: int, in_channels: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, cls_token: bool = True):
        super().__init__()
        self.patch_size = patch_size
        n = (tile_size // patch_size) ** 2
        self.embed = nn.Linear(in_channels * patch_size * patch_size, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
        self.pos = nn.Parameter(torch.randn(1, n + int(cls_token), width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, t: Tensor, extra: Optional[Tensor] = None) -> Tensor:
        """t: (B, C, T, T); extra: optional (B, M, width) tokens appended after the patch tokens."""
        x = self.embed(patchify(t, self.patch_size))
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        if extra is not None:
            x = torch.cat([x, extra], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ------------------------------------------------------------------------------------------- the teacher
class Teacher:
    """A frozen feature teacher (e.g. DINOv3) loaded from a local file; not a submodule (not saved, not trained).

    Called on (B, 1, H, W) normalized tiles: the channel is replicated to 3 (how the paper fed 1-channel tiles
    to the RGB teacher is NR), resized to ``input_size`` when set, and run without gradients. The module must
    return (B, 1 + N, D) tokens ([CLS] first) or a dict with ``x_norm_clstoken`` (B, D) and
    ``x_norm_patchtokens`` (B, N, D) (the DINO ``forward_features`` convention).
    """

    def __init__(self, module: nn.Module, input_size: Optional[int] = None):
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.input_size = input_size

    @torch.no_grad()
    def __call__(self, tiles: Tensor) -> Tuple[Tensor, Tensor]:
        """-> (cls (B, D), patch tokens (B, N, D))."""
        try:
            self.module.to(tiles.device)
        except Exception:  # noqa: BLE001 - TorchScript modules may be device-fixed
            pass
        x = tiles.float().expand(-1, 3, -1, -1)
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        out = self.module(x)
        if isinstance(out, dict):
            return out["x_norm_clstoken"], out["x_norm_patchtokens"]
        if not isinstance(out, Tensor) or out.dim() != 3:
            raise ValueError("model.teacher: the teacher must return (B, 1 + N, D) tokens or a dict with "
                             "x_norm_clstoken / x_norm_patchtokens")
        return out[:, 0], out[:, 1:]


def load_teacher(path: str, input_size: Optional[int] = None) -> Teacher:
    """Load a frozen teacher from a local TorchScript file or a pickled ``nn.Module`` (``torch.save(module)``).

    Raises:
        ConfigError naming the key and path: the file is missing or holds no module.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"model.teacher: '{path}' not found. DINOv3 distillation needs local teacher weights (a "
                          f"TorchScript file or a pickled nn.Module); nothing is downloaded. Set model.teacher: null "
                          f"to train without distillation (not the published HUVR configuration)")
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception:  # noqa: BLE001 - not TorchScript: try a pickled module
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"model.teacher: '{path}' cannot be loaded as TorchScript or a pickled nn.Module "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(module, (nn.Module, torch.jit.ScriptModule)):
        raise ConfigError(f"model.teacher: '{path}' holds a {type(module).__name__}, not a module (a state dict alone "
                          f"cannot be used: save the whole module or a TorchScript file)")
    return Teacher(module, input_size)


def distill_distance(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Mean distance between (B, N, D) student and teacher tokens: 1 - cosine or MSE."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(student.float(), teacher.float())


def match_grid(tokens: Tensor, n_target: int) -> Tensor:
    """Resample (B, N, D) patch tokens on a sqrt(N) grid to a sqrt(n_target) grid (bilinear)."""
    B, N, D = tokens.shape
    if N == n_target:
        return tokens
    s, t = int(round(math.sqrt(N))), int(round(math.sqrt(n_target)))
    g = tokens.transpose(1, 2).reshape(B, D, s, s)
    g = F.interpolate(g, size=(t, t), mode="bilinear", align_corners=False)
    return g.reshape(B, D, t * t).transpose(1, 2)


class Stage(nn.Module):
    """One method of a model as a module (fvcore traces modules; the model is a submodule so its parameters are
    traced as parameters)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x):
        return getattr(self.model, self.method)(x)


# ---------------------------------------------------------------------------------------------- the base
class AmortizedTerrainINR(FieldModel):
    """Base class of the amortized terrain models (see the module docstring).

    Subclasses implement :meth:`encode` and :meth:`decode`, and set ``payload_shape`` (n_tokens, token_dim),
    ``continuous`` (True when the decoder is a coordinate network differentiable in x: derivative metrics use
    autodiff), ``patch_size`` (seams; None without patches) and ``inner_loop`` (True when encoding fits the
    payload by gradient steps: ``encode(tiles, steps=None)`` takes the step count, ``inner_steps`` the default).
    """

    continuous: bool = False
    patch_size: Optional[int] = None
    inner_loop: bool = False

    def __init__(self, name: str, tile_size: int, spatial_dims: int = 2):
        super().__init__()
        if spatial_dims != 2:
            raise ConfigError(f"model type '{name}' is a 2-D terrain model; the data has {spatial_dims} spatial dims")
        self.tile_size = _check_int(name, "tile_size", tile_size, 2)
        self.payload_shape: Tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------------------------ the contract
    @property
    def payload_floats(self) -> int:
        """Floats stored per tile (n_tokens x token_dim)."""
        return int(self.payload_shape[0] * self.payload_shape[1])

    def encode(self, tiles: Tensor) -> Tensor:  # pragma: no cover - abstract
        """(B, 1, T, T) normalized tiles -> payload (B, n_tokens, token_dim)."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """payload (B, n_tokens, token_dim) -> (B, 1, T, T) normalized heights."""
        raise NotImplementedError

    def decode_points(self, z: Tensor, x: Tensor) -> Tensor:
        """Heights at coordinates x (B, N, 2) in [-1, 1]: (B, N, 1). Default: bilinear (align corners) sampling
        of the decoded raster (raster decoders); coordinate decoders override it."""
        img = self.decode(z)
        out = F.grid_sample(img, x[:, :, None, :].to(img.dtype), mode="bilinear", align_corners=True)
        return out[:, :, :, 0].transpose(1, 2)

    def forward(self, x: Optional[Tensor] = None, c: Optional[Tensor] = None, *, tiles: Optional[Tensor] = None):
        """Points: x (B, N, 2), c = flattened payload (B, n_tokens * token_dim) -> (B, N, 1).

        Training: ``tiles=`` (B, 1, T, T) -> :meth:`training_outputs` (the terrain task calls the model this
        way, so that under multi-process training the call goes through the DDP wrapper and gradients are
        synchronized across processes).
        """
        if tiles is not None:
            if x is not None or c is not None:
                raise ValueError(f"{type(self).__name__}.forward: pass either (x, c) or tiles=, not both")
            return self.training_outputs(tiles)
        if x is None or c is None:
            raise ValueError(f"{type(self).__name__}.forward: needs coordinates x and the payload c (or tiles=)")
        if c.shape[-1] != self.payload_floats:
            raise ValueError(f"{type(self).__name__}.forward: c must hold the payload ({self.payload_floats} floats "
                             f"per tile), got shape {list(c.shape)}")
        return self.decode_points(c.reshape(c.shape[0], *self.payload_shape), x)

    def reconstruct(self, tiles: Tensor) -> Tensor:
        """decode(encode(tiles))."""
        return self.decode(self.encode(tiles))

    def training_outputs(self, tiles: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(reconstruction, extra loss terms added to the MSE) of a training batch; default: no extra terms."""
        return self.reconstruct(tiles), {}

    def check_tiles(self, tiles: Tensor) -> None:
        T = self.tile_size
        if tiles.dim() != 4 or tiles.shape[1] != 1 or tiles.shape[2] != T or tiles.shape[3] != T:
            raise ValueError(f"{type(self).__name__}: tiles must be (B, 1, {T}, {T}), got {list(tiles.shape)}")

    def set_sdpa(self, on: bool) -> None:
        """Fused attention on/off in every transformer block (off: explicit matmuls, counted by fvcore)."""
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.use_sdpa = on

    def flop_modules(self) -> Dict[str, nn.Module]:
        """Named stages for FLOP counting: ``enc`` (tiles -> payload) and ``dec`` (payload -> raster) by default."""
        return {}
