"""benchmarks/: both scripts run without data on a tiny model and print the documented line format, the fast
paths agree with the plain one, and the CPU peak-memory probe sees an allocation made inside its block."""
import os
import re
import math
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_inference  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
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
    out = capsys.readouterr().out
    assert out.count("# cpu: ") == 1 and "bf16: " in out and "bf16 products: " in out     # CPU features line
    lines = path_lines(out)
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


def test_terrain_configs_in_test_flops(tmp_path, capsys):
    """Terrain models cost per pixel of a tile (Task.count_flops): a Functa with width 8, one hidden layer,
    latent 4 on 16 x 16 tiles and 2 inner steps, in multiply-adds by hand: per pixel the SIREN's linear layers
    2*8 + 8*8 + 8*1 = 88, the shift maps 4 * (2 * 8) = 64 per tile = 0.25 per pixel; the inner loop runs
    forward + 2 x backward per step, then the final decode: (1 + 3 * 2) x 88.25 = 617.75 per pixel."""
    import yaml

    from test_flops import main as flops_main

    cfg = [{"name": "f", "task": {"type": "terrain"},
            "model": {"type": "functa", "latent_dim": 4, "width": 8, "hidden_layers": 1, "inner_steps": 2},
            "dataset": {"type": "terrain", "path": str(tmp_path / "absent"), "tile_size": 16},
            "optim": {"type": "adam", "lr": 1e-3}, "scheduler": {"type": "constant"}, "train": {"max_steps": 1}}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    flops_main(["--config", str(tmp_path / "c.yaml")])
    row = [ln.split() for ln in capsys.readouterr().out.splitlines() if "functa" in ln][0]
    assert float(row[2]) == pytest.approx(617.75e9 / 1e12, abs=0.006)
    params = (2 * 8 + 8) + (8 * 8 + 8) + (8 + 1) + (4 * 16 + 16) + 4
    assert row[3] == f"{params:,}"


def test_benchmarks_name_the_task_they_do_not_time():
    """Terrain, NeRF and MoE-INR models are not fields f(x, c) on points: the benchmarks stop with one line that
    says where those tasks are timed, instead of an AttributeError deep inside."""
    for cfg, task, where in (("configs/terrain/demo.yaml", "terrain", "encode / decode ms per tile"),
                             ("configs/nerf/demo.yaml", "nerf", "render seconds"),
                             ("configs/moe_inr/demo.yaml", "moe_inr", "decompression")):
        with pytest.raises(SystemExit, match=f"'{task}' run.*{where}"):
            bench_train.main(["--config", os.path.join(ROOT, cfg), "--config_id", "0", "--steps", "1"])
        with pytest.raises(SystemExit, match=f"'{task}' run"):
            bench_inference.main(["--config", os.path.join(ROOT, cfg), "--config_id", "0", "--repeats", "1"])


def test_terrain_regimes_bins_by_the_reference_gradient_error(tmp_path, capsys):
    """7 tiles: the reference's gradient errors 7, 1, 6, 2, 5, 3, 4 -> flat = its 3 smoothest tiles (errors 1, 2, 3),
    hilly = (4, 5), rugged = (6, 7); the other run is scored on the same bins (mean PSNR, pooled RMSEs)."""
    import csv as _csv

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import terrain_regimes

    def run(name, grads, psnrs):
        d = tmp_path / name / "eval"
        d.mkdir(parents=True)
        with open(d / "tiles.csv", "w", newline="") as f:
            w = _csv.writer(f)
            w.writerow(["index", "region", "psnr", "rmse_z_m", "rmse_grad"])
            for i, (g, p) in enumerate(zip(grads, psnrs)):
                w.writerow([10 + i, "r", p, 2 * g, g])
        return str(tmp_path / name)

    ref = run("huvr", [7, 1, 6, 2, 5, 3, 4], [30] * 7)
    other = run("other", [1, 1, 1, 1, 1, 1, 3], [20, 21, 22, 23, 24, 25, 26])
    rows = terrain_regimes.main([ref, other, "--out", str(tmp_path / "r.csv")])
    by = {(r["run"], r["regime"]): r for r in rows}
    assert [by[("huvr", g)]["tiles"] for g in ("flat", "hilly", "rugged")] == [3, 2, 2]
    # the other run on the reference's bins: flat = tiles 11, 13, 15 (PSNR 21, 23, 25), rugged = 10, 12 (20, 22)
    assert by[("other", "flat")]["psnr"] == pytest.approx(23.0)
    assert by[("other", "rugged")]["psnr"] == pytest.approx(21.0)
    assert by[("other", "hilly")]["rmse_grad"] == pytest.approx(math.sqrt((9 + 1) / 2))  # tiles 16 (3), 14 (1)
    assert by[("huvr", "hilly")]["rmse_z_m"] == pytest.approx(math.sqrt((64 + 100) / 2))  # errors 4, 5 -> z 8, 10
    assert "regimes by the per-tile gradient error of 'huvr'" in capsys.readouterr().out
    assert (tmp_path / "r.csv").is_file()
    # runs scored on other tiles, or not evaluated: one line naming them
    short = run("short", [1, 2, 3], [1, 2, 3])
    with pytest.raises(SystemExit, match="run 'short' scored other tiles"):
        terrain_regimes.main([ref, short])
    with pytest.raises(SystemExit, match="tiles.csv not found"):
        terrain_regimes.main([ref, str(tmp_path / "missing")])


def test_bench_train_precision_column(capsys):
    """--precisions fp32,bf16: each path in both, a precision field, the CPU line; bf16 close to fp32."""
    bench_train.main(TINY + ["--steps", "1", "--conds", "2", "--points", "64", "--paths", "plain,fast",
                             "--precisions", "fp32,bf16"])
    out = capsys.readouterr().out
    assert "bf16: " in out and out.count("# cpu: ") == 1
    lines = path_lines(out)
    assert [(fields(ln)["path"], fields(ln)["precision"]) for ln in lines] == [
        ("plain", "fp32"), ("plain", "bf16"), ("fast", "fp32"), ("fast", "bf16")]
    for ln in lines:
        f = fields(ln)
        assert float(f["steps_per_s"]) > 0
        assert float(f["loss_rel_err"]) < (1e-5 if f["precision"] == "fp32" else 1e-2)
    with pytest.raises(SystemExit):
        bench_train.main(TINY + ["--steps", "1", "--precisions", "fp8"])


def test_bench_inference_breakdown(capsys, monkeypatch):
    """--breakdown: the instrumented replica of predict_grid gives the same field and names every pass."""
    monkeypatch.setenv("DRR_BAKED_MLP", "off")          # the per-pass path whatever the hidden width
    bench_inference.main(TINY + ["--members", "1", "--resolution", "9", "--repeats", "1", "--bake_repeats", "1",
                                 "--paths", "fast_grid,fast_grid_bf16", "--breakdown"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("breakdown ")]
    assert [fields(ln)["path"] for ln in lines] == ["fast_grid", "fast_grid_bf16"]
    for ln in lines:
        f = fields(ln)
        for k in ("stencil_s", "gather_s", "matmul_s", "activation_s", "total_s", "floor_frac_of_total"):
            assert float(f[k]) >= 0, k
        assert float(f["max_abs_diff_vs_path"]) == 0.0


def test_bench_inference_one_pass_decoder(capsys):
    """Hidden width 64 (a multiple of every panel width): fast_grid runs the one-pass decoder (and fast_grid_bf16
    the AMX one where the CPU has AMX-BF16); the breakdown splits each into rows + output layer and hidden
    products and replays the per-pass paths (fast_grid_torch, fast_grid_bf16_torch) bit for bit; the paths agree
    within float32 (bf16) rounding."""
    from models import cpu_kernels

    argv = [a if a != "hidden_dim=16" else "hidden_dim=64" for a in TINY]
    bench_inference.main(argv + ["--members", "1", "--resolution", "6", "--repeats", "1", "--bake_repeats", "1",
                                 "--paths", "fast_grid,fast_grid_torch,fast_grid_bf16,fast_grid_bf16_torch,"
                                            "fast_grid_members", "--breakdown"])
    out = capsys.readouterr().out
    paths = {fields(ln)["path"]: fields(ln) for ln in path_lines(out)}
    assert set(paths) == {"fast_grid", "fast_grid_torch", "fast_grid_bf16", "fast_grid_bf16_torch",
                          "fast_grid_members"}
    assert float(paths["fast_grid_torch"]["max_abs_err"]) < 1e-5
    assert float(paths["fast_grid_members"]["max_abs_err"]) == 0.0     # bitwise one member at a time
    assert float(paths["fast_grid_bf16"]["rel_l2_err"]) < 1e-2
    lines = [fields(ln) for ln in out.splitlines() if ln.startswith("breakdown ")]
    if cpu_kernels.library() is None:                  # no compiler: the per-pass paths only
        assert [f["path"] for f in lines] == ["fast_grid", "fast_grid_bf16"]
        return
    amx = cpu_kernels.has_amx()                        # (resolution 6 = the SSR lattice: rows read in order)
    assert [f["path"] for f in lines] == ["fast_grid"] + ["fast_grid_bf16"] * amx + [
        "fast_grid_torch", "fast_grid_bf16_torch" if amx else "fast_grid_bf16"]
    for f in lines[:1 + amx]:
        assert f["kernel"] in ("baked_mlp", "baked_mlp_amx")
        assert float(f["gather_out_s"]) > 0 and float(f["total_s"]) > 0
    for f in lines[1 + amx:]:
        assert float(f["max_abs_diff_vs_path"]) == 0.0


def test_bench_mmap_same_batches(tmp_path, capsys):
    """bench_mmap on a tiny synthetic ensemble: both storages train, print peak RSS, and draw the same batches."""
    import bench_mmap

    res = bench_mmap.main(["--members", "6", "--resolution", "8", "--steps", "1", "--warmup", "0",
                           "--log2batch", "5", "--cond_batch", "2", "--cluster_size", "4", "--threads", "1",
                           "--dir", str(tmp_path / "mm")])
    out = capsys.readouterr().out
    assert set(res) == {"mmap", "memory"} and "same_batches=True" in out
    assert all(r["peak_rss_mb"] > 0 and r["steps_per_s"] > 0 for r in res.values())
    assert os.path.isfile(tmp_path / "mm" / "6x8" / "data" / "member_0005.npy")


def test_matmul_peak_keeps_the_faster_size_and_takes_the_median_of_its_samples(monkeypatch):
    """MatmulPeak: the size with the higher median GFLOP/s is kept; sample() times it again; peaks() is the kept
    size's FLOPs over the median of all its timings (scripted timings stand in for the clock)."""
    script = iter([1.0, 3.0, 2.0,          # size (8, 4, 2): 128 FLOP, median 2.0 s -> 64 FLOP/s
                   1.0, 1.0, 9.0,          # size (4, 4, 4): 128 FLOP, median 1.0 s -> 128 FLOP/s: kept
                   5.0, 7.0])              # two later samples of the kept size
    monkeypatch.setattr(common, "timed", lambda fn, dev: next(script))
    floor = common.MatmulPeak("cpu", (torch.float32,), sizes=((8, 4, 2), (4, 4, 4)), repeats=3)
    assert floor.peaks()["float32"] == pytest.approx(128 / 1.0 / 1e9)
    floor.sample(repeats=1)
    floor.sample(repeats=1)                 # timings 1, 1, 9, 5, 7: median 5
    assert floor.peaks()["float32"] == pytest.approx(128 / 5.0 / 1e9)
