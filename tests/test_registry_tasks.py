"""Every registered task, generated from the registry (``names("task")``): a two-step training run through the one
loop (``util.training.train``) on tiny data made in tmp_path, then the task's own ``evaluate`` of that run.

``CONFIGS`` maps each task to a builder of its tiny experiment; ``test_every_task_has_a_tiny_config`` fails when a
task is registered without an entry, so a new task cannot escape the end-to-end check.
"""
import math
import os

import numpy as np
import pytest
import yaml

from util.registry import get, names

TASKS = [n for n in names("task") if not n.startswith("_")]  # "_name": registered by a test module
TRAIN = dict(max_steps=2, log_every=1, collapse_check_steps=0, timing_steps=0)


def _ensemble(tmp_path):
    return dict(
        task=dict(type="ensemble"),
        model=dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
                   spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
                   cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2),
        dataset=dict(type="demo", root=str(tmp_path / "demo"), n_train=6, n_test=3, resolution=8, cond_batch=2,
                     spatial_log2batch=6),
        test=dict(chunk_size=256, ssim_win_size=3, ref_k=2))


def _image(tmp_path):
    from PIL import Image

    i, j = np.meshgrid(np.arange(20), np.arange(26), indexing="ij")
    img = (127 + 100 * np.sin(i[..., None] / 3.0 + j[..., None] * np.arange(1, 4) / 4.0)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    return dict(
        task=dict(type="image"),
        model=dict(type="mrgrid", resolutions=[4, 8], channels=2, decoder_width=16, decoder_hidden_layers=1),
        dataset=dict(type="image", path=str(tmp_path / "img.png"), log2batch=6),
        test=dict(lpips=False, save_png=False))


def _nerf(tmp_path):
    return dict(
        task=dict(type="nerf", grid_resolution=8, target_samples=512, loss_scale=1.0),
        model=dict(type="vanilla_nerf", width=16, depth=2, skip_layer=1, pos_freqs=2, dir_freqs=1),
        dataset=dict(type="nerf_demo", root=str(tmp_path / "scene"), size=8, n_train=2, n_test=1, init_rays=32),
        test=dict(chunk_rays=64))


def _moe_inr(tmp_path):
    t, z, y, x = np.meshgrid(np.arange(2), np.arange(4), np.arange(5), np.arange(6), indexing="ij")
    np.save(tmp_path / "v.npy", np.exp(-((x - 2 - t) ** 2 + (y - 2) ** 2 + (z - 2) ** 2) / 5.0).astype(np.float32))
    return dict(
        task=dict(type="moe_inr", k=2, stage1_steps=1, kmeans_samples=100, kmeans_iters=5),
        model=dict(type="moe_inr", M=2, k=2),
        dataset=dict(type="time_volume", path=str(tmp_path / "v.npy"), batch_size=64),
        test=dict(isovalues=[], ssim=False))


def _terrain(tmp_path):
    from datasets.terrain_gen import fractal_surface

    dem = tmp_path / "dem"
    dem.mkdir()
    for i in range(4):
        np.save(dem / f"r{i}.npy", (200.0 * fractal_surface(32, seed=i) + 50 * i).astype(np.float32))
    return dict(
        task=dict(type="terrain"),
        model=dict(type="huvr", patch_size=4, latent_dim=6, enc_width=16, enc_depth=1, enc_heads=2, dec_width=16,
                   dec_depth=1, dec_heads=2, mlp_width=8, mlp_depth=1, upsampler_channels=4),
        dataset=dict(type="terrain", path=str(dem), tile_size=16, val_fraction=0.25, test_fraction=0.25,
                     batch_size=2),
        test=dict(max_tiles=2, ptq_bits=[8], timing_repeats=1, flops=False))


# task name -> builder of a tiny experiment (its data written under tmp_path); the loop's sections are added below
CONFIGS = {"ensemble": _ensemble, "image": _image, "nerf": _nerf, "moe_inr": _moe_inr, "terrain": _terrain}


def test_every_task_has_a_tiny_config():
    missing = sorted(set(TASKS) - set(CONFIGS))
    assert not missing, f"registered tasks without a tiny config in tests/test_registry_tasks.py CONFIGS: {missing}"
    stale = sorted(set(CONFIGS) - set(TASKS))
    assert not stale, f"CONFIGS entries for tasks no longer registered: {stale}"


def _finite_numbers(rows):
    vals = [v for r in rows for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return vals and all(math.isfinite(v) for v in vals if not (isinstance(v, float) and math.isnan(v)))


@pytest.mark.parametrize("name", TASKS)
def test_two_steps_train_and_evaluate(name, tmp_path):
    from util.config import load_config
    from util.training import train

    if name not in CONFIGS:
        pytest.fail(f"task '{name}' has no tiny config (see test_every_task_has_a_tiny_config)")
    exp = CONFIGS[name](tmp_path)
    exp.update(name=f"tiny_{name}", optim=dict(type="adam", lr=1e-3), scheduler=dict(type="constant"),
               train=dict(TRAIN, log_dir=str(tmp_path / "runs")))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump([exp]))
    run = train(load_config(str(path), 0), progress=False)
    for f in ("config.yaml", "meta.json", "model.pt", "finished.json", "log.csv"):
        assert os.path.isfile(os.path.join(run, f)), f"{name}: run directory lacks {f}"
    with open(os.path.join(run, "log.csv")) as f:
        assert len(f.read().splitlines()) == 1 + 2, f"{name}: log.csv should hold a header and the two steps"

    task_cls = get("task", name)
    rows = task_cls.evaluate(run, device="cpu", progress=False)
    assert rows and all(isinstance(r, dict) for r in rows), f"{name}: evaluate returned {rows!r}"
    assert _finite_numbers(rows), f"{name}: no finite number in the evaluation rows {rows}"
    eval_dir = os.path.join(run, "eval")
    assert os.path.isdir(eval_dir) and os.listdir(eval_dir), f"{name}: evaluate wrote nothing into {eval_dir}"
    with pytest.raises(FileExistsError):  # a second evaluation refuses to overwrite the first
        task_cls.evaluate(run, device="cpu", progress=False)
    assert isinstance(task_cls.format_table(rows), str)
