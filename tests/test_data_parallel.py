"""Data parallelism: every rank draws its own batch and the gradients of the ranks are averaged.

The end-to-end check launches train.py in 2 CPU processes (``accelerate launch --multi_gpu`` without a visible
GPU: torchrun + gloo) with Adam beta1 = 0, so a checkpoint's ``exp_avg`` is exactly the gradient of its last step.
That gradient must equal the mean of the single-process gradients on the batches ``sample_batch(step, 0)`` and
``sample_batch(step, 1)`` at the previous checkpoint's weights, and differ from the gradient of either batch
alone: it fails if the ranks draw the same batch, if they are not averaged (or summed instead), or if a rank
other than ``accelerator.process_index`` is used.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.test_train import ROOT, run_train, tiny_config
from util.config import load_config
from util.build import build_dataset, load_trained_model
from util.run_dir import load_experiment, run_dir_of


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batches_depend_on_rank_and_step_only(tmp_path):
    """sample_batch(step, rank): equal for equal (step, rank), also from a second dataset object; different
    points for different ranks of one step (the ranks must not train on the same batch)."""
    exp = load_config(tiny_config(tmp_path), 0)
    a, b = build_dataset(exp), build_dataset(exp)
    for step in (0, 5):
        r0, r1, again = a.sample_batch(step, rank=0), a.sample_batch(step, rank=1), b.sample_batch(step, rank=1)
        assert all(torch.equal(r1[k], again[k]) for k in r1)
        assert not torch.equal(r0["x"], r1["x"]) and not torch.equal(r0["v"], r1["v"])
    assert not torch.equal(a.sample_batch(1, 1)["x"], a.sample_batch(0, 1)["x"])


def batch_gradient(model, batch):
    """{name: gradient} of train.py's loss (MSE of the prediction against v) on one batch."""
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(batch["x"], batch["c"]).float(), batch["v"]).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def rel_err(a, b):
    num = sum(float((a[k] - b[k]).square().sum()) for k in a)
    return (num / sum(float(b[k].square().sum()) for k in b)) ** 0.5


@pytest.mark.slow  # subprocesses that train (see pytest.ini)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test written for linux")
def test_two_processes_average_the_gradients_of_their_own_batches(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2, checkpoint_every_steps=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", str(free_port()), "train.py", "--config", cfg, "--no_progress",
                        "--set", "optim.betas=[0.0, 0.999]"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rd = run_dir_of(load_config(cfg, 0))
    assert os.path.isfile(os.path.join(rd, "finished.json"))
    assert "2 processes" in r.stderr

    ck1, ck2 = (os.path.join(rd, "checkpoints", f"step_000000{s}") for s in (1, 2))
    model, _, _ = load_trained_model(rd, checkpoint=ck1)  # the weights the second step started from
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = torch.load(os.path.join(ck2, "optimizer.bin"), map_location="cpu", weights_only=True)["state"]
    assert len(state) == len(names)
    used = {n: state[i]["exp_avg"] for i, n in enumerate(names)}  # beta1 = 0: the gradient of step 2

    ds = build_dataset(load_experiment(rd))
    g0, g1 = (batch_gradient(model, ds.sample_batch(1, rank=rank)) for rank in (0, 1))
    mean = {n: (g0[n] + g1[n]) / 2 for n in names}
    assert rel_err(used, mean) < 1e-4
    for alone in (g0, g1, {n: g0[n] + g1[n] for n in names}):  # one rank's batch only, or a sum
        assert rel_err(used, alone) > 0.05


def test_single_process_gradient_is_its_rank_0_batch(tmp_path):
    """The same check in one process (no launcher): the step-2 gradient is that of sample_batch(1, rank=0),
    which makes the two-process comparison above meaningful (same loss, same weights, same read-out)."""
    cfg = tiny_config(tmp_path, max_steps=2, checkpoint_every_steps=1)
    run_train(cfg, "--set", "optim.betas=[0.0, 0.999]")
    rd = run_dir_of(load_config(cfg, 0))
    model, _, _ = load_trained_model(rd, checkpoint=os.path.join(rd, "checkpoints", "step_0000001"))
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = torch.load(os.path.join(rd, "checkpoints", "step_0000002", "optimizer.bin"), map_location="cpu",
                       weights_only=True)["state"]
    used = {n: state[i]["exp_avg"] for i, n in enumerate(names)}
    ds = build_dataset(load_experiment(rd))
    assert rel_err(used, batch_gradient(model, ds.sample_batch(1, rank=0))) < 1e-5
    assert rel_err(used, batch_gradient(model, ds.sample_batch(1, rank=1))) > 0.05


class _FakeAccelerator:
    """gather() of two processes whose second one holds ``other``'s weights."""

    def __init__(self, other):
        self.num_processes, self.device, self.other = 2, torch.device("cpu"), other

    def gather(self, t):
        from util.training import weights_fingerprint

        return torch.cat([t, weights_fingerprint(self.other)[None]])


def test_processes_holding_different_weights_are_an_error():
    from util.training import check_processes_agree

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    b.load_state_dict(a.state_dict())
    check_processes_agree(_FakeAccelerator(b), a, 5, "toy")  # equal weights: fine
    with torch.no_grad():  # two values swapped within a tensor: sum and |sum| agree, the weighted sum does not
        b[1].bias.copy_(a[1].bias.flip(0))
    assert not torch.equal(b[1].bias, a[1].bias)
    with pytest.raises(RuntimeError, match="after step 5 the 2 processes hold different weights.*task 'toy'"):
        check_processes_agree(_FakeAccelerator(b), a, 5, "toy")
    with torch.no_grad():  # one value off by a rounding step
        b.load_state_dict(a.state_dict())
        b[0].weight[2, 1] = torch.nextafter(b[0].weight[2, 1], torch.tensor(1.0)) * (1 + 1e-6)
    with pytest.raises(RuntimeError, match="different weights"):
        check_processes_agree(_FakeAccelerator(b), a, 5, "toy")


def _launch_two(cfg, tmp_path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), "train.py", "--config", str(cfg), "--no_progress",
                           *extra], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # subprocesses that train (see pytest.ini)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test written for linux")
def test_two_processes_train_terrain_and_moe_inr(tmp_path):
    """Tasks whose model call is not the plain f(x, c): terrain (encode + decode through forward(tiles=)) and
    MoE-INR (experts without gradient in stage 1, then with) train in 2 processes, and the loop's check that all
    processes hold the same weights passes at every checkpoint."""
    import numpy as np
    import yaml

    from datasets.terrain_gen import fractal_surface

    (tmp_path / "dem").mkdir()
    for i in range(4):
        np.save(tmp_path / "dem" / f"r{i}.npy", (100.0 * fractal_surface(32, seed=i)).astype(np.float32))
    t, z, y, x = np.meshgrid(np.arange(3), np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    np.save(tmp_path / "v.npy", np.exp(-((x - 2 - t) ** 2 + (y - 3) ** 2 + (z - 3) ** 2) / 5.0).astype(np.float32))
    common = {"optim": {"type": "adam", "lr": 1e-3}, "scheduler": {"type": "constant"}}
    train = {"max_steps": 4, "log_every": 2, "checkpoint_every_steps": 2, "log_dir": str(tmp_path / "runs"),
             "collapse_check_steps": 0}
    cfg = [{"name": "terrain2", "task": {"type": "terrain"},
            "model": {"type": "functa", "latent_dim": 4, "width": 8, "hidden_layers": 1, "omega_0": 5.0,
                      "inner_steps": 2, "inner_lr_init": 1.0},
            "dataset": {"type": "terrain", "path": str(tmp_path / "dem"), "tile_size": 16, "batch_size": 2,
                        "val_fraction": 0.25, "test_fraction": 0.25},
            "train": train, **common},
           {"name": "moe2", "task": {"type": "moe_inr", "k": 3, "stage1_steps": 2, "kmeans_samples": 300},
            "model": {"type": "moe_inr", "M": 3, "k": 3},
            "dataset": {"type": "time_volume", "path": str(tmp_path / "v.npy"), "batch_size": 64},
            "train": train, **common}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for i, name in enumerate(("terrain2", "moe2")):
        r = _launch_two(path, tmp_path, "--config_id", str(i))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "2 processes" in r.stderr
        assert os.path.isfile(tmp_path / "runs" / name / "finished.json")


def test_a_step_skipped_by_one_process_is_skipped_by_all():
    from util.training import skip_together

    class Acc:
        def __init__(self, n, others_skip):
            self.num_processes, self.device, self.others = n, torch.device("cpu"), others_skip

        def reduce(self, t, reduction):
            assert reduction == "sum"
            return t + float(self.others)

    out = object()
    assert skip_together(Acc(1, 0), out) is out and skip_together(Acc(1, 0), None) is None
    assert skip_together(Acc(2, 0), out) is out  # nobody skips
    assert skip_together(Acc(2, 1), out) is None  # the other process skips: this one too
    assert skip_together(Acc(2, 0), None) is None
