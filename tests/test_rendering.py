"""rendering/: camera rays, slab test, occupancy-grid estimator and volume rendering against hand values, closed
forms and brute-force twins (spec vision 3.1, 3.4)."""
import math

import numpy as np
import pytest
import torch

from rendering import (OccupancyGrid, blender_focal, camera_rays, camera_rays_reference, exclusive_sum_packed,
                       image_rays, march_reference, ray_aabb_intersect, ray_aabb_intersect_reference, ray_nears,
                       render_rays, render_weight_from_density, render_weight_reference, rendering,
                       rendering_reference)
from rendering.nerfacc_backend import nerfacc_status
from rendering.volume import render_visibility_from_density


def _random_rays(n, seed, dtype=torch.float64, radius=4.0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, 3, generator=g, dtype=dtype)
    o = o / o.norm(dim=-1, keepdim=True) * radius
    d = torch.randn(n, 3, generator=g, dtype=dtype) * spread - o
    return o, d / d.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------- cameras
def test_focal_by_hand():
    assert blender_focal(800, math.pi / 2) == pytest.approx(400.0)  # tan(pi/4) = 1
    assert blender_focal(64, 2 * math.atan(0.5)) == pytest.approx(64.0)
    with pytest.raises(ValueError, match="camera_angle_x"):
        blender_focal(64, 0.0)


def test_ray_directions_of_known_cameras_by_hand():
    # identity camera, W=4, H=2, f=2: pixel (0, 0) -> ((0.5 - 2) / 2, -(0.5 - 1) / 2, -1) = (-0.75, 0.25, -1)
    eye = torch.eye(4)
    o, d = camera_rays(eye, torch.tensor([0, 3]), torch.tensor([0, 1]), 4, 2, 2.0)
    n = math.sqrt(0.75 ** 2 + 0.25 ** 2 + 1)
    assert torch.allclose(d[0], torch.tensor([-0.75, 0.25, -1.0]) / n, atol=1e-7)
    # pixel (3, 1) -> ((3.5 - 2) / 2, -(1.5 - 1) / 2, -1) = (0.75, -0.25, -1)
    assert torch.allclose(d[1], torch.tensor([0.75, -0.25, -1.0]) / n, atol=1e-7)
    assert torch.equal(o, torch.zeros(2, 3))
    # rotated 90 degrees about z and translated: camera x -> world y, camera y -> world -x
    c2w = torch.tensor([[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0]])
    o, d = camera_rays(c2w, torch.tensor([0]), torch.tensor([0]), 4, 2, 2.0)
    assert torch.allclose(o[0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(d[0], torch.tensor([-0.25, -0.75, -1.0]) / n, atol=1e-7)
    # the central ray of an even-sized image passes between pixels: straight down -z for the identity camera
    o, d = camera_rays(eye, torch.tensor([1, 2]), torch.tensor([0, 1]), 4, 2, 1e9)
    assert torch.allclose(d, torch.tensor([[0.0, 0.0, -1.0]] * 2), atol=1e-6)


def test_image_rays_match_reference_loop():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    c2w = torch.cat([q, torch.randn(3, 1, generator=g, dtype=torch.float64)], dim=1)
    W, H, f = 5, 3, 4.2
    o, d = image_rays(c2w, W, H, f)
    assert o.shape == d.shape == (H, W, 3)
    for y in range(H):
        for x in range(W):
            ro, rd = camera_rays_reference(c2w.tolist(), x, y, W, H, f)
            assert np.allclose(o[y, x].numpy(), ro, atol=1e-12) and np.allclose(d[y, x].numpy(), rd, atol=1e-12)
    # one c2w per ray (the training batches) gives the same rays
    o2, d2 = camera_rays(c2w.expand(2, 3, 4), torch.tensor([2, 4]), torch.tensor([1, 0]), W, H, f)
    assert torch.allclose(d2[0], d[1, 2]) and torch.allclose(d2[1], d[0, 4])


# ------------------------------------------------------------------------------------------------ slab
def test_aabb_intersection_by_hand():
    box = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    s = 1 / math.sqrt(2)
    o = torch.tensor([[-3.0, 0, 0], [0, 0, 0], [-3.0, 2, 0], [-2.0, -2, 0], [-3.0, 1, 0], [3.0, 0, 0]],
                     dtype=torch.float64)
    d = torch.tensor([[1.0, 0, 0], [0, 0, 1], [1.0, 0, 0], [s, s, 0], [1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    t0, t1, hit = ray_aabb_intersect(o, d, box)
    assert hit.tolist() == [True, True, False, True, True, False]  # last: box behind the origin
    assert t0[0] == pytest.approx(2.0) and t1[0] == pytest.approx(4.0)
    assert t0[1] == 0.0 and t1[1] == pytest.approx(1.0)  # origin inside: clipped at near = 0
    assert t0[3] == pytest.approx(math.sqrt(2)) and t1[3] == pytest.approx(3 * math.sqrt(2))
    assert t0[4] == pytest.approx(2.0) and t1[4] == pytest.approx(4.0)  # along the face y = 1 (closed box)
    t0, t1, hit = ray_aabb_intersect(o[:1], d[:1], box, near=2.5, far=3.0)
    assert (float(t0), float(t1), bool(hit)) == (2.5, 3.0, True)
    _, _, hit = ray_aabb_intersect(o[:1], d[:1], box, near=0.0, far=1.5)
    assert not bool(hit)


def test_aabb_intersection_matches_reference():
    o, d = _random_rays(300, 1, spread=1.5)
    d[::7, 1] = 0.0  # axis-parallel components
    box = torch.tensor([-1.0, -0.5, -0.8, 1.2, 0.7, 0.9], dtype=torch.float64)
    t0, t1, hit = ray_aabb_intersect(o, d, box, near=0.5, far=7.0)
    for i in range(len(o)):
        r0, r1, rh = ray_aabb_intersect_reference(o[i].tolist(), d[i].tolist(), box.tolist(), 0.5, 7.0)
        assert bool(hit[i]) == rh
        assert float(t0[i]) == pytest.approx(r0, abs=1e-12) and float(t1[i]) == pytest.approx(r1, abs=1e-12)
    assert 0 < int(hit.sum()) < len(o)


# ---------------------------------------------------------------------------------------------- volume
def _packed(seed, n_rays=7):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 9, (n_rays,), generator=g)
    counts[2] = 0  # a ray without samples
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), counts)
    S = len(ray_indices)
    dt = torch.rand(S, generator=g, dtype=torch.float64) * 0.2 + 0.01
    t_starts = torch.rand(S, generator=g, dtype=torch.float64)
    sigmas = torch.rand(S, generator=g, dtype=torch.float64) * 6
    rgbs = torch.rand(S, 3, generator=g, dtype=torch.float64)
    return ray_indices, t_starts, t_starts + dt, sigmas, rgbs, n_rays


def test_exclusive_sum_by_hand():
    v = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 5.0])
    ri = torch.tensor([0, 0, 0, 2, 2, 3])
    assert exclusive_sum_packed(v, ri, 4).tolist() == [0.0, 1.0, 3.0, 0.0, 10.0, 0.0]


def test_weights_match_reference_and_sum_to_opacity():
    ri, ts, te, sg, rgb, n = _packed(0)
    w, tr, al = render_weight_from_density(ts, te, sg, ri, n)
    rw, rtr, ral = render_weight_reference(ts.tolist(), te.tolist(), sg.tolist(), ri.tolist())
    assert np.allclose(w.numpy(), rw, atol=1e-12) and np.allclose(tr.numpy(), rtr, atol=1e-12)
    assert np.allclose(al.numpy(), ral, atol=1e-12)
    colors, opac, depth, extras = rendering(ts, te, ri, n, lambda a, b, c: (rgb, sg),
                                            render_bkgd=torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    rc, ro, rd = rendering_reference(ts.tolist(), te.tolist(), sg.tolist(), rgb.tolist(), ri.tolist(), n,
                                     (1.0, 0.5, 0.0))
    assert np.allclose(colors.numpy(), rc, atol=1e-12) and np.allclose(opac[:, 0].numpy(), ro, atol=1e-12)
    assert np.allclose(depth[:, 0].numpy(), rd, atol=1e-12)
    # sum of weights = opacity = 1 - exp(-sum sigma dt) <= 1 per ray; a ray without samples shows the background
    tau = torch.zeros(n, dtype=torch.float64).index_add(0, ri, sg * (te - ts))
    assert torch.allclose(opac[:, 0], 1 - torch.exp(-tau), atol=1e-12)
    assert bool((opac <= 1).all()) and float(opac[2]) == 0.0
    assert colors[2].tolist() == [1.0, 0.5, 0.0]


def test_constant_density_slab_closed_form():
    # ray along +x through a slab x in [-0.5, 0.5] of density sigma inside a fully occupied grid: the lattice
    # t_k = k dt puts the slab faces (t = 0.7, 1.7) on lattice points, so the transmittance after the slab is
    # exactly exp(-sigma L), L = 1
    sigma, dt = 2.0, 5e-3
    grid = OccupancyGrid(resolution=8).double()
    grid.binaries.fill_(True)
    o = torch.tensor([[-1.2, 0.1, 0.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)

    def field(x, _d):
        inside = (x[:, 0].abs() <= 0.5).double()
        return torch.full_like(x, 0.25), sigma * inside

    out = render_rays(grid, o, d, field, render_step_size=dt, early_stop_eps=0.0,
                      render_bkgd=torch.zeros(3, dtype=torch.float64))
    assert float(out["opacities"]) == pytest.approx(1 - math.exp(-sigma * 1.0), abs=1e-9)
    assert out["colors"][0].tolist() == pytest.approx([0.25 * (1 - math.exp(-sigma))] * 3, abs=1e-9)
    # the origin is inside the box [-1.5, 1.5]^3: samples from t = 0 to the exit t = 2.7
    assert int(out["n_samples"]) == round(2.7 / dt)
    # expected termination depth of the slab by hand: 0.7 + E[s | s < 1] for an exponential(sigma) distance s
    mean = 1 / sigma - math.exp(-sigma) / (1 - math.exp(-sigma))
    assert float(out["depths"]) == pytest.approx(0.7 + mean, abs=dt)


def test_visibility_early_stop_by_hand():
    # one ray, 4 samples of tau = 3.5 each: exclusive T = 1, e^-3.5, e^-7 (9e-4), e^-10.5 (2.8e-5): eps 1e-4
    # keeps the first three
    ts = torch.arange(4, dtype=torch.float64)
    keep = render_visibility_from_density(ts, ts + 1, torch.full((4,), 3.5, dtype=torch.float64),
                                          torch.zeros(4, dtype=torch.long), 1, early_stop_eps=1e-4)
    assert keep.tolist() == [True, True, True, False]
    # alpha_thre 0.5 also drops the first sample (alpha 1 - e^-0.01); T stays above 1e-4 for the fourth
    keep = render_visibility_from_density(ts, ts + 1, torch.tensor([0.01, 3.5, 3.5, 3.5], dtype=torch.float64),
                                          torch.zeros(4, dtype=torch.long), 1, early_stop_eps=1e-4, alpha_thre=0.5)
    assert keep.tolist() == [False, True, True, True]


# ------------------------------------------------------------------------------------------- estimator
def _ball_grid(R=24, radius=0.6, centre=(0.2, -0.1, 0.15)):
    grid = OccupancyGrid(resolution=R).double()
    c = torch.tensor(centre, dtype=torch.float64)
    grid.update(0, lambda x: ((x - c).norm(dim=-1) < radius).double() * 0.5,
                generator=torch.Generator().manual_seed(0))
    return grid


@pytest.mark.parametrize("stratified", [False, True])
def test_march_matches_brute_force_marcher(stratified):
    grid = _ball_grid()
    assert 0 < int(grid.binaries.sum()) < grid.num_cells
    o, d = _random_rays(150, 2)
    o[:10] = 0.05 * o[:10]  # origins inside the box
    nears = ray_nears(len(o), 0.3, 5e-3, stratified, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ri, ts, te = grid.march(o, d, near_plane=0.3, far_plane=5.0, render_step_size=5e-3, stratified=stratified,
                            generator=torch.Generator().manual_seed(4), max_candidates=3000)
    rr, rts, rte = march_reference(grid.binaries.numpy(), grid.aabb.tolist(), o.numpy(), d.numpy(), nears.numpy(),
                                   5.0, 5e-3)
    assert len(rr) > 1000
    assert np.array_equal(ri.numpy(), rr)
    assert np.allclose(ts.numpy(), rts, atol=1e-12) and np.allclose(te.numpy(), rte, atol=1e-12)


def test_estimator_matches_dense_marcher_on_known_density():
    # a soft ball of density up to 60 and a view-independent color; the grid is marked by a slightly larger ball,
    # so occupancy skipping loses nothing and only the early stop (T < 1e-4) differs from marching every lattice
    # interval through the box
    c = torch.tensor([0.2, -0.1, 0.15], dtype=torch.float64)

    def density(x):
        r = (x - c).norm(dim=-1)
        return 60.0 * torch.clamp((0.6 - r) / 0.1, 0, 1)

    def field(x, _d):
        return torch.stack([x[:, 0] * 0.3 + 0.5, torch.sigmoid(x[:, 1] * 3), (x[:, 2] + 1.5) / 3], dim=-1), density(x)

    grid = OccupancyGrid(resolution=24).double()
    grid.update(0, lambda x: ((x - c).norm(dim=-1) < 0.75).double(), generator=torch.Generator().manual_seed(0))
    o, d = _random_rays(60, 3)
    bkgd = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    out = render_rays(grid, o, d, field, density, render_step_size=5e-3, render_bkgd=bkgd)
    # brute force: every lattice interval of every ray from t = 0 through the box, rendered by the loop twin
    full = np.ones((24, 24, 24), dtype=bool)
    rr, rts, rte = march_reference(full, grid.aabb.tolist(), o.numpy(), d.numpy(), np.zeros(len(o)), 1e10, 5e-3)
    ri = torch.from_numpy(rr)
    x = o[ri] + d[ri] * torch.from_numpy((rts + rte) / 2)[:, None]
    rgb, sg = field(x, None)
    rc, ro, _ = rendering_reference(rts.tolist(), rte.tolist(), sg.tolist(), rgb.tolist(), rr.tolist(), len(o))
    assert np.allclose(out["colors"].numpy(), rc, atol=2e-4)
    assert np.allclose(out["opacities"][:, 0].numpy(), ro, atol=2e-4)
    opaque = np.asarray(ro) > 0.999
    assert 10 < opaque.sum() < len(o)  # some rays hit the ball, some miss
    assert int(out["n_samples"]) < len(rr) / 5  # the estimator skipped empty space and occluded samples


def test_update_schedule_and_warmup():
    R = 6
    grid = OccupancyGrid(resolution=R).double()
    calls = []

    def occ_fn(x):
        calls.append(x.clone())
        return torch.full((len(x), 1), 0.02, dtype=x.dtype)

    assert not grid.update_every_n_steps(5, occ_fn)  # only every 16th step
    assert calls == [] and float(grid.occs.sum()) == 0.0
    assert grid.update_every_n_steps(32, occ_fn, generator=torch.Generator().manual_seed(0))
    # warm-up (step < 256): every cell once, at a point inside that cell
    x = calls[0]
    assert x.shape == (R ** 3, 3)
    cell = torch.floor((x + 1.5) / 3.0 * R).long()
    flat = (cell[:, 0] * R + cell[:, 1]) * R + cell[:, 2]
    assert torch.equal(torch.sort(flat).values, torch.arange(R ** 3))
    assert torch.allclose(grid.occs, torch.full((R ** 3,), 0.02, dtype=torch.float64))
    assert bool(grid.binaries.all())  # 0.02 > min(mean 0.02, 0.01)
    grid.eval()
    with pytest.raises(RuntimeError, match="training"):
        grid.update_every_n_steps(0, occ_fn)


def test_ema_update_semantics_by_hand():
    R = 8
    grid = OccupancyGrid(resolution=R).double()
    g = torch.Generator().manual_seed(1)
    old = torch.rand(R ** 3, generator=g, dtype=torch.float64) * 0.005
    old[:40] = 0.5  # 40 clearly occupied cells
    grid.occs.copy_(old)
    grid.binaries.copy_((old > min(float(old.mean()), 0.01)).reshape(R, R, R))
    n_occ = int(grid.binaries.sum())
    seen = []

    def occ_fn(x):
        seen.append(x)
        return 0.3 * torch.sigmoid(5 * x[:, 0])  # depends on the point

    grid.update(256, occ_fn, generator=torch.Generator().manual_seed(2))  # after warm-up
    x = seen[0]
    # R^3 // 4 uniform cells plus all occupied cells (fewer than R^3 // 4 here)
    assert len(x) == R ** 3 // 4 + n_occ
    cell = torch.floor((x + 1.5) / 3.0 * R).long()
    flat = (cell[:, 0] * R + cell[:, 1]) * R + cell[:, 2]
    new = occ_fn(x)
    expect = old.clone()
    drawn = set(flat.tolist())
    for c in drawn:  # a cell drawn more than once keeps its largest new value
        best = float(new[flat == c].max())
        expect[c] = max(0.95 * float(old[c]), best)
    assert torch.allclose(grid.occs, expect, atol=1e-15)
    untouched = torch.tensor([c not in drawn for c in range(R ** 3)])
    assert bool(untouched.any()) and torch.equal(grid.occs[untouched], old[untouched])  # no decay when not drawn
    thre = min(float(expect.mean()), 0.01)
    assert torch.equal(grid.binaries.reshape(-1), expect > thre)


def test_threshold_is_the_mean_when_below_occ_thre():
    R = 4
    grid = OccupancyGrid(resolution=R).double()
    vals = torch.zeros(R ** 3, dtype=torch.float64)
    vals[:4] = 0.004  # mean 2.5e-4 < 0.01: threshold = the mean
    grid.update(0, lambda x: vals[((torch.floor((x + 1.5) / 3.0 * R).long() * torch.tensor([R * R, R, 1])).sum(-1))])
    assert int(grid.binaries.sum()) == 4
    grid2 = OccupancyGrid(resolution=R).double()
    grid2.update(0, lambda x: torch.full((len(x),), 0.004, dtype=x.dtype))
    assert not bool(grid2.binaries.any())  # 0.004 > min(0.004, 0.01) is false


def test_sampling_empty_grid_and_float32():
    grid = OccupancyGrid(resolution=8)
    o, d = _random_rays(5, 0, dtype=torch.float32)
    ri, ts, te = grid.sampling(o, d, sigma_fn=lambda a, b, c: torch.ones_like(a))
    assert ri.numel() == ts.numel() == te.numel() == 0
    grid.binaries.fill_(True)
    ri, ts, te = grid.sampling(o, d, sigma_fn=lambda a, b, c: torch.zeros_like(a), render_step_size=0.05)
    assert ts.dtype == torch.float32 and ri.numel() > 0 and bool((ri[1:] >= ri[:-1]).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path was not checked")
def test_cuda_matches_cpu():
    grid = _ball_grid()
    o, d = _random_rays(100, 5)
    a = grid.march(o, d)
    b = grid.cuda().march(o.cuda(), d.cuda())
    assert torch.equal(a[0], b[0].cpu()) and torch.allclose(a[1], b[1].cpu(), atol=1e-9)


@pytest.mark.skipif(not nerfacc_status()[0], reason=nerfacc_status()[1])
def test_nerfacc_backend_agrees():
    grid = _ball_grid().float().cuda()
    o, d = _random_rays(200, 6, dtype=torch.float32)
    o, d = o.cuda(), d.cuda()

    def field(x, _d):
        return torch.sigmoid(x * 2), 30.0 * ((x - x.new_tensor([0.2, -0.1, 0.15])).norm(dim=-1) < 0.5).float()

    a = render_rays(grid, o, d, field, backend="torch", render_bkgd=torch.ones(3, device="cuda"))
    b = render_rays(grid, o, d, field, backend="nerfacc", render_bkgd=torch.ones(3, device="cuda"))
    assert abs(int(a["n_samples"]) - int(b["n_samples"])) <= 0.002 * int(a["n_samples"]) + 5
    assert torch.allclose(a["colors"], b["colors"], atol=1e-2)
