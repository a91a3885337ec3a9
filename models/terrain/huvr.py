"""HUVR and HUVR+SIREN (spec huvr 2): factored hypernetworks with a d-dimensional token per patch as the payload.

Pipeline: ViT encoder (p x p patches of the 1-channel tile, [CLS] + N = (T/p)^2 patch tokens, width D) ->
linear bottleneck D -> d on every token (Eq. 3; the payload z = (z_g, z_1..z_N), (1 + N) x d floats, 8,224 for
T = 256, p = 16, d = 32) -> hypernetwork decoder (transformer of its own width and depth over the 1 + N tokens,
linear d -> width in front) -> per-patch outputs -> coordinate decoder:

- **HUVR** (:class:`HUVR`): a ReLU MLP whose every layer's shared base weight W is modulated per patch by a
  rank-1 multiplicative factor, W_i = W (.) (u_i v_i^T) (so W_i h = u_i (.) (W (v_i (.) h)); the exact rank-1 form
  is NR, this is our choice), u_i, v_i from linear heads on the patch's decoder output, initialized at u = v = 1.
  The MLP is evaluated once per patch at the patch centre (input: the centre's tile coordinate, with optional
  Fourier features) and emits C channels; the (C, T/p, T/p) map is refined by Conv3x3 + PixelShuffle(2) stages
  (ReLU between) up to T x T and a final Conv3x3 to 1 channel (layer details NR: ours).
- **HUVR+SIREN** (:class:`HUVRSiren`): no upsampler; a 4-layer SIREN (3 modulated sine layers, a linear output)
  is evaluated at every pixel with the modulation of the patch containing it (Eq. 4):
  h_{l+1} = alpha_l (.) sin(omega_0 (W_l h_l + b_l) + beta_l) (``omega_scales_beta``: sin(omega_0 (W h + b +
  beta)) instead). alpha_l, beta_l come from LayerNorm + Linear heads with zero weights and biases 1 / 0, so
  at initialization the decoder is the plain SIREN. Coordinates: the tile's (``coord_frame: global``) or the
  patch's own [-1, 1] frame (``local``); NR in the paper.

DINOv3 distillation (spec 8): ``teacher`` = path of a local TorchScript / pickled module (null: off, which is not
the published configuration). When set, L = L_rec + distill_enc_weight L(enc) + distill_dec_weight L(dec):
linear heads project the encoder tokens (before the bottleneck) and the hypernetwork decoder's tokens to the
teacher width and are compared with the teacher's [CLS] and patch tokens of the input tile (patch grids
resampled bilinearly when they differ), by 1 - cosine or MSE. Taps and weights are NR (ours).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.components.siren import SIREN_INITS, SirenMLP
from models.terrain.common import (DISTILL_LOSSES, AmortizedTerrainINR, Stage, TransformerBlock, ViT, _check_float,
                                   _check_int, pixel_coords, distill_distance, fourier_features, load_teacher, match_grid)
from util.registry import ConfigError, register

__all__ = ["HUVR", "HUVRSiren", "HUVRBase", "COORD_FRAMES"]

COORD_FRAMES = ("global", "local")


class HUVRBase(AmortizedTerrainINR):
    """Encoder, bottleneck, hypernetwork decoder and distillation shared by HUVR and HUVR+SIREN."""

    def __init__(self, name: str, tile_size: int, spatial_dims: int, patch_size: int, latent_dim: int,
                 enc_width: int, enc_depth: int, enc_heads: int, dec_width: int, dec_depth: int, dec_heads: int,
                 mlp_ratio: float, teacher: Optional[str], teacher_dim: Optional[int], teacher_input_size: Optional[int],
                 distill_loss: str, distill_enc_weight: float, distill_dec_weight: float):
        super().__init__(name, tile_size, spatial_dims)
        p = _check_int(name, "patch_size", patch_size, 1)
        if tile_size % p:
            raise ConfigError(f"model.patch_size={p} must divide the tile size {tile_size} (model type '{name}')")
        for key, val in (("latent_dim", latent_dim), ("enc_width", enc_width), ("enc_depth", enc_depth),
                         ("enc_heads", enc_heads), ("dec_width", dec_width), ("dec_depth", dec_depth),
                         ("dec_heads", dec_heads)):
            _check_int(name, key, val, 1)
        _check_float(name, "mlp_ratio", mlp_ratio)
        if distill_loss not in DISTILL_LOSSES:
            raise ConfigError(f"model.distill_loss must be one of {', '.join(DISTILL_LOSSES)}; got {distill_loss!r}")
        self.patch_size = p
        self.n_side = tile_size // p
        n = self.n_side ** 2
        self.payload_shape = (n + 1, int(latent_dim))
        self.encoder = ViT(tile_size, p, 1, enc_width, enc_depth, enc_heads, mlp_ratio, cls_token=True)
        self.bottleneck = nn.Linear(enc_width, latent_dim)
        self.dec_in = nn.Linear(latent_dim, dec_width)
        self.dec_pos = nn.Parameter(torch.randn(1, n + 1, dec_width) * 0.02)
        self.dec_blocks = nn.ModuleList(TransformerBlock(dec_width, dec_heads, mlp_ratio) for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dec_width)
        self.dec_width = int(dec_width)
        # distillation
        self.distill_loss, self.distill_enc_weight = distill_loss, _check_float(name, "distill_enc_weight",
                                                                                distill_enc_weight, 0.0, False)
        self.distill_dec_weight = _check_float(name, "distill_dec_weight", distill_dec_weight, 0.0, False)
        object.__setattr__(self, "_teacher", None)  # not a submodule: never saved or trained
        self.teacher_path = teacher
        if teacher is not None:
            t = load_teacher(str(teacher), teacher_input_size)
            if teacher_dim is None:
                with torch.no_grad():
                    teacher_dim = int(t(torch.zeros(1, 1, tile_size, tile_size))[0].shape[-1])
            object.__setattr__(self, "_teacher", t)
            self.head_enc = nn.Linear(enc_width, int(teacher_dim))
            self.head_dec = nn.Linear(dec_width, int(teacher_dim))

    # ------------------------------------------------------------------------------------- stages
    def encoder_tokens(self, tiles: Tensor) -> Tensor:
        self.check_tiles(tiles)
        return self.encoder(tiles)

    def encode(self, tiles: Tensor) -> Tensor:
        """(B, 1, T, T) -> z (B, 1 + N, d)."""
        return self.bottleneck(self.encoder_tokens(tiles))

    def hyper_decode(self, z: Tensor) -> Tensor:
        """z (B, 1 + N, d) -> decoder tokens (B, 1 + N, dec_width)."""
        if z.shape[1:] != self.payload_shape:
            raise ValueError(f"{type(self).__name__}: payload must be (B, {self.payload_shape[0]}, "
                             f"{self.payload_shape[1]}), got {list(z.shape)}")
        h = self.dec_in(z) + self.dec_pos
        for blk in self.dec_blocks:
            h = blk(h)
        return self.dec_norm(h)

    def decode(self, z: Tensor) -> Tensor:
        return self.decode_from_tokens(self.hyper_decode(z))

    def decode_from_tokens(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_outputs(self, tiles: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        enc = self.encoder_tokens(tiles)
        dec = self.hyper_decode(self.bottleneck(enc))
        recon = self.decode_from_tokens(dec)
        terms: Dict[str, Tensor] = {}
        if self._teacher is not None:
            t_cls, t_patch = self._teacher(tiles)
            n = self.payload_shape[0] - 1
            t_tok = torch.cat([t_cls[:, None], match_grid(t_patch, n)], dim=1)
            if self.distill_enc_weight > 0:
                terms["distill_enc"] = self.distill_enc_weight * distill_distance(self.head_enc(enc), t_tok,
                                                                                  self.distill_loss)
            if self.distill_dec_weight > 0:
                terms["distill_dec"] = self.distill_dec_weight * distill_distance(self.head_dec(dec), t_tok,
                                                                                  self.distill_loss)
        return recon, terms

    def param_groups(self):
        groups = {"encoder": list(self.encoder.parameters()) + list(self.bottleneck.parameters()),
                  "hyper_decoder": [self.dec_pos] + list(self.dec_in.parameters()) + list(self.dec_blocks.parameters())
                  + list(self.dec_norm.parameters())}
        seen = {id(p) for g in groups.values() for p in g}
        groups["coord_decoder"] = [p for p in self.parameters() if id(p) not in seen]
        return groups

    def flop_modules(self) -> Dict[str, nn.Module]:
        return {"enc": Stage(self, "encode"), "dec": Stage(self, "hyper_decode"),
                "neudec": Stage(self, "decode_from_tokens")}


@register("model", "huvr")
class HUVR(HUVRBase):
    """HUVR (spec huvr 2): ViT encoder, d-dim bottleneck per patch, transformer hypernetwork decoder emitting
    rank-1 modulations of a ReLU MLP evaluated at patch centres, Conv + PixelShuffle upsampler.

    Args:
        tile_size: tile side T in pixels (injected from the data by the terrain task).
        spatial_dims: must be 2 (injected).
        patch_size: p, patch side in pixels (paper 16; T / p patches per side).
        latent_dim: d, the bottleneck width per token (paper 32: 257 x 32 = 8,224 floats per tile).
        enc_width: ViT width D (ViT-B: 768).
        enc_depth: ViT blocks (ViT-B: 12).
        enc_heads: ViT attention heads (ViT-B: 12).
        dec_width: hypernetwork decoder width (NR; 768 in the paper config, from Table 2's Dec. GFLOPs).
        dec_depth: hypernetwork decoder blocks (NR; 6 in the paper config).
        dec_heads: hypernetwork decoder heads.
        mlp_ratio: MLP hidden width / width in every transformer block.
        mlp_width: hidden width of the ReLU coordinate MLP (NR).
        mlp_depth: hidden layers of the ReLU coordinate MLP (NR).
        mlp_freqs: Fourier-feature octaves of the patch-centre coordinate fed to the MLP (0 = raw coordinate).
        upsampler_channels: channels C of the MLP output and of every upsampler stage (NR).
        teacher: path of a local frozen DINOv3 teacher (TorchScript or pickled module); null = no distillation.
        teacher_dim: teacher token width (null: found by running the teacher once).
        teacher_input_size: resize tiles to this side for the teacher (null: as they are).
        distill_loss: ``cosine`` (1 - cosine similarity) or ``mse`` between projected student and teacher tokens.
        distill_enc_weight: weight of the encoder-side distillation term.
        distill_dec_weight: weight of the decoder-side distillation term.
    """

    def __init__(self, tile_size: int = 256, spatial_dims: int = 2, patch_size: int = 16, latent_dim: int = 32,
                 enc_width: int = 768, enc_depth: int = 12, enc_heads: int = 12, dec_width: int = 768,
                 dec_depth: int = 6, dec_heads: int = 12, mlp_ratio: float = 4.0, mlp_width: int = 256,
                 mlp_depth: int = 3, mlp_freqs: int = 0, upsampler_channels: int = 64, teacher: Optional[str] = None,
                 teacher_dim: Optional[int] = None, teacher_input_size: Optional[int] = None,
                 distill_loss: str = "cosine", distill_enc_weight: float = 1.0, distill_dec_weight: float = 1.0):
        super().__init__("huvr", tile_size, spatial_dims, patch_size, latent_dim, enc_width, enc_depth, enc_heads,
                         dec_width, dec_depth, dec_heads, mlp_ratio, teacher, teacher_dim, teacher_input_size,
                         distill_loss, distill_enc_weight, distill_dec_weight)
        for key, val, lo in (("mlp_width", mlp_width, 1), ("mlp_depth", mlp_depth, 1), ("mlp_freqs", mlp_freqs, 0),
                             ("upsampler_channels", upsampler_channels, 1)):
            _check_int("huvr", key, val, lo)
        self.mlp_freqs = int(mlp_freqs)
        dims = [2 * (1 + 2 * mlp_freqs)] + [mlp_width] * mlp_depth + [upsampler_channels]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        # one head per layer: (u: out, v: in), zero weights, bias 1 -> W (.) (1 1^T) = W at init
        self.mod_heads = nn.ModuleList(nn.Linear(dec_width, a + b) for a, b in zip(dims[:-1], dims[1:]))
        for h in self.mod_heads:
            nn.init.zeros_(h.weight)
            nn.init.ones_(h.bias)
        self.mlp_dims = dims
        C = int(upsampler_channels)
        p = self.patch_size
        factors = []
        while p > 1 and p % 2 == 0:
            factors.append(2)
            p //= 2
        if p > 1:
            factors.append(p)
        self.up_convs = nn.ModuleList(nn.Conv2d(C, C * f * f, 3, padding=1) for f in factors)
        self.up_shuffles = nn.ModuleList(nn.PixelShuffle(f) for f in factors)
        self.out_conv = nn.Conv2d(C, 1, 3, padding=1)
        # patch centres in tile coordinates (column, row), row-major patch order
        T, ps = self.tile_size, self.patch_size
        c = (torch.arange(self.n_side, dtype=torch.float32) * ps + (ps - 1) / 2.0) * 2.0 / (T - 1) - 1.0
        rows, cols = torch.meshgrid(c, c, indexing="ij")
        self.register_buffer("centres", torch.stack([cols.reshape(-1), rows.reshape(-1)], -1), persistent=False)

    def modulations(self, h: Tensor):
        """Per-patch rank-1 factors [(u (B, N, out), v (B, N, in)) per MLP layer] from decoder tokens (B, 1+N, W)."""
        hp = h[:, 1:]
        out = []
        for head, a, b in zip(self.mod_heads, self.mlp_dims[:-1], self.mlp_dims[1:]):
            uv = head(hp)
            out.append((uv[..., :b], uv[..., b:]))
        return out

    def decode_from_tokens(self, h: Tensor) -> Tensor:
        B = h.shape[0]
        x = fourier_features(self.centres, self.mlp_freqs).expand(B, -1, -1)  # (B, N, in)
        mods = self.modulations(h)
        last = len(self.mlp) - 1
        for i, (lin, (u, v)) in enumerate(zip(self.mlp, mods)):
            x = u * F.linear(v * x, lin.weight) + lin.bias
            if i < last:
                x = F.relu(x)
        f = x.transpose(1, 2).reshape(B, -1, self.n_side, self.n_side)
        for conv, shuf in zip(self.up_convs, self.up_shuffles):
            f = F.relu(shuf(conv(f)))
        return self.out_conv(f)


@register("model", "huvr_siren")
class HUVRSiren(HUVRBase):
    """HUVR+SIREN (spec huvr 2, Eq. 4): HUVR's encoder, bottleneck and hypernetwork decoder with a modulated
    4-layer SIREN evaluated at every pixel (no upsampler).

    Args:
        tile_size: tile side T in pixels (injected from the data by the terrain task).
        spatial_dims: must be 2 (injected).
        patch_size: p, patch side in pixels (paper 16).
        latent_dim: d, the bottleneck width per token (paper 32).
        enc_width: ViT width D (ViT-B: 768).
        enc_depth: ViT blocks (ViT-B: 12).
        enc_heads: ViT attention heads (ViT-B: 12).
        dec_width: hypernetwork decoder width (NR; 768 in the paper config).
        dec_depth: hypernetwork decoder blocks (NR; 6 in the paper config).
        dec_heads: hypernetwork decoder heads.
        mlp_ratio: MLP hidden width / width in every transformer block.
        siren_width: width of the 3 sine layers (NR; 256 fits Table 2's per-pixel FLOPs).
        omega_0: SIREN frequency of every sine layer (NR; below the image default 30).
        omega_scales_beta: True: sin(omega_0 (W h + b + beta)); False (default): sin(omega_0 (W h + b) + beta).
        coord_frame: ``global`` (tile coordinates) or ``local`` (each patch's own [-1, 1] frame) SIREN input (NR).
        siren_init: SirenMLP weight init (``siren``, ``reference``, ``xavier``).
        modulate: ``both`` (alpha and beta, Eq. 4), ``amplitude`` (alpha only) or ``shift`` (beta only): Table 4's
            ablations.
        teacher: path of a local frozen DINOv3 teacher (TorchScript or pickled module); null = no distillation.
        teacher_dim: teacher token width (null: found by running the teacher once).
        teacher_input_size: resize tiles to this side for the teacher (null: as they are).
        distill_loss: ``cosine`` or ``mse``.
        distill_enc_weight: weight of the encoder-side distillation term.
        distill_dec_weight: weight of the decoder-side distillation term.
    """

    continuous = True

    def __init__(self, tile_size: int = 256, spatial_dims: int = 2, patch_size: int = 16, latent_dim: int = 32,
                 enc_width: int = 768, enc_depth: int = 12, enc_heads: int = 12, dec_width: int = 768,
                 dec_depth: int = 6, dec_heads: int = 12, mlp_ratio: float = 4.0, siren_width: int = 256,
                 omega_0: float = 15.0, omega_scales_beta: bool = False, coord_frame: str = "global",
                 siren_init: str = "siren", modulate: str = "both", teacher: Optional[str] = None,
                 teacher_dim: Optional[int] = None, teacher_input_size: Optional[int] = None,
                 distill_loss: str = "cosine", distill_enc_weight: float = 1.0, distill_dec_weight: float = 1.0):
        super().__init__("huvr_siren", tile_size, spatial_dims, patch_size, latent_dim, enc_width, enc_depth,
                         enc_heads, dec_width, dec_depth, dec_heads, mlp_ratio, teacher, teacher_dim,
                         teacher_input_size, distill_loss, distill_enc_weight, distill_dec_weight)
        _check_int("huvr_siren", "siren_width", siren_width, 1)
        _check_float("huvr_siren", "omega_0", omega_0)
        for key, val, allowed in (("coord_frame", coord_frame, COORD_FRAMES), ("siren_init", siren_init, SIREN_INITS),
                                  ("modulate", modulate, ("both", "amplitude", "shift"))):
            if val not in allowed:
                raise ConfigError(f"model.{key} must be one of {', '.join(allowed)}; got {val!r}")
        if not isinstance(omega_scales_beta, bool):
            raise ConfigError(f"model.omega_scales_beta must be true or false, got {omega_scales_beta!r}")
        self.omega_scales_beta, self.coord_frame, self.modulate = omega_scales_beta, coord_frame, modulate
        self.siren = SirenMLP(2, siren_width, 2, 1, omega_0=omega_0, init=siren_init, bias_init="default")
        self.alpha_heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dec_width), nn.Linear(dec_width, siren_width))
                                         for _ in range(3))
        self.beta_heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dec_width), nn.Linear(dec_width, siren_width))
                                        for _ in range(3))
        for heads, bias in ((self.alpha_heads, 1.0), (self.beta_heads, 0.0)):
            for h in heads:
                nn.init.zeros_(h[1].weight)
                nn.init.constant_(h[1].bias, bias)

    def modulations(self, h: Tensor):
        """[(alpha (B, N, W), beta (B, N, W)) for the 3 sine layers] from decoder tokens (B, 1 + N, dec_width)."""
        hp = h[:, 1:]
        out = []
        for ha, hb in zip(self.alpha_heads, self.beta_heads):
            a = ha(hp) if self.modulate in ("both", "amplitude") else None
            b = hb(hp) if self.modulate in ("both", "shift") else None
            out.append((a, b))
        return out

    def _patch_and_input(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Patch index (B, M) of each coordinate and the SIREN input (global or patch-local coordinates)."""
        T, p, n = self.tile_size, self.patch_size, self.n_side
        pos = (x + 1.0) * 0.5 * (T - 1)  # pixel units (column, row)
        cell = torch.clamp(torch.floor((pos.detach() + 0.5) / p), 0, n - 1)
        idx = (cell[..., 1] * n + cell[..., 0]).long()
        if self.coord_frame == "global":
            return idx, x
        local = (pos - cell * p) * (2.0 / max(p - 1, 1)) - 1.0
        return idx, local

    def siren_forward(self, inp: Tensor, mods, idx: Optional[Tensor]) -> Tensor:
        """Modulated SIREN on inputs (B, M, 2); mods per layer gathered at patch indices idx (B, M)."""
        w0 = self.siren.omega_0
        h = inp
        W, b = self.siren.weights, self.siren.biases
        for layer in range(3):
            alpha, beta = mods[layer]
            pre = F.linear(h, W[layer], b[layer])
            if beta is not None:
                bt = beta if idx is None else torch.gather(beta, 1, idx[..., None].expand(-1, -1, beta.shape[-1]))
                arg = w0 * (pre + bt) if self.omega_scales_beta else w0 * pre + bt
            else:
                arg = w0 * pre
            h = torch.sin(arg)
            if alpha is not None:
                al = alpha if idx is None else torch.gather(alpha, 1, idx[..., None].expand(-1, -1, alpha.shape[-1]))
                h = al * h
        return F.linear(h, W[3], b[3])

    def decode_points(self, z: Tensor, x: Tensor) -> Tensor:
        mods = self.modulations(self.hyper_decode(z))
        idx, inp = self._patch_and_input(x)
        return self.siren_forward(inp, mods, idx)

    def decode_from_tokens(self, h: Tensor) -> Tensor:
        B, T = h.shape[0], self.tile_size

        x = pixel_coords(T, device=h.device, dtype=h.dtype).expand(B, -1, -1)
        idx, inp = self._patch_and_input(x)
        y = self.siren_forward(inp, self.modulations(h), idx)
        return y.reshape(B, 1, T, T)
