"""ImageDataset (datasets/image.py): formats, normalization, coordinates, batches, VP-S, SR protocol, errors."""
import json
import logging
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import datasets.image as image_mod
from datasets.image import ImageDataset, downsample_image, open_image
from util.errors import DataError
from util.registry import ConfigError, build


def rgb(h=13, w=21, seed=0, lo=10, hi=200):
    """A random uint8 RGB image whose channels have different ranges (global min lo, max hi)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(lo, hi + 1, size=(h, w, 3)).astype(np.uint8)
    img[..., 1] = np.clip(img[..., 1], lo + 30, hi)  # channel ranges differ: normalization must be global
    img[0, 0, 0], img[-1, -1, 2] = lo, hi
    return img


def save_png(tmp_path, img, name="img.png"):
    p = str(tmp_path / name)
    Image.fromarray(img).save(p)
    return p


def linear_image(h, w, c=3):
    """float64 image v[i, j, k] = a_k i + b_k j + d_k (bilinear interpolation is exact on it)."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    a, b, d = np.array([0.3, -0.2, 0.05])[:c], np.array([0.1, 0.25, -0.07])[:c], np.array([1.0, 5.0, 2.0])[:c]
    return a * i[..., None] + b * j[..., None] + d


def pixel_of(x, h, w):
    """(row, col) integer indices of pixel-lattice coordinates x (N, 2) = (col, row)."""
    col = (x[:, 0].astype(np.float64) + 1) / 2 * (w - 1)
    row = (x[:, 1].astype(np.float64) + 1) / 2 * (h - 1)
    assert np.allclose(col, np.round(col), atol=1e-3) and np.allclose(row, np.round(row), atol=1e-3)
    return np.round(row).astype(int), np.round(col).astype(int)


# ------------------------------------------------------------------------------------------- reading, values
def test_png_rgb_values_coordinates_and_global_normalization(tmp_path):
    img = rgb(13, 21)
    ds = ImageDataset(save_png(tmp_path, img), log2batch=9, augment="none")
    assert ds.image_shape == (13, 21) and ds.train_shape == (13, 21) and ds.out_dim == 3 and ds.channels == 3
    assert ds.spatial_dims == 2 and ds.cond_dim == 0 and ds.dtype == "uint8"
    assert (ds.value_min, ds.value_max) == (10.0, 200.0)  # one min/max over all channels
    b = ds.sample_batch(0)
    assert b["x"].shape == (1, 512, 2) and b["v"].shape == (1, 512, 3) and b["c"].shape == (1, 0)
    assert all(t.dtype == torch.float32 for t in b.values())
    x, v = b["x"][0].numpy(), b["v"][0].numpy()
    r, c = pixel_of(x, 13, 21)  # x column 0 = column (width axis), column 1 = row
    np.testing.assert_allclose(v, (img[r, c].astype(np.float64) - 10) / 190, rtol=0, atol=1e-6)
    # both axes are covered over the whole range
    assert r.min() == 0 and r.max() == 12 and c.min() == 0 and c.max() == 20
    full = ds.rows(0, 13)
    assert full.dtype == np.float32 and full.shape == (13, 21, 3)
    np.testing.assert_allclose(full, (img - 10.0) / 190, atol=1e-6)
    np.testing.assert_allclose(ds.rows(3, 5, raw=True), img[3:5] / 255.0, atol=1e-6)
    blocks = list(ds.iter_rows(4))
    assert [s for s, _ in blocks] == [0, 4, 8, 12]
    np.testing.assert_array_equal(np.concatenate([blk for _, blk in blocks]), full)
    assert ds._train is ds._full and ds._full.dtype == np.uint8  # pixels kept as uint8, no float copy
    assert math.isclose(ds.train_value_mean, float(((img - 10.0) / 190).mean()), rel_tol=1e-12)
    np.testing.assert_allclose(ds.train_channel_means, ((img - 10.0) / 190).mean(axis=(0, 1)), rtol=1e-12)


def test_batches_deterministic_in_seed_step_rank(tmp_path):
    p = save_png(tmp_path, rgb())
    a, b = ImageDataset(p, log2batch=8, seed=3), ImageDataset(p, log2batch=8, seed=3)
    for step, rank in ((0, 0), (5, 1)):
        ba, bb = a.sample_batch(step, rank), b.sample_batch(step, rank)
        assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert not torch.equal(a.sample_batch(0, 0)["x"], a.sample_batch(0, 1)["x"])
    assert not torch.equal(a.sample_batch(0, 0)["x"], a.sample_batch(1, 0)["x"])
    assert not torch.equal(a.sample_batch(0)["x"], ImageDataset(p, log2batch=8, seed=4).sample_batch(0)["x"])
    with pytest.raises(ValueError, match="step and rank"):
        a.sample_batch(-1)


def test_steps_per_epoch_from_full_resolution(tmp_path):
    p = save_png(tmp_path, rgb(13, 21))
    assert ImageDataset(p, log2batch=5).steps_per_epoch == math.ceil(13 * 21 / 32)
    assert ImageDataset(p, log2batch=5, downsample=2).steps_per_epoch == math.ceil(13 * 21 / 32)
    assert ImageDataset(p, log2batch=20).steps_per_epoch == 1


def test_grayscale_jpeg_16bit_and_npy_formats(tmp_path):
    gray = rgb(9, 11)[..., 0]
    ds = ImageDataset(save_png(tmp_path, gray, "g.png"), log2batch=4, augment="none")
    assert ds.out_dim == 1 and ds.rows(0, 9).shape == (9, 11, 1)
    np.testing.assert_allclose(ds.rows(0, 9)[..., 0], (gray - gray.min()) / (gray.max() - gray.min()), atol=1e-6)

    jpg = str(tmp_path / "a.jpg")
    Image.fromarray(rgb(16, 24)).save(jpg, quality=95)
    dj = ImageDataset(jpg, log2batch=4)
    assert dj.image_shape == (16, 24) and dj.out_dim == 3

    g16 = (np.arange(6 * 7).reshape(6, 7) * 1000 + 500).astype(np.uint16)
    p16 = str(tmp_path / "g16.png")
    Image.fromarray(g16).save(p16)
    d16 = ImageDataset(p16, log2batch=4)
    assert d16.dtype == "uint16" and (d16.value_min, d16.value_max) == (500.0, 41500.0)
    np.testing.assert_allclose(d16.rows(0, 6)[..., 0], (g16 - 500.0) / 41000, atol=1e-6)
    np.testing.assert_allclose(d16.rows(0, 6, raw=True)[..., 0], g16 / 65535.0, atol=1e-6)

    npy = str(tmp_path / "f.npy")
    lin = linear_image(5, 8).astype(np.float32)
    np.save(npy, lin)
    dn = ImageDataset(npy, log2batch=4)
    assert isinstance(dn._full, np.memmap) or isinstance(dn._full.base, np.memmap)  # memory-mapped, not read
    np.testing.assert_allclose(dn.rows(0, 5), (lin - lin.min()) / (lin.max() - lin.min()), atol=1e-6)
    np.save(str(tmp_path / "u.npy"), gray)
    assert ImageDataset(str(tmp_path / "u.npy"), log2batch=4).out_dim == 1


def test_tiff_with_tifffile_is_memory_mapped(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    img = rgb(7, 9)
    p = str(tmp_path / "a.tif")
    tifffile.imwrite(p, img)
    ds = ImageDataset(p, log2batch=4, augment="none")
    assert isinstance(ds._full, np.memmap) or isinstance(getattr(ds._full, "base", None), np.memmap)
    np.testing.assert_allclose(ds.rows(0, 7, raw=True), img / 255.0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiff_without_tifffile_uses_pillow_or_names_tifffile(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile -> ImportError
    img = rgb(7, 9)
    p = str(tmp_path / "a.tif")
    Image.fromarray(img).save(p)
    ds = ImageDataset(p, log2batch=4, augment="none")  # Pillow reads this plain TIFF
    np.testing.assert_allclose(ds.rows(0, 7, raw=True), img / 255.0, atol=1e-6)
    bad = tmp_path / "b.tiff"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=r"b\.tiff.*tifffile"):
        ImageDataset(str(bad), log2batch=4)


def test_rgba_drops_alpha_with_a_warning(tmp_path, caplog):
    img = rgb(6, 8)
    rgba = np.concatenate([img, np.full((6, 8, 1), 7, np.uint8)], axis=-1)  # alpha 7 below every RGB value
    with caplog.at_level(logging.WARNING, logger="datasets.image"):
        ds = ImageDataset(save_png(tmp_path, rgba, "a.png"), log2batch=4)
    assert ds.out_dim == 3 and ds.alpha_dropped and ds.meta()["alpha_dropped"]
    assert (ds.value_min, ds.value_max) == (10.0, 200.0)  # the alpha channel takes no part in normalization
    assert any("alpha" in r.message for r in caplog.records)
    np.testing.assert_allclose(ds.rows(0, 6, raw=True), img / 255.0, atol=1e-6)


def test_cache_dir_decodes_once_and_memory_maps(tmp_path):
    img = rgb(11, 17)
    p = save_png(tmp_path, img)
    cache = tmp_path / "cache"
    a = ImageDataset(p, log2batch=6, cache_dir=str(cache))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    np.testing.assert_array_equal(np.load(files[0]), img)
    b = ImageDataset(p, log2batch=6, cache_dir=str(cache))
    assert isinstance(b._full, np.memmap) or isinstance(b._full.base, np.memmap)
    c = ImageDataset(p, log2batch=6)  # no cache
    for ds in (b, c):
        assert all(torch.equal(a.sample_batch(2)[k], ds.sample_batch(2)[k]) for k in ("x", "v"))


def test_streaming_passes_in_strips_match_whole_image(tmp_path, monkeypatch):
    img = rgb(23, 19, seed=4)
    p = save_png(tmp_path, img)
    ref = ImageDataset(p, log2batch=6, downsample=2, sr_dtype="float32")
    monkeypatch.setattr(image_mod, "_CHUNK", 40)  # strips of 1-2 rows
    small = ImageDataset(p, log2batch=6, downsample=2, sr_dtype="float32", cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(small.train_rows(0, 11), ref.train_rows(0, 11))
    assert (small.value_min, small.value_max) == (ref.value_min, ref.value_max)
    assert math.isclose(small.train_value_mean, ref.train_value_mean, rel_tol=1e-12)
    np.testing.assert_array_equal(np.concatenate([b for _, b in small.iter_rows()]), ref.rows(0, 23))


def test_meta_is_json_and_registry_builds_it(tmp_path):
    p = save_png(tmp_path, rgb())
    ds = build("dataset", "image", section="dataset", injected={"seed": 1}, path=p, log2batch=5)
    m = json.loads(json.dumps(ds.meta()))
    assert m["image_shape"] == [13, 21] and m["channels"] == 3 and m["value_min"] == 10.0
    assert m["value_max"] == 200.0 and m["path"].endswith("img.png") and m["steps_per_epoch"] == 9
    with pytest.raises(ConfigError, match="dataset.log2batchh"):
        build("dataset", "image", section="dataset", injected={"seed": 1}, path=p, log2batchh=5)


# ------------------------------------------------------------------------------------------------ VP-S
@pytest.mark.parametrize("lattice", ["pixel", "reference"])
def test_vp_s_exact_on_a_linear_image(tmp_path, lattice):
    h, w = 9, 14
    lin = linear_image(h, w)
    p = str(tmp_path / "lin.npy")
    np.save(p, lin)
    ds = ImageDataset(p, log2batch=12, vp_lattice=lattice)
    tau = 1.0 / (min(h, w) - 1)
    np.testing.assert_allclose(ds.tau_x, [tau, tau])
    np.testing.assert_allclose(ds.sigma_x, [0.6 * tau, 0.6 * tau])
    b = ds.sample_batch(1)
    x, v = b["x"][0].numpy().astype(np.float64), b["v"][0].numpy()
    assert np.abs(x).max() <= 1.0
    # target = the linear function at the jittered point (x = (col, row) always)
    col, row = (x[:, 0] + 1) / 2 * (w - 1), (x[:, 1] + 1) / 2 * (h - 1)
    a, bb, d = np.array([0.3, -0.2, 0.05]), np.array([0.1, 0.25, -0.07]), np.array([1.0, 5.0, 2.0])
    expect = (a * row[:, None] + bb * col[:, None] + d - lin.min()) / (lin.max() - lin.min())
    np.testing.assert_allclose(v, expect, atol=2e-6)
    # jitter: nonzero, clipped to tau around the lattice (pixel: col on the w-lattice; reference: transposed)
    n0, n1 = (w, h) if lattice == "pixel" else (h, w)
    for k, n in ((0, n0), (1, n1)):
        pos = (x[:, k] + 1) / 2 * (n - 1)
        dist = np.abs(x[:, k] - (2 * np.round(pos) / (n - 1) - 1))
        inside = np.abs(x[:, k]) < 1  # clamped points may sit further from their vertex
        assert dist[inside].max() <= tau + 1e-6 and dist.max() > 0.3 * tau


def test_reference_lattice_is_transposed(tmp_path):
    h, w = 5, 12
    p = str(tmp_path / "lin.npy")
    np.save(p, linear_image(h, w))
    for lattice, (nx, ny) in (("pixel", (w, h)), ("reference", (h, w))):
        ds = ImageDataset(p, log2batch=12, vp_lattice=lattice, tau_x=1e-7)
        x = ds.sample_batch(0)["x"][0].numpy().astype(np.float64)
        for k, n in ((0, nx), (1, ny)):
            pos = (x[:, k] + 1) / 2 * (n - 1)
            np.testing.assert_allclose(pos, np.round(pos), atol=1e-4)
            assert len(np.unique(np.round(pos))) == n


def test_vc_keeps_the_pixel_value_and_none_is_unjittered(tmp_path):
    img = rgb(9, 11)
    p = save_png(tmp_path, img)
    ds = ImageDataset(p, log2batch=9, augment="vc")
    b = ds.sample_batch(0)
    none = ImageDataset(p, log2batch=9, augment="none").sample_batch(0)
    torch.testing.assert_close(b["v"], none["v"])  # same pixels drawn first, their values kept
    dx = (b["x"] - none["x"]).abs()
    assert dx.max() > 0 and dx.max() <= 1.0 / 8 + 1e-6


# ------------------------------------------------------------------------------------------ super-resolution
def test_downsample_matches_torch_interpolate(tmp_path):
    img = rgb(15, 22, seed=2)
    t = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
    ref = F.interpolate(t, scale_factor=0.5, mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy()
    assert ref.shape[:2] == (7, 11)
    np.testing.assert_allclose(downsample_image(img, (7, 11)), ref, atol=1e-4)
    np.testing.assert_allclose(downsample_image(img, (7, 11), rows=(2, 5)), ref[2:5], atol=1e-4)
    p = save_png(tmp_path, img)
    for dt, tol in (("float32", 1e-6), ("float16", 3e-4)):
        ds = ImageDataset(p, log2batch=10, downsample=2, sr_dtype=dt, augment="none")
        assert ds.train_shape == (7, 11) and ds.image_shape == (15, 22)
        assert math.isclose(ds.value_min, ref.min(), abs_tol=0.05) and math.isclose(ds.value_max, ref.max(), abs_tol=0.05)
        norm = (ref - ref.min()) / (ref.max() - ref.min())
        np.testing.assert_allclose(ds.train_rows(0, 7), norm, atol=tol)
        # batches come from the half-size image on its own lattice
        b = ds.sample_batch(3)
        r, c = pixel_of(b["x"][0].numpy(), 7, 11)
        np.testing.assert_allclose(b["v"][0].numpy(), norm[r, c], atol=tol)
        # evaluation targets: the full-resolution image, normalized with the training min/max
        np.testing.assert_allclose(ds.rows(0, 15), (img - ds.value_min) / (ds.value_max - ds.value_min), atol=1e-5)
        np.testing.assert_allclose(ds.rows(0, 15, raw=True), img / 255.0, atol=1e-6)
    sr = ImageDataset(p, log2batch=10, downsample=2)
    np.testing.assert_allclose(sr.tau_x, [1.0 / (7 - 1)] * 2)  # tau of the half-resolution lattice


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing.png.*not found"):
        ImageDataset(str(tmp_path / "missing.png"))
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png"):
        ImageDataset(str(garbage))
    cases = {"two.npy": np.zeros((4, 4, 2), np.uint8), "five.npy": np.zeros((4, 4, 5), np.uint8),
             "chw.npy": np.zeros((3, 8, 8), np.uint8), "thin.npy": np.arange(6, dtype=np.uint8).reshape(6, 1),
             "vol.npy": np.zeros((2, 3, 4, 3), np.uint8), "flat.npy": np.full((4, 4), 9, np.uint8),
             "nan.npy": np.array([[0.0, 1.0], [np.nan, 2.0]]), "bool.npy": np.ones((3, 3), bool)}
    msgs = {"two.npy": "2 channels", "five.npy": "5 channels", "chw.npy": "8 channels.*channel axis must be the last",
            "thin.npy": "6 x 1 pixels", "vol.npy": "shape", "flat.npy": "constant", "nan.npy": "NaN",
            "bool.npy": "dtype bool"}
    for name, arr in cases.items():
        np.save(str(tmp_path / name), arr)
        with pytest.raises(DataError, match=f"{name}.*{msgs[name]}"):
            ImageDataset(str(tmp_path / name))
    p = str(tmp_path / "tiny.npy")
    np.save(p, rgb(3, 40))
    with pytest.raises(DataError, match="tiny.npy.*downsample=2 leaves 1 x 20"):
        ImageDataset(p, downsample=2)
    good = save_png(tmp_path, rgb())
    for kw, key in (({"augment": "vp_c"}, "augment"), ({"vp_lattice": "cols"}, "vp_lattice"),
                    ({"log2batch": 31}, "log2batch"), ({"downsample": 0}, "downsample"),
                    ({"downsample": 1.5}, "downsample"), ({"sr_dtype": "int8"}, "sr_dtype"),
                    ({"tau_x": [1e-3, 1e-3, 1e-3]}, "tau_x"), ({"sigma_x": -1.0}, "sigma_x")):
        with pytest.raises(ConfigError, match=f"dataset.{key}"):
            ImageDataset(good, **kw)
    with pytest.raises(IndexError):
        ImageDataset(good).rows(5, 40)


def test_open_image_two_channel_png_is_an_error(tmp_path):
    p = str(tmp_path / "la.png")
    Image.fromarray(rgb(5, 6)[..., :2]).save(p)  # mode LA (grayscale + alpha)
    with pytest.raises(DataError, match="la.png.*2 channels"):
        open_image(p)
