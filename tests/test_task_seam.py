"""The task seam: a toy task (its own dataset, model, loss, state and test section) trains through the one
training loop; the ensemble task stays the default."""
import csv
import dataclasses
import json
import os

import pytest
import torch
import yaml
from torch import nn

from datasets.base import Dataset
from models.base import FieldModel
from tasks.base import StepOutput, Task
from util.config import ConfigError, check_dataclass_fields, load_config
from util.registry import register
from util.run_dir import run_dir_of


@register("dataset", "_toy_targets")
class ToyTargets(Dataset):
    """Two fixed target values; batches carry no coordinates that matter.

    Args:
        seed: injected.
    """

    cond_dim, spatial_dims, out_dim, steps_per_epoch = 0, 1, 2, 4

    def __init__(self, seed: int = 0):
        self.target = torch.tensor([0.25, -0.5])

    def sample_batch(self, step, rank=0):
        return {"x": torch.zeros(1, 3, 1), "c": torch.zeros(1, 0), "v": self.target.expand(1, 3, 2).clone()}

    def meta(self):
        return {"toy": True}


@register("model", "_toy_const")
class ToyConst(FieldModel):
    """A learned constant of out_dim values.

    Args:
        cond_dim, spatial_dims, out_dim: injected.
    """

    def __init__(self, cond_dim: int, spatial_dims: int, out_dim: int):
        super().__init__()
        self.made_with = (cond_dim, spatial_dims, out_dim)
        self.value = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x, c):
        return self.value.expand(x.shape[0], x.shape[1], -1)


@dataclasses.dataclass
class ToyTestConfig:
    """Attributes:
        margin: a toy key.
    """

    margin: float = 0.1

    def __post_init__(self):
        check_dataclass_fields(self, "test")


@register("task", "_toy_l1")
class ToyL1(Task):
    """L1 loss; skips every third step; counts the steps it trained in its state.

    Args:
        dataset: injected.
        skip_every: skip steps whose index is a multiple of this (0: none).
    """

    test_config = ToyTestConfig

    def __init__(self, dataset, skip_every: int = 3):
        super().__init__(dataset)
        self.skip_every = skip_every
        self.trained = []

    def training_step(self, model, batch, step):
        if self.skip_every and step % self.skip_every == 0:
            return None
        self.trained.append(step)
        pred = model(batch["x"], batch["c"])
        l1 = (pred - batch["v"]).abs().mean()
        return StepOutput(l1, {"l1": l1.detach()}, pred)

    def state_dict(self):
        return {"trained": list(self.trained)}

    def load_state_dict(self, state):
        self.trained = list(state["trained"])


def toy_config(tmp_path, **extra):
    exp = dict(task=dict(type="_toy_l1"), dataset=dict(type="_toy_targets"),
               model=dict(type="_toy_const"), optim=dict(type="adam", lr=0.02),
               scheduler=dict(type="constant"),
               train=dict(max_steps=12, log_dir=str(tmp_path / "runs"), checkpoint_every_steps=6, log_every=3,
                          keep_checkpoints=5, timing_steps=0),
               test=dict(margin=0.5), **extra)
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump([exp]))
    return str(p)


def _train(path, **kw):
    from util.training import train

    return train(load_config(path, 0), progress=False, **kw)


def test_toy_task_trains_through_the_one_loop(tmp_path):
    rd = _train(toy_config(tmp_path))
    state = torch.load(os.path.join(rd, "model.pt"))
    # 12 steps, steps 0, 3, 6, 9 skipped: 8 Adam steps of a constant gradient (L1: sign(value - target) / 2 per
    # channel), each moving lr towards the target (no step skipped: 12 x lr; a skipped step still stepping: more)
    assert torch.allclose(state["value"], torch.tensor([8 * 0.02, -8 * 0.02]), atol=1e-5)
    meta = json.load(open(os.path.join(rd, "meta.json")))
    assert meta["task"] == "_toy_l1" and meta["model_inputs"] == {"cond_dim": 0, "spatial_dims": 1, "out_dim": 2}
    rows = list(csv.DictReader(open(os.path.join(rd, "log.csv"))))
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    assert all(r["psnr"] == "nan" for r in rows)  # no "mse" term: no PSNR claimed
    # loss of the interval = mean of the trained steps' L1 (|0.375 - v|-type values decrease)
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[0] < 0.375


def test_toy_task_state_survives_resume(tmp_path):
    cfg = toy_config(tmp_path)
    rd = _train(cfg)
    full = torch.load(os.path.join(rd, "model.pt"))["value"].clone()
    # resume from the step-6 checkpoint: the task state restored, steps 6..11 rerun, same result
    import shutil

    shutil.rmtree(os.path.join(rd, "checkpoints", "step_0000012"))
    with open(os.path.join(rd, "checkpoints", "latest"), "w") as f:
        f.write("step_0000006")
    os.remove(os.path.join(rd, "finished.json"))
    from util.training import train

    seen = {}
    orig = ToyL1.load_state_dict

    def spy(self, state):
        seen["trained"] = list(state["trained"])
        orig(self, state)

    ToyL1.load_state_dict = spy
    try:
        train(load_config(cfg, 0), resume=True, progress=False)
    finally:
        ToyL1.load_state_dict = orig
    assert seen["trained"] == [1, 2, 4, 5]
    assert torch.equal(torch.load(os.path.join(rd, "model.pt"))["value"], full)


def test_task_section_defaults_and_errors(tmp_path):
    from tests.test_train import tiny_config

    exp = load_config(tiny_config(tmp_path), 0)
    assert exp["task"] == {"type": "ensemble"}
    p = toy_config(tmp_path)
    bad = yaml.safe_load(open(p))
    bad[0]["test"] = {"chunk_size": 10}  # an ensemble test key: not a key of this task's test section
    open(p, "w").write(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="test.chunk_size.*accepted keys: margin"):
        load_config(p, 0)
    bad[0]["test"] = {}
    bad[0]["task"] = {"type": "_toy_l1", "dataset": "x"}
    open(p, "w").write(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="task.dataset"):
        load_config(p, 0)
    bad[0]["task"] = {"type": "no_such_task"}
    open(p, "w").write(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="unknown task type 'no_such_task'.*ensemble"):
        load_config(p, 0)
    bad[0]["task"] = {"type": "_toy_l1"}
    bad[0]["model"] = {"type": "_toy_const", "out_dim": 4}  # set by the program from the task
    open(p, "w").write(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="model.out_dim"):
        load_config(p, 0)


def test_test_py_dispatches_to_the_runs_task(tmp_path, capsys, monkeypatch):
    rd = _train(toy_config(tmp_path))
    calls = {}

    def fake_evaluate(cls, run_dir, **kw):
        calls["run"], calls["kw"] = run_dir, kw
        return [{"predictor": "model", "l1": 0.1}]

    monkeypatch.setattr(ToyL1, "evaluate", classmethod(fake_evaluate))
    from test import main

    main(["--run", rd, "--no_progress"])
    assert calls["run"] == rd and calls["kw"]["overrides"] == {}
    assert "l1" in capsys.readouterr().out


def test_ensemble_mode_rules_do_not_apply_to_other_dataset_types_and_components_declare_rules(tmp_path):
    """dataset.augment of the ensemble family is checked for those types only; a component's own
    ``config_rules`` are checked at load."""
    from util.config import validate_experiment

    with pytest.raises(ConfigError, match="dataset.augment"):
        validate_experiment(dict(model=dict(type="drrnet"), dataset=dict(type="demo", augment="tile_flip")))
    ToyTargetsRules.config_rules = {"scale": lambda v: None if v > 0 else "must be > 0"}
    try:
        exp = validate_experiment(dict(task=dict(type="_toy_l1"), model=dict(type="_toy_const"),
                                       dataset=dict(type="_toy_rules", augment="tile_flip", scale=2.0)))
        assert exp["dataset"]["augment"] == "tile_flip"
        with pytest.raises(ConfigError, match="dataset.scale.*must be > 0"):
            validate_experiment(dict(task=dict(type="_toy_l1"), model=dict(type="_toy_const"),
                                     dataset=dict(type="_toy_rules", augment="x", scale=-1.0)))
    finally:
        ToyTargetsRules.config_rules = None


@register("dataset", "_toy_rules")
class ToyTargetsRules(ToyTargets):
    """ToyTargets with two keys of its own.

    Args:
        augment: any string (this type's own modes).
        scale: a positive number.
        seed: injected.
    """

    config_rules = None

    def __init__(self, augment: str = "none", scale: float = 1.0, seed: int = 0):
        super().__init__(seed)


def test_empty_list_allowed_only_where_empty_means_something(tmp_path):
    """test.ptq_bits: [] (no quantization table) loads; an empty list elsewhere is still an error."""
    from util.config import check_value

    assert check_value([], "List[int]", "test.ptq_bits") == []
    with pytest.raises(ConfigError, match="must not be an empty list"):
        check_value([], "List[int]", "model.spatial_resolutions")


def test_every_task_refuses_unknown_test_overrides():
    # test.py --test KEY=VALUE reaches each task as overrides; a misspelt key must be named, never ignored
    import tasks  # noqa: F401  (registers every task)
    from util.config import merge_test_config
    from util.registry import get, names

    for name in names("task"):
        cls = get("task", name).test_config
        with pytest.raises(ConfigError, match=f"test.bogus_key' for task type '{name}'"):
            merge_test_config(cls, {}, {"bogus_key": 1}, name)
        field = dataclasses.fields(cls)[0]
        ok = merge_test_config(cls, {}, {field.name: getattr(cls(), field.name)}, name)
        assert isinstance(ok, cls)


def test_validation_only_for_tasks_that_have_one(tmp_path):
    # train.val_every_steps on a task without a validation split is a config error naming the task
    import tasks  # noqa: F401
    from util.registry import get, names

    assert get("task", "terrain").has_validation and not get("task", "ensemble").has_validation
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo", "drrnet.yaml")
    with pytest.raises(ConfigError, match="train.val_every_steps.*task 'ensemble' has no validation"):
        load_config(demo, 0, ["train.val_every_steps=5"])
    terrain = os.path.join(os.path.dirname(demo), "..", "terrain", "demo.yaml")
    assert load_config(terrain, 0, ["train.val_every_steps=5"])["train"]["val_every_steps"] == 5
    assert "terrain" in names("task")
