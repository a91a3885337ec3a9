"""start_jobs.py from another working directory resolves configs, train.log_dir and data paths as train.py does
there, and recognizes the finished runs; its config errors are one line (issue 11)."""
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "start_jobs.py")

TINY = dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
            spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
            cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)


def start_jobs(cwd, *args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # subprocesses that train (see pytest.ini)
def test_jobs_run_in_the_callers_folder(tmp_path):
    exp = dict(model=TINY,
               dataset=dict(type="demo", root="demo", n_train=4, n_test=2, resolution=6, cond_batch=2,
                            spatial_log2batch=5),
               train=dict(max_steps=2, log_dir="runs", run_name="cwdjob", timing_steps=1))
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump([exp]))
    r = start_jobs(tmp_path, "jobs.yaml:0", "--no_test", "--gpus", "", "--poll", "0.2", "--log_dir", "logs")
    assert r.returncode == 0, r.stdout + r.stderr + "".join(
        open(os.path.join(tmp_path, "logs", f)).read() for f in os.listdir(tmp_path / "logs"))
    assert (tmp_path / "runs" / "cwdjob" / "finished.json").is_file()  # relative log_dir: the caller's folder
    assert (tmp_path / "demo").is_dir()  # relative data path too
    assert not os.path.exists(os.path.join(ROOT, "runs", "cwdjob"))
    assert (tmp_path / "logs" / "cwdjob.log").is_file()
    r = start_jobs(tmp_path, "jobs.yaml:0", "--no_test", "--gpus", "", "--log_dir", "logs")
    assert r.returncode == 0 and "skipped" in r.stdout.split("summary:")[1], r.stdout
    r = start_jobs(tmp_path, "jobs.yaml:0", "--no_test", "--dry-run")
    assert r.stdout.startswith("# skip (finished)")


def test_config_errors_are_one_line(tmp_path):
    r = start_jobs(tmp_path, "missing.yaml:0", "--dry-run")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and "missing.yaml" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "bad.yaml").write_text("- model: {type: drrnet}\n  model: {type: kplanes}\n  dataset: {type: demo}\n")
    r = start_jobs(tmp_path, "bad.yaml", "--dry-run")
    assert "Traceback" not in r.stderr and "duplicate key 'model'" in r.stderr, r.stderr
    r = start_jobs(tmp_path, "--jobs_file", "nope.yaml", "--dry-run")
    assert "Traceback" not in r.stderr and "nope.yaml" in r.stderr
