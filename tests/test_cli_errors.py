"""Issue 21 (items 5 predict part, 10-14, unclear messages): predict.py / test.py / train.py / start_jobs.py name the
offending file, value or tensor in one line, warn when the weights are not the final ones, and leave no output
file behind on an error; predict.py's normalization is the run's (meta.json), never the current data files'."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

import predict
import tasks.ensemble.surrogate
from models.base import FieldModel
from util.config import ConfigError, load_config

META = dict(param_names=["a", "b"], param_min=[0.0, 0.0], param_max=[1.0, 1.0], cond_dim=2,
            spatial_shape=[3, 4, 5], value_min=0.0, value_max=2.0, log_transform=False)


class XStub(FieldModel):
    def forward(self, x, c):  # (1, N, d), (1, d_c) -> (1, N, 1): clamped like a grid model (constant outside)
        return x[..., :1].clamp(-1, 1) * 0.1 + 0.5


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(tasks.ensemble.surrogate, "load_trained_model", lambda run, ckpt=None: (XStub(), {}, META))


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value.code)
    assert msg.startswith(("error:", "config error:")) and "\n" not in msg, msg
    return msg


def predict_points(tmp_path, points, *extra, flag="--coords"):
    p = tmp_path / "pts.npy"
    np.save(p, points)
    out = tmp_path / "o.npy"
    with pytest.raises(SystemExit) as e:
        predict.main(["--run", str(tmp_path), "--values", "0.5", "0.5", flag, str(p), "--out", str(out), *extra])
    assert not out.exists() and not any(n.startswith(".o.npy") for n in os.listdir(tmp_path))  # nothing left
    return one_line_error(e)


# ------------------------------------------------------------------------------- item 10 / unclear messages
def test_coordinates_outside_the_domain_are_an_error(tmp_path, stub):
    msg = predict_points(tmp_path, np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], np.float32))
    assert "outside" in msg and "[-1, 1]" in msg and "row 1" in msg
    msg = predict_points(tmp_path, np.array([[0, 0, 0], [2, 9, 1]], np.float64), flag="--index_coords")
    assert "outside the grid [3, 4, 5]" in msg and "row 1, axis 1 = 9" in msg and "[0, 3]" in msg


def test_nan_coordinates_are_an_error(tmp_path, stub):
    msg = predict_points(tmp_path, np.array([[0.0, np.nan, 0.0]], np.float32))
    assert "not finite" in msg and "row 0" in msg
    msg = predict_points(tmp_path, np.array([[0.0, 1.0, np.inf]]), flag="--index_coords")
    assert "not finite" in msg


def test_coords_with_resolution_is_an_error(tmp_path, stub):
    msg = predict_points(tmp_path, np.zeros((2, 3), np.float32), "--resolution", "4")
    assert "--resolution" in msg and "--coords" in msg
    s = tasks.ensemble.surrogate.Surrogate(XStub(), META)
    with pytest.raises(ValueError, match="resolution"):
        s.predict([0.5, 0.5], resolution=4, coords=np.zeros((2, 3)), normalized_params=True)


def test_empty_and_string_coordinates_name_the_problem(tmp_path, stub):
    assert "no points" in predict_points(tmp_path, np.zeros((0, 3), np.float32))
    msg = predict_points(tmp_path, np.array([["a", "b", "c"]]))
    assert "must hold numbers" in msg and "'a'" in msg


def test_valid_points_still_written(tmp_path, stub):
    p, out = tmp_path / "pts.npy", tmp_path / "o.npy"
    np.save(p, np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], np.float32))
    predict.main(["--run", str(tmp_path), "--values", "0.5", "0.5", "--coords", str(p), "--out", str(out)])
    np.testing.assert_allclose(np.load(out), [1.2, 0.8], atol=1e-6)


# ----------------------------------------------------------------------------------------------- item 12
def test_resolution_too_large_for_memory_is_refused(tmp_path, stub):
    out = tmp_path / "o.npy"
    with pytest.raises(SystemExit) as e:
        predict.main(["--run", str(tmp_path), "--values", "0.5", "0.5", "--resolution", "100000", "--out", str(out)])
    msg = one_line_error(e)
    assert "4000000000000000 bytes" in msg and "available memory" in msg and not out.exists()


def test_memory_check_uses_the_available_memory(tmp_path, stub, monkeypatch):
    monkeypatch.setattr(tasks.ensemble.surrogate, "available_memory", lambda: 1000)
    with pytest.raises(SystemExit, match=r"resolution \[8, 8, 8\].*2048 bytes.*\(1000 bytes"):
        predict.main(["--run", str(tmp_path), "--values", "0.5", "0.5", "--resolution", "8",
                      "--out", str(tmp_path / "o.npy")])
    monkeypatch.setattr(tasks.ensemble.surrogate, "available_memory", lambda: None)  # unknown: no check
    predict.main(["--run", str(tmp_path), "--values", "0.5", "0.5", "--resolution", "8",
                  "--out", str(tmp_path / "o.npy")])
    assert np.load(tmp_path / "o.npy").shape == (8, 8, 8)


# --------------------------------------------------------------------------------- a real tiny trained run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.test_train import tiny_config
    from train import main as train_main
    from util.run_dir import run_dir_of

    root = tmp_path_factory.mktemp("cli_errors")
    cfg = tiny_config(root)
    train_main(["--config", cfg, "--config_id", "0", "--no_progress"])
    return root, run_dir_of(load_config(cfg, 0))


def copy_run(trained, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(trained[1], dst)
    return dst


def warnings_of(caplog, run_dir, checkpoint=None):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="predict"):
        tasks.ensemble.surrogate.Surrogate.load(run_dir, checkpoint, "cpu")
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_unfinished_run_and_missing_model_pt_are_warned(trained, tmp_path, caplog):
    rd = copy_run(trained, tmp_path)
    assert warnings_of(caplog, rd) == []  # the final model.pt of a finished run: silent
    os.remove(os.path.join(rd, "model.pt"))
    (msg,) = warnings_of(caplog, rd)
    assert "model.pt" in msg and "missing" in msg and "step_0000006" in msg
    os.remove(os.path.join(rd, "finished.json"))
    (msg,) = warnings_of(caplog, rd)
    assert "has not finished" in msg and "step_0000006" in msg and "step 6 of 6" in msg


# ----------------------------------------------------------------------------------------------- item 11
@pytest.mark.parametrize("change", ["shape", "missing", "unexpected"])
def test_checkpoint_of_another_architecture_is_named(trained, tmp_path, change):
    import test as test_script

    rd = trained[1]
    state = torch.load(os.path.join(rd, "model.pt"), map_location="cpu")
    name = next(iter(state))
    if change == "shape":
        state[name] = torch.zeros(*state[name].shape, 2)
        expect = f"tensor '{name}' has shape {list(state[name].shape)} in the checkpoint"
    elif change == "missing":
        del state[name]
        expect = f"tensor '{name}' of the model is missing from the checkpoint"
    else:
        state["extra.weight"] = torch.zeros(2)
        expect = "the checkpoint holds tensor 'extra.weight'"
    ck = str(tmp_path / "other.pt")
    torch.save(state, ck)
    with pytest.raises(SystemExit) as e:
        predict.main(["--run", rd, "--values", "0.5", "0.5", "0.5", "0.5", "--normalized", "--checkpoint", ck,
                      "--out", str(tmp_path / "o.npy")])
    msg = one_line_error(e)
    assert "differs from the model of the run's config" in msg and expect in msg and ck in msg
    with pytest.raises(SystemExit) as e:
        test_script.main(["--run", rd, "--checkpoint", ck, "--out_dir", str(tmp_path / "ev"), "--no_progress"])
    assert expect in str(e.value.code) and "\n" not in str(e.value.code)


# ------------------------------------------------------------------------------------ item 5 (predict part)
def test_predict_uses_the_stored_normalization_not_the_data_files(trained, tmp_path):
    """The Surrogate's value normalization and parameter ranges come from meta.json: the same bits after the
    data files changed (a member scaled by 10) or vanished."""
    root, rd = trained
    s = tasks.ensemble.surrogate.Surrogate.load(rd, device="cpu")
    params = {k: (lo + hi) / 2 for k, lo, hi in zip(s.meta["param_names"], s.meta["param_min"], s.meta["param_max"])}
    before = s.predict(params)
    saved = tmp_path / "demo_saved"
    shutil.move(root / "demo", saved)  # the originals, put back untouched below (other tests use this run)
    shutil.copytree(saved, root / "demo")
    try:
        members = sorted((root / "demo" / "data").glob("member_*.npy"))
        assert members
        for f in members:
            np.save(f, np.load(f) * 10)
        cm = root / "demo" / "cond_meta.json"  # other parameter ranges
        d = json.loads(cm.read_text())
        cm.write_text(json.dumps(dict(d, min=[v - 1 for v in d["min"]])))
        assert np.array_equal(tasks.ensemble.surrogate.Surrogate.load(rd, device="cpu").predict(params), before)
        shutil.rmtree(root / "demo")
        assert np.array_equal(tasks.ensemble.surrogate.Surrogate.load(rd, device="cpu").predict(params), before)
    finally:
        shutil.rmtree(root / "demo", ignore_errors=True)
        shutil.move(saved, root / "demo")


# ---------------------------------------------------------------------------------------------- test.py
def test_out_dir_that_is_a_file_is_named(trained, tmp_path):
    import test as test_script

    f = tmp_path / "afile"
    f.write_text("keep")
    with pytest.raises(SystemExit) as e:
        test_script.main(["--run", trained[1], "--out_dir", str(f), "--no_progress"])
    msg = str(e.value.code)
    assert "--out_dir" in msg and str(f) in msg and "existing file" in msg and f.read_text() == "keep"


# ------------------------------------------------------------------------------------------ items 13, 14
def test_list_of_scalars_with_set_gives_the_same_error(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as plain:
        load_config(str(p), 0)
    with pytest.raises(ConfigError) as with_set:
        load_config(str(p), 0, ["train.max_steps=1"])
    assert str(with_set.value) == str(plain.value) and "must be a mapping" in str(plain.value)


def entry_points(cfg):
    import start_jobs
    import test as test_script
    import train

    return [lambda: train.main(["--config", cfg]), lambda: test_script.main(["--config", cfg]),
            lambda: start_jobs.main([f"{cfg}:0", "--dry-run"])]


def errors_of(cfg):
    out = []
    for call in entry_points(cfg):
        with pytest.raises(SystemExit) as e:
            call()
        out.append(one_line_error(e))
    return out


def test_non_utf8_config_names_file_and_byte(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"# caf\xe9\n- model: {type: drrnet}\n")
    for msg in errors_of(str(p)):
        assert str(p) in msg and "not UTF-8" in msg and "byte position 5" in msg and "0xe9" in msg


def test_folder_or_image_as_config_names_what_was_expected(tmp_path):
    folder = tmp_path / "cfgs"
    folder.mkdir()
    (folder / "a.yaml").write_text("- {}\n")
    for msg in errors_of(str(folder)):
        assert "is a folder" in msg and "expected a YAML file" in msg and str(folder / "a.yaml") in msg
    img = tmp_path / "picture.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    for msg in errors_of(str(img)):
        assert str(img) in msg and "expected a YAML file" in msg and "byte position 0" in msg


def test_reversed_id_range_is_named(tmp_path):
    import start_jobs

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump([{"model": {"type": "x"}}] * 4))
    with pytest.raises(SystemExit) as e:
        start_jobs.main([f"{cfg}:3-1", "--dry-run"])
    msg = str(e.value.code)
    assert "3-1" in msg and "reversed" in msg and "1-3" in msg
