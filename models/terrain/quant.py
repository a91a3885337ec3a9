"""Post-training quantization of the payload (spec huvr 5) and, optionally, of the shared decoder weights.

Payload tokens z (B, n, d): symmetric per-dimension min-max scales, per tile (``scope: tile``, the spec's
reading: 512 side bits per tile = d scales x 16 bit) or over the whole evaluated set (``scope: dataset``):
scale_j = max|z_.j| / (2^(b-1) - 1), q = clip(round(z / scale_j), -(2^(b-1) - 1), 2^(b-1) - 1), z_hat = q scale_j.
Scales are stored as float16, rounded up (so no value clips and |z - z_hat| <= scale_j / 2 exactly).

Bits per pixel: uncompressed = (n d b + side bits) / pixels; entropy = (sum_j n H_j + side bits) / pixels with
H_j the empirical entropy (bits) of dimension j's n symbols in the tile (the Shannon bound of independent
per-dimension coders fit per tile).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["quantize_payload", "entropy_bits", "quantize_weights_", "SCALE_BITS", "SCOPES"]

SCALE_BITS = 16
SCOPES = ("tile", "dataset")


def _fp16_up(s: Tensor) -> Tensor:
    """float16 value >= s (the stored scale), returned as float32."""
    h = s.to(torch.float16)
    low = h.float() < s
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def quantize_payload(z: Tensor, bits: int, scope: str = "tile") -> Tuple[Tensor, Tensor, Tensor, int]:
    """Symmetric per-dimension quantization of payload tokens.

    Args:
        z: (B, n, d) payload.
        bits: bits per value, >= 2.
        scope: ``tile`` (scales per tile and dimension) or ``dataset`` (one scale per dimension over the batch).

    Returns:
        (z_hat (B, n, d) float32, integer symbols q (B, n, d), scales (B or 1, 1, d), side bits per tile).
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
    side = z.shape[2] * SCALE_BITS if scope == "tile" else 0
    return q * scale, q.to(torch.int64), scale, side


def entropy_bits(q: Tensor) -> Tensor:
    """Per tile: sum over dimensions j of n H_j (H_j the empirical entropy of the n symbols of dimension j).

    Args:
        q: (B, n, d) integer symbols.

    Returns:
        (B,) float64 bits.
    """
    qn = q.detach().cpu().numpy()
    B, n, d = qn.shape
    out = np.zeros(B)
    for b in range(B):
        for j in range(d):
            _, counts = np.unique(qn[b, :, j], return_counts=True)
            p = counts / n
            out[b] += -n * float(np.sum(p * np.log2(p)))
    return torch.from_numpy(out)


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
