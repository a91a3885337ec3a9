"""Amortized terrain models: payload sizes (spec numbers), rank-1 modulation, SIREN identity at init, Functa inner
loop, PTQ round trip, the teacher path, bad inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.terrain.huvr import HUVR, HUVRSiren
from models.terrain.quant import default_scope, entropy_bits, quantize_payload, quantize_weights_
from util.registry import ConfigError, build

TINY = dict(patch_size=4, latent_dim=6, enc_width=16, enc_depth=1, enc_heads=2, dec_width=16, dec_depth=1, dec_heads=2)


def _build(name, tile=16, **kw):
    torch.manual_seed(0)
    return build("model", name, injected={"tile_size": tile, "spatial_dims": 2}, **kw)


@pytest.mark.parametrize("name,floats", [("transinr", 197376), ("functa", 512), ("huvr", 8224), ("huvr_siren", 8224)])
def test_paper_payload_sizes(name, floats):
    # spec huvr Table 1 #floats at 256 x 256, p = 16, d = 32 (built on the meta device: shapes only)
    with torch.device("meta"):
        m = _build(name, tile=256)
        z = m.encode(torch.zeros(1, 1, 256, 256)) if name != "functa" else torch.zeros(1, 1, 512)
        out = m.decode(z)
    assert m.payload_floats == floats and z[0].numel() == floats and tuple(out.shape) == (1, 1, 256, 256)
    if name.startswith("huvr"):
        assert 32 * floats / 65536 == pytest.approx(4.016, abs=1e-3)  # Table 3 BPP


def test_huvr_rank1_modulation_matches_explicit_weights():
    m = _build("huvr", mlp_width=8, mlp_depth=2, upsampler_channels=5, **TINY)
    for head in m.mod_heads:  # non-trivial modulations
        torch.nn.init.normal_(head.weight, std=0.3)
    h = m.hyper_decode(m.encode(torch.randn(2, 1, 16, 16)))
    mods = m.modulations(h)
    N = (16 // 4) ** 2
    assert [(tuple(u.shape), tuple(v.shape)) for u, v in mods] == [((2, N, 8), (2, N, 2)), ((2, N, 8), (2, N, 8)),
                                                                  ((2, N, 5), (2, N, 8))]
    # the first layer by explicit per-patch weights W (.) (u v^T)
    lin, (u, v) = m.mlp[0], mods[0]
    W_i = lin.weight[None, None] * (u[..., :, None] * v[..., None, :])  # (B, N, out, in)
    x = m.centres.expand(2, -1, -1)
    explicit = torch.einsum("bnoi,bni->bno", W_i, x) + lin.bias
    fast = u * F.linear(v * x, lin.weight) + lin.bias
    torch.testing.assert_close(fast, explicit)


def test_huvr_modulation_heads_start_at_identity():
    m = _build("huvr", mlp_width=8, mlp_depth=2, upsampler_channels=5, **TINY)
    h = m.hyper_decode(m.encode(torch.randn(2, 1, 16, 16)))
    for u, v in m.modulations(h):
        assert torch.all(u == 1) and torch.all(v == 1)


@pytest.mark.parametrize("scales_beta", [False, True])
def test_siren_modulation_identity_at_init(scales_beta):
    # alpha = 1, beta = 0 at init: HUVR+SIREN decodes exactly the plain SirenMLP (its own forward) at every point
    m = _build("huvr_siren", siren_width=12, omega_0=15.0, omega_scales_beta=scales_beta, **TINY)
    z = torch.randn(3, *m.payload_shape)
    for a, b in m.modulations(m.hyper_decode(z)):
        assert torch.all(a == 1) and torch.all(b == 0)
    x = torch.rand(3, 50, 2) * 2 - 1
    torch.testing.assert_close(m.decode_points(z, x), m.siren(x))
    # a non-zero beta head changes the output (the modulation path is live)
    torch.nn.init.normal_(m.beta_heads[0][1].weight, std=0.5)
    assert not torch.allclose(m.decode_points(z, x), m.siren(x))


def test_siren_local_frame_and_patch_lookup():
    m = _build("huvr_siren", siren_width=8, coord_frame="local", **TINY)
    T, p = 16, 4
    j = torch.tensor([0, 3, 4, 15], dtype=torch.float32)
    x = torch.stack([2 * j / (T - 1) - 1, torch.full_like(j, -1.0)], -1)[None]  # row 0, columns j
    idx, local = m._patch_and_input(x)
    assert idx[0].tolist() == [0, 0, 1, 3]
    torch.testing.assert_close(local[0, :, 0], torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_functa_inner_loop_lowers_the_tile_loss():
    from datasets.terrain_gen import fractal_surface

    m = _build("functa", latent_dim=16, width=32, hidden_layers=2, omega_0=10.0, inner_steps=3, inner_lr_init=1.0)
    m.eval()
    t = torch.from_numpy(fractal_surface(16, seed=1)).float()
    t = ((t - t.mean()) / t.std())[None, None]
    z0 = torch.zeros(1, *m.payload_shape)
    before = float(m.inner_loss(z0, t))
    z = m.encode(t)
    after = float(m.inner_loss(z, t))
    assert after < 0.9 * before and z.abs().sum() > 0 and not z.requires_grad
    # training mode keeps the graph through the inner loop (second order): the meta-gradient reaches inner_lr
    m.train()
    loss = F.mse_loss(m.decode(m.encode(t)), t)
    loss.backward()
    assert m.inner_lr.grad is not None and m.inner_lr.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_ptq_round_trip_error_bound(bits):
    g = torch.Generator().manual_seed(bits)
    z = torch.randn(3, 17, 5, generator=g) * torch.tensor([0.1, 1.0, 10.0, 3.0, 0.5])
    zq, q, scale, side = quantize_payload(z, bits, "tile")
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() <= qmax and side == 5 * 16 and scale.shape == (3, 1, 5)
    assert torch.all((z - zq).abs() <= scale / 2 + 1e-7)
    # the scale is max|z_.j| / qmax rounded up to float16 (no larger than the next float16 step)
    exact = z.abs().amax(dim=1, keepdim=True) / qmax
    assert torch.all(scale >= exact) and torch.all(scale <= exact * (1 + 2 ** -9))
    zd, _, sd, side_d = quantize_payload(z, bits, "dataset")
    # one scale per dimension over the 3 tiles, stored once: its 5 x 16 bits shared by the 3 tiles
    assert sd.shape == (1, 1, 5) and side_d == pytest.approx(5 * 16 / 3) and torch.all((z - zd).abs() <= sd / 2 + 1e-7)
    torch.testing.assert_close(sd[0, 0], scale.amax(dim=(0, 1)))


def test_single_token_payload_needs_dataset_scope():
    # one token per tile (Functa): per-tile scales make every value its own scale -> lossless, all symbols +-qmax
    z = torch.randn(6, 1, 4, generator=torch.Generator().manual_seed(0))
    zq, q, _, side = quantize_payload(z, 4, "tile")
    assert torch.all(q.abs() == 7) and side == 4 * 16 and torch.allclose(zq, z, rtol=2 ** -10)
    assert default_scope(1) == "dataset" and default_scope(257) == "tile"
    zd, qd, _, _ = quantize_payload(z, 4, "dataset")
    assert not torch.allclose(zd, z, rtol=2 ** -10) and len(torch.unique(qd)) > 2


def test_entropy_bits_by_hand():
    q = torch.zeros(2, 8, 3, dtype=torch.int64)
    q[0, :, 1] = torch.arange(8)  # 8 distinct symbols: 3 bits each
    q[1, :4, 2] = 1  # half and half: 1 bit each
    torch.testing.assert_close(entropy_bits(q), torch.tensor([24.0, 8.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="scope"):
        entropy_bits(q, "batch")


def test_shared_entropy_bits_by_hand():
    # 4 tiles, 1 token, 2 dims. dim 0: symbols 0, 0, 0, 1 (p = 3/4, 1/4); dim 1: all 5 (0 bits)
    q = torch.tensor([[[0, 5]], [[0, 5]], [[0, 5]], [[1, 5]]])
    import math
    want = torch.tensor([-math.log2(0.75)] * 3 + [2.0], dtype=torch.float64)
    torch.testing.assert_close(entropy_bits(q, "dataset"), want)
    # the mean is n sum_j H_j of the pooled symbols
    H = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert float(entropy_bits(q, "dataset").mean()) == pytest.approx(H)


def test_weight_quantization_per_row_bound():
    lin = torch.nn.Linear(7, 4)
    w = lin.weight.detach().clone()
    info = quantize_weights_(lin, 4)
    step = w.abs().amax(dim=1, keepdim=True) / 7
    assert info["values"] == 28 and torch.all((lin.weight - w).abs() <= step / 2 * (1 + 2 ** -9) + 1e-7)


def test_transinr_forward_is_the_decoded_raster():
    m = _build("transinr", patch_size=4, width=16, depth=1, heads=2, mlp_width=8, weight_groups=[4, 2, 1],
               coord_freqs=2)
    assert m.payload_shape == (7, 16)
    z = m.encode(torch.randn(2, 1, 16, 16))
    img = m.decode(z)
    a = torch.linspace(-1, 1, 16)
    x = torch.stack([a[[0, 5, 15]], a[[3, 3, 9]]], -1)[None].expand(2, -1, -1)  # (col, row)
    y = m(x, z.reshape(2, -1))
    torch.testing.assert_close(y[..., 0], img[:, 0, [3, 3, 9], [0, 5, 15]])


def test_teacher_distillation_path(tmp_path):
    class StubTeacher(torch.nn.Module):  # (B, 3, H, W) -> (B, 1 + 4, 10) tokens
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 10)

        def forward(self, x):
            g = F.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
            tok = torch.cat([g.mean(1, keepdim=True), g], 1)
            return self.proj(tok)

    path = tmp_path / "teacher.pt"
    torch.jit.trace(StubTeacher(), torch.zeros(1, 3, 16, 16)).save(str(path))
    m = _build("huvr", mlp_width=8, mlp_depth=1, upsampler_channels=4, teacher=str(path), distill_loss="mse", **TINY)
    tiles = torch.randn(2, 1, 16, 16)
    recon, terms = m.training_outputs(tiles)
    assert set(terms) == {"distill_enc", "distill_dec"} and recon.shape == (2, 1, 16, 16)
    # forward(tiles=) is the same call (the route the task takes, through the DDP wrapper)
    recon2, terms2 = m(tiles=tiles)
    assert torch.equal(recon2, recon) and all(torch.equal(terms2[k], terms[k]) for k in terms)
    with pytest.raises(ValueError, match="either"):
        m(torch.zeros(2, 5, 2), torch.zeros(2, m.payload_floats), tiles=tiles)
    with pytest.raises(ValueError, match="needs coordinates"):
        m()
    sum(terms.values()).backward()
    assert m.head_enc.weight.grad.abs().sum() > 0 and m.encoder.embed.weight.grad.abs().sum() > 0
    assert not any(k.startswith("_teacher") for k in m.state_dict())
    with pytest.raises(ConfigError, match="model.teacher.*not found.*DINOv3"):
        _build("huvr", teacher=str(tmp_path / "missing.pt"), **TINY)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="patch_size=5 must divide"):
        _build("huvr", **{**TINY, "patch_size": 5})
    with pytest.raises(ConfigError, match="2-D terrain model"):
        build("model", "huvr_siren", injected={"tile_size": 16, "spatial_dims": 3}, **TINY)
    with pytest.raises(ConfigError, match="weight_groups\\[0\\]=3"):
        _build("transinr", patch_size=4, width=16, depth=1, heads=2, mlp_width=8, weight_groups=[3, 1])
    with pytest.raises(ConfigError, match="model.coord_frame"):
        _build("huvr_siren", coord_frame="polar", **TINY)
    with pytest.raises(ConfigError, match="model.inner_steps"):
        _build("functa", inner_steps=0)
    m = _build("huvr", mlp_width=8, mlp_depth=1, upsampler_channels=4, **TINY)
    with pytest.raises(ValueError, match=r"tiles must be \(B, 1, 16, 16\)"):
        m.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="payload"):
        m(torch.zeros(1, 3, 2), torch.zeros(1, 5))
