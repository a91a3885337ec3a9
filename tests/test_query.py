"""tasks/ensemble/surrogate.py and predict.py: parameter normalization and value de-normalization (plain and log) against
hand-computed numbers and against the data pipeline (prepare's cond.npy, the dataset's normalization), and the
index -> coordinate -> array orientation on non-cubic grids, with a stub model that returns a known function of
(x, c)."""
import logging
import math

import numpy as np
import pytest
from torch import nn

from models.base import FieldModel
from tasks.ensemble.surrogate import Surrogate, denormalize


class LinearStub(FieldModel):
    """f(x, c) = 0.5 + sum_k A[k] x_k + sum_j B[j] c_j: distinct weights per column, so any swap of
    coordinate columns, array axes or conditions changes the output."""

    A = (0.2, 0.05, 0.01)
    B = (0.1, -0.03)

    def forward(self, x, c):  # x (1, N, d), c (1, d_c) -> (1, N, 1)
        out = 0.5 + sum(a * x[..., k] for k, a in enumerate(self.A[:x.shape[-1]]))
        out = out + sum(b * c[:, j, None] for j, b in enumerate(self.B[:c.shape[-1]]))
        return out[..., None]


def stub_f(x, c):
    """LinearStub's function in numpy (x (..., d), c (d_c,))."""
    return 0.5 + sum(a * x[..., k] for k, a in enumerate(LinearStub.A[:x.shape[-1]])) + \
        sum(b * c[j] for j, b in enumerate(LinearStub.B[:len(c)]))


META = dict(param_names=["a", "b", "k"], param_min=[1.0, -2.0, 5.0], param_max=[3.0, 2.0, 5.0], cond_dim=3,
            spatial_shape=[3, 5, 7], value_min=0.0, value_max=1.0, log_transform=False)


def surrogate(**meta):
    return Surrogate(LinearStub(), dict(META, **meta))


# ------------------------------------------------------------------------------------------- parameters
def test_normalize_params_hand_values():
    """(raw - min) / (max - min) per parameter, by name in any order or as a list in CSV order; a parameter
    constant over the ensemble (k: min = max) maps to 0."""
    s = surrogate()
    expect = [0.75, 0.25, 0.0]  # a: (2.5 - 1) / 2, b: (-1 + 2) / 4, k: constant
    assert s.normalize_params({"k": 5.0, "b": -1.0, "a": 2.5}).tolist() == pytest.approx(expect)
    assert s.normalize_params([2.5, -1.0, 5.0]).tolist() == pytest.approx(expect)
    assert s.normalize_params([0.1, 0.2, 0.3], normalized=True).tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert s.normalize_params({"a": 1.0, "b": 2.0, "k": 5.0}).tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_normalize_params_extrapolation_warns_with_the_value(caplog):
    s = surrogate()
    with caplog.at_level(logging.WARNING, logger="predict"):
        c = s.normalize_params({"a": 4.0, "b": 0.0, "k": 5.0})
    assert c.tolist() == pytest.approx([1.5, 0.5, 0.0])
    assert any("a = 4" in r.getMessage() and "[1, 3]" in r.getMessage() for r in caplog.records)


def test_normalize_params_reproduces_prepared_cond_rows(tmp_path):
    """The raw CSV row of every member, normalized by the Surrogate from the run's meta (names and ranges read
    from prepare's cond_meta.json by the dataset), equals that member's row of prepare's cond.npy."""
    from datasets.ensemble import EnsembleDataset
    from datasets.prepare import prepare

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        np.save(data / f"m{i}.npy", rng.random((3, 4, 5)).astype(np.float32))
    raw = np.stack([rng.uniform(1e-3, 5e-3, 6), rng.uniform(-300, 700, 6), rng.uniform(1.2, 1.7, 6)], axis=1)
    (tmp_path / "p.csv").write_text("visc,temp,gamma\n" + "".join(",".join(repr(float(v)) for v in r) + "\n" for r in raw))
    paths = prepare(str(data), str(tmp_path / "p.csv"), str(tmp_path / "out"), n_train=4, progress=False)
    ds = EnsembleDataset(data_dir=str(data), cond_path=paths["cond_path"], cond_split_path=paths["cond_split_path"])
    s = Surrogate(LinearStub(), ds.meta())
    assert s.param_names == ["visc", "temp", "gamma"]
    cond = np.load(paths["cond_path"])
    for i, r in enumerate(raw):
        np.testing.assert_allclose(s.normalize_params(dict(zip(s.param_names, r))).numpy(), cond[i, 1:], atol=1e-6)
    # the extremes of each column map to exactly 0 and 1
    assert s.normalize_params(dict(zip(s.param_names, raw.min(0)))).tolist() == [0.0, 0.0, 0.0]
    assert s.normalize_params(dict(zip(s.param_names, raw.max(0)))).tolist() == pytest.approx([1.0] * 3, abs=1e-7)


# ------------------------------------------------------------------------------------------------ values
def test_denormalize_hand_values():
    plain = dict(value_min=-1.0, value_max=3.0, log_transform=False)
    assert denormalize(np.array([0.0, 0.25, 1.0, 1.5]), plain).tolist() == pytest.approx([-1.0, 0.0, 3.0, 5.0])
    # log: min/max are in log units (ln 2, ln 8 = 3 ln 2); v -> 2^(1 + 2 v): 0 -> 2, 1 -> 8, 1/2 -> the geometric
    # mean 4, 1/4 -> 2^1.5
    log = dict(value_min=math.log(2.0), value_max=math.log(8.0), log_transform=True)
    assert denormalize(np.array([0.0, 1.0, 0.5, 0.25]), log).tolist() == pytest.approx([2.0, 8.0, 4.0, 2 ** 1.5],
                                                                                         rel=1e-6)
    out = denormalize(np.zeros((2, 3)), log)
    assert out.dtype == np.float32 and out.shape == (2, 3)


@pytest.mark.parametrize("log_transform", [False, True])
def test_denormalize_inverts_the_dataset_normalization(tmp_path, log_transform):
    """denormalize(dataset.full_field(row), dataset.meta()) gives back the member file's values (data units)."""
    from datasets.ensemble import EnsembleDataset
    from tests.test_dataset import random_ensemble, write_ensemble

    fields, params = random_ensemble(m=5, shape=(3, 4, 5), positive=True)
    fields = fields ** 3  # values spanning 0.1 .. 16: a log that was not undone would show
    paths = write_ensemble(tmp_path / "e", fields, params, n_train=3)
    ds = EnsembleDataset(**paths, log_transform=log_transform)
    for row in (0, 4):
        np.testing.assert_allclose(denormalize(ds.full_field(row).numpy(), ds.meta()), fields[row], rtol=2e-5)


def test_predict_returns_data_units_unless_normalized_output():
    s = surrogate(value_min=math.log(2.0), value_max=math.log(8.0), log_transform=True, spatial_shape=[2, 2])
    s.model.A = (0.0, 0.0)
    s.model.B = (0.0, 0.0, 0.0)  # the stub outputs 0.5 everywhere
    assert np.allclose(s.predict([0.5, 0.5, 0.5], normalized_params=True, normalized_output=True), 0.5)
    assert np.allclose(s.predict([0.5, 0.5, 0.5], normalized_params=True), 4.0)  # exp of the log-units midpoint


# --------------------------------------------------------------------------------------------- geometry
def expected_grid(shape, c):
    """stub_f on the lattice of ``shape`` (array order): vertex (i, j, k) of (D, H, W) sits at x = (x_W, x_H,
    x_D) = (2k/(W-1) - 1, 2j/(H-1) - 1, 2i/(D-1) - 1), written out per axis independently of util.sampling."""
    axes = [np.array([2.0 * j / (n - 1) - 1 for j in range(n)]) for n in shape]
    mesh = np.meshgrid(*axes, indexing="ij")  # mesh[a] = coordinate along array axis a
    x = np.stack(mesh[::-1], axis=-1)  # column 0 = last array axis
    return stub_f(x, c)


@pytest.mark.parametrize("shape", [(3, 5, 7), (7, 3, 5), (3, 5)])
def test_predict_grid_orientation_on_non_cubic_grids(shape):
    """Entry [i, j, k] of a predicted (D, H, W) field is the model at x = (x_k along W, x_j, x_i): both for an
    explicit resolution and for the data's own (non-cubic) shape; the condition reaches the model in order."""
    s = surrogate(spatial_shape=list(shape))
    c = [0.75, 0.25, 0.0]
    got = s.predict({"a": 2.5, "b": -1.0, "k": 5.0}, resolution=shape, normalized_output=True)
    assert got.shape == shape
    np.testing.assert_allclose(got, expected_grid(shape, c), rtol=0, atol=1e-6)
    np.testing.assert_allclose(s.predict(c, normalized_params=True), expected_grid(shape, c), atol=1e-6)  # default
    if len(shape) == 3:  # spot values by hand: corner (0, 0, 0) = all coordinates -1, (D-1, 0, W-1): x = (1, -1, 1)
        assert got[0, 0, 0] == pytest.approx(0.5 - 0.2 - 0.05 - 0.01 + 0.1 * 0.75 - 0.03 * 0.25, abs=1e-6)
        assert got[-1, 0, -1] == pytest.approx(0.5 + 0.2 - 0.05 + 0.01 + 0.1 * 0.75 - 0.03 * 0.25, abs=1e-6)


def test_predict_index_and_model_coordinates():
    """index_coords are fractional array indices in array order, relative to the data's shape (3, 5, 7);
    coords are model coordinates, column 0 along the last array axis."""
    shape = (3, 5, 7)
    s = surrogate(spatial_shape=list(shape))
    c = [0.2, 0.6, 0.0]
    grid = s.predict(c, normalized_params=True)
    idx = np.array([[0, 0, 0], [2, 4, 6], [1, 3, 2], [2, 0, 5]])
    pts = s.predict(c, normalized_params=True, index_coords=idx)
    np.testing.assert_allclose(pts, grid[tuple(idx.T)], atol=1e-6)
    frac = np.array([[0.5, 1.5, 4.5]])  # -> x_D = 2*0.5/2 - 1, x_H = 2*1.5/4 - 1, x_W = 2*4.5/6 - 1
    x = np.array([[2 * 4.5 / 6 - 1, 2 * 1.5 / 4 - 1, 2 * 0.5 / 2 - 1]])
    np.testing.assert_allclose(s.predict(c, normalized_params=True, index_coords=frac), stub_f(x, c), atol=1e-6)
    np.testing.assert_allclose(s.predict(c, normalized_params=True, coords=x), stub_f(x, c), atol=1e-6)


def test_predict_cli_writes_the_oriented_grid(tmp_path, monkeypatch):
    """predict.py --resolution D H W (array order) with named parameters writes the same oriented field."""
    import predict
    import tasks.ensemble.surrogate

    meta = dict(META, value_min=-1.0, value_max=3.0)
    monkeypatch.setattr(tasks.ensemble.surrogate, "load_trained_model", lambda run, ckpt=None: (LinearStub(), {}, meta))
    out = tmp_path / "f.npy"
    predict.main(["--run", str(tmp_path), "--param", "a=2.5", "--param", "b=-1", "--param", "k=5",
                  "--resolution", "3", "5", "7", "--out", str(out)])
    got = np.load(out)
    assert got.shape == (3, 5, 7)
    np.testing.assert_allclose(got, expected_grid((3, 5, 7), [0.75, 0.25, 0.0]) * 4.0 - 1.0, atol=1e-5)
