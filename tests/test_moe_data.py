"""Time-varying volume dataset (datasets/timevolume.py): layouts, normalization, coordinates, deterministic
batches, bad inputs. Expected values are computed here by hand from the arrays written by the test."""
import os

import h5py
import numpy as np
import pytest

from datasets.timevolume import TimeVolumeDataset, time_coords
from util.errors import DataError
from util.registry import ConfigError


def _field(T=4, Z=5, Y=6, X=7):
    """Moving Gaussian blob plus an advected sinusoid, [T, Z, Y, X] float32 (values in data units)."""
    t, z, y, x = np.meshgrid(np.arange(T), np.arange(Z), np.arange(Y), np.arange(X), indexing="ij")
    blob = np.exp(-((x - 1 - t) ** 2 + (y - 2) ** 2 + (z - 2) ** 2) / 4.0)
    return (3.0 * blob + 0.5 * np.sin(0.7 * x - 0.4 * t) + 10.0).astype(np.float32)


def test_single_file_normalization_and_coordinates(tmp_path):
    a = _field()
    np.save(tmp_path / "v.npy", a)
    ds = TimeVolumeDataset(str(tmp_path / "v.npy"), batch_size=500, seed=3)
    assert isinstance(ds._array, np.memmap)  # memory-mapped, not copied
    assert ds.shape == (4, 5, 6, 7) and ds.spatial_dims == 4 and ds.cond_dim == 0
    assert ds.steps_per_epoch == -(-4 * 5 * 6 * 7 // 500)
    lo, hi = float(a.min()), float(a.max())
    b = ds.sample_batch(0)
    idx = b["index"][0].numpy()
    t, z, y, x = np.unravel_index(idx, a.shape)
    want_v = 2 * (a[t, z, y, x].astype(np.float64) - lo) / (hi - lo) - 1
    np.testing.assert_allclose(b["v"][0, :, 0].numpy(), want_v, atol=1e-6)
    xs = b["x"][0].numpy()
    np.testing.assert_allclose(xs[:, 0], 2 * x / 6 - 1, atol=1e-6)  # column 0 = X (last axis)
    np.testing.assert_allclose(xs[:, 1], 2 * y / 5 - 1, atol=1e-6)
    np.testing.assert_allclose(xs[:, 2], 2 * z / 4 - 1, atol=1e-6)
    np.testing.assert_allclose(xs[:, 3], 2 * t / 3 - 1, atol=1e-6)
    assert b["c"].shape == (1, 0)
    # de-normalization inverts the normalization; the full-volume mean is the normalized mean
    np.testing.assert_allclose(ds.denormalize(want_v, t), a[t, z, y, x], rtol=1e-6)
    assert ds.train_value_mean == pytest.approx(float(np.mean(2 * (a.astype(np.float64) - lo) / (hi - lo) - 1)))
    assert ds.raw_nbytes == a.size * 4


def test_batches_depend_only_on_seed_step_rank(tmp_path):
    np.save(tmp_path / "v.npy", _field())
    d1 = TimeVolumeDataset(str(tmp_path / "v.npy"), batch_size=64, seed=1)
    d2 = TimeVolumeDataset(str(tmp_path / "v.npy"), batch_size=64, seed=1, mmap=False)
    for k in ("x", "v", "index"):
        assert np.array_equal(d1.sample_batch(5)[k].numpy(), d2.sample_batch(5)[k].numpy())
    assert not np.array_equal(d1.sample_batch(5)["index"].numpy(), d1.sample_batch(6)["index"].numpy())
    assert not np.array_equal(d1.sample_batch(5, rank=1)["index"].numpy(), d1.sample_batch(5)["index"].numpy())


def test_per_step_files_npy_raw_h5_match_single_file(tmp_path):
    a = _field()
    np.save(tmp_path / "all.npy", a)
    ref = TimeVolumeDataset(str(tmp_path / "all.npy"), batch_size=200, seed=0).sample_batch(2)
    for ext in ("npy", "raw", "h5"):
        d = tmp_path / ext
        d.mkdir()
        for t in range(a.shape[0]):
            p = d / f"step_{t:03d}.{ext}"
            if ext == "npy":
                np.save(p, a[t])
            elif ext == "raw":
                a[t].tofile(p)
            else:
                with h5py.File(p, "w") as f:
                    f["data"] = a[t]
        ds = TimeVolumeDataset(str(d), dims=[5, 6, 7] if ext == "raw" else None, batch_size=200, seed=0)
        b = ds.sample_batch(2)
        for k in ("x", "v", "index"):
            np.testing.assert_array_equal(b[k].numpy(), ref[k].numpy())
    # raw 4-D with dims
    a.tofile(tmp_path / "all.raw")
    b = TimeVolumeDataset(str(tmp_path / "all.raw"), dims=list(a.shape), batch_size=200, seed=0).sample_batch(2)
    np.testing.assert_array_equal(b["v"].numpy(), ref["v"].numpy())


def test_per_step_normalization(tmp_path):
    a = _field()
    a[2] *= 5.0
    np.save(tmp_path / "v.npy", a)
    ds = TimeVolumeDataset(str(tmp_path / "v.npy"), value_norm="per_step")
    vol = ds.volume(2)
    assert vol.min() == pytest.approx(-1.0) and vol.max() == pytest.approx(1.0)
    want = 2 * (a[2] - a[2].min()) / (a[2].max() - a[2].min()) - 1
    np.testing.assert_allclose(vol, want, atol=1e-6)
    assert ds.value_max[2] == pytest.approx(float(a[2].max()))


def test_time_coords_single_step_axis():
    c = time_coords(np.array([0, 5]), (1, 2, 2, 3))
    np.testing.assert_allclose(c[:, 3], 0.0)
    np.testing.assert_allclose(c[1], [1.0, 1.0, -1.0, 0.0])  # flat 5 -> (t0, z0, y1, x2)


def test_bad_inputs(tmp_path):
    a = _field()
    np.save(tmp_path / "three_d.npy", a[0])
    with pytest.raises(DataError, match=r"three_d\.npy.*4-D"):
        TimeVolumeDataset(str(tmp_path / "three_d.npy"))
    b = a.copy()
    b[1, 2, 3, 4] = np.nan
    np.save(tmp_path / "nan.npy", b)
    with pytest.raises(DataError, match=r"nan\.npy time step 1: 1 NaN"):
        TimeVolumeDataset(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "const.npy", np.ones((2, 3, 3, 3), np.float32))
    with pytest.raises(DataError, match="constant"):
        TimeVolumeDataset(str(tmp_path / "const.npy"))
    d = tmp_path / "steps"
    d.mkdir()
    np.save(d / "s0.npy", a[0])
    np.save(d / "s1.npy", a[1, :, :, :5])
    with pytest.raises(DataError, match=r"s1\.npy: shape \[5, 6, 5\] differs"):
        TimeVolumeDataset(str(d))
    a[0].tofile(tmp_path / "x.raw")
    with pytest.raises(DataError, match=r"x\.raw.*bytes"):
        TimeVolumeDataset(str(tmp_path / "x.raw"), dims=[2, 5, 6, 7])
    with pytest.raises(ConfigError, match=r"dataset\.dims.*\[T, Z, Y, X\]"):
        TimeVolumeDataset(str(tmp_path / "x.raw"), dims=[5, 6, 7])
    with pytest.raises(ConfigError, match="value_norm"):
        TimeVolumeDataset(str(tmp_path / "nan.npy"), value_norm="minmax")
    with pytest.raises(FileNotFoundError, match="missing"):
        TimeVolumeDataset(str(tmp_path / "missing.npy"))
