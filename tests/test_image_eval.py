"""tasks/image/evaluation.py: reconstruction, timing, PSNR protocols, tiled and raster SSIM, LPIPS gating, PNGs, driver."""
import logging
import math
import os
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

import tasks.image.evaluation as ie
from tasks.image.evaluation import (chunked_mse, error_image, evaluate_image, image_coords, inference_time,
                             iter_predictions, psnr, raster_window, reconstruct, save_png, ssim_raster, ssim_tiles,
                             tile_edges, to_uint8)


def rand_img(h, w, c=3, seed=0, smooth=True):
    rng = np.random.default_rng(seed)
    img = rng.random((h, w, c))
    if smooth:  # some structure so SSIM is not trivial
        i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        img = 0.5 * img + 0.5 * (0.5 + 0.5 * np.sin(i[..., None] / 3.0 + j[..., None] * np.arange(1, c + 1) / 5.0))
    return img


def lookup_model(pred):
    """model_fn returning pred[row, col] at pixel-lattice coordinates (x = (col, row)); counts calls."""
    H, W, _ = pred.shape
    table = torch.from_numpy(pred.astype(np.float32))

    def fn(x):
        fn.calls += 1
        col = torch.round((x[0, :, 0].double() + 1) / 2 * (W - 1)).long()
        row = torch.round((x[0, :, 1].double() + 1) / 2 * (H - 1)).long()
        return table[row, col][None]

    fn.calls = 0
    return fn


def naive_ssim(a, b, win=11, sigma=1.5, k1=0.01, k2=0.03):
    """Direct SSIM of 2D a, b: every valid window position, explicit 2D Gaussian weights, population moments."""
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    g2 = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = k1 ** 2, k2 ** 2
    vals = []
    for i in range(a.shape[0] - win + 1):
        for j in range(a.shape[1] - win + 1):
            x, y = a[i:i + win, j:j + win], b[i:i + win, j:j + win]
            mx, my = (g2 * x).sum(), (g2 * y).sum()
            vx, vy = (g2 * x * x).sum() - mx ** 2, (g2 * y * y).sum() - my ** 2
            cxy = (g2 * x * y).sum() - mx * my
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


# ------------------------------------------------------------------------------------------- reconstruction
def test_image_coords_row_major_column_first():
    x = image_coords(3, 4, 0, 12).numpy()
    assert x.shape == (12, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[:4, 0], [-1, -1 / 3, 1 / 3, 1], atol=1e-7)  # first row: columns vary
    np.testing.assert_allclose(x[:4, 1], -1)
    np.testing.assert_allclose(x[[0, 4, 8], 1], [-1, 0, 1])  # row = flat // W
    np.testing.assert_array_equal(image_coords(3, 4, 5, 9).numpy(), x[5:9])
    with pytest.raises(ValueError):
        image_coords(3, 4, 0, 13)


def test_reconstruct_in_chunks_and_bad_model_output():
    pred = rand_img(7, 9, 2)
    fn = lookup_model(pred)
    starts = [s for s, p, dt in iter_predictions(fn, 7, 9, chunk_size=10)]
    assert starts == list(range(0, 63, 10)) and fn.calls == 7
    out = reconstruct(fn, 7, 9, chunk_size=10)
    assert out.shape == (7, 9, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, pred, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(1, n, C\)"):
        reconstruct(lambda x: x[0], 3, 3)


def test_inference_time_is_bake_plus_forward_chunks():
    calls = []

    def slow(x):
        time.sleep(0.01)
        return torch.zeros(1, x.shape[1], 3)

    t = inference_time(slow, 5, 6, chunk_size=7, bake=lambda: (calls.append(1), time.sleep(0.05)))
    assert calls == [1]
    assert t["bake_s"] >= 0.05 and t["forward_s"] >= 5 * 0.01  # ceil(30 / 7) = 5 timed calls
    assert math.isclose(t["infer_s"], t["bake_s"] + t["forward_s"]) and t["points"] == 30
    assert math.isclose(t["points_per_s"], 30 / t["infer_s"])
    assert inference_time(slow, 2, 2)["bake_s"] == 0.0


# ------------------------------------------------------------------------------------------------ PSNR
def test_psnr_whole_image_and_reference_chunked_mse_by_hand():
    truth = np.zeros((2, 3, 1))
    assert math.isclose(psnr(truth + 0.1, truth), 20.0) and psnr(truth, truth) == math.inf
    # 5 pixels x 2 channels, chunks of 2 pixels: squared errors per chunk 1, 4, 9 (last chunk: 1 pixel)
    t = np.zeros((1, 5, 2))
    p = np.array([1, 1, 2, 2, 3], dtype=np.float64)[None, :, None] * np.ones((1, 1, 2))
    assert math.isclose(chunked_mse(p, t, chunk=2), (1 + 4 + 9) / 3)  # short last chunk weighted as a full one
    assert math.isclose(ie.mse(p, t), (2 * 1 + 2 * 4 + 9) / 5)
    assert math.isclose(chunked_mse(p, t, chunk=5), ie.mse(p, t))
    assert math.isclose(ie.psnr_chunked(p, t, chunk=2), -10 * math.log10(14 / 3))
    with pytest.raises(ValueError, match="shape"):
        psnr(p, t[:, :4])


# ------------------------------------------------------------------------------------------------ SSIM
def test_raster_window_matches_the_spec():
    assert raster_window(23466, 20000) == (1569, 1337)
    assert raster_window(21450, 56718) == (891, 2355)
    assert raster_window(10, 30, chunk=300) == (10, 30)


def test_tile_edges_near_equal():
    np.testing.assert_array_equal(tile_edges(10, 4), [0, 3, 6, 10])
    np.testing.assert_array_equal(tile_edges(8, 8), [0, 8])
    np.testing.assert_array_equal(tile_edges(8, 100), [0, 8])
    e = tile_edges(1000, 300)
    assert len(e) == 5 and np.diff(e).max() <= 300 and np.diff(e).max() - np.diff(e).min() <= 1


def test_tiled_ssim_against_skimage():
    """One tile covering the image = skimage's SSIM (Gaussian 11-tap window, sigma 1.5, population covariance,
    data range 1): skimage pads and then crops the 5-pixel border, which leaves our valid region; several tiles =
    the mean over tiles of skimage on each tile."""
    truth = rand_img(24, 36, 3, seed=1)  # tile 12 -> 2 x 3 tiles of 12 x 12 (skimage needs sides >= 11)
    pred = np.clip(truth + np.random.default_rng(2).normal(0, 0.05, truth.shape), 0, 1)
    ref = structural_similarity(pred, truth, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    assert 0.3 < ref < 0.99
    assert math.isclose(ssim_tiles(pred, truth, tile=64), ref, rel_tol=1e-9, abs_tol=1e-12)
    re, ce = tile_edges(24, 12), tile_edges(36, 12)
    per_tile = [structural_similarity(pred[a:b, c:d], truth[a:b, c:d], channel_axis=-1, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1.0)
                for a, b in zip(re[:-1], re[1:]) for c, d in zip(ce[:-1], ce[1:])]
    assert len(per_tile) == 6
    assert math.isclose(ssim_tiles(pred, truth, tile=12), float(np.mean(per_tile)), rel_tol=1e-9)
    assert ssim_tiles(truth, truth, tile=12) == pytest.approx(1.0)
    # grayscale (H, W) works and equals the 1-channel SSIM
    assert math.isclose(ssim_tiles(pred[..., 0], truth[..., 0], tile=64),
                        structural_similarity(pred[..., 0], truth[..., 0], gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1.0), rel_tol=1e-9)


def test_raster_chunk_ssim_by_hand():
    """10 x 30 x 2 image, window (12, 11): chunks of 132 consecutive row-major pixels re-wrapped to 12 x 11 per
    channel; 2 full chunks (264 pixels), the trailing 36 pixels dropped."""
    H, W, C, (hw, ww) = 10, 30, 2, (12, 11)
    truth = rand_img(H, W, C, seed=3)
    pred = np.clip(truth + np.random.default_rng(4).normal(0, 0.08, truth.shape), 0, 1)
    L = hw * ww
    hand = []
    for k in range(2):
        a, b = np.empty((hw, ww, C)), np.empty((hw, ww, C))
        for q in range(L):
            i, j = divmod(k * L + q, W)  # image pixel of stream position k L + q
            a[q // ww, q % ww], b[q // ww, q % ww] = pred[i, j], truth[i, j]
        hand.append(np.mean([naive_ssim(a[..., c], b[..., c]) for c in range(C)]))
    got = ssim_raster(pred, truth, window=(hw, ww))
    assert math.isclose(got, float(np.mean(hand)), rel_tol=1e-9)
    # the raster chunks are not image tiles: this differs from the tile protocol
    assert abs(got - ssim_tiles(pred, truth, tile=11)) > 1e-3
    # the trailing partial chunk is dropped: changing its pixels changes nothing
    p2 = pred.copy()
    p2.reshape(-1, C)[2 * L:] = 0.0
    assert ssim_raster(p2, truth, window=(hw, ww)) == got
    p2.reshape(-1, C)[2 * L - 1] = 0.0
    assert ssim_raster(p2, truth, window=(hw, ww)) != got
    assert math.isnan(ssim_raster(pred[:2, :3], truth[:2, :3], window=(hw, ww)))


# ------------------------------------------------------------------------------------------------ LPIPS
def test_lpips_unavailable_returns_none_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(ie, "lpips_status", lambda: (False, "LPIPS skipped: test reason"))
    img = rand_img(8, 8)
    with caplog.at_level(logging.INFO, logger="tasks.image.evaluation"):
        assert ie.lpips_tiles(img, img) is None
    msgs = [r.message for r in caplog.records if "LPIPS" in r.message]
    assert msgs == ["LPIPS skipped: test reason"]


def test_lpips_status_checks_package_weights_and_cached_vgg(tmp_path, monkeypatch):
    ok, why = ie.lpips_status()
    if importlib_missing("lpips"):
        assert not ok and "lpips package is not installed" in why
    pkgs = tmp_path / "site"
    (pkgs / "lpips" / "weights" / "v0.1").mkdir(parents=True)
    (pkgs / "lpips" / "__init__.py").write_text("")
    (pkgs / "torchvision").mkdir()
    (pkgs / "torchvision" / "__init__.py").write_text("")
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(pkgs))
    for mod in ("lpips", "torchvision"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    ok, why = ie.lpips_status()
    assert not ok and "vgg.pth" in why
    (pkgs / "lpips" / "weights" / "v0.1" / "vgg.pth").write_bytes(b"x")
    ok, why = ie.lpips_status()
    assert not ok and "never downloads" in why and str(hub / "checkpoints") in why
    (hub / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"x")
    assert ie.lpips_status()[0]


def importlib_missing(name):
    import importlib.util

    return importlib.util.find_spec(name) is None


class FakeLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS: mean |in0 - in1| after lpips' optional [0, 1] -> [-1, 1] rescale."""

    def __init__(self, net="vgg", verbose=True):
        super().__init__()
        assert net == "vgg"

    def forward(self, in0, in1, normalize=False):
        assert in0.shape[1] == 3 and in0.shape == in1.shape and in0.dim() == 4
        if normalize:
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        return (in0 - in1).abs().mean().reshape(1, 1, 1, 1)


def test_lpips_protocols_with_a_stand_in_model(monkeypatch):
    monkeypatch.setattr(ie, "lpips_status", lambda: (True, "ok"))
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    truth = rand_img(20, 14, 1, seed=5) * 0.5
    pred = truth + 0.1
    assert math.isclose(ie.lpips_tiles(pred, truth, tile=8), 0.2, rel_tol=1e-5)  # rescaled to [-1, 1]
    assert math.isclose(ie.lpips_raster(pred, truth, window=(10, 10)), 0.1, rel_tol=1e-5)  # [0, 1] as is
    r = evaluate_image(lookup_model(pred), truth, chunk_size=50, protocol="both", tile=8, raster_chunk=100)
    assert math.isclose(r["lpips"], 0.2, rel_tol=1e-5) and math.isclose(r["lpips_raster"], 0.1, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ images
def test_error_image_colormaps_and_png_round_trip(tmp_path):
    truth = np.zeros((2, 3, 3))
    pred = truth + 0.05
    np.testing.assert_array_equal(error_image(pred, truth, gain=10, colormap="gray"), 128)
    hot = error_image(pred, truth, gain=10)
    assert hot.shape == (2, 3, 3) and tuple(hot[0, 0]) == (255, 128, 0)
    assert tuple(error_image(pred, truth, gain=100)[0, 0]) == (255, 255, 255)
    assert tuple(error_image(truth, truth)[0, 0]) == (0, 0, 0)
    np.testing.assert_array_equal(to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])), [0, 0, 128, 255, 255])
    img = rand_img(5, 7)
    p = save_png(str(tmp_path / "sub" / "a.png"), img)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), to_uint8(img))
    g = save_png(str(tmp_path / "g.png"), img[..., :1])
    assert np.asarray(Image.open(g)).shape == (5, 7)
    with pytest.raises(ValueError):
        save_png(str(tmp_path / "bad.png"), img[..., :2])


# ------------------------------------------------------------------------------------------------ driver
@pytest.mark.parametrize("protocol", ["tiles", "raster", "both"])
def test_streaming_driver_equals_the_pure_functions(tmp_path, protocol):
    H, W = 37, 29
    truth = rand_img(H, W, 3, seed=6)
    pred = np.clip(truth + np.random.default_rng(7).normal(0, 0.05, truth.shape), 0, 1)
    fn = lookup_model(pred)
    r = evaluate_image(fn, truth, chunk_size=100, protocol=protocol, tile=16, mse_chunk=50, raster_chunk=200,
                       bake=lambda: None, out_dir=str(tmp_path), prefix="t")
    assert r["psnr"] == pytest.approx(psnr(pred, truth), rel=1e-6)
    assert r["mse_chunked"] == pytest.approx(chunked_mse(pred, truth, chunk=50), rel=1e-6)
    assert r["mse_chunked"] != pytest.approx(r["mse"], rel=1e-9)  # the protocols differ here (1073 = 21 x 50 + 23)
    win = raster_window(H, W, 200)
    assert r["raster_window"] == list(win)
    if protocol in ("tiles", "both"):
        assert r["ssim"] == pytest.approx(ssim_tiles(pred, truth, tile=16), rel=1e-6)
    else:
        assert math.isnan(r["ssim"])
    if protocol in ("raster", "both"):
        assert r["ssim_raster"] == pytest.approx(ssim_raster(pred, truth, window=win), rel=1e-6)
    else:
        assert math.isnan(r["ssim_raster"])
    assert r["lpips"] is None and r["points"] == H * W and r["channels"] == 3
    assert fn.calls >= math.ceil(H * W / 100)
    np.testing.assert_array_equal(np.asarray(Image.open(r["pred_png"])), to_uint8(pred.astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(Image.open(r["error_png"])),
                                  error_image(pred.astype(np.float32), truth.astype(np.float32)))
    assert os.path.basename(r["error_png"]) == "t_error.png"


def test_driver_with_an_image_dataset_and_raw_targets(tmp_path):
    from datasets.image import ImageDataset

    rng = np.random.default_rng(8)
    img = rng.integers(20, 230, size=(12, 10, 3)).astype(np.uint8)
    img[0, 0, 0], img[1, 1, 1] = 20, 230
    p = str(tmp_path / "a.png")
    Image.fromarray(img).save(p)
    ds = ImageDataset(p, log2batch=4)
    norm = (img - 20.0) / 210.0
    r = evaluate_image(lookup_model(norm), ds, chunk_size=17, tile=5)
    assert r["mse"] < 1e-12 and r["ssim"] == pytest.approx(1.0)
    raw = evaluate_image(lookup_model(norm), ds, chunk_size=17, tile=5, raw_truth=True)
    assert raw["mse"] == pytest.approx(ie.mse(norm, img / 255.0), rel=1e-5)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_image(lookup_model(norm), ds, protocol="tile")
    with pytest.raises(ValueError, match="channels"):
        evaluate_image(lookup_model(norm[..., :1]), ds)
