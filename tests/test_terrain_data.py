"""Terrain tiles: tiler, splits, per-tile normalization, derivative ground truth, bad inputs, the generator."""
import sys

import numpy as np
import pytest
import torch

from datasets.terrain import (TerrainDataset, central_gradient, cut_tiles, laplacian_5pt, read_heightfield,
                              slope_degrees, split_tiles)
from datasets.terrain_gen import erode, fractal_surface, generate_terrain_demo
from util.errors import DataError
from util.registry import ConfigError


def test_cut_tiles_positions_and_missing_windows():
    arr = np.arange(10 * 13, dtype=np.float64).reshape(10, 13)  # 2 x 3 windows of 4 (remainder dropped)
    arr[5, 9] = np.nan  # window (row 4, col 8)
    tiles, origins = cut_tiles(arr, 4)
    assert origins.tolist() == [[0, 0], [0, 4], [0, 8], [4, 0], [4, 4]]
    for t, (r, c) in zip(tiles, origins):
        np.testing.assert_array_equal(t, arr[r:r + 4, c:c + 4])
    tiles, origins = cut_tiles(arr, 4, nodata=float(arr[0, 5]))
    assert [0, 4] not in origins.tolist() and len(tiles) == 4


def test_region_split_keeps_regions_whole_and_disjoint():
    region = np.repeat(np.arange(10), 7)
    s = split_tiles(region, "region", 0.2, 0.2, seed=3)
    sets = {k: set(region[v]) for k, v in s.items()}
    assert len(sets["test"]) == 2 and len(sets["val"]) == 2 and len(sets["train"]) == 6
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(70))
    t = split_tiles(region, "tile", 0.1, 0.2, seed=0)
    assert len(t["test"]) == 14 and len(t["val"]) == 7 and not set(t["test"]) & set(t["train"])
    with pytest.raises(DataError, match="split_by: tile"):
        split_tiles(np.zeros(5, np.int64), "region", 0.1, 0.1, seed=0)


def test_derivatives_exact_on_a_quadratic_surface():
    # h = 3 r^2 - 2 c^2 + 0.5 r c + r: central differences and the 5-point Laplacian are exact for quadratics
    r, c = np.meshgrid(np.arange(9.0), np.arange(11.0), indexing="ij")
    h = 3 * r ** 2 - 2 * c ** 2 + 0.5 * r * c + r
    g_r, g_c = central_gradient(h)
    np.testing.assert_allclose(g_r, (6 * r + 0.5 * c + 1)[1:-1, 1:-1], atol=1e-9)
    np.testing.assert_allclose(g_c, (-4 * c + 0.5 * r)[1:-1, 1:-1], atol=1e-9)
    np.testing.assert_allclose(laplacian_5pt(h), np.full((7, 9), 6.0 - 4.0), atol=1e-9)
    # spacing: per metre instead of per pixel
    np.testing.assert_allclose(laplacian_5pt(h, spacing=2.0), np.full((7, 9), 0.5), atol=1e-9)
    # torch path gives the same; slope of a 45-degree plane
    np.testing.assert_allclose(laplacian_5pt(torch.from_numpy(h)).numpy(), laplacian_5pt(h))
    plane = 2.0 * c  # 2 m per pixel at gsd 2 m -> 45 degrees
    np.testing.assert_allclose(slope_degrees(plane, 2.0), 45.0)


def _write_regions(tmp_path, n=4, size=24, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(tmp_path / f"r{i}.npy", (100.0 * i + 30 * rng.standard_normal((size, size))).astype(np.float32))
    return tmp_path


def test_dataset_per_tile_normalization_and_batches(tmp_path):
    _write_regions(tmp_path)
    d = TerrainDataset(str(tmp_path), tile_size=8, split_by="region", val_fraction=0.25, test_fraction=0.25,
                       batch_size=5, seed=1)
    assert len(d) == 4 * 9 and d.meta()["n_train"] == 18 and d.meta()["n_test"] == 9
    b = d.tiles(d.split_indices("test"))
    t = b["tile"][:, 0].double()
    np.testing.assert_allclose(t.mean(dim=(1, 2)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(t.std(dim=(1, 2), unbiased=False).numpy(), 1.0, atol=1e-5)
    back = t * b["sigma"][:, None, None] + b["mu"][:, None, None]
    np.testing.assert_allclose(back.numpy(), b["metres"].numpy(), atol=1e-3)
    b1, b2 = d.sample_batch(7), d.sample_batch(7)
    assert b1["tile"].shape == (5, 1, 8, 8) and torch.equal(b1["tile"], b2["tile"])
    assert set(b1["index"].tolist()) <= set(d.split_indices("train").tolist())
    assert not torch.equal(d.sample_batch(8)["index"], b1["index"]) or not torch.equal(d.sample_batch(9)["index"],
                                                                                       b1["index"])
    # dihedral augmentation keeps the values of each tile (a permutation of its pixels)
    da = TerrainDataset(str(tmp_path), tile_size=8, batch_size=5, tile_augment="dihedral", seed=1, val_fraction=0.25,
                        test_fraction=0.25)
    ba = da.sample_batch(7)
    torch.testing.assert_close(ba["tile"].flatten(1).sort(dim=1).values, b1["tile"].flatten(1).sort(dim=1).values)


def test_flat_tile_sigma_floor(tmp_path):
    # a flat tile beside a varying one (a DEM that is constant everywhere is refused: test_silent_errors.py)
    dem = np.full((8, 24), 5.0, np.float32)
    dem[:, 16:] += np.arange(64, dtype=np.float32).reshape(8, 8)
    np.save(tmp_path / "flat.npy", dem)
    d = TerrainDataset(str(tmp_path), tile_size=8, split_by="tile", val_fraction=0.0, test_fraction=0.4,
                       min_sigma=0.01)
    assert np.all(d.sigma[:2] == 0.01) and d.sigma[2] > 1 and np.isfinite(d.tiles([0, 1])["tile"].numpy()).all()


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        TerrainDataset(str(tmp_path / "missing"))
    (tmp_path / "a.xyz").write_text("x")
    with pytest.raises(DataError, match="unknown heightfield format"):
        read_heightfield(str(tmp_path / "a.xyz"))
    np.save(tmp_path / "one_d.npy", np.zeros(10))
    with pytest.raises(DataError, match="one_d.npy.*2-D"):
        read_heightfield(str(tmp_path / "one_d.npy"))
    np.zeros((4, 4), np.float32).tofile(tmp_path / "h.raw")
    with pytest.raises(DataError, match="raw_shape"):
        read_heightfield(str(tmp_path / "h.raw"))
    with pytest.raises(DataError, match="64 bytes"):
        read_heightfield(str(tmp_path / "h.raw"), raw_shape=[4, 5])
    assert read_heightfield(str(tmp_path / "h.raw"), raw_shape=[4, 4])[0].shape == (4, 4)
    sub = tmp_path / "small"
    sub.mkdir()
    np.save(sub / "s.npy", np.zeros((5, 5), np.float32))
    with pytest.raises(DataError, match="no complete 8 x 8 tile"):
        TerrainDataset(str(sub), tile_size=8)
    for key, val in (("tile_size", 2), ("split_by", "rows"), ("tile_augment", "flip"), ("test_fraction", 1.0),
                     ("batch_size", 0), ("min_sigma", 0)):
        with pytest.raises(ConfigError, match=f"dataset.{key}"):
            TerrainDataset(str(sub), **{key: val})


def test_matplotlib_sample_dems_are_real_tiles_with_metre_pixels(monkeypatch):
    ds = TerrainDataset("mpl:jacksboro_fault_dem", tile_size=64, split_by="none")
    # 344 x 403 int16 elevations in metres -> 5 x 6 whole tiles, every one a test tile
    assert len(ds) == 30 and len(ds.split_indices("test")) == 30 and ds.region_names == ["jacksboro_fault_dem"]
    assert 236 <= ds.tiles_m.min() and ds.tiles_m.max() <= 1076
    # 3 arc-second pixels at ~36.6 N: ~92.7 m along rows (north-south), ~74.4 m along columns
    np.testing.assert_allclose(ds.pixel_m[0], [92.66, 74.41], atol=0.1)
    topo = TerrainDataset("mpl:topobathy", tile_size=32, split_by="none")
    assert len(topo) == 2 * 3  # 91 x 120
    # 1.968 deg of latitude over 90 row steps, 3.967 deg of longitude over 119 column steps, at 49.0 N: ~2.43 km
    np.testing.assert_allclose(topo.pixel_m[0], [2431.5, 2431.5], rtol=3e-3)
    # without matplotlib the message names it
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DataError, match="need matplotlib"):
        TerrainDataset("mpl:jacksboro_fault_dem")


def test_generator_deterministic_with_valleys(tmp_path):
    a = fractal_surface(48, seed=5)
    np.testing.assert_array_equal(a, fractal_surface(48, seed=5))
    assert not np.array_equal(a, fractal_surface(48, seed=6))
    # erosion lowers the drainage lines: the mean height drops and the surface gets smoother (Laplacian energy)
    e = erode(a * 50, iterations=10)
    assert e.mean() < a.mean() * 50 and np.abs(laplacian_5pt(e)).mean() < np.abs(laplacian_5pt(a * 50)).mean()
    files = generate_terrain_demo(str(tmp_path / "demo"), regions=2, size=32, iterations=2, log=None)
    assert len(files) == 2 and generate_terrain_demo(str(tmp_path / "demo"), regions=2, size=32, iterations=2,
                                                     log=None) == files
    with pytest.raises(FileExistsError, match="other settings"):
        generate_terrain_demo(str(tmp_path / "demo"), regions=3, size=32, iterations=2, log=None)
    # a root written when the same heights were declared at 2 m per pixel is reused (the heights decide);
    # the demo dataset declares 5 m per pixel
    import json

    files = generate_terrain_demo(str(tmp_path / "d30"), regions=2, size=32, log=None)
    marker = tmp_path / "d30" / "terrain_settings.json"
    old = {**json.loads(marker.read_text()), "gsd_m": 2.0}
    marker.write_text(json.dumps(old))
    assert generate_terrain_demo(str(tmp_path / "d30"), regions=2, size=32, log=None) == files
    ds = TerrainDataset("demo", tile_size=16, demo_root=str(tmp_path / "d30"), demo_regions=2, demo_size=32,
                        split_by="none")
    np.testing.assert_allclose(ds.pixel_m, [[5.0, 5.0], [5.0, 5.0]])


def test_tile_cache_is_memory_mapped_identical_and_never_stale(tmp_path, monkeypatch):
    import os

    import datasets.terrain as dt

    (tmp_path / "dem").mkdir()
    src = _write_regions(tmp_path / "dem", n=4, size=24)
    np.savez(src / "r4.npz", elevation=np.arange(24 * 24, dtype=np.float32).reshape(24, 24), dx=3.0)
    kw = dict(tile_size=8, val_fraction=0.25, test_fraction=0.25, batch_size=4)
    plain = TerrainDataset(str(src), **kw)
    cached = TerrainDataset(str(src), tile_cache=str(tmp_path / "cache"), **kw)
    assert isinstance(cached.tiles_m, np.memmap) and not isinstance(plain.tiles_m, np.memmap)
    np.testing.assert_array_equal(np.asarray(cached.tiles_m), plain.tiles_m)
    for a in ("origins", "region_of_tile", "mu", "sigma", "pixel_m"):
        np.testing.assert_array_equal(getattr(cached, a), getattr(plain, a))
    assert cached.region_names == plain.region_names and cached.splits.keys() == plain.splits.keys()
    assert all(np.array_equal(cached.splits[k], plain.splits[k]) for k in plain.splits)
    for k in ("tile", "mu", "sigma"):
        assert torch.equal(cached.sample_batch(3)[k], plain.sample_batch(3)[k])
    # the second build reads no file
    monkeypatch.setattr(dt, "read_heightfield", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    again = TerrainDataset(str(src), tile_cache=str(tmp_path / "cache"), **kw)
    np.testing.assert_array_equal(np.asarray(again.tiles_m), plain.tiles_m)
    monkeypatch.undo()
    # a changed source file (new size and time) makes a new cache entry with the new heights
    np.save(src / "r0.npy", np.full((32, 32), 7.0, np.float32))
    os.utime(src / "r0.npy", ns=(1, 1))
    fresh = TerrainDataset(str(src), tile_cache=str(tmp_path / "cache"), **kw)
    assert len(os.listdir(tmp_path / "cache")) == 2 and len(fresh) == len(plain) + 16 - 9
    assert float(fresh.tiles_m[0].max()) == 7.0
    # another tile size: another entry
    TerrainDataset(str(src), tile_cache=str(tmp_path / "cache"), **{**kw, "tile_size": 12})
    assert len(os.listdir(tmp_path / "cache")) == 3
