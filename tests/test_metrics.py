"""Metrics (spec 5.3): hand-computed values, degenerate cases, SSIM against scikit-image."""
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from util.metrics import (count_wins, dataset_metrics, gaussian_window, is_constant, max_diff, member_metrics, mse, psnr,
                          psnr_from_mse, rel_l2, ssim)


def test_mse_psnr_constant_offset():
    gt = torch.rand(4, 5, 6)
    pred = gt + 0.1
    assert mse(pred, gt) == pytest.approx(0.01, rel=1e-5)
    assert psnr(pred, gt) == pytest.approx(20.0, abs=1e-4)
    gt = gt.double()
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0, abs=1e-9)
    assert psnr(gt - 0.1, gt) == pytest.approx(20.0, abs=1e-9)
    assert psnr_from_mse(1e-3) == pytest.approx(30.0)
    assert psnr_from_mse(0.04, data_range=2.0) == pytest.approx(20.0)


def test_psnr_identical_is_inf():
    x = torch.rand(3, 3)
    assert mse(x, x) == 0.0
    assert psnr(x, x) == math.inf
    assert psnr_from_mse(0.0) == math.inf
    t = psnr_from_mse(torch.tensor([0.0, 0.01]))
    assert torch.isinf(t[0]) and float(t[1]) == pytest.approx(20.0)
    a = psnr_from_mse(np.array([0.0, 0.1]))
    assert np.isinf(a[0]) and a[1] == pytest.approx(10.0)
    with pytest.raises(ValueError):
        psnr_from_mse(-1.0)


def test_rel_l2_and_md_by_hand():
    gt = torch.tensor([3.0, 4.0])       # ||gt|| = 5
    pred = torch.tensor([3.0, 1.0])     # diff (0, -3) -> 3
    assert rel_l2(pred, gt) == pytest.approx(0.6)
    assert max_diff(pred, gt) == pytest.approx(3.0)
    assert max_diff(torch.tensor([[0.5, -0.25]]), torch.tensor([[0.0, 0.5]])) == pytest.approx(0.75)
    z = torch.zeros(3)
    assert rel_l2(z, z) == 0.0
    assert rel_l2(z + 1, z) == math.inf


def test_numpy_inputs_and_shape_mismatch():
    a = np.full((2, 2), 0.5)
    assert mse(a, np.zeros((2, 2))) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="shape"):
        mse(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError):
        mse(torch.zeros(0), torch.zeros(0))


def test_gaussian_window():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11,) and float(w.sum()) == pytest.approx(1.0)
    assert torch.allclose(w, w.flip(0)) and int(torch.argmax(w)) == 5
    with pytest.raises(ValueError):
        gaussian_window(4, 1.5)


@pytest.mark.parametrize("shape", [(24, 24), (16, 16, 16)])
def test_ssim_identical_is_one(shape):
    x = torch.rand(shape)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    c = torch.full(shape, 0.3)
    assert ssim(c, c) == pytest.approx(1.0, abs=1e-12)


def _smooth_pair(shape, seed):
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.random(shape), 2.0)
    a = (a - a.min()) / (a.max() - a.min())
    b = np.clip(a + 0.08 * rng.standard_normal(shape) + 0.05, 0.0, 1.0)
    return a, b


@pytest.mark.parametrize("shape", [(40, 33), (18, 21, 25), (11, 30, 14)])
def test_ssim_matches_skimage(shape):
    a, b = _smooth_pair(shape, seed=len(shape))
    ref = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert 0.1 < ref < 0.99
    assert ssim(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, abs=1e-10)
    # float32 inputs (float64 accumulation inside), numpy inputs, tiny slabs: same value
    assert ssim(a.astype(np.float32), b.astype(np.float32), chunk_voxels=64) == pytest.approx(ref, abs=1e-6)
    # random (non-smooth) data too
    rng = np.random.default_rng(1)
    x, y = rng.random(shape), rng.random(shape)
    ref = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim(x, y) == pytest.approx(ref, abs=1e-10)


def test_ssim_chunking_is_exact():
    a, b = _smooth_pair((30, 20, 20), seed=3)
    full = ssim(a, b, chunk_voxels=1 << 30)
    for cv in (1, 400, 2000, 5000):
        assert ssim(a, b, chunk_voxels=cv) == pytest.approx(full, abs=1e-12)


def test_ssim_small_volume_shrinks_or_raises():
    a, b = _smooth_pair((6, 20, 9), seed=4)
    v = ssim(a, b)  # axis of 6 -> 5-tap window, axis of 9 -> 9-tap window
    ref = ssim(a, b, win_size=5)
    assert 0 < v <= 1 and math.isfinite(ref)
    with pytest.raises(ValueError, match="window"):
        ssim(a, b, shrink=False)
    with pytest.raises(ValueError):
        ssim(np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError):
        ssim(a, b, win_size=4)


def _ssim_scipy(a, b, sigma, truncate):
    """Independent SSIM: scipy Gaussian filters (7 taps for truncate 2), mean over the valid region."""
    f = lambda x: gaussian_filter(x, sigma, truncate=truncate, mode="reflect")
    ux, uy = f(a), f(b)
    vx, vy, vxy = f(a * a) - ux * ux, f(b * b) - uy * uy, f(a * b) - ux * uy
    s = ((2 * ux * uy + 1e-4) * (2 * vxy + 9e-4)) / ((ux ** 2 + uy ** 2 + 1e-4) * (vx + vy + 9e-4))
    r = int(truncate * sigma + 0.5)
    return s[tuple(slice(r, n - r) for n in s.shape)].mean()


@pytest.mark.parametrize("shape", [(30, 28), (12, 15, 17)])
def test_ssim_win7_matches_scipy(shape):
    # skimage fixes truncate at 3.5, so a 7-tap window is checked against scipy directly
    a, b = _smooth_pair(shape, seed=5)
    assert ssim(a, b, win_size=7) == pytest.approx(_ssim_scipy(a, b, 1.5, 2.0), abs=1e-10)
    assert ssim(a, b) == pytest.approx(_ssim_scipy(a, b, 1.5, 3.5), abs=1e-10)


def test_member_metrics_keys():
    gt = torch.rand(12, 12, 12)
    m = member_metrics(gt + 0.1, gt)
    assert set(m) == {"mse", "psnr", "rel_l2", "ssim", "md"}
    assert m["psnr"] == pytest.approx(20.0, abs=1e-4) and m["md"] == pytest.approx(0.1, abs=1e-6)
    assert 0 < m["ssim"] < 1
    assert math.isnan(member_metrics(gt, gt, with_ssim=False)["ssim"])
    assert math.isnan(member_metrics(torch.rand(50), torch.rand(50))["ssim"])  # unstructured: no SSIM
    assert member_metrics(gt, gt, ssim_win_size=5)["ssim"] == pytest.approx(1.0)


def test_dataset_metrics_by_hand():
    rows = [dict(predictor="model", row=0, mse=0.01, psnr=20.0, rel_l2=0.1, ssim=0.9, md=0.3),
            dict(predictor="model", row=1, mse=0.0001, psnr=40.0, rel_l2=0.3, ssim=0.7, md=0.1)]
    d = dataset_metrics(rows)
    assert d["members"] == 2
    assert d["psnr_member_mean"] == pytest.approx(30.0)
    assert d["psnr_dataset"] == pytest.approx(-10 * math.log10((0.01 + 0.0001) / 2))  # 22.97 dB
    assert d["mse"] == pytest.approx(0.00505)
    assert d["rel_l2"] == pytest.approx(0.2) and d["ssim"] == pytest.approx(0.8) and d["md"] == pytest.approx(0.2)
    e = dataset_metrics([])
    assert e["members"] == 0 and math.isnan(e["psnr_dataset"])
    z = dataset_metrics([dict(mse=0.0, psnr=math.inf, rel_l2=0.0, ssim=1.0, md=0.0)])
    assert z["psnr_dataset"] == math.inf


def test_is_constant():
    assert is_constant(torch.zeros(4, 4, 4))
    assert is_constant(torch.full((10,), 0.37) + 1e-8 * torch.rand(10))
    assert not is_constant(torch.rand(8, 8))
    assert not is_constant(torch.tensor([0.0, 1e-3]))
    assert is_constant(torch.tensor([0.0, 1e-3]), tol=1e-2)
    assert is_constant(np.ones((3, 3), dtype=np.float32))


def test_count_wins_strictly_higher_on_common_members():
    model = {0: 30.0, 1: 20.0, 2: 25.0, 3: math.inf, 4: math.nan, 7: 99.0}
    ref = {0: 29.0, 1: 21.0, 2: 25.0, 3: math.inf, 4: 10.0, 5: 1.0}
    # member 0 won; 1 lost; 2 and 3 tied (no win); a NaN never wins; 5 and 7 are not in both
    assert count_wins(model, ref) == (1, 5)
    assert count_wins(ref, model) == (1, 5)  # member 1 (and not the NaN member 4)
    assert count_wins({}, ref) == (0, 0)


# ---------------------------------------------------------------- the one PSNR: every task's convention
def test_psnr_forms_floor_and_peak_by_hand():
    rng = np.random.default_rng(1)
    ms = 10.0 ** rng.uniform(-12, 0, 200)
    for m in ms:
        # "difference" with peak 1 is exactly -10 log10(MSE) (the NeRF views and the training log)
        assert psnr_from_mse(m, 1.0, form="difference") == -10.0 * math.log10(m)
        assert psnr_from_mse(m, 1.0) == pytest.approx(-10.0 * math.log10(m), rel=1e-12, abs=1e-12)
        assert psnr_from_mse(m, 2.0, form="difference") == pytest.approx(10.0 * math.log10(4.0 / m), rel=1e-12)
    # the two forms differ only by rounding, which is why each caller names its own
    diff = [psnr_from_mse(m, 1.0) - psnr_from_mse(m, 1.0, form="difference") for m in ms]
    assert max(abs(d) for d in diff) < 1e-12
    # the floor caps the PSNR at 10 log10(peak^2 / floor); without one, MSE 0 is +inf
    assert psnr_from_mse(0.0, floor=1e-20, form="difference") == pytest.approx(200.0)
    assert psnr_from_mse(1e-25, floor=1e-20) == pytest.approx(200.0)
    assert psnr_from_mse(1e-3, floor=1e-20) == psnr_from_mse(1e-3)
    assert psnr_from_mse(0.0, form="difference") == math.inf
    assert math.isnan(psnr_from_mse(math.nan, floor=1e-20))
    with pytest.raises(ValueError, match="form"):
        psnr_from_mse(0.1, form="log")
    with pytest.raises(ValueError):
        psnr_from_mse(torch.tensor([0.1, -0.1]))


def test_psnr_from_mse_on_tensors_against_numpy():
    """Tensor MSEs with per-element peaks (the terrain tiles): float64 numpy by hand, elementwise."""
    rng = np.random.default_rng(2)
    m = 10.0 ** rng.uniform(-8, 0, 50)
    peak = rng.uniform(0.1, 3.0, 50)
    ref = 10.0 * np.log10(peak ** 2 / m)
    out = psnr_from_mse(torch.from_numpy(m), torch.from_numpy(peak), floor=1e-20)
    assert out.dtype == torch.float64 and out.shape == (50,)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    out2 = psnr_from_mse(torch.from_numpy(m), 2.0)  # a scalar peak on a tensor
    np.testing.assert_allclose(out2.numpy(), 10.0 * np.log10(4.0 / m), rtol=1e-12)
    # float64=False keeps float32 (the terrain figure's per-tile label), still close to the float64 value
    out32 = psnr_from_mse(torch.from_numpy(m).float(), torch.from_numpy(peak).float(), float64=False)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(psnr_from_mse(m, 2.0), 10.0 * np.log10(4.0 / m), rtol=1e-12)  # numpy arrays
    # floor on tensors and arrays; MSE 0 without a floor is +inf
    t = psnr_from_mse(torch.tensor([0.0, 0.01], dtype=torch.float64), floor=1e-20)
    assert float(t[0]) == pytest.approx(200.0) and float(t[1]) == pytest.approx(20.0)
    assert np.isinf(psnr_from_mse(np.array([0.0, 0.5]))[0])


def test_mse_in_float32_and_rel_l2_against_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.random((17, 19, 3)), rng.random((17, 19, 3))
    ref = float(np.mean((a - b) ** 2))
    assert mse(a, b) == pytest.approx(ref, rel=1e-13)
    m32 = mse(torch.from_numpy(a).float(), torch.from_numpy(b).float(), dtype=torch.float32)
    assert m32 == pytest.approx(ref, rel=1e-5)
    assert rel_l2(a, b) == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-13)


def test_ssim_data_range_2_matches_skimage():
    """Values in [-1, 1] with data range 2 (the MoE-INR slices): scikit-image's SSIM at data_range 2."""
    rng = np.random.default_rng(4)
    a = rng.uniform(-1, 1, (24, 30))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), -1, 1)
    ref = structural_similarity(a, b, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim(a, b, data_range=2.0) == pytest.approx(ref, abs=1e-10)
    assert ssim(a, b, data_range=2.0) != pytest.approx(ssim(a, b, data_range=1.0), abs=1e-3)


def test_moe_slice_ssim_matches_skimage():
    from tasks.moe_inr.evaluation import psnr_steps, slice_ssim

    rng = np.random.default_rng(5)
    gt = rng.uniform(-1, 1, (13, 14, 15)).astype(np.float32)
    pred = np.clip(gt + 0.1 * rng.standard_normal(gt.shape), -1, 1).astype(np.float32)
    refs = [structural_similarity(np.take(pred, n // 2, ax).astype(np.float64),
                                  np.take(gt, n // 2, ax).astype(np.float64), data_range=2.0,
                                  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            for ax, n in enumerate(gt.shape)]
    assert slice_ssim(pred, gt) == pytest.approx(float(np.mean(refs)), abs=1e-6)
    m = float(np.mean((pred.astype(np.float64) - gt) ** 2))
    assert psnr_steps([pred], [gt])[0] == pytest.approx(10 * math.log10(4.0 / m), rel=1e-10)


def test_synchronize_is_a_no_op_on_cpu():
    from util.timing import synchronize

    synchronize("cpu")
    synchronize(torch.device("cpu"))
    synchronize(None)
