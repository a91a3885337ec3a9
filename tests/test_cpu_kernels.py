"""Compiled CPU kernels (models/cpu_kernels.py, models/csrc/fused_cpu.c) against their PyTorch twins
(models/fast_ops._TorchPrims, the PyTorch corner stencil), with 1 and 3 OpenMP threads (uneven splits) and
odd sizes; the build / fallback / cache behaviour. The fused paths that use them are checked against autograd
in tests/test_fast_paths.py (with the kernels and with the twins)."""
import shutil
import warnings

import pytest
import torch

from models import cpu_kernels as ck
from models import fast_ops
from models.fast_ops import _TorchPrims as T


@pytest.fixture
def lib():
    if ck.library() is None:
        if shutil.which(__import__("os").environ.get("CC", "cc")) is None:
            pytest.skip("no C compiler on this machine: the PyTorch twins are used (tested in test_fast_paths)")
        pytest.fail(f"a C compiler exists but the kernels did not build / load: {ck._state['error']}")
    return ck.library()


@pytest.fixture(params=[1, 3])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)          # also the OpenMP thread count of the kernels
    yield request.param
    torch.set_num_threads(old)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("n,D,H", [(1, 5, 3), (37, 64, 128), (130, 33, 70)])
def test_refiner_kernels_equal_twins(lib, threads, n, D, H):
    g = torch.Generator().manual_seed(n + D)
    x = torch.randn(n, D, generator=g)
    xh, r = ck.rms_norm_fwd(x, 1e-6)
    xh0, r0 = T.rms_norm_fwd(x, 1e-6)
    assert rel(xh, xh0) < 1e-6 and rel(r, r0) < 1e-6 and r.shape == (n, 1)

    gx, gxh = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    a = ck.rms_norm_bwd(gx, gxh, xh0, r0)
    b = T.rms_norm_bwd(gx, gxh, xh0, r0)
    assert rel(a, b) < 1e-6
    inplace = gx.clone()
    assert ck.rms_norm_bwd(inplace, gxh, xh0, r0, out=inplace) is inplace and rel(inplace, b) < 1e-6

    ab = torch.randn(n, 2 * H, generator=g)
    ab[:, 0] = 0.0                                                  # relu'(0) = 0 on both sides
    assert torch.equal(ck.glu_fwd(ab), T.glu_fwd(ab))
    gh = torch.randn(n, H, generator=g)
    (gab, h), (gab0, h0) = ck.glu_bwd(gh, ab), T.glu_bwd(gh, ab)
    assert torch.equal(gab, gab0) and torch.equal(h, h0)


@pytest.mark.parametrize("n,D,H", [(1, 5, 3), (37, 64, 128), (130, 33, 70)])
def test_bf16_training_kernels_are_the_fp32_passes_rounded(lib, threads, n, D, H):
    """The passes around a bf16 product (bf16 results in, bf16 operands out) give their float32 pass on the same
    values followed by the bf16 rounding: elementwise the same bits, the RMSNorm passes (row sums, vectorized
    differently) to fp32 rounding, each bf16 output the rounding of its float32 result; their PyTorch twins
    likewise; in place where asked."""
    g = torch.Generator().manual_seed(7 * n + D)
    bf = torch.bfloat16
    x = torch.randn(n, D, generator=g)
    xh, xhb, r = ck.rms_norm_fwd_lp(x, 1e-6)
    xh0, r0 = ck.rms_norm_fwd(x, 1e-6)
    assert rel(xh, xh0) < 1e-6 and rel(r, r0) < 1e-6 and torch.equal(xhb, xh.to(bf)) and xhb.dtype == bf
    txh, txhb, tr = T.rms_norm_fwd_lp(x, 1e-6)
    assert rel(txh, xh) < 1e-6 and rel(tr, r) < 1e-6 and torch.equal(txhb, txh.to(bf))

    ab = torch.randn(n, 2 * H, generator=g).to(bf)
    ab[:, 0] = 0.0
    assert ck.glu_fwd(ab).dtype == bf and torch.equal(ck.glu_fwd(ab), ck.glu_fwd(ab.float()).to(bf))
    assert torch.equal(T.glu_fwd(ab), ck.glu_fwd(ab))
    gh = torch.randn(n, H, generator=g).to(bf)
    gab, h = ck.glu_bwd(gh, ab)
    gab0, h0 = ck.glu_bwd(gh.float(), ab.float())
    assert torch.equal(gab, gab0.to(bf)) and torch.equal(h, h0.to(bf)) and gab.dtype == h.dtype == bf
    tgab, th = T.glu_bwd(gh, ab)
    assert torch.equal(tgab, gab) and torch.equal(th, h)

    gx, gxh = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g).to(bf)
    want = ck.rms_norm_bwd(gx, gxh.float(), xh, r)
    assert rel(ck.rms_norm_bwd(gx, gxh, xh, r), want) < 1e-6
    inplace = gx.clone()
    assert ck.rms_norm_bwd(inplace, gxh, xh, r, out=inplace) is inplace and rel(inplace, want) < 1e-6
    assert rel(T.rms_norm_bwd(gx, gxh, xh, r), want) < 1e-6

    a, b = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    assert torch.equal(ck.add_bf16(a, b.to(bf)), a + b.to(bf).float())
    acc = a.clone()
    assert ck.add_bf16(acc, b.to(bf), out=acc) is acc and torch.equal(acc, a + b.to(bf).float())
    assert torch.equal(T.add_bf16(a, b.to(bf)), acc)
    assert torch.equal(ck.add_to_bf16(a, b), (a + b).to(bf)) and torch.equal(T.add_to_bf16(a, b), (a + b).to(bf))
    with pytest.raises(ValueError, match="bfloat16"):
        ck.glu_bwd(gh, ab.float())                                   # one bf16, one float32


@pytest.mark.parametrize("nb,n_per,H", [(1, 1, 4), (3, 7, 20), (4, 33, 70)])
def test_bf16_head_kernels_are_the_fp32_passes_rounded(lib, threads, nb, n_per, H):
    """The head's passes around its bf16 products: bias + ReLU of a float32 or bf16 input, and the ReLU backward
    of a bf16 gradient with its per-segment sums, equal the float32 kernels on the same values (sums included),
    with the bf16 copy of each result the rounding of it; their PyTorch twins likewise."""
    g = torch.Generator().manual_seed(nb * 10 + H)
    bf = torch.bfloat16
    x, bias = torch.randn(nb * n_per, H, generator=g), torch.randn(nb, H, generator=g)
    for xin in (x, x.to(bf)):
        out, outb = ck.bias_relu_lp(xin, bias)
        want = ck.bias_relu(xin.float(), bias)
        assert torch.equal(out, want) and torch.equal(outb, want.to(bf))
        tout, toutb = T.bias_relu_lp(xin, bias)
        assert torch.equal(tout, want) and torch.equal(toutb, outb)
    assert ck.bias_relu_lp(x, bias, operand=False)[1] is None

    gr, h = torch.randn(nb * n_per, H, generator=g).to(bf), torch.relu(torch.randn(nb * n_per, H, generator=g))
    s1, s0, s2 = (torch.full((nb, H), 0.5) for _ in range(3))
    out, outb = ck.relu_bwd_segsum_lp(gr, h, s1)
    want = ck.relu_bwd_segsum(gr.float(), h, s0)
    assert torch.equal(out, want) and torch.equal(s1, s0) and torch.equal(outb, want.to(bf))
    dest = torch.empty(nb * n_per, H)
    r, rb = ck.relu_bwd_segsum_lp(gr, h, s2, out=dest, operand=False)
    assert r is dest and rb is None and torch.equal(dest, want) and torch.equal(s2, s0)
    ts = torch.full((nb, H), 0.5)
    tout, toutb = T.relu_bwd_segsum_lp(gr, h, ts)
    assert torch.equal(tout, want) and torch.equal(toutb, outb) and rel(ts, s0) < 1e-6


@pytest.mark.parametrize("nb,n_per,H", [(1, 1, 4), (3, 7, 20), (4, 33, 70)])
def test_head_kernels_equal_twins(lib, threads, nb, n_per, H):
    g = torch.Generator().manual_seed(nb * 100 + H)
    x, bias = torch.randn(nb * n_per, H, generator=g), torch.randn(nb, H, generator=g)
    assert torch.equal(ck.bias_relu(x, bias), T.bias_relu(x, bias))
    inplace = x.clone()
    ck.bias_relu(inplace, bias, out=inplace)
    assert torch.equal(inplace, T.bias_relu(x, bias))

    gr, h = torch.randn(nb * n_per, H, generator=g), torch.relu(torch.randn(nb * n_per, H, generator=g))
    s1, s0 = torch.full((nb, H), 0.5), torch.full((nb, H), 0.5)   # accumulates into what is there
    out1, out0 = ck.relu_bwd_segsum(gr, h, s1), T.relu_bwd_segsum(gr, h, s0)
    assert torch.equal(out1, out0)
    assert rel(s1, s0) < 1e-6
    buf = torch.empty_like(gr)
    assert ck.relu_bwd_segsum(gr, h, torch.zeros(nb, H), out=buf) is buf and torch.equal(buf, out0)

    w, b = torch.randn(H + 1, H, generator=g), torch.randn(H + 1, generator=g)
    assert rel(ck.linear_relu(x, w, b), T.linear_relu(x, w, b)) < 1e-6


def test_reductions_are_deterministic(lib):
    """Repeated calls give bitwise equal sums with several threads (partials are added in thread order)."""
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        g = torch.Generator().manual_seed(9)
        gr, h = torch.randn(3000, 64, generator=g), torch.randn(3000, 64, generator=g)
        idx, w = torch.randint(0, 50, (3000, 8), generator=g), torch.rand(3000, 8, generator=g)
        sums = []
        for _ in range(10):
            s = torch.zeros(3, 64)
            ck.relu_bwd_segsum(gr, h, s)
            sums.append((s, ck.scatter_corners_(torch.zeros(50, 64), idx, w, gr)))
        assert all(torch.equal(a, sums[0][0]) and torch.equal(b, sums[0][1]) for a, b in sums)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("M,K,P,C", [(1, 1, 3, 2), (50, 8, 30, 6), (301, 4, 17, 70)])
def test_gather_scatter_equal_twins(lib, threads, M, K, P, C):
    g = torch.Generator().manual_seed(M + C)
    table, idx = torch.randn(P, C, generator=g), torch.randint(0, P, (M, K), generator=g)
    idx[: M // 2] = idx[0, 0]                                       # repeated rows accumulate
    w = torch.rand(M, K, generator=g)
    assert rel(ck.gather_corners(table, idx, w), T.gather_corners(table, idx, w)) < 1e-6
    go = torch.randn(M, C, generator=g)
    a = ck.scatter_corners_(torch.zeros(P, C), idx, w, go)
    b = T.scatter_corners_(torch.zeros(P, C), idx, w, go)
    assert rel(a, b) < 1e-6


@pytest.mark.parametrize("n,C,K,inc", [(1, 1, 1, False), (37, 8, 4, False), (65, 3, 10, True)])
def test_pe_kernels_equal_twins(lib, threads, n, C, K, inc):
    g = torch.Generator().manual_seed(n)
    u = torch.rand(n, C, generator=g) * 4 - 2
    coeff = torch.pi * 2.0 ** torch.arange(K, dtype=torch.float32)
    x0, x00 = ck.pe_fwd(u, coeff, inc), T.pe_fwd(u, coeff, inc)
    assert x0.shape == x00.shape == (n, C * (2 * K + inc))
    assert (x0 - x00).abs().max() < 1e-6                            # vector sin / cos: a few ulp
    g1, g2 = torch.randn(*x0.shape, generator=g), torch.randn(*x0.shape, generator=g)
    for second in (g2, None):
        assert rel(ck.pe_bwd(g1, second, x00, coeff, inc), T.pe_bwd(g1, second, x00, coeff, inc)) < 1e-6


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 5, 6), (2, 3, 2, 3)])
def test_corner_stencil_compiled_equals_pytorch(lib, threads, shape, monkeypatch):
    """Bitwise: same indices and weights, on random, vertex, boundary, outside and NaN coordinates."""
    d = len(shape)
    g = torch.Generator().manual_seed(d)
    x = torch.rand(200, d, generator=g) * 2.6 - 1.3                 # some outside [-1, 1]
    x[:20] = 1.0
    x[20:40] = -1.0
    x[40:60] = (2.0 * torch.randint(0, 2, (20, d), generator=g).float() - 1.0) * 1e6
    x[60, 0] = float("nan")
    x[61:100] = torch.stack([2.0 * torch.randint(0, n, (39,), generator=g).float() / (n - 1) - 1.0
                             for n in reversed(shape)], -1)          # lattice vertices
    idx1, w1 = fast_ops.corner_stencil(x, shape)
    monkeypatch.setattr(ck, "library", lambda: None)
    idx0, w0 = fast_ops.corner_stencil(x, shape)
    assert torch.equal(idx1, idx0)
    assert torch.equal(torch.nan_to_num(w1, nan=7.0), torch.nan_to_num(w0, nan=7.0))
    assert torch.isnan(w1[60]).any()


def test_mark_touched(lib):
    idx = torch.tensor([[0, 3], [3, 5], [7, 7]])
    w = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.0, 0.0]])
    mask, u = ck.mark_touched(idx, w, 8)
    assert u == 3 and mask.tolist() == [True, False, False, True, False, True, False, False]
    mask0, u0 = T.mark_touched(idx, w, 8)
    assert u0 == u and torch.equal(mask0, mask)


def test_wrappers_reject_bad_input(lib):
    with pytest.raises(ValueError, match="contiguous float32"):
        ck.glu_fwd(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="float32"):
        ck.rms_norm_fwd(torch.randn(3, 4, dtype=torch.float64), 1e-6)
    with pytest.raises(IndexError, match="outside"):
        ck.gather_corners(torch.randn(5, 2), torch.tensor([[0, 5]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="shape"):
        ck.scatter_corners_(torch.zeros(5, 2), torch.tensor([[0, 1]]), torch.ones(1, 3), torch.ones(1, 2))


@pytest.fixture
def fresh(monkeypatch):
    """Re-read the environment on the next library() call, and restore the normal state afterwards."""
    ck.reset()
    yield monkeypatch
    monkeypatch.undo()
    ck.reset()


def test_build_into_an_empty_cache_and_reuse(lib, fresh, tmp_path):
    fresh.setenv("DRR_KERNEL_CACHE", str(tmp_path))
    assert ck.library() is not None
    built = sorted(tmp_path.glob("fused_cpu-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
    mtime = built[0].stat().st_mtime_ns
    ck.reset()
    assert ck.library() is not None
    assert sorted(tmp_path.glob("fused_cpu-*.so")) == built and built[0].stat().st_mtime_ns == mtime


def test_missing_compiler_falls_back_with_a_warning(fresh, tmp_path):
    fresh.setenv("DRR_KERNEL_CACHE", str(tmp_path))
    fresh.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="no-such-cc"):
        assert ck.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # warned once only
        assert ck.library() is None
    x = torch.randn(6, 4)
    assert fast_ops._prims(x) is T
    out = fast_ops.vertex_pipeline(x, None, None, torch.randn(3, 4))   # still works, through PyTorch
    assert out.shape == (6, 3)


def test_env_off_disables_silently(fresh):
    fresh.setenv("DRR_CPU_KERNELS", "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.library() is None and not ck.available()
    assert fast_ops._prims(torch.randn(2, 2)) is T


def test_bf16_conversions_match_pytorch():
    """to_bf16 rounds to nearest even: the bits of ``x.to(torch.bfloat16)`` (NaN stays NaN; its payload may
    differ), including ties, infinities, overflow to inf and subnormals; from_bf16 is exact."""
    from models import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("compiled CPU kernels unavailable")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(513, 7, generator=g) * torch.logspace(-30, 30, 7)
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.39e38, float("inf"), -float("inf"),
                         0.0, -0.0])
    x = torch.cat([x.flatten(), ties])
    b = cpu_kernels.to_bf16(x)
    assert torch.equal(b.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert torch.isnan(cpu_kernels.to_bf16(torch.tensor([float("nan")]))).all()
    assert torch.equal(cpu_kernels.from_bf16(b), b.float())
    with pytest.raises(ValueError):
        cpu_kernels.from_bf16(b.float())


def _mlp_reference(gq, s, e, table, bias0, weights, biases, w_out, b_out):
    """The baked decoder as PyTorch operators, in float64 (the kernel's float32 sums are compared with it)."""
    from models.fast_ops import gather_interp
    h = torch.relu(gather_interp(table.double(), *gq.stencil(s, e)) + bias0.double())
    for w, b in zip(weights, biases):
        h = torch.relu(h @ w.double().t() + b.double())
    return h @ w_out.double() + b_out


@pytest.mark.parametrize("q,lat", [((5, 7, 6), (5, 7, 6)), ((9, 13, 11), (5, 7, 6)), ((3, 4, 6), (5, 7, 6)),
                                   ((4, 7), (6, 5)), ((23,), (23,))])
@pytest.mark.parametrize("L", [0, 1, 3])
def test_baked_mlp_equals_composition(lib, threads, q, lat, L):
    """The one-pass baked decoder (gather + bias + ReLU, L hidden layers in the register-blocked products, the
    output layer) equals the PyTorch composition within float32 rounding on the identity, subsampling and
    interpolating lattices, partial blocks and row ranges starting anywhere; two panels of columns and more."""
    from models.fast_ops import GridQuery
    gq = GridQuery(q, lat)
    H = 3 * ck.panel_width()
    g = torch.Generator().manual_seed(L + len(q))
    table = torch.randn(int(torch.tensor(lat).prod()), H, generator=g)
    bias0 = torch.randn(H, generator=g) * 0.3
    weights = [torch.randn(H, H, generator=g) / H ** 0.5 for _ in range(L)]
    biases = [torch.randn(H, generator=g) * 0.3 for _ in range(L)]
    w_out = torch.randn(H, generator=g)
    packed = torch.stack([ck.pack_panels(w) for w in weights]) if L else torch.empty(0, 3, H, ck.panel_width())
    hb = torch.stack(biases) if L else torch.empty(0, H)
    P = gq.num_points
    for s, e in [(0, P), (1, min(P, 29)), (P - 3, P)]:
        out = torch.full((e - s,), float("nan"))
        got = ck.baked_mlp(gq, s, e, table, bias0, packed, hb, w_out, 0.25, out)
        want = _mlp_reference(gq, s, e, table, bias0, weights, biases, w_out, 0.25)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    full = ck.baked_mlp(gq, 0, P, table, bias0, packed, hb, w_out, 0.25, torch.empty(P))
    parts = torch.cat([ck.baked_mlp(gq, s, min(s + 13, P), table, bias0, packed, hb, w_out, 0.25,
                                    torch.empty(min(s + 13, P) - s)) for s in range(0, P, 13)])
    assert torch.equal(full, parts)                       # a row's value does not depend on its block
    # K members (their biases (K, H), results (K, M)): each block's rows gathered once, bitwise K single calls
    biases0 = torch.stack([bias0, -bias0, bias0 * 0.5])
    many = ck.baked_mlp(gq, 1, P, table, biases0, packed, hb, w_out, 0.25, torch.empty(3, P - 1))
    for k in range(3):
        assert torch.equal(many[k], ck.baked_mlp(gq, 1, P, table, biases0[k].contiguous(), packed, hb, w_out, 0.25,
                                                 torch.empty(P - 1)))
    # a bfloat16 table: bitwise the float32 kernel on the table widened
    tb = table.to(torch.bfloat16)
    assert torch.equal(ck.baked_mlp(gq, 0, P, tb, bias0, packed, hb, w_out, 0.25, torch.empty(P)),
                       ck.baked_mlp(gq, 0, P, tb.float(), bias0, packed, hb, w_out, 0.25, torch.empty(P)))


def test_baked_mlp_same_bits_for_any_thread_count(lib):
    from models.fast_ops import GridQuery
    gq = GridQuery((10, 11, 12), (6, 7, 8))
    H = 2 * ck.panel_width()
    g = torch.Generator().manual_seed(1)
    table = torch.randn(6 * 7 * 8, H, generator=g)
    packed = torch.stack([ck.pack_panels(torch.randn(H, H, generator=g) / H ** 0.5) for _ in range(2)])
    args = (table, torch.randn(H, generator=g), packed, torch.randn(2, H, generator=g), torch.randn(H, generator=g),
            -0.5)
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(ck.baked_mlp(gq, 0, gq.num_points, *args, out=torch.empty(gq.num_points)))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_baked_mlp_rejects_bad_input(lib):
    from models.fast_ops import GridQuery
    nr = ck.panel_width()
    gq = GridQuery((4, 5), (4, 5))
    H = nr
    table, bias0, w_out = torch.randn(20, H), torch.randn(H), torch.randn(H)
    packed, hb = torch.stack([ck.pack_panels(torch.randn(H, H))]), torch.randn(1, H)
    with pytest.raises(ValueError, match="not a multiple"):
        ck.pack_panels(torch.randn(nr + 2, 4))
    with pytest.raises(ValueError, match="packed"):                 # packed for another width
        ck.baked_mlp(gq, 0, 20, table, bias0, packed[:, :, :-1].contiguous(), hb, w_out, 0.0, torch.empty(20))
    with pytest.raises(ValueError, match="out"):
        ck.baked_mlp(gq, 0, 20, table, bias0, packed, hb, w_out, 0.0, torch.empty(19))
    with pytest.raises(ValueError, match="out"):                    # two members, results for one
        ck.baked_mlp(gq, 0, 20, table, torch.stack([bias0, bias0]), packed, hb, w_out, 0.0, torch.empty(20))
    with pytest.raises(ValueError, match="rows"):
        ck.baked_mlp(gq, 5, 21, table, bias0, packed, hb, w_out, 0.0, torch.empty(16))
    with pytest.raises(ValueError, match="table"):
        ck.baked_mlp(gq, 0, 20, table.double(), bias0, packed, hb, w_out, 0.0, torch.empty(20))
    with pytest.raises(ValueError, match="table"):                  # a table of another lattice
        ck.baked_mlp(gq, 0, 20, torch.randn(21, H), bias0, packed, hb, w_out, 0.0, torch.empty(20))


@pytest.fixture
def amx(lib):
    if not ck.has_amx():
        pytest.skip("this CPU has no AMX-BF16: baked_mlp_amx returns False and predict_grid keeps PyTorch's "
                    "bf16 products (tested in test_fast_paths)")


def _amx_reference(rows, bias0, weights, biases, w_out, b_out):
    """baked_mlp_amx's arithmetic in PyTorch: bf16 operands, float32 sums, bias / ReLU / output in float32."""
    h = torch.relu(rows.float() + bias0)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = torch.relu(h.bfloat16().double() @ w.bfloat16().double().t() + b.double()).float()
    return h.double() @ w_out.double() + b_out


@pytest.mark.parametrize("M,H,L", [(1, 32, 1), (45, 64, 2), (97, 96, 3), (20, 32, 0), (70, 128, 2), (33, 128, 0)])
def test_baked_mlp_amx_equals_bf16_arithmetic(amx, threads, M, H, L):
    """bf16 products on the AMX tiles: the same values as bf16 operands multiplied exactly and summed in float32
    (up to the sums' order and the bf16 rounding of a layer's input that order can flip), for partial blocks,
    hidden widths of one or more 32-column blocks (128: the kernel's specialised width) and 0-3 hidden layers;
    bitwise the same for any split of the rows."""
    g = torch.Generator().manual_seed(M + H + L)
    rows = torch.randn(M, H, generator=g).to(torch.bfloat16)
    bias0, w_out = torch.randn(H, generator=g) * 0.3, torch.randn(H, generator=g)
    weights = [torch.randn(H, H, generator=g) / H ** 0.5 for _ in range(L)]
    biases = [torch.randn(H, generator=g) * 0.3 for _ in range(L)]
    packed = torch.stack([ck.pack_amx(w) for w in weights]) if L else \
        torch.empty(0, H // 32, H // 16, 16, 16, 2, dtype=torch.bfloat16)
    hb = torch.stack(biases) if L else torch.empty(0, H)
    out = torch.full((M,), float("nan"))
    assert ck.baked_mlp_amx(rows, bias0, packed, hb, w_out, -0.25, out)
    want = _amx_reference(rows, bias0, weights, biases, w_out, -0.25)
    assert float((out.double() - want).norm() / want.norm()) < 2e-4 * max(L, 1)
    if L == 0:                                              # no products: only the float32 output sums' order
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    biases0 = torch.stack([bias0, bias0.flip(0)])               # two members: bitwise two calls
    many = torch.empty(2, M)
    assert ck.baked_mlp_amx(rows, biases0, packed, hb, w_out, -0.25, many)
    assert torch.equal(many[0], out)
    single = torch.empty(M)
    ck.baked_mlp_amx(rows, biases0[1].contiguous(), packed, hb, w_out, -0.25, single)
    assert torch.equal(many[1], single)
    parts = torch.cat([torch.empty(min(s + 7, M) - s) for s in range(0, M, 7)])
    for s in range(0, M, 7):
        e = min(s + 7, M)
        ck.baked_mlp_amx(rows[s:e], bias0, packed, hb, w_out, -0.25, parts[s:e])
    assert torch.equal(parts, out)


def test_baked_mlp_amx_output_activation(amx):
    """The output activation in the kernel (16 rows at a time, a partial group masked): sigmoid within 2 float32
    ulp of torch.sigmoid over outputs from -120 to 120 (the exponent's range reduction and clamps), clamp exactly
    torch's clamp, NaN kept; rows past M untouched."""
    H, M = 32, 37                                     # 16 + 16 + 5 rows: two full groups and a masked one
    rows = torch.zeros(M, H, dtype=torch.bfloat16)
    w_out = torch.zeros(H)
    w_out[0] = 1.0
    empty = torch.empty(0, H // 32, H // 16, 16, 16, 2, dtype=torch.bfloat16)
    for lo, hi in ((-120.0, 120.0), (-4.0, 4.0), (-0.02, 0.02)):
        x = torch.linspace(lo, hi, M)
        for act in ("none", "sigmoid", "clamp"):
            got = torch.full((M + 3,), 7.0)
            for i in range(M):                        # one row per call: out = b_out = x[i] (bias0 0)
                assert ck.baked_mlp_amx(rows[i:i + 1], torch.zeros(H), empty, torch.empty(0, H), w_out,
                                        float(x[i]), got[i:i + 1], activation=act)
            assert torch.equal(got[M:], torch.full((3,), 7.0))
            if act == "none":
                assert torch.equal(got[:M], x)
            elif act == "sigmoid":
                want = torch.sigmoid(x)
                assert ((got[:M] - want).abs() <= 2 * torch.finfo(torch.float32).eps * want.abs().clamp(min=2 ** -126)
                        + 1e-38).all(), (got[:M] - want).abs().max()
            else:
                assert torch.equal(got[:M], x.clamp(0.0, 1.0))
    out = torch.empty(M)
    for act in ("none", "sigmoid", "clamp"):                # a NaN output stays NaN through the activation
        assert ck.baked_mlp_amx(rows, torch.zeros(H), empty, torch.empty(0, H), w_out, float("nan"), out,
                                activation=act)
        assert torch.isnan(out).all(), act
    g = torch.Generator().manual_seed(3)              # many rows at once (partial last group) = one by one
    rows = torch.randn(M, H, generator=g).to(torch.bfloat16)
    w_out = torch.randn(H, generator=g)
    together, alone = torch.empty(M), torch.empty(M)
    ck.baked_mlp_amx(rows, torch.zeros(H), empty, torch.empty(0, H), w_out, 0.1, together, activation="sigmoid")
    for i in range(M):
        ck.baked_mlp_amx(rows[i:i + 1], torch.zeros(H), empty, torch.empty(0, H), w_out, 0.1, alone[i:i + 1],
                         activation="sigmoid")
    assert torch.equal(together, alone)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        ck.baked_mlp_amx(rows, torch.zeros(H), empty, torch.empty(0, H), w_out, 0.1, together, activation="tanh")


def test_baked_mlp_amx_rejects_bad_input(amx):
    H = 32
    rows, v = torch.randn(5, H).to(torch.bfloat16), torch.randn(H)
    packed, hb = torch.stack([ck.pack_amx(torch.randn(H, H))]), torch.randn(1, H)
    with pytest.raises(ValueError, match="multiple of 16"):
        ck.pack_amx(torch.randn(24, 32))
    with pytest.raises(ValueError, match="bfloat16"):
        ck.baked_mlp_amx(rows.float(), v, packed, hb, v, 0.0, torch.empty(5))
    with pytest.raises(ValueError, match="packed"):
        ck.baked_mlp_amx(rows, v, packed.float(), hb, v, 0.0, torch.empty(5))
    with pytest.raises(ValueError, match="out"):
        ck.baked_mlp_amx(rows, v, packed, hb, v, 0.0, torch.empty(4))


@pytest.mark.parametrize("q,lat", [((9, 13, 11), (5, 7, 6)), ((3, 4, 6), (5, 7, 6)), ((4, 7), (6, 5))])
@pytest.mark.parametrize("C", [19, 32])          # 32: the vector body (a multiple of every vector width)
def test_grid_gather_bias_relu_lp_rounds_rows_then_bias(lib, threads, q, lat, C, monkeypatch):
    """bf16 in and out: the float32 corner sum (the float32 kernel's, on the table widened) rounded to bf16, then
    the bf16 bias added in float32 and rounded (PyTorch's bf16 addition), then the ReLU; rows resampled with bias 0
    and no ReLU, then biased by PyTorch, give the same bits; the PyTorch twin agrees within one bf16 rounding."""
    from models.fast_ops import GridQuery
    gq = GridQuery(q, lat)
    g = torch.Generator().manual_seed(len(q) + q[0])
    table = torch.randn(int(torch.tensor(lat).prod()), C, generator=g).to(torch.bfloat16)
    bias = torch.randn(C, generator=g).to(torch.bfloat16)
    P = gq.num_points
    for s, e in [(0, P), (2, min(P, 31))]:
        got = ck.grid_gather_bias_relu(gq, s, e, table, bias, torch.empty(e - s, C, dtype=torch.bfloat16))
        interp = ck.grid_gather_bias_relu(gq, s, e, table.float(), torch.zeros(C), torch.empty(e - s, C), relu=False)
        want = torch.relu(interp.to(torch.bfloat16) + bias)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        rows = ck.grid_gather_bias_relu(gq, s, e, table, torch.zeros(C, dtype=torch.bfloat16),
                                           torch.empty(e - s, C, dtype=torch.bfloat16), relu=False)
        assert torch.equal(torch.relu(rows + bias), got)
        assert torch.equal(gq.gather_bias_relu(table, s, e, bias, torch.empty(e - s, C, dtype=torch.bfloat16)), got)
    with pytest.raises(ValueError, match="bfloat16"):
        ck.grid_gather_bias_relu(gq, 0, P, table.float(), bias, torch.empty(P, C, dtype=torch.bfloat16))
    full = gq.gather_bias_relu(table, 0, P, bias, torch.empty(P, C, dtype=torch.bfloat16))
    monkeypatch.setattr(ck, "library", lambda: None)           # the PyTorch twin: the sum in another order
    twin = gq.gather_bias_relu(table, 0, P, bias, torch.empty(P, C, dtype=torch.bfloat16))
    torch.testing.assert_close(twin.float(), full.float(), rtol=2 ** -7, atol=2 ** -7)   # values O(1)


def _same(a, b):
    """Equal values with NaN in the same places (the sign of a zero aside)."""
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _with_nans(x, seed):
    """x with a few entries NaN (both signs: x86's default NaN has the sign bit set), -0 and 0."""
    x = x.clone().reshape(-1)
    idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:8]
    x[idx[:2]] = float("nan")
    x[idx[2:4]] = -float("nan")
    x[idx[4:6]] = -0.0
    x[idx[6:]] = 0.0
    return x


def test_relu_kernels_keep_nan_as_torch(lib, threads):
    """Every compiled ReLU keeps a NaN as torch.relu does (a NaN weight or grid value must surface, not turn into
    0), and the backward masks pass a NaN's gradient as threshold_backward does: training kernels against their
    twins, the baked decoders (fp32 and bf16 on AMX) against the PyTorch composition, NaN of either sign."""
    g = torch.Generator().manual_seed(7)
    n, H = 9, 20
    ab = _with_nans(torch.randn(n, 2 * H, generator=g), 1).reshape(n, 2 * H)
    gh = torch.randn(n, H, generator=g)
    assert _same(ck.glu_fwd(ab), T.glu_fwd(ab)) and torch.isnan(T.glu_fwd(ab)).any()
    (gab, h), (gab0, h0) = ck.glu_bwd(gh, ab), T.glu_bwd(gh, ab)
    assert _same(gab, gab0) and _same(h, h0)
    x, bias = _with_nans(torch.randn(n * 3, H, generator=g), 2).reshape(n * 3, H), torch.randn(3, H, generator=g)
    assert _same(ck.bias_relu(x, bias), T.bias_relu(x, bias)) and torch.isnan(T.bias_relu(x, bias)).sum() == 4
    out, outb = ck.bias_relu_lp(x, bias)
    assert _same(out, T.bias_relu(x, bias)) and _same(outb, out.to(torch.bfloat16))
    gr, hh = torch.randn(n * 3, H, generator=g), _with_nans(torch.randn(n * 3, H, generator=g), 3).reshape(n * 3, H)
    s1, s0 = torch.zeros(3, H), torch.zeros(3, H)
    assert _same(ck.relu_bwd_segsum(gr, hh, s1), T.relu_bwd_segsum(gr, hh, s0)) and rel(s1, s0) < 1e-6

    from models.fast_ops import GridQuery
    gq = GridQuery((9, 13, 11), (5, 7, 6))                 # interpolating: a NaN row reaches its neighbours
    Hm = 2 * ck.panel_width()
    table = torch.randn(5 * 7 * 6, Hm, generator=g)
    table[17, 3], table[100, 0] = float("nan"), -float("nan")
    bias0 = torch.randn(Hm, generator=g) * 0.3
    rows = torch.empty(gq.num_points, Hm)
    ck.grid_gather_bias_relu(gq, 0, gq.num_points, table, bias0, rows)
    want_rows = torch.relu(fast_ops.gather_interp(table, *gq.stencil(0, gq.num_points)) + bias0)
    assert _same(rows, want_rows) and torch.isnan(want_rows).any()
    w = torch.randn(Hm, Hm, generator=g) / Hm ** 0.5
    w_out = torch.randn(Hm, generator=g)
    got = ck.baked_mlp(gq, 0, gq.num_points, table, bias0, torch.stack([ck.pack_panels(w)]),
                       torch.zeros(1, Hm), w_out, 0.0, torch.empty(gq.num_points))
    want = _mlp_reference(gq, 0, gq.num_points, table, bias0, [w], [torch.zeros(Hm)], w_out, 0.0)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and 0 < int(torch.isnan(want).sum()) < gq.num_points
    if ck.has_amx():
        M, Ha = 50, 32
        r = torch.randn(M, Ha, generator=g)
        r[3, 5], r[40, 0] = float("nan"), -float("nan")
        wa = torch.randn(Ha, Ha, generator=g) / Ha ** 0.5
        for L in (0, 1):
            out = torch.empty(M)
            packed = torch.stack([ck.pack_amx(wa)])[:L]
            assert ck.baked_mlp_amx(r.to(torch.bfloat16), torch.zeros(Ha), packed, torch.zeros(L, Ha),
                                    torch.ones(Ha), 0.0, out)
            want = torch.isnan(torch.zeros(M).index_fill_(0, torch.tensor([3, 40]), float("nan")))
            assert torch.equal(torch.isnan(out), want), (L, torch.isnan(out).nonzero())
