"""Run-directory safety of train.py (issue 11): --overwrite deletes nothing before the new config and data are
valid and never a folder that is not a run; one process per run directory (lock); damaged checkpoints are named
and skipped for the previous intact one (--resume, load_trained_model); config/data errors exit with one line."""
import json
import logging
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
import torch
import yaml

from util.errors import DataError
from util.build import load_trained_model
from util.checkpoints import newest_intact_checkpoint, verify_weights_file
from util.run_dir import LOCK_FILE, RunLock, RunLockedError

TINY = dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
            spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
            cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)


def config(tmp_path, dataset=None, **train):
    exp = dict(model=TINY,
               dataset=dataset or dict(type="demo", root=str(tmp_path / "demo"), n_train=4, n_test=2, resolution=6,
                                       cond_batch=2, spatial_log2batch=5),
               optim=dict(type="adam", lr=1e-3),
               train=dict(dict(max_steps=6, log_dir=str(tmp_path / "runs"), run_name="r", checkpoint_every_steps=3,
                               keep_checkpoints=10, log_every=1, timing_steps=1), **train))
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump([exp]))
    return str(p)


def bad_data(tmp_path):
    """An ensemble dataset whose cond.npy is not an array (a ValueError inside the dataset)."""
    d = tmp_path / "bad"
    (d / "data").mkdir(parents=True, exist_ok=True)
    np.save(d / "data" / "m0.npy", np.zeros((4, 4, 4), np.float32))
    (d / "cond.npy").write_bytes(b"garbage, not numpy")
    np.save(d / "split.npy", {"cond_idx": [0], "cond_idx_unseen": [0]}, allow_pickle=True)
    return dict(type="ensemble", data_dir=str(d / "data"), cond_path=str(d / "cond.npy"),
                cond_split_path=str(d / "split.npy"))


def train_main(cfg, *extra):
    from train import main

    main(["--config", cfg, "--no_progress", *extra])


def exit_message(excinfo) -> str:
    msg = str(excinfo.value.code)
    assert msg.startswith(("error:", "config error:")) and "\n" not in msg, msg
    return msg


def fake_old_run(path, extra=()):
    """A run directory as train.py leaves it: meta.json with the run marker, and a few files."""
    from util.run_dir import RUN_MARKER_KEY

    os.makedirs(path)
    for name in ("config.yaml", "finished.json", "model.pt", *extra):
        with open(os.path.join(path, name), "w") as f:
            f.write("old")
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({RUN_MARKER_KEY: 1}, f)


# ------------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_with_bad_data_keeps_the_old_run(tmp_path):
    """Today a typo in data_dir with --overwrite empties the old run before the data is read."""
    rd = tmp_path / "runs" / "r"
    fake_old_run(rd)
    for ds in (dict(bad_data(tmp_path), data_dir=str(tmp_path / "typo")), bad_data(tmp_path)):
        cfg = config(tmp_path, dataset=ds)
        with pytest.raises(SystemExit) as e:
            train_main(cfg, "--overwrite")
        msg = exit_message(e)
        assert "cond.npy" in msg or "typo" in msg
        assert sorted(os.listdir(rd)) == ["config.yaml", "finished.json", "meta.json", "model.pt"]  # nothing deleted
        assert (rd / "model.pt").read_text() == "old"


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    notes = tmp_path / "runs" / "r"
    notes.mkdir(parents=True)
    (notes / "important.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        train_main(config(tmp_path), "--overwrite")
    msg = exit_message(e)
    assert "does not look like a run directory" in msg and "important.txt" in msg
    assert (notes / "important.txt").read_text() == "keep me" and os.listdir(notes) == ["important.txt"]


def test_run_name_dot_cannot_delete_the_log_dir(tmp_path):
    """run_name=. named log_dir itself: --overwrite deleted every run in it."""
    for name in ("a", "b"):
        fake_old_run(tmp_path / "runs" / name)
    for bad in (".", "..", "x/y", "''"):
        with pytest.raises(SystemExit) as e:
            train_main(config(tmp_path), "--overwrite", "--set", f"train.run_name={bad}")
        assert "train.run_name" in exit_message(e)
    assert sorted(os.listdir(tmp_path / "runs")) == ["a", "b"]
    assert all(len(os.listdir(tmp_path / "runs" / n)) == 4 for n in ("a", "b"))


def test_overwrite_clears_after_validation_and_takes_over_a_stale_lock(tmp_path, caplog):
    """Valid config and data: the old contents go, the new run is complete, the lock is gone at the end. A lock
    left by a dead process on this host is taken over with a warning."""
    rd = tmp_path / "runs" / "r"
    fake_old_run(rd, extra=("stale.txt",))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (rd / LOCK_FILE).write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname(), started="earlier")))
    with caplog.at_level(logging.WARNING):
        train_main(config(tmp_path), "--overwrite")
    assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage() for r in caplog.records)
    names = set(os.listdir(rd))
    assert "stale.txt" not in names and LOCK_FILE not in names
    assert {"config.yaml", "finished.json", "model.pt", "checkpoints", "log.csv"} <= names
    assert torch.load(rd / "model.pt")  # the new weights, not the old text


# ------------------------------------------------------------------------------------------------ locking
def test_a_run_in_use_is_refused(tmp_path):
    """A second train.py on a run that a live process trains into stops with a message naming the holder, and
    touches nothing."""
    rd = tmp_path / "runs" / "r"
    rd.mkdir(parents=True)
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock = json.dumps(dict(pid=live.pid, host=socket.gethostname(), started="now"))
        (rd / LOCK_FILE).write_text(lock)
        for extra in ((), ("--overwrite",), ("--resume",)):
            with pytest.raises(SystemExit) as e:
                train_main(config(tmp_path), *extra)
            msg = exit_message(e)
            assert "in use" in msg and f"process {live.pid}" in msg and LOCK_FILE in msg
            assert (rd / LOCK_FILE).read_text() == lock and os.listdir(rd) == [LOCK_FILE]
    finally:
        live.kill()
        live.wait()
    # a lock from another host cannot be checked: refused too
    (rd / LOCK_FILE).write_text(json.dumps(dict(pid=1, host="elsewhere-" + socket.gethostname())))
    with pytest.raises(SystemExit, match="host 'elsewhere-"):
        train_main(config(tmp_path))


def test_run_lock_in_process_and_release(tmp_path):
    rd = str(tmp_path / "runs" / "r")
    first = RunLock(rd).acquire()
    info = json.load(open(os.path.join(rd, LOCK_FILE)))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(RunLockedError, match="in use"):
        RunLock(rd).acquire()  # our own pid, but held: not stale
    first.release()
    assert not os.path.exists(rd)  # created by the lock and still empty: removed
    with RunLock(rd):
        assert os.path.isfile(os.path.join(rd, LOCK_FILE))
    # a lock file with our pid that this process does not hold (a reused pid after a crash) is stale
    os.makedirs(rd)
    with open(os.path.join(rd, LOCK_FILE), "w") as f:
        json.dump(dict(pid=os.getpid(), host=socket.gethostname()), f)
    with RunLock(rd) as lk:
        assert lk.held
    assert os.listdir(rd) == []


def test_lock_released_and_new_folder_removed_on_error(tmp_path):
    """A new run whose data fails validation leaves no folder and no lock behind."""
    with pytest.raises(SystemExit) as e:
        train_main(config(tmp_path, dataset=bad_data(tmp_path)))
    assert "cond.npy" in exit_message(e)
    assert not (tmp_path / "runs" / "r").exists()


def test_data_error_traceback_option(tmp_path):
    with pytest.raises(ValueError, match="cond"):
        train_main(config(tmp_path, dataset=bad_data(tmp_path)), "--traceback")


# ------------------------------------------------------------------------------------------------ checkpoints
def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def test_damaged_checkpoints_fall_back_to_the_previous_intact_one(tmp_path, caplog):
    """--resume from a run whose newest checkpoint has a truncated model.safetensors resumes from the previous one,
    reruns the steps after it and ends with the same weights as the uninterrupted run; load_trained_model skips a
    truncated model.pt / checkpoint with a warning naming the file."""
    cfg = config(tmp_path)
    train_main(cfg)
    rd = tmp_path / "runs" / "r"
    ck3, ck6 = (str(rd / "checkpoints" / f"step_000000{s}") for s in (3, 6))
    final = torch.load(rd / "model.pt")
    saved = {p: open(p, "rb").read() for p in (str(rd / "model.pt"), ck6 + "/model.safetensors",
                                               ck6 + "/trainer_state.json")}

    # load_trained_model: model.pt truncated -> newest intact checkpoint (step 6, same weights)
    truncate(rd / "model.pt")
    with caplog.at_level(logging.WARNING):
        model, _, _ = load_trained_model(str(rd))
    assert any("model.pt" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert model.weights_path == ck6
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k
    # ... and step 6's weights truncated as well -> step 3
    truncate(ck6 + "/model.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, _, _ = load_trained_model(str(rd))
    assert model.weights_path == ck3
    assert any("step_0000006/model.safetensors" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="step_0000006/model.safetensors"):
        load_trained_model(str(rd), checkpoint=ck6)  # asked for by name: no fallback, the file is named
    assert newest_intact_checkpoint(str(rd)) == ck3

    # --resume falls back to step 3 and reproduces the uninterrupted run
    os.remove(rd / "finished.json")
    os.remove(rd / "model.pt")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_main(cfg, "--resume")
    assert any("step_0000006/model.safetensors" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    assert any("resumed from" in r.getMessage() and "step_0000003" in r.getMessage() for r in caplog.records)
    resumed = torch.load(rd / "model.pt")
    for k in final:
        assert torch.equal(resumed[k], final[k]), k
    assert [int(r.split(",")[0]) for r in open(rd / "log.csv").read().split()[1:]] == [1, 2, 3, 4, 5, 6]

    # a truncated trainer_state.json is damage too
    truncate(ck6 + "/trainer_state.json", keep=0.3)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert newest_intact_checkpoint(str(rd)) == ck3
    assert any("step_0000006/trainer_state.json" in r.getMessage() for r in caplog.records)
    # every checkpoint damaged: --resume exits with one line naming them
    truncate(ck3 + "/model.safetensors")
    with pytest.raises(SystemExit) as e:
        train_main(cfg, "--resume")
    msg = exit_message(e)
    assert "step_0000003/model.safetensors" in msg and "step_0000006/trainer_state.json" in msg
    for p, data in saved.items():  # restore, to be sure the damage was what made the difference
        open(p, "wb").write(data)
    assert newest_intact_checkpoint(str(rd)) in (ck6, ck3)


def test_verify_weights_file_names_truncated_files(tmp_path):
    p = str(tmp_path / "pytorch_model.bin")
    torch.save({"w": torch.arange(1000.0)}, p)
    verify_weights_file(p)
    for keep in (0.9, 0.5, 0.01):
        q = str(tmp_path / f"cut_{keep}.bin")
        shutil.copy(p, q)
        truncate(q, keep)
        with pytest.raises(DataError, match=f"cut_{keep}.bin"):
            verify_weights_file(q)
    from safetensors.torch import save_file

    s = str(tmp_path / "model.safetensors")
    save_file({"w": torch.arange(1000.0)}, s)
    verify_weights_file(s)
    truncate(s, 0.99)
    with pytest.raises(DataError, match="model.safetensors: truncated"):
        verify_weights_file(s)
