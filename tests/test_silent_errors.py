"""Bad input that used to give wrong results without a word (issue 21: items 6, 8, 9 and the unclear messages):
boolean / repeating / fractional split rows, dump_members that cannot be dumped, constant DEMs and constant
tiles' PSNR, a DEM smaller than one tile, terrain test.data_path, per-axis model resolutions at config load, and the
collapse detector's advice per model type."""
import math
import os
import types

import numpy as np
import pytest
import torch
import yaml

from datasets.ensemble import EnsembleDataset
from datasets.terrain import TerrainDataset
from tests.test_dataset import random_ensemble, write_ensemble
from util.errors import DataError
from util.registry import ConfigError, build


# ------------------------------------------------------------------------------------------ 6. split.npy rows
@pytest.fixture
def ens(tmp_path):
    """6 members of 4 x 5 (rows 0-3 train, 4-5 test)."""
    fields, params = random_ensemble(m=6, shape=(4, 5), d_c=2)
    return write_ensemble(tmp_path / "e", fields, params, n_train=4)


def _with_split(paths, train, test):
    np.save(paths["cond_split_path"], {"cond_idx": train, "cond_idx_unseen": test}, allow_pickle=True)
    return EnsembleDataset(**paths, cond_batch=2, spatial_log2batch=3)


@pytest.mark.parametrize("mask", [np.ones(6, bool), np.array([True, True, False, False, False, False]),
                                  [True, False, True], torch.ones(4, dtype=torch.bool)])
def test_boolean_split_is_refused_not_read_as_rows_0_and_1(ens, mask):
    with pytest.raises(DataError) as e:
        _with_split(ens, mask, np.array([4, 5]))
    msg = str(e.value)
    assert "'cond_idx' holds booleans" in msg and "expected row numbers of cond.npy (0..5)" in msg
    assert "np.flatnonzero(mask)" in msg and "split.npy" in msg
    with pytest.raises(DataError, match="'cond_idx_unseen' holds booleans"):
        _with_split(ens, np.arange(4), np.array([False, False, False, False, True, True]))


def test_split_repeating_rows_is_an_error(ens):
    with pytest.raises(DataError, match=r"'cond_idx' lists rows more than once: 1 \(3 times\), 2 \(2 times\)"):
        _with_split(ens, np.array([0, 1, 1, 1, 2, 2, 3]), np.array([4, 5]))
    with pytest.raises(DataError, match=r"'cond_idx_unseen' lists rows more than once: 5 \(2 times\)"):
        _with_split(ens, np.arange(4), np.array([4, 5, 5]))
    ds = _with_split(ens, np.arange(4), np.array([4, 5]))  # a clean split still loads
    assert ds.train_idx.tolist() == [0, 1, 2, 3] and ds.test_idx.tolist() == [4, 5]


def test_fractional_and_out_of_range_split_rows_are_named(ens):
    with pytest.raises(DataError) as e:
        _with_split(ens, [0, 1.5, 2], [4])
    assert "not whole row numbers: 1.5 (entry 1)" in str(e.value)
    with pytest.raises(DataError) as e:
        _with_split(ens, [0, 1, 2], [4, 9])
    assert "outside 0..5: 9 (entry 1)" in str(e.value)


# ------------------------------------------------------------------------------------- 8. test.dump_members
class _Untouchable:
    """A model that fails the test when the evaluation uses it (the dump check comes before any model work)."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before test.dump_members was checked")


def _ensemble_ctx(paths, tmp_path, **test):
    from tasks.base import EvalContext
    from tasks.ensemble.config import EnsembleTestConfig

    exp = {"dataset": {"type": "ensemble", **paths, "cond_batch": 2, "spatial_log2batch": 3},
           "model": {"type": "drrnet"}, "train": {"seed": 0}}
    out = tmp_path / "eval"
    out.mkdir()
    return EvalContext(run_dir=str(tmp_path), out_dir=str(out), exp=exp, meta={}, model=_Untouchable(),
                       test_config=EnsembleTestConfig(**test), device=torch.device("cpu"), autocast=False,
                       progress=False, weights={})


@pytest.mark.parametrize("test, named", [
    (dict(dump_members=[4, 999]), ["999 (not a row of cond.npy: the data has 6 rows, 0..5)"]),
    (dict(dump_members=[1, 5], splits=["test"]), ["1 (a train member; test.splits is ['test']: add 'train')"]),
    (dict(dump_members=[5, 1000, 2], splits=["train"]),
     ["5 (a test member; test.splits is ['train']: add 'test')", "1000 (not a row", "2 ("]),
])
def test_dump_members_that_cannot_be_dumped_are_named_before_any_model_work(ens, tmp_path, test, named):
    from tasks.ensemble.evaluation import score

    ctx = _ensemble_ctx(ens, tmp_path, **test)
    with pytest.raises(ConfigError) as e:
        score(ctx)
    msg = str(e.value)
    assert msg.startswith("test.dump_members: cannot dump")
    for text in named[:2]:
        assert text in msg
    if len(named) == 3:  # row 2 is a training member and train is evaluated: not named
        assert named[2] not in msg
    assert os.listdir(ctx.out_dir) == []  # nothing written


def test_dump_member_in_neither_split_is_named(tmp_path):
    fields, params = random_ensemble(m=6, shape=(4, 5), d_c=2)
    paths = write_ensemble(tmp_path / "e", fields, params, n_train=4)
    np.save(paths["cond_split_path"], {"cond_idx": np.arange(3), "cond_idx_unseen": np.array([4, 5])},
            allow_pickle=True)
    from tasks.ensemble.evaluation import score

    with pytest.raises(ConfigError, match=r"3 \(in neither the training nor the test rows of split.npy\)"):
        score(_ensemble_ctx(paths, tmp_path, dump_members=[3]))


# ----------------------------------------------------------------------------- 9. constant DEMs and tiles
def _surface(size, seed):
    from datasets.terrain_gen import fractal_surface

    return (200.0 * fractal_surface(size, seed=seed) + 50 * seed).astype(np.float32)


@pytest.mark.parametrize("value, hint", [(5.0, True), (-9999.0, True)])
def test_constant_dem_is_refused(tmp_path, value, hint):
    for i in range(2):
        np.save(tmp_path / f"r{i}.npy", np.full((32, 32), value, np.float32))
    with pytest.raises(DataError) as e:
        TerrainDataset(str(tmp_path), tile_size=16, split_by="tile")
    msg = str(e.value)
    assert "every one of the 8 16 x 16 tiles is constant" in msg and f"height {value:g} everywhere" in msg
    assert f"set dataset.nodata: {value:g}" in msg
    # the same constant DEM as test.data_path (split_by none) is refused too
    with pytest.raises(DataError, match="is constant"):
        TerrainDataset(str(tmp_path), tile_size=16, split_by="none")


def test_all_nodata_dem_with_nodata_set_names_the_missing_values(tmp_path):
    np.save(tmp_path / "r0.npy", np.full((32, 32), -9999.0, np.float32))
    with pytest.raises(DataError) as e:
        TerrainDataset(str(tmp_path), tile_size=16, nodata=-9999.0)
    assert "all 4 windows hold NaN / Inf / nodata -9999" in str(e.value)


def test_constant_tiles_have_no_psnr_and_the_table_says_why(tmp_path):
    from tasks.terrain.task import TerrainTask, TerrainTestConfig, benchmark, format_rows

    np.save(tmp_path / "r0.npy", _surface(32, 0))
    flat = _surface(32, 1)
    flat[:16, :16] = 120.0  # one constant tile (a lake) among varying ones
    np.save(tmp_path / "r1.npy", flat)
    ds = TerrainDataset(str(tmp_path), tile_size=16, split_by="none")
    torch.manual_seed(0)
    model = build("model", "huvr_siren", injected=TerrainTask(ds).model_inputs(), siren_width=8, patch_size=4,
                  latent_dim=4, enc_width=8, enc_depth=1, enc_heads=2, dec_width=8, dec_depth=1, dec_heads=2)
    tc = TerrainTestConfig(max_tiles=None, ptq_bits=[8], flops=False, timing_repeats=1, figure_tiles=0)
    res = benchmark(model, ds, tc)
    row, ptq = res["row"], res["ptq"][0]
    for r in (row, ptq):
        assert r["psnr"] is not None and math.isfinite(r["psnr"]) and r["psnr_flat_tiles"] == 1
    assert math.isfinite(row["seam_dpsnr"])
    tiles = {r["index"]: r for r in res["tiles"]}
    lake = [r for r in tiles.values() if r["psnr"] is None]
    assert len(lake) == 1 and lake[0]["region"] == "r1.npy" and "constant tile" in lake[0]["note"]
    others = [r["psnr"] for r in tiles.values() if r["psnr"] is not None]
    assert len(others) == 7 and all(math.isfinite(p) for p in others)
    assert row["psnr"] == pytest.approx(float(np.mean(others)))
    table = format_rows([row])
    assert "psnr_flat_tiles" in table and "inf" not in table and "nan" not in table
    # validation (val.csv): the same rule; every tile, the lake included, as the validation split here
    ds.splits["val"] = np.arange(len(ds))
    v = TerrainTask(ds).validate(model)
    assert math.isfinite(v["psnr"]) and v["psnr_flat_tiles"] == 1 and v["psnr"] == pytest.approx(row["psnr"])


def test_dem_smaller_than_one_tile_says_its_size_and_the_tile_size(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((5, 7), np.float32))
    with pytest.raises(DataError) as e:
        TerrainDataset(str(tmp_path), tile_size=8)
    msg = str(e.value)
    assert "smaller than one tile: s.npy is 5 x 7 pixels" in msg and "dataset.tile_size: 8" in msg
    assert "lower dataset.tile_size to at most 5" in msg


def test_terrain_test_data_path_missing_names_the_test_key(tmp_path):
    from tasks.base import EvalContext
    from tasks.terrain.task import TerrainTask, TerrainTestConfig

    missing = str(tmp_path / "nowhere")
    exp = {"dataset": {"type": "terrain", "path": str(tmp_path), "tile_size": 16}, "model": {"type": "huvr"}}
    ctx = EvalContext(run_dir=str(tmp_path), out_dir=str(tmp_path), exp=exp, meta={}, model=None,
                      test_config=TerrainTestConfig(data_path=missing), device=torch.device("cpu"), autocast=False,
                      progress=False, weights={})
    with pytest.raises(DataError) as e:
        TerrainTask.score(ctx)
    assert f"test.data_path '{missing}' not found" in str(e.value) and "dataset.path" not in str(e.value)


# ------------------------------------------------------------------- per-axis model resolutions at config load
def _config(tmp_path, model, dataset=None):
    exp = {"model": {"type": "drrnet", **model}, "dataset": dataset or {"type": "demo", "root": str(tmp_path / "d")},
           "train": {"max_steps": 2}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump([exp]))
    return str(p)


@pytest.mark.parametrize("model, text", [
    ({"spatial_resolutions": [[4, 4], 8]}, "entry 0 ([4, 4]) has 2 values, but the data of dataset type 'demo' "
                                           "has 3 spatial axes"),
    ({"spatial_resolutions": [[4, 4], [4, 4, 4]]}, "mixes entries of 2 and 3 spatial axes"),
    ({"spatial_resolutions": [8, [4]]}, "entry 1 ([4]) has 1 value"),
    ({"ssr_resolution": [8, 8]}, "[8, 8] has 2 values, but the data of dataset type 'demo' has 3"),
])
def test_spatial_resolutions_are_checked_at_config_load_with_file_and_id(tmp_path, model, text):
    from util.config import load_config

    path = _config(tmp_path, model)
    with pytest.raises(ConfigError) as e:
        load_config(path, 0)
    msg = str(e.value)
    assert msg.startswith(f"model.{next(iter(model))} ({path}, config_id 0)") and text in msg
    assert not os.path.exists(tmp_path / "d")  # refused before any data is generated or read


def test_spatial_resolutions_that_fit_the_data_still_load(tmp_path):
    from util.config import load_config

    ok = {"spatial_resolutions": [[4, 4], 8], "ssr_resolution": [8, 8]}
    assert load_config(_config(tmp_path, ok, {"type": "demo", "spatial_dims": 2}), 0)["model"]["ssr_resolution"] == [8, 8]
    exp = load_config(_config(tmp_path, {"spatial_resolutions": [[4, 4, 4], 8]}), 0)
    assert exp["model"]["spatial_resolutions"] == [[4, 4, 4], 8]


def test_spatial_resolutions_checked_at_build_name_the_config(ens, tmp_path):
    """An ensemble section without ``dims``: the data's number of axes is known only when the model is built;
    the error still names the config file and id."""
    from util.config import load_config
    from util.training import train

    model = {"spatial_resolutions": [[4, 4, 4], 8], "spatial_channels": 2, "pe_frequencies": 2,
             "spatial_refiner_layers": 1, "cond_resolutions": [2, 4], "cond_channels": 2, "cond_refiner_layers": 1,
             "hidden_dim": 8, "decoder_layers": 2}
    path = _config(tmp_path, model, {"type": "ensemble", "cond_batch": 2, "spatial_log2batch": 3, **ens})
    exp = load_config(path, 0)
    exp["train"]["log_dir"] = str(tmp_path / "runs")
    with pytest.raises(ConfigError) as e:
        train(exp, progress=False)
    msg = str(e.value)
    assert "spatial_resolutions" in msg and "expected an int or 2 values" in msg
    assert msg.endswith(f"({path}, config_id 0)")


# --------------------------------------------------------------------------- the collapse detector's advice
class _OneProcess:
    device = torch.device("cpu")

    @staticmethod
    def reduce(t, reduction="sum"):
        return t


def _collapse_message(model):
    from util.training import CollapseWatch, TrainingCollapsed

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    watch = CollapseWatch(check_steps=100, patience=1, log_every=5)
    with pytest.raises(TrainingCollapsed) as e:
        watch.observe(_OneProcess(), model, torch.full((2, 8, 1), 0.3), 5)
    return str(e.value)


def test_collapse_advice_names_only_keys_the_model_accepts():
    from util.config import load_config  # noqa: F401 (registry filled)
    from util.registry import accepted_keys

    kplanes = build("model", "kplanes", injected={"cond_dim": 2, "spatial_dims": 2}, spatial_resolution=4,
                    cond_resolution=4, feature_dim=2, multiscale=[1], decoder_width=8, decoder_layers=1)
    assert "init_output_mean" not in accepted_keys("model", "kplanes")
    msg = _collapse_message(kplanes)
    assert "init_output_mean" not in msg
    assert "model.plane_init" in msg and "lower optim.lr" in msg and "scheduler.warmup_steps" in msg
    drr = build("model", "drrnet", injected={"cond_dim": 2, "spatial_dims": 2}, spatial_resolutions=[4],
                spatial_channels=2, pe_frequencies=1, spatial_refiner_layers=0, cond_resolutions=[2],
                cond_channels=2, cond_refiner_layers=0, hidden_dim=8, decoder_layers=1)
    msg = _collapse_message(drr)
    assert "model.init_output_mean: auto" in msg and "plane_init" not in msg and "lower optim.lr" in msg
