"""The one evaluation template (tasks.base.Task.evaluate) with a toy task whose scoring is trivial, and the task
state saved with each checkpoint (task_state.pt, util.checkpoints.load_task_state) with its legacy reader."""
import csv
import dataclasses
import json
import logging
import os
import shutil

import pytest
import torch

from tasks.base import CsvFile, JsonFile, Scores
from tests.test_task_seam import ToyL1, _train, toy_config
from util.config import ConfigError, check_dataclass_fields
from util.errors import DataError
from util.registry import register


@dataclasses.dataclass
class ScoredTestConfig:
    """Attributes:
        margin: a toy key (copied into the rows).
        fail: raise in scoring after the files of the scoring itself are written.
        bad_json: put an object json cannot encode into summary.json.
        undeclared: return a file result_files() does not name.
    """

    margin: float = 0.1
    fail: bool = False
    bad_json: bool = False
    undeclared: bool = False

    def __post_init__(self):
        check_dataclass_fields(self, "test")


SCORED = []


@register("task", "_toy_scored")
class ToyScored(ToyL1):
    """ToyL1 with a trivial scoring through the template.

    Args:
        dataset: injected.
        skip_every: see ToyL1.
    """

    test_config = ScoredTestConfig

    @classmethod
    def result_files(cls, test_config):
        return ["metrics.csv", "values.csv", "summary.json"]

    @classmethod
    def score(cls, ctx):
        SCORED.append(ctx)
        tc = ctx.test_config
        value = ctx.model.value.detach()
        rows = [dict(predictor="model", v0=float(value[0]), v1=float(value[1]), margin=tc.margin)]
        if tc.fail:
            raise RuntimeError("scoring failed")
        files = {"metrics.csv": CsvFile(rows), "values.csv": CsvFile([{"i": i, "v": float(v)}
                                                                       for i, v in enumerate(value)]),
                 "summary.json": JsonFile(rows + ([{"x": object()}] if tc.bad_json else []))}
        if tc.undeclared:
            files["extra.csv"] = CsvFile(rows)
        return Scores(rows, files)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 12-step toy run (checkpoints at steps 6 and 12)."""
    return _train(_config(tmp_path_factory.mktemp("scored")))


def _config(tmp):
    import yaml

    p = toy_config(tmp)
    exps = yaml.safe_load(open(p))
    exps[0]["task"] = {"type": "_toy_scored"}
    open(p, "w").write(yaml.safe_dump(exps))
    return p


def _copy(run, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(run, dst)
    return dst


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".") or n.endswith(".tmp")]


def test_rows_and_every_file_record_the_weights_scored(run, tmp_path):
    rd = _copy(run, tmp_path)
    rows = ToyScored.evaluate(rd, device="cpu", overrides=dict(margin=2.0), progress=False)
    trained = torch.load(os.path.join(rd, "model.pt"))["value"]
    from util.evaluation_common import machine_columns

    assert rows == [dict(predictor="model", v0=float(trained[0]), v1=float(trained[1]), margin=2.0,
                         weights="model.pt", step=12, total_steps=12, final_weights=True, **machine_columns(),
                         data_fingerprint="not read")]  # the toy scoring reads no data
    ctx = SCORED[-1]
    assert ctx.device == torch.device("cpu") and ctx.autocast is False and ctx.test_config.margin == 2.0
    assert ctx.out_dir == os.path.join(rd, "eval") and ctx.weights_path == os.path.join(rd, "model.pt")
    metrics = _read(os.path.join(rd, "eval", "metrics.csv"))
    # the weights columns, not final_weights (a row key only)
    assert list(metrics[0]) == ["predictor", "v0", "v1", "margin", "weights", "step", "total_steps", "cpu", "threads",
                                "data_fingerprint"]
    assert (metrics[0]["weights"], metrics[0]["step"], metrics[0]["total_steps"]) == ("model.pt", "12", "12")
    assert [r["i"] for r in _read(os.path.join(rd, "eval", "values.csv"))] == ["0", "1"]
    assert json.load(open(os.path.join(rd, "eval", "summary.json"))) == rows
    assert _leftovers(os.path.join(rd, "eval")) == []


def test_checkpoint_scored_is_recorded_with_a_warning(run, tmp_path, caplog):
    rd = _copy(run, tmp_path)
    ck = os.path.join(rd, "checkpoints", "step_0000006")
    with caplog.at_level(logging.WARNING, logger="test"):
        rows = ToyScored.evaluate(rd, checkpoint=ck, device="cpu", progress=False)
    assert (rows[0]["weights"], rows[0]["step"], rows[0]["total_steps"], rows[0]["final_weights"]) == \
        ("checkpoint step_0000006", 6, 12, False)
    assert any("not the final model.pt" in m and "step_0000006" in m for m in caplog.messages), caplog.messages
    # the step-6 weights: 4 trained steps (1, 2, 4, 5) of lr 0.02 towards the targets
    assert rows[0]["v0"] == pytest.approx(4 * 0.02, abs=1e-5)


def test_existing_results_are_refused_before_any_work_naming_folder_and_files(run, tmp_path):
    rd = _copy(run, tmp_path)
    out = str(tmp_path / "out")
    ToyScored.evaluate(rd, out_dir=out, device="cpu", progress=False)
    os.remove(os.path.join(out, "values.csv"))
    before = open(os.path.join(out, "metrics.csv")).read()
    n = len(SCORED)
    with pytest.raises(FileExistsError) as e:
        ToyScored.evaluate(rd, out_dir=out, device="cpu", overrides=dict(margin=7.0), progress=False)
    msg = str(e.value)
    assert out in msg and "metrics.csv" in msg and "summary.json" in msg and "values.csv" not in msg
    assert len(SCORED) == n and open(os.path.join(out, "metrics.csv")).read() == before
    # also before the weights are loaded: a damaged model.pt is not even read
    with open(os.path.join(rd, "model.pt"), "wb") as f:
        f.write(b"damaged")
    with pytest.raises(FileExistsError):
        ToyScored.evaluate(rd, out_dir=out, device="cpu", progress=False)
    rows = ToyScored.evaluate(rd, out_dir=out, device="cpu", overwrite=True, overrides=dict(margin=7.0),
                              progress=False)
    assert rows[0]["margin"] == 7.0 and rows[0]["weights"] == "checkpoint step_0000012"  # model.pt skipped
    assert float(_read(os.path.join(out, "metrics.csv"))[0]["margin"]) == 7.0


def test_unknown_test_key_names_it(run, tmp_path):
    with pytest.raises(ConfigError, match="test.bogus.*_toy_scored"):
        ToyScored.evaluate(run, out_dir=str(tmp_path / "o"), overrides=dict(bogus=1), progress=False)


def test_an_exception_in_scoring_or_writing_leaves_no_partial_file(run, tmp_path):
    rd = _copy(run, tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="scoring failed"):
        ToyScored.evaluate(rd, out_dir=out, device="cpu", overrides=dict(fail=True), progress=False)
    assert os.listdir(out) == []
    # old results stay whole when the new scoring fails
    ToyScored.evaluate(rd, out_dir=out, device="cpu", progress=False)
    before = {n: open(os.path.join(out, n)).read() for n in os.listdir(out)}
    with pytest.raises(RuntimeError):
        ToyScored.evaluate(rd, out_dir=out, device="cpu", overwrite=True, overrides=dict(fail=True, margin=3.0),
                           progress=False)
    assert {n: open(os.path.join(out, n)).read() for n in os.listdir(out)} == before
    # json fails halfway through summary.json: the old file is kept, no temporary file is left
    with pytest.raises(TypeError):
        ToyScored.evaluate(rd, out_dir=out, device="cpu", overwrite=True, overrides=dict(bad_json=True),
                           progress=False)
    assert open(os.path.join(out, "summary.json")).read() == before["summary.json"]
    assert _leftovers(out) == []


def test_a_file_not_named_by_result_files_is_an_error(run, tmp_path):
    with pytest.raises(RuntimeError, match="extra.csv.*result_files"):
        ToyScored.evaluate(run, out_dir=str(tmp_path / "o"), device="cpu", overrides=dict(undeclared=True),
                           progress=False)
    assert not os.path.exists(str(tmp_path / "o" / "extra.csv"))


def test_every_task_supplies_scoring_and_result_files():
    import tasks  # noqa: F401  (registers every task)
    from tasks.base import Task
    from util.registry import get

    for name in ("ensemble", "image", "nerf", "moe_inr", "terrain"):
        cls = get("task", name)
        assert cls.evaluate.__func__ is Task.evaluate.__func__, name  # the template, not a copy
        assert cls.score.__func__ is not Task.score.__func__, name
        names = list(cls.result_files(cls.test_config()))
        assert names and all(isinstance(n, str) for n in names), name


# ------------------------------------------------------------------------------------------- task state
def test_task_state_is_saved_with_each_checkpoint_and_read_for_the_weights_scored(run, tmp_path):
    from util.checkpoints import TASK_STATE_FILE, load_task_state, verify_checkpoint

    rd = _copy(run, tmp_path)
    ck6, ck12 = (os.path.join(rd, "checkpoints", f"step_{s:07d}") for s in (6, 12))
    assert os.path.isfile(os.path.join(ck6, TASK_STATE_FILE))
    # ToyL1's state: the steps it trained (0, 3, 6, 9 skipped)
    assert load_task_state(rd) == {"trained": [1, 2, 4, 5, 7, 8, 10, 11]}  # model.pt: the final checkpoint's
    assert load_task_state(rd, os.path.join(rd, "model.pt")) == {"trained": [1, 2, 4, 5, 7, 8, 10, 11]}
    assert load_task_state(rd, ck6) == {"trained": [1, 2, 4, 5]}
    assert verify_checkpoint(ck6) == 6
    # a truncated task_state.pt: the checkpoint is reported damaged, naming the file
    with open(os.path.join(ck6, TASK_STATE_FILE), "r+b") as f:
        f.truncate(20)
    with pytest.raises(DataError, match="task_state.pt"):
        verify_checkpoint(ck6)
    with pytest.raises(DataError, match="task_state.pt"):
        load_task_state(rd, ck6)
    # a run written before task_state.pt: read from Accelerate's custom-object file of the task
    os.remove(os.path.join(ck12, TASK_STATE_FILE))
    assert load_task_state(rd) == {"trained": [1, 2, 4, 5, 7, 8, 10, 11]}
    os.remove(os.path.join(ck12, "custom_checkpoint_1.pkl"))
    assert load_task_state(rd) is None


def test_no_accelerate_file_names_outside_the_legacy_reader():
    """Task state is found through util.checkpoints, never by globbing Accelerate's names in a task."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = []
    for folder in ("tasks", "util"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    if "custom_checkpoint_" in open(path).read():
                        hits.append(os.path.relpath(path, root))
    assert hits == [os.path.join("util", "checkpoints.py")]
