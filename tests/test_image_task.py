"""tasks/image/task.py: the image task's test config, and its evaluation of a hand-made run directory.

The model of the fake runs is a stored image P sampled bilinearly (align corners) at x = (column, row): at the
pixel centres it returns P itself, so with P = truth + delta the expected PSNR is -10 log10(mean delta^2),
computed here from the arrays, and the expected SSIM is scikit-image's on (P, truth).
"""
import csv
import json
import logging
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from skimage.metrics import structural_similarity

from models.base import FieldModel
from tasks.image.task import (IMAGE_FIELDS, ImageTask, ImageTestConfig, evaluate_model, format_table,
                         image_channels_from_header)
from util.config import validate_experiment
from util.registry import ConfigError, get, register

BAKE_S = 0.03


@register("model", "_imgtest_bilinear")
class BilinearImage(FieldModel):
    """f(x) = bilinear interpolation (align corners) of a stored (C, height, width) image; bake sleeps BAKE_S and
    forward refuses to run unbaked in eval mode (so the evaluation must bake first).

    Args:
        cond_dim: must be 0 (injected).
        spatial_dims: must be 2 (injected).
        out_dim: channels (injected).
        height: rows of the stored image.
        width: columns of the stored image.
    """

    def __init__(self, cond_dim: int = 0, spatial_dims: int = 2, out_dim: int = 3, height: int = 4, width: int = 4):
        super().__init__()
        assert cond_dim == 0 and spatial_dims == 2
        self.image = torch.nn.Parameter(torch.zeros(out_dim, height, width))
        self.bakes = 0

    def bake(self):
        time.sleep(BAKE_S)
        self.bakes += 1
        super().bake()

    def forward(self, x, c):
        assert c.shape == (x.shape[0], 0)
        assert self.training or self.is_baked, "evaluated without bake()"
        out = F.grid_sample(self.image[None].expand(x.shape[0], -1, -1, -1), x[:, None], mode="bilinear",
                            align_corners=True)  # (B, C, 1, N)
        return out[:, :, 0].transpose(1, 2)


def make_image(tmp_path, H=20, W=26, C=3, seed=0, name="img.png"):
    """uint8 image with 0 at the top-left and 255 at the bottom-right pixel (so the min/max are 0 and 255, also of
    its align-corners x0.5 downsample, whose corners are those pixels)."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    smooth = 127 + 100 * np.sin(i[..., None] / 3.0 + j[..., None] * np.arange(1, C + 1) / 4.0)
    img = np.clip(smooth + rng.normal(0, 15, (H, W, C)), 0, 255).astype(np.uint8)
    img[0, 0], img[-1, -1] = 0, 255
    p = tmp_path / name
    Image.fromarray(img if C == 3 else img[..., 0]).save(p)
    return str(p), img


def make_run(tmp_path, image_path, P, test=None, dataset_extra=None, finished=True, name="run"):
    """A run directory as train.py leaves it (config.yaml, meta.json, model.pt, finished.json), by hand."""
    C, h, w = P.shape
    d = tmp_path / name
    d.mkdir()
    exp = dict(task=dict(type="image"), model=dict(type="_imgtest_bilinear", height=h, width=w),
               dataset=dict(type="image", path=image_path, log2batch=4, **(dataset_extra or {})),
               train=dict(max_steps=10, log_dir=str(tmp_path)), test=test or {})
    exp = validate_experiment(exp)
    (d / "config.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    (d / "meta.json").write_text(json.dumps(dict(task="image", model_inputs=dict(cond_dim=0, spatial_dims=2,
                                                                                 out_dim=C))))
    torch.save({"image": torch.as_tensor(P, dtype=torch.float32)}, d / "model.pt")
    if finished:
        (d / "finished.json").write_text(json.dumps(dict(steps=10)))
    return str(d)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def skimage_ssim(a, b):
    return structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0)


# ------------------------------------------------------------------------------------------------ config
def test_image_task_is_registered_with_its_test_config():
    assert get("task", "image") is ImageTask and ImageTask.test_config is ImageTestConfig
    tc = ImageTestConfig()
    assert tc.ssim_protocol == "tiles" and tc.resolutions == ["full"] and tc.reference_chunk == 2 ** 21


@pytest.mark.parametrize("key, value, match", [
    ("ssim_protocol", "tile", "test.ssim_protocol"), ("ssim_tile", 5, "test.ssim_tile"),
    ("error_gain", 0.0, "test.error_gain"), ("resolutions", ["half"], "test.resolutions"),
    ("resolutions", ["full", "full"], "test.resolutions"), ("chunk_size", 0, "test.chunk_size"),
    ("reference_chunk", 0, "test.reference_chunk"), ("error_colormap", "jet", "test.error_colormap"),
    ("lpips", "yes", "test.lpips"), ("ssim_tile", 1.5, "test.ssim_tile")])
def test_test_config_errors_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        ImageTestConfig(**{key: value})


def test_test_section_of_an_image_run_is_checked_against_the_image_keys(tmp_path):
    path, _ = make_image(tmp_path)
    base = dict(task=dict(type="image"), model=dict(type="_imgtest_bilinear"), dataset=dict(type="image", path=path))
    exp = validate_experiment({**base, "test": dict(ssim_protocol="raster", ssim_tile=64.0)})
    assert exp["test"] == dict(ssim_protocol="raster", ssim_tile=64)
    with pytest.raises(ConfigError, match="ref_k"):  # an ensemble key
        validate_experiment({**base, "test": dict(ref_k=3)})
    with pytest.raises(ConfigError, match="raw_targets"):
        validate_experiment({**base, "test": dict(raw_targets=True, resolutions=["full", "train"])})


def test_model_inputs_without_data_read_the_header(tmp_path):
    gray, _ = make_image(tmp_path, C=1, name="g.png")
    rgb, _ = make_image(tmp_path, name="c.png")
    np.save(tmp_path / "a.npy", np.zeros((5, 6), dtype=np.uint8))
    for path, out in ((gray, 1), (rgb, 3), (str(tmp_path / "a.npy"), 1), (str(tmp_path / "missing.png"), 3)):
        assert ImageTask.model_inputs_without_data(dict(dataset=dict(type="image", path=path))) == dict(
            cond_dim=0, spatial_dims=2, out_dim=out)
    assert image_channels_from_header(str(tmp_path / "missing.png")) is None


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_a_run_psnr_ssim_pngs_csv_and_timing(tmp_path, caplog):
    path, img = make_image(tmp_path)
    truth = (img / 255.0).astype(np.float32)  # the image spans 0..255: normalization = /255
    delta = np.random.default_rng(1).normal(0, 0.03, truth.shape)
    P = (truth + delta).astype(np.float32)  # (H, W, C)
    run = make_run(tmp_path, path, P.transpose(2, 0, 1), test=dict(ssim_tile=64, chunk_size=97))
    with caplog.at_level(logging.INFO):
        rows = ImageTask.evaluate(run, device="cpu")
    assert len(rows) == 1
    r = rows[0]
    expect_psnr = -10 * math.log10(np.mean((P.astype(np.float64) - truth) ** 2))
    assert r["psnr"] == pytest.approx(expect_psnr, abs=1e-3)
    assert r["ssim"] == pytest.approx(skimage_ssim(P.astype(np.float64), truth.astype(np.float64)), abs=1e-4)
    assert math.isnan(r["ssim_raster"]) and r["lpips"] is None  # tiles only; no LPIPS weights in the test
    assert any("LPIPS skipped" in m for m in caplog.messages)
    assert (r["height"], r["width"], r["channels"], r["resolution"], r["split"]) == (20, 26, 3, "full", "image")
    assert r["params"] == P.size and r["chunk_size"] == 97
    assert r["bake_s"] >= BAKE_S and r["infer_s"] == pytest.approx(r["bake_s"] + r["forward_s"])
    assert (r["weights"], r["step"], r["total_steps"], r["final_weights"]) == ("model.pt", 10, 10, True)
    # PNGs: the prediction clipped to 8 bit, and the error image (hot colormap: RGB, black where exact)
    ev = os.path.join(run, "eval")
    pred_png = np.asarray(Image.open(os.path.join(ev, "full_pred.png")))
    np.testing.assert_array_equal(pred_png, np.rint(np.clip(P, 0, 1) * 255).astype(np.uint8))
    err = np.asarray(Image.open(os.path.join(ev, "full_error.png")))
    assert err.shape == (20, 26, 3)
    e = np.clip(np.abs(P - truth).mean(axis=2) * 10, 0, 1)  # gain 10; red channel = min(1, 3 e)
    np.testing.assert_allclose(err[..., 0], np.rint(np.clip(3 * e, 0, 1) * 255), atol=1)
    # metrics.csv
    rows_csv = read_csv(os.path.join(ev, "metrics.csv"))
    from util.evaluation_common import DATA_FIELD, MACHINE_FIELDS

    assert list(rows_csv[0]) == IMAGE_FIELDS + MACHINE_FIELDS + [DATA_FIELD] and len(rows_csv) == 1
    assert rows_csv[0][DATA_FIELD] == "not stored"  # a run directory made by hand: no fingerprint to compare
    assert float(rows_csv[0]["psnr"]) == pytest.approx(expect_psnr, abs=1e-3)
    assert rows_csv[0]["lpips"] == "" and rows_csv[0]["weights"] == "model.pt" and rows_csv[0]["params"] == str(P.size)
    table = ImageTask.format_table(rows)
    assert "psnr" in table.splitlines()[0] and f"{r['psnr']:.4g}" in table and "weights: model.pt" in table


def test_existing_results_are_not_replaced_without_overwrite(tmp_path):
    path, img = make_image(tmp_path, H=12, W=14)
    P = (img / 255.0).astype(np.float32).transpose(2, 0, 1) + 0.01
    run = make_run(tmp_path, path, P)
    ImageTask.evaluate(run, device="cpu", progress=False)
    csv_p = os.path.join(run, "eval", "metrics.csv")
    before = os.path.getmtime(csv_p)
    with pytest.raises(FileExistsError, match="metrics.csv.*--overwrite"):
        ImageTask.evaluate(run, device="cpu")
    assert os.path.getmtime(csv_p) == before
    rows = ImageTask.evaluate(run, device="cpu", overwrite=True, overrides=dict(save_png=False))
    assert rows[0]["psnr"] == pytest.approx(40.0, abs=1e-3)  # constant error 0.01
    other = tmp_path / "elsewhere"
    ImageTask.evaluate(run, out_dir=str(other), device="cpu", overrides=dict(ssim_protocol="raster",
                                                                               reference_chunk=50))
    got = read_csv(other / "metrics.csv")[0]
    assert got["ssim"] == "" and 0 < float(got["ssim_raster"]) <= 1 and got["ssim_protocol"] == "raster"
    with pytest.raises(ConfigError, match="test.bogus"):
        ImageTask.evaluate(run, out_dir=str(tmp_path / "x"), overrides=dict(bogus=1))


def test_super_resolution_run_scored_at_full_and_training_resolution(tmp_path):
    """downsample 2: the model is scored on the full image it never saw and, on request, on the x0.5 training
    image; a constant error of 0.01 on the full image is 40 dB at both (bilinear interpolation of the full image
    at the training lattice is the align-corners downsample)."""
    path, img = make_image(tmp_path, H=22, W=30)
    P = (img / 255.0).astype(np.float32).transpose(2, 0, 1) + 0.01
    run = make_run(tmp_path, path, P, test=dict(resolutions=["full", "train"], ssim_tile=16),
                   dataset_extra=dict(downsample=2, sr_dtype="float32"))
    rows = ImageTask.evaluate(run, device="cpu")
    full, train = rows
    assert (full["resolution"], full["height"], full["width"]) == ("full", 22, 30)
    assert (train["resolution"], train["height"], train["width"]) == ("train", 11, 15)
    assert full["psnr"] == pytest.approx(40.0, abs=1e-3) and train["psnr"] == pytest.approx(40.0, abs=1e-2)
    assert os.path.isfile(os.path.join(run, "eval", "train_pred.png"))
    assert Image.open(os.path.join(run, "eval", "train_pred.png")).size == (15, 11)
    assert full["bake_s"] >= BAKE_S and train["bake_s"] >= BAKE_S  # each resolution's time includes its bake


def test_unfinished_run_scored_with_its_checkpoint_is_recorded(tmp_path, caplog):
    path, img = make_image(tmp_path, H=12, W=12)
    P = (img / 255.0).astype(np.float32).transpose(2, 0, 1)
    run = make_run(tmp_path, path, P, finished=False)
    with caplog.at_level(logging.WARNING):
        rows = ImageTask.evaluate(run, device="cpu")
    assert rows[0]["psnr"] > 100 and not rows[0]["final_weights"]
    assert any("not the final model.pt" in m for m in caplog.messages)


def test_evaluate_model_directly_grayscale_and_cpu_autocast_refused(tmp_path):
    from datasets.image import ImageDataset

    path, img = make_image(tmp_path, H=15, W=13, C=1, name="g.png")
    ds = ImageDataset(path, log2batch=4)
    g = img[..., 0].astype(np.float64) / 255.0
    delta = np.where((np.arange(15)[:, None] + np.arange(13)) % 2 == 0, 0.02, -0.02)
    model = BilinearImage(out_dim=1, height=15, width=13)
    with torch.no_grad():
        model.image.copy_(torch.as_tensor(g + delta, dtype=torch.float32)[None])
    rows = evaluate_model(model, ds, ImageTestConfig(ssim_protocol="both", reference_chunk=40, save_png=False),
                          device="cpu")
    r = rows[0]
    assert r["channels"] == 1 and r["psnr"] == pytest.approx(-10 * math.log10(0.02 ** 2), abs=1e-3)
    assert r["ssim"] == pytest.approx(structural_similarity(g + delta, g, gaussian_weights=True, sigma=1.5,
                                                            use_sample_covariance=False, data_range=1.0), abs=1e-4)
    assert 0 < r["ssim_raster"] < 1 and r["pred_png"] is None and model.bakes == 1
    with pytest.raises(ValueError, match="CUDA"):
        evaluate_model(model, ds, device="cpu", autocast=True)
    assert "psnr" in format_table(rows)
