"""tasks/nerf/task.py (training step, grid update, dynamic ray count, skipped steps, state, evaluation) and
models/nerf.py (vanilla NeRF) against hand values; one tiny train + test through the one loop."""
import csv
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import tasks.nerf.task  # noqa: F401  (registers the "nerf" task)
from models.nerf import RadianceField, VanillaNeRF, frequency_encoding
from tasks.nerf.task import NeRFTask
from util.registry import ConfigError


class ConstField(RadianceField):
    """Density ``sigma`` inside |x|, |y|, |z| <= 1.5 (the box), color sigmoid(logits) everywhere."""

    def __init__(self, sigma=2.0):
        super().__init__()
        self.sigma = sigma
        self.logits = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0]))
        self.density_calls = 0

    def density(self, x):
        self.density_calls += 1
        return torch.full(x.shape[:1], self.sigma, dtype=x.dtype)

    def rgb_sigma(self, x, d):
        return torch.sigmoid(self.logits).expand(len(x), 3), self.density(x)


class RayData:
    """Rays straight down -z from (x, y, 4), targets gray; ``miss=True`` points them away from the box."""

    init_rays = 8
    n_test = 1

    def __init__(self, miss=False):
        self.miss = miss

    def sample_batch(self, step, rank=0, n_rays=None):
        n = n_rays or self.init_rays
        xy = torch.linspace(-1, 1, n)
        o = torch.stack([xy, -xy, torch.full((n,), 4.0)], dim=-1)
        d = torch.tensor([0.0, 0.0, 1.0 if self.miss else -1.0]).expand(n, 3).contiguous()
        return {"rays_o": o, "rays_d": d, "rgb": torch.full((n, 3), 0.5)}

    def view(self, i):
        b = self.sample_batch(0, n_rays=4)
        return {k: v.reshape(2, 2, 3) for k, v in b.items()}


# --------------------------------------------------------------------------------------------- vanilla
def test_vanilla_nerf_parameter_count_and_encoding():
    m = VanillaNeRF()
    # trunk 63->256, 4 x 256->256, (256+63)->256, 2 x 256->256; sigma 256->1; bottleneck 256->256;
    # (256+27)->128; 128->3 (weights + biases)
    expect = (63 * 256 + 256) + 4 * (256 * 256 + 256) + (319 * 256 + 256) + 2 * (256 * 256 + 256) + 257 \
        + (256 * 256 + 256) + (283 * 128 + 128) + (128 * 3 + 3)
    assert sum(p.numel() for p in m.parameters()) == expect == 595844
    assert all(float(mod.bias.detach().abs().sum()) == 0 for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    x = torch.tensor([[0.3, -1.0, 2.0]])
    enc = frequency_encoding(x, 2)[0].tolist()
    a, b, c = 0.3, -1.0, 2.0
    hand = [a, b, c, math.sin(a), math.sin(b), math.sin(c), math.sin(2 * a), math.sin(2 * b), math.sin(2 * c),
            math.cos(a), math.cos(b), math.cos(c), math.cos(2 * a), math.cos(2 * b), math.cos(2 * c)]
    assert enc == pytest.approx(hand, abs=1e-6)
    rgb, sigma = m.rgb_sigma(torch.randn(5, 3), F.normalize(torch.randn(5, 3), dim=-1))
    assert rgb.shape == (5, 3) and sigma.shape == (5,) and bool((sigma >= 0).all())
    assert torch.allclose(m.density(x), m.rgb_sigma(x, torch.tensor([[0.0, 0.0, 1.0]]))[1])
    out = m(torch.zeros(2, 4, 3), torch.zeros(2, 0), torch.ones(2, 4, 3) / math.sqrt(3))
    assert out.shape == (2, 4, 4)


# ------------------------------------------------------------------------------------------ training
def test_training_step_renders_closed_form_and_scales_the_loss():
    task = NeRFTask(RayData(), grid_resolution=8, loss_scale=1024.0, target_samples=1000)
    model = ConstField(sigma=2.0)
    model.eval()  # not stratified, no grid update, no state change
    task.grid.binaries.fill_(True)
    batch = task.batch(0, 0, "cpu")
    out = task.training_step(model, batch, 0)
    # rays enter the box at t = 2.5 and leave at 5.5 (both on the lattice t_k = k * 5e-3): opacity 1 - e^-6
    T = math.exp(-2.0 * 3.0)
    c = torch.sigmoid(torch.tensor([0.0, 1.0, -1.0]))
    expect = c * (1 - T) + T  # white background
    assert torch.allclose(out.output, expect.expand(8, 3), atol=1e-5)
    assert float(out.loss.detach()) == pytest.approx(1024 * float(F.smooth_l1_loss(expect.expand(8, 3), batch["rgb"])),
                                            rel=1e-5)
    assert float(out.terms["mse"]) == pytest.approx(float(((expect - 0.5) ** 2).mean()), rel=1e-5)
    assert int(out.terms["n_samples"]) == 8 * 600 and task.n_rays == 8  # eval mode: ray count unchanged
    out.loss.backward()
    assert model.logits.grad is not None and bool(model.logits.grad.abs().sum() > 0)


def test_grid_update_and_dynamic_ray_count_in_training():
    task = NeRFTask(RayData(), grid_resolution=4, target_samples=1000, update_every=16, warmup_steps=256)
    model = ConstField(sigma=4.0)
    model.train()
    out = task.training_step(model, task.batch(0, 0, "cpu"), 0)
    # step 0: every cell evaluated once: occ = density * step = 4 * 5e-3 = 0.02 > min(mean, 0.01)
    assert torch.allclose(task.grid.occs, torch.full((64,), 0.02))
    assert bool(task.grid.binaries.all())
    n = int(out.terms["n_samples"])
    # early stop: a sample is kept while its exclusive transmittance exp(-0.02 k) >= 1e-4, k <= 460.5 -> 461 per ray
    assert n == 8 * (math.floor(math.log(1e4) / 0.02) + 1) == 8 * 461
    assert task.n_rays == int(8 * 1000 / n)
    calls = model.density_calls
    task.grid.occs.fill_(0.5)
    task.training_step(model, task.batch(1, 0, "cpu"), 1)  # step 1: no update (every 16th step)
    assert torch.all(task.grid.occs == 0.5)
    assert model.density_calls == calls + 2  # the visibility and rendering passes, no grid update
    # state: the grid and the ray count survive a save / load
    state = task.state_dict()
    other = NeRFTask(RayData(), grid_resolution=4)
    other.load_state_dict(state)
    assert other.n_rays == task.n_rays and torch.equal(other.grid.occs, task.grid.occs)
    # same (seed, step): the same stratified samples
    a = task.training_step(model, task.batch(5, 0, "cpu"), 5)
    b = task.training_step(model, task.batch(5, 0, "cpu"), 5)
    assert torch.equal(a.output, b.output) and int(a.terms["n_samples"]) == int(b.terms["n_samples"])


def test_zero_sample_step_is_skipped():
    task = NeRFTask(RayData(miss=True), grid_resolution=4)
    model = ConstField()
    model.train()
    assert task.training_step(model, task.batch(0, 0, "cpu"), 0) is None
    assert task.n_rays == 8  # unchanged


def test_task_config_errors():
    with pytest.raises(ConfigError, match="task.backend"):
        NeRFTask(RayData(), backend="cuda")
    with pytest.raises(ConfigError, match="task.aabb"):
        NeRFTask(RayData(), aabb=[1, 1, 1, 0, 0, 0])
    with pytest.raises(ConfigError, match="ray dataset"):
        NeRFTask(object())


# ---------------------------------------------------------------------------------------- end to end
def test_train_and_test_through_the_one_loop(tmp_path, capsys, caplog):
    from test import main as test_main
    from util.config import load_config
    from util.training import train

    exp = dict(task=dict(type="nerf", grid_resolution=16, target_samples=2048, loss_scale=1.0),
               dataset=dict(type="nerf_demo", root=str(tmp_path / "scene"), size=12, n_train=3, n_test=1,
                            init_rays=64),
               model=dict(type="vanilla_nerf", width=32, depth=3, skip_layer=2, pos_freqs=4, dir_freqs=2),
               optim=dict(type="adam", lr=5e-3), scheduler=dict(type="constant"),
               train=dict(max_steps=6, log_dir=str(tmp_path / "runs"), checkpoint_every_steps=3, log_every=3,
                          timing_steps=0),
               test=dict(chunk_rays=64))
    p = tmp_path / "nerf.yaml"
    p.write_text(yaml.safe_dump([exp]))
    rd = train(load_config(str(p), 0), progress=False)
    rows = list(csv.DictReader(open(os.path.join(rd, "log.csv"))))
    assert [int(r["step"]) for r in rows] == [3, 6] and all(np.isfinite(float(r["psnr"])) for r in rows)
    test_main(["--run", rd, "--no_progress"])
    printed = capsys.readouterr().out
    assert "psnr" in printed and "mean" in printed
    metrics = list(csv.DictReader(open(os.path.join(rd, "eval", "metrics.csv"))))
    assert [r["view"] for r in metrics] == ["0", "mean"]
    assert 0 < float(metrics[0]["psnr"]) < 60 and float(metrics[0]["render_s"]) > 0
    assert os.path.isfile(os.path.join(rd, "eval", "view_000_pred.png"))
    assert os.path.isfile(os.path.join(rd, "eval", "view_000_error.png"))
    assert "no saved occupancy grid" not in caplog.text  # the grid came from the last checkpoint
    assert (metrics[0]["weights"], metrics[0]["step"], metrics[0]["total_steps"]) == ("model.pt", "6", "6")
    import glob

    def scores(run, out):
        return [(r["psnr"], r["ssim"], r["n_samples"]) for r in csv.DictReader(open(os.path.join(run, out,
                                                                                               "metrics.csv")))]

    # the grid is found through the project's checkpoint API (task_state.pt), not Accelerate's files
    own = str(tmp_path / "own_state_only")
    shutil.copytree(rd, own)
    for f in glob.glob(os.path.join(own, "checkpoints", "*", "custom_checkpoint_*.pkl")):
        os.remove(f)
    test_main(["--run", own, "--no_progress", "--overwrite"])
    assert "no saved occupancy grid" not in caplog.text
    assert scores(own, "eval") == scores(rd, "eval")
    # a run written before task_state.pt (only Accelerate's custom-object file): the same grid, the same numbers
    for f in glob.glob(os.path.join(rd, "checkpoints", "*", "task_state.pt")):
        os.remove(f)
    test_main(["--run", rd, "--no_progress", "--out_name", "eval_legacy"])
    assert "no saved occupancy grid" not in caplog.text
    assert scores(rd, "eval_legacy") == scores(rd, "eval")
    # without the checkpoints' task state the grid is rebuilt from the trained density, with a warning
    for f in glob.glob(os.path.join(rd, "checkpoints", "*", "custom_checkpoint_*.pkl")):
        os.remove(f)
    test_main(["--run", rd, "--no_progress", "--overwrite"])
    assert "no saved occupancy grid" in caplog.text
