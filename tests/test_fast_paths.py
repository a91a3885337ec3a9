"""DRR-Net fast paths (models/fast_ops.py, DRRNet.fast_paths / sparse_refine / predict_grid) equal the plain
path: outputs within 1e-5 relative (fp32), and for training the same loss and parameter gradients, on small
random models with non-trivial grids (U(-1, 1)), 2D and 3D, odd shapes, on- and off-vertex coordinates and
the boundary +-1."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.drrnet import DRRNet
from models.fast_ops import (GridQuery, corner_stencil, fused_head, gather_interp, resize_stencil, to_rows,
                             vertex_pipeline)
from models.components.encodings import FeatureUpsamplingPE
from models.components.grids import upsample_grid
from models.components.mlp import MLPDecoder
from models.components.refiners import GLURefiner
from util.sampling import grid_coords, sample_grid

RTOL = 1e-5


@pytest.fixture(autouse=True, params=["compiled", "pytorch"])
def kernels(request, monkeypatch):
    """Every test runs with the compiled CPU kernels (models/cpu_kernels) and with their PyTorch twins."""
    from models import cpu_kernels

    if request.param == "pytorch":
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    elif cpu_kernels.library() is None:
        pytest.skip(f"compiled CPU kernels unavailable here: {cpu_kernels._state['error']}")
    return request.param


def small(spatial_dims=3, **kw):
    torch.manual_seed(0)
    cfg = dict(spatial_resolutions=[3, [4, 5, 6][-spatial_dims:] if spatial_dims == 3 else [5, 4]],
               spatial_channels=2, ssr_resolution=[5, 7, 6][-spatial_dims:], pe_frequencies=2,
               spatial_refiner_layers=2, spatial_hidden_mult=1.5, cond_resolutions=[2, 3, [3, 5, 4]],
               cond_channels=2, cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=12, decoder_layers=3)
    cfg.update(kw)
    m = DRRNet(cond_dim=3, spatial_dims=spatial_dims, **cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in list(m.spatial_grids.parameters()) + list(m.cond_lines.parameters()):
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
    return m


def points(m, B=3, N=40, seed=1, mode="mixed"):
    """Off-vertex random points, lattice vertices, and boundary coordinates +-1 mixed in."""
    g = torch.Generator().manual_seed(seed)
    d = m.spatial_dims
    x = torch.rand(B, N, d, generator=g) * 2 - 1
    verts = grid_coords(m.ssr_shape)
    pick = verts[torch.randint(0, verts.shape[0], (B, N), generator=g)]
    if mode == "vertices":
        x = pick
    elif mode == "mixed":
        x[:, : N // 3] = pick[:, : N // 3]
        x[:, N // 3: N // 3 + 4] = torch.tensor([1.0, -1.0, 1.0])[:d]
        x[:, -3:, 0] = 1.0
        x[:, -2:, -1] = -1.0
    c = torch.rand(B, m.cond_dim, generator=g)
    c[0, 0], c[-1, -1] = 0.0, 1.0
    return x, c


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def close(a, b, rtol=RTOL):
    assert a.shape == b.shape
    assert rel(a, b) <= rtol, rel(a, b)


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7), (4, 5, 3), (2, 9, 6)])
def test_gather_interp_equals_grid_sample(shape):
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(4, *shape, generator=g)
    d = len(shape)
    x = torch.rand(1, 300, d, generator=g) * 2.4 - 1.2              # also outside [-1, 1]: zeros padding
    x[0, :20] = grid_coords(shape)[:20]
    x[0, 20:30] = 1.0
    x[0, 30:40] = -1.0
    idx, w = corner_stencil(x[0], shape)
    got = gather_interp(to_rows(grid).contiguous(), idx, w)
    want = sample_grid(grid, x)[0]
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("src,dst", [((3, 4), (7, 6)), ((3, 5, 4), (5, 7, 6)), ((4, 4, 4), (4, 9, 4))])
def test_resize_stencil_equals_interpolate(src, dst):
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(3, *src, generator=g)
    full = to_rows(upsample_grid(grid, dst))
    P = full.shape[0]
    rows = torch.randperm(P, generator=g)[: P // 2].sort().values
    idx, w = resize_stencil(rows, dst, src)
    got = gather_interp(to_rows(grid).contiguous(), idx, w)
    assert torch.allclose(got, full[rows], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("q,lat", [((5, 7, 6), (5, 7, 6)), ((3, 4, 6), (5, 7, 6)), ((5, 7, 6), (9, 13, 11)),
                                   ((4, 7), (6, 5))])
def test_grid_query_matches_coordinates(q, lat):
    gq = GridQuery(q, lat)
    coords = grid_coords(q)
    idx, w = gq.stencil(0, gq.num_points)
    want_idx, want_w = corner_stencil(coords, lat)
    table = torch.randn(int(torch.tensor(lat).prod()), 3)
    close(gather_interp(table, idx, w), gather_interp(table, want_idx, want_w), 1e-6)
    assert gq.identity == (q == lat)
    if lat == (9, 13, 11):
        assert gq.corners == 1                                      # every query vertex is a lattice vertex


# ---------------------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["mixed", "vertices"])
def test_baked_fast_forward_equals_plain(spatial_dims, mode):
    m = small(spatial_dims)
    x, c = points(m, mode=mode)
    m.bake()
    with torch.no_grad():
        m.fast_paths = False
        want = m(x, c)
        m.fast_paths = True
        got = m(x, c)
    close(got, want)
    assert want.std() > 1e-3


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_predict_grid_equals_plain(spatial_dims):
    m = small(spatial_dims)
    m.bake()
    c = torch.rand(m.cond_dim)
    shapes = [m.ssr_shape, tuple(2 * n - 1 for n in m.ssr_shape), (3, 8, 5)[-spatial_dims:]]
    for shape in shapes:
        want = m.predict_grid(shape, c, chunk_size=37, fast=False)
        m.fast_paths = False
        ref = m(grid_coords(shape)[None], c[None])[0, :, 0].reshape(shape)
        m.fast_paths = True
        close(want, ref, 1e-7)
        got = m.predict_grid(shape, c, chunk_size=37)
        close(got, want)
        lp = m.predict_grid(shape, c, chunk_size=37, dtype=torch.bfloat16)
        assert lp.dtype == torch.float32 and rel(lp, want) < 5e-2


def _predict_grid_reference(m, shape, c, chunk_size):
    """The baked fp32 loop of DRRNet.predict_grid as it was before the fused first pass: stencil tensors per
    chunk, gather_interp, add the condition bias, ReLU, decoder (addmm), output activation."""
    import math
    from models.components.mlp import output_activation
    table, lins = m._baked_fused, m.decoder.linears
    cb = m.cond_bias(c.reshape(1, -1))[0]
    q = GridQuery(shape, m.ssr_shape)
    res = torch.empty(math.prod(shape))
    for s, e in q.chunks(chunk_size):
        if q.identity:
            h = torch.add(table[s:e], cb)
        else:
            h = gather_interp(table, *q.stencil(s, e)).add_(cb)
        h.relu_()
        for i, lin in enumerate(lins):
            h = torch.addmm(lin.bias, h, lin.weight.t())
            if i < len(lins) - 1:
                h.relu_()
        res[s:e] = output_activation(h[:, 0], m.out_activation)
    return res.reshape(shape)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("activation", ["sigmoid", "clamp", "none"])
@pytest.mark.parametrize("onednn", ["off", "auto"])
def test_predict_grid_bitwise_equals_unfused_loop(spatial_dims, activation, onednn, monkeypatch):
    """The fused first pass (GridQuery.gather_bias_relu: compiled stencil + gather + bias + ReLU) and the last
    layer written into the result give the same bits as the unfused loop, on the identity, subsampling,
    upsampling and odd lattices, for several chunk sizes. With the oneDNN linear + ReLU of the hidden layers
    (DRR_ONEDNN_LINEAR auto, the default) the products may round differently (its kernels depend on the row
    count): equal within the fast paths' tolerance."""
    monkeypatch.setenv("DRR_ONEDNN_LINEAR", onednn)
    m = small(spatial_dims, out_activation=activation)
    m.bake()
    c = torch.rand(m.cond_dim)
    shapes = [m.ssr_shape, tuple(2 * n - 1 for n in m.ssr_shape), (3, 8, 5)[-spatial_dims:],
              tuple((n + 1) // 2 for n in m.ssr_shape), (11, 4, 9)[-spatial_dims:]]
    with torch.no_grad():
        for shape in shapes:
            for chunk in (1, 37, 1 << 13):
                got = m.predict_grid(shape, c, chunk_size=chunk)
                want = _predict_grid_reference(m, shape, c, chunk)
                if onednn == "off":
                    assert torch.equal(got, want), (shape, chunk, (got - want).abs().max())
                else:
                    close(got, want)


@pytest.mark.parametrize("q,lat", [((5, 7, 6), (5, 7, 6)), ((3, 4, 6), (5, 7, 6)), ((9, 13, 11), (5, 7, 6)),
                                   ((5, 7, 6), (9, 13, 11)), ((4, 7), (6, 5)), ((6,), (4,))])
def test_grid_query_gather_bias_relu_equals_composition(q, lat):
    gq = GridQuery(q, lat)
    g = torch.Generator().manual_seed(3)
    table = torch.randn(int(torch.tensor(lat).prod()), 19, generator=g)
    bias = torch.randn(19, generator=g)
    for s, e in [(0, gq.num_points), (1, min(gq.num_points, 29)), (gq.num_points - 3, gq.num_points)]:
        out = torch.full((e - s, 19), float("nan"))
        got = gq.gather_bias_relu(table, s, e, bias, out)
        want = torch.relu(gather_interp(table, *gq.stencil(s, e)) + bias)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)


@pytest.mark.parametrize("q,lat", [((5, 7, 6), (5, 7, 6)), ((9, 13, 11), (5, 7, 6)), ((4, 7), (6, 5))])
def test_gather_bias_relu_bf16_table_equals_float_table(q, lat):
    """A bfloat16 table read into float32: with the compiled kernels bitwise the float32 pass on table.float()
    (rows widened exactly, the same accumulation order); the PyTorch fallback equals it within float32
    rounding (its sum runs in another order)."""
    from models import cpu_kernels

    gq = GridQuery(q, lat)
    g = torch.Generator().manual_seed(5)
    table = torch.randn(int(torch.tensor(lat).prod()), 19, generator=g).to(torch.bfloat16)
    bias = torch.randn(19, generator=g)
    for s, e in [(0, gq.num_points), (2, min(gq.num_points, 31))]:
        got = gq.gather_bias_relu(table, s, e, bias, torch.full((e - s, 19), float("nan")))
        want = gq.gather_bias_relu(table.float(), s, e, bias, torch.empty(e - s, 19))
        assert got.dtype == torch.float32
        if cpu_kernels.library() is not None or gq.identity:
            assert torch.equal(got, want), (s, e, (got - want).abs().max())
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_predict_grid_bf16_table_is_float_path_on_rounded_table(spatial_dims):
    """predict_grid(table_dtype=bfloat16) = the float32 fast path on the folded table rounded to bfloat16, bit
    for bit with the compiled kernels, and close to the float32 result; a bad table_dtype is refused."""
    from models import cpu_kernels

    m = small(spatial_dims)
    m.bake()
    c = torch.rand(m.cond_dim)
    with torch.no_grad():
        for shape in [m.ssr_shape, (11, 4, 9)[-spatial_dims:], tuple(2 * n - 1 for n in m.ssr_shape)]:
            got = m.predict_grid(shape, c, chunk_size=37, table_dtype=torch.bfloat16)
            full = m.predict_grid(shape, c, chunk_size=37)
            orig = m._baked_fused
            m._baked_fused = orig.to(torch.bfloat16).float()
            try:
                want = m.predict_grid(shape, c, chunk_size=37)
            finally:
                m._baked_fused = orig
            if cpu_kernels.library() is not None or shape == m.ssr_shape:
                assert torch.equal(got, want), (shape, (got - want).abs().max())
            else:                                 # the PyTorch fallback sums the corners in another order
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert not torch.equal(got, full)
            torch.testing.assert_close(got, full, rtol=2e-2, atol=2e-2)
        with pytest.raises(ValueError, match="table_dtype"):
            m.predict_grid(m.ssr_shape, c, table_dtype=torch.float16)
        with pytest.raises(ValueError, match="table_dtype"):
            m.predict_grid(m.ssr_shape, c, dtype=torch.bfloat16, table_dtype=torch.bfloat16)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("table_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("hidden", [12, 64])
def test_predict_grid_keep_rows_equals_fresh_interpolation(spatial_dims, table_dtype, hidden):
    """predict_grid(keep_rows=True): the folded table resampled onto the query lattice once, then only bias, ReLU
    and decoder per member: bitwise the path that interpolates every call, for every member, on lattices finer,
    coarser and equal to the model lattice, also with bf16 products; one lattice kept per products' dtype,
    dropped by unbake. Hidden width 64: the compiled one-pass decoder (cpu_kernels.baked_mlp) where it exists."""
    m = small(spatial_dims, hidden_dim=hidden)
    m.bake()
    cs = torch.rand(3, m.cond_dim)
    finer = tuple(2 * n - 1 for n in m.ssr_shape)
    coarser = (11, 4, 9)[-spatial_dims:]
    with torch.no_grad():
        for shape in [coarser, finer, m.ssr_shape, coarser]:
            for c in cs:
                want = m.predict_grid(shape, c, chunk_size=37, table_dtype=table_dtype)
                got = m.predict_grid(shape, c, chunk_size=37, table_dtype=table_dtype, keep_rows=True)
                assert torch.equal(got, want), (shape, (got - want).abs().max())
            if shape != m.ssr_shape:   # the model lattice itself needs no resampling
                assert m._rows_cache[torch.float32][1].shape == (math.prod(shape), m._baked_fused.shape[1])
        kept = m._rows_cache[torch.float32][1]
        m.predict_grid(coarser, cs[0], keep_rows=True, table_dtype=table_dtype)
        assert m._rows_cache[torch.float32][1] is kept       # reused, not rebuilt
        m.predict_grid(finer, cs[0], keep_rows=True, table_dtype=table_dtype)
        assert m._rows_cache[torch.float32][1] is not kept   # one lattice at a time
        for c in cs:   # reduced precision: rows kept in that dtype, bitwise its interpolating path too
            want = m.predict_grid(coarser, c, chunk_size=37, dtype=torch.bfloat16)
            got = m.predict_grid(coarser, c, chunk_size=37, dtype=torch.bfloat16, keep_rows=True)
            assert torch.equal(got, want), (got - want).abs().max()
            assert m._rows_cache[torch.bfloat16][1].dtype == torch.bfloat16
        # one lattice per products' dtype: the float32 rows stay beside the bf16 ones
        assert m._rows_cache[torch.float32][0][0] == finer and m._rows_cache[torch.bfloat16][0][0] == coarser
        # some vertices only (an explorer's planes): the full lattice's values there
        idx = torch.tensor([0, 5, 3, math.prod(coarser) - 1, 7])
        for dt in (None, torch.bfloat16):
            full = m.predict_grid(coarser, cs[0], dtype=dt, keep_rows=True).reshape(-1)
            got = m.predict_grid(coarser, cs[0], dtype=dt, keep_rows=True, vertices=idx)
            torch.testing.assert_close(got, full[idx], rtol=1e-5 if dt is None else 1e-2, atol=1e-6)
        with pytest.raises(ValueError, match="keep_rows"):
            m.predict_grid(coarser, cs[0], vertices=idx)
    m.unbake()
    assert m._rows_cache == {}
    with torch.no_grad():   # not baked: the plain path's values at those vertices
        full = m.predict_grid(coarser, cs[0]).reshape(-1)
        torch.testing.assert_close(m.predict_grid(coarser, cs[0], vertices=idx), full[idx])


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("activation", ["sigmoid", "none"])
def test_predict_grid_one_pass_decoder_equals_per_pass_path(spatial_dims, activation, kernels, monkeypatch):
    """Hidden widths that are multiples of the kernel's panel width run the gather, the hidden layers and the
    output layer in one compiled pass per block of rows (cpu_kernels.baked_mlp): equal to the per-pass path
    (DRR_BAKED_MLP=off: PyTorch / oneDNN products) and to the plain path within float32 rounding, compiled
    bitwise the same for any chunk size, with a float32 or bfloat16 table; the products run in float32 only."""
    from models import cpu_kernels

    m = small(spatial_dims, hidden_dim=64, out_activation=activation)
    m.bake()
    calls = []
    if kernels == "compiled":
        real = cpu_kernels.baked_mlp
        monkeypatch.setattr(cpu_kernels, "baked_mlp", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = torch.rand(m.cond_dim)
    shapes = [m.ssr_shape, tuple(2 * n - 1 for n in m.ssr_shape), (11, 4, 9)[-spatial_dims:]]
    with torch.no_grad():
        for shape in shapes:
            got = [m.predict_grid(shape, c, chunk_size=ch) for ch in (1, 37, 1 << 13)]
            if kernels == "compiled":                         # (PyTorch's products depend on the row count)
                assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
            bft = m.predict_grid(shape, c, chunk_size=37, table_dtype=torch.bfloat16)
            monkeypatch.setenv("DRR_BAKED_MLP", "off")
            n_calls = len(calls)
            want = m.predict_grid(shape, c, chunk_size=37)
            want_bft = m.predict_grid(shape, c, chunk_size=37, table_dtype=torch.bfloat16)
            assert len(calls) == n_calls                      # switched off: the per-pass path
            monkeypatch.delenv("DRR_BAKED_MLP")
            close(got[0], want)
            close(bft, want_bft)
            close(got[0], m.predict_grid(shape, c, chunk_size=37, fast=False))
            assert want.std() > 1e-3
    assert (len(calls) > 0) == (kernels == "compiled")       # the compiled pass ran where it exists


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_predict_grid_bf16_products_on_amx(spatial_dims, kernels, monkeypatch):
    """bf16 products (dtype=torch.bfloat16) on a CPU with AMX-BF16 run as one compiled pass per block of rows
    (cpu_kernels.baked_mlp_amx; rows of non-identity lattices resampled per chunk as keep_rows does): bitwise the
    same for any chunk size, within bf16 rounding of the float32 field, and of the per-pass PyTorch bf16 path
    (DRR_BAKED_MLP=off); without AMX (or the compiled kernels) PyTorch's bf16 products."""
    from models import cpu_kernels

    m = small(spatial_dims, hidden_dim=64)
    m.bake()
    calls = []
    amx = kernels == "compiled" and cpu_kernels.has_amx()
    real = cpu_kernels.baked_mlp_amx
    monkeypatch.setattr(cpu_kernels, "baked_mlp_amx", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = torch.rand(m.cond_dim)
    with torch.no_grad():
        for shape in [m.ssr_shape, tuple(2 * n - 1 for n in m.ssr_shape), (11, 4, 9)[-spatial_dims:]]:
            got = [m.predict_grid(shape, c, chunk_size=ch, dtype=torch.bfloat16) for ch in (37, 1 << 13)]
            if amx:
                assert torch.equal(got[0], got[1])
            full = m.predict_grid(shape, c)
            assert rel(got[0], full) < 1e-2
            monkeypatch.setenv("DRR_BAKED_MLP", "off")
            n_calls = len(calls)
            torch_bf16 = m.predict_grid(shape, c, chunk_size=37, dtype=torch.bfloat16)
            assert len(calls) == n_calls
            monkeypatch.delenv("DRR_BAKED_MLP")
            assert rel(torch_bf16, full) < 1e-2 and rel(got[0], torch_bf16) < 1e-2
    assert (len(calls) > 0) == amx


def test_predict_grid_amx_refused_falls_back(monkeypatch):
    """Where the OS refuses the AMX state (baked_mlp_amx returns False), bf16 products run through PyTorch: the
    per-pass path's values, and the kernel is not asked again until unbake."""
    from models import cpu_kernels

    m = small(3, hidden_dim=64)
    m.bake()
    c = torch.rand(m.cond_dim)
    calls = []
    monkeypatch.setattr(cpu_kernels, "has_amx", lambda: True)
    monkeypatch.setattr(cpu_kernels, "baked_mlp_amx", lambda *a, **k: calls.append(1) or False)
    with torch.no_grad():
        got = m.predict_grid(m.ssr_shape, c, dtype=torch.bfloat16)
        again = m.predict_grid(m.ssr_shape, c, dtype=torch.bfloat16)
        monkeypatch.setenv("DRR_BAKED_MLP", "off")
        want = m.predict_grid(m.ssr_shape, c, dtype=torch.bfloat16)
    if cpu_kernels.library() is None:
        assert calls == []
    else:
        assert len(calls) == 1                                   # refused once, then not asked again
    assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("hidden", [12, 64])
def test_predict_grid_members_equals_single_calls(spatial_dims, hidden, kernels):
    """predict_grid_members: K members on one lattice (each block's rows read once for all of them where the
    one-pass kernels apply): bitwise K predict_grid calls, float32 / bf16 products / bf16 table, with and without
    keep_rows, on the model lattice and finer / coarser ones; unbaked: the same calls."""
    m = small(spatial_dims, hidden_dim=hidden)
    m.bake()
    cs = torch.rand(3, m.cond_dim)
    with torch.no_grad():
        for shape in [m.ssr_shape, tuple(2 * n - 1 for n in m.ssr_shape), (11, 4, 9)[-spatial_dims:]]:
            for kw in [{}, {"dtype": torch.bfloat16}, {"table_dtype": torch.bfloat16}, {"keep_rows": True},
                       {"keep_rows": True, "dtype": torch.bfloat16}]:
                got = m.predict_grid_members(shape, cs, chunk_size=37, **kw)
                want = torch.stack([m.predict_grid(shape, c, chunk_size=37, **kw) for c in cs])
                assert got.shape == (3, *shape) and torch.equal(got, want), (shape, kw)
        with pytest.raises(ValueError, match="conditions"):
            m.predict_grid_members(m.ssr_shape, cs[0])
        m.unbake()
        m.eval()
        got = m.predict_grid_members(m.ssr_shape, cs[:2], chunk_size=50)
        assert torch.equal(got, torch.stack([m.predict_grid(m.ssr_shape, c, chunk_size=50) for c in cs[:2]]))


def test_predict_grid_writes_into_out_and_refuses_what_it_cannot_fill():
    """out: the field is written into it (the returned tensor shares its memory); a non-contiguous, wrongly sized
    or non-float32 out is refused by name instead of being filled through a copy the caller never sees."""
    m = small(3)
    m.bake()
    c = torch.rand(m.cond_dim)
    shape = (4, 5, 6)
    want = m.predict_grid(shape, c)
    out = torch.full((4 * 5 * 6,), float("nan"))
    got = m.predict_grid(shape, c, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out.reshape(shape), want)
    for bad in (torch.empty(6, 5, 4).permute(2, 1, 0), torch.empty(119), torch.empty(120, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out must be a contiguous float32 tensor of 120 elements"):
            m.predict_grid(shape, c, out=bad)


def test_predict_grid_unbaked_falls_back():
    m = small(3)
    m.eval()
    c = torch.rand(3)
    shape = (4, 5, 6)
    got = m.predict_grid(shape, c, chunk_size=50)
    m.fast_paths = False
    want = m(grid_coords(shape)[None], c[None])[0, :, 0].reshape(shape)
    close(got, want)


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
def loss_and_grads(m, x, c, v):
    m.zero_grad()
    m.train()
    loss = (m(x, c) - v).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_step_equals_plain(m, x, c, v):
    """One training step's loss and every parameter gradient: fast path == plain path (1e-5 relative)."""
    m.fast_paths = False
    loss0, g0 = loss_and_grads(m, x, c, v)
    m.fast_paths = True
    loss1, g1 = loss_and_grads(m, x, c, v)
    assert abs(float(loss1 - loss0)) <= RTOL * float(loss0)
    for n in g0:
        close(g1[n], g0[n])


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("sparse", ["always", "never", "auto"])
@pytest.mark.parametrize("N", [5, 60])
@pytest.mark.parametrize("fused", ["always", "never"])
def test_training_step_equals_plain(spatial_dims, sparse, N, fused):
    m = small(spatial_dims)
    m.sparse_refine = sparse
    m.fused_refiner = fused
    x, c = points(m, N=N)
    v = torch.rand(x.shape[0], N, 1)
    assert_step_equals_plain(m, x, c, v)
    P = int(torch.tensor(m.ssr_shape).prod())
    if sparse == "always":
        assert m.last_refined_vertices < P or N == 60
    if sparse == "never":
        assert m.last_refined_vertices == P


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("sparse", ["always", "never"])
def test_training_step_equals_plain_float64(spatial_dims, sparse):
    """In float64 the paths agree to ~1e-15 (so fp32 differences are rounding only, never an algorithmic
    difference hidden by the 1e-5 tolerance): the SSR stencil weights follow the grid's precision."""
    m = small(spatial_dims).double()
    m.sparse_refine = sparse
    x, c = points(m, N=30)
    x, c = x.double(), c.double()
    v = torch.rand(x.shape[0], 30, 1, dtype=torch.float64)
    m.fast_paths = False
    loss0, g0 = loss_and_grads(m, x, c, v)
    m.fast_paths = True
    loss1, g1 = loss_and_grads(m, x, c, v)
    assert abs(float(loss1 - loss0)) <= 1e-12 * float(loss0)
    for n in g0:
        close(g1[n], g0[n], rtol=1e-11)


def test_sparse_refine_touches_few_vertices():
    m = small(3, ssr_resolution=[9, 11, 10])
    m.sparse_refine = "auto"
    x, c = points(m, B=1, N=6, mode="vertices")
    v = torch.rand(1, 6, 1)
    assert_step_equals_plain(m, x, c, v)
    assert m.last_refined_vertices <= 6 * 8 < 0.5 * 990


@pytest.mark.parametrize("touched", [100, 700, 750, 800, 990])
def test_auto_refines_sparsely_up_to_the_ratio(touched):
    m = small(3, ssr_resolution=[9, 11, 10])                    # P = 990 vertices
    m.sparse_refine = "auto"
    idx = torch.arange(touched).repeat(2)[:, None].expand(-1, 8).contiguous()
    w = torch.full(idx.shape, 1.0 / 8)
    w[:, 1:] = torch.where(torch.arange(idx.shape[0])[:, None] % 2 == 0, 0.0, w[:, 1:])  # some zero corners
    rows, pos, V = m._touched_rows(idx, w)
    if touched <= m.sparse_refine_ratio * 990:
        assert V == touched and torch.equal(rows, torch.arange(touched))
        assert torch.equal(rows[pos[w != 0]], idx[w != 0])       # every live corner maps to its own row
    else:
        assert rows is None and V == 990


def test_points_on_vertices_touch_one_vertex_each():
    """Zero-weight corners do not count as touched: 27 points exactly on vertices refine 27 vertices, not 27*8,
    and values and gradients still equal the plain path's."""
    m = small(3, ssr_resolution=[5, 7, 9])
    m.sparse_refine = "always"
    axis = torch.tensor([-1.0, 0.0, 1.0])
    x = torch.cartesian_prod(axis, axis, axis)[None]               # (1, 27, 3), exact vertex coordinates
    x = torch.cat([x, x[:, :5]], dim=1)                           # repeated points
    c = torch.rand(1, m.cond_dim, generator=torch.Generator().manual_seed(3))
    v = torch.rand(1, x.shape[1], 1)
    assert_step_equals_plain(m, x, c, v)
    assert m.last_refined_vertices == 27


@pytest.mark.parametrize("variant", ["pi_only", "spatial_refiner_only", "embedding_only"])
def test_variants_fast_equals_plain(variant):
    m = small(3, variant=variant)
    x, c = points(m)
    v = torch.rand(x.shape[0], x.shape[1], 1)
    assert_step_equals_plain(m, x, c, v)


# ---------------------------------------------------------------------------------------------------------
# fused vertex pipeline and the CPU gather backward
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pe_kw", [None, dict(num_freqs=3), dict(num_freqs=2, scale=0.7, include_input=True)])
@pytest.mark.parametrize("layers", [0, 1, 3])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("keep_bytes", [2 ** 30, 0])          # keep intermediates / recompute per chunk
def test_vertex_pipeline_equals_autograd(pe_kw, layers, fold, keep_bytes):
    torch.manual_seed(3)
    C, V = 3, 23
    pe = FeatureUpsamplingPE(C, **pe_kw) if pe_kw else None
    D = pe.out_dim if pe else C
    ref = GLURefiner(D, layers, 1.5) if layers else None
    if ref is not None:
        with torch.no_grad():
            for blk in ref.blocks:
                blk.norm.weight.uniform_(0.5, 1.5)
    w_fold = torch.randn(5, D, requires_grad=True) if fold else None
    u = (torch.rand(V, C) * 2 - 1).requires_grad_()
    go = torch.randn(V, 5 if fold else D)
    params = ([] if ref is None else list(ref.parameters())) + ([w_fold] if fold else [])

    def run(fn):
        for q in params + [u]:
            q.grad = None
        out = fn()
        out.backward(go)
        return out.detach(), [q.grad.clone() for q in params + [u]]

    def plain():
        x = pe(u) if pe else u
        g = x + ref(x) if ref is not None else x
        return g @ w_fold.t() if fold else g

    out0, g0 = run(plain)
    out1, g1 = run(lambda: vertex_pipeline(u, pe, ref, w_fold, chunk=7, keep_bytes=keep_bytes))
    close(out1, out0)
    for a, b in zip(g1, g0):
        close(a, b)


def test_gather_interp_backward_equals_embedding_bag():
    g = torch.Generator().manual_seed(4)
    table = torch.randn(30, 6, generator=g).requires_grad_()
    idx = torch.randint(0, 30, (50, 8), generator=g)
    idx[:5] = 3                                                  # repeated rows accumulate
    w = torch.rand(50, 8, generator=g).requires_grad_()
    go = torch.randn(50, 6, generator=g)
    out1 = gather_interp(table, idx, w)
    gt1, gw1 = torch.autograd.grad(out1, (table, w), go)
    out0 = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    gt0, gw0 = torch.autograd.grad(out0, (table, w), go)
    close(out1, out0)
    close(gt1, gt0)
    close(gw1, gw0)


@pytest.mark.parametrize("activation", ["sigmoid", "clamp", "none"])
@pytest.mark.parametrize("chunk", [4, 7, 64])      # parts of a condition / one condition / several conditions
@pytest.mark.parametrize("layers", [1, 3])
def test_fused_head_equals_autograd(activation, chunk, layers):
    torch.manual_seed(5)
    B, N, H = 3, 7, 6
    dec = MLPDecoder(H, 5, layers, 2)
    z = torch.randn(B * N, H, requires_grad=True)
    cb = torch.randn(B, H, requires_grad=True)
    go = torch.randn(B * N, 2)
    lins = [m for m in dec.net if isinstance(m, torch.nn.Linear)]
    params = [z, cb] + list(dec.parameters())

    def plain():
        out = dec(torch.relu(z.reshape(B, N, H) + cb[:, None, :])).reshape(B * N, 2)
        return {"sigmoid": torch.sigmoid, "clamp": lambda t: t.clamp(0.0, 1.0), "none": lambda t: t}[activation](out)

    out0 = plain()
    g0 = torch.autograd.grad(out0, params, go)
    out1 = fused_head(z, cb, lins, activation, chunk=chunk)
    g1 = torch.autograd.grad(out1, params, go)
    close(out1, out0)
    for a, b in zip(g1, g0):
        close(a, b)


def test_fused_functions_support_a_second_backward():
    """retain_graph=True: the fused functions free their kept intermediates in the first backward and
    recompute them in a second one; both give the same gradients."""
    m = small(3)
    m.fused_refiner = "always"
    m.sparse_refine = "never"
    m.train()
    x, c = points(m)
    loss = (m(x, c) - 0.5).pow(2).mean()
    first = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(m.parameters()))
    for a, b in zip(first, second):
        close(b, a)


# ---------------------------------------------------------------------------------------------------------
# bf16 mixed precision on CPU (train.mixed_precision: bf16 = torch.autocast("cpu", bfloat16))
# ---------------------------------------------------------------------------------------------------------
BF16_LOSS_RTOL = 1e-3      # relative error of the loss, bf16 step vs fp32 step
BF16_GRAD_RTOL = 0.1       # relative L2 error of every parameter gradient (bf16 has 8 significant bits; on these
                           # random U(-1, 1) models the fused bf16 step is up to ~6e-2 off, PyTorch's own bf16
                           # autocast of the plain path up to ~4e-2)


def _step_grads(m, x, c, v, bf16):
    import contextlib

    m.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        out = m(x, c)
        loss = F.mse_loss(out.float(), v)
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bf16_training_step_matches_fp32(spatial_dims, monkeypatch):
    """A bf16 step (fused paths: bf16 products, float32 elementwise passes, sums and output) equals the fp32 step
    within BF16_*_RTOL (loss and every gradient), runs through the fused functions with bf16 products, is no
    further from fp32 than PyTorch's bf16 autocast of the plain path, and leaves the fp32 step bitwise as it was."""
    from models import fast_ops

    m = small(spatial_dims)
    m.train()
    x, c = points(m, B=3, N=200)
    # a target the model is far from: coherent gradients (with random targets some gradients are tiny sums of
    # cancelling terms, whose bf16 error relative to their size says nothing about training)
    v = torch.full((3, 200, 1), 2.0)
    out32, l32, g32 = _step_grads(m, x, c, v, bf16=False)
    calls = {"vp": 0, "head": 0, "vp_lp": 0, "head_lp": 0}
    real_vp, real_head = fast_ops.VertexPipeline.apply, fast_ops.FusedHead.apply
    prims = fast_ops._prims(x)                        # the compiled kernels, or their PyTorch twins

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped
    with monkeypatch.context() as mp:
        mp.setattr(fast_ops.VertexPipeline, "apply", count("vp", real_vp))
        mp.setattr(fast_ops.FusedHead, "apply", count("head", real_head))
        mp.setattr(prims, "rms_norm_fwd_lp", count("vp_lp", prims.rms_norm_fwd_lp))   # the refiner's bf16 passes
        mp.setattr(prims, "bias_relu_lp", count("head_lp", prims.bias_relu_lp))       # the head's
        outbf, lbf, gbf = _step_grads(m, x, c, v, bf16=True)
    assert min(calls.values()) >= 1, calls            # the fused paths, with bf16 products
    assert outbf.dtype == torch.float32                                           # the output head in fp32
    assert abs(float(lbf - l32)) <= BF16_LOSS_RTOL * float(l32)
    errs = {n: rel(gbf[n], g32[n]) for n in g32}
    assert max(errs.values()) <= BF16_GRAD_RTOL, errs
    m.fast_paths = False                                  # PyTorch's bf16 autocast of the plain path, for scale
    _, _, gplain = _step_grads(m, x, c, v, bf16=True)
    plain_err = max(rel(gplain[n], g32[n]) for n in g32)
    assert max(errs.values()) <= 2.5 * plain_err + 1e-2, (max(errs.values()), plain_err)
    m.fast_paths = True
    out2, l2, g2 = _step_grads(m, x, c, v, bf16=False)    # fp32 afterwards: bitwise the same
    assert torch.equal(out2, out32) and torch.equal(l2, l32)
    assert all(torch.equal(g2[n], g32[n]) for n in g32)


def test_lowp_products_only_under_cpu_bf16_autocast():
    from models.fast_ops import lowp_products

    t = torch.zeros(2, 2)
    assert lowp_products(t) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lowp_products(t) is torch.bfloat16
        assert lowp_products(t.double()) is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert lowp_products(t) is None


@pytest.mark.parametrize("refiner", [1, 0])            # refined lines (one per parameter) / raw lines per level
def test_baked_condition_bias_from_folded_lines(kernels, refiner):
    """Baked, the condition bias comes from the lines folded with W_c (DRRNet._fold_condition): equal to the
    features-and-product form within float32 rounding at clamped, edge and interior conditions; each row the
    same bits alone as among others; the compiled kernel and its PyTorch twin the same bits (the kernels
    fixture runs both: compared here against an explicit PyTorch evaluation); differentiable in c; a NaN
    condition refused by both."""
    m = small(cond_refiner_layers=refiner).eval()
    c = torch.rand(6, 3, generator=torch.Generator().manual_seed(4))
    c[0] = torch.tensor([0.0, 1.0, 0.5])
    c[1] = torch.tensor([-0.3, 1.7, 1.0 - 1e-7])                      # clamped to [0, 1]
    with torch.no_grad():
        want = m.cond_bias(c)
        m.bake()
        got = m.cond_bias(c)
    assert m._cond_index.shape[1] == (3 if refiner else 3 * 3)        # 3 levels of raw lines per parameter
    close(got, want)
    for i in range(len(c)):
        assert torch.equal(m.cond_bias(c[i:i + 1])[0], got[i])
    twin = m.fusion[0].bias.detach().expand(len(c), -1)              # the fold's sum, written out
    for k, r0, n in m._cond_index.t().tolist():
        A = m._cond_tables[r0:r0 + n]
        s = c[:, k].clamp(0.0, 1.0) * (n - 1)
        i0 = s.floor().clamp(max=n - 2).long()
        w = (s - i0.float())[:, None]
        twin = twin + (A[i0] + w * (A[i0 + 1] - A[i0]))
    assert torch.equal(got, twin)
    cg = c[2:4].clone().requires_grad_(True)                          # interior: the lerp weights carry the grad
    m.cond_bias(cg).sum().backward()
    m.unbake()
    cr = c[2:4].clone().requires_grad_(True)
    m.cond_bias(cr).sum().backward()
    close(cg.grad, cr.grad)
    m.bake()
    with pytest.raises(ValueError, match="condition is NaN"):
        m.cond_bias(torch.tensor([[0.5, float("nan"), 0.5]]))


def test_cond_bias_lines_rejects_lines_outside_the_table(kernels):
    from models import cpu_kernels
    if kernels != "compiled":
        assert cpu_kernels.cond_bias_lines(torch.rand(1, 2), torch.rand(4, 3), torch.zeros(3, 1, dtype=torch.int64),
                                           torch.rand(3)) is None
        return
    tables, bias, c = torch.rand(5, 3), torch.rand(3), torch.rand(2, 2)
    ok = torch.tensor([[0, 1], [0, 2], [2, 3]])                       # parameter, first row, length
    assert cpu_kernels.cond_bias_lines(c, tables, ok, bias).shape == (2, 3)
    for bad in ([[0, 2], [0, 2], [2, 4]], [[0, 1], [0, 4], [2, 1]], [[0, 1], [0, 0], [2, 1]]):
        with pytest.raises(ValueError, match="out of the 5 rows"):
            cpu_kernels.cond_bias_lines(c, tables, torch.tensor(bad), bias)


def test_grid_query_is_cached_per_shapes_and_device():
    from models.fast_ops import grid_query
    a = grid_query((4, 5), [7, 9], "cpu")
    assert grid_query([4, 5], (7, 9), torch.device("cpu")) is a
    assert grid_query((4, 5), (7, 8), "cpu") is not a and grid_query((5, 5), (7, 9), "cpu") is not a
    b = GridQuery((4, 5), (7, 9), "cpu")
    assert a.identity == b.identity and a.num_points == b.num_points
    for x, y in zip(a.axis_idx + a.axis_w, b.axis_idx + b.axis_w):
        assert torch.equal(x, y)


@pytest.mark.parametrize("head", [False, True])
def test_bf16_fused_paths_do_not_depend_on_chunks(head):
    """Under bf16 autocast the fused pipeline and head take several times their float32 rows per chunk (fewer,
    larger bf16 products); many small chunks give the same output and gradients as one chunk, up to the bf16
    rounding of each chunk's weight-gradient product (a lost or doubled chunk would be off by 1/5 or more)."""
    from models.fast_ops import lowp_products
    torch.manual_seed(5)
    if head:
        H, B, N = 16, 3, 70
        lins = [torch.nn.Linear(H, H), torch.nn.Linear(H, H), torch.nn.Linear(H, 1)]
        z = torch.randn(B * N, H, requires_grad=True)
        cb = torch.randn(B, H, requires_grad=True)
        params = [p for m in lins for p in m.parameters()] + [z, cb]
        fn = lambda chunk: fused_head(z, cb, lins, "sigmoid", chunk=chunk)   # noqa: E731
    else:
        pe = FeatureUpsamplingPE(3, num_freqs=2)
        ref = GLURefiner(pe.out_dim, 2, 1.5)
        w = torch.randn(6, pe.out_dim, requires_grad=True)
        u = (torch.rand(150, 3) * 2 - 1).requires_grad_()
        params = list(ref.parameters()) + [w, u]
        fn = lambda chunk: vertex_pipeline(u, pe, ref, w, chunk=chunk)       # noqa: E731
    res = []
    for chunk in (3, 100000):                          # many chunks (bf16: 24 / 6 rows) / one
        for q in params:
            q.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lowp_products(params[-1]) is torch.bfloat16
            out = fn(chunk)
        out.float().pow(2).sum().backward()
        res.append((out.detach().float(), [q.grad.clone() for q in params]))
    (o1, g1), (o2, g2) = res
    close(o1, o2, 1e-6)                                # (the head's float32 output layer: its row count)
    for a, b in zip(g1, g2):                           # a chunk's bf16 weight-gradient product is rounded to bf16
        close(a, b, 5e-3)                              # before the float32 sum over chunks (measured <= 3.1e-3)
