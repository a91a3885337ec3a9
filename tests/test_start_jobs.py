"""start_jobs.py: dry run, a few tiny jobs (one failing), skipping finished runs, exit-code summary."""
import os
import subprocess
import sys

import pytest
import yaml

from tests.test_train import TINY_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jobs_config(tmp_path):
    good = dict(model=TINY_MODEL,
                dataset=dict(type="demo", root=str(tmp_path / "demo"), n_train=4, n_test=2, resolution=6,
                             cond_batch=2, spatial_log2batch=5),
                train=dict(max_steps=2, log_dir=str(tmp_path / "runs"), timing_steps=1),
                test=dict(splits=["test"], ssim_win_size=3, ref_k=2))
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["dataset"] = dict(type="ensemble", data_dir=str(tmp_path / "missing"), cond_path=str(tmp_path / "c.npy"),
                          cond_split_path=str(tmp_path / "s.npy"))
    good2 = yaml.safe_load(yaml.safe_dump(good))
    good2["name"] = "second"
    p = tmp_path / "jobs.yaml"
    p.write_text(yaml.safe_dump([good, bad, good2]))
    return str(p)


def run(args, **kw):
    return subprocess.run([sys.executable, "start_jobs.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


def test_dry_run_prints_commands(tmp_path):
    cfg = write_jobs_config(tmp_path)
    r = run([f"{cfg}:0,2", "--dry-run", "--set", "train.seed=3"])
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 4  # train + test for two jobs
    assert sum("train.py" in l for l in lines) == 2 and sum("test.py" in l for l in lines) == 2
    assert all("train.seed=3" in l for l in lines)
    assert not os.path.exists(tmp_path / "runs")  # nothing ran
    r = run([f"{cfg}:7", "--dry-run"])
    assert r.returncode != 0 and "out of range" in r.stderr


@pytest.mark.slow  # subprocesses that train (see pytest.ini)
def test_jobs_run_fail_and_skip(tmp_path):
    cfg = write_jobs_config(tmp_path)
    logs = str(tmp_path / "logs")
    r = run([cfg, "--log_dir", logs, "--gpus", "", "--poll", "0.2"])
    assert r.returncode == 1, r.stdout + r.stderr  # one job failed
    summary = r.stdout.split("summary:")[1]
    assert summary.count("ok") == 2 and "failed(" in summary
    assert len(os.listdir(logs)) == 3
    failed_log = [f for f in os.listdir(logs) if "jobs_1" in f][0]
    assert "missing" in open(os.path.join(logs, failed_log)).read()
    from util.config import load_config
    from util.run_dir import run_dir_of

    for i in (0, 2):
        assert os.path.isfile(os.path.join(run_dir_of(load_config(cfg, i)), "eval", "metrics.csv"))
    assert os.path.basename(run_dir_of(load_config(cfg, 2))) == "second"
    # finished jobs are skipped the second time
    r = run([f"{cfg}:0,2", "--log_dir", logs, "--gpus", ""])
    assert r.returncode == 0 and r.stdout.count("skipped") == 2
    r = run([f"{cfg}:0", "--dry-run"])
    assert "# skip (finished)" in r.stdout
