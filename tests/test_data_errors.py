"""Bad input data is refused early with a DataError that names the file and what was expected (issue 11, item 4):
mispaired member listings, bad split files, truncated or garbage member files (test members too, at
construction), prepare's CSV (byte-order mark, duplicate names), corrupt importance and .vti files."""
import logging
import os

import numpy as np
import pytest
import yaml

from datasets.ensemble import EnsembleDataset, open_member
from datasets.prepare import PrepareError, prepare
from datasets.prepare import main as prepare_main
from datasets.unstructured import UnstructuredDataset
from tests.test_dataset import random_ensemble, write_ensemble
from util.errors import DataError
from util.registry import ConfigError

SHAPE = (4, 5, 6)


@pytest.fixture
def ens(tmp_path):
    """6 members (rows 0-3 train, 4-5 test), files member_000..005.npy, cond row r -> file r."""
    fields, params = random_ensemble(m=6, shape=SHAPE, d_c=2)
    return write_ensemble(tmp_path / "e", fields, params, n_train=4), fields


def small(paths, **kw):
    return EnsembleDataset(**{**paths, "cond_batch": 2, "spatial_log2batch": 4, **kw})


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError) and not issubclass(DataError, ConfigError)
    assert issubclass(PrepareError, DataError)


# --------------------------------------------------------------------------------------- listing vs cond
def test_extra_file_in_the_listing_is_refused_and_named(ens):
    paths, fields = ens
    # sorts between member_001 and member_002: pairing by index would shift members 2..5 by one file
    np.save(os.path.join(paths["data_dir"], "member_001_old.npy"), fields[0])
    with pytest.raises(DataError) as e:
        small(paths)
    msg = str(e.value)
    assert "lists 7 member files" in msg and "has 6 rows" in msg and paths["cond_path"] in msg
    assert "member_001_old.npy" in msg  # the odd name, not only the last file of the listing
    assert "'member_???.npy' would select 6 files" in msg  # a suggestion that selects exactly the members
    assert "dataset.file_pattern" in msg
    ds = small(paths, file_pattern="member_???.npy")
    assert [os.path.basename(f) for f in ds.files] == [f"member_{i:03d}.npy" for i in range(6)]
    for row in (2, 5):  # pairing by sorted index as before: row r is still file r
        np.testing.assert_allclose(ds.denormalize_values(ds.full_field(row).numpy()), fields[row], rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ConfigError, match="dataset.file_pattern"):
        small(paths, file_pattern=3)


def test_extra_file_at_the_end_is_refused_too(ens):
    paths, fields = ens
    np.save(os.path.join(paths["data_dir"], "member_006.npy"), fields[0])
    with pytest.raises(DataError, match=r"lists 7 member files.*has 6 rows.*Files no row references: member_006\.npy"):
        small(paths)


def test_unreferenced_file_warns(ens, caplog):
    paths, fields = ens
    cond = np.load(paths["cond_path"])
    cond[5, 0] = 4  # rows 4 and 5 share file 4; member_005.npy is never used
    np.save(paths["cond_path"], cond)
    with caplog.at_level(logging.WARNING, logger="datasets.ensemble"):
        small(paths)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "lists 6 member files" in msg and "references 5 of them" in msg and "member_005.npy" in msg


def test_missing_member_file_names_the_listing(ens):
    paths, _ = ens
    os.remove(os.path.join(paths["data_dir"], "member_003.npy"))
    with pytest.raises(DataError, match=r"row 5 column 0 is 5.*\(0\.\.4: 5 files, member_000\.npy \.\. "
                                        r"member_005\.npy; cond\.npy has 6 rows\); is a member file missing"):
        small(paths)


# ----------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("split, found, problem", [
    ({"cond_idx": [0, 1], "cond_idx_unseen": [4], "cond_idx_val": [5]},
     "['cond_idx', 'cond_idx_unseen', 'cond_idx_val']", "unknown: ['cond_idx_val']"),
    ({"cond_idx": [0, 1, 2, 3]}, "['cond_idx']", "missing: ['cond_idx_unseen']"),
    ({"train": [0, 1], "test": [4]}, "['train', 'test']", "unknown: ['train', 'test']; missing: ['cond_idx', "),
])
def test_split_keys_are_checked(ens, split, found, problem):
    paths, _ = ens
    np.save(paths["cond_split_path"], {k: np.asarray(v) for k, v in split.items()}, allow_pickle=True)
    with pytest.raises(DataError) as e:
        small(paths)
    msg = str(e.value)
    assert paths["cond_split_path"] in msg and f"keys {found} found" in msg
    assert "expected exactly ['cond_idx', 'cond_idx_unseen']" in msg and problem in msg


def test_split_not_a_dict_or_not_rows(ens):
    paths, _ = ens
    np.save(paths["cond_split_path"], np.arange(4))
    with pytest.raises(DataError, match=r"split.npy'.*got an array int64 \[4\]; expected np.save of a dict"):
        small(paths)
    np.save(paths["cond_split_path"], {"cond_idx": ["a", "b"], "cond_idx_unseen": []}, allow_pickle=True)
    with pytest.raises(DataError, match="'cond_idx' must hold row numbers"):
        small(paths)


# ------------------------------------------------------------------------------------------ member files
def _corrupt(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        if how == "truncated":
            f.write(data[: len(data) // 2])
        elif how == "garbage":
            f.write(np.random.default_rng(0).bytes(len(data)))
        elif how == "empty":
            pass
        elif how == "header_only":
            f.write(data[:40])


@pytest.mark.parametrize("how, why", [("truncated", "truncated: its header declares float32 \\[4, 5, 6\\]"),
                                      ("garbage", "not a .npy file"), ("empty", "the file is empty \\(0 bytes\\)"),
                                      ("header_only", "the .npy header is unreadable")])
@pytest.mark.parametrize("row", [1, 5])  # a training member, a test member
def test_corrupt_npy_member_named_at_construction(ens, how, why, row):
    paths, _ = ens
    _corrupt(os.path.join(paths["data_dir"], f"member_{row:03d}.npy"), how)
    for kw in ({}, dict(storage="mmap", value_min=-1.0, value_max=2.0)):
        with pytest.raises(DataError, match=f"member_{row:03d}.npy: cannot read member file: {why}"):
            small(paths, **kw)


def test_corrupt_raw_and_hdf5_test_members(tmp_path):
    fields, params = random_ensemble(m=4, shape=(4, 5), d_c=1)
    rp = write_ensemble(tmp_path / "raw", fields, params, n_train=3, fmt="raw")
    with open(os.path.join(rp["data_dir"], "member_003.raw"), "r+b") as f:
        f.truncate(50)
    with pytest.raises(DataError, match=r"member_003\.raw: 50 bytes, but dataset.dims \[4, 5\] of float32 needs "
                                        r"80 bytes \(truncated\?\)"):
        small(rp, dims=[4, 5])
    hp = write_ensemble(tmp_path / "h5", fields, params, n_train=3, fmt="h5")
    _corrupt(os.path.join(hp["data_dir"], "member_003.h5"), "truncated")
    with pytest.raises(DataError, match=r"member_003\.h5: cannot read member file: .*expected an HDF5 file with "
                                        r"dataset 'data'"):
        small(hp)


def test_test_members_checked_cheaply(ens, monkeypatch):
    """Test members: wrong shape and NaN found at construction; the header check reads no values."""
    paths, fields = ens
    np.save(os.path.join(paths["data_dir"], "member_004.npy"), np.zeros((4, 5, 7), np.float32))
    with pytest.raises(DataError, match=r"member_004\.npy has shape \[4, 5, 7\] but the first training member "
                                        r"member_000\.npy has \[4, 5, 6\]"):
        small(paths)
    bad = fields[4].copy()
    bad[0, 0, 0] = np.nan
    np.save(os.path.join(paths["data_dir"], "member_004.npy"), bad)
    with pytest.raises(DataError, match=r"member_004\.npy: 1 NaN"):
        small(paths)
    # above the scan budget only headers are checked (the NaN then surfaces when the member is read)
    import datasets.ensemble as ens_mod

    monkeypatch.setattr(ens_mod, "TEST_SCAN_BYTES", 10)
    ds = small(paths)
    with pytest.raises(DataError, match=r"member_004\.npy: 1 NaN"):
        ds.full_field(4)
    # header_only opens an HDF5 member without reading its values
    arr = open_member(os.path.join(paths["data_dir"], "member_000.npy"), header_only=True)
    assert isinstance(arr, np.memmap) and arr.shape == SHAPE


def test_hdf5_header_only_reads_no_values(tmp_path):
    import h5py

    p = str(tmp_path / "m.h5")
    with h5py.File(p, "w") as f:
        f.create_dataset("data", data=np.ones((3, 4), np.float32), chunks=True, compression="gzip")
    arr = open_member(p, header_only=True)
    assert arr.shape == (3, 4) and arr.dtype == np.float32 and arr.strides == (0, 0)
    with pytest.raises(DataError, match=r"m\.h5: stored shape \[3, 4\] differs from dataset.dims \[4, 3\]"):
        open_member(p, dims=[4, 3], header_only=True)


def test_train_script_names_a_corrupt_test_member(tmp_path, ens):
    """train.py fails at start (before any training step) naming the corrupt test member."""
    paths, _ = ens
    _corrupt(os.path.join(paths["data_dir"], "member_005.npy"), "truncated")
    exp = dict(model=dict(type="drrnet", spatial_resolutions=[4], spatial_channels=2, pe_frequencies=2,
                          spatial_refiner_layers=1, cond_resolutions=[2], cond_channels=2, cond_refiner_layers=1,
                          hidden_dim=8, decoder_layers=1),
               dataset=dict(type="ensemble", cond_batch=2, spatial_log2batch=4, **paths),
               optim=dict(type="adam", lr=1e-3), scheduler=dict(type="cosine"),
               train=dict(max_steps=2, log_dir=str(tmp_path / "runs")))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump([exp]))
    from train import main

    try:
        main(["--config", str(cfg), "--no_progress"])
        msg = "no error"
    except SystemExit as e:  # the entry script's one-line message
        msg = str(e.code)
    except DataError as e:
        msg = str(e)
    assert "member_005.npy: cannot read member file: truncated" in msg
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p.name.startswith("step_") for p in runs.rglob("*"))


# ------------------------------------------------------------------------------------------------- prepare
def _prepare_inputs(tmp_path, header="a,b", rows=((1, 2), (2, 3), (3, 5)), encoding="utf-8"):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for i in range(len(rows)):
        np.save(data / f"m{i}.npy", np.full((3, 4), float(i), np.float32))
    text = header + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n"
    (tmp_path / "p.csv").write_bytes(text.encode(encoding))
    return str(data), str(tmp_path / "p.csv"), str(tmp_path / "out")


def test_prepare_strips_a_byte_order_mark(tmp_path):
    data, csv_p, out = _prepare_inputs(tmp_path, encoding="utf-8-sig")  # as Excel saves "CSV UTF-8"
    assert open(csv_p, "rb").read(3) == b"\xef\xbb\xbf"
    prepare(data, csv_p, out, n_train=2, progress=False)
    import json

    assert json.load(open(os.path.join(out, "cond_meta.json")))["names"] == ["a", "b"]


def test_prepare_duplicate_names_and_bad_encoding(tmp_path):
    # with the byte-order mark stripped, the duplicate is found (today '\ufeffa' and 'a' differ)
    data, csv_p, out = _prepare_inputs(tmp_path, header="a,a", encoding="utf-8-sig")
    with pytest.raises(PrepareError, match=r"p\.csv: duplicate parameter names \['a'\]"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    open(csv_p, "wb").write("temp\xe9rature,b\n1,2\n2,3\n3,5\n".encode("latin-1"))
    with pytest.raises(PrepareError, match=r"p\.csv: not UTF-8 text.*save the CSV as UTF-8"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    assert not os.path.exists(out)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_prepare_names_a_corrupt_member(tmp_path, capsys, how):
    data, csv_p, out = _prepare_inputs(tmp_path)
    _corrupt(os.path.join(data, "m2.npy"), how)
    with pytest.raises(PrepareError, match=r"m2\.npy: cannot read member file"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    with pytest.raises(SystemExit) as e:  # the CLI: one line, no traceback
        prepare_main(["--data_dir", data, "--params", csv_p, "--out_dir", out, "--n_train", "2", "--no_progress"])
    assert str(e.value.code).startswith("error: m2.npy: cannot read member file") and "\n" not in str(e.value.code)


def test_prepare_file_pattern(tmp_path):
    data, csv_p, out = _prepare_inputs(tmp_path)
    np.save(os.path.join(data, "m1_backup.npy"), np.zeros((3, 4), np.float32))
    with pytest.raises(PrepareError, match=r"4 member files but p.csv has 3 data rows.*names unlike the others: "
                                           r"m1_backup\.npy \(--file_pattern 'm\?\.npy' would select 3 files\)"):
        prepare(data, csv_p, out, n_train=2, progress=False)
    paths = prepare(data, csv_p, out, n_train=2, file_pattern="m?.npy", progress=False)
    ds = small(dict(data_dir=data, cond_path=paths["cond_path"], cond_split_path=paths["cond_split_path"]),
               file_pattern="m?.npy")
    assert ds.denormalize_values(ds.full_field(2).numpy()).mean() == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ unstructured
def test_unstructured_inherits_the_checks(tmp_path):
    from tests.test_unstructured import make_mesh_ensemble

    paths = make_mesh_ensemble(str(tmp_path / "mesh"), n_train=3, n_test=2)
    kw = dict(cond_batch=2, spatial_log2batch=4)
    np.save(os.path.join(paths["data_dir"], "member_0001a.npy"), np.ones(10, np.float32))
    with pytest.raises(DataError, match=r"lists 6 member files.*member_0001a\.npy"):
        UnstructuredDataset(**paths, **kw)
    ds = UnstructuredDataset(**paths, **kw, file_pattern="member_????.npy")
    assert len(ds.files) == 5
    _corrupt(os.path.join(paths["data_dir"], "member_0004.npy"), "truncated")  # a test member
    with pytest.raises(DataError, match=r"member_0004\.npy: cannot read member file: truncated"):
        UnstructuredDataset(**paths, **kw, file_pattern="member_????.npy")
    np.save(paths["cond_split_path"], {"cond_idx": np.arange(3)}, allow_pickle=True)
    with pytest.raises(DataError, match=r"missing: \['cond_idx_unseen'\]"):
        UnstructuredDataset(**paths, **kw, file_pattern="member_????.npy")
    np.save(paths["cond_split_path"], {"cond_idx": np.arange(3), "cond_idx_unseen": [3]}, allow_pickle=True)
    np.save(paths["coords_path"], np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"coords\.npy: vertex coordinates must have shape \(N, 3\)"):
        UnstructuredDataset(**paths, **kw, file_pattern="member_????.npy")


# -------------------------------------------------------------------------------------- other data files
def test_corrupt_importance_files(tmp_path, ens):
    from datasets import importance as imp

    p = tmp_path / "w.npy"
    p.write_bytes(b"not numpy")
    with pytest.raises(DataError, match="impsmp_cond_path '.*w.npy': cannot read it"):
        imp.load_cond_weights(str(p), np.arange(3), 5)
    with pytest.raises(DataError, match="importance file '.*w.npy': cannot read it"):
        imp.load_coord_file(str(p))


def test_truncated_vti_names_the_file(tmp_path):
    from util.volume_io import read_vti, write_vti

    p = str(tmp_path / "v.vti")
    write_vti(p, np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-100])
    with pytest.raises(DataError, match=r"v\.vti: truncated: array 'value' needs 240 bytes"):
        read_vti(p)
    open(p, "wb").write(b"\x00garbage")
    with pytest.raises(DataError, match=r"v\.vti: not a readable VTK XML ImageData file"):
        read_vti(p)
