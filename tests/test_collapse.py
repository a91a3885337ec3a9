"""The early-collapse guard: the mechanism (sigmoid output saturates at a high lr with the paper's init, not with
``init_output_mean: auto``), the detector that stops such a run, and the per-interval progress output."""
import csv
import os

import pytest
import torch
import yaml

from models.drrnet import DRRNet
from util.registry import build

TINY = dict(spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2, spatial_refiner_layers=1,
            cond_resolutions=[2, 4], cond_channels=2, cond_refiner_layers=1, hidden_dim=16, decoder_layers=2)


def _bump_data(n=32, seed=0):
    """A low-mean field (mean ~0.05, like CloverLeaf energy's 0.13): a narrow bump whose centre moves with c."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, generator=g)
    x = torch.rand(n, 256, 3, generator=g) * 2 - 1
    d = ((x[..., :2] - (c * 1.2 - 0.6)[:, None, :]) ** 2).sum(-1)
    return x, c, (torch.exp(-d / 0.05) * 0.9 + 0.02)[..., None]


def _train(init, lr, steps=60):
    x, c, v = _bump_data()
    torch.manual_seed(0)
    model = DRRNet(cond_dim=2, spatial_dims=3, init_output_mean=init, **TINY)
    opt = build("optimizer", "adam", injected={"model": model}, lr=lr)  # the project's Adam (paper eps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(c), (8,), generator=gen)
        loss = ((model(x[i], c[i]) - v[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(x, c)
    return pred, float(((pred - v) ** 2).mean()), float(((v - v.mean()) ** 2).mean())


@pytest.mark.parametrize("lr", [1e-2, 3e-2])
def test_high_lr_collapses_with_paper_init_not_with_data_mean(lr):
    x, c, v = _bump_data()
    pred, mse, var = _train(None, lr)
    assert float(pred.std()) < 1e-6 and float(pred.abs().max()) < 1e-6  # dead: sigmoid saturated at 0
    pred, mse_auto, _ = _train(float(v.mean()), lr)
    assert float(pred.std()) > 1e-2
    assert mse_auto < 0.8 * var  # learnt something beyond the mean field


def test_auto_is_resolved_from_the_dataset_mean():
    from util.build import build_model

    exp = dict(model=dict(type="drrnet", **TINY))
    m = build_model(exp, 2, 3, output_mean=0.2)
    assert torch.sigmoid(m.decoder.net[-1].bias).item() == pytest.approx(0.2, rel=1e-5)
    m = build_model(dict(model=dict(type="drrnet", init_output_mean=None, **TINY)), 2, 3, output_mean=0.2)
    assert abs(torch.sigmoid(m.decoder.net[-1].bias).item() - 0.2) > 1e-3  # null keeps the paper init
    m = build_model(dict(model=dict(type="drrnet", init_output_mean=0.7, **TINY)), 2, 3, output_mean=0.2)
    assert torch.sigmoid(m.decoder.net[-1].bias).item() == pytest.approx(0.7, rel=1e-5)
    for typ in ("explorable_inr", "fainr"):  # reference default: null; auto and numbers accepted
        small = dict(grid_size=4, plane_size=4, line_size=4) if typ == "explorable_inr" else \
            dict(num_entries=8, top_k=2, num_hidden_layers=1, mlp_encoder_dim=8, n_experts=2, manager_res=4)
        ref = build_model(dict(model=dict(type=typ, **small)), 2, 3, output_mean=0.2)
        assert abs(torch.sigmoid(ref.decoder[-1].bias).item() - 0.2) > 1e-3
        m = build_model(dict(model=dict(type=typ, init_output_mean="auto", **small)), 2, 3, output_mean=0.2)
        assert torch.sigmoid(m.decoder[-1].bias).item() == pytest.approx(0.2, rel=1e-5)


def test_bad_init_output_mean_is_rejected():
    from util.registry import ConfigError

    for bad in ("mean", [0.1], float("nan"), True):
        with pytest.raises(ConfigError, match="init_output_mean"):
            DRRNet(cond_dim=2, spatial_dims=3, init_output_mean=bad, **TINY)


def _write_bump_ensemble(root, n=10, res=8):
    """Members: a narrow bump on a low background (normalized mean ~0.05), its centre set by 2 parameters."""
    import numpy as np

    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    rng = np.random.default_rng(0)
    params = rng.random((n, 2))
    ax = np.linspace(-1, 1, res)
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    for i, (a, b) in enumerate(params):
        field = np.exp(-((x - (1.2 * a - 0.6)) ** 2 + (y - (1.2 * b - 0.6)) ** 2) / 0.05) + 0.02 * z
        np.save(os.path.join(root, "data", f"m{i:03d}.npy"), field.astype(np.float32))
    np.save(os.path.join(root, "cond.npy"), np.concatenate([np.arange(n)[:, None], params], 1).astype(np.float32))
    np.save(os.path.join(root, "split.npy"), dict(cond_idx=np.arange(n - 2), cond_idx_unseen=np.arange(n - 2, n)))


def _config(tmp_path, init, lr, steps):
    root = str(tmp_path / "bump")
    _write_bump_ensemble(root)
    exp = dict(
        model=dict(type="drrnet", init_output_mean=init, **TINY),
        dataset=dict(type="ensemble", data_dir=root + "/data", cond_path=root + "/cond.npy",
                     cond_split_path=root + "/split.npy", cond_batch=4, spatial_log2batch=8),
        optim=dict(type="adam", lr=lr),
        scheduler=dict(type="cosine"),
        train=dict(max_steps=steps, log_dir=str(tmp_path / "runs"), checkpoint_every_steps=1000, log_every=5,
                   collapse_patience=3),
    )
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump([exp]))
    return str(p)


def _log_steps(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_detector_stops_a_collapsed_run_and_leaves_a_healthy_one_alone(tmp_path, capsys):
    from train import main

    cfg = _config(tmp_path, None, 0.05, 400)
    with pytest.raises(SystemExit, match="collapsed at step .*init_output_mean: auto"):
        main(["--config", cfg, "--no_progress", "--set", "train.run_name=dead"])
    dead = str(tmp_path / "runs" / "dead")
    steps = _log_steps(dead)
    assert steps and steps[-1] <= 60  # stopped within a bounded number of steps, not after 400
    assert not os.path.exists(os.path.join(dead, "finished.json"))
    capsys.readouterr()
    main(["--config", cfg, "--no_progress", "--set", "train.run_name=alive", "--set", "model.init_output_mean=auto",
          "--set", "train.max_steps=40"])
    out = capsys.readouterr().out
    alive = str(tmp_path / "runs" / "alive")
    assert os.path.isfile(os.path.join(alive, "finished.json"))
    assert _log_steps(alive) == list(range(5, 45, 5))
    # --no_progress: one printed line per log interval with step, loss, psnr, lr, elapsed and ETA
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 8 and lines[0].startswith("step 5/40")
    for key in ("loss", "psnr", "lr", "elapsed", "eta"):
        assert f" {key} " in lines[-1]


def test_log_csv_is_appended_every_interval_not_only_at_checkpoints(tmp_path, monkeypatch):
    """Read log.csv at each checkpoint-free log interval while training runs: the rows are already there."""
    import util.training as tr

    cfg = _config(tmp_path, "auto", 1e-3, 20)
    seen = []
    orig = tr.progress_line

    def spy(done, *a, **k):
        seen.append((done, _log_steps(str(tmp_path / "runs" / "live"))[-1]))
        return orig(done, *a, **k)

    monkeypatch.setattr(tr, "progress_line", spy)
    from train import main

    main(["--config", cfg, "--no_progress", "--set", "train.run_name=live"])
    assert seen == [(5, 5), (10, 10), (15, 15), (20, 20)]
