"""models/nerf.py grid radiance fields (NGP, MRGrid, TriPlane, Dense, with and without DRR): parameter counts of
spec vision 3.3, density / color semantics by hand, bake equivalence, one refinement per training step (spy),
and the NeRF configs (configs/nerf/*.yaml) with their wrappers."""
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

import tasks.nerf.task  # noqa: F401  (registers the "nerf" task)
from models.nerf import (PAPER_NERF_MODELS, DenseDRRRadianceField, DenseRadianceField, MRGridDRRRadianceField,
                         MRGridRadianceField, NGPRadianceField, TriPlaneDRRRadianceField, TriPlaneRadianceField,
                         spherical_harmonics_deg4, trunc_exp)
from tasks.nerf.task import NeRFTask
from util.registry import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _count(params):
    return sum(p.numel() for p in params)


def _glu(D, hidden, blocks):
    """Parameters of a GLU refiner: per block RMSNorm scale D + W1, W2 (D x hidden) + W3 (hidden x D)."""
    return blocks * (D + 3 * D * hidden)


# -------------------------------------------------------------------------------------- parameter counts
# density MLP D -> 64 -> 16 and color head (16 SH + 15) -> 64 -> 64 -> 3, all without biases (spec 3.2)
def _heads(D):
    return D * 64 + 64 * 16 + 31 * 64 + 64 * 64 + 64 * 3


def test_paper_parameter_counts_match_spec():
    torch.manual_seed(0)
    m = MRGridDRRRadianceField()
    g = m.param_groups()
    assert _count(g["spatial_grids"]) == 16 * (16 ** 3 + 32 ** 3 + 64 ** 3 + 96 ** 3)
    assert round(_count(g["spatial_grids"]) / 1e6, 2) == 18.94                  # spec: 18.94M
    assert _count(g["spatial_refiner"]) == _glu(64, 512, 4)
    assert round(_count(g["spatial_refiner"]) / 1e6, 2) == 0.39                 # spec: +0.39M
    assert _count(g["heads"]) == _heads(64)
    assert _count(m.parameters()) == _count(g["spatial_grids"]) + _count(g["spatial_refiner"]) + _heads(64)
    plain = MRGridRadianceField()
    assert _count(plain.parameters()) == 16 * (16 ** 3 + 32 ** 3 + 64 ** 3 + 96 ** 3) + _heads(64)
    del m, plain

    m = TriPlaneDRRRadianceField()
    g = m.param_groups()
    assert _count(g["planes"]) == 3 * 48 * 256 ** 2 and round(_count(g["planes"]) / 1e6, 2) == 9.44
    assert _count(g["spatial_refiner"]) == 3 * _glu(48, 384, 4)
    assert round(_count(g["spatial_refiner"]) / 1e6, 2) == 0.66                 # spec: +0.66M
    assert _count(TriPlaneRadianceField().parameters()) == 3 * 48 * 256 ** 2 + _heads(48)
    del m

    m = DenseDRRRadianceField()
    g = m.param_groups()
    assert _count(g["spatial_grids"]) == 16 * 128 ** 3 and round(_count(g["spatial_grids"]) / 1e6, 2) == 33.55
    assert _count(g["spatial_refiner"]) == _glu(16, 128, 4) == 24_640           # spec: +24.6k
    del m
    assert _count(DenseRadianceField().parameters()) == 16 * 128 ** 3 + _heads(16)

    ngp = NGPRadianceField()
    # tcnn level sizes: scale_l = 16 b^l - 1, res_l = ceil(scale_l) + 1, min(res^3, 2^19) entries x 2 features
    b = math.exp((math.log(4096) - math.log(16)) / 15)
    assert abs(b - 1.4473) < 1e-4
    entries = sum(min((math.ceil(16 * b ** lv - 1) + 1) ** 3, 1 << 19) for lv in range(16))
    assert _count(ngp.param_groups()["hash_grid"]) == 2 * entries
    assert round(2 * entries / 1e6, 1) == 12.6                                  # spec: ~12.6M
    assert _count(ngp.param_groups()["heads"]) == _heads(32)


# ------------------------------------------------------------------------------------------ semantics
def test_trunc_exp_value_and_clamped_gradient():
    x = torch.tensor([0.0, 1.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    assert torch.allclose(y, torch.exp(x.detach()))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.exp(torch.tensor([0.0, 1.0, 15.0])))


def test_spherical_harmonics_are_orthonormal():
    n = 20000
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n                                        # Fibonacci sphere: uniform quadrature
    phi = i * math.pi * (3 - math.sqrt(5))
    r = torch.sqrt(1 - z * z)
    d = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    Y = spherical_harmonics_deg4(d)
    gram = Y.t() @ Y * (4 * math.pi / n)
    assert Y.shape == (n, 16)
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=2e-3)


def _small(cls, **kw):
    torch.manual_seed(0)
    base = dict(aabb=[-1, -1, -1, 1, 1, 1], mlp_width=8, geo_features=3, color_width=8)
    return cls(**{**base, **kw})


def test_inside_box_strict_for_grids_inclusive_for_ngp():
    pts = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.2, 0.0, 0.0]])
    ngp = _small(NGPRadianceField, levels=2, log2_hashmap_size=8, max_resolution=32)
    grid = _small(MRGridRadianceField, resolutions=[4], channels=2)
    s_ngp, s_grid = ngp.density(pts), grid.density(pts)
    assert s_ngp[0] > 0 and s_ngp[1] > 0 and s_ngp[2] == 0         # on the box face: inside (inclusive)
    assert s_grid[0] == 0 and s_grid[1] > 0 and s_grid[2] == 0      # on the box face: outside (strict)
    # density = trunc_exp(s - 1) with s the first output of the density MLP
    with torch.no_grad():
        u = (pts[1:2] + 1) / 2 * 2 - 1
        s = grid.density_mlp(grid.features(u))[:, 0]
    assert torch.allclose(s_grid[1:2], torch.exp(s - 1))


def test_triplane_plane_axes_and_sum():
    m = _small(TriPlaneRadianceField, resolution=5, channels=1)
    with torch.no_grad():
        for p in m.planes:
            p.zero_()
        m.planes[0][0] = torch.linspace(0, 1, 5)[None, :]          # plane 0 (y, z): y along the width axis
        m.planes[2][0] = 10 * torch.linspace(0, 1, 5)[:, None]     # plane 2 (x, y): y along the height axis
    u = torch.tensor([[0.3, -0.5, 0.7], [-0.9, 0.5, 0.1]])          # normalized [-1, 1] points (x, y, z)
    f = m.features(u)[:, 0]
    y01 = (u[:, 1] + 1) / 2
    assert torch.allclose(f, y01 + 10 * y01, atol=1e-6)


def test_dense_drr_refines_its_own_lattice_by_hand():
    m = _small(DenseDRRRadianceField, resolution=[3, 4, 5], channels=2, refiner_layers=1, hidden_mult=2.0)
    m.eval()
    g = m.spatial_grids.grids[0].detach()                            # (C, D, H, W)
    k, j, i = 1, 2, 3
    u = torch.tensor([[2 * i / 4 - 1, 2 * j / 3 - 1, 2 * k / 2 - 1]])    # that vertex (column 0 = W axis)
    v = g[:, k, j, i]
    with torch.no_grad():
        expect = v + m.spatial_refiner(v)
        assert torch.allclose(m.features(u)[0], expect, atol=1e-6)


def test_mrgrid_drr_refines_the_super_resolved_levels_by_hand():
    m = _small(MRGridDRRRadianceField, resolutions=[2, 3], channels=2, refiner_layers=2, hidden_mult=1.0)
    m.eval()
    g0, g1 = (t.detach() for t in m.spatial_grids.grids)
    u = torch.tensor([[0.0, -1.0, 1.0]])                              # vertex (k=2, j=0, i=1) of the 3^3 lattice
    v0 = g0[:, 1, 0, :].mean(-1)                                     # 2^3 level at z=+1, y=-1, x=0: mean of x ends
    v = torch.cat([v0, g1[:, 2, 0, 1]])
    with torch.no_grad():
        assert torch.allclose(m.features(u)[0], v + m.spatial_refiner(v), atol=1e-6)


@pytest.mark.parametrize("cls,kw", [
    (MRGridDRRRadianceField, dict(resolutions=[3, 5], channels=2, refiner_layers=2, hidden_mult=2.0)),
    (TriPlaneDRRRadianceField, dict(resolution=6, channels=3, refiner_layers=2, hidden_mult=2.0)),
    (DenseDRRRadianceField, dict(resolution=5, channels=2, refiner_layers=1, hidden_mult=2.0)),
])
def test_bake_equals_plain_evaluation(cls, kw):
    m = _small(cls, bake_chunk=7, **kw)                              # chunks that do not divide the lattice
    with torch.no_grad():
        for p in m.parameters():                                      # break the tiny init's symmetry
            p.add_(0.3 * torch.randn_like(p))
    m.eval()
    x = torch.rand(50, 3) * 2.2 - 1.1
    d = F.normalize(torch.randn(50, 3), dim=-1)
    with torch.no_grad():
        rgb0, s0 = m.rgb_sigma(x, d)
    calls = _spy(m)
    m.bake()
    assert len(calls) == 1
    with torch.no_grad():
        rgb1, s1 = m.rgb_sigma(x, d)
        out = m(x[None], torch.zeros(1, 0), d[None])[0]
    assert m.is_baked and len(calls) == 1                            # baked queries never refine
    assert torch.allclose(rgb0, rgb1, atol=1e-5) and torch.allclose(s0, s1, rtol=1e-4, atol=1e-6)
    assert torch.allclose(out, torch.cat([rgb1, s1[:, None]], -1))
    m.train()
    assert not m.is_baked


# ------------------------------------------------------------------------- one refinement per training step
def _refiners(m):
    return list(m.refiners) if hasattr(m, "refiners") else [m.spatial_refiner]


def _spy(m):
    """Count the model's lattice refinements (every refiner over the whole lattice = one call)."""
    calls = []
    inner = m._refined_lattices

    def counted(*a, **k):
        calls.append(torch.is_grad_enabled())
        return inner(*a, **k)

    m._refined_lattices = counted
    return calls


class RayData:
    """Rays down -z through the box, gray targets."""

    init_rays = 16
    n_test = 1

    def sample_batch(self, step, rank=0, n_rays=None):
        n = n_rays or self.init_rays
        g = torch.Generator().manual_seed(step)
        xy = torch.rand(n, 2, generator=g) * 1.6 - 0.8
        o = torch.cat([xy, torch.full((n, 1), 3.0)], -1)
        d = torch.tensor([0.0, 0.0, -1.0]).expand(n, 3).contiguous()
        return {"rays_o": o, "rays_d": d, "rgb": torch.full((n, 3), 0.5)}

    def view(self, i):
        b = self.sample_batch(0, n_rays=4)
        return {k: v.reshape(2, 2, 3) for k, v in b.items()}


def _task():
    return NeRFTask(RayData(), aabb=[-1, -1, -1, 1, 1, 1], grid_resolution=8, render_step_size=0.05,
                    warmup_steps=4, update_every=2, target_samples=256, loss_scale=1.0)


@pytest.mark.parametrize("cls,kw", [
    (MRGridDRRRadianceField, dict(resolutions=[3, 5], channels=2, refiner_layers=1, hidden_mult=2.0)),
    (TriPlaneDRRRadianceField, dict(resolution=6, channels=3, refiner_layers=1, hidden_mult=2.0)),
])
def test_refiner_runs_once_per_training_step_and_matches_the_reference_per_pass(cls, kw):
    torch.set_num_threads(1)
    models = {}
    for per_pass in (False, True):
        m = _small(cls, refine_per_pass=per_pass, **kw)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn_like(p))
        models[per_pass] = m
    models[True].load_state_dict(models[False].state_dict())
    results = {}
    for per_pass, m in models.items():
        task = _task()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        calls = _spy(m)
        per_step, losses, grads = [], [], []
        m.train()
        for step in range(3):                                        # step 0 and 2 update the occupancy grid
            before = len(calls)
            opt.zero_grad()
            out = task.training_step(m, task.batch(step, 0, "cpu"), step)
            assert out is not None and out.loss.requires_grad
            out.loss.backward()                                      # a stale graph would fail on step 1, 2
            grads.append(torch.cat([p.grad.flatten() for r in _refiners(m) for p in r.parameters()]).clone())
            opt.step()
            per_step.append(len(calls) - before)
            losses.append(float(out.loss.detach()))
        results[per_pass] = (per_step, losses, grads, calls)
    once, ref = results[False], results[True]
    assert once[0] == [1, 1, 1]                                       # one refinement per step (default)
    assert all(once[3])                                               # ... with autograd, from the no-grad pass
    assert all(n >= 2 for n in ref[0]) and ref[0][0] >= 3            # reference: update + visibility + render
    assert all(g.abs().sum() > 0 for g in once[2])                   # the refiner is trained
    for a, b in zip(once[1], ref[1]):                                # same losses and gradients either way
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(once[2], ref[2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_step_cache_follows_parameter_updates_without_begin_step():
    m = _small(DenseDRRRadianceField, resolution=4, channels=2, refiner_layers=1, hidden_mult=1.0)
    m.train()
    x = torch.rand(10, 3) - 0.5
    with torch.no_grad():
        a = m.density(x)
        assert torch.equal(a, m.density(x))                          # the cached lattice
        m.spatial_grids.grids[0].add_(0.5)                           # an in-place update invalidates it
        b = m.density(x)
    assert not torch.allclose(a, b)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m.density(x), b)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.aabb"):
        MRGridRadianceField(aabb=[1, 1, 1, 0, 0, 0])
    with pytest.raises(ConfigError, match="model.resolutions"):
        MRGridRadianceField(resolutions=8)
    with pytest.raises(ConfigError, match=r"model.resolutions\[1\]"):
        MRGridDRRRadianceField(resolutions=[4, 1])
    with pytest.raises(ConfigError, match="model.refiner_layers"):
        TriPlaneDRRRadianceField(resolution=4, channels=2, refiner_layers=0)
    with pytest.raises(ConfigError, match="model.resolution"):
        TriPlaneRadianceField(resolution=[4, 4, 4])
    with pytest.raises(ConfigError, match="model.max_resolution"):
        NGPRadianceField(base_resolution=64, max_resolution=16)


# --------------------------------------------------------------------------------------------- configs
def _configs():
    return sorted(glob.glob(os.path.join(ROOT, "configs", "nerf", "*.yaml")))


def test_nerf_configs_validate_and_paper_ids_follow_spec():
    import yaml

    from util.config import load_config

    files = {os.path.basename(p): p for p in _configs()}
    assert {"lego.yaml", "drums.yaml", "demo.yaml"} <= set(files)
    for name, path in files.items():
        n = len(yaml.safe_load(open(path)))
        exps = [load_config(path, i) for i in range(n)]
        assert all(e["task"]["type"] == "nerf" for e in exps), name
        if name in ("lego.yaml", "drums.yaml"):
            assert n == 8
            assert [e["model"]["type"] for e in exps] == [d["type"] for d in PAPER_NERF_MODELS]
            wd = 1e-5 if name == "drums.yaml" else 1e-6
            for i, e in enumerate(exps):
                assert e["task"]["loss_scale"] == (1.0 if i == 3 else 1024)   # vanilla: no GradScaler
                assert e["task"]["target_samples"] == 1 << 16 and e["task"]["grid_resolution"] == 128
                if i == 3:                                            # vanilla NeRF (train_mlp_nerf.py)
                    assert e["train"]["max_steps"] == 50_000 and e["optim"]["lr"] == 5e-4
                else:
                    assert e["train"]["max_steps"] == 35_000 and e["optim"]["lr"] == 1e-2
                    assert e["optim"]["eps"] == 1e-15 and e["optim"]["weight_decay"] == wd
                    assert e["scheduler"]["warmup_steps"] == 100
                assert list(e["scheduler"]["milestones"]) == [0.5, 0.75, 5 / 6, 0.9]
                assert e["scheduler"]["gamma"] == 0.33


def test_demo_config_builds_every_model():
    import yaml

    from util.config import load_config
    from util.build import build_model

    path = os.path.join(ROOT, "configs", "nerf", "demo.yaml")
    exps = [load_config(path, i) for i in range(len(yaml.safe_load(open(path))))]
    types = [e["model"]["type"] for e in exps]
    assert {"ngp_nerf", "mrgrid_nerf", "mrgrid_drr_nerf", "triplane_nerf", "triplane_drr_nerf",
            "vanilla_nerf"} <= set(types)
    for e in exps:
        assert e["dataset"]["type"] == "nerf_demo"
        m = build_model(e, inputs=NeRFTask.model_inputs_without_data(e))
        x = torch.rand(4, 3) - 0.5
        with torch.no_grad():
            rgb, s = m.rgb_sigma(x, F.normalize(torch.randn(4, 3), dim=-1))
        assert rgb.shape == (4, 3) and s.shape == (4,) and bool((s >= 0).all())


def test_wrappers_are_train_main():
    for name in ("train_ngp_nerf_occ.py", "train_mlp_nerf.py"):
        src = open(os.path.join(ROOT, name)).read()
        assert "from train import main" in src and "main()" in src


def test_drr_grid_trains_and_evaluates_through_the_wrapper(tmp_path, capsys):
    """train_ngp_nerf_occ.py (= train.main) on a tiny demo scene with MRGrid+DRR, then test.py: the evaluation
    bakes the checkpointed model and renders every test view."""
    import csv

    import yaml

    from test import main as test_main
    from train_ngp_nerf_occ import main as wrapper_main

    exp = dict(name="tiny_drr",
               task=dict(type="nerf", grid_resolution=16, render_step_size=0.02, target_samples=1024,
                         warmup_steps=4),
               dataset=dict(type="nerf_demo", root=str(tmp_path / "scene"), size=12, n_train=3, n_test=2,
                            init_rays=64),
               model=dict(type="mrgrid_drr_nerf", resolutions=[3, 5], channels=2, refiner_layers=1,
                          hidden_mult=2.0, mlp_width=8, geo_features=3, color_width=8),
               optim=dict(type="adam", lr=1e-2, eps=1e-15),
               scheduler=dict(type="multistep", milestones=[0.5], gamma=0.33, warmup_steps=2),
               train=dict(max_steps=4, log_dir=str(tmp_path / "runs"), checkpoint_every_steps=2, log_every=2,
                          timing_steps=0, collapse_check_steps=0),
               test=dict(chunk_rays=50))
    p = tmp_path / "nerf.yaml"
    p.write_text(yaml.safe_dump([exp]))
    wrapper_main(["--config", str(p), "--config_id", "0", "--no_progress"])
    rd = str(tmp_path / "runs" / "tiny_drr")
    test_main(["--run", rd, "--no_progress"])
    rows = list(csv.DictReader(open(os.path.join(rd, "eval", "metrics.csv"))))
    assert [r["view"] for r in rows] == ["0", "1", "mean"]
    assert all(0 < float(r["psnr"]) < 60 and float(r["bake_s"]) > 0 for r in rows)
    # grids 2 x (3^3 + 5^3), refiner D = 4: 4 + 3 x 4 x 8, density 4 -> 8 -> 4, color 19 -> 8 -> 8 -> 3
    assert int(rows[-1]["params"]) == 2 * (27 + 125) + (4 + 3 * 4 * 8) + 4 * 8 + 8 * 4 + 19 * 8 + 8 * 8 + 8 * 3
