"""Importance sampling (spec 3.3): weights, sampling frequencies, clusters, files and CLI."""
import os

import numpy as np
import pytest
import torch
from scipy import stats

from datasets import importance as imp
from datasets.ensemble import EnsembleDataset


def _write(root, fields, params, n_train):
    """Minimal reference layout (npy members, first n_train rows train)."""
    data = os.path.join(root, "data")
    os.makedirs(data)
    for i, f in enumerate(fields):
        np.save(os.path.join(data, f"m{i:02d}.npy"), np.asarray(f, np.float32))
    m = len(fields)
    np.save(os.path.join(root, "cond.npy"), np.concatenate([np.arange(m)[:, None], params], 1).astype(np.float32))
    np.save(os.path.join(root, "split.npy"), {"cond_idx": np.arange(n_train), "cond_idx_unseen": np.arange(n_train, m)},
            allow_pickle=True)
    return dict(data_dir=data, cond_path=os.path.join(root, "cond.npy"),
                cond_split_path=os.path.join(root, "split.npy"))


def _three_level_field(rng, shape=(16, 16)):
    """Half the voxels 0.1, a quarter 0.5, a quarter 0.9, in random places."""
    n = int(np.prod(shape))
    vals = np.concatenate([np.full(n // 2, 0.1), np.full(n // 4, 0.5), np.full(n - n // 2 - n // 4, 0.9)])
    return rng.permutation(vals).reshape(shape)


def test_weights_of_a_known_histogram():
    v = np.array([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(imp.bin_index(v, 4), [0, 0, 0, 2, 3, 3])
    np.testing.assert_allclose(imp.voxel_weights(v, 4), [1 / 3, 1 / 3, 1 / 3, 1, 1 / 2, 1 / 2])
    assert imp.member_weight(v, 4) == 3.0  # sum of voxel weights = occupied bins
    np.testing.assert_allclose(imp.cluster_weights(imp.voxel_weights(v, 4), 4), [2.0, 1.0])
    w, cs, mw = imp.field_importance(v, 4, cluster_size=1)
    assert cs == 1 and mw == 3.0 and w.sum() == pytest.approx(1.0)
    assert imp.default_cluster_size(1 << 24) == 1 and imp.default_cluster_size((1 << 24) + 1) == 2
    assert imp.default_cluster_size(1 << 27) == 8


def test_coordinate_frequencies_equalize_the_histogram():
    rng = np.random.default_rng(0)
    field = _three_level_field(rng)
    w, cs, _ = imp.field_importance(field, 64)
    sampler = imp.CoordSampler(w, cs, field.size)
    n = 120_000
    idx = sampler.sample(np.random.default_rng(1), n)
    vals = field.reshape(-1)[idx]
    for level in (0.1, 0.5, 0.9):  # each occupied bin gets total probability 1/3
        assert abs((vals == level).mean() - 1 / 3) < 0.01
    # uniform inside a bin: chi-square over the voxels holding 0.1
    members = np.flatnonzero(field.reshape(-1) == 0.1)
    counts = np.bincount(idx, minlength=field.size)[members]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_clusters_with_a_short_last_cluster():
    vw = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 5.0])
    cw = imp.cluster_weights(vw, 3)
    np.testing.assert_allclose(cw, [6.0, 0.0, 3.0, 5.0])
    s = imp.CoordSampler(cw, 3, vw.size)
    idx = s.sample(np.random.default_rng(2), 140_000)
    assert idx.min() >= 0 and idx.max() <= 9
    freq = np.bincount(idx, minlength=10) / idx.size
    sizes = np.array([3, 3, 3, 1])
    expect = np.repeat(cw / cw.sum() / sizes, sizes)  # cluster by weight, voxel uniform inside it
    np.testing.assert_allclose(freq, expect, atol=0.006)
    assert freq[3:6].sum() == 0  # zero-weight cluster never drawn
    with pytest.raises(ValueError, match="cluster weights"):
        imp.CoordSampler(cw[:3], 3, vw.size)


def test_dataset_coordinate_importance(tmp_path):
    rng = np.random.default_rng(3)
    fields = np.stack([_three_level_field(rng) for _ in range(3)])
    paths = _write(str(tmp_path / "e"), fields, rng.random((3, 2)), n_train=3)
    ds = EnsembleDataset(**paths, importance="coord", cond_batch=8, spatial_log2batch=13)
    v = ds.sample_batch(0)["v"].numpy().ravel()  # normalized: 0.1 -> 0, 0.5 -> 0.5, 0.9 -> 1
    for level in (0.0, 0.5, 1.0):
        assert abs(np.isclose(v, level).mean() - 1 / 3) < 0.01
    uni = EnsembleDataset(**paths, cond_batch=8, spatial_log2batch=13).sample_batch(0)["v"].numpy().ravel()
    assert abs(np.isclose(uni, 0.0).mean() - 0.5) < 0.02  # uniform sampling follows the histogram


def test_member_weights_and_member_sampling(tmp_path):
    # occupied bins over [0, 1] (train min 0, max 1): member 0 -> 2, member 1 -> 4, member 2 -> 3
    fields = np.array([[[0.0, 1.0], [0.0, 1.0]],
                       [[0.0, 0.3], [0.6, 1.0]],
                       [[0.0, 0.5], [1.0, 1.0]],
                       [[0.2, 0.2], [0.2, 0.2]]])  # test member
    paths = _write(str(tmp_path / "e"), fields, np.linspace(0, 1, 4)[:, None], n_train=3)
    ds = EnsembleDataset(**paths, importance="member", cond_batch=30_000, spatial_log2batch=0)
    np.testing.assert_allclose(np.diff(ds._member_cdf, prepend=0.0), [2 / 9, 4 / 9, 3 / 9])
    freq = np.bincount(ds.sample_batch(0)["member"].numpy(), minlength=4) / 30_000
    np.testing.assert_allclose(freq, [2 / 9, 4 / 9, 3 / 9, 0.0], atol=0.01)


def test_cli_files_match_on_the_fly_weights(tmp_path, capsys):
    rng = np.random.default_rng(4)
    fields = rng.random((5, 6, 7, 5)) ** 3
    paths = _write(str(tmp_path / "e"), fields, rng.random((5, 2)), n_train=4)
    out = str(tmp_path / "imp")
    imp.main(["--data_dir", paths["data_dir"], "--cond_path", paths["cond_path"], "--cond_split_path",
              paths["cond_split_path"], "--out_dir", out, "--bins", "16", "--cluster_size", "4", "--no_progress"])
    cond_file, coord_dir = os.path.join(out, imp.COND_FILE), os.path.join(out, imp.COORD_DIR)
    assert f"impsmp_cond_path: {cond_file}" in capsys.readouterr().out
    files = sorted(os.listdir(coord_dir))
    assert len(files) == 5 and files[0] == "point_imp_000000.npy"
    ds = EnsembleDataset(**paths, importance="both", impsmp_bins=16, impsmp_cluster_size=4, cond_batch=4,
                        spatial_log2batch=6)
    loaded = imp.load_cond_weights(cond_file, ds.train_idx, ds.num_rows)
    assert np.load(cond_file).shape == (4,)  # one weight per training member (reference format)
    np.testing.assert_allclose(loaded, np.diff(ds._member_cdf, prepend=0.0), rtol=1e-12)
    for pos, row in enumerate(ds.train_idx):
        d = imp.load_coord_file(os.path.join(coord_dir, files[row]))
        assert d["point_cluster_size"] == 4 and d["row"] == row and d["shape"] == [6, 7, 5]
        np.testing.assert_allclose(np.cumsum(d["point_imp"]), ds._coord_samplers[pos].cdf, rtol=1e-12)
    from_files = EnsembleDataset(**paths, importance="both", impsmp_cond_path=cond_file, impsmp_coord_path=coord_dir,
                                cond_batch=4, spatial_log2batch=6)
    a, b = ds.sample_batch(5), from_files.sample_batch(5)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(SystemExit) as e:
        imp.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ("--data_dir", "--cond_path", "--cond_split_path", "--out_dir", "--dims", "--log_transform", "--bins",
                "--cluster_size"):
        assert opt in help_text


def test_reference_files_and_file_errors(tmp_path):
    rng = np.random.default_rng(5)
    fields = rng.random((3, 4, 4))
    paths = _write(str(tmp_path / "e"), fields, rng.random((3, 1)), n_train=2)
    folder = tmp_path / "coords"
    folder.mkdir()
    for row in range(3):  # reference style: only the two keys, a torch tensor inside, its own file names
        np.save(folder / f"temp_point_imp{row:02d}.npy",
                {"point_imp": torch.ones(16, dtype=torch.float64) / 16, "point_cluster_size": 1}, allow_pickle=True)
    ds = EnsembleDataset(**paths, importance="coord", impsmp_coord_path=str(folder), cond_batch=2, spatial_log2batch=4)
    assert ds.sample_batch(0)["x"].shape == (2, 16, 2)
    np.save(folder / "temp_point_imp03.npy", {"point_imp": np.ones(16), "point_cluster_size": 1}, allow_pickle=True)
    with pytest.raises(ValueError, match="holds 4 .npy files, expected one per cond row \\(3"):
        EnsembleDataset(**paths, importance="coord", impsmp_coord_path=str(folder))
    os.remove(folder / "temp_point_imp03.npy")
    imp.save_coord_file(str(folder / "temp_point_imp00.npy"), np.ones(8), 1, (2, 4), 64, 0)
    with pytest.raises(ValueError, match="shape \\[2, 4\\].*\\[4, 4\\]"):
        EnsembleDataset(**paths, importance="coord", impsmp_coord_path=str(folder))
    with pytest.raises(FileNotFoundError, match="impsmp_coord_path"):
        EnsembleDataset(**paths, importance="coord", impsmp_coord_path=str(tmp_path / "none"))
    np.save(tmp_path / "w.npy", np.array([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="holds 4 weights, expected 2"):
        EnsembleDataset(**paths, importance="member", impsmp_cond_path=str(tmp_path / "w.npy"))
    np.save(tmp_path / "w3.npy", np.array([1.0, 3.0, 100.0]))  # one per cond row -> the train rows' weights
    np.testing.assert_allclose(imp.load_cond_weights(str(tmp_path / "w3.npy"), np.array([0, 1]), 3), [0.25, 0.75])


def test_sample_categorical_skips_zero_weights():
    cdf = np.cumsum([0.0, 1.0, 0.0, 0.0, 3.0, 0.0])
    k = imp.sample_categorical(np.random.default_rng(6), cdf, 40_000)
    freq = np.bincount(k, minlength=6) / k.size
    assert set(np.flatnonzero(freq)) == {1, 4}
    assert abs(freq[1] - 0.25) < 0.01
