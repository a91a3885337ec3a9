"""MoE-INR end to end through the one training loop (util.training.train: both stages in one run, the task's
state in the checkpoint) and the task's evaluation (fp16 artifact, metrics files), on a tiny volume."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

import tasks.moe_inr.task  # noqa: F401  (registers task moe_inr until tasks/__init__.py lists it)
from tasks.moe_inr.evaluation import load_fp16
from tasks.moe_inr.task import MoETask
from util.config import load_config
from util.training import train


def _volume(tmp_path):
    t, z, y, x = np.meshgrid(np.arange(3), np.arange(6), np.arange(7), np.arange(8), indexing="ij")
    a = (np.exp(-((x - 2 - t) ** 2 + (y - 3) ** 2 + (z - 3) ** 2) / 5.0)).astype(np.float32)
    np.save(tmp_path / "v.npy", a)
    return a


def test_train_and_evaluate(tmp_path):
    a = _volume(tmp_path)
    cfg = [{"name": "moe_tiny",
            "task": {"type": "moe_inr", "k": 3, "stage1_steps": 4, "kmeans_samples": 300},
            "model": {"type": "moe_inr", "M": 3, "k": 3},
            "dataset": {"type": "time_volume", "path": str(tmp_path / "v.npy"), "batch_size": 128},
            "optim": {"type": "adam", "lr": 1e-3},
            "scheduler": {"type": "constant"},
            "train": {"max_steps": 8, "log_every": 2, "checkpoint_every_steps": 4, "log_dir": str(tmp_path / "runs"),
                      "collapse_check_steps": 0},
            "test": {"isovalues": [0.0], "ssim": False, "chunk_size": 500}}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = train(load_config(str(path)), progress=False)
    meta = json.load(open(os.path.join(run, "meta.json")))
    assert meta["shape"] == [3, 6, 7, 8] and meta["task"] == "moe_inr"
    rows = MoETask.evaluate(run)
    inr = rows[0]
    n = 77 * 9 + 35 * 3 + 17 * 9 + 6
    assert inr["params"] == n
    # the weights scored, in the rows and in metrics.json (the template's record)
    assert (inr["weights"], inr["step"], inr["total_steps"], inr["final_weights"]) == ("model.pt", 8, 8, True)
    assert json.load(open(os.path.join(run, "eval", "metrics.json")))[0]["weights"] == "model.pt"
    assert inr["cr_params"] == pytest.approx(a.size * 4 / (2 * n))
    art = os.path.join(run, "eval", "weights_fp16.bin")
    assert inr["file_bytes"] == os.path.getsize(art)
    assert np.isfinite(inr["psnr"]) and inr["decompress_s"] > 0
    # the evaluated weights are the fp16 artifact's values
    trained = torch.load(os.path.join(run, "model.pt"), map_location="cpu")
    stored = load_fp16(art)
    assert torch.equal(stored["fourier.weight"], trained["fourier.weight"].half().float())
    lines = open(os.path.join(run, "eval", "per_step.csv")).read().splitlines()
    assert len(lines) == 1 + 3 and lines[0].startswith("t,")
    with pytest.raises(FileExistsError):
        MoETask.evaluate(run)
    assert "moe_inr" in MoETask.format_table(rows)


def _train_two_steps(tmp_path, name, task, model):
    """A 2-step run on the tiny volume (batch 64, no isosurfaces or SSIM, the volume saved by the evaluation)."""
    cfg = [{"name": name, "task": {"type": "moe_inr", "pretrain": "none", **task},
            "model": {"type": "moe_inr", "M": 3, **model},
            "dataset": {"type": "time_volume", "path": str(tmp_path / "v.npy"), "batch_size": 64},
            "optim": {"type": "adam", "lr": 1e-3}, "scheduler": {"type": "constant"},
            "train": {"max_steps": 2, "log_every": 1, "log_dir": str(tmp_path / "runs"), "collapse_check_steps": 0},
            "test": {"isovalues": [], "ssim": False, "save_volume": True}}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return train(load_config(str(path)), progress=False)


def test_average_mode_evaluation(tmp_path):
    _volume(tmp_path)
    run = _train_two_steps(tmp_path, "moe_avg", {"k": 3, "var_weight": 0.1}, {"k": 3, "mode": "average"})
    row = MoETask.evaluate(run)[0]
    assert -1.0 <= row["pc"] <= 1.0 and 0.0 <= row["ji_st"] <= 1.0
    vol = np.load(os.path.join(run, "eval", "decompressed.npy"))
    assert vol.shape == (3, 6, 7, 8) and np.isfinite(vol).all()


def test_lpips_on_slices_when_available_and_one_line_otherwise(tmp_path, monkeypatch, caplog):
    """Without local LPIPS weights the column is empty and one log line names why; with an LPIPS model (a
    stand-in: mean absolute difference of its inputs) it is the mean over time steps and the three middle
    slices of the [0, 1]-mapped values, computed here from the raw volume (global min-max to [-1, 1])."""
    import logging

    import tasks.image.evaluation as ie

    a = _volume(tmp_path).astype(np.float64)
    run = _train_two_steps(tmp_path, "moe_lp", {"k": 2}, {"k": 2})
    with caplog.at_level(logging.INFO):
        row = MoETask.evaluate(run)[0]
    assert row["lpips"] is None
    assert sum("LPIPS skipped" in r.getMessage() for r in caplog.records) == 1

    class StandIn:
        def __call__(self, x, y, normalize=False):
            assert normalize and x.shape[1] == 3
            return (x - y).abs().mean()

    monkeypatch.setattr(ie, "load_lpips", lambda device="cpu": StandIn())
    row = MoETask.evaluate(run, overwrite=True)[0]
    pred = np.load(os.path.join(run, "eval", "decompressed.npy")).astype(np.float64)
    gt = 2 * (a - a.min()) / (a.max() - a.min()) - 1
    want = np.mean([np.mean([np.abs((np.take(p, p.shape[ax] // 2, ax) - np.take(g, g.shape[ax] // 2, ax)) / 2).mean()
                             for ax in range(3)]) for p, g in zip(pred, gt)])
    assert row["lpips"] == pytest.approx(want, rel=1e-5)
