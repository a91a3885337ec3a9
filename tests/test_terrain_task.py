"""Terrain task: training step, metrics against hand computations (analytic surfaces, known offsets, seams),
autodiff derivatives against closed forms, the benchmark rows, and train.py / test.py end to end on tiny data."""
import csv
import math
import os

import numpy as np
import pytest
import torch
import yaml

from datasets.terrain import TerrainDataset
from tasks.terrain.task import (TerrainTask, TerrainTestConfig, _autodiff_derivatives, benchmark, seam_masks,
                           tile_metrics)
from util.registry import ConfigError, build

TINY = dict(patch_size=4, latent_dim=6, enc_width=16, enc_depth=1, enc_heads=2, dec_width=16, dec_depth=1, dec_heads=2)


def _data(tmp_path, n=4, size=32, T=16, **kw):
    from datasets.terrain_gen import fractal_surface

    for i in range(n):
        np.save(tmp_path / f"r{i}.npy", (200.0 * fractal_surface(size, seed=i) + 50 * i).astype(np.float32))
    return TerrainDataset(str(tmp_path), tile_size=T, val_fraction=0.25, test_fraction=0.25, batch_size=4, **kw)


def _gt(t_n, mu=10.0, sd=2.0):
    B = t_n.shape[0]
    return {"tile": t_n, "mu": torch.full((B,), mu, dtype=torch.float64), "sigma": torch.full((B,), sd,
                                                                                             dtype=torch.float64)}


def test_metrics_by_hand():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 1, 8, 8, generator=g)
    m = tile_metrics(t.clone(), _gt(t), gsd=1.0, patch=4, seam_width=1)
    for k in ("mse_n", "mse_m", "grad_se", "lap_se", "slope_ae", "seam_step_se", "step_se"):
        assert float(m[k].abs().max()) < 1e-12, k
    # a constant offset c (normalized): mse c^2, PSNR 10 log10(R^2 / c^2), metres: (c sigma)^2; derivatives exact
    m = tile_metrics(t + 0.1, _gt(t), gsd=1.0, patch=4, seam_width=1)
    R = (t.amax(dim=(1, 2, 3)) - t.amin(dim=(1, 2, 3))).double()
    torch.testing.assert_close(m["mse_n"], torch.full((2,), 0.01, dtype=torch.float64))
    torch.testing.assert_close(10 * torch.log10(m["peak_n"] ** 2 / m["mse_n"]), 10 * torch.log10(R ** 2 / 0.01))
    torch.testing.assert_close(m["mse_m"], torch.full((2,), 0.04, dtype=torch.float64))
    assert float(m["grad_se"].max()) < 1e-10
    # a jump of 0.5 (normalized) on the right half: only steps across the seam at column 3|4 differ
    p = t.clone()
    p[..., 4:] += 0.5
    m = tile_metrics(p, _gt(t), gsd=1.0, patch=4, seam_width=1)
    # seam steps: the 8 rows' column steps 3->4 (error 0.5 * sigma = 1 m) among 8 + 8 crossing steps
    torch.testing.assert_close(m["seam_step_se"], torch.full((2,), 8 * 1.0 / 16, dtype=torch.float64))
    assert float(m["step_se"].max()) < 1e-10
    assert torch.all(m["seam_mse_n"] >= 0) and torch.all(m["inner_mse_n"] > 0)


def test_seam_masks():
    pix, cross = seam_masks(8, 4, 1)
    near = [3, 4]
    for i in range(8):
        for j in range(8):
            assert bool(pix[i, j]) == (i in near or j in near)
    assert cross[0].tolist() == [False, False, False, True, False, False, False]


class _Analytic(torch.nn.Module):
    """decode_points(z, x) = z0 * x0^2 + sin(3 x1) (x0 = column, x1 = row coordinate)."""

    def decode_points(self, z, x):
        return (z[:, :1, :1] * x[..., :1] ** 2 + torch.sin(3 * x[..., 1:]))


def test_autodiff_derivatives_against_closed_form():
    T = 9
    z = torch.full((1, 1, 1), 2.0)
    g_r, g_c, lap = _autodiff_derivatives(_Analytic(), z, T)
    a = torch.linspace(-1, 1, T)[1:-1]
    k = 2.0 / (T - 1)  # coordinate units per pixel
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    torch.testing.assert_close(g_c[0], 4 * cols * k)
    torch.testing.assert_close(g_r[0], 3 * torch.cos(3 * rows) * k)
    torch.testing.assert_close(lap[0], (4 - 9 * torch.sin(3 * rows)) * k * k)


def test_training_step_and_benchmark(tmp_path):
    ds = _data(tmp_path)
    task = TerrainTask(ds)
    assert task.model_inputs() == {"spatial_dims": 2, "tile_size": 16}
    torch.manual_seed(0)
    model = build("model", "huvr_siren", injected=task.model_inputs(), siren_width=16, **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = task.batch(0, 0, "cpu")
    first = task.training_step(model, batch, 0)
    assert set(first.terms) == {"mse"} and first.output.shape == (4, 1, 16, 16)
    for s in range(30):
        out = task.training_step(model, batch, s)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.7 * first.loss.item()
    res = benchmark(model, ds, TerrainTestConfig(max_tiles=3, ptq_bits=[8, 2], flops=True, timing_repeats=1))
    row = res["row"]
    assert row["tiles"] == 3 and row["floats"] == 17 * 6 and row["bpp"] == pytest.approx(32 * 102 / 256)
    assert row["derivatives"] == "autodiff" and row["gflops_infer"] > 0 and math.isfinite(row["seam_dpsnr"])
    p8, p2 = res["ptq"]
    assert p8["bpp"] == pytest.approx((102 * 8 + 6 * 16) / 256) and p8["bpp_ent"] <= p8["bpp"]
    assert abs(p8["psnr"] - row["psnr"]) < 0.5 and p2["psnr"] < p8["psnr"]
    assert p8["scope"] == "tile" and len(res["tiles"]) == 3
    # 16 bits: the decoded payloads are the fp32 pass's, so the quality is the fp32 row's to ~1e-3 dB
    p16 = benchmark(model, ds, TerrainTestConfig(max_tiles=3, ptq_bits=[16], flops=False, timing_repeats=1))["ptq"][0]
    assert abs(p16["psnr"] - row["psnr"]) < 1e-2


def test_one_token_payload_is_quantized_over_the_evaluated_set(tmp_path):
    # Functa's payload is one vector per tile: ptq_scope auto picks dataset scales, shared by every evaluated
    # tile (5 tiles in batches of 2: the side bits are shared by 5, not 2) and an entropy coder fit on the set
    ds = _data(tmp_path, n=4, size=48, T=16, split_by="none")
    torch.manual_seed(0)
    model = build("model", "functa", injected=TerrainTask(ds).model_inputs(), latent_dim=8, width=16,
                  hidden_layers=1, omega_0=10.0, inner_steps=2, inner_lr_init=1.0)
    tc = TerrainTestConfig(max_tiles=5, batch_size=2, ptq_bits=[4], flops=False, timing_repeats=1)
    p4 = benchmark(model, ds, tc)["ptq"][0]
    assert p4["scope"] == "dataset" and p4["bpp"] == pytest.approx((8 * 4 + 8 * 16 / 5) / 256)
    assert p4["bpp_ent"] < p4["bpp"]
    # per-tile scales on one token: every value is its own scale -> lossless at any width, 16 side bits per value
    tc.ptq_scope = "tile"
    t4 = benchmark(model, ds, tc)
    assert t4["ptq"][0]["scope"] == "tile" and t4["ptq"][0]["bpp"] == pytest.approx((8 * 4 + 8 * 16) / 256)
    assert abs(t4["ptq"][0]["psnr"] - t4["row"]["psnr"]) < 1e-2


def test_encode_steps_of_an_inner_loop_encoder(tmp_path):
    # test.encode_steps changes Functa's inner loop at evaluation: the row records it, the infer FLOPs follow
    # (1 + 3 steps) decoder passes, and the payload differs; a one-pass encoder refuses the key
    ds = _data(tmp_path, n=4, size=32, T=16, split_by="none")
    torch.manual_seed(0)
    model = build("model", "functa", injected=TerrainTask(ds).model_inputs(), latent_dim=4, width=8,
                  hidden_layers=1, omega_0=5.0, inner_steps=2, inner_lr_init=1.0)
    base = dict(max_tiles=2, ptq_bits=[], timing_repeats=1, figure_tiles=0)
    r2 = benchmark(model, ds, TerrainTestConfig(**base))["row"]
    r5 = benchmark(model, ds, TerrainTestConfig(encode_steps=5, **base))["row"]
    assert r2["encode_steps"] == 2 and r5["encode_steps"] == 5
    assert r5["gflops_infer"] / r2["gflops_infer"] == pytest.approx(16 / 7, rel=1e-6)
    assert r5["psnr"] != r2["psnr"]
    huvr = build("model", "huvr", injected=TerrainTask(ds).model_inputs(), mlp_width=8, mlp_depth=1,
                 upsampler_channels=4, **TINY)
    with pytest.raises(ConfigError, match="test.encode_steps applies to .*HUVR encodes in one forward pass"):
        benchmark(huvr, ds, TerrainTestConfig(encode_steps=5, **base))
    with pytest.raises(ConfigError, match="test.encode_steps"):
        TerrainTestConfig(encode_steps=0)


def test_terrain_task_rejects_other_data_and_bad_test_keys():
    with pytest.raises(ConfigError, match="needs a dataset of type 'terrain'"):
        TerrainTask(object())
    with pytest.raises(ConfigError, match="test.derivatives"):
        TerrainTestConfig(derivatives="spline")
    with pytest.raises(ConfigError, match="test.ptq_bits"):
        TerrainTestConfig(ptq_bits=[1])


def test_train_and_test_end_to_end(tmp_path, monkeypatch):
    from test import main as test_main
    from train import main as train_main

    (tmp_path / "dem").mkdir()
    _data(tmp_path / "dem")
    cfg = [{"name": "tiny_huvr", "task": {"type": "terrain"},
            "model": {"type": "huvr", "mlp_width": 8, "mlp_depth": 1, "upsampler_channels": 4, **TINY},
            "dataset": {"type": "terrain", "path": str(tmp_path / "dem"), "tile_size": 16, "val_fraction": 0.25,
                        "test_fraction": 0.25, "batch_size": 4, "gsd": 3.0},
            "optim": {"type": "adam", "lr": 1e-3}, "scheduler": {"type": "constant"},
            "train": {"max_steps": 6, "log_every": 3, "log_dir": str(tmp_path / "runs"), "val_every_steps": 4},
            "test": {"max_tiles": 4, "ptq_bits": [8], "timing_repeats": 1, "flops": False}}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_main(["--config", str(path), "--no_progress"])
    run = tmp_path / "runs" / "tiny_huvr"
    assert (run / "finished.json").is_file()
    # validation at step 4 and at the end; the last row is the final model's score on the validation tiles
    with open(run / "val.csv") as f:
        val = list(csv.DictReader(f))
    assert [int(r["step"]) for r in val] == [4, 6]
    from util.build import build_dataset, load_trained_model
    from util.run_dir import load_experiment

    model, _, _ = load_trained_model(str(run))
    ds = build_dataset(load_experiment(str(run)))
    t = ds.tiles(ds.split_indices("val"))["tile"]
    with torch.no_grad():
        e = ((model.eval().decode(model.encode(t)) - t) ** 2).mean(dim=(1, 2, 3)).double()
    r = (t.amax(dim=(1, 2, 3)) - t.amin(dim=(1, 2, 3))).double()
    assert float(val[-1]["mse"]) == pytest.approx(float(e.mean()), rel=1e-5)
    assert float(val[-1]["psnr"]) == pytest.approx(float((10 * torch.log10(r ** 2 / e)).mean()), rel=1e-5)
    test_main(["--run", str(run), "--no_progress"])
    with open(run / "eval" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["model"] == "HUVR" and int(rows[0]["tiles"]) == 4 and float(rows[0]["psnr"]) > 0
    assert (rows[0]["weights"], rows[0]["step"], rows[0]["total_steps"]) == ("model.pt", "6", "6")
    assert rows[0]["pixel_m"] == "3 x 3"  # dataset.gsd
    assert (run / "eval" / "ptq.csv").is_file()
    with open(run / "eval" / "tiles.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # several runs in one table, test-section overrides from the command line (out of domain: another source)
    cfg_b = [{**cfg[0], "name": "tiny_huvr_b", "train": {**cfg[0]["train"], "max_steps": 3}}]
    (tmp_path / "cfg_b.yaml").write_text(yaml.safe_dump(cfg_b))
    train_main(["--config", str(tmp_path / "cfg_b.yaml"), "--no_progress"])
    run_b = tmp_path / "runs" / "tiny_huvr_b"
    (tmp_path / "ood").mkdir()
    np.savez(tmp_path / "ood" / "x.npz", elevation=np.linspace(0, 50, 48 * 48, dtype=np.float32).reshape(48, 48),
             dx=5.0, dy=4.0)
    test_main(["--run", str(run), str(run_b), "--test", f"data_path={tmp_path / 'ood'}", "--test", "ptq_bits=[6, 4]",
               "--test", "test.max_tiles=2", "--test", "figure_tiles=0", "--out_name", "eval_ood", "--no_progress"])
    for r in (run, run_b):
        with open(r / "eval_ood" / "metrics.csv") as f:
            row = next(csv.DictReader(f))
        assert int(row["tiles"]) == 2 and row["data"] == str(tmp_path / "ood") and row["method"] == r.name
        assert row["pixel_m"] == "4 x 5"  # the other source's own pixel size, not the training data's gsd
        assert not (r / "eval_ood" / "tiles.png").exists()
        with open(r / "eval_ood" / "ptq.csv") as f:
            assert [int(q["bits"]) for q in csv.DictReader(f)] == [6, 4]
    for bad, msg in ((["--test", "model.width=3"], "key of the test section"), (["--test", "max_tiles"], "KEY=VALUE"),
                     (["--test", "no_such_key=1"], "no_such_key"), (["--out_dir", str(tmp_path / "x")], "--out_name")):
        with pytest.raises(SystemExit, match=msg):
            test_main(["--run", str(run), str(run_b), *bad, "--overwrite", "--no_progress"])
    # predict.py predicts ensemble members: a terrain run is refused with one line saying what to use
    from predict import main as predict_main

    with pytest.raises(SystemExit, match="'terrain' run: predict.py .* test.py"):
        predict_main(["--run", str(run), "--values", "0.5", "--out", str(tmp_path / "p.npy")])
