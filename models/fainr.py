"""FA-INR baseline (reference ``KVMemoryModel``), registered as ``fainr``.

A mixture of experts: a gating grid routes each point to its top-2 experts; each expert is a SIREN encoder of
the positionally encoded coordinate whose output queries a key-value memory (top-K cross-attention), with the
selected values adapted to the condition; the weighted expert outputs are decoded by a ReLU MLP with a sigmoid.
Facts: spec/baselines.md section 3; quirks: section 5 items 3-5, 7.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from models.components.encodings import positional_encoding
from models.components.flat import FlatInputModel
from models.components.grids import line_product, uniform_parameter
from models.components.mlp import AUTO_OUTPUT_MEAN, MLP, check_init_output_mean, init_output_bias
from models.components.siren import SirenMLP
from util.config import NON_NEGATIVE, POSITIVE, VERTICES, above, one_of
from util.registry import ConfigError, register
from util.sampling import sample_grid

__all__ = ["FAINR", "MemoryExpert", "PAPER_CONFIGS", "PAPER_ENCODER_LR", "ENCODER_INITS"]

# Paper configurations (configs/*/baselines.yaml, config_id 2): constructor kwargs plus the data's cond_dim.
# Parameters: nyx 9,520,329, mpas 969,462, clover 970,102 (spec 3.6).
PAPER_CONFIGS = {
    "nyx": dict(cond_dim=3, cond_hidden_dims=16, num_entries=1024, feature_dim_3d=32, feature_dim_1d=64, top_k=16,
                chunk_size=1024, num_hidden_layers=4, mlp_encoder_dim=512, mlp_hidden_dim=128, n_experts=8,
                manager_res=16),
    "mpas": dict(cond_dim=4, cond_hidden_dims=10, num_entries=512, feature_dim_3d=16, feature_dim_1d=32, top_k=8,
                 chunk_size=512, num_hidden_layers=2, mlp_encoder_dim=256, mlp_hidden_dim=128, n_experts=5,
                 manager_res=16),
    "clover": dict(cond_dim=6, cond_hidden_dims=10, num_entries=512, feature_dim_3d=16, feature_dim_1d=32, top_k=8,
                   chunk_size=512, num_hidden_layers=2, mlp_encoder_dim=256, mlp_hidden_dim=128, n_experts=5,
                   manager_res=16),
}
# Learning rate of the ``encoder_mlps`` parameter group in the paper runs (optim.param_groups.encoder_mlps.lr);
# None: no separate group (MPAS, spec 3.5 / 5.5). Every other parameter uses 1e-4.
PAPER_ENCODER_LR = {"nyx": 1e-5, "mpas": None, "clover": 1e-5}

ENCODER_INITS = ("reference", "siren", "xavier")


class MemoryExpert(nn.Module):
    """One FA-INR expert: SIREN encoder, top-K key-value memory cross-attention, condition value adapter.

    m = encoder(pe); Q = W_q LN(m) (LN shared, passed in); K~ = M_K W_k^T, V~ = M_V W_v^T (re-projected each
    call); the top-K entries by unscaled Q.K~_j (exact global top-K; computed per key chunk, then over the
    union); V'_j = V~_j + LN_a(W_2 ReLU(W_1 [V~_j ; q] + b_1) + b_2); out = softmax(Q K~_S^T / sqrt(d)) V' + m.

    The encoder is a :class:`~models.components.siren.SirenMLP` (raw weight matrices as in the reference, biases
    0). ``encoder_init`` 'reference' (paper): every matrix, first and output included, U(+-sqrt(6/fan_in)/w0)
    (the reference's Xavier re-init acts only on nn.Linear modules and is a no-op, spec 5.3); 'siren': first
    layer U(+-1/fan_in); 'xavier': Xavier-uniform (what the reference's re-init intends). Adapter: an
    :class:`~models.components.mlp.MLP` with Xavier-normal weights and N(0, 1e-3) biases.
    """

    def __init__(self, in_dim: int, d: int, d1: int, enc_width: int, enc_hidden_layers: int, num_entries: int,
                 top_k: int, chunk_size: int, adapter_width: int, omega_0: float, encoder_init: str):
        super().__init__()
        self.top_k, self.chunk_size, self.d = top_k, chunk_size, d
        self.encoder = SirenMLP(in_dim, enc_width, enc_hidden_layers, d, omega_0, encoder_init, bias_init="zeros")
        self.w_q = nn.Linear(d, d, bias=False)
        self.w_k = nn.Linear(d, d, bias=False)
        self.w_v = nn.Linear(d, d, bias=False)
        self.adapter = MLP([d + d1, adapter_width, d], init="xavier_normal")
        self.adapter_norm = nn.LayerNorm(d)
        self.mem_keys = nn.Parameter(torch.empty(num_entries, d))  # (E, key_dim = d)
        nn.init.kaiming_uniform_(self.mem_keys, nonlinearity="relu")  # U(+-sqrt(6 / d))
        self.mem_values = nn.Parameter(torch.empty(num_entries, d).uniform_(-1e-3, 1e-3))  # (E, d)

    def select(self, Q: torch.Tensor, Kp: torch.Tensor) -> torch.Tensor:
        """Indices (n, K) of the K largest Q.K~_j (no gradient), chunked over the E keys."""
        with torch.no_grad():
            E = Kp.shape[0]
            if self.chunk_size >= E:
                return (Q @ Kp.t()).topk(self.top_k, dim=-1).indices
            vals, idx = [], []
            for s in range(0, E, self.chunk_size):
                sc = Q @ Kp[s:s + self.chunk_size].t()
                v, i = sc.topk(min(self.top_k, sc.shape[-1]), dim=-1)
                vals.append(v)
                idx.append(i + s)
            vals, idx = torch.cat(vals, -1), torch.cat(idx, -1)
            return idx.gather(-1, vals.topk(self.top_k, dim=-1).indices)

    def forward(self, pe: torch.Tensor, q: torch.Tensor, query_norm: nn.LayerNorm) -> torch.Tensor:
        """pe: (n, in_dim) encoded coordinates, q: (n, d1) condition feature -> (n, d)."""
        m = self.encoder(pe)  # (n, d)
        Q = self.w_q(query_norm(m))  # (n, d)
        Kp = self.w_k(self.mem_keys)  # (E, d)
        Vp = self.w_v(self.mem_values)  # (E, d)
        idx = self.select(Q, Kp)  # (n, K)
        K_s, V_s = Kp[idx], Vp[idx]  # (n, K, d) each
        qk = q[:, None, :].expand(-1, idx.shape[1], -1).to(V_s.dtype)
        V_s = V_s + self.adapter_norm(self.adapter(torch.cat([V_s, qk], dim=-1)))
        att = torch.softmax((Q[:, None, :] @ K_s.transpose(1, 2)) / math.sqrt(self.d), dim=-1)  # (n, 1, K)
        a = (att.to(V_s.dtype) @ V_s).squeeze(1)
        return a + m


@register("model", "fainr")
class FAINR(FlatInputModel):
    """FA-INR: top-2 routed mixture of SIREN + key-value-memory experts, as in the DRR-Net reference baseline.

    Defaults (Nyx paper config) reproduce the reference, including its quirks (spec 5.3-5.4, 5.7): the
    encoder init 'reference', gate top-2 without noise or load-balancing loss, unclamped line lookups.
    Corrected variants: ``encoder_init='siren'`` or ``'xavier'``, ``clamp_conditions=True``.

    Flat input u = [x, c]. Condition: q = prod_k lerp(line_k, c_k) in R^{d1}, lines (L, d1) initialised
    U(0.01^(1/d_c), 0.02^(1/d_c)); q enters only through the value adapters. Gate: a grid
    (manager_features, R, R, R) (U(-1e-3, 1e-3)) sampled at x (trilinear, align_corners=True, zeros) ->
    Linear (orthogonal weight, zero bias) -> softmax; keep the top ``gate_top_k`` experts and renormalise their
    probabilities. Each point is run through exactly its selected experts (each expert runs once per forward on
    the points routed to it, which gives the same result as the reference's per-slot loop);
    z = sum_k w_k expert_k(gamma(x), q); out = sigmoid(MLP(z)), MLP = Linear(d, h) ReLU x3 Linear(h, 1),
    Xavier-normal weights and N(0, 1e-3) biases.

    2D fields (spatial_dims=2) use a 2D gating grid and the 2D positional encoding (2 + 4 pe_frequencies columns).

    Optimizer: ``param_groups()`` names the SIREN encoders of all experts ``encoder_mlps`` (paper: lr 1e-5 on
    Nyx and Clover, see ``PAPER_ENCODER_LR``). ``training_stats()`` reports, for the last training-mode forward,
    ``fainr/expert_{e}_fraction``: the fraction of points that have expert e among their selected experts
    (these sum to gate_top_k, i.e. 2), and ``fainr/max_expert_fraction``.

    Args:
        cond_dim: number of condition parameters d_c (injected from the data).
        spatial_dims: number of spatial dims (injected from the data).
        cond_hidden_dims: condition line length L. Paper: 16 (Nyx), 10 (MPAS, Clover).
        num_entries: memory entries E per expert. Paper: 1024 / 512 / 512.
        feature_dim_3d: d, width of encoder output, keys, values and attention (= key_dim). Paper: 32 / 16 / 16.
        feature_dim_1d: d1, condition line channels. Paper: 64 / 32 / 32.
        top_k: memory entries attended per point. Paper: 16 / 8 / 8.
        chunk_size: key chunk for the top-K search (result identical for any value; None = E). Paper: E.
        num_hidden_layers: L_h, hidden SIREN layers (L_h + 2 matrices in all). Paper: 4 / 2 / 2.
        mlp_encoder_dim: SIREN width. Paper: 512 / 256 / 256.
        mlp_hidden_dim: decoder width. Paper: 128.
        n_experts: number of experts. Paper: 8 / 5 / 5.
        manager_res: gating grid resolution R. Paper: 16.
        manager_features: gating grid channels (hard-coded 16 in the reference). Paper: 16.
        gate_top_k: experts per point (hard-coded 2 in the reference; 1 if n_experts == 1). Paper: 2.
        pe_frequencies: positional-encoding frequencies. Paper: 10.
        omega_0: SIREN frequency factor. Paper: 30.
        adapter_width: hidden width of the value adapter (hard-coded 64 in the reference). Paper: 64.
        encoder_init: 'reference' (paper), 'siren' or 'xavier'; see :class:`~models.components.siren.SirenMLP`.
        clamp_conditions: clamp c to [0, 1] before the line lookups (corrected, spec 5.7). Paper: False.
        init_output_mean: None (default: the reference init), a number, or "auto" (the training mean of the
            normalized values, supplied by the program): the last decoder bias starts where the output equals
            it (logit, through the sigmoid). The guard against an early collapse of the sigmoid output.
    """

    config_rules = dict(
        cond_hidden_dims=VERTICES, num_entries=POSITIVE, feature_dim_3d=POSITIVE, feature_dim_1d=POSITIVE,
        top_k=POSITIVE, chunk_size=POSITIVE, num_hidden_layers=NON_NEGATIVE, mlp_encoder_dim=POSITIVE,
        mlp_hidden_dim=POSITIVE, n_experts=POSITIVE, manager_res=VERTICES, manager_features=POSITIVE,
        gate_top_k=POSITIVE, pe_frequencies=NON_NEGATIVE, omega_0=above(0), adapter_width=POSITIVE,
        encoder_init=one_of(*ENCODER_INITS))
    """Range rules of the config keys (checked when a config is loaded)."""

    def __init__(self, cond_dim: int, spatial_dims: int = 3, cond_hidden_dims: int = 16, num_entries: int = 1024,
                 feature_dim_3d: int = 32, feature_dim_1d: int = 64, top_k: int = 16,
                 chunk_size: Optional[int] = None, num_hidden_layers: int = 4, mlp_encoder_dim: int = 512,
                 mlp_hidden_dim: int = 128, n_experts: int = 8, manager_res: int = 16, manager_features: int = 16,
                 gate_top_k: int = 2, pe_frequencies: int = 10, omega_0: float = 30.0, adapter_width: int = 64,
                 encoder_init: str = "reference", clamp_conditions: bool = False,
                 init_output_mean: Union[float, str, None] = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"fainr supports spatial_dims 2 or 3, got {spatial_dims}")
        if cond_dim < 1:
            raise ConfigError("fainr needs cond_dim >= 1")
        if encoder_init not in ENCODER_INITS:
            raise ConfigError(f"model.encoder_init must be one of {ENCODER_INITS}, got {encoder_init!r}")
        if not 1 <= top_k <= num_entries:
            raise ConfigError(f"model.top_k must be in [1, num_entries={num_entries}], got {top_k}")
        if n_experts < 1 or gate_top_k < 1:
            raise ConfigError("model.n_experts and model.gate_top_k must be >= 1")
        self.spatial_dims, self.cond_dim = spatial_dims, cond_dim
        self.n_experts = n_experts
        self.gate_top_k = min(gate_top_k, n_experts)
        self.pe_frequencies = pe_frequencies
        self.clamp_conditions = clamp_conditions
        d, d1 = feature_dim_3d, feature_dim_1d
        lo, hi = 0.01 ** (1.0 / cond_dim), 0.02 ** (1.0 / cond_dim)
        self.lines = nn.ParameterList([uniform_parameter((cond_hidden_dims, d1), lo, hi)
                                       for _ in range(cond_dim)])  # (L, d1)
        self.manager = uniform_parameter((manager_features, *([manager_res] * spatial_dims)), -1e-3, 1e-3)  # (16, R..)
        self.gate = nn.Linear(manager_features, n_experts)
        nn.init.orthogonal_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        pe_dim = spatial_dims * (1 + 2 * pe_frequencies)
        self.experts = nn.ModuleList([
            MemoryExpert(pe_dim, d, d1, mlp_encoder_dim, num_hidden_layers, num_entries, top_k,
                         chunk_size or num_entries, adapter_width, omega_0, encoder_init)
            for _ in range(n_experts)])
        self.query_norm = nn.LayerNorm(d)  # shared by all experts
        h = mlp_hidden_dim
        self.decoder = MLP([d, h, h, h, 1], init="xavier_normal")
        if check_init_output_mean(init_output_mean) not in (None, AUTO_OUTPUT_MEAN):
            init_output_bias(self.decoder[-1], init_output_mean, sigmoid=True)
        self._route_fraction: Optional[torch.Tensor] = None  # (n_experts,), last training-mode forward

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """{'encoder_mlps': the SIREN encoder parameters of every expert} for optim.param_groups."""
        return {"encoder_mlps": [p for e in self.experts for p in e.encoder.parameters()]}

    def route(self, x: torch.Tensor):
        """Gate of points x (n, d): (weights (n, k) summing to 1, expert indices (n, k), probabilities (n, E))."""
        g = sample_grid(self.manager, x[None], padding_mode="zeros")[0]  # (n, 16)
        probs = torch.softmax(self.gate(g).float(), dim=-1)
        top_p, top_i = probs.topk(self.gate_top_k, dim=-1)
        return top_p / top_p.sum(-1, keepdim=True), top_i, probs

    def forward_flat(self, u: torch.Tensor) -> torch.Tensor:
        """u: (n, spatial_dims + cond_dim) -> (n, 1)."""
        x = u[:, :self.spatial_dims]
        q = line_product(self.lines, u[:, self.spatial_dims:], clamp=self.clamp_conditions)  # (n, d1)
        w, top_i, _ = self.route(x)
        if self.training:
            counts = torch.bincount(top_i.reshape(-1), minlength=self.n_experts)
            self._route_fraction = counts.detach().float() / max(u.shape[0], 1)
        pe = positional_encoding(x, self.pe_frequencies, include_input=True, layout="frequency")  # gamma(x)
        z = None
        for e, expert in enumerate(self.experts):
            hit = top_i == e  # (n, k)
            rows = hit.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            we = (w * hit).sum(-1)[rows]
            o = expert(pe[rows], q[rows], self.query_norm).float() * we[:, None]
            z = (torch.zeros(u.shape[0], o.shape[1], device=u.device, dtype=o.dtype) if z is None else z)
            z = z.index_add(0, rows, o)
        if z is None:  # no points
            z = u.new_zeros(u.shape[0], self.query_norm.normalized_shape[0])
        return torch.sigmoid(self.decoder(z))

    def training_stats(self) -> Dict[str, float]:
        """Routing fractions of the last training-mode forward (sum = gate_top_k); {} before the first one."""
        if self._route_fraction is None:
            return {}
        fr = self._route_fraction.cpu().tolist()
        stats = {f"fainr/expert_{e}_fraction": v for e, v in enumerate(fr)}
        stats["fainr/max_expert_fraction"] = max(fr)
        return stats
