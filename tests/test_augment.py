"""Augmentation (spec 3.4): noise bounds, VC, VP-S exactness, IDW, VP-C/VP-SC, option validation."""
import numpy as np
import pytest

from datasets.augment import (apply_augmentation, idw_weights, knn, make_augmentation, truncated_noise)
from util.registry import ConfigError
from util.sampling import index_to_coords


def _batch(shape, fields, rng, n=200, members=None):
    """A plain batch: random vertices of ``shape`` for the given member positions."""
    members = np.arange(len(fields)) if members is None else np.asarray(members)
    flat = rng.integers(0, int(np.prod(shape)), size=(len(members), n))
    x = index_to_coords(np.stack(np.unravel_index(flat, shape), -1), shape)
    v = np.stack([fields[m].reshape(-1)[flat[b]] for b, m in enumerate(members)])
    return x, v, flat, members


def _values_of(fields):
    return lambda pos, flat: fields[pos].reshape(-1)[flat]


def _linear_fields(shape, offsets, slope):
    g = index_to_coords(np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), -1), shape)  # float64
    return np.stack([(a + g @ slope).reshape(shape) for a in offsets])


def test_truncated_noise_is_clipped():
    rng = np.random.default_rng(0)
    e = truncated_noise(rng, (20000, 3), np.array([1.0, 0.1, 0.0]), np.array([0.5, 1.0, 0.3]))
    assert np.abs(e[:, 0]).max() <= 0.5 and (np.abs(e[:, 0]) == 0.5).mean() > 0.5  # clipped, not resampled
    assert np.abs(e[:, 1]).max() <= 1.0 and abs(e[:, 1].std() - 0.1) < 0.005  # tau >> sigma: plain Gaussian
    assert (e[:, 2] == 0).all()


def test_make_augmentation_validation_and_defaults():
    a = make_augmentation("vp_sc", 3, 2, tau_x=[0.1, 0.2, 0.3], tau_c=0.01)
    np.testing.assert_allclose(a.sigma_x, [0.06, 0.12, 0.18])  # default sigma = 0.6 tau
    np.testing.assert_allclose(a.tau_c, [0.01, 0.01])
    assert a.perturbs_x and a.perturbs_c and a.k == 8 and a.power == 2.0
    assert make_augmentation("vp_s", 2, 1, tau_x=0.1, tau_c=0.5).tau_c is None  # unused settings dropped
    np.testing.assert_allclose(make_augmentation("vc", 2, 1, tau_x="1e-2").tau_x, [0.01, 0.01])  # YAML "1e-2"
    for kw, msg in ((dict(mode="bad"), "augment must be one of"), (dict(mode="vc"), "tau_x is required"),
                    (dict(mode="vp_c"), "tau_c is required"),
                    (dict(mode="vc", tau_x=[0.1, 0.1]), "tau_x must be a number or a list of 3"),
                    (dict(mode="vc", tau_x=-1.0), "tau_x must be finite and >= 0"),
                    (dict(mode="vc", tau_x=0.1, sigma_x="big"), "sigma_x"),
                    (dict(mode="vp_c", tau_c=0.1, k=0), "vp_k"),
                    (dict(mode="vp_c", tau_c=0.1, power=0.0), "vp_power")):
        with pytest.raises(ConfigError, match=msg):
            make_augmentation(spatial_dims=3, cond_dim=2, key_prefix="dataset.", **kw)


def test_none_and_vc_keep_values():
    rng = np.random.default_rng(1)
    shape = (5, 6, 7)
    fields = rng.random((2,) + shape)
    x, v, flat, members = _batch(shape, fields, rng)
    c = np.array([[0.2], [0.7]])
    same = apply_augmentation(make_augmentation("none", 3, 1), rng, x, c, v, flat, members, _values_of(fields),
                              shape, c)
    assert same[0] is x and same[1] is c and same[2] is v
    tau = np.array([0.05, 0.1, 0.2])
    x2, c2, v2 = apply_augmentation(make_augmentation("vc", 3, 1, sigma_x=1.0, tau_x=tau), rng, x, c, v, flat,
                                    members, _values_of(fields), shape, c)
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(c2, c)
    assert (np.abs(x2 - x) <= tau + 1e-12).all() and np.abs(x2).max() <= 1.0
    assert (np.abs(x2 - x) > 0).mean() > 0.5  # (boundary vertices pushed outward are clamped back)


@pytest.mark.parametrize("shape", [(9, 8), (5, 6, 7)])
def test_vp_s_exact_on_linear_field(shape):
    d = len(shape)
    slope = np.array([0.7, -0.4, 0.25][:d])
    fields = _linear_fields(shape, [0.0, 2.0], slope)
    rng = np.random.default_rng(2)
    x, v, flat, members = _batch(shape, fields, rng, n=500)
    aug = make_augmentation("vp_s", d, 1, sigma_x=0.3, tau_x=0.4)
    x2, c2, v2 = apply_augmentation(aug, rng, x, np.zeros((2, 1)), v, flat, members, _values_of(fields), shape,
                                    np.zeros((2, 1)))
    assert np.abs(x2).max() <= 1.0 and (np.abs(x2) == 1.0).any()  # clamped at the boundary
    assert (np.abs(x2 - x) <= 0.4 + 1e-12).all()
    expect = np.array([0.0, 2.0])[:, None] + x2 @ slope  # analytic value at the perturbed coordinate
    np.testing.assert_allclose(v2, expect, atol=1e-12)


def test_knn_and_idw_weights():
    pts = np.array([[0.0], [0.3], [1.0], [0.3]])
    dist, idx = knn(np.array([[0.1]]), pts, k=8)  # k > M: all points
    np.testing.assert_array_equal(idx[0], [0, 1, 3, 2])  # ties by lower index
    np.testing.assert_allclose(dist[0], [0.1, 0.2, 0.2, 0.9])
    w = idw_weights(np.array([[1.0, 2.0, 4.0]]), power=2)
    np.testing.assert_allclose(w[0], np.array([1, 1 / 4, 1 / 16]) / (1 + 1 / 4 + 1 / 16))
    np.testing.assert_allclose(idw_weights(np.array([[1.0, 2.0]]), power=1)[0], [2 / 3, 1 / 3])
    np.testing.assert_array_equal(idw_weights(np.array([[0.5, 0.0, 0.0]]))[0], [0, 1, 0])


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_vp_c_idw_against_hand_computation(power):
    # 3 members with constant fields 1, 2, 3 at conditions 0, 0.3, 1; a sample at c = 0.1 (zero noise).
    shape = (4, 5)
    fields = np.stack([np.full(shape, k + 1.0) for k in range(3)])
    train_c = np.array([[0.0], [0.3], [1.0]])
    rng = np.random.default_rng(3)
    x, v, flat, _ = _batch(shape, fields, rng, n=10, members=[0])
    aug = make_augmentation("vp_c", 2, 1, sigma_c=0.0, tau_c=0.0, k=3, power=power)
    x2, c2, v2 = apply_augmentation(aug, rng, x, np.array([[0.1]]), v, flat, np.array([0]), _values_of(fields),
                                    shape, train_c)
    d = np.array([0.1, 0.2, 0.9])
    w = d ** -power / (d ** -power).sum()
    np.testing.assert_allclose(v2, np.full((1, 10), w @ np.array([1.0, 2.0, 3.0])), rtol=1e-12)
    np.testing.assert_array_equal(x2, x)  # VP-C keeps x
    # K = 2: only the two nearest members
    aug2 = make_augmentation("vp_c", 2, 1, sigma_c=0.0, tau_c=0.0, k=2, power=power)
    _, _, v3 = apply_augmentation(aug2, rng, x, np.array([[0.1]]), v, flat, np.array([0]), _values_of(fields),
                                  shape, train_c)
    w2 = d[:2] ** -power / (d[:2] ** -power).sum()
    np.testing.assert_allclose(v3[0], w2 @ np.array([1.0, 2.0]), rtol=1e-12)


def test_vp_c_zero_distance_uses_that_member():
    rng = np.random.default_rng(4)
    shape = (3, 4, 5)
    fields = rng.random((3,) + shape)
    train_c = np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]])
    x, v, flat, members = _batch(shape, fields, rng, n=50, members=[1, 2])
    aug = make_augmentation("vp_c", 3, 2, sigma_c=0.0, tau_c=0.0)
    _, c2, v2 = apply_augmentation(aug, rng, x, train_c[[1, 2]], v, flat, members, _values_of(fields), shape, train_c)
    np.testing.assert_array_equal(v2, v)  # exactly the member's own values
    np.testing.assert_array_equal(c2, train_c[[1, 2]])


def test_vp_c_noise_and_clip():
    rng = np.random.default_rng(5)
    shape = (4, 4)
    fields = rng.random((4,) + shape)
    train_c = rng.random((4, 2))
    c = np.array([[0.0, 1.0], [0.5, 0.5]])
    x, v, flat, members = _batch(shape, fields, rng, n=20, members=[0, 1])
    aug = make_augmentation("vp_c", 2, 2, sigma_c=0.5, tau_c=[0.05, 0.1])
    _, c2, v2 = apply_augmentation(aug, rng, x, c, v, flat, members, _values_of(fields), shape, train_c)
    assert (c2 >= 0).all() and (c2 <= 1).all() and (np.abs(c2 - c) <= [0.05, 0.1]).all()
    assert v2.min() >= fields.min() and v2.max() <= fields.max()  # a convex combination of member values


@pytest.mark.parametrize("shape", [(7, 6), (4, 5, 6)])
def test_vp_sc_linear_fields(shape):
    # f_m(x) = a_m + slope . x: IDW of the neighbours at x~ = sum_m w_m a_m + slope . x~
    d = len(shape)
    slope = np.array([0.5, 0.2, -0.3][:d])
    offsets = np.array([0.0, 1.0, 4.0, 9.0])
    fields = _linear_fields(shape, offsets, slope)
    train_c = np.array([[0.1], [0.2], [0.6], [0.9]])
    rng = np.random.default_rng(6)
    x, v, flat, members = _batch(shape, fields, rng, n=300, members=[1, 2, 0])
    aug = make_augmentation("vp_sc", d, 1, sigma_x=0.2, tau_x=0.25, sigma_c=0.05, tau_c=0.08, k=3, power=2)
    x2, c2, v2 = apply_augmentation(aug, rng, x, train_c[[1, 2, 0]], v, flat, members, _values_of(fields), shape,
                                    train_c)
    dist, nbr = knn(c2, train_c, 3)
    w = idw_weights(dist, 2)
    expect = (w * offsets[nbr]).sum(1)[:, None] + x2 @ slope
    np.testing.assert_allclose(v2, expect, atol=1e-12)
    assert (np.abs(x2 - x) <= 0.25 + 1e-12).all() and (np.abs(c2 - train_c[[1, 2, 0]]) <= 0.08 + 1e-12).all()


def test_same_generator_state_same_result():
    shape = (5, 5, 5)
    fields = np.random.default_rng(7).random((3,) + shape)
    aug = make_augmentation("vp_sc", 3, 1, tau_x=0.1, tau_c=0.1)
    out = []
    for _ in range(2):
        rng = np.random.default_rng(11)
        x, v, flat, members = _batch(shape, fields, rng, n=30)
        out.append(apply_augmentation(aug, rng, x, np.array([[0.1], [0.5], [0.9]]), v, flat, members,
                                      _values_of(fields), shape, np.array([[0.1], [0.5], [0.9]])))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------- interpolation primitives (util.sampling)
@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_interp_gather_matches_grid_sample_and_is_exact_at_the_boundary(shape):
    import torch

    from util.sampling import coords_to_continuous_index, grid_coords, interp_gather, sample_grid

    rng = np.random.default_rng(8)
    f = rng.random(shape)
    get = lambda i: f.reshape(-1)[i]  # noqa: E731
    x = rng.uniform(-1.2, 1.2, (300, len(shape)))
    ref = sample_grid(torch.from_numpy(f)[None], torch.from_numpy(np.clip(x, -1, 1))[None])[0, :, 0].numpy()
    np.testing.assert_allclose(interp_gather(get, x, shape), ref, atol=1e-12)
    corner = np.ones((1, len(shape)))  # x = 1: exactly the last vertex
    assert interp_gather(get, corner, shape)[0] == f.reshape(-1)[-1]
    assert interp_gather(get, -corner, shape)[0] == f.reshape(-1)[0]
    # vertex coordinates in flat C order, column 0 = last axis
    g = grid_coords(shape)
    assert g.shape == (f.size, len(shape)) and g.dtype == torch.float32
    idx = np.stack(np.unravel_index(np.arange(f.size), shape), -1)
    np.testing.assert_allclose(coords_to_continuous_index(g.numpy(), shape), idx, atol=1e-5)
    np.testing.assert_allclose(interp_gather(get, index_to_coords(idx, shape), shape), f.reshape(-1), atol=1e-15)
    assert g[1, 0] > g[0, 0] and g[1, 1:].eq(g[0, 1:]).all()  # the last array axis runs fastest


def test_sample_grid_shared_and_batched_grids():
    import torch

    from util.sampling import sample_grid

    grid = torch.randn(3, 4, 5, 6, requires_grad=True)  # (C, D, H, W)
    x = torch.rand(2, 10, 3) * 2 - 1
    shared = sample_grid(grid, x)
    assert shared.shape == (2, 10, 3)
    batched = sample_grid(grid[None].expand(2, -1, -1, -1, -1), x)
    torch.testing.assert_close(shared, batched)
    shared.sum().backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0
    v = sample_grid(torch.arange(6.0).reshape(1, 2, 3), torch.tensor([[[1.0, -1.0], [0.0, 1.0]]]))  # 2D, (C,H,W)
    torch.testing.assert_close(v[0, :, 0], torch.tensor([2.0, 4.0]))  # (w=2,h=0) and (w=1,h=1)
    with pytest.raises(ValueError, match="grid must have shape"):
        sample_grid(torch.zeros(4, 5), x)
