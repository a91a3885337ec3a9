"""Volume output: .vti round trip and axis order, PNG slices, atomic .npy."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from util.files import atomic_save_npy
from util.volume_io import colorize, read_vti, take_slice, write_slice_pngs, write_vti


def _header(path):
    with open(path, "rb") as f:
        data = f.read()
    return data[:data.index(b"<AppendedData")].decode("ascii")


def test_vti_round_trip_non_cubic(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 0.5  # (D, H, W) = (2, 3, 4)
    p = str(tmp_path / "v.vti")
    assert write_vti(p, a, name="density", spacing=(0.5, 1.0, 2.0), origin=(1, 2, 3)) == p
    head = _header(p)
    # x <-> W (4 points), y <-> H (3), z <-> D (2)
    assert 'WholeExtent="0 3 0 2 0 1"' in head and 'Extent="0 3 0 2 0 1"' in head
    assert 'Spacing="0.5 1.0 2.0"' in head and 'Origin="1.0 2.0 3.0"' in head
    assert 'type="Float32"' in head and 'Name="density"' in head and 'header_type="UInt64"' in head
    b, info = read_vti(p)
    assert b.shape == (2, 3, 4) and b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert info["name"] == "density" and info["extent"] == (0, 3, 0, 2, 0, 1)
    assert info["spacing"] == (0.5, 1.0, 2.0) and info["origin"] == (1.0, 2.0, 3.0)
    # the raw bytes are the C-order array: x (last axis) fastest
    with open(p, "rb") as f:
        data = f.read()
    start = data.index(b"_", data.index(b"<AppendedData")) + 1
    assert int(np.frombuffer(data, "<u8", 1, start)[0]) == a.nbytes
    np.testing.assert_array_equal(np.frombuffer(data, "<f4", 24, start + 8), a.ravel())
    assert not [n for n in os.listdir(tmp_path) if n != "v.vti"]  # no temp files left


def test_vti_2d_tensor_and_dtypes(tmp_path):
    p = str(tmp_path / "s.vti")
    t = torch.rand(5, 7, dtype=torch.float64)
    write_vti(p, t)
    assert 'WholeExtent="0 6 0 4 0 0"' in _header(p)
    b, info = read_vti(p)
    assert b.shape == (5, 7) and b.dtype == np.float64
    np.testing.assert_array_equal(b, t.numpy())
    for dt in (np.uint8, np.int32, np.float16, np.bool_):
        a = (np.arange(6).reshape(1, 2, 3) % 2).astype(dt)
        write_vti(p, a)
        b, _ = read_vti(p)
        np.testing.assert_array_equal(b, a[0].astype(b.dtype))


def test_vti_several_arrays_and_big_endian(tmp_path):
    p = str(tmp_path / "m.vti")
    a = np.random.default_rng(0).random((3, 2, 5)).astype(">f8")  # big-endian input is converted
    write_vti(p, {"pred": a, "true": np.zeros((3, 2, 5), np.float32)})
    assert 'Scalars="pred"' in _header(p)
    b, info = read_vti(p)
    assert info["name"] == "pred" and set(info["arrays"]) == {"pred", "true"}
    np.testing.assert_array_equal(b, a)
    assert info["arrays"]["true"].shape == (3, 2, 5)
    with pytest.raises(ValueError):
        write_vti(p, {"a": np.zeros((2, 2, 2)), "b": np.zeros((2, 2, 3))})
    with pytest.raises(ValueError):
        write_vti(p, np.zeros(5))


def test_vti_readable_by_vtk(tmp_path):
    vtk = pytest.importorskip("vtk")  # optional: only where the vtk package is installed
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    p = str(tmp_path / "v.vti")
    write_vti(p, a)
    r = vtk.vtkXMLImageDataReader()
    r.SetFileName(p)
    r.Update()
    im = r.GetOutput()
    assert im.GetDimensions() == (4, 3, 2)
    assert im.GetPointData().GetArray(0).GetValue(im.ComputePointId([3, 2, 1])) == a[1, 2, 3]


def test_slice_pngs(tmp_path):
    rng = np.random.default_rng(0)
    gt = rng.random((6, 10, 14)).astype(np.float32)
    pred = gt + 0.1
    prefix = str(tmp_path / "m0")
    out = write_slice_pngs(prefix, pred, gt, scale=1)
    assert set(out) == {"pred", "true", "err"}
    for k, path in out.items():
        assert path == f"{prefix}_{k}.png" and os.path.isfile(path)
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (14, 10) and im.mode == "RGB"  # (W, H) of an axis-0 slice
    # other axis, default magnification (>= 256 px on the longer side), torch inputs
    out = write_slice_pngs(prefix, torch.from_numpy(pred), torch.from_numpy(gt), axis=2, index=3)
    with Image.open(out["err"]) as im:
        assert im.size == (10 * 26, 6 * 26)  # slice (6, 10): factor ceil(256 / 10) = 26
    # 2D input, common range: the pixel of the global max is the top colour in one of pred/true
    f = np.zeros((4, 5))
    f[0, 0] = 1.0
    out = write_slice_pngs(prefix, f, f * 0.5, scale=1, cmap="gray")
    p = np.asarray(Image.open(out["pred"]))
    t = np.asarray(Image.open(out["true"]))
    assert tuple(p[-1, 0]) == (255, 255, 255)  # row 0 drawn at the bottom
    assert 120 <= t[-1, 0, 0] <= 135 and t[0, 0, 0] == 0  # 0.5 on the common [0, 1] range


def test_slice_helpers():
    v = np.arange(24).reshape(2, 3, 4)
    assert take_slice(v).shape == (3, 4) and np.array_equal(take_slice(v), v[1])
    assert np.array_equal(take_slice(v, axis=2, index=0), v[:, :, 0])
    with pytest.raises(IndexError):
        take_slice(v, axis=0, index=5)
    rgb = colorize(np.array([[0.0, 0.5, 1.0, np.nan]]), 0.0, 1.0, "gray")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 128, 255, 0]
    assert colorize(np.ones((2, 2)), 1.0, 1.0).shape == (2, 2, 3)  # flat range is fine


def test_atomic_save_npy(tmp_path):
    p = str(tmp_path / "x.npy")
    atomic_save_npy(p, torch.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(np.load(p), np.arange(6).reshape(2, 3))
    assert os.listdir(tmp_path) == ["x.npy"]
