"""EnsembleDataset: on-disk layout, normalization, batches, storage equivalence, downsampling, errors."""
import json
import os

import numpy as np
import pytest
import torch

from datasets.ensemble import EnsembleDataset, downsampled_shape, open_member
from util.errors import DataError
from util.registry import ConfigError, build
from util.sampling import coords_to_continuous_index, grid_coords, interp_gather


def write_ensemble(root, fields, params, n_train, fmt="npy", perm=None, h5_key="data", cond_meta=False):
    """Write the reference layout into ``root``: member files, cond.npy, split.npy (first n_train rows train).

    ``perm[r]`` is the file index of cond row r (default identity), so rows and files can differ in order.
    """
    root = str(root)
    data = os.path.join(root, "data")
    os.makedirs(data, exist_ok=True)
    m = len(fields)
    for i, f in enumerate(fields):
        p = os.path.join(data, f"member_{i:03d}.{fmt}")
        if fmt == "npy":
            np.save(p, f)
        elif fmt == "raw":
            np.asarray(f, dtype=np.float32).tofile(p)
        elif fmt in ("h5", "nc", "h5gz"):
            import h5py

            p = p[:-2] if fmt == "h5gz" else p  # .h5
            with h5py.File(p, "w") as h:
                h.create_dataset(h5_key, data=f, **(dict(chunks=True, compression="gzip") if fmt == "h5gz" else {}))
        elif fmt == "nc3":
            from scipy.io import netcdf_file

            p = p[:-1]  # .nc
            with netcdf_file(p, "w") as nc:
                for k, n in enumerate(f.shape):
                    nc.createDimension(f"d{k}", n)
                var = nc.createVariable(h5_key, "f4", tuple(f"d{k}" for k in range(f.ndim)))
                var[:] = f
    perm = np.arange(m) if perm is None else np.asarray(perm)
    cond = np.concatenate([perm[:, None].astype(np.float32), np.asarray(params, np.float32)], axis=1)
    np.save(os.path.join(root, "cond.npy"), cond)
    np.save(os.path.join(root, "split.npy"), {"cond_idx": np.arange(n_train), "cond_idx_unseen": np.arange(n_train, m)},
            allow_pickle=True)
    if cond_meta:
        d_c = np.asarray(params).shape[1]
        with open(os.path.join(root, "cond_meta.json"), "w") as f:
            json.dump({"names": [f"p{k}" for k in range(d_c)], "min": [0.0] * d_c, "max": [2.0] * d_c}, f)
    return dict(data_dir=data, cond_path=os.path.join(root, "cond.npy"),
                cond_split_path=os.path.join(root, "split.npy"))


def random_ensemble(m=7, shape=(6, 5, 4), d_c=3, seed=0, positive=False):
    rng = np.random.default_rng(seed)
    fields = rng.random((m,) + tuple(shape)).astype(np.float32) * 3.0 - 1.0
    if positive:
        fields = fields + 1.5
    params = rng.random((m, d_c)).astype(np.float32)
    return fields, params


@pytest.fixture
def ens3d(tmp_path):
    fields, params = random_ensemble()
    perm = np.array([3, 0, 6, 1, 5, 2, 4])  # cond row r -> file perm[r]
    paths = write_ensemble(tmp_path / "e", fields, params, n_train=5, perm=perm, cond_meta=True)
    return paths, fields, params, perm


def _norm(fields, train_files, log=False):
    f = np.log(fields.astype(np.float64)) if log else fields.astype(np.float64)
    lo, hi = f[train_files].min(), f[train_files].max()
    return (f - lo) / (hi - lo), lo, hi


def test_batch_shapes_values_and_conditions(ens3d):
    paths, fields, params, perm = ens3d
    ds = EnsembleDataset(**paths, cond_batch=4, spatial_log2batch=6)
    assert ds.spatial_shape == (6, 5, 4) and ds.train_shape == (6, 5, 4)
    assert ds.spatial_dims == 3 and ds.cond_dim == 3
    np.testing.assert_array_equal(ds.train_idx, np.arange(5))
    np.testing.assert_array_equal(ds.test_idx, [5, 6])
    b = ds.sample_batch(0)
    assert b["x"].shape == (4, 64, 3) and b["c"].shape == (4, 3) and b["v"].shape == (4, 64, 1)
    assert b["member"].shape == (4,)
    assert b["x"].dtype == b["c"].dtype == b["v"].dtype == torch.float32 and b["member"].dtype == torch.int64
    assert b["x"].abs().max() <= 1 and 0 <= b["v"].min() and b["v"].max() <= 1
    assert set(b["member"].tolist()) <= set(range(5))
    norm, lo, hi = _norm(fields, perm[:5])
    assert ds.value_min == pytest.approx(lo) and ds.value_max == pytest.approx(hi)
    for i, row in enumerate(b["member"].tolist()):
        np.testing.assert_array_equal(b["c"][i].numpy(), params[row])
        # x are vertex coordinates; v the normalized value of the row's FILE there
        idx = np.rint(coords_to_continuous_index(b["x"][i].numpy(), ds.spatial_shape)).astype(int)
        expect = norm[perm[row]][tuple(idx.T)]
        np.testing.assert_allclose(b["v"][i, :, 0].numpy(), expect, rtol=0, atol=1e-6)
    full = ds.full_field(6)
    assert full.shape == (6, 5, 4) and full.dtype == torch.float32
    np.testing.assert_allclose(full.numpy(), norm[perm[6]], atol=1e-6)
    np.testing.assert_array_equal(ds.conds([6, 0]).numpy(), params[[6, 0]])


def test_epoch_length_and_meta(ens3d):
    paths, *_ = ens3d
    ds = EnsembleDataset(**paths, cond_batch=3, spatial_log2batch=4)
    assert ds.steps_per_epoch == int(np.ceil(5 * 120 / 16 / 3))
    meta = ds.meta()
    json.dumps(meta)
    assert meta["spatial_shape"] == [6, 5, 4] and meta["cond_dim"] == 3 and meta["log_transform"] is False
    assert meta["param_names"] == ["p0", "p1", "p2"] and meta["param_max"] == [2.0] * 3
    ds2 = EnsembleDataset(**paths, cond_batch=16, spatial_log2batch=12)
    assert ds2.steps_per_epoch == 1


def test_determinism(ens3d):
    paths, *_ = ens3d
    kw = dict(cond_batch=3, spatial_log2batch=5, augment="vp_sc", tau_x=0.05, tau_c=0.02)
    a, b = EnsembleDataset(**paths, **kw), EnsembleDataset(**paths, **kw)
    x, y = a.sample_batch(7, rank=1), b.sample_batch(7, rank=1)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.sample_batch(8, 1)["x"], x["x"])
    assert not torch.equal(a.sample_batch(7, 0)["x"], x["x"])
    c = EnsembleDataset(**paths, seed=1, **kw)
    assert not torch.equal(c.sample_batch(7, 1)["x"], x["x"])


@pytest.mark.parametrize("kw", [
    dict(),
    dict(augment="vp_sc", tau_x=0.1, tau_c=0.05, vp_k=3),
    dict(augment="vp_s", tau_x=0.2, importance="both", log_transform=True),
    dict(downsample=2, augment="vp_s", tau_x=0.2, importance="coord"),
])
def test_memory_and_mmap_give_identical_batches(tmp_path, kw):
    fields, params = random_ensemble(shape=(7, 6, 5), positive=True)
    paths = write_ensemble(tmp_path / "e", fields, params, n_train=5)
    mem = EnsembleDataset(**paths, storage="memory", cond_batch=4, spatial_log2batch=7, **kw)
    mm = EnsembleDataset(**paths, storage="mmap", cond_batch=4, spatial_log2batch=7, **kw)
    for step in (0, 3):
        a, b = mem.sample_batch(step), mm.sample_batch(step)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for row in (0, 6):
        assert torch.equal(mem.train_field(row), mm.train_field(row))
        assert torch.equal(mem.full_field(row), mm.full_field(row))


def test_2d_raw_end_to_end(tmp_path):
    fields, params = random_ensemble(m=5, shape=(9, 12), d_c=2)
    paths = write_ensemble(tmp_path / "r", fields, params, n_train=4, fmt="raw")
    ds = build("dataset", "ensemble", section="dataset", **paths, dims=[9, 12], cond_batch=2, spatial_log2batch=5,
               augment="vp_sc", tau_x=0.05, tau_c=0.05, storage="mmap", importance="both")
    assert ds.spatial_shape == (9, 12) and ds.spatial_dims == 2
    b = ds.sample_batch(1)
    assert b["x"].shape == (2, 32, 2) and b["c"].shape == (2, 2) and b["v"].shape == (2, 32, 1)
    assert torch.isfinite(b["v"]).all() and b["x"].abs().max() <= 1
    assert tuple(ds.full_field(4).shape) == (9, 12)
    # grid_coords enumerates the field in flat C order, column 0 = last axis
    norm, _, _ = _norm(fields, np.arange(4))
    g = grid_coords(ds.spatial_shape).numpy()
    v = interp_gather(lambda i: norm[4].reshape(-1)[i], g, ds.spatial_shape)
    np.testing.assert_allclose(v, ds.full_field(4).numpy().reshape(-1), atol=1e-6)


@pytest.mark.parametrize("fmt", ["h5", "h5gz", "nc", "nc3"])
def test_hdf5_and_netcdf_members(tmp_path, fmt):
    fields, params = random_ensemble(m=4, shape=(5, 6), d_c=2)
    paths = write_ensemble(tmp_path / fmt, fields, params, n_train=3, fmt=fmt, h5_key="energy")
    mem = EnsembleDataset(**paths, h5_key="energy", cond_batch=2, spatial_log2batch=4)
    mm = EnsembleDataset(**paths, h5_key="energy", cond_batch=2, spatial_log2batch=4, storage="mmap")
    norm, _, _ = _norm(fields, np.arange(3))
    np.testing.assert_allclose(mem.full_field(3).numpy(), norm[3], atol=1e-6)
    a, b = mem.sample_batch(2), mm.sample_batch(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if fmt == "h5":  # contiguous HDF5 datasets are memory-mapped
        assert isinstance(open_member(os.path.join(paths["data_dir"], "member_000.h5"), h5_key="energy"), np.memmap)
        with pytest.raises(ValueError, match="no dataset 'data'.*h5_key"):
            EnsembleDataset(**paths)


def test_file_ext_filters_members(tmp_path):
    fields, params = random_ensemble(m=4, shape=(4, 4), d_c=1)
    paths = write_ensemble(tmp_path / "e", fields, params, n_train=3)
    with open(os.path.join(paths["data_dir"], "notes.txt"), "w") as f:
        f.write("not a member")
    ds = EnsembleDataset(**paths, file_ext=".npy")  # notes.txt is not listed
    assert len(ds.files) == 4 and ds.full_field(3).shape == (4, 4)
    # a 5th .npy: more files than cond rows is refused even when it sorts last; a pattern selects the members
    np.save(os.path.join(paths["data_dir"], "zz_extra.raw.npy"), fields[0])
    with pytest.raises(DataError, match=r"lists 5 member files.*has 4 rows.*zz_extra\.raw\.npy"):
        EnsembleDataset(**paths, file_ext=".npy")
    ds = EnsembleDataset(**paths, file_ext=".npy", file_pattern="member_*")
    assert len(ds.files) == 4 and ds.full_field(3).shape == (4, 4)


def test_log_transform_and_value_conversions(tmp_path):
    fields, params = random_ensemble(m=4, shape=(4, 5), d_c=1, positive=True)
    paths = write_ensemble(tmp_path / "e", fields, params, n_train=3)
    ds = EnsembleDataset(**paths, log_transform=True)
    norm, lo, hi = _norm(fields, np.arange(3), log=True)
    assert ds.value_min == pytest.approx(lo) and ds.meta()["log_transform"] is True
    np.testing.assert_allclose(ds.full_field(3).numpy(), norm[3], atol=1e-6)
    np.testing.assert_allclose(ds.normalize_values(fields[3]), norm[3], atol=1e-6)
    back = ds.denormalize_values(ds.full_field(3))
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    np.testing.assert_allclose(back.numpy(), fields[3], rtol=1e-5)
    np.testing.assert_allclose(ds.denormalize_values(np.float64(0.0)), np.exp(lo))
    fixed = EnsembleDataset(**paths, value_min=-1.0, value_max=3.0)
    np.testing.assert_allclose(fixed.full_field(0).numpy(), (fields[0] + 1.0) / 4.0, atol=1e-6)


def test_downsample(tmp_path):
    # odd sizes: exact subsampling of every second vertex; even sizes: n/2 vertices (the reference's 0.5)
    assert downsampled_shape((9, 7, 5), 2) == (5, 4, 3) and downsampled_shape((128, 16), 2) == (64, 8)
    fields, params = random_ensemble(m=4, shape=(9, 7, 8), d_c=2)
    paths = write_ensemble(tmp_path / "e", fields, params, n_train=3)
    ds = EnsembleDataset(**paths, downsample=2, cond_batch=2, spatial_log2batch=6)
    assert ds.spatial_shape == (9, 7, 8) and ds.train_shape == (5, 4, 4)
    assert tuple(ds.full_field(3).shape) == (9, 7, 8) and tuple(ds.train_field(3).shape) == (5, 4, 4)
    assert ds.steps_per_epoch == int(np.ceil(3 * 80 / 64 / 2))
    full = ds.full_field(1).numpy()
    coarse = ds.train_field(1).numpy()
    np.testing.assert_array_equal(coarse[:, :, 0], full[::2, ::2, 0])  # odd axes: exact vertices
    # the coarse field is the full one sampled (align_corners) at the coarse vertex coordinates
    ref = interp_gather(lambda i: full.reshape(-1)[i], grid_coords(ds.train_shape).numpy().astype(np.float64),
                        ds.spatial_shape)
    np.testing.assert_allclose(coarse.reshape(-1), ref, atol=1e-5)
    ref_t = torch.nn.functional.interpolate(torch.from_numpy(full)[None, None], size=ds.train_shape,
                                            mode="trilinear", align_corners=True)[0, 0]
    np.testing.assert_allclose(coarse, ref_t.numpy(), atol=1e-5)
    b = ds.sample_batch(0)
    for i, row in enumerate(b["member"].tolist()):
        idx = np.rint(coords_to_continuous_index(b["x"][i].numpy(), ds.train_shape)).astype(int)
        np.testing.assert_array_equal(b["v"][i, :, 0].numpy(), ds.train_field(row).numpy()[tuple(idx.T)])


@pytest.mark.parametrize("shape", [(8, 9), (5, 6, 7)])
def test_vp_s_batches_exact_on_linear_field(tmp_path, shape):
    d = len(shape)
    g = grid_coords(shape).numpy().astype(np.float64)  # (V, d)
    slope = np.array([0.3, -0.2, 0.1][:d])
    fields = np.stack([(1.0 + k + g @ slope).reshape(shape) for k in range(3)]).astype(np.float32)
    paths = write_ensemble(tmp_path / "lin", fields, np.array([[0.0], [0.5], [1.0]]), n_train=3)
    ds = EnsembleDataset(**paths, augment="vp_s", tau_x=0.3, sigma_x=0.2, cond_batch=3, spatial_log2batch=8)
    b = ds.sample_batch(0)
    x = b["x"].numpy().astype(np.float64)
    raw = 1.0 + b["member"].numpy()[:, None] + x @ slope
    np.testing.assert_allclose(b["v"][..., 0].numpy(), ds.normalize_values(raw), atol=2e-5)


def test_errors(tmp_path, ens3d):
    paths, fields, params, perm = ens3d
    with pytest.raises(FileNotFoundError, match="cond_path"):
        EnsembleDataset(**{**paths, "cond_path": str(tmp_path / "nope.npy")})
    with pytest.raises(FileNotFoundError, match="data_dir"):
        EnsembleDataset(**{**paths, "data_dir": str(tmp_path / "nodir")})
    for key, val in (("importance", "coords"), ("augment", "vp"), ("storage", "disk"), ("downsample", 0.5)):
        with pytest.raises(ConfigError, match=f"dataset.{key}"):
            EnsembleDataset(**paths, **{key: val})
    with pytest.raises(ConfigError, match="tau_x is required"):
        EnsembleDataset(**paths, augment="vp_s")
    with pytest.raises(ConfigError, match="give both"):
        EnsembleDataset(**paths, value_min=0.0)
    with pytest.raises(ConfigError, match="tau_x"):
        EnsembleDataset(**paths, augment="vc", tau_x=[0.1, 0.1])  # needs 3 values
    # raw members: dims missing, wrong size
    fr, pr = random_ensemble(m=3, shape=(4, 5), d_c=1)
    rp = write_ensemble(tmp_path / "raw", fr, pr, n_train=2, fmt="raw")
    with pytest.raises(ConfigError, match="member_000.raw.*dataset.dims"):
        EnsembleDataset(**rp)
    with pytest.raises(ValueError, match="member_000.raw: 80 bytes.*\\[4, 6\\]"):
        EnsembleDataset(**rp, dims=[4, 6])
    # NaN in a training member and in a test member: the message names the file
    fn, pn = random_ensemble(m=3, shape=(4, 4), d_c=1)
    fn[1, 2, 2] = np.nan
    fn[2, 0, 0] = np.inf
    nanp = write_ensemble(tmp_path / "nan", fn, pn, n_train=2)
    # the test member is checked at construction (not first at test time), also with a given range and mmap
    for kw in ({}, dict(value_min=0.0, value_max=1.0, storage="mmap")):
        with pytest.raises(DataError, match="member_002.npy: 0 NaN and 1 Inf"):
            EnsembleDataset(**nanp, **kw)
    np.save(os.path.join(nanp["data_dir"], "member_002.npy"), fn[0])
    with pytest.raises(DataError, match="member_001.npy: 1 NaN"):
        EnsembleDataset(**nanp)
    # missing member file referenced by cond.npy
    os.remove(os.path.join(nanp["data_dir"], "member_002.npy"))
    with pytest.raises(ValueError, match="column 0"):
        EnsembleDataset(**nanp)
    # log of non-positive values
    with pytest.raises(ValueError, match="member_00.\\.npy: log_transform needs values > 0"):
        EnsembleDataset(**paths, log_transform=True)
    # constant training fields
    cp = write_ensemble(tmp_path / "const", np.ones((3, 4, 4), np.float32), pn, n_train=2)
    with pytest.raises(ValueError, match="constant value"):
        EnsembleDataset(**cp)
    # mismatching member shapes
    np.save(os.path.join(paths["data_dir"], "member_000.npy"), np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="member_000.npy has shape \\[2, 2, 2\\]"):
        EnsembleDataset(**paths)
    # bad split file
    np.save(paths["cond_split_path"], {"cond_idx": np.array([0, 99]), "cond_idx_unseen": []}, allow_pickle=True)
    with pytest.raises(DataError, match=r"'cond_idx' must hold row numbers of cond.npy \(0..6\), got values from 0 "
                                        r"to 99"):
        EnsembleDataset(**paths)


def test_real_layout_smoke():
    root = "/work/shared/data/clover16"
    if not os.path.isdir(root):
        pytest.skip("clover16 not available")
    ds = EnsembleDataset(data_dir=f"{root}/data", cond_path=f"{root}/cond.npy", cond_split_path=f"{root}/split.npy",
                        cond_batch=2, spatial_log2batch=6)
    assert ds.spatial_shape == (16, 16, 16) and ds.cond_dim == 6 and len(ds.train_idx) == 100
    assert 0.5 < ds.value_min < 0.7 and 15 < ds.value_max < 16


def test_every_registered_dataset_subclasses_the_base():
    """datasets.base.Dataset declares the contract and its defaults once; no caller probes with hasattr."""
    import inspect

    from datasets.base import Dataset
    from util.registry import get, names

    classes = {n: get("dataset", n) for n in names("dataset") if not n.startswith("_")}
    classes = {n: c for n, c in classes.items() if inspect.isclass(c)}
    assert {"ensemble", "unstructured", "image", "blender", "time_volume", "taylor_green", "terrain"} <= set(classes)
    for n, c in classes.items():
        assert issubclass(c, Dataset), n
        for attr in ("cond_dim", "spatial_dims", "out_dim", "has_grid", "train_value_mean", "steps_per_epoch",
                     "sample_batch", "meta", "eval_coords"):
            assert hasattr(c, attr), (n, attr)
    # the defaults, and what a dataset that overrides nothing reports
    class Bare(Dataset):
        spatial_dims = 2
    b = Bare()
    assert (b.cond_dim, b.spatial_dims, b.out_dim, b.has_grid, b.train_value_mean) == (0, 2, 1, True, None)
    assert b.eval_coords("full") is None and b.meta() == {}
    with pytest.raises(NotImplementedError):
        b.sample_batch(0)
    with pytest.raises(NotImplementedError):
        b.steps_per_epoch
