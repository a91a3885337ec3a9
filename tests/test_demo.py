"""datasets.demo: the embedded demo ensemble (generator, on-disk layout, reuse/atomicity, registry entry)."""
import json
import logging
import os
import time

import numpy as np
import pytest

import datasets.demo as demo_mod
from datasets.demo import (PARAM_NAMES, PARAM_RANGES, DemoRootError, demo_field, demo_params, generate_demo,
                           main)

SMALL = dict(n_train=8, n_test=3, resolution=10)


def members(p):
    d = p["data_dir"]
    return np.stack([np.load(os.path.join(d, n)) for n in sorted(os.listdir(d))])


def all_files(root):
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            path = os.path.join(dp, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def grad_mag(v):
    return np.sqrt(sum(g ** 2 for g in np.gradient(v.astype(np.float64))))


def test_generation_is_deterministic_and_in_reference_layout(tmp_path):
    a = generate_demo(str(tmp_path / "a"), **SMALL)
    b = generate_demo(str(tmp_path / "b"), **SMALL)
    fa, fb = all_files(a["root"]), all_files(b["root"])
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert {"params.csv", "cond.npy", "split.npy", "cond_meta.json", "demo_settings.json",
            os.path.join("data", "member_0000.npy"), os.path.join("data", "member_0010.npy")} <= set(fa)
    v = members(a)
    assert v.shape == (11, 10, 10, 10) and v.dtype == np.float32 and np.all(v > 0)
    cond = np.load(a["cond_path"])
    split = np.load(a["cond_split_path"], allow_pickle=True).item()
    assert cond.shape == (11, 5) and cond.dtype == np.float32
    assert cond[:, 0].tolist() == list(range(11)) and cond[:, 1:].min() >= 0 and cond[:, 1:].max() <= 1
    assert split["cond_idx"].tolist() == list(range(8)) and split["cond_idx_unseen"].tolist() == [8, 9, 10]
    meta = json.load(open(a["cond_meta_path"]))
    assert meta["names"] == list(PARAM_NAMES)
    # a different seed gives a different ensemble
    c = generate_demo(str(tmp_path / "c"), seed=1, **SMALL)
    assert not np.array_equal(np.load(c["cond_path"]), cond)


def test_params_inside_ranges_and_test_inside_train_range():
    p = demo_params(20, 15, seed=3)
    assert p.shape == (35, 4)
    lo, hi = np.array(PARAM_RANGES).T
    assert np.all(p >= lo) and np.all(p <= hi)
    train, test = p[:20], p[20:]
    assert np.all(test >= train.min(0)) and np.all(test <= train.max(0))
    # the training design spreads over each range (Latin hypercube: one point per 1/20 stratum)
    for j in range(4):
        strata = np.floor((train[:, j] - lo[j]) / (hi[j] - lo[j]) * 20).clip(0, 19)
        assert len(np.unique(strata)) >= 19


def test_fields_have_sharp_fronts_and_smooth_regions():
    for params in demo_params(16, 0, seed=0):
        v = demo_field(params, resolution=24)
        g = grad_mag(v)
        # the shock: steepest gradient far above the typical (median) one ...
        assert g.max() > 5 * np.median(g), params
        # ... and a jump between neighbouring voxels that is a sizeable part of the whole value range
        step = max(np.abs(np.diff(v, axis=a)).max() for a in range(3))
        assert step > 0.2 * (v.max() - v.min()), params
        # most of the volume is smooth
        assert np.mean(g < 0.25 * g.max()) > 0.7, params


def test_fields_depend_nonlinearly_on_all_parameters():
    p = demo_params(60, 0, seed=0)
    y = np.stack([demo_field(c, resolution=12) for c in p]).reshape(60, -1).astype(np.float64)
    x = np.c_[np.ones(60), p]
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    r2 = 1 - ((y - x @ beta) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert r2 < 0.6, r2  # a per-voxel linear model in c explains little
    base = np.array([0.5, 30.0, 3.0, 2.0])
    steps = np.array([0.1, 15.0, 1.5, 1.0])

    def f(delta):
        return demo_field(base + delta * steps, resolution=16).astype(np.float64)

    f0 = f(np.zeros(4))
    for j in range(4):  # every parameter matters
        e = np.eye(4)[j]
        assert np.abs(f(e) - f0).max() > 0.05, PARAM_NAMES[j]
    for j, k in ((0, 2), (0, 3), (2, 3), (1, 2)):  # parameters interact: mixed differences are not zero
        ej, ek = np.eye(4)[j], np.eye(4)[k]
        mixed = f(ej + ek) - f(ej) - f(ek) + f0
        assert np.abs(mixed).max() > 0.05, (PARAM_NAMES[j], PARAM_NAMES[k])


def test_2d_variant(tmp_path):
    p = generate_demo(str(tmp_path / "d2"), n_train=5, n_test=2, resolution=20, spatial_dims=2)
    v = members(p)
    assert v.shape == (7, 20, 20) and np.all(v > 0)
    g = grad_mag(v[0])
    assert g.max() > 5 * np.median(g)
    with pytest.raises(ValueError, match="spatial_dims"):
        generate_demo(str(tmp_path / "d4"), spatial_dims=4)


def test_reuse_and_mismatched_settings(tmp_path):
    root = str(tmp_path / "demo")
    first = generate_demo(root, **SMALL)
    assert first["generated"]
    stamp = os.path.getmtime(first["cond_path"])
    again = generate_demo(root, **SMALL)
    assert not again["generated"] and os.path.getmtime(first["cond_path"]) == stamp
    with pytest.raises(DemoRootError, match=r"resolution=10 on disk vs 12 requested.*delete it.*overwrite"):
        generate_demo(root, **{**SMALL, "resolution": 12})
    with pytest.raises(DemoRootError, match="n_train=8 on disk vs 9 requested"):
        generate_demo(root, **{**SMALL, "n_train": 9})
    new = generate_demo(root, **{**SMALL, "resolution": 12}, overwrite=True)
    assert new["generated"] and members(new).shape[1:] == (12, 12, 12)
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # no temporary or old folders left behind
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(DemoRootError, match="no valid demo_settings.json"):
        generate_demo(str(other), **SMALL)
    assert (other / "keep.txt").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is simply filled
    assert generate_demo(str(tmp_path / "empty"), **SMALL)["generated"]


@pytest.mark.parametrize("where", ["field", "prepare"])
def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch, where):
    calls = []
    import datasets.prepare as prep

    real_field, real_prepare = demo_mod.demo_field, prep.prepare

    def bad_field(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_field(*a, **kw)

    def bad_prepare(*a, **kw):
        raise RuntimeError("disk full")

    if where == "field":
        monkeypatch.setattr(demo_mod, "demo_field", bad_field)
    else:
        monkeypatch.setattr(prep, "prepare", bad_prepare)
    root = tmp_path / "demo"
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        generate_demo(str(root), **SMALL)
    assert os.listdir(tmp_path) == []
    # an interrupted overwrite keeps the old complete ensemble
    monkeypatch.setattr(demo_mod, "demo_field", real_field)
    monkeypatch.setattr(prep, "prepare", real_prepare)
    generate_demo(str(root), **SMALL)
    before = all_files(str(root))
    calls.clear()
    monkeypatch.setattr(demo_mod, "demo_field", bad_field)
    monkeypatch.setattr(prep, "prepare", bad_prepare if where == "prepare" else real_prepare)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        generate_demo(str(root), **{**SMALL, "resolution": 11}, overwrite=True)
    assert os.listdir(tmp_path) == ["demo"] and all_files(str(root)) == before


def test_cli(tmp_path, capsys):
    root = str(tmp_path / "cli")
    main(["--root", root, "--resolution", "8", "--n_train", "4", "--n_test", "2", "--spatial_dims", "2"])
    assert "wrote demo ensemble" in capsys.readouterr().out
    assert np.load(os.path.join(root, "data", "member_0005.npy")).shape == (8, 8)
    main(["--root", root, "--resolution", "8", "--n_train", "4", "--n_test", "2", "--spatial_dims", "2"])
    assert "reused existing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="resolution=8 on disk vs 9 requested"):
        main(["--root", root, "--resolution", "9", "--n_train", "4", "--n_test", "2", "--spatial_dims", "2"])
    main(["--root", root, "--resolution", "9", "--n_train", "4", "--n_test", "2", "--spatial_dims", "2",
          "--overwrite"])
    assert np.load(os.path.join(root, "data", "member_0005.npy")).shape == (9, 9)


def test_default_ensemble_is_fast(tmp_path):
    t = time.perf_counter()
    p = generate_demo(str(tmp_path / "demo"))
    assert time.perf_counter() - t < 5.0
    assert len(os.listdir(p["data_dir"])) == 50
    assert np.load(os.path.join(p["data_dir"], "member_0049.npy")).shape == (32, 32, 32)


def test_registered_dataset_generates_on_first_use(tmp_path, caplog):
    from datasets.ensemble import EnsembleDataset
    from util.registry import ConfigError, accepted_keys, build

    keys = accepted_keys("dataset", "demo", ("seed",))
    assert {"root", "n_train", "resolution", "demo_seed", "cond_batch", "spatial_log2batch"} <= set(keys)
    root = str(tmp_path / "demo")
    kw = dict(root=root, n_train=4, n_test=2, resolution=8, cond_batch=2, spatial_log2batch=4)
    with caplog.at_level(logging.INFO, logger="datasets.demo"):
        ds = build("dataset", "demo", section="dataset", injected={"seed": 0}, **kw)
    assert isinstance(ds, EnsembleDataset)
    assert "generating the demo ensemble" in caplog.text
    assert os.path.isfile(os.path.join(root, "demo_settings.json"))
    batch = ds.sample_batch(0)
    assert tuple(batch["x"].shape) == (2, 16, 3) and tuple(batch["c"].shape) == (2, 4)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasets.demo"):
        build("dataset", "demo", section="dataset", injected={"seed": 0}, **kw)
    assert "generating" not in caplog.text
    with pytest.raises(ConfigError, match="data_dir"):
        build("dataset", "demo", section="dataset", injected={"seed": 0}, data_dir=str(tmp_path), **kw)
