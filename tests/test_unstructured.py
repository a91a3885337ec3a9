"""The unstructured (mesh) dataset: coordinate normalization, the batch API, options, and train.py / test.py end to
end on a demo-sized synthetic MPAS-like ensemble (random columns on a spherical shell x a few depth levels)."""
import csv
import math
import os

import numpy as np
import pytest
import torch
import yaml

import datasets  # noqa: F401  registers the dataset types
from datasets import importance as imp
from datasets.unstructured import UnstructuredDataset, normalize_vertex_coords
from util.registry import ConfigError

TINY_MODEL = dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
                  spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
                  cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)
N_TRAIN, N_TEST, COLUMNS, LEVELS = 9, 3, 120, 4
N = COLUMNS * LEVELS


def make_mesh_ensemble(root, fmt="npy", n_train=N_TRAIN, n_test=N_TEST, seed=0):
    """Columns at random (lon, lat) on a sphere x LEVELS depths; field = smooth function of position and c.

    Writes root/data/member_XXXX.{npy,raw}, root/coords.npy (N, 3) = (depth, lon, lat in degrees), cond.npy,
    split.npy. Returns the paths as dataset keys."""
    rng = np.random.default_rng(seed)
    lon = rng.uniform(-180, 180, COLUMNS)
    lat = np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, COLUMNS)))
    depth = np.array([5.0, 50.0, 200.0, 1000.0])
    coords = np.stack([np.repeat(depth, COLUMNS), np.tile(lon, LEVELS), np.tile(lat, LEVELS)], axis=1)
    m = n_train + n_test
    params = rng.uniform(0, 1, (m, 2))
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    for i, (a, b) in enumerate(params):
        lo, la, d = np.radians(coords[:, 1]), np.radians(coords[:, 2]), coords[:, 0] / 1000.0
        v = 2.0 + np.sin(lo * (1 + a)) * np.cos(2 * la) * np.exp(-d) + b * d + 0.3 * a * np.sin(3 * la)
        path = os.path.join(root, "data", f"member_{i:04d}.{fmt}")
        if fmt == "npy":
            np.save(path, v.astype(np.float32))
        else:
            v.astype(np.float32).tofile(path)
    cond = np.concatenate([np.arange(m)[:, None], params], axis=1)
    np.save(os.path.join(root, "coords.npy"), coords)
    np.save(os.path.join(root, "cond.npy"), cond)
    np.save(os.path.join(root, "split.npy"), {"cond_idx": np.arange(n_train), "cond_idx_unseen": np.arange(n_train, m)})
    return dict(data_dir=os.path.join(root, "data"), coords_path=os.path.join(root, "coords.npy"),
                cond_path=os.path.join(root, "cond.npy"), cond_split_path=os.path.join(root, "split.npy"),
                coords_spherical=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    return make_mesh_ensemble(str(tmp_path_factory.mktemp("mesh")))


def build(paths, **kw):
    return UnstructuredDataset(**{**paths, "cond_batch": 3, "spatial_log2batch": 6, **kw})


# ------------------------------------------------------------------------------------------- coordinates
def test_coordinate_normalization_spherical_and_plain():
    # (depth, lon, lat): a mesh across the dateline gets one contiguous lon interval; columns reversed
    s = np.array([[0.0, 170.0, -10.0], [10.0, 175.0, 0.0], [20.0, -175.0, 5.0], [40.0, -170.0, 30.0]])
    x = normalize_vertex_coords(s, spherical=True)
    assert x.dtype == np.float32 and x.shape == (4, 3)
    np.testing.assert_allclose(x[:, 2], [-1.0, -0.5, 0.0, 1.0], atol=1e-7)        # depth -> column 2
    np.testing.assert_allclose(x[:, 1], [-1.0, -0.5, 0.5, 1.0], atol=1e-6)        # lon 170..190 contiguous
    np.testing.assert_allclose(x[:, 0], [-1.0, -0.5, -0.25, 1.0], atol=1e-7)      # lat -> column 0
    # plain: per-axis min-max, no unwrapping; reverse_columns=False keeps the stored order
    y = normalize_vertex_coords(s, spherical=False, reverse_columns=False)
    np.testing.assert_allclose(y[:, 1], 2 * (s[:, 1] + 175) / 350 - 1, atol=1e-6)
    np.testing.assert_allclose(y[:, 0], [-1.0, -0.5, 0.0, 1.0], atol=1e-7)
    # a constant column maps to 0
    flat = normalize_vertex_coords(np.array([[0.0, 1.0, 5.0], [1.0, 2.0, 5.0]]))
    np.testing.assert_array_equal(flat[:, 0], [0.0, 0.0])
    with pytest.raises(ValueError, match="lat"):
        normalize_vertex_coords(np.array([[0.0, 0.0, 95.0], [1.0, 1.0, 0.0]]), spherical=True)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        normalize_vertex_coords(np.zeros((5, 2)))


# ----------------------------------------------------------------------------------------------- the API
def test_dataset_api(mesh):
    ds = build(mesh)
    assert ds.spatial_shape == ds.train_shape == (N,)
    assert ds.spatial_dims == 3 and ds.cond_dim == 2 and ds.has_grid is False and ds.n_vertices == N
    assert list(ds.train_idx) == list(range(N_TRAIN)) and list(ds.test_idx) == list(range(N_TRAIN, N_TRAIN + N_TEST))
    assert ds.steps_per_epoch == math.ceil(N_TRAIN * N / (64 * 3))
    xc = ds.eval_coords("full")
    assert xc.dtype == torch.float32 and xc.shape == (N, 3) and float(xc.abs().max()) <= 1.0
    assert torch.equal(xc, ds.eval_coords("train"))
    assert np.allclose(xc.amin(0).numpy(), -1) and np.allclose(xc.amax(0).numpy(), 1)
    f = ds.full_field(N_TRAIN + 1)
    assert f.shape == (N,) and f.dtype == torch.float32 and torch.equal(f, ds.train_field(N_TRAIN + 1))
    raw = np.load(os.path.join(mesh["data_dir"], f"member_{N_TRAIN + 1:04d}.npy"))
    np.testing.assert_allclose(ds.denormalize_values(f.numpy()), raw, rtol=1e-5)
    tr = torch.stack([ds.full_field(r) for r in ds.train_idx])
    assert float(tr.min()) == pytest.approx(0.0, abs=1e-6) and float(tr.max()) == pytest.approx(1.0, abs=1e-6)
    meta = ds.meta()
    assert meta["spatial_dims"] == 3 and meta["spatial_shape"] == [N] and meta["has_grid"] is False
    torch.testing.assert_close(ds.conds([0, 10]), torch.from_numpy(np.load(mesh["cond_path"])[[0, 10], 1:]).float())


def test_batches_shapes_ranges_alignment_and_determinism(mesh):
    ds = build(mesh)
    b = ds.sample_batch(3)
    assert b["x"].shape == (3, 64, 3) and b["c"].shape == (3, 2) and b["v"].shape == (3, 64, 1)
    assert b["member"].dtype == torch.int64 and all(int(m) in set(ds.train_idx.tolist()) for m in b["member"])
    assert all(t.dtype == torch.float32 for k, t in b.items() if k != "member")
    assert float(b["x"].abs().max()) <= 1 and 0 <= float(b["v"].min()) and float(b["v"].max()) <= 1
    torch.testing.assert_close(b["c"], ds.conds(b["member"]))
    # every (x, v) is a vertex of the mesh with that member's value there
    coords = ds.eval_coords().numpy()
    for i in range(3):
        d = ((b["x"][i].numpy()[:, None, :] - coords[None]) ** 2).sum(-1)
        j = d.argmin(1)
        assert np.allclose(d[np.arange(64), j], 0)
        np.testing.assert_array_equal(b["v"][i, :, 0].numpy(), ds.full_field(int(b["member"][i])).numpy()[j])
    # a batch depends on (seed, step, rank) only; mmap and memory storage agree; raw files as well
    again = build(mesh).sample_batch(3)
    mm = build(mesh, storage="mmap").sample_batch(3)
    for k in b:
        assert torch.equal(b[k], again[k]) and torch.equal(b[k], mm[k])
    assert not torch.equal(b["x"], ds.sample_batch(4)["x"]) and not torch.equal(b["x"], ds.sample_batch(3, 1)["x"])
    assert not torch.equal(b["x"], build(mesh, seed=1).sample_batch(3)["x"])


def test_raw_member_files(tmp_path, mesh):
    paths = make_mesh_ensemble(str(tmp_path / "raw"), fmt="raw")
    ds, ref = build(paths), build(mesh)
    for k, v in ref.sample_batch(0).items():
        assert torch.equal(ds.sample_batch(0)[k], v)


def test_importance_uses_the_shared_weights(mesh):
    ds = build(mesh, importance="both")
    for pos, row in enumerate(ds.train_idx):
        w, cs, _ = imp.field_importance(ds.train_values(int(row)), ds.impsmp_bins, None)
        assert cs == 1
        np.testing.assert_allclose(ds._coord_samplers[pos].sample(np.random.default_rng(0), 50),
                                   imp.CoordSampler(w, cs, N).sample(np.random.default_rng(0), 50))
    mw = np.array([imp.member_weight(ds.train_values(int(r))) for r in ds.train_idx])
    np.testing.assert_allclose(ds._member_cdf, np.cumsum(mw / mw.sum()))
    b = ds.sample_batch(0)
    assert b["x"].shape == (3, 64, 3) and float(b["v"].max()) <= 1


def test_importance_cli_on_a_mesh(tmp_path, mesh):
    """python -m datasets.importance --coords_path writes per-vertex files that give the same batches as the
    weights computed on the fly."""
    out = str(tmp_path / "imp")
    assert imp.main(["--data_dir", mesh["data_dir"], "--cond_path", mesh["cond_path"], "--cond_split_path",
                     mesh["cond_split_path"], "--coords_path", mesh["coords_path"], "--out_dir", out,
                     "--no_progress"]) == 0
    files = build(mesh, importance="both", impsmp_cond_path=os.path.join(out, imp.COND_FILE),
                  impsmp_coord_path=os.path.join(out, imp.COORD_DIR))
    fly = build(mesh, importance="both")
    for step in (0, 5):
        a, b = files.sample_batch(step), fly.sample_batch(step)
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    w = np.zeros(len(fly.train_idx))
    w[1] = 1.0                                     # the member file is what the dataset reads
    np.save(os.path.join(out, imp.COND_FILE), w)
    one = build(mesh, importance="both", impsmp_cond_path=os.path.join(out, imp.COND_FILE),
                impsmp_coord_path=os.path.join(out, imp.COORD_DIR))
    assert set(one.sample_batch(0)["member"].tolist()) == {int(fly.train_idx[1])}
    with pytest.raises(SystemExit, match="dims"):
        imp.main(["--data_dir", mesh["data_dir"], "--cond_path", mesh["cond_path"], "--cond_split_path",
                  mesh["cond_split_path"], "--coords_path", mesh["coords_path"], "--out_dir", out, "--dims", "4",
                  "--no_progress"])


def test_augmentation_modes_and_refusals(mesh):
    base = build(mesh).sample_batch(2)
    vc = build(mesh, augment="vc", tau_x=0.01).sample_batch(2)
    assert float((vc["x"] - base["x"]).abs().max()) <= 0.01 + 1e-6 and not torch.equal(vc["x"], base["x"])
    assert torch.equal(vc["v"], base["v"]) and torch.equal(vc["c"], base["c"])
    vpc = build(mesh, augment="vp_c", tau_c=0.05).sample_batch(2)
    assert torch.equal(vpc["x"], base["x"]) and float((vpc["c"] - base["c"]).abs().max()) <= 0.05 + 1e-6
    assert float(vpc["v"].min()) >= -1e-6 and float(vpc["v"].max()) <= 1 + 1e-6
    for mode in ("vp_s", "vp_sc"):
        with pytest.raises(ConfigError, match="mesh"):
            build(mesh, augment=mode, tau_x=0.01, tau_c=0.01)
    with pytest.raises(ConfigError, match="downsample must be 1"):
        build(mesh, downsample=2)


def test_bad_inputs(tmp_path, mesh):
    paths = make_mesh_ensemble(str(tmp_path / "bad"))
    np.save(os.path.join(paths["data_dir"], "member_0002.npy"), np.ones(N + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="member_0002"):
        build(paths)
    with pytest.raises(FileNotFoundError, match="coords_path"):
        build({**mesh, "coords_path": str(tmp_path / "nope.npy")})
    ds = build(mesh, log_transform=True)  # values are > 0
    f = ds.full_field(0)
    np.testing.assert_allclose(ds.denormalize_values(f.numpy()),
                               np.load(os.path.join(mesh["data_dir"], "member_0000.npy")), rtol=1e-5)


# ------------------------------------------------------------------------------------------ end to end
def test_train_and_test_scripts_on_a_mesh(tmp_path):
    paths = make_mesh_ensemble(str(tmp_path / "mesh"))
    exp = dict(model=TINY_MODEL,
               dataset=dict(type="unstructured", cond_batch=2, spatial_log2batch=6, importance="coord", **paths),
               optim=dict(type="adam", lr=1e-3), scheduler=dict(type="cosine"),
               train=dict(max_steps=4, log_dir=str(tmp_path / "runs"), run_name="mesh", log_every=1, timing_steps=2),
               test=dict(chunk_size=100, ref_k=2))
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump([exp]))
    from test import main as test_main
    from train import main as train_main

    train_main(["--config", str(cfg), "--config_id", "0", "--no_progress"])
    rd = str(tmp_path / "runs" / "mesh")
    for name in ("model.pt", "meta.json", "finished.json"):
        assert os.path.isfile(os.path.join(rd, name)), name
    test_main(["--run", rd, "--no_progress"])
    with open(os.path.join(rd, "eval", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    model_rows = {r["split"]: r for r in rows if r["predictor"] == "model"}
    assert int(model_rows["test"]["members"]) == N_TEST and int(model_rows["train"]["members"]) == N_TRAIN
    for r in rows:
        assert r["ssim"] in ("", "nan", "NaN"), r  # no SSIM on a mesh
        assert r["resolution"] == "full"
    assert math.isfinite(float(model_rows["test"]["psnr_dataset"]))
    assert len([r for r in rows if r["split"] == "test" and r["predictor"] != "model"]) == 3  # reference rows
    with open(os.path.join(rd, "eval", "members.csv")) as f:
        mrows = [r for r in csv.DictReader(f) if r["predictor"] == "model"]
    assert len(mrows) == N_TRAIN + N_TEST

    # queries: by default the mesh's own vertices, equal to the model at the dataset's coordinates
    from predict import main as predict_main
    from tasks.ensemble.surrogate import Surrogate

    sur = Surrogate.load(rd, device="cpu")
    ds = build(paths)
    c = ds.conds([N_TRAIN])[0]
    v = sur.predict(c.tolist(), normalized_params=True, normalized_output=True)
    assert v.shape == (ds.n_vertices,)
    with torch.no_grad():
        ref = sur.model(ds.eval_coords()[None], c[None])[0, :, 0].numpy()
    np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-6)
    assert sur.predict(c.tolist(), resolution=4, normalized_params=True).shape == (4, 4, 4)
    with pytest.raises(ValueError, match="mesh"):
        sur.predict(c.tolist(), index_coords=np.zeros((2, 3)), normalized_params=True)
    out = str(tmp_path / "p.npy")
    predict_main(["--run", rd, "--values", *map(str, c.tolist()), "--normalized", "--out", out])
    assert np.load(out).shape == (ds.n_vertices,)
    with pytest.raises(SystemExit, match="vti"):
        predict_main(["--run", rd, "--values", *map(str, c.tolist()), "--normalized", "--out", out, "--vti",
                      "--overwrite"])  # p.npy exists: without --overwrite that is the error
