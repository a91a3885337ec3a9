"""DRR-Net (models/drrnet.py) and its blocks (models/components/): stage shapes, hand-computed PE / line /
SSR values, baking, ablation variants, paper parameter counts and a small overfit run."""
import math

import pytest
import torch

from models.drrnet import PAPER_CONFIGS, PAPER_PARAM_COUNTS, VARIANTS, DRRNet, build_paper_model
from models.components.encodings import positional_encoding
from models.components.grids import ConditionLines, lerp_lines, resample_line, upsample_grid
from models.components.mlp import MLPDecoder
from models.components.refiners import GLUBlock, GLURefiner, RMSNorm
from util.registry import ConfigError, build
from util.sampling import grid_coords

# A tiny model: 2 grids (4, 6), d_fs 2, K 2 -> D_sp 16; cond lines (2, 3, 5) -> nested knots, d_fc 2.
TINY = dict(spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2, spatial_refiner_layers=2,
            spatial_hidden_mult=1.5, cond_resolutions=[2, 3, 5], cond_channels=2, cond_refiner_layers=1,
            cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)


def tiny(cond_dim=3, spatial_dims=3, **kw):
    torch.manual_seed(0)
    return DRRNet(cond_dim=cond_dim, spatial_dims=spatial_dims, **{**TINY, **kw})


def inputs(model, B=3, N=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, N, model.spatial_dims, generator=g) * 2 - 1
    c = torch.rand(B, model.cond_dim, generator=g)
    return x, c


def scramble(model, a=1.0, seed=2):
    """Non-trivial embeddings: grids and lines U(-a, a) (the default 1e-3 init makes every path look alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.spatial_grids.parameters()) + list(model.cond_lines.parameters()):
            p.copy_(torch.rand(p.shape, generator=g) * 2 * a - a)
    return model


# ---------------------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------------------
def test_rmsnorm_and_glu_block():
    n = RMSNorm(4)
    u = torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    # rms of row 0 is 1, of row 1 is 1 -> unchanged / [2, 0, 0, 0] / 1
    assert torch.allclose(n(u), u / torch.tensor([[1.0], [1.0]]), atol=1e-5)
    blk = GLUBlock(10, hidden_mult=2.67)
    assert blk.hidden == 26 and blk.w1.weight.shape == (26, 10) and blk.w3.weight.shape == (10, 26)
    assert all(m.bias is None for m in (blk.w1, blk.w2, blk.w3))
    with torch.no_grad():
        blk.w3.weight.zero_()
    x = torch.randn(5, 7, 10)
    assert torch.equal(blk(x), x)  # W3 = 0: the block is the identity
    ref = GLURefiner(10, num_layers=3, hidden_mult=2.0)
    assert ref(x).shape == x.shape and len(ref.blocks) == 3
    # ReLU gate: u + W3(relu(W1 n) * W2 n), checked against a direct computation
    blk = GLUBlock(6, 2.0)
    x = torch.randn(4, 6)
    nx = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = x + torch.relu(nx @ blk.w1.weight.T) * (nx @ blk.w2.weight.T) @ blk.w3.weight.T
    assert torch.allclose(blk(x), want, atol=1e-5)


def test_mlp_decoder_layers():
    dec = MLPDecoder(5, 8, 3, 1)
    lin = [m for m in dec.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(5, 8), (8, 8), (8, 1)]
    assert isinstance(dec.net[-1], torch.nn.Linear)  # no activation after the last layer
    assert [(m.in_features, m.out_features) for m in MLPDecoder(5, 8, 1).net] == [(5, 1)]


def test_positional_encoding_hand_values():
    u = torch.tensor([[0.25, -0.5]])
    pe = positional_encoding(u, 2)
    s2 = math.sqrt(0.5)
    # channel 0 (0.25): sin(pi/4), sin(pi/2), cos(pi/4), cos(pi/2); channel 1 (-0.5): sin(-pi/2), sin(-pi), cos..
    want = torch.tensor([[s2, 1.0, s2, 0.0, -1.0, 0.0, 0.0, -1.0]])
    assert pe.shape == (1, 2 * 2 * 2)
    assert torch.allclose(pe, want, atol=1e-6)
    # scale multiplies the argument; include_input puts the raw value first per channel
    pe2 = positional_encoding(torch.tensor([[0.25]]), 1, scale=2.0, include_input=True)
    assert torch.allclose(pe2, torch.tensor([[0.25, 1.0, 0.0]]), atol=1e-6)


def test_lerp_lines_hand_values():
    lines = torch.tensor([[[0.0], [10.0], [40.0]],     # parameter 0: 3 vertices at t = 0, .5, 1
                          [[1.0], [3.0], [5.0]]])      # parameter 1
    t = torch.tensor([[0.75, 0.0], [1.0, 0.25], [0.0, 1.0]])
    out = lerp_lines(lines, t)[..., 0]                 # (3, 2)
    want = torch.tensor([[25.0, 1.0], [40.0, 2.0], [0.0, 5.0]])
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.allclose(lerp_lines(lines, torch.tensor([[1.5, -1.0]]))[..., 0], torch.tensor([[40.0, 1.0]]))
    # resampling a 2-vertex line [0, 3] to 4 vertices: 0, 1, 2, 3
    assert torch.allclose(resample_line(torch.tensor([[0.0], [3.0]]), 4)[:, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_condition_lines_local_then_global():
    torch.manual_seed(0)
    cl = ConditionLines([[2, 3], [3, 5], [5, 5]], channels=2)   # L_c = 3 levels, d_c = 2 parameters
    assert cl.param_max == [5, 5] and cl.max_len == 5 and cl.out_dim == 2 * 3 * 2
    u = cl.unified()
    assert u.shape == (5, 12)
    # channel (k, l, j) = (k * L + l) * C + j is line (l, k) resampled to H
    for k in range(2):
        for level in range(3):
            want = resample_line(cl.line(level, k), 5)
            got = u[:, (k * 3 + level) * 2:(k * 3 + level + 1) * 2]
            assert torch.allclose(got, want, atol=1e-6)
    split = cl.split(u)
    assert split.shape == (2, 5, 6)
    # nested knots (1, 2, 4 intervals): interpolating the unified lines = interpolating the raw lines
    c = torch.rand(7, 2)
    assert torch.allclose(ConditionLines.sample_split(split, c), cl(c), atol=1e-6)


def test_unified_equals_two_stage_resampling():
    """unified() (one fixed matrix) = per parameter: resample each level to H_k, concatenate, resample to H;
    values and gradients, with lengths where the two stages do not commute (H_0 = 3, H = 7)."""
    torch.manual_seed(1)
    cl = ConditionLines([[2, 4, 7], [3, 3, 5]], channels=3)     # d_c = 3, L = 2
    for p in cl.parameters():
        p.data.uniform_(-1, 1)
    H = cl.max_len

    def two_stage():
        per = []
        for k in range(cl.cond_dim):
            local = torch.cat([resample_line(cl.line(lv, k), cl.param_max[k]) for lv in range(cl.num_levels)], -1)
            per.append(resample_line(local, H))
        return torch.cat(per, -1)

    go = torch.randn(H, cl.out_dim)
    want = two_stage()
    g_want = torch.autograd.grad(want, list(cl.parameters()), go)
    got = cl.unified()
    g_got = torch.autograd.grad(got, list(cl.parameters()), go)
    assert cl.param_max == [3, 4, 7] and got.shape == (7, 18)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert "_unify" not in cl.state_dict()                       # checkpoints unchanged


def test_ssr_of_a_linear_grid_is_exact():
    # grid values linear in the coordinates (column 0 = last axis) stay linear under SSR
    shape, target = (3, 4, 5), (6, 7, 9)
    xyz = grid_coords(shape)                                     # (60, 3)
    a = torch.tensor([0.5, -2.0, 3.0])
    grid = (xyz @ a + 0.25).reshape(1, *shape)
    up = upsample_grid(grid, target)
    assert up.shape == (1, *target)
    want = (grid_coords(target) @ a + 0.25).reshape(1, *target)
    assert torch.allclose(up, want, atol=1e-5)
    # 2D as well
    g2 = (grid_coords((3, 4)) @ a[:2]).reshape(1, 3, 4)
    assert torch.allclose(upsample_grid(g2, (5, 8)), (grid_coords((5, 8)) @ a[:2]).reshape(1, 5, 8), atol=1e-5)


def test_per_axis_resolutions_are_array_order():
    # [3, 4, 5] is (D, H, W): 5 vertices along x column 0. With values = x column 0, z_sp(x) = x[..., 0].
    m = DRRNet(cond_dim=1, spatial_dims=3, spatial_resolutions=[[3, 4, 5]], spatial_channels=1,
               ssr_resolution=[5, 6, 7], pe_frequencies=0, spatial_refiner_layers=0, cond_resolutions=[2],
               cond_refiner_layers=0, hidden_dim=4, decoder_layers=1)
    assert m.spatial_grids.grids[0].shape == (1, 3, 4, 5) and m.ssr_shape == (5, 6, 7)
    with torch.no_grad():
        m.spatial_grids.grids[0].copy_(grid_coords((3, 4, 5))[:, 0].reshape(1, 3, 4, 5))
    x = torch.rand(2, 11, 3) * 2 - 1
    assert torch.allclose(m.spatial_features(x)[..., 0], x[..., 0], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_stage_dims_and_forward(spatial_dims):
    m = tiny(spatial_dims=spatial_dims)
    L, d_fs, K = 2, 2, 2
    assert m.spatial_feature_dim == L * d_fs * 2 * K == 16
    assert m.cond_feature_dim == 3 * 3 * 2                       # d_c * L_c * d_fc
    assert [tuple(g.shape) for g in m.spatial_grids.grids] == [(2,) + (4,) * spatial_dims, (2,) + (6,) * spatial_dims]
    assert m.ssr_shape == (6,) * spatial_dims
    lat = m.spatial_lattice()
    assert lat.shape == (16,) + (6,) * spatial_dims              # refiner keeps the width
    assert m.spatial_refiner.blocks[0].hidden == 24 and m.cond_refiner.blocks[0].hidden == 36
    assert m.cond_line_set().shape == (3, 5, 3 * 2)
    assert m.fusion[0].in_features == 16 + 18 and m.fusion[0].out_features == 16
    x, c = inputs(m)
    assert m.spatial_features(x).shape == (3, 17, 16) and m.cond_features(c).shape == (3, 18)
    y = m(x, c)
    assert y.shape == (3, 17, 1) and torch.isfinite(y).all() and ((y > 0) & (y < 1)).all()
    with pytest.raises(ValueError):
        m(x[..., :1], c)


@pytest.mark.parametrize("variant", [None] + sorted(VARIANTS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_every_parameter_gets_a_gradient(variant, spatial_dims):
    m = scramble(tiny(spatial_dims=spatial_dims, variant=variant), a=0.5)
    x, c = inputs(m)
    m.train()
    loss = (m(x, c) - 0.3).pow(2).mean()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_variants_have_the_expected_parameters():
    dims = {}
    for v in VARIANTS:
        m = tiny(variant=v)
        groups = {k: len(ps) for k, ps in m.param_groups().items()}
        dims[v] = (m.spatial_feature_dim, groups["spatial_refiner"] > 0, groups["cond_refiner"] > 0, m.use_pi)
        assert sum(groups.values()) == len(list(m.parameters()))  # the groups cover every parameter once
        x, c = inputs(m)
        m.eval()
        y = m(x, c)
        m.bake()
        assert torch.allclose(m(x, c), y, atol=1e-6)
    assert dims["full"] == (16, True, True, True)
    assert dims["embedding_only"] == (4, False, False, False)       # raw concat: L * d_fs
    assert dims["pi_only"] == (16, False, False, True)
    assert dims["refiner_no_pi"] == (4, True, True, False)
    assert dims["spatial_refiner_only"] == (16, True, False, True)
    m = tiny(variant="embedding_only")
    assert m.spatial_refiner is None and m.cond_refiner is None and m.pe is None
    assert not any("refiner" in n for n, _ in m.named_parameters())
    assert tiny(pe_frequencies=0).spatial_feature_dim == 4          # SSR concat without feature upsampling
    assert tiny(pe_include_input=True).spatial_feature_dim == 4 * 5
    with pytest.raises(ConfigError, match="variant"):
        tiny(variant="nope")


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("refine_at_inference", [True, False])
def test_bake_equals_the_training_path(spatial_dims, refine_at_inference):
    m = scramble(tiny(spatial_dims=spatial_dims, refine_at_inference=refine_at_inference,
                      ssr_resolution=7, cond_resolutions=[2, 4, [3, 5, 6]]))
    x, c = inputs(m, B=4, N=50)
    m.eval()
    assert not m.is_baked
    with torch.no_grad():
        y = m(x, c)
        m.bake(chunk_size=50)                                       # 343 vertices in 7 chunks
        assert m.is_baked and not m.training
        yb = m(x, c)
    assert torch.allclose(y, yb, atol=1e-5)
    assert y.std() > 1e-3                                           # not a trivially constant output


def test_refine_at_inference_false_uses_pi_only():
    full = scramble(tiny(refine_at_inference=False))
    plain = tiny(variant="pi_only")  # same grids, lines, fusion, decoder; no refiners
    plain.load_state_dict(full.state_dict(), strict=False)
    x, c = inputs(full)
    full.eval()
    plain.eval()
    assert torch.allclose(full(x, c), plain(x, c), atol=1e-5)      # nested cond knots: unified == raw lines
    full.train()
    assert not torch.allclose(full(x, c), plain(x, c), atol=1e-4)  # training uses the refiners


def test_train_and_load_state_dict_unbake():
    m = scramble(tiny())
    x, c = inputs(m)
    m.bake()
    assert m.is_baked and m._baked_grid is not None and m._baked_lines is not None
    assert not any("baked" in k for k in m.state_dict())             # the cache is never saved
    m.train()
    assert not m.is_baked and m._baked_grid is None
    m.bake()
    m.eval()                                                         # eval keeps the cache
    assert m.is_baked
    # loading weights drops the cache, also when the model sits inside another module
    other = scramble(tiny(), seed=5)
    m.load_state_dict(other.state_dict())
    assert not m.is_baked
    m.bake()
    wrapper = torch.nn.ModuleDict({"net": m})
    wrapper.load_state_dict({"net." + k: v for k, v in other.state_dict().items()})
    assert not m.is_baked
    m.bake()
    other.eval()
    assert torch.allclose(m(x, c), other(x, c), atol=1e-6)           # fresh cache from the loaded weights
    wrapper.train()                                                  # train() of a parent reaches the model
    assert not m.is_baked


def test_baked_forward_runs_no_refiner_and_no_pi(monkeypatch):
    m = scramble(tiny())
    x, c = inputs(m)
    m.bake()
    y = m(x, c)

    def boom(*a, **k):
        raise AssertionError("called after bake")

    for mod in (m.spatial_refiner, m.cond_refiner, m.pe):
        monkeypatch.setattr(mod, "forward", boom)
    monkeypatch.setattr(m.spatial_grids, "lattice", boom)
    monkeypatch.setattr(m.cond_lines, "unified", boom)
    assert torch.equal(m(x, c), y)
    m.train()
    with pytest.raises(AssertionError, match="after bake"):
        m(x, c)


def test_out_activations_and_registry():
    m = build("model", "drrnet", section="model", injected=dict(cond_dim=2, spatial_dims=2),
              **{**TINY, "out_activation": "none"})
    assert isinstance(m, DRRNet) and m.spatial_dims == 2
    x, c = inputs(m)
    raw = m(x, c)
    m.out_activation = "sigmoid"
    assert torch.allclose(m(x, c), torch.sigmoid(raw))
    m.out_activation = "clamp"
    assert torch.equal(m(x, c), raw.clamp(0, 1))
    with pytest.raises(ConfigError, match="cond_dim"):
        build("model", "drrnet", section="model", **TINY)           # cond_dim has no default
    with pytest.raises(ConfigError, match="spatial_resolutions"):
        DRRNet(cond_dim=1, spatial_dims=3, spatial_resolutions=[[4, 4]])
    with pytest.raises(ConfigError, match="cond_resolutions"):
        DRRNet(cond_dim=3, cond_resolutions=[[2, 4]])


def test_init_output_mean():
    m = tiny(init_output_mean=0.13)
    assert abs(m.decoder.net[-1].bias.item() - math.log(0.13 / 0.87)) < 1e-6
    x, c = inputs(m)
    assert abs(m(x, c).mean().item() - 0.13) < 0.05                 # training starts near the data mean
    m = tiny(out_activation="none", init_output_mean=0.3)
    assert m.decoder.net[-1].bias.item() == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------------------
# paper configurations
# ---------------------------------------------------------------------------------------------------------
def hand_count(cfg):
    """Parameters from the spec's formulas (table 2.4, appendix B.1)."""
    def shape_size(r):
        return r ** 3 if isinstance(r, int) else math.prod(r)

    def refiner(D, layers, mult):
        return layers * (3 * D * math.floor(D * mult) + D)

    d_c, L = cfg["cond_dim"], len(cfg["spatial_resolutions"])
    D_sp = L * cfg["spatial_channels"] * 2 * cfg["pe_frequencies"]
    D_c = d_c * len(cfg["cond_resolutions"]) * cfg["cond_channels"]
    h, nd = cfg["hidden_dim"], cfg["decoder_layers"]
    return (cfg["spatial_channels"] * sum(shape_size(r) for r in cfg["spatial_resolutions"])
            + refiner(D_sp, cfg["spatial_refiner_layers"], cfg["spatial_hidden_mult"])
            + d_c * cfg["cond_channels"] * sum(cfg["cond_resolutions"])
            + refiner(D_c, cfg["cond_refiner_layers"], cfg["cond_hidden_mult"])
            + (D_sp + D_c) * h + h + (nd - 1) * (h * h + h) + h + 1)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_parameter_counts(name):
    m = build_paper_model(name)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == hand_count(PAPER_CONFIGS[name])
    paper = PAPER_PARAM_COUNTS[name]
    # the paper prints one decimal (M): within 5%, or within the rounding of the printed value
    # (clover: 854,345 = 0.854M, printed "0.9M", 5.07% below 0.9M)
    assert abs(n - paper) <= max(0.05 * paper, 0.05e6), (name, n)
    assert round(n / 1e6, 1) == round(paper / 1e6, 1)
    expected_dsp = {"nyx": 128, "mpas": 160, "clover": 96}[name]
    assert m.spatial_feature_dim == expected_dsp


def test_paper_configs_build_through_the_registry():
    cfg = dict(PAPER_CONFIGS["mpas"])
    cond_dim = cfg.pop("cond_dim")
    m = build("model", "drrnet", section="model", injected=dict(cond_dim=cond_dim, spatial_dims=3), **cfg)
    assert m.spatial_grids.grids[0].shape == (4, 64, 64, 24) and m.ssr_shape == (160, 160, 60)


# ---------------------------------------------------------------------------------------------------------
# it learns
# ---------------------------------------------------------------------------------------------------------
def _ensemble(M=4, n=8, d_c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(M, d_c, generator=g)
    x = grid_coords((n, n, n))                                       # (n^3, 3)
    v = torch.stack([0.5 + 0.25 * torch.sin(math.pi * (1 + a) * x[:, 0]) * torch.cos(math.pi * (0.5 + b) * x[:, 1])
                     + 0.15 * x[:, 2] * (a - 0.5) for a, b in c])  # smooth fields in [0.1, 0.9]
    return x, c, v[..., None]


def test_overfit_tiny_ensemble():
    """Full-batch Adam at lr 1e-3 (eps 1e-15 as in the paper), 300 steps, seed 0: asserts > 35 dB and >= 8 dB
    above the per-voxel mean over the members (about 24 dB: the best any condition-blind model reaches on these
    points, so the model uses c). Measured > 41 dB over seeds 0-4.

    lr 1e-4 (the paper's value for long runs) reaches only ~24 dB in 300 steps; 3e-3 and 1e-2 also work on
    this tiny model, whose data mean (~0.5) matches the initial sigmoid output (see DRRNet "Training
    stability" for when a high lr collapses).
    """
    torch.manual_seed(0)
    x, c, v = _ensemble()
    M = c.shape[0]
    m = DRRNet(cond_dim=2, spatial_dims=3, spatial_resolutions=[4, 8], spatial_channels=2, pe_frequencies=4,
               spatial_refiner_layers=2, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
               cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=64, decoder_layers=2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-15)
    xb = x[None].expand(M, -1, -1)
    m.train()
    for _ in range(300):
        loss = (m(xb, c) - v).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.bake()
    with torch.no_grad():
        pred = m(xb, c)
    psnr = -10 * math.log10((pred - v).pow(2).mean().item())
    assert psnr > 35.0, psnr
    blind = -10 * math.log10((v.mean(0, keepdim=True) - v).pow(2).mean().item())
    assert psnr > blind + 8, (psnr, blind)
    assert pred.std() > 0.5 * v.std()                                # not collapsed to a constant
