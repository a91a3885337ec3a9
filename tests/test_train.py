"""train.py / test.py / predict.py end to end on a tiny synthetic ensemble (CPU)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from util.config import load_config
from util.checkpoints import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
                  spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
                  cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)


def tiny_config(tmp_path, **train):
    exp = dict(
        model=TINY_MODEL,
        dataset=dict(type="demo", root=str(tmp_path / "demo"), n_train=6, n_test=3, resolution=8,
                     cond_batch=2, spatial_log2batch=6),
        optim=dict(type="adam", lr=1e-3),
        scheduler=dict(type="cosine"),
        train=dict(dict(max_steps=6, log_dir=str(tmp_path / "runs"), checkpoint_every_steps=3, log_every=1,
                        keep_checkpoints=10, timing_steps=2), **train),
        test=dict(chunk_size=100, ssim_win_size=3, ref_k=2),
    )
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump([exp]))
    return str(p)


def run_train(cfg, *extra, **kw):
    from train import main

    main(["--config", cfg, "--config_id", "0", "--no_progress", *extra])


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


def test_train_writes_run_directory_and_refuses_overwrite(tmp_path):
    cfg = tiny_config(tmp_path)
    run_train(cfg)
    exp = load_config(cfg, 0)
    from util.run_dir import run_dir_of

    rd = run_dir_of(exp)
    for name in ("config.yaml", "meta.json", "model.pt", "finished.json", "log.csv", "timing.json"):
        assert os.path.isfile(os.path.join(rd, name)), name
    assert os.path.isdir(os.path.join(rd, "tb")) and os.listdir(os.path.join(rd, "tb"))
    assert latest_checkpoint(rd).endswith("step_0000006")
    rows = read_log(rd)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    timing = json.load(open(os.path.join(rd, "timing.json")))
    assert timing["mean_step_s"] > 0 and timing["total_steps"] == 6
    # a second run with the same name must not delete the first one
    marker = os.path.join(rd, "keep.txt")
    open(marker, "w").write("x")
    with pytest.raises(SystemExit, match="already exists"):
        run_train(cfg)
    assert os.path.isfile(marker)
    run_train(cfg, "--overwrite")
    assert not os.path.exists(marker) and os.path.isfile(os.path.join(rd, "finished.json"))


def _cut_after_step_4(run_dir):
    """Make a finished 8-step run look like one killed right after its step-4 checkpoint."""
    import shutil

    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_0000008"))
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write("step_0000004")
    for n in ("model.pt", "finished.json"):
        os.remove(os.path.join(run_dir, n))
    rows = read_log(run_dir)
    with open(os.path.join(run_dir, "log.csv"), "w") as f:  # what was on disk at the step-4 checkpoint
        f.write(",".join(rows[0]) + "\n" + "".join(",".join(r.values()) + "\n" for r in rows[:4]))


def _count_training_steps(monkeypatch):
    """Record the optimizer steps taken and the (step, rank) of every batch drawn during training."""
    from datasets.ensemble import EnsembleDataset

    seen = dict(opt_steps=0, batches=[])
    adam_step, sample = torch.optim.Adam.step, EnsembleDataset.sample_batch

    def counting_step(self, *a, **k):
        seen["opt_steps"] += 1
        return adam_step(self, *a, **k)

    def recording_sample(self, step, rank=0):
        seen["batches"].append(int(step))
        return sample(self, step, rank)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    monkeypatch.setattr(EnsembleDataset, "sample_batch", recording_sample)
    return seen


def test_resume_loads_the_checkpoint_and_continues_bitwise(tmp_path, monkeypatch):
    """A run killed after its step-4 checkpoint and resumed: only steps 5-8 run (4 optimizer steps, batches of
    steps 4-7; none of steps 1-3 is drawn again), log.csv keeps rows 1-4 and adds 5-8, the losses and lrs of
    5-8 and the final weights equal an uninterrupted run bitwise, and a resume from a checkpoint whose weights
    were perturbed ends elsewhere (the weights are read from the checkpoint, not rebuilt)."""
    from safetensors.torch import load_file, save_file

    cfg = tiny_config(tmp_path, max_steps=8, checkpoint_every_steps=4)
    run_train(cfg, "--set", "train.run_name=full")
    for name in ("cut", "perturbed"):
        run_train(cfg, "--set", f"train.run_name={name}")
        _cut_after_step_4(str(tmp_path / "runs" / name))
    full, cut, pert = (str(tmp_path / "runs" / n) for n in ("full", "cut", "perturbed"))
    ck = os.path.join(pert, "checkpoints", "step_0000004", "model.safetensors")
    state = load_file(ck)
    save_file({k: v + 1e-2 * (torch.arange(v.numel()).reshape(v.shape) % 3 - 1) for k, v in state.items()}, ck)

    seen = _count_training_steps(monkeypatch)
    run_train(cfg, "--set", "train.run_name=cut", "--resume")
    assert seen["opt_steps"] == 4, seen
    drawn = seen["batches"]
    assert drawn[:4] == [4, 5, 6, 7] and not {1, 2, 3} & set(drawn), drawn  # (step 0 may be drawn by checks)
    lf, lc = read_log(full), read_log(cut)
    assert [int(r["step"]) for r in lc] == list(range(1, 9))
    assert lc == lf  # same text: rows 1-4 kept from before the kill, rows 5-8 bitwise the same values
    a = torch.load(os.path.join(full, "model.pt"))
    b = torch.load(os.path.join(cut, "model.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    run_train(cfg, "--set", "train.run_name=perturbed", "--resume")
    p = torch.load(os.path.join(pert, "model.pt"))
    assert any(not torch.allclose(a[k], p[k], rtol=0, atol=1e-3) for k in a)
    assert [r["loss"] for r in read_log(pert)[4:]] != [r["loss"] for r in lf[4:]]


def test_killed_checkpoint_save_keeps_previous_latest(tmp_path):
    from util.training import _save_checkpoint

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def __init__(self, fail):
            self.fail = fail

        def save_state(self, path):
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "model.safetensors"), "w").write("partial")
            if self.fail:
                raise KeyboardInterrupt("killed during save")

    rd = str(tmp_path / "run")
    os.makedirs(rd)
    _save_checkpoint(Acc(False), rd, 5, keep=3, extra={})
    assert latest_checkpoint(rd).endswith("step_0000005")
    with pytest.raises(KeyboardInterrupt):
        _save_checkpoint(Acc(True), rd, 10, keep=3, extra={})
    assert latest_checkpoint(rd).endswith("step_0000005")
    assert not os.path.isdir(os.path.join(rd, "checkpoints", "step_0000010"))


class _FakeAccelerator:
    """Just enough of an Accelerator for _save_checkpoint: save_state writes a file naming the step."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "model.safetensors"), "w").write(os.path.basename(path))


def _steps_on_disk(rd):
    from util.checkpoints import checkpoint_dirs

    return [s for s, _ in checkpoint_dirs(rd)]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_checkpoint_rotation_keeps_exactly_the_newest(tmp_path, keep):
    """After every save exactly the ``keep`` highest steps remain (ordered by step number, not by name: 9 < 10
    < 100), ``latest`` names the one just written, each kept checkpoint still holds its own files, and no
    temporary folder is left behind."""
    from util.training import _save_checkpoint

    rd = str(tmp_path / "run")
    os.makedirs(rd)
    saved = [3, 9, 10, 100, 1000, 12345678]
    for i, step in enumerate(saved):
        _save_checkpoint(_FakeAccelerator(), rd, step, keep=keep, extra={})
        assert _steps_on_disk(rd) == saved[max(0, i + 1 - keep):i + 1]
        assert latest_checkpoint(rd) == os.path.join(rd, "checkpoints", f"step_{step:07d}")
        for s in _steps_on_disk(rd):
            ck = os.path.join(rd, "checkpoints", f"step_{s:07d}")
            assert open(os.path.join(ck, "model.safetensors")).read() == f".tmp_step_{s:07d}"
            assert json.load(open(os.path.join(ck, "trainer_state.json")))["step"] == s
    assert sorted(os.listdir(os.path.join(rd, "checkpoints"))) == \
        sorted([f"step_{s:07d}" for s in saved[-keep:]] + ["latest"])


def test_checkpoint_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    from util.training import _save_checkpoint

    rd = str(tmp_path / "run")
    os.makedirs(rd)
    _save_checkpoint(_FakeAccelerator(), rd, 4, keep=1, extra={})
    # a kill after step_0000008 was renamed into place but before 'latest' was repointed: the run resumes from 4
    stale = os.path.join(rd, "checkpoints", "step_0000008")
    os.makedirs(stale)
    open(os.path.join(stale, "trainer_state.json"), "w").write('{"step": 8}')
    assert latest_checkpoint(rd).endswith("step_0000004")
    _save_checkpoint(_FakeAccelerator(), rd, 6, keep=1, extra={})  # the resumed run's next checkpoint
    assert latest_checkpoint(rd) == os.path.join(rd, "checkpoints", "step_0000006")
    assert 4 not in _steps_on_disk(rd)


def test_test_py_end_to_end_and_predict(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    run_train(cfg)
    from util.run_dir import run_dir_of

    rd = run_dir_of(load_config(cfg, 0))
    from test import main as test_main

    test_main(["--run", rd, "--no_progress", "--dump_members", "7"])
    out = capsys.readouterr().out
    assert "model" in out and "idw" in out.lower()
    with open(os.path.join(rd, "eval", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0])
    for c in ("predictor", "split", "resolution", "rel_l2", "psnr_dataset", "psnr_member_mean", "ssim", "md",
              "bake_s", "infer_s"):
        assert c in cols, c
    preds = {(r["predictor"], r["split"]) for r in rows}
    assert ("model", "test") in preds and ("model", "train") in preds
    assert sum(1 for p, s in preds if s == "test" and p != "model") == 3  # mean, nearest, idw
    with open(os.path.join(rd, "eval", "members.csv")) as f:
        mrows = list(csv.DictReader(f))
    assert len([r for r in mrows if r["predictor"] == "model"]) == 9  # 6 train + 3 test members
    dumps = os.listdir(os.path.join(rd, "eval", "dumps"))
    assert any(d.endswith("_pred.vti") for d in dumps) and any(d.endswith(".png") for d in dumps)
    # results are not silently replaced
    with pytest.raises(SystemExit, match="already"):
        test_main(["--run", rd, "--no_progress"])

    # query in the simulation's own units
    from tasks.ensemble.surrogate import Surrogate

    s = Surrogate.load(rd)
    assert s.param_names and len(s.param_names) == s.meta["cond_dim"]
    mid = {n: (lo + hi) / 2 for n, lo, hi in zip(s.param_names, s.meta["param_min"], s.meta["param_max"])}
    f = s.predict(mid, resolution=5)
    assert f.shape == (5, 5, 5) and np.isfinite(f).all()
    lo, hi = s.meta["value_min"], s.meta["value_max"]
    assert f.min() >= lo - 1e-3 * abs(hi - lo) - 1e-6 and f.max() <= hi + 1e-3 * abs(hi - lo) + 1e-6
    pts = s.predict(mid, index_coords=np.array([[0, 0, 0], [7, 7, 7]]))
    grid = s.predict(mid)
    np.testing.assert_allclose(pts, [grid[0, 0, 0], grid[-1, -1, -1]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        s.predict({"nope": 1.0})
    with pytest.raises(ValueError, match="expected"):
        s.predict([0.1])
    bad = dict(mid)
    name = s.param_names[0]
    bad[name] = s.meta["param_max"][0] + 10 * (s.meta["param_max"][0] - s.meta["param_min"][0])
    with _warns(name):
        s.predict(bad, resolution=2)


class _warns:
    """Context manager asserting that the 'predict' logger warns and names ``text``."""

    def __init__(self, text):
        self.text = text

    def __enter__(self):
        import logging

        self.records = []
        self.h = logging.Handler()
        self.h.emit = self.records.append
        logging.getLogger("predict").addHandler(self.h)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("predict").removeHandler(self.h)
        msgs = [r.getMessage() for r in self.records if r.levelname == "WARNING"]
        assert any(self.text in m and "outside the training range" in m for m in msgs), msgs
        return False


def test_predict_cli(tmp_path):
    cfg = tiny_config(tmp_path)
    run_train(cfg)
    from util.run_dir import run_dir_of

    rd = run_dir_of(load_config(cfg, 0))
    meta = json.load(open(os.path.join(rd, "meta.json")))
    args = [sys.executable, "predict.py", "--run", rd, "--resolution", "4", "--out", str(tmp_path / "f.npy"), "--vti"]
    for n, lo, hi in zip(meta["param_names"], meta["param_min"], meta["param_max"]):
        args += ["--param", f"{n}={(lo + hi) / 2}"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "f.npy").shape == (4, 4, 4)
    assert os.path.isfile(tmp_path / "f.vti")
    r = subprocess.run([sys.executable, "predict.py", "--run", rd, "--param", "wrong=1", "--out",
                        str(tmp_path / "g.npy")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown" in r.stderr


def test_log_csv_records_the_learning_rate_each_step_used(tmp_path):
    """Warm-up over 4 steps at lr 1e-3: step s (1-based) trains with 1e-3 * s / 4; log.csv row s says so."""
    p = tiny_config(tmp_path)
    exp = yaml.safe_load(open(p))
    exp[0]["scheduler"] = dict(type="constant", warmup_steps=4)
    open(p, "w").write(yaml.safe_dump(exp))
    run_train(p)
    from util.run_dir import run_dir_of

    rows = read_log(run_dir_of(load_config(p, 0)))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_meta_records_cpu_features_and_bf16_trains_through_the_fused_paths(tmp_path, monkeypatch):
    """meta.json names the CPU's bf16 support (util/cpu.py) and the precision; train.mixed_precision bf16 on CPU
    trains through DRR-Net's fused CPU paths with bf16 products (not the autograd fall-back) to finite losses."""
    from models import fast_ops
    from util.cpu import tune_malloc
    from util.run_dir import run_dir_of

    calls = {"vp": 0, "lp": 0}
    real_vp = fast_ops.VertexPipeline.apply

    def vp(*a):                 # VertexPipeline.apply(u, coeff, include_input, eps, chunk, n_blocks, keep, lowp, ...)
        calls["vp"] += 1
        calls["lp"] += a[7] is torch.bfloat16
        return real_vp(*a)
    monkeypatch.setattr(fast_ops.VertexPipeline, "apply", vp)
    runs = {}
    for prec in ("auto", "bf16"):
        (tmp_path / prec).mkdir()
        cfg = tiny_config(tmp_path / prec, mixed_precision=prec)
        run_train(cfg)
        runs[prec] = run_dir_of(load_config(cfg, 0))
        meta = json.load(open(os.path.join(runs[prec], "meta.json")))
        assert meta["cpu_features"]["bf16"] in ("amx_bf16", "avx512_bf16", "none", "unknown")
        assert meta["precision"] == ("fp32" if prec == "auto" else "bf16")
        assert meta["malloc"] == tune_malloc()                # the allocator's setting, one line
        assert all(np.isfinite(float(r["loss"])) for r in read_log(runs[prec]))
        if prec == "auto":
            assert calls["vp"] > 0 and calls["lp"] == 0          # fp32: the fused paths, no bf16 product
            calls.update(vp=0)
    assert calls["vp"] > 0 and calls["lp"] > 0
