"""MoE-INR task (tasks/moe_inr/task.py): expert labels (k-means deterministic, spatial/temporal/random by hand), the
stage-1 and stage-2 losses recomputed by hand from the model's outputs, the stage switch, and a resume across
the stage boundary that must match an uninterrupted run bitwise."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets.timevolume import TimeVolumeDataset
from models.moe_inr import MoEINR
from tasks.moe_inr.task import MoETask, kmeans_fit
from util.registry import ConfigError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("tv")
    t, z, y, x = np.meshgrid(np.arange(4), np.arange(8), np.arange(9), np.arange(10), indexing="ij")
    a = np.exp(-((x - 2 - t) ** 2 + (y - 4) ** 2 + (z - 3) ** 2) / 6.0) + 0.3 * np.sin(0.5 * x - 0.3 * t)
    np.save(d / "v.npy", a.astype(np.float32))
    return TimeVolumeDataset(str(d / "v.npy"), batch_size=256, seed=0)


def test_kmeans_fit_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(c, 0.05, size=(200, 1)) for c in (-0.8, 0.0, 0.7)])
    cent = np.sort(kmeans_fit(pts, 3, seed=1)[:, 0])
    np.testing.assert_allclose(cent, [-0.8, 0.0, 0.7], atol=0.02)


def test_kmeans_labels_deterministic_for_a_seed(ds):
    a = MoETask(ds, k=3, stage1_steps=5, kmeans_seed=4, kmeans_samples=500)
    b = MoETask(ds, k=3, stage1_steps=5, kmeans_seed=4, kmeans_samples=500)
    assert torch.equal(a.centroids, b.centroids)
    batch = ds.sample_batch(3)
    la = a.labels(batch)
    assert torch.equal(la, b.labels(batch))
    assert len(torch.unique(la)) == 3
    # each label is the nearest centroid of the voxel's value (feature "value")
    v = batch["v"].reshape(-1).double()
    want = (v[:, None] - a.centroids[:, 0][None]).abs().argmin(1)
    assert torch.equal(la, want)
    c = MoETask(ds, k=3, stage1_steps=5, kmeans_seed=4, kmeans_samples=500, kmeans_features="value_xyzt")
    assert c.centroids.shape == (3, 5)


def test_index_label_schemes(ds):
    batch = ds.sample_batch(1)
    x = batch["x"][0].double()
    sp = MoETask(ds, k=3, pretrain="spatial", stage1_steps=2)
    assert sp.spatial_axis == "x"  # X = 10 is the longest axis
    assert torch.equal(sp.labels(batch), torch.clamp(((x[:, 0] + 1) / 2 * 3).floor().long(), 0, 2))
    tm = MoETask(ds, k=2, pretrain="temporal", stage1_steps=2)
    t = np.unravel_index(batch["index"][0].numpy(), ds.shape)[0]
    assert np.array_equal(tm.labels(batch).numpy(), (t >= 2).astype(np.int64))  # T = 4 -> steps {0,1} | {2,3}
    rd = MoETask(ds, k=5, pretrain="random", stage1_steps=2)
    l1, l2 = rd.labels(batch), rd.labels(ds.sample_batch(1))
    assert torch.equal(l1, l2) and l1.min() >= 0 and l1.max() <= 4 and len(torch.unique(l1)) == 5
    # same voxel -> same label in any batch
    other = ds.sample_batch(9)
    lo = rd.labels(other)
    i1, io = batch["index"][0].numpy(), other["index"][0].numpy()
    common = np.intersect1d(i1, io)
    assert common.size
    m1 = {int(i): int(l) for i, l in zip(i1, l1)}
    assert all(m1[int(i)] == int(l) for i, l in zip(io, lo) if int(i) in m1)
    with pytest.raises(ConfigError, match="temporal"):
        MoETask(ds, k=7, pretrain="temporal")


def test_stage_losses_by_hand(ds):
    torch.manual_seed(0)
    model = MoEINR(M=3, k=3)
    task = MoETask(ds, k=3, stage1_steps=4, kmeans_samples=500)
    assert [task.stage(s) for s in (0, 3, 4, 10)] == [1, 1, 2, 2]
    batch = ds.sample_batch(0)
    with torch.no_grad():
        out = model.forward_all(batch["x"], batch["c"])
    logits, values = out["logits"].reshape(-1, 3), out["values"].reshape(-1, 3)
    v = batch["v"].reshape(-1, 1)
    loss1, terms1, pred = task.training_step(model, batch, 3)
    assert loss1.item() == pytest.approx(F.cross_entropy(logits, task.labels(batch)).item(), rel=1e-5)
    loss1.backward()
    assert all(p.grad is None for p in model.experts.parameters())  # stage 1: experts untouched
    assert model.policy_out.weight.grad is not None and model.enc1.linear.weight.grad is not None
    model.zero_grad(set_to_none=True)
    loss2, terms2, _ = task.training_step(model, batch, 4)
    p = torch.softmax(logits, -1)
    assert loss2.item() == pytest.approx((p * (values - v).abs()).sum(-1).mean().item(), rel=1e-5)
    top = values.gather(1, logits.argmax(1, keepdim=True))
    assert terms2["mse"].item() == pytest.approx(((top - v) ** 2).mean().item() / 4, rel=1e-5)
    assert terms1["stage"].item() == 1 and terms2["stage"].item() == 2
    torch.testing.assert_close(pred.reshape(-1, 1), top)
    l2 = MoETask(ds, k=3, stage1_steps=0, expert_loss="l2", pretrain="none")
    loss, _, _ = l2.training_step(model, batch, 0)
    assert loss.item() == pytest.approx((p * (values - v) ** 2).sum(-1).mean().item(), rel=1e-5)
    lb = MoETask(ds, k=3, stage1_steps=2, pretrain="load_balance")
    loss, terms, _ = lb.training_step(model, batch, 0)
    n = logits.shape[0]
    cnt = torch.bincount(logits.argmax(1), minlength=3).float()
    assert loss.item() == pytest.approx((3 / n ** 2 * (cnt * p.sum(0)).sum()).item(), rel=1e-5)


def test_average_mode_loss(ds):
    torch.manual_seed(0)
    model = MoEINR(M=3, k=3, mode="average")
    task = MoETask(ds, k=3, pretrain="none", var_weight=0.5)
    batch = ds.sample_batch(0)
    loss, terms, pred = task.training_step(model, batch, 0)
    with torch.no_grad():
        vals = model.forward_all(batch["x"], batch["c"])["values"].reshape(-1, 3)
    v = batch["v"].reshape(-1, 1)
    mean, var = vals.mean(-1, keepdim=True), vals.var(-1, unbiased=False, keepdim=True)
    want = (vals - v).abs().mean() + 0.5 * ((var - (mean - v) ** 2) ** 2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def _train(ds, steps, state=None, stop=None):
    torch.manual_seed(0)
    model = MoEINR(M=3, k=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    task = MoETask(ds, k=3, stage1_steps=3, kmeans_samples=400)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        task.load_state_dict(state["task"])
        start = state["step"]
    losses = []
    for step in range(start, stop if stop is not None else steps):
        loss, terms, _ = task.training_step(model, ds.sample_batch(step), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    snap = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "task": task.state_dict(), "step": stop if stop is not None else steps}
    return model, losses, snap


def test_resume_across_stage_boundary_is_exact(ds):
    full, losses, _ = _train(ds, 7)
    _, first, snap = _train(ds, 7, stop=2)  # stops in stage 1
    resumed, rest, _ = _train(ds, 7, state=snap)
    assert first + rest == losses
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    # the experts only moved after the boundary; a run stopped in stage 1 has them at init
    torch.manual_seed(0)
    init = MoEINR(M=3, k=3)
    assert torch.equal(snap["model"]["experts.0.weight"], init.experts[0].weight)
    assert not torch.equal(full.experts[0].weight, init.experts[0].weight)
    with pytest.raises(ConfigError, match="stage-1 steps"):
        MoETask(ds, k=3, stage1_steps=5, kmeans_samples=400).load_state_dict(snap["task"])


def test_config_errors(ds):
    with pytest.raises(ConfigError, match="task.pretrain"):
        MoETask(ds, pretrain="kmeans++")
    with pytest.raises(ConfigError, match="task.k=3 differs from model.k=2"):
        MoETask(ds, k=3, stage1_steps=0, pretrain="none").training_step(MoEINR(M=2, k=2), ds.sample_batch(0), 0)
