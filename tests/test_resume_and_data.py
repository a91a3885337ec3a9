"""Nothing silently wrong (issue 21): --overwrite deletes only folders train.py wrote; --resume compares the run's
config and data with the new ones (safe changes recorded, others refused or forced with --resume_changed); a
max_steps below the checkpoint's step is refused; test.py checks the data against the fingerprint stored at
training and records the machine; timing_steps 0 says so; start_jobs removes the empty run folder a failed job
left."""
import argparse
import csv
import json
import logging
import os

import numpy as np
import pytest
import yaml

from tests.test_demo import all_files  # bytes of every file of a folder (to show that nothing was written)
from tests.test_run_safety import TINY


def config(tmp_path, **train):
    exp = dict(model=TINY,
               dataset=dict(type="demo", root=str(tmp_path / "demo"), n_train=4, n_test=2, resolution=6,
                            cond_batch=2, spatial_log2batch=5),
               optim=dict(type="adam", lr=1e-3),
               train=dict(dict(max_steps=6, log_dir=str(tmp_path / "runs"), run_name="r", checkpoint_every_steps=3,
                               keep_checkpoints=10, log_every=1, timing_steps=1), **train),
               test=dict(splits=["test"], resolutions=["full"], ssim_win_size=3, ref_k=2))
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump([exp]))
    return str(p)


def train_main(cfg, *extra):
    from train import main

    main(["--config", cfg, "--no_progress", *extra])


def test_main(*args):
    from test import main

    main(["--no_progress", *args])


test_main.__test__ = False  # a helper, not a test


def one_line_exit(excinfo) -> str:
    msg = str(excinfo.value.code)
    assert msg.startswith(("error:", "config error:")) and "\n" not in msg, msg
    return msg


def meta_of(rd):
    return json.load(open(os.path.join(rd, "meta.json")))


@pytest.fixture
def trained(tmp_path):
    """A finished 6-step run (checkpoints at steps 3 and 6)."""
    cfg = config(tmp_path)
    train_main(cfg)
    return cfg, str(tmp_path / "runs" / "r")


# ------------------------------------------------------------------------------------------------ item 1
def test_overwrite_refuses_a_folder_that_merely_holds_a_config_yaml(tmp_path):
    """A user's project folder named as the run (config.yaml, notes) was deleted by --overwrite."""
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("my: project\n")
    (folder / "notes.txt").write_text("keep me")
    (folder / "meta.json").write_text(json.dumps({"author": "me"}))  # a meta.json without the run marker
    with pytest.raises(SystemExit) as e:
        train_main(config(tmp_path), "--overwrite")
    msg = one_line_exit(e)
    assert str(folder) in msg and "refusing to delete" in msg
    assert sorted(os.listdir(folder)) == ["config.yaml", "meta.json", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_a_run_carries_the_marker_and_overwrite_deletes_it(trained):
    from util.run_dir import RUN_MARKER_KEY, looks_like_run_dir

    cfg, rd = trained
    assert RUN_MARKER_KEY in meta_of(rd) and looks_like_run_dir(rd)
    open(os.path.join(rd, "stale.txt"), "w").write("old")
    train_main(cfg, "--overwrite")
    assert not os.path.exists(os.path.join(rd, "stale.txt")) and os.path.isfile(os.path.join(rd, "finished.json"))


# ------------------------------------------------------------------------------------------------ item 3
def test_resume_with_a_changed_config_is_refused_naming_the_keys(trained):
    cfg, rd = trained
    os.remove(os.path.join(rd, "finished.json"))
    before = all_files(rd)
    with pytest.raises(SystemExit) as e:
        train_main(cfg, "--resume", "--set", "optim.lr=0.01", "--set", "train.seed=5")
    msg = one_line_exit(e)
    assert "optim.lr 0.001 -> 0.01" in msg and "train.seed 0 -> 5" in msg and "--resume_changed" in msg
    assert all_files(rd) == before  # config.yaml / meta.json not rewritten


def test_resume_with_safe_changes_is_recorded(trained):
    cfg, rd = trained
    train_main(cfg, "--resume", "--set", "train.max_steps=7", "--set", "train.log_every=2")
    meta = meta_of(rd)
    assert len(meta["resumes"]) == 1
    rec = meta["resumes"][0]
    assert rec["step"] == 6 and rec["checkpoint"] == "step_0000006" and rec["resume_changed"] is False
    assert rec["changed"] == {"train.max_steps": [6, 7], "train.log_every": [1, 2]}
    assert json.load(open(os.path.join(rd, "finished.json")))["steps"] == 7
    # an identical resume (the config now stored) resumes and is recorded without changes
    train_main(cfg, "--resume", "--set", "train.max_steps=7", "--set", "train.log_every=2")
    assert [r["changed"] for r in meta_of(rd)["resumes"]] == [rec["changed"], {}]


def test_resume_changed_resumes_and_records(trained, caplog):
    cfg, rd = trained
    with caplog.at_level(logging.WARNING):
        train_main(cfg, "--resume_changed", "--set", "optim.lr=0.01", "--set", "train.max_steps=7")
    rec = meta_of(rd)["resumes"][-1]
    assert rec["resume_changed"] is True and rec["changed"]["optim.lr"] == [0.001, 0.01]
    assert any("--resume_changed" in m and "optim.lr" in m for m in caplog.messages)


def test_resume_with_another_model_says_so_in_one_line(trained):
    cfg, rd = trained
    with pytest.raises(SystemExit) as e:
        train_main(cfg, "--resume", "--set", "model.hidden_dim=32")
    msg = one_line_exit(e)
    assert "model config differs" in msg and "model.hidden_dim 16 -> 32" in msg
    with pytest.raises(SystemExit) as e:
        train_main(cfg, "--resume_changed", "--set", "model.hidden_dim=32")
    msg = one_line_exit(e)
    assert "model config differs" in msg and "does not fit the new model" in msg and "shape" in msg


# ------------------------------------------------------------------------------------------------ item 4
def test_resume_with_max_steps_below_the_checkpoint_is_refused(trained):
    cfg, rd = trained
    os.remove(os.path.join(rd, "finished.json"))  # e.g. killed after the last checkpoint
    before = all_files(rd)
    for flag in ("--resume", "--resume_changed"):
        with pytest.raises(SystemExit) as e:
            train_main(cfg, flag, "--set", "train.max_steps=3")
        msg = one_line_exit(e)
        assert "step 3" in msg and "step_0000006" in msg and "max_steps >= 6" in msg
        assert all_files(rd) == before  # no model.pt / finished.json labelled step 3


# ------------------------------------------------------------------------------------------------ item 5
def test_test_py_refuses_changed_data_unless_allowed_and_records_machine(trained, caplog):
    cfg, rd = trained
    fp = meta_of(rd)["data_fingerprint"]
    assert fp["facts"]["n_train"] == 4 and "value_max" in fp["facts"]
    assert "data/member_0005.npy" in fp["files"] and "cond.npy" in fp["files"]
    # unchanged data: scored, the check recorded
    test_main("--run", rd)
    rows = list(csv.DictReader(open(os.path.join(rd, "eval", "metrics.csv"))))
    assert rows and all(r["data_fingerprint"] == "same" for r in rows)
    # a test member scaled by 10 (same size, same value range of the training members)
    member = str(os.path.dirname(cfg)) + "/demo/data/member_0005.npy"
    np.save(member, np.load(member) * 10)
    with pytest.raises(SystemExit) as e:
        test_main("--run", rd, "--out_name", "eval2")
    msg = str(e.value.code)
    assert "changed since training" in msg and "data/member_0005.npy" in msg and "--allow_changed_data" in msg
    assert not os.path.exists(os.path.join(rd, "eval2", "metrics.csv"))
    test_main("--run", rd, "--out_name", "eval2", "--allow_changed_data")
    rows = list(csv.DictReader(open(os.path.join(rd, "eval2", "metrics.csv"))))
    assert all(r["data_fingerprint"].startswith("CHANGED") and "member_0005.npy" in r["data_fingerprint"]
               for r in rows)
    # --resume notices it too
    with pytest.raises(SystemExit) as e:
        train_main(cfg, "--resume", "--set", "train.max_steps=7")
    assert "member_0005.npy" in one_line_exit(e)
    # a run trained before fingerprints: scored with a one-line warning
    meta = meta_of(rd)
    del meta["data_fingerprint"]
    open(os.path.join(rd, "meta.json"), "w").write(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        test_main("--run", rd, "--out_name", "eval3")
    assert any("before data fingerprints" in m for m in caplog.messages)
    rows = list(csv.DictReader(open(os.path.join(rd, "eval3", "metrics.csv"))))
    assert all(r["data_fingerprint"] == "not stored" for r in rows)


def test_metrics_record_the_cpu_model_and_thread_count(trained):
    """Numbers a user can reproduce: the machine that scored is in every metrics row."""
    import torch

    from util.cpu import cpu_model

    _, rd = trained
    test_main("--run", rd)
    rows = list(csv.DictReader(open(os.path.join(rd, "eval", "metrics.csv"))))
    assert rows and all(r["cpu"] == cpu_model() and r["cpu"] and int(r["threads"]) == torch.get_num_threads()
                        for r in rows)


def test_fingerprint_comparison_names_facts_and_files():
    from util.fingerprint import compare_fingerprints

    a = {"facts": {"value_max": 1.0, "n_train": 4, "mean": 0.5}, "files": {"x.npy": [8, "aa"], "y.npy": [8, "bb"]}}
    b = {"facts": {"value_max": 10.0, "n_train": 4, "mean": 0.5 * (1 + 1e-9)},
         "files": {"x.npy": [8, "cc"], "z.npy": [8, "dd"]}}
    diff = compare_fingerprints(a, b)
    assert diff == ["value_max 1.0 -> 10.0", "files changed: x.npy", "files missing: y.npy", "files added: z.npy"]
    assert compare_fingerprints(a, a) == [] and compare_fingerprints(None, b) == []


# ------------------------------------------------------------------------------------------------ messages
def test_timing_steps_zero_says_no_timing_json(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train_main(config(tmp_path, timing_steps=0, max_steps=2))
    assert any("timing_steps is 0" in m and "no timing.json" in m for m in caplog.messages)
    assert not os.path.exists(tmp_path / "runs" / "r" / "timing.json")


def test_start_jobs_removes_the_empty_run_folder_a_failed_job_left(tmp_path, monkeypatch, capsys):
    import start_jobs

    made, kept, full = (str(tmp_path / "runs" / n) for n in ("made", "kept", "full"))
    os.makedirs(kept)  # existed before its job: never removed
    cmds = {made: [["mkdir", "-p", made], ["false"]], kept: [["false"]],
            full: [["mkdir", "-p", full], ["touch", os.path.join(full, "x")], ["false"]]}
    monkeypatch.setattr(start_jobs, "job_commands", lambda job, args: cmds[job.run_dir])
    jobs = []
    for d in (made, kept, full):
        jobs.append(start_jobs.Job("cfg.yaml", 0, run_dir=d, log_path=str(tmp_path / (os.path.basename(d) + ".log"))))
    args = argparse.Namespace(gpus="", poll=0.05)
    assert start_jobs.run(jobs, args) == 1
    assert [j.status for j in jobs] == ["failed(1)"] * 3
    assert not os.path.exists(made)
    assert os.path.isdir(kept) and os.listdir(full) == ["x"]
    assert "removed the empty run folder" in capsys.readouterr().out
