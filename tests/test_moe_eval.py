"""MoE-INR compression outputs and metrics (tasks/moe_inr/evaluation.py): fp16 round trip and CR arithmetic, chamfer
distance of known spheres, PSNR bisection with a stand-in compressor, uncertainty metrics, missing packages."""
import math
import sys
import zlib

import numpy as np
import pytest
import torch

from tasks.moe_inr.evaluation import (PearsonSums, chamfer_distance, compression_ratios, evaluate_volumes, get_compressor,
                               isosurface, jaccard_tolerance, load_fp16, match_psnr, pearson, save_fp16)
from models.moe_inr import MoEINR


def test_fp16_round_trip_and_cr(tmp_path):
    torch.manual_seed(0)
    model = MoEINR(M=3, k=2)
    info = save_fp16(model, str(tmp_path / "w.bin"))
    n = 77 * 9 + 35 * 3 + 17 * 3 * 2 + 2 * 2
    assert info["n_params"] == n
    state = load_fp16(str(tmp_path / "w.bin"))
    for name, p in model.state_dict().items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], p.half().float())  # exactly the fp16 values
    # file = 8 magic + 8 length + JSON header + 2 bytes per value
    raw = (tmp_path / "w.bin").read_bytes()
    hlen = int.from_bytes(raw[8:16], "little")
    assert info["file_bytes"] == len(raw) == 16 + hlen + 2 * n
    cr = compression_ratios(1000 * 4, n, info["file_bytes"])
    assert cr["cr_params"] == pytest.approx(4000 / (2 * n))
    assert cr["cr_file"] == pytest.approx(4000 / len(raw))
    # spec 6: vortex 256^3 x 90 at M = 87, k = 7
    assert round(compression_ratios(256 ** 3 * 90 * 4, 596_225)["cr_params"]) == 5065


def _sphere_field(n=40, center=(19.5, 19.5, 19.5)):
    z, y, x = np.meshgrid(*(np.arange(n),) * 3, indexing="ij")
    return np.sqrt((z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2).astype(np.float32)


def test_chamfer_distance_of_two_spheres():
    d = _sphere_field()
    a, b = isosurface(d, 8.0), isosurface(d, 11.0)
    # vertices lie on their spheres
    r_a = np.linalg.norm(a - 19.5, axis=1)
    assert np.abs(r_a - 8.0).max() < 0.1
    # concentric radii 8 and 11: every nearest distance is ~3 in both directions
    assert chamfer_distance(a, b) == pytest.approx(3.0, abs=0.08)
    assert chamfer_distance(a, a) == 0.0
    # a sphere shifted by 2 voxels along one axis: one-sided CD is between 0 and 2, symmetric equals both sides
    c = isosurface(_sphere_field(center=(19.5, 19.5, 21.5)), 8.0)
    cd = chamfer_distance(a, c)
    assert 0.5 < cd < 2.0
    assert isosurface(d, 1000.0) is None


def test_chamfer_one_sided_known_points():
    a = np.array([[0.0, 0, 0], [0, 0, 1]])
    b = np.array([[0.0, 0, 3]])
    assert chamfer_distance(a, b, symmetric=False) == pytest.approx((3 + 2) / 2)
    assert chamfer_distance(a, b) == pytest.approx(0.5 * (2.5 + 2.0))


class Quantizer:
    """Stand-in error-bounded compressor: uniform quantization with step 2 eb (|error| <= eb) + zlib."""

    def compress(self, a, eb):
        q = np.round(a.astype(np.float64) / (2 * eb)).astype(np.int64)
        return np.float64(eb).tobytes() + zlib.compress(q.tobytes(), 6)

    def decompress(self, blob, shape, dtype=np.float32):
        eb = np.frombuffer(blob[:8], np.float64)[0]
        q = np.frombuffer(zlib.decompress(blob[8:]), np.int64)
        return (q * 2 * eb).astype(dtype).reshape(shape)


def test_bisection_hits_target_psnr():
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, 24),) * 3, indexing="ij")
    steps = [np.sin(3 * x + t) * np.cos(2 * y) * 0.9 * np.exp(-z * z) for t in range(3)]
    steps = [s.astype(np.float32) for s in steps]
    for target in (35.0, 50.0):
        r = match_psnr(Quantizer(), steps, target, tol=0.05)
        assert r["matched"] and abs(r["psnr"] - target) <= 0.05
        assert r["max_error"] <= r["error_bound"] * 1.0001 + 1e-7
        # uniform quantization error ~ U(-eb, eb): MSE = eb^2 / 3, PSNR = 20 log10(2 / (eb / sqrt 3))
        assert r["psnr"] == pytest.approx(20 * math.log10(2 * math.sqrt(3) / r["error_bound"]), abs=0.5)
        raw = 4 * sum(s.size for s in steps)
        assert r["cr"] == pytest.approx(raw / r["bytes"])
    # a higher target needs a smaller bound and stores more bytes
    lo, hi = match_psnr(Quantizer(), steps, 35.0), match_psnr(Quantizer(), steps, 50.0)
    assert hi["error_bound"] < lo["error_bound"] and hi["bytes"] > lo["bytes"]


class RateQuantizer(Quantizer):
    """Stand-in fixed-rate compressor: quality rises with the setting (step 2^-rate), as ZFP's fixed rate."""

    setting, setting_range, quality_up = "rate", (0.05, 32.0), True

    def compress(self, a, rate):
        return super().compress(a, 2.0 ** -rate)


def test_bisection_follows_the_direction_of_a_rate_setting():
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, 20),) * 3, indexing="ij")
    steps = [(np.sin(3 * x + t) * np.cos(2 * y) * 0.9).astype(np.float32) for t in range(2)]
    lo, hi = (match_psnr(RateQuantizer(), steps, t, tol=0.05) for t in (30.0, 45.0))
    for r, t in ((lo, 30.0), (hi, 45.0)):
        assert r["matched"] and abs(r["psnr"] - t) <= 0.05 and "error_bound" not in r
        # step 2^-rate, error ~ U(-2^-rate, 2^-rate): PSNR = 20 log10(2 sqrt 3 2^rate)
        assert r["psnr"] == pytest.approx(20 * math.log10(2 * math.sqrt(3) * 2 ** r["rate"]), abs=0.5)
    assert hi["rate"] > lo["rate"] and hi["bytes"] > lo["bytes"]


def test_missing_compressor_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pysz", None)
    monkeypatch.setitem(sys.modules, "zfpy", None)
    with pytest.raises(ImportError, match="pysz"):
        get_compressor("sz3")
    with pytest.raises(ImportError, match="zfpy"):
        get_compressor("zfp")
    with pytest.raises(ImportError, match="zfpy"):
        get_compressor("zfp_rate")


def test_uncertainty_metrics():
    rng = np.random.default_rng(0)
    e = rng.random((10, 10, 10))
    assert pearson(e, 2 * e + 1) == pytest.approx(1.0)
    assert pearson(e, -e) == pytest.approx(-1.0)
    f = e ** 2 + 0.3 * rng.random(e.shape)
    acc = PearsonSums()
    for i in range(10):  # chunked sums equal the one-shot coefficient
        acc.add(e[i], f[i])
    assert acc.value() == pytest.approx(pearson(e, f), rel=1e-9)
    assert 0.5 < pearson(e, f) < 1.0
    u = rng.random((10, 10, 10))
    U, E = u > np.quantile(u, 0.9), e > np.quantile(e, 0.9)
    assert jaccard_tolerance(u, e, 0.9, 0) == pytest.approx((U & E).sum() / (U | E).sum())
    e[..., -1] = 0.0  # nothing wraps around in the roll below
    shifted = np.roll(e, 1, axis=2)  # the same set one voxel away: exact with tolerance 1, not without
    assert jaccard_tolerance(shifted, e, 0.9, 1) == pytest.approx(1.0)
    assert jaccard_tolerance(shifted, e, 0.9, 0) < 0.3


def test_evaluate_volumes_psnr_per_step():
    g = [np.zeros((12, 12, 12), np.float32), np.zeros((12, 12, 12), np.float32)]
    p = [g[0] + 0.02, g[1] + 0.2]  # MSE 4e-4 and 4e-2 with range 2: PSNR 40 and 20 dB
    s, rows = evaluate_volumes(p, g, isovalues=[0.5], with_ssim=False)
    assert rows[0]["psnr"] == pytest.approx(40.0) and rows[1]["psnr"] == pytest.approx(20.0)
    assert s["psnr"] == pytest.approx(30.0) and s["psnr_min"] == pytest.approx(20.0)
    assert s["cd@0.5"] is None  # the truth has no surface at 0.5
