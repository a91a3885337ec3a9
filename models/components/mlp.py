"""MLP heads of the field models, output activations and output-bias initialisation.

Contents:
    MLP                      Linear / activation stack (nn.Sequential): biased with PyTorch's default, Xavier-normal
                             (the baselines' reference decoders) or Xavier-uniform init; bias-free + Xavier-uniform
                             is the pure-PyTorch replacement of tiny-cuda-nn's FullyFusedMLP
    init_linears             re-initialise every nn.Linear of a module with one of :data:`LINEAR_INITS`
    MLPDecoder               DRR-Net's decoder: an :class:`MLP` as ``.net``
    output_activation        "sigmoid" / "none" / "clamp" on a model's raw output (:data:`OUT_ACTIVATIONS`)
    AUTO_OUTPUT_MEAN, check_init_output_mean, init_output_bias
                             where a model's output starts (the collapse guard)
"""
from __future__ import annotations

import math
from typing import List, Sequence, Type

import torch
from torch import Tensor, nn

from util.registry import ConfigError

__all__ = ["MLP", "init_linears", "MLPDecoder", "LINEAR_INITS", "OUT_ACTIVATIONS", "output_activation",
           "AUTO_OUTPUT_MEAN", "check_init_output_mean", "init_output_bias"]

LINEAR_INITS = ("default", "xavier_normal", "xavier_uniform")
OUT_ACTIVATIONS = ("sigmoid", "none", "clamp")


def init_linears(module: nn.Module, init: str, bias_std: float = 1e-3) -> None:
    """Re-initialise every ``nn.Linear`` in ``module`` (in ``modules()`` order, weight then bias).

    ``"default"``: leave PyTorch's init; ``"xavier_normal"``: Xavier-normal weights, biases N(0, bias_std) (the
    reference decoders of Explorable-INR and FA-INR); ``"xavier_uniform"``: Xavier-uniform weights, zero biases
    (tiny-cuda-nn's default).
    """
    if init not in LINEAR_INITS:
        raise ValueError(f"init_linears: init must be one of {LINEAR_INITS}, got {init!r}")
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                if init == "xavier_normal":
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.normal_(m.bias, 0.0, bias_std)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)


class MLP(nn.Sequential):
    """``Linear(dims[0], dims[1]), act, ..., act, [Dropout], Linear(dims[-2], dims[-1])``; no output activation.

    ``len(dims) - 1`` linear layers (a single linear layer when ``len(dims) == 2``). The layers are built in order
    with PyTorch's default init, then re-initialised by :func:`init_linears` (so the random draws are those of
    building the layers followed by the re-init).

    Args:
        dims: widths, input first, output last (>= 2 entries).
        bias: linear layers with biases (False: tcnn's FullyFusedMLP layout).
        dropout: probability of a Dropout after the last activation (0 = none).
        init: one of :data:`LINEAR_INITS`.
        bias_std: std of the ``"xavier_normal"`` biases.
        act_layer: activation class between layers.
    """

    def __init__(self, dims: Sequence[int], bias: bool = True, dropout: float = 0.0, init: str = "default",
                 bias_std: float = 1e-3, act_layer: Type[nn.Module] = nn.ReLU):
        dims = [int(d) for d in dims]
        if len(dims) < 2:
            raise ValueError(f"MLP: need at least input and output widths, got {dims}")
        n = len(dims) - 1
        layers: List[nn.Module] = []
        for i in range(n):
            if i == n - 1 and dropout > 0 and n > 1:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))  # weight (dims[i+1], dims[i])
            if i < n - 1:
                layers.append(act_layer())
        super().__init__(*layers)
        self.dims = dims
        init_linears(self, init, bias_std)

    @property
    def linears(self) -> List[nn.Linear]:
        """The linear layers in order."""
        return [m for m in self if isinstance(m, nn.Linear)]

    @property
    def out_dim(self) -> int:
        return self.dims[-1]


class MLPDecoder(nn.Module):
    """DRR-Net's decoder: ``num_layers`` linear layers in total, ReLU between them, no activation after the last.

    ``in_dim -> width -> ... -> width -> out_dim`` (an :class:`MLP` held as ``.net``); with ``num_layers == 1``
    a single ``in_dim -> out_dim``.

    Args:
        in_dim: input width.
        width: hidden width.
        num_layers: linear layers in total (>= 1).
        out_dim: output width.
        act_layer: activation class between layers.
    """

    def __init__(self, in_dim: int, width: int, num_layers: int, out_dim: int = 1,
                 act_layer: Type[nn.Module] = nn.ReLU):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLPDecoder: num_layers must be >= 1, got {num_layers}")
        self.net = MLP([in_dim] + [width] * (num_layers - 1) + [out_dim], act_layer=act_layer)
        self.out_dim = out_dim

    @property
    def linears(self) -> List[nn.Linear]:
        """The linear layers in order (ReLU between them)."""
        return self.net.linears

    def forward(self, h: Tensor) -> Tensor:
        """h: (..., in_dim) -> (..., out_dim)."""
        return self.net(h)


def output_activation(a: Tensor, name: str) -> Tensor:
    """A model's output activation: "sigmoid", "clamp" (to [0, 1]) or "none" (identity)."""
    if name == "sigmoid":
        return torch.sigmoid(a)
    if name == "clamp":
        return a.clamp(0.0, 1.0)
    return a


AUTO_OUTPUT_MEAN = "auto"
"""``init_output_mean: auto``: the program replaces it with the training mean of the normalized values
(``util.build.build_model`` reads it from the dataset); a model built by hand keeps its default init."""


def check_init_output_mean(value, key: str = "model.init_output_mean"):
    """Validate an ``init_output_mean`` value: None, "auto" or a finite number; returns it unchanged."""
    if value is None or value == AUTO_OUTPUT_MEAN:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{key} must be a number, 'auto' or null, got {value!r}")
    return value


@torch.no_grad()
def init_output_bias(layer: nn.Linear, mean: float, sigmoid: bool) -> None:
    """Set ``layer``'s bias so that the model output starts at about ``mean`` (a data-space value).

    With a sigmoid after ``layer`` the bias is ``logit(mean)`` (mean clipped to [1e-4, 1 - 1e-4]), else
    ``mean`` itself. Guards against the early collapse of a sigmoid output whose data mean is far from 0.5:
    the first Adam steps push every pre-activation the same way, the sigmoid saturates and all gradients
    underflow to 0 (see DRRNet's docstring).
    """
    mean = float(mean)
    if sigmoid:
        m = min(max(mean, 1e-4), 1.0 - 1e-4)
        mean = float(torch.logit(torch.tensor(m, dtype=torch.float64)))
    layer.bias.fill_(mean)
