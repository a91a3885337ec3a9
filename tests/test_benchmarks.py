"""benchmarks/: both scripts run without data on a tiny model and print the documented line format, the fast
paths agree with the plain one, and the CPU peak-memory probe sees an allocation made inside its block."""
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_inference  # noqa: E402
import bench_train  # noqa: E402
from common import PeakMemory  # noqa: E402

TINY = ["--config", os.path.join(ROOT, "configs/demo/drrnet.yaml"), "--config_id", "0",
        "--model_set", "spatial_resolutions=[3, 5]", "--model_set", "ssr_resolution=6",
        "--model_set", "hidden_dim=16", "--model_set", "cond_resolutions=[2, 4]", "--threads", "1"]
FLOAT = r"([0-9.eE+-]+|nan|inf)"


def fields(line):
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def path_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("path=")]


def test_bench_inference_format_and_agreement(capsys):
    bench_inference.main(TINY + ["--members", "2", "--resolution", "9", "--repeats", "1", "--bake_repeats", "1",
                                 "--paths", "plain,fast_forward,fast_grid,fast_grid_bf16"])
    lines = path_lines(capsys.readouterr().out)
    assert [fields(ln)["path"] for ln in lines] == ["plain", "fast_forward", "fast_grid", "fast_grid_bf16"]
    for ln in lines:
        assert re.match(rf"path=\w+ points_per_s={FLOAT} bake_s={FLOAT}( |$)", ln), ln
        assert float(fields(ln)["points_per_s"]) > 0
    for ln in lines[1:3]:                                  # fp32 fast paths equal the plain path
        assert float(fields(ln)["rel_l2_err"]) < 1e-5
    assert float(fields(lines[3])["rel_l2_err"]) < 2e-2    # bf16: reported, small


def test_bench_train_format_and_agreement(capsys):
    bench_train.main(TINY + ["--steps", "1", "--conds", "2", "--points", "64",
                             "--paths", "plain,fast,fast_dense,fast_sparse,fast_unfused"])
    lines = path_lines(capsys.readouterr().out)
    assert [fields(ln)["path"] for ln in lines] == ["plain", "fast", "fast_dense", "fast_sparse", "fast_unfused"]
    for ln in lines:
        assert re.match(rf"path=\w+ steps_per_s={FLOAT} points_per_s={FLOAT} peak_mem_mb={FLOAT}( |$)", ln), ln
        f = fields(ln)
        assert float(f["steps_per_s"]) > 0
        assert float(f["grad_rel_err"]) < 1e-5 and float(f["loss_rel_err"]) < 1e-5


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as pm:
        x = torch.ones(64, 2 ** 18)                        # 64 MiB, held for a while
        for _ in range(5):
            x.add_(1.0)
        del x
    assert pm.peak_mb >= 48, pm.peak_mb
    with PeakMemory("cpu") as small:
        torch.ones(16).sum()
    assert small.peak_mb < 16, small.peak_mb


def test_bench_rejects_missing_model_source():
    with pytest.raises(SystemExit):
        bench_train.main(["--steps", "1"])


def test_image_configs_in_test_flops_and_bench_compare(capsys):
    """Image configs need no data for FLOPs / timing (the image task knows the model inputs): MRGrid's
    parameters by hand: grids (8^2 + 16^2 + 32^2 + 64^2 + 128^2) x 3 channels, bias-free decoder
    15 -> 128 -> 128 -> 3."""
    from test_flops import main as flops_main

    cfg = os.path.join(ROOT, "configs/image/demo.yaml")
    flops_main(["--config", cfg, "--config_id", "1"])
    out = capsys.readouterr().out
    grids = (8 ** 2 + 16 ** 2 + 32 ** 2 + 64 ** 2 + 128 ** 2) * 3
    decoder = 15 * 128 + 128 * 128 + 128 * 3
    assert f"{grids + decoder:,}" in out and "mrgrid" in out
    bench_inference.main(["--config", cfg, "--compare", "1,3", "--resolution", "16", "--members", "1",
                          "--repeats", "1", "--threads", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model=")]
    assert [fields(ln)["model"] for ln in lines] == ["1:mrgrid", "3:grid"]
    assert int(fields(lines[0])["params"]) == grids + decoder
    assert float(fields(lines[0])["ratio_vs_first"]) == 1.0 and float(fields(lines[1])["infer_s"]) > 0
