"""Tests that kill the mutation survivors of issue 20, item 5: one test (or a pair) per plausible one-line bug that
the rest of the suite let through. Each compares the code with an independent reference (a hand computation,
scikit-image, autograd or an explicit loop), never with the code's own output, and tests behaviour (inputs ->
outputs) through the stable entry points wherever one exists.

The bugs, in the order of the tests below:
 1. MoE decompression evaluating every time step at step 0's coordinates;
 2. test.py predicting every member at the first member's condition (model only);
 3. wins counted against the references of another resolution;
 4. SSIM with data range 2 (MoE slices);
 5. SSIM on axes shorter than the window;
 6. a NaN member silently dropped from the dataset means (nanmean);
 7. ``init_output_mean: auto`` reading the median instead of the training mean (ensemble dataset);
 8. the collapse detector requiring constant output AND zero gradients;
 9. occupancy-grid updates at cell centres (no jitter);
10. Functa's per-element inner learning rate replaced by its mean;
11. ``train.grad_clip`` ignored;
12. ``train.epochs`` rounded to steps (instead of ceil);
13. the MoE variance-regularizer target not detached;
14. the terrain ``rmse_grad`` as a mean of tile RMSEs instead of the RMSE over all pixels;
15. ``psnr_from_mse`` on tensors.
"""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

import tasks  # noqa: F401  (registers every task)
from util.config import load_config
from util.training import train

TINY_DRR = dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
                spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
                cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)


def _train_config(tmp_path, exp, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump([exp]))
    return load_config(str(p))


def _build_fn(name):
    """util.build's builder ``name``."""
    import util.build as mod

    return getattr(mod, name)


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------- 1. MoE decompression per time step
def _volume(root):
    t, z, y, x = np.meshgrid(np.arange(3), np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    a = (np.exp(-((x - 1 - 2 * t) ** 2 + (y - 3) ** 2 + (z - 3) ** 2) / 5.0) + 0.2 * t).astype(np.float32)
    np.save(root / "v.npy", a)
    return a


def test_moe_decompresses_each_step_at_its_own_coordinates(tmp_path):
    from models.moe_inr import MoEINR
    from tasks.moe_inr.evaluation import load_fp16
    from tasks.moe_inr.task import MoETask

    a = _volume(tmp_path)
    exp = {"name": "moe_steps", "task": {"type": "moe_inr", "k": 3, "pretrain": "none"},
           "model": {"type": "moe_inr", "M": 3, "k": 3},
           "dataset": {"type": "time_volume", "path": str(tmp_path / "v.npy"), "batch_size": 64},
           "optim": {"type": "adam", "lr": 1e-3}, "scheduler": {"type": "constant"},
           "train": {"max_steps": 2, "log_every": 1, "log_dir": str(tmp_path / "runs"), "collapse_check_steps": 0},
           "test": {"isovalues": [], "ssim": False, "save_volume": True, "chunk_size": 100}}
    run = train(_train_config(tmp_path, exp), progress=False)
    MoETask.evaluate(run)
    vol = np.load(os.path.join(run, "eval", "decompressed.npy"))
    T, Z, Y, X = a.shape
    assert vol.shape == a.shape
    # the stored artifact, evaluated by hand at each step's vertex coordinates (x, y, z, t), 2 j / (n - 1) - 1
    torch.manual_seed(0)
    model = MoEINR(M=3, k=3)
    model.load_state_dict(load_fp16(os.path.join(run, "eval", "weights_fp16.bin")), strict=False)
    model.eval()
    ax = lambda n: 2.0 * np.arange(n) / (n - 1) - 1.0  # noqa: E731
    zz, yy, xx = np.meshgrid(ax(Z), ax(Y), ax(X), indexing="ij")
    lo, hi = float(a.min()), float(a.max())
    rows = {int(r["t"]): r for r in _read_csv(os.path.join(run, "eval", "per_step.csv"))}
    for t in range(T):
        pts = np.stack([xx, yy, zz, np.full_like(xx, ax(T)[t])], axis=-1).reshape(1, -1, 4)
        with torch.no_grad():
            want = model(torch.from_numpy(pts.astype(np.float32)), torch.zeros(1, 0)).reshape(Z, Y, X).numpy()
        np.testing.assert_allclose(vol[t], want, rtol=1e-5, atol=1e-6, err_msg=f"time step {t}")
        # and step t is scored against step t's truth (normalized to [-1, 1] with the global min / max)
        g = 2.0 * (a[t].astype(np.float64) - lo) / (hi - lo) - 1.0
        mse = float(np.mean((vol[t].astype(np.float64) - g) ** 2))
        assert float(rows[t]["psnr"]) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-5)


# ------------------------------------------------------------- ensemble run shared by tests 2, 3, 11 and 12
# steps per epoch by hand: 6 training members x 4^3 voxels (8^3 downsampled x2: (8 - 1) // 2 + 1 = 4 per axis)
# / (2 members x 2^6 voxels per batch) = 3
SPE = 3
CLIP = 1e-3  # below the first step's gradient norm (~2e-3)


def _ensemble_exp(tmp_path, name, **train_kw):
    return dict(
        name=name, model=TINY_DRR,
        dataset=dict(type="demo", root=str(tmp_path / "demo"), n_train=6, n_test=4, resolution=8,
                     downsample=2, cond_batch=2, spatial_log2batch=6),
        optim=dict(type="adam", lr=1e-2), scheduler=dict(type="constant"),
        train=dict(dict(log_dir=str(tmp_path / "runs"), log_every=1, timing_steps=1, collapse_check_steps=0),
                   **train_kw),
        test=dict(chunk_size=200, ssim=False, ref_k=2, splits=["test"], resolutions=["full", "train"],
                  dump_vti=False, dump_png=False))


class _GradNorms:
    """Records the global gradient norm every optimizer step sees (a global step pre-hook)."""

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.norms = []

        def hook(opt, args, kwargs):
            sq = sum(float((p.grad.double() ** 2).sum()) for g in opt.param_groups for p in g["params"]
                     if p.grad is not None)
            self.norms.append(math.sqrt(sq))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    # trained long enough at a high lr that the model competes with the reference predictors
    with _GradNorms() as rec:
        run = train(_train_config(tmp, _ensemble_exp(tmp, "ens", max_steps=150, grad_clip=CLIP)), progress=False)
    return tmp, run, rec.norms


@pytest.fixture(scope="module")
def ensemble_eval(ensemble_run):
    from tasks.ensemble.evaluation import evaluate

    tmp, run, _ = ensemble_run
    evaluate(run, overrides={"dump_members": [6, 7, 8, 9]}, device="cpu", progress=False)
    return tmp, run


def _check_dumps(cfg_path, run):
    """Each dumped prediction equals Surrogate.predict at that member's own (normalized) condition."""
    from tasks.ensemble.surrogate import Surrogate

    ds = _build_fn("build_dataset")(load_config(str(cfg_path)))
    s = Surrogate.load(run, device="cpu")
    preds = {}
    for row in (6, 7, 8, 9):
        dumped = np.load(os.path.join(run, "eval", "dumps", f"member{row:04d}_full_pred.npy"))
        want = s.predict(ds.conds([row])[0].numpy(), normalized_params=True)
        np.testing.assert_allclose(dumped, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()),
                                   err_msg=f"member {row}")
        preds[row] = want
    assert not np.allclose(preds[6], preds[9])  # the members differ, so a shared condition would show


def test_dumped_predictions_use_each_members_condition(ensemble_eval):
    tmp, run = ensemble_eval  # DRR-Net baked with its fast path (predict_grid)
    _check_dumps(tmp / "c.yaml", run)


def test_dumped_predictions_use_each_members_condition_forward_path(tmp_path):
    from tasks.ensemble.evaluation import evaluate

    exp = _ensemble_exp(tmp_path, "plain", max_steps=5)
    exp["model"] = dict(TINY_DRR, fast_paths=False)  # reconstructed through forward (predict_field)
    run = train(_train_config(tmp_path, exp), progress=False)
    evaluate(run, overrides={"dump_members": [6, 7, 8, 9], "resolutions": ["full"], "reference": False},
             device="cpu", progress=False)
    _check_dumps(tmp_path / "c.yaml", run)


def test_wins_count_references_of_the_same_resolution(ensemble_eval):
    _, run = ensemble_eval
    members = _read_csv(os.path.join(run, "eval", "members.csv"))
    metrics = _read_csv(os.path.join(run, "eval", "metrics.csv"))
    psnr = {}
    for r in members:
        psnr.setdefault((r["predictor"], r["resolution"]), {})[int(r["row"])] = float(r["psnr"])
    refs = {"mean": "mean_field", "nearest": "nearest_member"}
    refs["idw"] = next(p for p, _ in psnr if p.startswith("idw"))
    cross_differs = False
    for res, other in (("full", "train"), ("train", "full")):
        row = next(r for r in metrics if r["predictor"] == "model" and r["resolution"] == res)
        model = psnr[("model", res)]
        assert int(row["wins_of"]) == len(model) == 4
        for short, name in refs.items():
            want = sum(1 for k in model if model[k] > psnr[(name, res)][k])  # explicit loop, same resolution
            assert int(row[f"wins_vs_{short}"]) == want, (res, short)
            cross_differs |= want != sum(1 for k in model if model[k] > psnr[(name, other)][k])
    assert cross_differs, "fixture too weak: the wins of both resolutions agree, a mix-up would not show"


# --------------------------------------------------------------------------------------- 4, 5. SSIM
def _skimage_ssim(a, b, data_range):
    from skimage.metrics import structural_similarity

    return structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


def test_ssim_data_range_2_matches_skimage():
    from util.metrics import ssim

    rng = np.random.default_rng(0)
    g = np.tanh(rng.standard_normal((24, 26)).cumsum(0) / 4)  # values in (-1, 1)
    p = np.clip(g + 0.2 * rng.standard_normal(g.shape), -1, 1)
    assert ssim(torch.from_numpy(p), torch.from_numpy(g), data_range=2.0) == pytest.approx(
        _skimage_ssim(p, g, 2.0), rel=1e-9, abs=1e-12)


def test_moe_slice_ssim_uses_data_range_2():
    from tasks.moe_inr.evaluation import slice_ssim

    rng = np.random.default_rng(1)
    g = np.tanh(rng.standard_normal((12, 13, 14)).cumsum(1) / 3).astype(np.float64)
    p = np.clip(g + 0.3 * rng.standard_normal(g.shape), -1, 1)
    want = np.mean([_skimage_ssim(np.take(p, n // 2, ax), np.take(g, n // 2, ax), 2.0)
                    for ax, n in enumerate(g.shape)])
    assert slice_ssim(p, g) == pytest.approx(want, rel=1e-9)


def _naive_ssim(a, b, data_range=1.0, win=11, sigma=1.5, k1=0.01, k2=0.03):
    """Explicit-loop SSIM: per axis the largest odd window <= the axis (at most ``win``), separable Gaussian
    weights, population moments, valid window centres only."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sizes = [win if n >= win else (n if n % 2 else n - 1) for n in a.shape]
    taps = []
    for s in sizes:
        j = np.arange(s) - (s - 1) / 2
        w = np.exp(-0.5 * (j / sigma) ** 2)
        taps.append(w / w.sum())
    w = taps[0]
    for t in taps[1:]:
        w = np.multiply.outer(w, t)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    vals = []
    for start in np.ndindex(*[n - s + 1 for n, s in zip(a.shape, sizes)]):
        sl = tuple(slice(i, i + s) for i, s in zip(start, sizes))
        x, y = a[sl], b[sl]
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
        cxy = (w * (x - mx) * (y - my)).sum()
        vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("shape", [(6, 17), (5, 9), (4, 12, 9)])
def test_ssim_on_axes_shorter_than_the_window(shape):
    from util.metrics import ssim

    rng = np.random.default_rng(2)
    g = rng.random(shape)
    p = np.clip(g + 0.15 * rng.standard_normal(shape), 0, 1)
    assert ssim(torch.from_numpy(p), torch.from_numpy(g)) == pytest.approx(_naive_ssim(p, g), rel=1e-9)


# ---------------------------------------------------------------------------------- 6. NaN member in means
def test_a_nan_member_makes_the_dataset_means_nan():
    from util.metrics import dataset_metrics

    rows = [dict(mse=0.01, psnr=20.0, rel_l2=0.1, ssim=0.9, md=0.3),
            dict(mse=0.04, psnr=10 * math.log10(25), rel_l2=0.2, ssim=0.8, md=0.5),
            dict(mse=math.nan, psnr=math.nan, rel_l2=math.nan, ssim=math.nan, md=math.nan)]
    out = dataset_metrics(rows)
    assert out["members"] == 3
    for k in ("mse", "rel_l2", "ssim", "md", "psnr_member_mean", "psnr_dataset"):
        assert math.isnan(out[k]), k  # documented: NaN if a member's value is NaN (never silently dropped)
    ok = dataset_metrics(rows[:2])
    assert ok["mse"] == pytest.approx(0.025) and ok["psnr_dataset"] == pytest.approx(-10 * math.log10(0.025))


# ------------------------------------------------------------------------ 7. init_output_mean: auto = mean
def _skewed_ensemble(root, m=6, n_train=4, shape=(5, 6, 7)):
    rng = np.random.default_rng(3)
    fields = (rng.random((m,) + shape) ** 6 * 10.0 + 1.0).astype(np.float32)  # mean far from the median
    data = root / "data"
    data.mkdir(parents=True)
    for i, f in enumerate(fields):
        np.save(data / f"member_{i:03d}.npy", f)
    cond = np.concatenate([np.arange(m, dtype=np.float32)[:, None], rng.random((m, 2)).astype(np.float32)], 1)
    np.save(root / "cond.npy", cond)
    np.save(root / "split.npy", {"cond_idx": np.arange(n_train), "cond_idx_unseen": np.arange(n_train, m)},
            allow_pickle=True)
    return fields[:n_train].astype(np.float64), dict(data_dir=str(data), cond_path=str(root / "cond.npy"),
                                                     cond_split_path=str(root / "split.npy"))


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_init_output_mean_auto_is_the_training_mean(tmp_path, storage):
    build_components = _build_fn("build_components")

    train_fields, paths = _skewed_ensemble(tmp_path)
    norm = (train_fields - train_fields.min()) / (train_fields.max() - train_fields.min())
    want = float(norm.mean())
    assert abs(want - float(np.median(norm))) > 0.02  # the data tell mean and median apart
    exp = dict(name="auto", task=dict(type="ensemble"), model=dict(TINY_DRR, init_output_mean="auto"),
               dataset=dict(type="ensemble", storage=storage, cond_batch=2, spatial_log2batch=4, **paths),
               train=dict(max_steps=1, log_dir=str(tmp_path / "runs")))
    _, task, model = build_components(_train_config(tmp_path, exp))
    assert task.output_mean == pytest.approx(want, rel=1e-9)
    assert torch.sigmoid(model.decoder.net[-1].bias).item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------ 8. collapse detector
class _OneProcess:
    device = torch.device("cpu")

    def reduce(self, t, reduction="sum"):
        return t


def _observe(watch, out, grad, step):
    lin = torch.nn.Linear(2, 1)
    lin.weight.grad = torch.full_like(lin.weight, grad)
    lin.bias.grad = torch.full_like(lin.bias, grad)
    watch.observe(_OneProcess(), lin, out, step)


@pytest.mark.parametrize("case", ["constant_output", "zero_gradients"])
def test_collapse_detector_fires_on_either_sign_alone(case):
    from util.training import CollapseWatch, TrainingCollapsed

    constant = torch.full((4, 8, 1), 0.25)
    varying = torch.linspace(0, 1, 32).reshape(4, 8, 1)
    out, grad = (constant, 0.1) if case == "constant_output" else (varying, 0.0)
    watch = CollapseWatch(check_steps=100, patience=2, log_every=1)
    _observe(watch, out, grad, 1)  # one interval: within the patience
    with pytest.raises(TrainingCollapsed):
        _observe(watch, out, grad, 2)
    healthy = CollapseWatch(check_steps=100, patience=2, log_every=1)
    for s in (1, 2, 3):
        _observe(healthy, varying, 0.1, s)  # neither sign: never fires


# ------------------------------------------------------------------------------ 9. occupancy-grid jitter
def test_occupancy_update_points_are_jittered_within_their_cells():
    from rendering.occupancy import OccupancyGrid

    R = 8
    grid = OccupancyGrid(roi_aabb=(-1.0, -2.0, 0.0, 1.0, 2.0, 4.0), resolution=R)
    seen = []

    def fn(x):
        seen.append(x.clone())
        return torch.zeros(x.shape[0])

    grid.update(0, fn, warmup_steps=10, generator=torch.Generator().manual_seed(0))  # warm-up: every cell
    x = torch.cat(seen).double()
    assert x.shape == (R ** 3, 3)
    lo, hi = torch.tensor([-1.0, -2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    u = (x - lo) / (hi - lo) * R  # cell units: integer part = cell, fraction = position in the cell
    n = torch.arange(R ** 3)
    cells = torch.stack([n // (R * R), (n // R) % R, n % R], -1).double()  # C order, by hand
    frac = u - cells
    assert bool((frac > -1e-5).all()) and bool((frac < 1 + 1e-5).all())  # each point inside its own cell
    # uniformly spread inside the cells (U(0, 1): mean 1/2, std 1/sqrt(12)), not the cell centres
    assert float(frac.mean()) == pytest.approx(0.5, abs=0.05)
    assert float(frac.std()) == pytest.approx(1 / math.sqrt(12), abs=0.03)


# ----------------------------------------------------------------------------- 10. Functa per-element lr
def test_functa_inner_step_uses_the_per_element_learning_rate():
    from models.terrain.functa import Functa

    torch.manual_seed(0)
    model = Functa(tile_size=8, latent_dim=5, width=8, hidden_layers=1, inner_steps=2).eval()
    with torch.no_grad():
        model.inner_lr.copy_(torch.tensor([0.5, 0.01, 0.2, 1.0, 0.05]))
    tiles = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    z = torch.zeros(2, 1, 5)
    for _ in range(2):  # z <- z - lr (.) grad_z sum_tiles MSE(decode(z), tile), by autograd
        zz = z.clone().requires_grad_(True)
        loss = ((model.decode(zz) - tiles) ** 2).mean(dim=(1, 2, 3)).sum()
        (g,) = torch.autograd.grad(loss, zz)
        z = (zz - model.inner_lr.detach() * g).detach()
    torch.testing.assert_close(model.encode(tiles), z, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ 11. train.grad_clip
def test_grad_clip_bounds_the_gradient_norm_of_every_step(ensemble_run):
    tmp, _, clipped = ensemble_run
    assert len(clipped) == 150
    with _GradNorms() as rec:  # the same first step without clipping
        train(_train_config(tmp, _ensemble_exp(tmp, "noclip", max_steps=1), "noclip.yaml"), progress=False)
    raw = rec.norms[0]
    assert raw > 1.5 * CLIP  # the clip is active at step 0
    assert clipped[0] == pytest.approx(CLIP, rel=2e-3)  # scaled to the bound (torch: c / (||g|| + 1e-6))
    assert max(clipped) <= CLIP * (1 + 1e-4)


# ------------------------------------------------------------------------------- 12. epochs -> steps (ceil)
def test_epochs_round_up_to_whole_steps(tmp_path):
    # 1.1 epochs of 3 steps = 3.3 steps: ceil gives 4 (rounding or truncating would give 3)
    run = train(_train_config(tmp_path, _ensemble_exp(tmp_path, "ep", epochs=1.1)), progress=False)
    with open(os.path.join(run, "finished.json")) as f:
        assert int(json.load(f)["steps"]) == math.ceil(1.1 * SPE) == 4
    assert [int(r["step"]) for r in _read_csv(os.path.join(run, "log.csv"))] == [1, 2, 3, 4]


# -------------------------------------------------------------------------- 13. MoE variance regularizer
def test_moe_variance_regularizer_target_is_detached(tmp_path):
    from datasets.timevolume import TimeVolumeDataset
    from models.moe_inr import MoEINR
    from tasks.moe_inr.task import MoETask

    _volume(tmp_path)
    ds = TimeVolumeDataset(str(tmp_path / "v.npy"), batch_size=128, seed=0)
    torch.manual_seed(0)
    model = MoEINR(M=3, k=3, mode="average")
    batch = ds.sample_batch(0)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.reshape(-1).clone() if p.grad is not None else torch.zeros(p.numel())
                          for p in model.parameters()])

    w = 2.0
    g_with = grads(MoETask(ds, k=3, pretrain="none", var_weight=w).training_step(model, batch, 5).loss)
    g_without = grads(MoETask(ds, k=3, pretrain="none", var_weight=0.0).training_step(model, batch, 5).loss)
    # the regularizer by hand: mean((var - sg((mean - v)^2))^2) over the experts' values
    values = model.forward_all(batch["x"], batch["c"])["values"].reshape(-1, 3)
    v = batch["v"].reshape(-1, 1)
    mean = values.mean(-1, keepdim=True)
    var = ((values - mean) ** 2).mean(-1, keepdim=True)
    g_reg = grads(((var - ((mean - v) ** 2).detach()) ** 2).mean())
    torch.testing.assert_close(g_with - g_without, w * g_reg, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------- 14. terrain rmse_grad
class _ScaledTiles(torch.nn.Module):
    """A stand-in terrain model: payload = the tile, decode = 1.5 x the normalized tile (a known error)."""

    inner_loop, continuous, payload_floats = False, False, 1

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, tiles):
        return tiles.clone()

    def decode(self, z):
        return 1.5 * z


def test_terrain_rmse_grad_is_pooled_over_every_pixel(tmp_path):
    from datasets.terrain import TerrainDataset
    from tasks.terrain.task import TerrainTestConfig, benchmark

    rng = np.random.default_rng(4)
    for i, amp in enumerate((1.0, 30.0, 400.0)):  # regions of very different roughness
        np.save(tmp_path / f"r{i}.npy", (amp * rng.standard_normal((24, 24)).cumsum(0)).astype(np.float32))
    ds = TerrainDataset(str(tmp_path), tile_size=8, val_fraction=0.25, test_fraction=0.25, batch_size=2)
    tc = TerrainTestConfig(max_tiles=None, ptq_bits=[], flops=False, timing_repeats=1, derivatives="fd",
                           figure_tiles=0, batch_size=3)
    out = benchmark(_ScaledTiles(), ds, tc, split="test", device="cpu")
    idx = ds.split_indices("test")
    gt = ds.tiles(idx)
    m = gt["metres"].numpy()
    mu = gt["mu"].numpy()[:, None, None]
    err = 0.5 * (m - mu)  # metres: mu + 1.5 (m - mu) - m
    gr = (err[:, 2:, 1:-1] - err[:, :-2, 1:-1]) / 2.0  # central differences, interior pixels
    gc = (err[:, 1:-1, 2:] - err[:, 1:-1, :-2]) / 2.0
    se = gr ** 2 + gc ** 2
    want = math.sqrt(float(se.mean()))  # every pixel of every tile pooled
    per_tile = np.sqrt(se.mean(axis=(1, 2)))
    assert abs(want - per_tile.mean()) > 0.01 * want  # the two aggregations differ on these tiles
    assert out["row"]["rmse_grad"] == pytest.approx(want, rel=1e-4)
    assert [t["rmse_grad"] for t in out["tiles"]] == pytest.approx(list(per_tile), rel=1e-4)


# ------------------------------------------------------------------------------ 15. psnr_from_mse, tensors
def test_psnr_from_mse_on_tensors_and_arrays():
    from util.metrics import psnr_from_mse

    m = [0.01, 0.0, 0.25, 1.0]
    want = [10 * math.log10(4 / 0.01), math.inf, 10 * math.log10(4 / 0.25), 10 * math.log10(4.0)]
    t = psnr_from_mse(torch.tensor(m, dtype=torch.float64), data_range=2.0)
    assert isinstance(t, torch.Tensor) and t.shape == (4,)
    assert t.tolist() == pytest.approx(want, rel=1e-12)
    a = psnr_from_mse(np.array(m), data_range=2.0)
    assert isinstance(a, np.ndarray) and a.tolist() == pytest.approx(want, rel=1e-12)
    assert psnr_from_mse(torch.tensor([0.01, 0.1])).tolist() == pytest.approx([20.0, 10.0], rel=1e-6)
    with pytest.raises(ValueError):
        psnr_from_mse(torch.tensor([0.1, -0.1]))
