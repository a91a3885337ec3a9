"""datasets.prepare: cond.npy / split.npy / cond_meta.json from member files + a parameter CSV, and its errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from datasets.prepare import check_numeric_order, PrepareError, main, parse_train_list, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARAMS = [[1.0, 10.0, 0.5], [2.0, 30.0, 0.25], [4.0, 20.0, 0.75], [3.0, 15.0, 1.0]]
NAMES = ["alpha", "beta", "gamma"]


def write_csv(path, names, rows):
    with open(path, "w") as f:
        f.write(",".join(names) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")


def make_ensemble(tmp_path, rows=PARAMS, shape=(3, 4, 5), names=NAMES):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    # written in reverse order, so that sorting (not creation order) must define the file index
    for i in reversed(range(len(rows))):
        np.save(data / f"member_{i:04d}.npy", (rng.random(shape) + i).astype(np.float32))
    write_csv(tmp_path / "params.csv", names, rows)
    return str(data), str(tmp_path / "params.csv"), str(tmp_path / "out")


def load_outputs(out):
    cond = np.load(os.path.join(out, "cond.npy"))
    split = np.load(os.path.join(out, "split.npy"), allow_pickle=True).item()
    meta = json.load(open(os.path.join(out, "cond_meta.json")))
    return cond, split, meta


def test_good_input_matches_hand_computation(tmp_path, capsys):
    data, csv_p, out = make_ensemble(tmp_path)
    main(["--data_dir", data, "--params", csv_p, "--out_dir", out, "--n_train", "3", "--no_progress"])
    cond, split, meta = load_outputs(out)
    assert cond.dtype == np.float32 and cond.shape == (4, 4)
    expected = np.array([[0, 0 / 3, 0 / 20, 1 / 3],
                         [1, 1 / 3, 20 / 20, 0 / 3],
                         [2, 3 / 3, 10 / 20, 2 / 3],
                         [3, 2 / 3, 5 / 20, 3 / 3]], dtype=np.float32)
    np.testing.assert_allclose(cond, expected, atol=1e-7)
    assert set(split) == {"cond_idx", "cond_idx_unseen"}
    assert split["cond_idx"].tolist() == [0, 1, 2] and split["cond_idx_unseen"].tolist() == [3]
    assert split["cond_idx"].dtype.kind == "i" and split["cond_idx_unseen"].dtype.kind == "i"
    assert meta == {"names": NAMES, "min": [1.0, 10.0, 0.25], "max": [4.0, 30.0, 1.0]}
    assert "cond_path" in capsys.readouterr().out


def test_train_list_forms(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    (tmp_path / "train.txt").write_text("# training rows\n3\n0  # first\n")
    for spec, train in (("1,3", [1, 3]), ("0-2", [0, 1, 2]), (str(tmp_path / "train.txt"), [0, 3]), ([2], [2])):
        prepare(data, csv_p, out, train_rows=spec, progress=False, overwrite=True)
        _, split, _ = load_outputs(out)
        assert split["cond_idx"].tolist() == train
        assert split["cond_idx_unseen"].tolist() == sorted(set(range(4)) - set(train))
    assert parse_train_list("5-7, 9") == [5, 6, 7, 9]


def test_module_cli_runs_and_reports_errors(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    cmd = [sys.executable, "-m", "datasets.prepare", "--data_dir", data, "--params", csv_p, "--out_dir", out]
    ok = subprocess.run(cmd + ["--n_train", "2"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert os.path.isfile(os.path.join(out, "cond.npy"))
    with pytest.raises(SystemExit, match=r"error: n_train=9 is out of range"):
        main(["--data_dir", data, "--params", csv_p, "--out_dir", out, "--n_train", "9", "--overwrite"])


def _outputs_bytes(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in ("cond.npy", "split.npy", "cond_meta.json")}


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    prepare(data, csv_p, out, n_train=3, progress=False)
    before = _outputs_bytes(out)
    for name in ("cond.npy", "split.npy", "cond_meta.json"):
        assert os.path.isfile(os.path.join(out, name))
    with pytest.raises(SystemExit, match=r"already holds cond.npy, split.npy, cond_meta.json; pass --overwrite"):
        main(["--data_dir", data, "--params", csv_p, "--out_dir", out, "--n_train", "2", "--no_progress"])
    assert _outputs_bytes(out) == before  # nothing replaced
    # one existing file is enough to refuse, and it is named
    os.remove(os.path.join(out, "cond.npy"))
    os.remove(os.path.join(out, "cond_meta.json"))
    with pytest.raises(PrepareError, match=r"already holds split.npy;"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    main(["--data_dir", data, "--params", csv_p, "--out_dir", out, "--n_train", "2", "--no_progress", "--overwrite"])
    _, split, _ = load_outputs(out)
    assert split["cond_idx"].tolist() == [0, 1]


def test_out_dir_equal_to_data_dir_or_a_file_is_refused(tmp_path):
    data, csv_p, _ = make_ensemble(tmp_path)
    listing = sorted(os.listdir(data))
    with pytest.raises(PrepareError, match=r"is the member folder --data_dir"):
        prepare(data, csv_p, data + "/.", n_train=2, progress=False, overwrite=True)
    assert sorted(os.listdir(data)) == listing
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(PrepareError, match=r"'.*afile' is an existing file"):
        prepare(data, csv_p, str(f), n_train=2, progress=False)


def test_names_without_zero_padding_are_refused(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(12):  # member_0 .. member_11: text order 0, 1, 10, 11, 2, ...
        np.save(d / f"member_{i}.npy", np.full((2, 2), float(i), dtype=np.float32))
    write_csv(tmp_path / "p.csv", ["a"], [[float(i)] for i in range(12)])
    with pytest.raises(PrepareError, match=r"'member_11.npy' sorts before 'member_2.npy'.*'member_2.npy' -> "
                                           r"'member_02.npy'"):
        prepare(str(d), str(tmp_path / "p.csv"), str(tmp_path / "out"), n_train=8, progress=False)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    # zero-padded names (text order = numeric order) are accepted and paired row by row
    for i in range(12):
        os.rename(d / f"member_{i}.npy", d / f"member_{i:02d}.npy")
    prepare(str(d), str(tmp_path / "p.csv"), str(tmp_path / "out"), n_train=8, progress=False)
    cond = np.load(tmp_path / "out" / "cond.npy")
    np.testing.assert_allclose(cond[:, 1], np.arange(12) / 11.0, atol=1e-7)
    check_numeric_order(["a_1.npy", "b_10.npy", "c_2.npy"])  # different names: not one numbered scheme


def test_raw_and_h5_members(tmp_path):
    import h5py

    rows = PARAMS[:2]
    for ext in (".raw", ".h5"):
        d = tmp_path / ext[1:]
        (d / "data").mkdir(parents=True)
        for i in range(2):
            arr = np.full((2, 3, 4), i + 1.0, dtype=np.float32)
            if ext == ".raw":
                arr.tofile(d / "data" / f"m{i}.raw")
            else:
                with h5py.File(d / "data" / f"m{i}.h5", "w") as f:
                    f["data"] = arr
        write_csv(d / "p.csv", NAMES, rows)
        kw = {"dims": [2, 3, 4]} if ext == ".raw" else {}
        res = prepare(str(d / "data"), str(d / "p.csv"), str(d / "out"), n_train=1, progress=False, **kw)
        assert res["info"]["shape"] == (2, 3, 4) and res["info"]["value_min"] == 1.0
    with pytest.raises(PrepareError, match="m0.raw.*--dims"):
        prepare(str(tmp_path / "raw" / "data"), str(tmp_path / "raw" / "p.csv"), str(tmp_path / "o"), n_train=1,
                progress=False)
    with pytest.raises(PrepareError, match=r"m0.raw: 96 bytes.*--dims \[2, 3, 5\]"):
        prepare(str(tmp_path / "raw" / "data"), str(tmp_path / "raw" / "p.csv"), str(tmp_path / "o"), n_train=1,
                dims=[2, 3, 5], progress=False)


# ------------------------------------------------------------------------------------------------ bad input
def test_file_count_vs_csv_rows(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    write_csv(csv_p, NAMES, PARAMS[:3])
    with pytest.raises(PrepareError, match=r"4 member files but params.csv has 3 data rows"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    assert not os.path.exists(out)


def test_shape_mismatch_names_file_and_shapes(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    np.save(os.path.join(data, "member_0002.npy"), np.zeros((3, 4, 6), np.float32))
    with pytest.raises(PrepareError, match=r"member_0002.npy has shape \(3, 4, 6\).*member_0000.npy has shape "
                                           r"\(3, 4, 5\)"):
        prepare(data, csv_p, out, n_train=2, progress=False)


def test_dtype_mismatch_names_file(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    np.save(os.path.join(data, "member_0003.npy"), np.zeros((3, 4, 5), np.float64))
    with pytest.raises(PrepareError, match=r"member_0003.npy has dtype float64.*member_0000.npy has dtype float32"):
        prepare(data, csv_p, out, n_train=2, progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_field_names_file(tmp_path, bad):
    data, csv_p, out = make_ensemble(tmp_path)
    arr = np.ones((3, 4, 5), np.float32)
    arr[1, 2, 3] = bad
    np.save(os.path.join(data, "member_0001.npy"), arr)
    with pytest.raises(PrepareError, match=r"member_0001.npy: .*(NaN|Inf).*\(1, 2, 3\)"):
        prepare(data, csv_p, out, n_train=2, progress=False)


def test_non_numeric_cell_names_row_and_column(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    rows = [list(r) for r in PARAMS]
    rows[2][1] = "twenty"
    write_csv(csv_p, NAMES, rows)
    with pytest.raises(PrepareError, match=r"params.csv: data row 2 \(line 4\), column 'beta': 'twenty' is not a "
                                           r"number"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    rows[2][1] = ""
    write_csv(csv_p, NAMES, rows)
    with pytest.raises(PrepareError, match=r"data row 2 \(line 4\), column 'beta'"):
        prepare(data, csv_p, out, n_train=2, progress=False)


def test_ragged_row_and_missing_header(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    rows = [list(r) for r in PARAMS]
    rows[1] = rows[1][:2]
    write_csv(csv_p, NAMES, rows)
    with pytest.raises(PrepareError, match=r"data row 1 \(line 3\) has 2 cells, the header has 3"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    with open(csv_p, "w") as f:
        f.write("\n".join(",".join(str(v) for v in r) for r in PARAMS) + "\n")
    with pytest.raises(PrepareError, match="header"):
        prepare(data, csv_p, out, n_train=2, progress=False)


def test_constant_column_warns_and_normalizes_to_zero(tmp_path):
    rows = [[r[0], 7.5, r[2]] for r in PARAMS]
    data, csv_p, out = make_ensemble(tmp_path, rows=rows)
    with pytest.warns(UserWarning, match="column 'beta' is constant"):
        prepare(data, csv_p, out, n_train=3, progress=False)
    cond, _, meta = load_outputs(out)
    assert np.all(cond[:, 2] == 0) and np.all(np.isfinite(cond))
    assert meta["min"][1] == meta["max"][1] == 7.5
    np.testing.assert_allclose(cond[:, 1], [0, 1 / 3, 1, 2 / 3], atol=1e-7)


def test_bad_train_rows(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    with pytest.raises(PrepareError, match="train row 2 is listed twice"):
        prepare(data, csv_p, out, train_rows="0,2,2", progress=False)
    with pytest.raises(PrepareError, match=r"train row 4 is out of range: rows are 0..3"):
        prepare(data, csv_p, out, train_rows=[0, 4], progress=False)
    with pytest.raises(PrepareError, match=r"train row -1 is out of range"):
        prepare(data, csv_p, out, train_rows="-1", progress=False)
    with pytest.raises(PrepareError, match="'x' is not a row number"):
        prepare(data, csv_p, out, train_rows="1,x", progress=False)
    with pytest.raises(PrepareError, match=r"n_train=0 is out of range"):
        prepare(data, csv_p, out, n_train=0, progress=False)
    with pytest.raises(PrepareError, match="exactly one"):
        prepare(data, csv_p, out, n_train=1, train_rows="0", progress=False)
    with pytest.warns(UserWarning, match="test split .* is empty"):
        prepare(data, csv_p, out, n_train=4, progress=False)


def test_empty_or_mixed_folder(tmp_path):
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "p.csv", NAMES, PARAMS)
    with pytest.raises(PrepareError, match=r"data_dir '.*data' holds no member files.*empty"):
        prepare(str(tmp_path / "data"), str(tmp_path / "p.csv"), str(tmp_path / "o"), n_train=1)
    (tmp_path / "data" / "notes.txt").write_text("x")
    with pytest.raises(PrepareError, match="no member files ending in '.npy'"):
        prepare(str(tmp_path / "data"), str(tmp_path / "p.csv"), str(tmp_path / "o"), n_train=1, file_ext="npy")
    np.save(tmp_path / "data" / "a.npy", np.zeros(3, np.float32))
    np.zeros(3, np.float32).tofile(tmp_path / "data" / "b.raw")
    with pytest.raises(PrepareError, match=r"mixes member file types.*--file_ext"):
        prepare(str(tmp_path / "data"), str(tmp_path / "p.csv"), str(tmp_path / "o"), n_train=1)
    with pytest.raises(PrepareError, match="not a folder"):
        prepare(str(tmp_path / "nope"), str(tmp_path / "p.csv"), str(tmp_path / "o"), n_train=1)


def test_members_streamed_one_at_a_time(tmp_path, monkeypatch):
    """Each member is opened once, memory-mapped, and dropped before the next one is opened."""
    import weakref

    import datasets.prepare as prep

    data, csv_p, out = make_ensemble(tmp_path)
    opened, alive = [], []
    real = prep.read_member

    def spy(path, *a, **kw):
        arr = real(path, *a, **kw)
        assert isinstance(arr, np.memmap)
        alive.append(sum(r() is not None for r in opened))
        opened.append(weakref.ref(arr))
        return arr

    monkeypatch.setattr(prep, "read_member", spy)
    prepare(data, csv_p, out, n_train=2, progress=False)
    assert len(opened) == 4 and max(alive) == 0


def test_importance_files(tmp_path):
    data, csv_p, out = make_ensemble(tmp_path)
    main(["--data_dir", data, "--params", csv_p, "--out_dir", out, "--n_train", "3", "--importance", "--bins", "8",
          "--no_progress"])
    w = np.load(os.path.join(out, "impsmp_cond.npy"))
    assert w.shape == (3,) and abs(w.sum() - 1) < 1e-9
    assert len(os.listdir(os.path.join(out, "impsmp_coord"))) == 4
