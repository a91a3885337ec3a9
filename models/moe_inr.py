"""MoE-INR (spec moe_inr.md 2): a policy network routes each (x, y, z, t) coordinate to one of k expert decoders
that all read one shared encoder's features.

Layers (M = ``M``, the paper's "initial neuron count"; d = 4 coordinate columns):

- policy P: FC d->M sin, FC M->M sin -> h_P; FC on [h_P, e] (9M) -> k logits; p = softmax(logits).
- encoder E: learnable Fourier map FC d->M, then [sin, cos] -> 2M; FC 2M->4M sin; FC 4M->8M sin; bottleneck
  residual block e = h + W3 a(W2 a(W1 h)) with 8M->2M->2M->8M and an identity skip (``res_activation`` a:
  "sin" by default; the paper does not say; no activation after the sum) -> e in R^{8M}.
- experts D_j: one FC 8M->1 each, no activation (Eq. 1 counts k (8M + 1); the prose's deeper experts do not fit
  the published counts).

Parameter count (Eq. 1, d = 4): 77 M^2 + 35 M + 17 M k + 2 k (:func:`moe_param_count`).

Initialization: SIREN (Sitzmann et al.) everywhere: sine layers compute sin(omega0 (W h + b)); the first layers
(policy input, Fourier map) draw W ~ U(-1/in, 1/in), every later layer W ~ U(-sqrt(6/in)/omega0, +), biases keep
PyTorch's default. ``omega0`` = 30 (the SIREN default; the paper does not give it).

Modes (``mode``):

- "top1" (default, compression): j* = argmax_j p_j per coordinate and only expert j* decodes it (the
  coordinates are grouped by expert and each expert module is called once on its own group, or not at all).
- "average" (uncertainty, spec 5): the output is the mean of the experts' values, its spread their variance
  (:meth:`MoEINR.mean_var`); ``average_experts`` = n > 0 averages the n most probable experts per coordinate,
  0 all k. The training loss of this mode (task ``moe_inr``) adds the documented variance regularizer.

Training (task ``moe_inr``) needs every expert on every coordinate: :meth:`MoEINR.forward_all`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from models.base import FieldModel
from util.registry import ConfigError, register

__all__ = ["MoEINR", "moe_param_count", "MODES", "RES_ACTIVATIONS"]

MODES = ("top1", "average")
RES_ACTIVATIONS = ("sin", "relu", "none")


def moe_param_count(M: int, k: int, d: int = 4) -> int:
    """Parameters of MoE-INR: policy + encoder + experts (Eq. 1 for d = 4: 77 M^2 + 35 M + 17 M k + 2 k)."""
    policy = d * M + M + M * M + M + 9 * M * k + k
    encoder = d * M + M + 8 * M * M + 4 * M + 32 * M * M + 8 * M + 36 * M * M + 12 * M
    return policy + encoder + k * (8 * M + 1)


class _Sine(nn.Module):
    """sin(omega0 (W h + b)) with SIREN init (``first``: U(-1/in, 1/in), else U(-sqrt(6/in)/omega0, +))."""

    def __init__(self, n_in: int, n_out: int, omega0: float, first: bool = False, activation: str = "sin"):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.omega0, self.activation = float(omega0), activation
        _siren_init(self.linear.weight, n_in, omega0, first)

    def forward(self, h: Tensor) -> Tensor:
        z = self.linear(h)
        if self.activation == "sin":
            return torch.sin(self.omega0 * z)
        if self.activation == "relu":
            return torch.relu(z)
        return z


def _siren_init(w: Tensor, n_in: int, omega0: float, first: bool) -> None:
    bound = 1.0 / n_in if first else math.sqrt(6.0 / n_in) / omega0
    with torch.no_grad():
        w.uniform_(-bound, bound)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@register("model", "moe_inr")
class MoEINR(FieldModel):
    """Mixture-of-experts INR for one time-varying scalar field (spec moe_inr 2, 5).

    ``forward(x (B, N, d), c (B, d_c)) -> (B, N, 1)``: the top-1 routed value ("top1") or the experts' mean
    ("average"). ``c`` (d_c = 0 for a single volume) is appended to the coordinates.

    Args:
        M: initial neuron count (paper appendix Table 1 sets it from the target CR; vortex CR 5,065 -> 87).
        k: number of experts (paper: 7).
        omega0: SIREN frequency of every sine layer (paper: not stated; SIREN default 30).
        mode: "top1" (hard routing, only the chosen expert decodes) or "average" (mean of the experts, variance
            as the uncertainty).
        average_experts: in "average" mode, how many of the most probable experts are averaged per coordinate
            (0 = all k; must be >= 2 otherwise).
        res_activation: activation inside the bottleneck residual block: "sin" (default), "relu" or "none"
            (the paper does not say).
        cond_dim: condition columns appended to the coordinates (injected from the data; 0 for one volume).
        spatial_dims: coordinate columns (injected; 4 = x, y, z, t).
        out_dim: output channels (injected; must be 1: one scalar variable per network, as the paper).
        init_output_mean: start every expert's bias at this value: "auto" = the mean of the normalized data
            (set by the program from the dataset), null = the SIREN init (bias U(-1/sqrt(8M), +)). Not in the
            paper; with [-1, 1] data whose mean is far from 0 (the demo's -0.81) the SIREN start otherwise
            spends hundreds of small-lr steps moving the biases.
    """

    def __init__(self, M: int = 87, k: int = 7, omega0: float = 30.0, mode: str = "top1", average_experts: int = 0,
                 res_activation: str = "sin", cond_dim: int = 0, spatial_dims: int = 4, out_dim: int = 1,
                 init_output_mean: Union[float, str, None] = "auto"):
        super().__init__()
        if out_dim != 1:
            raise ConfigError(f"model moe_inr decodes one scalar variable (out_dim 1); the data has {out_dim} "
                              f"channels: compress each variable with its own network")
        if not _is_int(M) or M < 1:
            raise ConfigError(f"model.M must be an integer >= 1, got {M!r}")
        if not _is_int(k) or k < 1:
            raise ConfigError(f"model.k must be an integer >= 1, got {k!r}")
        if mode not in MODES:
            raise ConfigError(f"model.mode must be one of {', '.join(MODES)}; got {mode!r}")
        if res_activation not in RES_ACTIVATIONS:
            raise ConfigError(f"model.res_activation must be one of {', '.join(RES_ACTIVATIONS)}; "
                              f"got {res_activation!r}")
        if not _is_int(average_experts) or average_experts < 0 or average_experts == 1 or average_experts > k:
            raise ConfigError(f"model.average_experts must be 0 (all) or an integer in [2, k={k}], "
                              f"got {average_experts!r}")
        if mode == "average" and k < 2:
            raise ConfigError("model.mode 'average' needs k >= 2 experts (a variance of one expert is 0)")
        if not float(omega0) > 0:
            raise ConfigError(f"model.omega0 must be > 0, got {omega0!r}")
        self.M, self.k, self.omega0, self.mode = int(M), int(k), float(omega0), mode
        self.average_experts = int(average_experts)
        self.cond_dim, self.spatial_dims = int(cond_dim), int(spatial_dims)
        d = self.in_dim = self.spatial_dims + self.cond_dim
        w0 = self.omega0
        # policy
        self.policy_in = _Sine(d, M, w0, first=True)
        self.policy_hidden = _Sine(M, M, w0)
        self.policy_out = nn.Linear(9 * M, k)
        _siren_init(self.policy_out.weight, 9 * M, w0, False)
        # encoder
        self.fourier = nn.Linear(d, M)
        _siren_init(self.fourier.weight, d, w0, True)
        self.enc1 = _Sine(2 * M, 4 * M, w0)
        self.enc2 = _Sine(4 * M, 8 * M, w0)
        self.res1 = _Sine(8 * M, 2 * M, w0, activation=res_activation)
        self.res2 = _Sine(2 * M, 2 * M, w0, activation=res_activation)
        self.res3 = nn.Linear(2 * M, 8 * M)
        _siren_init(self.res3.weight, 2 * M, w0, False)
        # experts
        self.experts = nn.ModuleList(nn.Linear(8 * M, 1) for _ in range(k))
        for ex in self.experts:
            _siren_init(ex.weight, 8 * M, w0, False)
        if isinstance(init_output_mean, str) and init_output_mean != "auto":
            raise ConfigError(f"model.init_output_mean must be a number, 'auto' or null, got {init_output_mean!r}")
        if init_output_mean is not None and not isinstance(init_output_mean, str):
            with torch.no_grad():
                for ex in self.experts:
                    ex.bias.fill_(float(init_output_mean))

    # ------------------------------------------------------------------------------------------ parts
    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """"policy", "encoder", "experts" (usable in ``optim.param_groups``)."""
        pol = [*self.policy_in.parameters(), *self.policy_hidden.parameters(), *self.policy_out.parameters()]
        enc = [*self.fourier.parameters(), *self.enc1.parameters(), *self.enc2.parameters(),
               *self.res1.parameters(), *self.res2.parameters(), *self.res3.parameters()]
        return {"policy": pol, "encoder": enc, "experts": list(self.experts.parameters())}

    def param_shares(self) -> Dict[str, float]:
        """Share of the parameters in each group (spec Table 2: encoder 96.90 %, experts 0.82 %, policy 2.28 %
        for M = 87, k = 7)."""
        counts = {n: sum(p.numel() for p in ps) for n, ps in self.param_groups().items()}
        total = sum(counts.values())
        return {n: c / total for n, c in counts.items()}

    def _inputs(self, x: Tensor, c: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """(P, d + d_c) flat inputs and the leading shape (B, N)."""
        if x.shape[-1] != self.spatial_dims:
            raise ValueError(f"moe_inr: x has {x.shape[-1]} coordinate columns, the model was built for "
                             f"{self.spatial_dims}")
        lead = tuple(x.shape[:-1])
        h = x.reshape(-1, self.spatial_dims)
        if self.cond_dim:
            cc = c.reshape(-1, 1, self.cond_dim).expand(x.shape[0], x.shape[1], self.cond_dim)
            h = torch.cat([h, cc.reshape(-1, self.cond_dim).to(h.dtype)], dim=-1)
        return h, lead

    def encode(self, h: Tensor) -> Tensor:
        """Shared encoder features e (P, 8M) of flat inputs h (P, d)."""
        z = self.omega0 * self.fourier(h)
        f = torch.cat([torch.sin(z), torch.cos(z)], dim=-1)
        f = self.enc2(self.enc1(f))
        return f + self.res3(self.res2(self.res1(f)))

    def policy_logits(self, h: Tensor, e: Tensor) -> Tensor:
        """Pre-softmax policy outputs (P, k)."""
        hp = self.policy_hidden(self.policy_in(h))
        return self.policy_out(torch.cat([hp, e], dim=-1))

    def expert_weights(self) -> Tuple[Tensor, Tensor]:
        """Every expert's weight (k, 8M) and bias (k,) (views of the expert modules' parameters)."""
        w = torch.cat([ex.weight for ex in self.experts], dim=0)
        b = torch.cat([ex.bias for ex in self.experts], dim=0)
        return w, b

    # ---------------------------------------------------------------------------------------- outputs
    def forward_all(self, x: Tensor, c: Tensor) -> Dict[str, Tensor]:
        """Training path: every expert on every coordinate.

        Returns:
            ``logits`` (B, N, k), ``values`` (B, N, k): expert j's value v_j at each coordinate.
        """
        h, lead = self._inputs(x, c)
        e = self.encode(h)
        logits = self.policy_logits(h, e)
        w, b = self.expert_weights()
        values = e @ w.t() + b
        return {"logits": logits.reshape(*lead, self.k), "values": values.reshape(*lead, self.k)}

    def route(self, x: Tensor, c: Tensor) -> Tensor:
        """Chosen expert j* = argmax_j p_j per coordinate, int64 (B, N)."""
        h, lead = self._inputs(x, c)
        return self.policy_logits(h, self.encode(h)).argmax(dim=-1).reshape(lead)

    def forward_top1(self, x: Tensor, c: Tensor) -> Tensor:
        """Hard top-1 routing: each coordinate decoded by its argmax expert only, (B, N, 1)."""
        h, lead = self._inputs(x, c)
        e = self.encode(h)
        j = self.policy_logits(h, e).argmax(dim=-1)
        out = e.new_empty(e.shape[0], 1)
        for idx, expert in enumerate(self.experts):
            sel = torch.nonzero(j == idx, as_tuple=True)[0]
            if sel.numel():
                out[sel] = expert(e[sel])
        return out.reshape(*lead, 1)

    def mean_var(self, x: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
        """Average mode: mean and (population) variance of the averaged experts' values, each (B, N, 1)."""
        out = self.forward_all(x, c)
        return self._mean_var(out["logits"], out["values"])

    def _mean_var(self, logits: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
        n = self.average_experts
        if n and n < self.k:
            top = logits.topk(n, dim=-1).indices
            values = values.gather(-1, top)
        mean = values.mean(dim=-1, keepdim=True)
        var = ((values - mean) ** 2).mean(dim=-1, keepdim=True)
        return mean, var

    def forward(self, x: Tensor, c: Tensor, all_experts: bool = False):
        """(B, N, 1) output of the configured mode; ``all_experts=True`` returns :meth:`forward_all`'s dict
        (the training path, callable through a DistributedDataParallel wrapper)."""
        if all_experts:
            return self.forward_all(x, c)
        if self.mode == "top1":
            return self.forward_top1(x, c)
        return self.mean_var(x, c)[0]
