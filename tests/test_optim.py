"""util/optim.py learning-rate schedules: warm-up, cosine and eta_min values at given steps against hand-computed
numbers and the closed form, per parameter group, and the lr that train.py's loop actually hands Adam at each step.

Convention: the lr of (0-based) step s is the lr after s calls of ``scheduler.step()``; the training loop calls it
once after every optimizer step.
"""
import math

import pytest
import torch

from util.optim import constant, cosine
from util.registry import ConfigError


def optimizer(*lrs):
    """SGD with one single-parameter group per base lr."""
    return torch.optim.SGD([dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=lr) for lr in lrs])


def lrs_over(sched_fn, opt, n_steps, **kw):
    """[[lr of each group] for steps 0..n_steps] under the scheduler built by ``sched_fn(opt, **kw)``."""
    sched = sched_fn(opt, **kw)
    out = []
    for _ in range(n_steps + 1):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_cosine_hand_values():
    """T = 4, base 1, eta_min 0: 1, (1 + cos(pi/4))/2, 1/2, (1 - cos(pi/4))/2, 0, then 0."""
    got = [g[0] for g in lrs_over(cosine, optimizer(1.0), 6, total_steps=4, eta_min=0.0)]
    assert got == pytest.approx([1.0, 0.8535533906, 0.5, 0.1464466094, 0.0, 0.0, 0.0], abs=1e-9)


def test_cosine_anneals_every_group_from_its_own_lr_to_the_absolute_eta_min():
    """spec 3.5 / 4: each group from its own base lr down to eta_min (the same absolute value for all groups);
    after total_steps the lr stays at eta_min. A group whose base lr is below eta_min stays at its base lr."""
    T, e, bases = 10, 1e-4, (1e-2, 1e-3, 5e-5)
    got = lrs_over(cosine, optimizer(*bases), T + 3, total_steps=T, eta_min=e)
    for s, row in enumerate(got):
        t = min(s, T) / T
        expect = [e + (b - e) * 0.5 * (1 + math.cos(math.pi * t)) for b in bases[:2]] + [bases[2]]
        assert row == pytest.approx(expect, rel=1e-9, abs=0), s
    assert got[0][:2] == pytest.approx([1e-2, 1e-3]) and got[T][:2] == pytest.approx([e, e])
    assert got[5][0] == pytest.approx((1e-2 + 1e-4) / 2)  # halfway: the mean of base and eta_min


def test_cosine_with_warmup():
    """Linear warm-up b (s + 1) / W for s < W (b/3, 2b/3, b), then the cosine over the remaining T - W steps,
    starting again at b and reaching eta_min at step T."""
    W, T, b, e = 3, 13, 0.1, 1e-3
    got = [g[0] for g in lrs_over(cosine, optimizer(b), T + 2, total_steps=T, eta_min=e, warmup_steps=W)]
    assert got[:4] == pytest.approx([b / 3, 2 * b / 3, b, b], rel=1e-12)
    for k in range(T - W + 1):
        assert got[W + k] == pytest.approx(e + (b - e) * 0.5 * (1 + math.cos(math.pi * k / (T - W))), rel=1e-12)
    assert got[8] == pytest.approx((b + e) / 2, rel=1e-12)  # k = 5 of 10
    assert got[T:] == pytest.approx([e] * 3, rel=1e-12)


def test_constant_with_and_without_warmup():
    assert [g[0] for g in lrs_over(constant, optimizer(0.2), 5, total_steps=5, warmup_steps=4)] == \
        pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2], rel=1e-12)
    assert [g[0] for g in lrs_over(constant, optimizer(0.2), 3, total_steps=3)] == [0.2] * 4


@pytest.mark.parametrize("warmup", [-1, 10, 11])
def test_cosine_rejects_warmup_outside_the_run(warmup):
    with pytest.raises(ConfigError, match="warmup_steps"):
        cosine(optimizer(1.0), total_steps=10, warmup_steps=warmup)


def test_training_loop_applies_the_schedule_at_every_step(tmp_path, monkeypatch):
    """The lr of each group when train.py calls Adam.step at step s is the closed-form lr(s) of a 2-step warm-up
    plus cosine over max_steps (scheduler stepped once per optimizer step, total_steps = max_steps)."""
    from tests.test_train import run_train, tiny_config

    seen = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return adam_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    T, W, b, e = 7, 2, 1e-2, 1e-3
    cfg = tiny_config(tmp_path, max_steps=T, checkpoint_every_steps=100)
    run_train(cfg, "--set", f"optim.lr={b}", "--set", f"scheduler={{type: cosine, eta_min: {e}, warmup_steps: {W}}}")
    expect = [b * (s + 1) / W if s < W else e + (b - e) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))
              for s in range(T)]
    assert [row[0] for row in seen] == pytest.approx(expect, rel=1e-9)


def test_multistep_halves_at_fraction_and_step_milestones():
    import torch

    from util.optim import multistep

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.8)
    sch = multistep(opt, total_steps=10, milestones=[0.3, 8], gamma=0.5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.4, 0.4, 0.2, 0.2])
    with pytest.raises(Exception, match="milestones must increase"):
        multistep(torch.optim.SGD([p], lr=1.0), total_steps=10, milestones=[8, 0.3])
