"""Post-training quantization of the payload (spec huvr 5) and, optionally, of the shared decoder weights.

Payload tokens z (B, n, d): symmetric per-dimension min-max scales, per tile (``scope: tile``, the spec's
reading: 512 side bits per tile = d scales x 16 bit) or over the whole evaluated set (``scope: dataset``, the
d scales stored once and their bits shared by the B tiles):
scale_j = max|z_.j| / (2^(b-1) - 1), q = clip(round(z / scale_j), -(2^(b-1) - 1), 2^(b-1) - 1), z_hat = q scale_j.
Scales are stored as float16, rounded up (so no value clips and |z - z_hat| <= scale_j / 2 exactly).

Per-tile scales only make sense for payloads of several tokens per tile (HUVR's 257, TransINR's). A payload of
one token per tile (Functa's modulation vector) with per-tile per-dimension scales stores every value as its own
scale (q = +-qmax, lossless, 16 side bits per value): use ``dataset`` scope there; :func:`default_scope` picks it.

Bits per pixel: uncompressed = (n d b + side bits) / pixels; entropy = (code bits + side bits) / pixels, the
Shannon bound of independent per-dimension coders: fit per tile (``tile``: sum_j n H_j with H_j the empirical
entropy of dimension j's n symbols in the tile) or over the evaluated set (``dataset``: the tile's ideal code
length -sum log2 p_j(q) under dimension j's symbol frequencies over all B tiles); both :func:`entropy_bits`. Code tables are not counted in either (a lower bound, as the spec's BPP_ent).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["quantize_payload", "entropy_bits", "default_scope", "quantize_weights_", "SCALE_BITS", "SCOPES"]

SCALE_BITS = 16
SCOPES = ("tile", "dataset")


def _fp16_up(s: Tensor) -> Tensor:
    """float16 value >= s (the stored scale), returned as float32."""
    h = s.to(torch.float16)
    low = h.float() < s
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def default_scope(tokens_per_tile: int) -> str:
    """``tile`` for payloads of several tokens per tile, ``dataset`` for one token per tile (see the module doc)."""
    return "tile" if tokens_per_tile > 1 else "dataset"


def quantize_payload(z: Tensor, bits: int, scope: str = "tile") -> Tuple[Tensor, Tensor, Tensor, float]:
    """Symmetric per-dimension quantization of payload tokens.

    Args:
        z: (B, n, d) payload.
        bits: bits per value, >= 2.
        scope: ``tile`` (scales per tile and dimension) or ``dataset`` (one scale per dimension over the B tiles).

    Returns:
        (z_hat (B, n, d) float32, integer symbols q (B, n, d), scales (B or 1, 1, d), side bits per tile:
        d x 16 for ``tile``, d x 16 / B for ``dataset``).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, got {bits!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if z.dim() != 3:
        raise ValueError(f"payload must be (B, n, d), got shape {list(z.shape)}")
    z = z.float()
    qmax = 2 ** (bits - 1) - 1
    amax = z.abs().amax(dim=1, keepdim=True) if scope == "tile" else z.abs().amax(dim=(0, 1), keepdim=True)
    scale = _fp16_up(amax / qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(z / scale), -qmax, qmax)
    side = z.shape[2] * SCALE_BITS / (1 if scope == "tile" else z.shape[0])
    return q * scale, q.to(torch.int64), scale, float(side)


def _code_bits(qn: np.ndarray) -> np.ndarray:
    """(B, n, d) symbols -> (B,) ideal code lengths under per-dimension frequencies counted over all B tiles."""
    B, n, d = qn.shape
    out = np.zeros(B)
    for j in range(d):
        sym = qn[:, :, j]
        _, inv, counts = np.unique(sym, return_inverse=True, return_counts=True)
        out += (-np.log2(counts / sym.size))[inv.reshape(B, n)].sum(axis=1)
    return out


def entropy_bits(q: Tensor, scope: str = "tile") -> Tensor:
    """Per tile: the ideal code length of its symbols under independent per-dimension coders.

    ``tile``: coders fit per tile, sum_j n H_j (H_j the empirical entropy of the tile's n symbols of dimension
    j); ``dataset``: coders fit on all B tiles, -sum_(i, j) log2 p_j(q_bij) (its mean over tiles is n sum_j H_j
    of the pooled symbols).

    Args:
        q: (B, n, d) integer symbols.
        scope: ``tile`` or ``dataset``.

    Returns:
        (B,) float64 bits.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    qn = q.detach().cpu().numpy()
    if scope == "dataset":
        return torch.from_numpy(_code_bits(qn))
    return torch.from_numpy(np.concatenate([_code_bits(qn[b:b + 1]) for b in range(qn.shape[0])]))


@torch.no_grad()
def quantize_weights_(module: nn.Module, bits: int) -> Dict[str, int]:
    """Fake-quantize every weight matrix (dim >= 2) of ``module`` in place, per output channel (row), symmetric.

    Returns:
        {"values": quantized values, "side_bits": float16 scales, one per row}.
    """
    values = side = 0
    qmax = 2 ** (bits - 1) - 1
    for p in module.parameters():
        if p.dim() < 2:
            continue
        w = p.reshape(p.shape[0], -1)
        scale = _fp16_up(w.abs().amax(dim=1, keepdim=True).float() / qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        p.copy_((torch.clamp(torch.round(w / scale), -qmax, qmax) * scale).reshape(p.shape))
        values += w.numel()
        side += w.shape[0] * SCALE_BITS
    return {"values": values, "side_bits": side}
