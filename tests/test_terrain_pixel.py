"""Terrain pixel sizes: metres per pixel per axis from files (metres, degrees), config overrides, slope angles."""
import math
import sys
import types

import numpy as np
import pytest
import torch

from datasets.terrain import (TerrainDataset, geographic_pixel_m, pixel_pair, read_heightfield, slope_angle,
                              slope_degrees)
from tasks.terrain.task import tile_metrics
from util.errors import DataError
from util.registry import ConfigError

DEG_M = 6_371_008.8 * math.pi / 180.0  # metres per degree of latitude on the mean sphere


def test_geographic_pixel_size_by_hand():
    # a degree of latitude is ~111.195 km everywhere; a degree of longitude shrinks with cos(latitude)
    assert geographic_pixel_m(1.0, 1.0, 0.0) == pytest.approx((111_195.1, 111_195.1), rel=1e-5)
    r, c = geographic_pixel_m(1.0, 1.0, 60.0)
    assert r == pytest.approx(111_195.1, rel=1e-5) and c == pytest.approx(0.5 * 111_195.1, rel=1e-5)
    # 3 arc-seconds at 36.59 N (matplotlib's Jacksboro DEM): ~92.7 m north-south, ~74.4 m east-west
    r, c = geographic_pixel_m(1 / 1200, 1 / 1200, 36.59)
    assert r == pytest.approx(92.66, abs=0.05) and c == pytest.approx(74.41, abs=0.05)


def test_pixel_pair_accepts_numbers_and_pairs_only():
    assert pixel_pair(2) == (2.0, 2.0) and pixel_pair([3, 4.5]) == (3.0, 4.5)
    for bad in (0, -1, True, "2", [1, 2, 3], [1, 0], float("nan"), None):
        with pytest.raises(ValueError, match="gsd"):
            pixel_pair(bad)


def test_slope_angle_uses_each_axis_spacing():
    # a plane rising 2 m per row and 4 m per column on 2 m x 4 m pixels: tan = sqrt(1 + 1) -> 54.7356 degrees
    r, c = np.meshgrid(np.arange(6.0), np.arange(7.0), indexing="ij")
    h = 2.0 * r + 4.0 * c
    np.testing.assert_allclose(slope_degrees(h, [2.0, 4.0]), math.degrees(math.atan(math.sqrt(2.0))))
    # swapping the axes' spacings changes the answer (a single number could not express this)
    np.testing.assert_allclose(slope_degrees(h, [4.0, 2.0]), math.degrees(math.atan(math.sqrt(0.25 + 4.0))))
    t = slope_angle(torch.tensor([1.0]), torch.tensor([0.0]), 1.0, 5.0)
    torch.testing.assert_close(t, torch.tensor([45.0]))


def _npz(path, arr, **extra):
    np.savez(path, elevation=arr, **extra)
    return str(path)


def test_npz_pixel_size_in_metres_and_degrees(tmp_path):
    a = np.zeros((10, 12), np.float32)
    # metres: dx (columns) and dy (rows)
    assert read_heightfield(_npz(tmp_path / "m.npz", a, dx=5.0, dy=10.0))[1] == (10.0, 5.0)
    assert read_heightfield(_npz(tmp_path / "g.npz", a, gsd=2.0))[1] == (2.0, 2.0)
    # degrees: dx with latitude bounds, as matplotlib's Jacksboro DEM stores it
    got = read_heightfield(_npz(tmp_path / "d.npz", a, dx=1 / 1200, dy=1 / 1200, ymin=36.73, ymax=36.45))[1]
    np.testing.assert_allclose(got, geographic_pixel_m(1 / 1200, 1 / 1200, 36.59), rtol=1e-6)
    # latitude / longitude axis arrays, as matplotlib's topobathy stores them
    lat, lon = np.linspace(48.0, 50.0, 10), np.linspace(234.0, 238.0, 12)
    got = read_heightfield(_npz(tmp_path / "ll.npz", a, latitude=lat, longitude=lon))[1]
    np.testing.assert_allclose(got, (2 / 9 * DEG_M, 4 / 11 * DEG_M * math.cos(math.radians(49.0))), rtol=1e-9)
    # nothing declared: unknown
    assert read_heightfield(_npz(tmp_path / "n.npz", a))[1] is None
    with pytest.raises(DataError, match="bad.npz: gsd"):
        read_heightfield(_npz(tmp_path / "bad.npz", a, gsd=-1.0))


def test_dataset_keeps_each_regions_pixel_size_and_metrics_use_it(tmp_path):
    # two regions with different pixel sizes: each tile keeps its own (not the first file's for all)
    ramp = np.tile(np.arange(8.0, dtype=np.float32) * 2.0, (8, 1))  # 2 m per column
    _npz(tmp_path / "a.npz", ramp, dx=2.0)
    _npz(tmp_path / "b.npz", ramp, dx=1.0)
    ds = TerrainDataset(str(tmp_path), tile_size=8, split_by="none")
    np.testing.assert_allclose(ds.pixel_m, [[2.0, 2.0], [1.0, 1.0]])
    assert ds.meta()["pixel_m"] == [[2.0, 2.0], [1.0, 1.0]]
    gt = ds.tiles(np.array([0, 1]))
    torch.testing.assert_close(gt["pixel_m"], torch.tensor([[2.0, 2.0], [1.0, 1.0]], dtype=torch.float64))
    # a flat prediction: the slope error is the true slope, 45 degrees on 2 m pixels, atan(2) on 1 m pixels
    flat = torch.zeros_like(gt["tile"])
    m = tile_metrics(flat, gt, None, None, 1)
    torch.testing.assert_close(m["slope_ae"], torch.tensor([45.0, math.degrees(math.atan(2.0))],
                                                           dtype=torch.float64))
    # an explicit gsd overrides the tiles' own
    m = tile_metrics(flat, gt, 1.0, None, 1)
    torch.testing.assert_close(m["slope_ae"], torch.full((2,), math.degrees(math.atan(2.0)), dtype=torch.float64))
    # dataset.gsd: a number or [row, column] for every region
    ds = TerrainDataset(str(tmp_path), tile_size=8, split_by="none", gsd=[3, 4])
    np.testing.assert_allclose(ds.pixel_m, [[3.0, 4.0], [3.0, 4.0]])
    for bad in (0, [1, 2, 3], "x", True):
        with pytest.raises(ConfigError, match="dataset.gsd"):
            TerrainDataset(str(tmp_path), tile_size=8, gsd=bad)


def test_unknown_pixel_size_warns_and_assumes_one_metre(tmp_path, caplog):
    np.save(tmp_path / "r.npy", np.arange(64, dtype=np.float32).reshape(8, 8))  # varying: a constant DEM is refused
    with caplog.at_level("WARNING"):
        ds = TerrainDataset(str(tmp_path), tile_size=8, split_by="none")
    np.testing.assert_allclose(ds.pixel_m, [[1.0, 1.0]])
    assert "pixel size unknown for r.npy" in caplog.text and "dataset.gsd" in caplog.text


class _Tag:
    def __init__(self, value):
        self.value = value


def _fake_tifffile(tags, arr):
    page = types.SimpleNamespace(asarray=lambda: arr, tags=tags)

    class TiffFile:
        def __init__(self, path):
            self.pages = [page]

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    return types.SimpleNamespace(TiffFile=TiffFile)


def test_geotiff_pixel_scale_projected_and_geographic(tmp_path, monkeypatch):
    arr = np.zeros((100, 80), np.float32)
    f = tmp_path / "dem.tif"
    f.write_bytes(b"")
    # projected model (GTModelTypeGeoKey 1024 = 1): ModelPixelScaleTag (sx, sy, sz) in metres
    geo_proj = _Tag((1, 1, 0, 1, 1024, 0, 1, 1))
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(
        {"ModelPixelScaleTag": _Tag((10.0, 25.0, 0.0)), "GeoKeyDirectoryTag": geo_proj}, arr))
    assert read_heightfield(str(f))[1] == (25.0, 10.0)
    # geographic model (= 2): degrees converted at the raster's mid latitude (tie point row 0 at 50.5 N)
    geo = _Tag((1, 1, 0, 1, 1024, 0, 1, 2))
    tie = _Tag((0.0, 0.0, 0.0, 10.0, 50.5, 0.0))
    monkeypatch.setitem(sys.modules, "tifffile", _fake_tifffile(
        {"ModelPixelScaleTag": _Tag((0.01, 0.01, 0.0)), "GeoKeyDirectoryTag": geo, "ModelTiepointTag": tie}, arr))
    np.testing.assert_allclose(read_heightfield(str(f))[1], geographic_pixel_m(0.01, 0.01, 50.0), rtol=1e-9)
