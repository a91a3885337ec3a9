"""predict.py output safety: no silent overwrite, exactly the reported path, output folder checked before any
computing, one-line errors (issue 11)."""
import os

import numpy as np
import pytest

import predict
from models.base import FieldModel
import tasks.ensemble.surrogate

META = dict(param_names=["a", "b"], param_min=[0.0, 0.0], param_max=[1.0, 1.0], cond_dim=2,
            spatial_shape=[3, 4, 5], value_min=0.0, value_max=2.0, log_transform=False)


class ConstStub(FieldModel):
    def forward(self, x, c):  # (1, N, d), (1, d_c) -> (1, N, 1)
        return x[..., :1] * 0 + 0.25


@pytest.fixture
def loads(monkeypatch):
    """Replace the run loading by a stub model; counts how often a model was loaded (= computing started)."""
    calls = []

    def load(run, ckpt=None):
        calls.append(run)
        return ConstStub(), {}, META

    monkeypatch.setattr(tasks.ensemble.surrogate, "load_trained_model", load)
    return calls


def run(tmp_path, out, *extra):
    return predict.main(["--run", str(tmp_path), "--values", "0.5", "0.5", "--out", str(out), *extra])


def test_writes_exactly_the_reported_path(tmp_path, loads, capsys):
    """np.save appends .npy to a name without it; predict.py writes and reports the name it was given."""
    out = tmp_path / "field"
    run(tmp_path, out)
    assert out.is_file() and not (tmp_path / "field.npy").exists()
    assert f"wrote {out}:" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out), np.full((3, 4, 5), 0.5), atol=1e-6)  # 0.25 in [0, 2] units


def test_existing_output_needs_overwrite(tmp_path, loads):
    out = tmp_path / "f.npy"
    np.save(out, np.arange(3))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, out)
    assert "already exists" in str(e.value.code) and "--overwrite" in str(e.value.code)
    assert np.load(out).tolist() == [0, 1, 2]  # untouched
    assert loads == []  # refused before loading / computing anything
    run(tmp_path, out, "--overwrite")
    assert np.load(out).shape == (3, 4, 5)


def test_existing_vti_needs_overwrite(tmp_path, loads):
    (tmp_path / "f.vti").write_text("old")
    with pytest.raises(SystemExit, match="f.vti' already exists"):
        run(tmp_path, tmp_path / "f.npy", "--vti")
    assert not (tmp_path / "f.npy").exists() and loads == []


def test_output_folder_checked_before_computing(tmp_path, loads):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, tmp_path / "no_such_dir" / "f.npy")
    msg = str(e.value.code)
    assert msg.startswith("error:") and "no_such_dir" in msg and "does not exist" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="is a folder"):
        run(tmp_path, tmp_path)
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(SystemExit, match="not writable"):
                run(tmp_path, ro / "f.npy")
        finally:
            ro.chmod(0o700)
    assert loads == []


def test_bad_inputs_exit_with_one_line(tmp_path, loads):
    bad = tmp_path / "pts.npy"
    bad.write_bytes(b"not an array")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, tmp_path / "o.npy", "--coords", str(bad))
    assert str(e.value.code).startswith("error:") and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit, match="--vti needs grid output"):
        run(tmp_path, tmp_path / "o.npy", "--coords", str(bad), "--vti")
    with pytest.raises(SystemExit, match="given twice"):
        predict.main(["--run", str(tmp_path), "--param", "a=1", "--param", "a=2", "--out", str(tmp_path / "o.npy")])
    with pytest.raises(SystemExit, match="not a number"):
        predict.main(["--run", str(tmp_path), "--param", "a=x", "--param", "b=2", "--out", str(tmp_path / "o.npy")])
    assert not (tmp_path / "o.npy").exists()
