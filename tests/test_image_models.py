"""Image models (models/image.py, spec vision.md 2): parameter counts from spec table 2.2, hash-grid indexing
against hand computations, PE / SSR / refiner structure, SIREN and grid inits, baked vs plain equivalence, the
image configs and the demo photo dataset."""
import math
import os

import pytest
import torch
import yaml

from util.registry import ConfigError, build

INJ = dict(cond_dim=0, spatial_dims=2, out_dim=3)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(name, **kw):
    return build("model", name, section="model", injected=dict(INJ), **kw)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def groups(m):
    return {k: sum(p.numel() for p in v) for k, v in m.param_groups().items()}


# ------------------------------------------------------------------------------------- parameter counts
# Spec vision.md 2.2 (logical counts): MRGrid grids 4,194,048; Grid 4,194,304; refiners MRGrid Pearl 84,840 /
# Tokyo 127,176 / SR-Tokyo 127,260, Grid 49,216; decoders 27,520 (84-in), 20,864 (32-in), 19,456 (21-in),
# 17,280 (4-in), 18,560 (14-in); SIREN 2,104,323. NGP "~5.19M": the levels' min(res^2, 2^20) entries x 2 features
# with res = 16, 41, 102, 256, 646, 1626, 4096: 2 * (256 + 1681 + 10404 + 65536 + 417316 + 2 * 1048576).
NGP_TABLES = 2 * (256 + 1681 + 10404 + 65536 + 417316 + 2 * 1048576)


@pytest.mark.parametrize("name,kw,want", [
    ("mrgrid_drr", dict(hidden_mult=2.0), {"spatial_grids": 4194048, "spatial_refiner": 84840, "decoder": 27520}),
    ("mrgrid_drr", dict(hidden_mult=3.0), {"spatial_grids": 4194048, "spatial_refiner": 127176, "decoder": 27520}),
    ("mrgrid_drr", dict(refiner_layers=3), {"spatial_grids": 4194048, "spatial_refiner": 127260, "decoder": 27520}),
    ("mrgrid", {}, {"spatial_grids": 4194048, "decoder": 19456}),
    ("grid_drr", {}, {"spatial_grids": 4194304, "spatial_refiner": 49216, "decoder": 20864}),
    ("grid", {}, {"spatial_grids": 4194304, "decoder": 17280}),
    ("ngp", {}, {"hash_grid": NGP_TABLES, "decoder": 18560}),
    ("siren", {}, {"siren": 2104323}),
])
def test_paper_parameter_counts(name, kw, want):
    m = make(name, **kw)                       # defaults = the paper's models (spec 2.2)
    assert groups(m) == want
    assert n_params(m) == sum(want.values())
    assert abs(NGP_TABLES - 5.19e6) < 0.01e6     # the spec's "~5.19M" (5,184,690 logical entries x features)


def test_ngp_paper_levels_follow_the_tcnn_formulas():
    enc = make("ngp").encoding
    assert enc.resolutions == [16, 41, 102, 256, 646, 1626, 4096]            # spec 2.3
    assert enc.dense == [True] * 5 + [False] * 2                             # res^2 <= 2^20 up to 646
    assert abs(enc.per_level_scale - 2.5198) < 1e-4


# ------------------------------------------------------------------------------------- hash-grid indexing
def _set_table(m, level, values):
    with torch.no_grad():
        t = m.encoding.tables[level]
        t.zero_()
        for i, v in values.items():
            t[i, 0] = v


def test_hash_grid_dense_and_hashed_level_by_hand():
    # Two levels, 1 feature, N_min 2, b 2, T = 2^3: level 0 scale 1, res 2 (4 entries, dense); level 1 scale 3,
    # res 4, 16 > 8 entries -> hashed. Query x = (0.5, -0.5) -> unit mapping x' = (0.75, 0.25).
    m = make("ngp", levels=2, features_per_level=1, log2_hashmap_size=3, base_resolution=2, per_level_scale=2.0,
             decoder_hidden_layers=0)
    assert m.encoding.resolutions == [2, 4] and m.encoding.dense == [True, False]
    _set_table(m, 0, {i: 2.0 ** i for i in range(4)})
    _set_table(m, 1, {i: 2.0 ** i for i in range(8)})
    feats = m.features(torch.tensor([[[0.5, -0.5]]]))[0, 0]
    # level 0: p = (0.75 + 0.5, 0.25 + 0.5) = (1.25, 0.75): cell (1, 0), frac (0.25, 0.75); dense index
    # cx + 2 cy mod 4: (1,0)->1 w .1875, (2,0)->2 w .0625, (1,1)->3 w .5625, (2,1)->4%4=0 w .1875
    want0 = 0.1875 * 2 + 0.0625 * 4 + 0.5625 * 8 + 0.1875 * 1
    # level 1: p = (0.75*3 + .5, 0.25*3 + .5) = (2.75, 1.25): cell (2, 1), frac (0.75, 0.25); hash
    # cx XOR cy*2654435761 (uint32) mod 8 = low 3 bits; 2654435761 = 8k + 1, so cy*P has low bits cy:
    # (2,1): 2^1=3 w .1875, (3,1): 3^1=2 w .5625, (2,2): 2^2=0 w .0625, (3,2): 3^2=1 w .1875
    assert 2654435761 % 8 == 1
    want1 = 0.1875 * 8 + 0.5625 * 4 + 0.0625 * 1 + 0.1875 * 2
    assert feats.tolist() == [pytest.approx(want0, abs=1e-6), pytest.approx(want1, abs=1e-6)]


def test_hash_grid_reference_mapping_wraps_negative_positions_dense_level():
    # One dense level: N_min 2 -> scale 1, res 2, 4 entries. input_mapping reference: x fed as is, so
    # x = (-1, 0.25) gives p = (-0.5, 0.75): cell (-1 -> 0xFFFFFFFF, 0), frac (0.5, 0.75).
    m = make("ngp", levels=1, features_per_level=1, log2_hashmap_size=4, base_resolution=2, input_mapping="reference")
    _set_table(m, 0, {0: 1.0, 1: 2.0, 2: 4.0, 3: 8.0})
    # uint32 index cx + 2 cy mod 4: (FFFFFFFF,0) -> 3 w .125; (0,0) -> 0 w .125; (FFFFFFFF,1) -> 2^32+1 -> 1
    # w .375; (0,1) -> 2 w .375
    want = 0.125 * 8 + 0.125 * 1 + 0.375 * 2 + 0.375 * 4
    got = m.features(torch.tensor([[[-1.0, 0.25]]]))[0, 0, 0].item()
    assert got == pytest.approx(want, abs=1e-6)
    # the corrected mapping sends the same point to x' = (0, 0.625): p = (0.5, 1.125): cell (0, 1), frac (.5, .125)
    m.input_mapping = "unit"
    # (0,1) -> 2 w .4375, (1,1) -> 3 w .4375, (0,2) -> 4%4=0 w .0625, (1,2) -> 5%4=1 w .0625
    want_unit = 0.4375 * 4 + 0.4375 * 8 + 0.0625 * 1 + 0.0625 * 2
    assert m.features(torch.tensor([[[-1.0, 0.25]]]))[0, 0, 0].item() == pytest.approx(want_unit, abs=1e-6)


def test_hash_grid_hashed_level_full_32_bit_hash():
    # One hashed level: N_min 2000 -> scale 1999, res 2000, 2000^2 > T = 2^20. Reference mapping, x0 = -1/1999,
    # x1 = 0.25/1999: p = (-0.5, 0.75): cell (0xFFFFFFFF, 0), frac (0.5, 0.75).
    # 2654435761 = 0x9E3779B1; 0xFFFFFFFF ^ 0x9E3779B1 = 0x61C8864E; indices are the low 20 bits:
    # (FFFFFFFF,0) -> 0xFFFFF = 1048575 w .125; (0,0) -> 0 w .125; (FFFFFFFF,1) -> 0x8864E = 558670 w .375;
    # (0,1) -> 0x779B1 = 489905 w .375
    assert 2654435761 == 0x9E3779B1 and 0xFFFFFFFF ^ 0x9E3779B1 == 0x61C8864E
    m = make("ngp", levels=1, features_per_level=1, log2_hashmap_size=20, base_resolution=2000,
             input_mapping="reference")
    assert m.encoding.dense == [False]
    _set_table(m, 0, {1048575: 1.0, 0: 2.0, 558670: 4.0, 489905: 8.0})
    x = torch.tensor([[[-1.0 / 1999, 0.75 / 1999 - 0.5 / 1999]]])
    got = m.features(x)[0, 0, 0].item()
    assert got == pytest.approx(0.125 * 1 + 0.125 * 2 + 0.375 * 4 + 0.375 * 8, abs=1e-4)


# ------------------------------------------------------------------------------------- inits
def test_grid_hash_and_decoder_inits():
    torch.manual_seed(0)
    m = make("mrgrid", resolutions=[64, 128])
    g = torch.cat([p.flatten() for p in m.spatial_grids.parameters()])
    assert g.abs().max() <= 1e-3 and g.abs().max() > 0.99e-3              # U(-1e-3, 1e-3) (spec 2.1)
    lins = [l for l in m.decoder if isinstance(l, torch.nn.Linear)]
    assert [tuple(l.weight.shape) for l in lins] == [(128, 6), (128, 128), (3, 128)]
    assert all(l.bias is None for l in lins)                                   # no biases (tcnn)
    for l in lins[1:]:                                                         # Xavier-uniform bound
        bound = math.sqrt(6.0 / sum(l.weight.shape))
        assert l.weight.abs().max() <= bound and l.weight.abs().max() > 0.95 * bound
    t = make("ngp", levels=4, log2_hashmap_size=12).encoding.tables
    t = torch.cat([p.flatten() for p in t])
    assert t.abs().max() <= 1e-4 and t.abs().max() > 0.99e-4                  # U(-1e-4, 1e-4) (spec 2.3)


def test_siren_init_ranges_and_forward():
    torch.manual_seed(0)
    m = make("siren")
    w, b = m.net.weights, m.net.biases
    assert len(w) == 10 and tuple(w[0].shape) == (512, 2) and tuple(w[-1].shape) == (3, 512)
    assert w[0].abs().max() <= 0.5 and w[0].abs().max() > 0.49                 # U(-1/2, 1/2)
    hb = math.sqrt(6 / 512) / 30                                               # 3.6084e-3
    for wi in w[1:]:                                                           # hidden and output layers
        assert wi.abs().max() <= hb and wi.abs().max() > 0.98 * hb
    assert b[0].abs().max() <= 1 / math.sqrt(2) and b[0].abs().max() > 0.65   # PyTorch default U(+-1/sqrt(fan_in))
    for bi in b[1:]:
        assert bi.abs().max() <= 1 / math.sqrt(512)
    assert all(bi.abs().max() > 0.95 / math.sqrt(512) for bi in b[1:-1])     # 512 draws reach the bound
    # forward = sin(30 (W h + b)) per sine layer, a plain linear output
    small = make("siren", width=5, hidden_layers=1)
    x = torch.rand(2, 7, 2) * 2 - 1
    W, B = small.net.weights, small.net.biases
    h = torch.sin(30 * (x @ W[0].T + B[0]))
    h = torch.sin(30 * (h @ W[1].T + B[1]))
    torch.testing.assert_close(small(x, torch.zeros(2, 0)), h @ W[2].T + B[2], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- DRR structure
def test_ssr_and_pe_at_a_lattice_vertex_by_hand():
    # one 2x2 grid (1 channel) super-resolved to 3x3, g = 2, no refiner: vertex (row 0, col 1) = (a + b) / 2,
    # center = (a + b + c + d) / 4; PE = [sin(pi u), sin(2 pi u), cos(pi u), cos(2 pi u)] (spec 2.1 step 2)
    m = make("grid_drr", resolution=2, channels=1, ssr_resolution=3, pe_frequencies=2, refiner_layers=0)
    a, b, c, d = 0.1, 0.3, -0.2, 0.6
    with torch.no_grad():
        m.spatial_grids.grids[0].copy_(torch.tensor([[[a, b], [c, d]]]))

    def pe(u):
        return torch.tensor([math.sin(math.pi * u), math.sin(2 * math.pi * u), math.cos(math.pi * u),
                             math.cos(2 * math.pi * u)])

    lat = m.spatial_lattice(refine=False)
    assert tuple(lat.shape) == (4, 3, 3)
    torch.testing.assert_close(lat[:, 0, 1], pe((a + b) / 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(lat[:, 1, 1], pe((a + b + c + d) / 4), rtol=0, atol=1e-6)
    # the model at x = (0, -1) (column 1, row 0): the decoder of that feature, on every path
    x = torch.tensor([[[0.0, -1.0]]])
    want = m.decoder(pe((a + b) / 2)[None])[0]
    for fast in (False, True):
        m.fast_paths = fast
        m.train()
        torch.testing.assert_close(m(x, torch.zeros(1, 0))[0, 0], want, rtol=0, atol=1e-5)
        m.bake()
        torch.testing.assert_close(m(x, torch.zeros(1, 0))[0, 0], want, rtol=0, atol=1e-5)


def test_refiner_has_the_double_identity_path():
    # G' = U + R(U) with residual blocks: with every W3 = 0 each block is the identity, so G' = 2 PE(U)
    torch.manual_seed(0)
    m = make("mrgrid_drr", resolutions=[3, 5], channels=2, ssr_resolution=6, init_range=0.5)
    assert len(m.spatial_refiner.blocks) == 2 and m.spatial_refiner.blocks[0].hidden == 32   # D = 2*2*2*2 = 16, x 2
    with torch.no_grad():
        for blk in m.spatial_refiner.blocks:
            blk.w3.weight.zero_()
    torch.testing.assert_close(m.spatial_lattice(refine=True), 2 * m.spatial_lattice(refine=False))


# ------------------------------------------------------------------------------------- paths agree
def _drr_models():
    torch.manual_seed(0)
    return [make("mrgrid_drr", resolutions=[4, [6, 9], 12], ssr_resolution=[14, 17], init_range=0.5),
            make("grid_drr", resolution=[7, 10], ssr_resolution=[13, 19], hidden_mult=2.0, init_range=0.5)]


@pytest.mark.parametrize("idx", [0, 1])
def test_drr_fast_training_path_equals_plain_values_and_gradients(idx):
    # Tolerances: outputs are O(1) sums of <= 128 fp32 products; the paths differ only in summation order
    # (gather interpolation vs grid_sample, folding W1 before vs after the interpolation), i.e. a few ulps
    # of the largest terms: 1e-5 absolute on values, 1e-5 relative on gradients.
    m = _drr_models()[idx]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 300, 2, generator=g) * 2.2 - 1.1          # some points outside [-1, 1] (zero padding)
    target = torch.rand(2, 300, 3, generator=g)
    out = {}
    for fast in (False, True):
        m.fast_paths = fast
        m.zero_grad()
        y = m(x, torch.zeros(2, 0))
        (y - target).square().mean().backward()
        out[fast] = (y.detach(), [p.grad.clone() for p in m.parameters()])
    assert m.last_refined_vertices is not None
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    for a, b in zip(out[True][1], out[False][1]):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("idx", [0, 1])
def test_drr_baked_paths_equal_the_unbaked_plain_path(idx):
    m = _drr_models()[idx]
    x = torch.rand(1, 500, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1
    c = torch.zeros(1, 0)
    m.eval()
    m.fast_paths = False
    with torch.no_grad():
        want = m(x, c)                                               # refines the whole lattice, grid_sample
        m.fast_paths = True
        for fold, chunk in ((True, None), (True, 37), (False, None)):
            m.bake(chunk_size=chunk, fold=fold)
            assert m.is_baked and (m._baked_fused is not None) == fold
            if fold:
                assert tuple(m._baked_fused.shape) == (math.prod(m.ssr_shape), 128)
                assert m._baked_grid is None                         # the folded table only
            torch.testing.assert_close(m(x, c), want, rtol=0, atol=1e-5)
    m.train()
    assert not m.is_baked and m._baked_fused is None
    m.bake()
    m.load_state_dict(m.state_dict())
    assert not m.is_baked and m._baked_fused is None


def test_refine_at_inference_false_skips_the_refiner_when_baked():
    m = _drr_models()[0]
    m.refine_at_inference = False
    m.bake()
    x = torch.rand(1, 50, 2) * 2 - 1
    want = m.decoder(torch.nn.functional.grid_sample(
        m.spatial_lattice(refine=False)[None], x[:, :, None, :], align_corners=True)[0, :, :, 0].T[None])
    torch.testing.assert_close(m(x, torch.zeros(1, 0)), want, rtol=0, atol=1e-5)


def test_plain_grid_fast_path_equals_grid_sample():
    torch.manual_seed(0)
    m = make("mrgrid", resolutions=[3, [5, 8]], init_range=0.5)
    x = torch.rand(3, 100, 2) * 2.2 - 1.1
    y_fast = m(x, torch.zeros(3, 0))
    m.fast_paths = False
    torch.testing.assert_close(y_fast, m(x, torch.zeros(3, 0)), rtol=0, atol=1e-6)


def test_drr_model_fits_a_small_image():
    # a smooth 3-channel function on [-1, 1]^2: 150 Adam steps must take the MSE far below the data variance
    torch.manual_seed(0)
    m = make("mrgrid_drr", resolutions=[4, 8], ssr_resolution=12, decoder_width=32)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, eps=1e-15)
    g = torch.Generator().manual_seed(0)

    def f(x):
        return torch.stack([torch.sin(2 * x[..., 0]), torch.cos(3 * x[..., 1]), x[..., 0] * x[..., 1]], -1)

    for _ in range(150):
        x = torch.rand(1, 512, 2, generator=g) * 2 - 1
        opt.zero_grad()
        loss = (m(x, torch.zeros(1, 0)) - f(x)).square().mean()
        loss.backward()
        opt.step()
    x = torch.rand(1, 2000, 2, generator=g) * 2 - 1
    m.bake()
    with torch.no_grad():
        mse = (m(x, torch.zeros(1, 0)) - f(x)).square().mean().item()
    assert mse < 0.02 * f(x).var().item()


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,kw,inj,words", [
    ("grid", {}, dict(cond_dim=2), ["cond_dim", "0", "2"]),
    ("mrgrid", dict(resolutions=[8, 1]), {}, ["resolutions[1]", ">= 2"]),
    ("mrgrid", dict(resolutions=16), {}, ["resolutions", "list"]),
    ("grid", dict(resolution=[8, 8, 8]), {}, ["resolution", "3 axes"]),
    ("mrgrid_drr", dict(ssr_resolution="big"), {}, ["ssr_resolution", "'big'"]),
    ("mrgrid_drr", dict(pe_frequencies=-1), {}, ["pe_frequencies", ">= 0", "-1"]),
    ("grid_drr", dict(hidden_mult=0), {}, ["hidden_mult", "> 0"]),
    ("grid_drr", dict(sparse_refine="sometimes"), {}, ["sparse_refine", "auto", "sometimes"]),
    ("ngp", dict(input_mapping="raw"), {}, ["input_mapping", "unit", "reference", "raw"]),
    ("ngp", dict(log2_hashmap_size=40), {}, ["log2_hashmap_size", "30"]),
    ("siren", dict(init="kaiming"), {}, ["init", "siren", "kaiming"]),
    ("siren", {}, dict(out_dim=0), ["out_dim", ">= 1"]),
])
def test_bad_config_values_are_named(name, kw, inj, words):
    with pytest.raises(ConfigError) as e:
        build("model", name, section="model", injected={**INJ, **inj}, **kw)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_forward_shapes():
    m = make("grid", resolution=4)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 2\)"):
        m(torch.zeros(1, 5, 3), torch.zeros(1, 0))
    with pytest.raises(ValueError, match=r"c must be \(1, 0\)"):
        m(torch.zeros(1, 5, 2), torch.zeros(1, 2))


# ------------------------------------------------------------------------------------- configs
PAPER_IDS = ["mrgrid_drr", "mrgrid", "grid_drr", "grid", "ngp", "siren"]
# spec 2.2 totals: MRGrid+DRR = 4,194,048 + refiner + 27,520; MRGrid 4,194,048 + 19,456; Grid+DRR 4,194,304 +
# 49,216 + 20,864; Grid 4,194,304 + 17,280; NGP tables + 18,560; SIREN 2,104,323
_REST = [4194048 + 19456, 4194304 + 49216 + 20864, 4194304 + 17280, NGP_TABLES + 18560, 2104323]


@pytest.mark.parametrize("path,refiner,downsample", [
    ("configs/image/pearl.yaml", 84840, None), ("configs/image/tokyo.yaml", 127176, None),
    ("configs/image/spatio_gen/pearl.yaml", 84840, 2), ("configs/image/spatio_gen/tokyo.yaml", 127260, 2)])
def test_paper_image_configs(path, refiner, downsample):
    with open(os.path.join(ROOT, path)) as f:
        exps = yaml.safe_load(f)
    assert [e["model"]["type"] for e in exps] == PAPER_IDS
    counts = []
    for e in exps:
        assert e["task"] == {"type": "image"}
        assert e["dataset"]["type"] == "image" and e["dataset"]["log2batch"] == 18
        assert e["dataset"].get("downsample") == downsample
        assert e["train"]["epochs"] == 30 and e["train"]["seed"] == 42
        lr = 1e-4 if e["model"]["type"] == "siren" else 5e-3
        assert e["optim"]["lr"] == lr and e["optim"]["eps"] == 1e-15
        assert e["scheduler"] == {"type": "cosine", "eta_min": lr / 100}
        counts.append(n_params(make(e["model"]["type"], **{k: v for k, v in e["model"].items() if k != "type"})))
    assert counts == [4194048 + refiner + 27520] + _REST


def test_demo_config_builds_six_small_models():
    with open(os.path.join(ROOT, "configs/image/demo.yaml")) as f:
        exps = yaml.safe_load(f)
    assert [e["model"]["type"] for e in exps] == PAPER_IDS
    for e in exps:
        assert e["dataset"]["type"] == "image_demo" and e["task"] == {"type": "image"}
        m = make(e["model"]["type"], **{k: v for k, v in e["model"].items() if k != "type"})
        assert 5e4 < n_params(m) < 5e5


def test_image_demo_dataset_writes_the_photo(tmp_path):
    import numpy as np
    import skimage.data
    from PIL import Image

    ds = build("dataset", "image_demo", section="dataset", injected={"seed": 0}, data_dir=str(tmp_path),
               log2batch=6)
    png = tmp_path / "astronaut.png"
    assert png.exists()
    np.testing.assert_array_equal(np.asarray(Image.open(png)), skimage.data.astronaut())
    assert ds.image_shape == (512, 512) and ds.out_dim == 3
    b = ds.sample_batch(0)
    assert tuple(b["x"].shape) == (1, 64, 2) and tuple(b["c"].shape) == (1, 0)
    with pytest.raises(ConfigError, match="photo.*astronaut.*'lena'"):
        build("dataset", "image_demo", section="dataset", injected={"seed": 0}, photo="lena",
              data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="path"):
        build("dataset", "image_demo", section="dataset", injected={"seed": 0}, path="x.png", data_dir=str(tmp_path))
