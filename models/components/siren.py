"""Sine-activated MLPs (SIREN, Sitzmann et al. 2020) with the SIREN init and FA-INR's encoder variants."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SirenMLP", "SIREN_INITS", "SIREN_BIAS_INITS"]

SIREN_INITS = ("siren", "reference", "xavier")
SIREN_BIAS_INITS = ("zeros", "default")


class SirenMLP(nn.Module):
    """``h_0 = sin(w0 (W_0 x + b_0))``, ``h_i = sin(w0 (W_i h_{i-1} + b_i))`` for i = 1..hidden_layers, then a
    linear ``out = W_out h + b_out`` (no sine).

    Raw weight matrices (``weights[i]`` (out, in), ``biases[i]`` (out,); ``hidden_layers + 2`` of each), built
    layer by layer (weight, then bias). Weight init (``init``):

    * ``"siren"``: the SIREN rule, first layer U(+-1/fan_in), every other matrix (the output one included)
      U(+-sqrt(6/fan_in)/w0);
    * ``"reference"`` (FA-INR's reference code): U(+-sqrt(6/fan_in)/w0) on every matrix, the first included;
    * ``"xavier"``: Xavier-uniform on every matrix.

    Bias init (``bias_init``): ``"zeros"`` (FA-INR) or ``"default"`` (PyTorch's nn.Linear rule
    U(+-1/sqrt(fan_in)), the image SIREN).

    Args:
        in_dim: input width.
        width: width of every sine layer.
        hidden_layers: sine layers after the first one.
        out_dim: output width.
        omega_0: w0 of every sine layer.
        init: one of :data:`SIREN_INITS`.
        bias_init: one of :data:`SIREN_BIAS_INITS`.
    """

    def __init__(self, in_dim: int, width: int, hidden_layers: int, out_dim: int, omega_0: float = 30.0,
                 init: str = "siren", bias_init: str = "zeros"):
        super().__init__()
        if init not in SIREN_INITS:
            raise ValueError(f"SirenMLP: init must be one of {SIREN_INITS}, got {init!r}")
        if bias_init not in SIREN_BIAS_INITS:
            raise ValueError(f"SirenMLP: bias_init must be one of {SIREN_BIAS_INITS}, got {bias_init!r}")
        self.omega_0 = float(omega_0)
        dims = [in_dim] + [width] * (hidden_layers + 1) + [out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (fi, fo) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.empty(fo, fi)  # (out, in), F.linear layout
            if init == "xavier":
                nn.init.xavier_uniform_(w)
            elif init == "siren" and i == 0:
                nn.init.uniform_(w, -1.0 / fi, 1.0 / fi)
            else:
                bound = math.sqrt(6.0 / fi) / omega_0
                nn.init.uniform_(w, -bound, bound)
            self.weights.append(nn.Parameter(w))
            b = torch.zeros(fo)
            if bias_init == "default":
                nn.init.uniform_(b, -1.0 / math.sqrt(fi), 1.0 / math.sqrt(fi))
            self.biases.append(nn.Parameter(b))

    def forward(self, h: Tensor) -> Tensor:
        """h: (..., in_dim) -> (..., out_dim)."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = F.linear(h, w, b)
            if i < last:
                h = torch.sin(self.omega_0 * h)
        return h
