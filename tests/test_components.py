"""Shared field components (models/components/) checked directly: shapes, init ranges, hand computations of the
line lookups, encodings, hash grid and GLU block (spec drrnet.md 2.3), the DRR lattice mixin and the model base."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.base import FieldModel
from models.components.encodings import FeatureUpsamplingPE, HashGrid, frequencies, positional_encoding
from models.components.flat import FlatInputModel, flat_input
from models.components.grids import (ConditionLines, DenseGrids, Planes, lerp_lines, line_product, per_axis,
                                     resample_line, uniform_parameter, upsample_grid)
from models.components.lattice import RefinedLatticeMixin
from models.components.mlp import (MLP, MLPDecoder, check_init_output_mean, init_linears, init_output_bias,
                                   output_activation)
from models.components.refiners import GLUBlock, GLURefiner, RMSNorm
from models.components.siren import SirenMLP
from util.registry import ConfigError
from util.sampling import grid_coords, sample_grid


# ---------------------------------------------------------------------------------------------------- lines
def test_lerp_lines_drr_formula_by_hand():
    lines = torch.tensor([[[0.0], [10.0], [40.0]],          # line 0: H = 3
                          [[1.0], [2.0], [4.0]]])           # line 1
    t = torch.tensor([[0.25, 0.75], [1.0, 0.0], [1.7, -3.0]])
    out = lerp_lines(lines, t)[..., 0]
    # s = t (H - 1): 0.5 -> 0 + 0.5 * 10; 1.5 -> 2 + 0.5 * 2; t = 1 -> i0 = H - 2, w = 1; t clamped to [0, 1]
    want = torch.tensor([[5.0, 3.0], [40.0, 1.0], [40.0, 1.0]])
    assert torch.equal(out, want)


def test_lerp_lines_reference_formula_wraps_and_blends():
    line = torch.tensor([[[2.0, 0.0], [6.0, 1.0], [10.0, 3.0]]])  # (1, 3, 2)
    t = torch.tensor([[0.75], [-0.25], [1.0]])
    out = lerp_lines(line, t, clamp=False)[:, 0]
    # s = 1.5: (1 - .5) v1 + .5 v2; s = -0.5: i0 = -1 (the last vertex), i1 = 0, w = 0.5; s = 2: v2 exactly
    want = torch.tensor([[8.0, 2.0], [6.0, 1.5], [10.0, 3.0]])
    assert torch.equal(out, want)
    with pytest.raises(IndexError):
        lerp_lines(line, torch.tensor([[1.8]]), clamp=False)
    # the two formulas are both linear interpolation: equal up to rounding inside [0, 1]
    r = torch.rand(50, 1)
    big = torch.randn(1, 7, 3)
    torch.testing.assert_close(lerp_lines(big, r, clamp=False), lerp_lines(big, r))


def test_line_product_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])               # L = 2
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [4.0, 0.0]])   # L = 3 (lengths may differ)
    c = torch.tensor([[0.5, 0.25], [0.0, 1.0], [1.0, -0.25]])
    out = line_product([a, b], c)
    # row 0: a(.5) = (2, 3), b(.25) = (1, 1.5); row 1: a(0) * b(1); row 2: b(-0.25): s = -0.5 wraps: (2, .5)
    want = torch.tensor([[2.0, 4.5], [4.0, 0.0], [6.0, 2.0]])
    assert torch.equal(out, want)
    clamped = line_product([a, b], c, clamp=True)
    assert torch.equal(clamped[2], torch.tensor([3.0, 4.0]) * b[0])


def test_resample_line_and_condition_lines_unification():
    line = torch.tensor([[0.0, 1.0], [4.0, 3.0]])
    assert torch.allclose(resample_line(line, 5)[:, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert resample_line(line, 2) is line
    torch.manual_seed(0)
    cl = ConditionLines([[2, 3], [4, 5]], channels=3, init_range=0.5)   # L = 2 levels, d_c = 2
    assert cl.out_dim == 2 * 2 * 3 and cl.param_max == [4, 5] and cl.max_len == 5
    assert all(p.abs().max() <= 0.5 for p in cl.lines)
    uni = cl.unified()                                                   # (H, d_c * L * C)
    for k in range(2):
        for lv in range(2):
            two_step = resample_line(resample_line(cl.line(lv, k), cl.param_max[k]), cl.max_len)
            cols = slice((k * 2 + lv) * 3, (k * 2 + lv + 1) * 3)
            torch.testing.assert_close(uni[:, cols], two_step, rtol=0, atol=1e-6)
    split = cl.split(uni)                                                # (d_c, H, L * C)
    assert split.shape == (2, 5, 6) and torch.equal(split[1, :, 3:], uni[:, 9:])
    c = torch.rand(4, 2)
    raw = cl(c)                                                          # the raw lines directly, same order
    torch.testing.assert_close(raw[:, 3:6], lerp_lines(cl.line(1, 0)[None], c[:, :1])[:, 0])


# ---------------------------------------------------------------------------------------------- grids
def test_per_axis_and_uniform_parameter():
    assert per_axis(3, 2, "model.k") == [3, 3]
    assert per_axis([1, 2], 2, "model.k") == [1, 2]
    with pytest.raises(ConfigError, match=r"model\.grid_size.*3 entries"):
        per_axis([1, 2, 3], 2, "model.grid_size")
    torch.manual_seed(3)
    p = uniform_parameter((4, 5), 0.2, 0.3)
    torch.manual_seed(3)
    want = nn.init.uniform_(torch.empty(4, 5), 0.2, 0.3)
    assert isinstance(p, nn.Parameter) and torch.equal(p.data, want)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5)])
def test_upsample_grid_equals_sampling_at_the_target_vertices(shape):
    torch.manual_seed(0)
    g = torch.randn(2, *shape)
    target = tuple(n + 3 for n in shape)
    up = upsample_grid(g, target)
    assert up.shape == (2, *target)
    want = sample_grid(g, grid_coords(target)[None])[0].t().reshape(2, *target)
    torch.testing.assert_close(up, want, rtol=0, atol=1e-5)
    assert upsample_grid(g, shape) is g


def test_dense_grids_shapes_init_and_channel_order():
    torch.manual_seed(0)
    dg = DenseGrids([(3, 4), (5, 2)], channels=2, init_range=0.01)
    assert dg.num_levels == 2 and dg.out_dim == 4 and dg.max_shape == (5, 4)
    assert all(g.abs().max() <= 0.01 for g in dg.grids) and dg.grids[1].shape == (2, 5, 2)
    lat = dg.lattice((6, 6))
    assert lat.shape == (4, 6, 6)
    assert torch.equal(lat[2:], upsample_grid(dg.grids[1], (6, 6)))   # channel l * C + j = channel j of grid l
    x = torch.rand(2, 7, 2) * 2 - 1
    assert torch.equal(dg(x)[..., :2], sample_grid(dg.grids[0], x))
    with pytest.raises(ValueError, match="2 vertices"):
        DenseGrids([(1, 4)], 2)


def test_planes_product_and_sum():
    torch.manual_seed(0)
    p0, p1 = torch.randn(3, 4, 5), torch.randn(3, 6, 4)
    planes = Planes([p0, p1], [[0, 1], [1, 2]], padding_mode="border")
    assert [n for n, _ in planes.named_parameters()] == ["0", "1"]  # state-dict keys of the baselines
    x = torch.rand(1, 9, 3) * 2 - 1
    a = sample_grid(p0, x[..., [0, 1]], padding_mode="border")
    b = sample_grid(p1, x[..., [1, 2]], padding_mode="border")
    assert torch.equal(planes.product(x), a * b)
    start = torch.rand(1, 9, 3)
    assert torch.equal(planes.product(x, start=start), start * a * b)
    torch.testing.assert_close(planes.sum(x), a + b)


# ------------------------------------------------------------------------------------------ encodings
def test_positional_encoding_layouts_by_hand():
    u = torch.tensor([[0.25, -0.5]])
    s, c = math.sin, math.cos
    pi = math.pi
    ch = positional_encoding(u, 2)                # per channel: sin(pi u), sin(2 pi u), cos(pi u), cos(2 pi u)
    want_ch = [s(pi / 4), s(pi / 2), c(pi / 4), c(pi / 2), s(-pi / 2), s(-pi), c(-pi / 2), c(-pi)]
    torch.testing.assert_close(ch[0], torch.tensor(want_ch), rtol=0, atol=1e-6)
    fr = positional_encoding(u, 2, include_input=True, layout="frequency")  # [u, (k, channel, sin/cos)]
    want_fr = [0.25, -0.5, s(pi / 4), c(pi / 4), s(-pi / 2), c(-pi / 2), s(pi / 2), c(pi / 2), s(-pi), c(-pi)]
    torch.testing.assert_close(fr[0], torch.tensor(want_fr), rtol=0, atol=1e-6)
    inc = positional_encoding(u[:, :1], 1, scale=2.0, include_input=True)
    torch.testing.assert_close(inc[0], torch.tensor([0.25, 1.0, 0.0]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="layout"):
        positional_encoding(u, 2, layout="nope")


def test_feature_upsampling_pe_module():
    pe = FeatureUpsamplingPE(3, 4, scale=0.5, include_input=True)
    assert pe.out_dim == 3 * 9
    u = torch.randn(5, 3)
    assert torch.equal(pe(u), positional_encoding(u, 4, 0.5, True))
    assert torch.equal(pe.coefficients(), frequencies(4, 0.5))
    torch.testing.assert_close(pe.coefficients(), 0.5 * math.pi * torch.tensor([1.0, 2, 4, 8]))
    with pytest.raises(ValueError, match="num_freqs"):
        FeatureUpsamplingPE(3, 0)


def test_hash_grid_dense_and_hashed_levels_by_hand():
    torch.manual_seed(0)
    hg = HashGrid(dims=2, levels=2, features=1, log2_table_size=8, base_resolution=2, per_level_scale=16.0,
                  init_range=1.0)
    assert hg.scales == [1.0, 31.0] and hg.resolutions == [2, 32]
    assert hg.dense == [True, False] and hg.sizes == [4, 256] and hg.out_dim == 2
    assert all(t.abs().max() <= 1.0 for t in hg.tables)
    x = torch.tensor([[0.3, 0.6]])
    out = hg(x)[0]
    t0, t1 = hg.tables[0][:, 0], hg.tables[1][:, 0]
    # level 0 (dense, res 2): p = x + 0.5 = (0.8, 1.1): corners (0,1) (1,1) (0,2) (1,2) -> c0 + 2 c1 mod 4
    want0 = 0.2 * 0.9 * t0[2] + 0.8 * 0.9 * t0[3] + 0.2 * 0.1 * t0[0] + 0.8 * 0.1 * t0[1]
    # level 1 (hashed): p = 31 x + 0.5 = (9.8, 19.1); index (c0 * 1 XOR c1 * 2654435761) mod 2^32 mod 256
    idx = lambda c0, c1: ((c0 * 1) ^ (c1 * 2654435761)) % 2 ** 32 % 256
    want1 = (0.2 * 0.9 * t1[idx(9, 19)] + 0.8 * 0.9 * t1[idx(10, 19)] + 0.2 * 0.1 * t1[idx(9, 20)]
             + 0.8 * 0.1 * t1[idx(10, 20)])
    torch.testing.assert_close(out, torch.stack([want0, want1]), rtol=0, atol=1e-5)
    out.sum().backward()
    assert hg.tables[1].grad[idx(10, 19), 0] == pytest.approx(0.72, abs=1e-5)
    with pytest.raises(ValueError, match="columns"):
        hg(torch.rand(3, 3))


# ------------------------------------------------------------------------------------------- refiners
def test_rms_norm_and_glu_block_formula():
    torch.manual_seed(0)
    blk = GLUBlock(4, hidden_mult=1.5)
    assert blk.hidden == 6 and blk.w1.bias is None and blk.w2.bias is None and blk.w3.bias is None
    with torch.no_grad():
        blk.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(7, 4)
    n = u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6) * blk.norm.weight
    torch.testing.assert_close(blk.norm(u), n)
    want = u + (torch.relu(n @ blk.w1.weight.t()) * (n @ blk.w2.weight.t())) @ blk.w3.weight.t()
    torch.testing.assert_close(blk(u), want)
    ref = GLURefiner(4, num_layers=2, hidden_mult=2.0)
    assert ref.out_dim == 4 and ref.blocks[0].hidden == 8
    torch.testing.assert_close(ref(u), ref.blocks[1](ref.blocks[0](u)))
    assert sum(p.numel() for p in ref.parameters()) == 2 * (3 * 4 * 8 + 4)
    rms = RMSNorm(3)
    assert torch.equal(rms.weight, torch.ones(3))
    with pytest.raises(ValueError, match="num_layers"):
        GLURefiner(4, 0)
    with pytest.raises(ValueError, match="hidden units"):
        GLUBlock(1, 0.5)


# ------------------------------------------------------------------------------------------------ MLPs
def test_mlp_layout_and_inits():
    torch.manual_seed(0)
    m = MLP([5, 8, 8, 2], dropout=0.1)
    assert [type(l).__name__ for l in m] == ["Linear", "ReLU", "Linear", "ReLU", "Dropout", "Linear"]
    assert [l.weight.shape for l in m.linears] == [(8, 5), (8, 8), (2, 8)] and m.out_dim == 2
    free = MLP([5, 16, 3], bias=False, init="xavier_uniform")
    assert all(l.bias is None for l in free.linears)
    bound = math.sqrt(6.0 / (5 + 16))
    assert free.linears[0].weight.abs().max() <= bound
    xn = MLP([64, 64, 64], init="xavier_normal", bias_std=1e-3)
    assert xn.linears[0].bias.abs().max() < 1e-2 and xn.linears[0].bias.std() > 1e-4
    assert 0.7 < xn.linears[0].weight.std() / math.sqrt(2.0 / 128) < 1.3
    assert len(MLP([3, 1])) == 1
    with pytest.raises(ValueError, match="init"):
        init_linears(m, "bad")
    # the draws: building the layers, then the re-init in module order (weight, then bias)
    torch.manual_seed(1)
    a = MLP([3, 4, 1], init="xavier_normal")
    torch.manual_seed(1)
    lin = [nn.Linear(3, 4), nn.Linear(4, 1)]
    for l in lin:
        nn.init.xavier_normal_(l.weight)
        nn.init.normal_(l.bias, 0.0, 1e-3)
    assert all(torch.equal(x.weight, y.weight) and torch.equal(x.bias, y.bias) for x, y in zip(a.linears, lin))


def test_mlp_decoder_and_output_helpers():
    dec = MLPDecoder(6, 10, num_layers=3, out_dim=2)
    assert [l.weight.shape for l in dec.linears] == [(10, 6), (10, 10), (2, 10)]
    assert [k for k, _ in dec.named_parameters()][0] == "net.0.weight"
    a = torch.tensor([-2.0, 0.5, 3.0])
    assert torch.equal(output_activation(a, "sigmoid"), torch.sigmoid(a))
    assert torch.equal(output_activation(a, "clamp"), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(output_activation(a, "none"), a)
    lin = nn.Linear(3, 1)
    init_output_bias(lin, 0.2, sigmoid=True)
    assert torch.sigmoid(lin.bias).item() == pytest.approx(0.2, rel=1e-6)
    init_output_bias(lin, 0.2, sigmoid=False)
    assert lin.bias.item() == pytest.approx(0.2)
    assert check_init_output_mean("auto") == "auto" and check_init_output_mean(None) is None
    with pytest.raises(ConfigError, match="init_output_mean"):
        check_init_output_mean(float("nan"))


def test_siren_inits_and_forward():
    torch.manual_seed(0)
    w0 = 30.0
    ranges = {"siren": (1.0 / 16, math.sqrt(6.0 / 64) / w0), "reference": (math.sqrt(6.0 / 16) / w0,
                                                                            math.sqrt(6.0 / 64) / w0)}
    for init, (first, rest) in ranges.items():
        m = SirenMLP(16, 64, hidden_layers=2, out_dim=3, omega_0=w0, init=init)
        assert len(m.weights) == 4 and all(torch.equal(b, torch.zeros_like(b)) for b in m.biases)
        assert 0.9 * first < m.weights[0].abs().max() <= first
        for w in m.weights[1:]:                                    # hidden and output matrices alike
            assert 0.9 * rest < w.abs().max() <= rest
    d = SirenMLP(16, 64, 1, 3, init="xavier", bias_init="default")
    assert d.weights[0].abs().max() <= math.sqrt(6.0 / (16 + 64))
    assert 0 < d.biases[0].abs().max() <= 1.0 / 4
    h = torch.randn(5, 16)
    want = h
    for i, (w, b) in enumerate(zip(d.weights, d.biases)):
        want = F.linear(want, w, b)
        if i < len(d.weights) - 1:
            want = torch.sin(w0 * want)
    torch.testing.assert_close(d(h), want)
    with pytest.raises(ValueError, match="init"):
        SirenMLP(2, 4, 1, 1, init="bad")


# ------------------------------------------------------------------------------ flat input and lattice
class _FlatSum(FlatInputModel):
    def forward_flat(self, u):
        return torch.stack([u.sum(-1), u[:, 0]], dim=-1)


def test_flat_input_model():
    x, c = torch.rand(2, 3, 2), torch.rand(2, 4)
    u = flat_input(x, c)
    assert u.shape == (6, 6) and torch.equal(u[4], torch.cat([x[1, 1], c[1]]))
    m = _FlatSum()
    assert isinstance(m, FieldModel)
    y = m(x, c)
    assert y.shape == (2, 3, 2) and torch.equal(y[1, 1], m.forward_flat(u)[4])


class _Lattice(RefinedLatticeMixin, FieldModel):
    def __init__(self, ssr_shape=None, refiner_layers=1):
        super().__init__()
        self.refine_at_inference = True
        self._build_lattice([(3, 4), (5, 5)], 2, 0.5, ssr_shape, 2, 1.0, False, True, refiner_layers, 2.0)
        self._set_fast_options(True, "auto", 0.75, "auto")


def test_refined_lattice_mixin_paths_agree():
    torch.manual_seed(0)
    m = _Lattice()
    assert m.ssr_shape == (5, 5) and m.spatial_feature_dim == 2 * 2 * 4
    lat = m.spatial_lattice()
    u = torch.cat([upsample_grid(g, (5, 5)) for g in m.spatial_grids.grids]).flatten(1).t()
    pe = m.pe(u)
    torch.testing.assert_close(lat, (pe + m.spatial_refiner(pe)).t().reshape(-1, 5, 5))
    with torch.no_grad():
        torch.testing.assert_close(m.spatial_lattice(chunk_size=7), lat, rtol=0, atol=1e-5)
    w = torch.randn(6, m.spatial_feature_dim)
    x = torch.rand(40, 2) * 2 - 1
    want = F.linear(sample_grid(lat, x[None])[0], w)
    for mode in ("always", "never"):
        m.sparse_refine = mode
        z, _ = m._folded_features(x, w)
        torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-5)
    m.eval()
    m._bake_lattice(True, 8, w)
    assert m._baked_fused.shape == (25, 6)
    torch.testing.assert_close(m._baked_features(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="ssr_resolution"):
        _Lattice(ssr_shape=(1, 5))


def test_every_registered_field_model_is_a_field_model():
    import models  # noqa: F401  (registers them)
    from models.drrnet import DRRNet
    from models.explorable_inr import ExplorableINR
    from models.fainr import FAINR
    from models.kplanes import KPlanes

    for cls in (DRRNet, KPlanes, ExplorableINR, FAINR):
        assert issubclass(cls, FieldModel)
    m = KPlanes(cond_dim=1, spatial_dims=2, spatial_resolution=3, cond_resolution=3, feature_dim=2,
                multiscale=[1], decoder_width=4, decoder_layers=1)
    m.bake()
    assert m.is_baked and not m.training and m.param_groups() == {} and m.fast_paths is False
    m.train()
    assert not m.is_baked
