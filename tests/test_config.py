"""Config files: selection, anchors/merge keys, overrides and every error path."""
import textwrap

import pytest
import torch

from util.config import ConfigError, TrainConfig, load_config, run_name, yaml_load
from models.base import FieldModel
from util.registry import build, names, register


class _Net(FieldModel):
    """A FieldModel around a Sequential (optimizers take models of the contract)."""

    def __init__(self, *layers):
        super().__init__()
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@register("model", "_cfgtest_model")
class _TinyModel(FieldModel):
    def __init__(self, cond_dim: int, spatial_dims: int = 3, width: int = 4, depth: int = 1, required_key=None):
        super().__init__()
        self.width, self.depth = width, depth
        self.lin = torch.nn.Linear(spatial_dims + cond_dim, width)


@register("dataset", "_cfgtest_data")
def _tiny_data(path: str, seed: int = 0, scale: float = 1.0):
    return dict(path=path, seed=seed, scale=scale)


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


BASE = """
- &base
  model: {type: _cfgtest_model, width: 8}
  dataset: {type: _cfgtest_data, path: somewhere}
  train: {max_steps: 5}
- <<: *base
  model: {type: _cfgtest_model, width: 16, depth: 3}
- <<: *base
  name: third
"""


def test_select_anchor_and_merge_keys(tmp_path):
    p = write(tmp_path, BASE)
    e0 = load_config(p, 0)
    e1 = load_config(p, 1)
    e2 = load_config(p, 2)
    assert e0["model"]["width"] == 8
    assert e1["model"] == {"type": "_cfgtest_model", "width": 16, "depth": 3}
    assert e1["dataset"]["path"] == "somewhere" and e1["train"]["max_steps"] == 5  # merged from the anchor
    assert e2["name"] == "third" and run_name(e2) == "third"
    assert run_name(e0).endswith("exp_0")
    # default sections filled
    assert e0["optim"]["type"] == "adam" and e0["scheduler"]["type"] == "cosine"


def test_config_id_out_of_range(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"config_id 3 out of range.*3 config"):
        load_config(p, 3)
    with pytest.raises(ConfigError, match="out of range"):
        load_config(p, -1)


def test_unknown_type_lists_registered_names(tmp_path):
    p = write(tmp_path, """
    - model: {type: no_such_model}
      dataset: {type: _cfgtest_data, path: x}
    """)
    with pytest.raises(ConfigError) as e:
        load_config(p, 0)
    assert "no_such_model" in str(e.value) and "_cfgtest_model" in str(e.value)
    p = write(tmp_path, """
    - model: {type: _cfgtest_model}
      dataset: {type: _cfgtest_data, path: x}
      optim: {type: sgd_nope}
    """, "b.yaml")
    with pytest.raises(ConfigError, match="adam"):
        load_config(p, 0)


def test_unknown_key_names_section_and_key(tmp_path):
    p = write(tmp_path, """
    - model: {type: _cfgtest_model, widht: 3}
      dataset: {type: _cfgtest_data, path: x}
    """)
    with pytest.raises(ConfigError, match=r"model\.widht.*accepted keys: .*width"):
        load_config(p, 0)
    p = write(tmp_path, """
    - model: {type: _cfgtest_model}
      dataset: {type: _cfgtest_data, path: x}
      train: {max_step: 3}
    """, "b.yaml")
    with pytest.raises(ConfigError, match=r"train\.max_step"):
        load_config(p, 0)
    p = write(tmp_path, """
    - model: {type: _cfgtest_model}
      dataset: {type: _cfgtest_data, path: x}
      trian: {}
    """, "c.yaml")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(p, 0)


def test_missing_key_and_missing_section(tmp_path):
    p = write(tmp_path, """
    - model: {type: _cfgtest_model}
      dataset: {type: _cfgtest_data}
    """)
    with pytest.raises(ConfigError, match=r"missing key 'dataset\.path'"):
        load_config(p, 0)
    p = write(tmp_path, """
    - model: {type: _cfgtest_model}
    """, "b.yaml")
    with pytest.raises(ConfigError, match="missing section 'dataset'"):
        load_config(p, 0)
    p = write(tmp_path, """
    - model: {width: 3}
      dataset: {type: _cfgtest_data, path: x}
    """, "c.yaml")
    with pytest.raises(ConfigError, match=r"missing key 'model\.type'"):
        load_config(p, 0)


def test_program_supplied_keys_are_refused(tmp_path):
    p = write(tmp_path, """
    - model: {type: _cfgtest_model, cond_dim: 3}
      dataset: {type: _cfgtest_data, path: x}
    """)
    with pytest.raises(ConfigError, match=r"model\.cond_dim.*set by the program"):
        load_config(p, 0)


def test_set_overrides_typed_and_validated(tmp_path):
    p = write(tmp_path, BASE)
    e = load_config(p, 0, ["train.max_steps=10", "model.width=32", "dataset.scale=0.5",
                           "train.run_name=abc", "test.dump_members=[1,2]"])
    assert e["train"]["max_steps"] == 10 and isinstance(e["train"]["max_steps"], int)
    assert e["model"]["width"] == 32 and e["dataset"]["scale"] == 0.5
    assert e["test"]["dump_members"] == [1, 2]
    assert run_name(e) == "abc"
    with pytest.raises(ConfigError, match=r"model\.nope"):
        load_config(p, 0, ["model.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, 0, ["train"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, 0, ["train=3"])
    e = load_config(p, 0, ["dataset={type: _cfgtest_data, path: elsewhere}"])  # replaces the whole section
    assert e["dataset"] == {"type": "_cfgtest_data", "path": "elsewhere"}
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, 0, ["max_steps=3"])


def test_train_section_value_checks(tmp_path):
    with pytest.raises(ConfigError, match="only one of 'epochs' and 'max_steps'"):
        TrainConfig(epochs=1, max_steps=3)
    assert TrainConfig().epochs == 50.0
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"test\.splits.*'val'"):
        load_config(p, 0, ["test.splits=[val]"])


def test_build_checks_keys_directly():
    m = build("model", "_cfgtest_model", injected={"cond_dim": 2}, width=5)
    assert m.width == 5 and m.lin.in_features == 5
    with pytest.raises(ConfigError, match="missing key 'dataset.path'"):
        build("dataset", "_cfgtest_data", section="dataset")
    assert "_cfgtest_model" in names("model")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"), 0)
    p = write(tmp_path, "- model: {type: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p, 0)


def test_param_group_numbers_from_yaml_strings():
    from util.optim import adam

    m = _Net(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = adam(m, lr="1e-3", param_groups={"net.0": {"lr": "3e-4"}})  # YAML reads 3e-4 as a string
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[1]["lr"] == 1e-3
    with pytest.raises(ConfigError, match=r"optim\.param_groups\.net\.0\.lr"):
        adam(m, param_groups={"net.0": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        adam(m, param_groups={"nope": {"lr": 1.0}})


def test_exponent_floats_without_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; configs and --set read it as the float 0.001."""
    p = write(tmp_path, """
    - model: {type: _cfgtest_model, width: 4}
      dataset: {type: _cfgtest_data, path: x, scale: 5e-1}
      optim: {type: adam, lr: 1e-3}
    """)
    e = load_config(p, 0, ["optim.weight_decay=2E-4"])
    assert e["optim"]["lr"] == 0.001 and isinstance(e["optim"]["lr"], float)
    assert e["dataset"]["scale"] == 0.5
    assert e["optim"]["weight_decay"] == 2e-4
    assert yaml_load("a: 1e3\nb: 12\nc: 1.5\nd: e5\ne: '1e-3'") == {"a": 1000.0, "b": 12, "c": 1.5, "d": "e5",
                                                                     "e": "1e-3"}


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_adam_default_matches_multi_tensor(name):
    """optim.fused (default: on for float CPU/CUDA parameters) gives the same parameters as the default
    multi-tensor implementation after several steps."""
    from util import optim

    torch.manual_seed(0)
    base = _Net(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    models, opts = {}, {}
    for fused in (None, False):
        m = _Net(*[torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)])
        m.load_state_dict(base.state_dict())
        models[fused], opts[fused] = m, getattr(optim, name)(m, lr=1e-2, fused=fused)
    assert opts[None].param_groups[0]["fused"] is True and not opts[False].param_groups[0]["fused"]
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    for _ in range(20):
        for k in models:
            opts[k].zero_grad()
            (models[k](x) - y).pow(2).mean().backward()
            opts[k].step()
    for a, b in zip(models[None].parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[None].net[0].weight, base.net[0].weight)             # it did train


# --- issue 11: run names, value checks, duplicate keys ------------------------------------------------------
@pytest.mark.parametrize("bad", [".", "..", "", "  ", "a/b", "../x", "a\\b", "/abs"])
def test_bad_run_names_are_refused_at_load(tmp_path, bad):
    """A run name that is not a plain folder name would put the run (and what --overwrite deletes) elsewhere:
    run_name=. once named log_dir itself."""
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"train\.run_name") as e:
        load_config(p, 0, [f"train.run_name='{bad}'"])
    assert repr(bad) in str(e.value)
    entry = write(tmp_path, BASE.replace("name: third", f"name: '{bad}'"), name="named.yaml")
    with pytest.raises(ConfigError, match=r"'name'|name .*must"):
        load_config(entry, 2)
    load_config(p, 0, ["train.run_name=ok_name.v2"])  # a dot inside a name is fine


@pytest.mark.parametrize("override, key, words", [
    ("train.max_steps=10.5", "train.max_steps", "integer"),
    ("train.max_steps=abc", "train.max_steps", "integer"),
    ("train.log_every=0", "train.log_every", ">= 1"),
    ("train.seed=-1", "train.seed", ">= 0"),
    ("train.checkpoint_every=null", "train.checkpoint_every", "number"),
    ("train.grad_clip=-1", "train.grad_clip", "> 0"),
    ("test.splits=[]", "test.splits", "empty"),
    ("test.resolutions=[]", "test.resolutions", "empty"),
    ("test.ref_k=two", "test.ref_k", "integer"),
    ("test.ssim=maybe", "test.ssim", "true or false"),
    ("model.width=wide", "model.width", "integer"),
    ("model.width=null", "model.width", "integer"),
    ("model.width=4.5", "model.width", "integer"),
    ("dataset.scale=big", "dataset.scale", "number"),
    ("dataset.path=null", "dataset.path", "string"),
    ("optim.lr=fast", "optim.lr", "number"),
    ("optim.lr=null", "optim.lr", "number"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("optim.lr=.nan", "optim.lr", "number"),
    ("optim.betas=[0.9]", "optim.betas", "two numbers"),
    ("optim.betas=[0.9,0.99,0.999]", "optim.betas", "two numbers"),
    ("optim.betas=[0.9,1.5]", "optim.betas", "[0, 1)"),
    ("optim.betas=0.9", "optim.betas", "list of numbers"),
    ("optim.eps=-1e-8", "optim.eps", ">= 0"),
    ("scheduler.warmup_steps=2.5", "scheduler.warmup_steps", "integer"),
    ("scheduler.warmup_steps=-3", "scheduler.warmup_steps", ">= 0"),
    ("scheduler.type=[cosine]", "scheduler.type", "string"),
])
def test_value_types_and_ranges_checked_at_load(tmp_path, override, key, words):
    p = write(tmp_path, BASE)
    typed = {"optim": ["optim.type=adam"], "scheduler": ["scheduler.type=cosine"]}.get(key.split(".")[0], [])
    load_config(p, 0, typed)
    with pytest.raises(ConfigError) as e:
        load_config(p, 0, typed + [override])
    msg = str(e.value)
    assert key in msg and words in msg, msg


@pytest.mark.parametrize("section, override, key, words", [
    ("drrnet", "model.hidden_dim=0", "model.hidden_dim", ">= 1"),
    ("drrnet", "model.spatial_channels=-2", "model.spatial_channels", ">= 1"),
    ("drrnet", "model.spatial_resolutions=[]", "model.spatial_resolutions", "empty"),
    ("drrnet", "model.spatial_resolutions=[8,0]", "model.spatial_resolutions", ">= 2"),
    ("drrnet", "model.spatial_resolutions=[8,x]", "model.spatial_resolutions", "list"),
    ("drrnet", "model.ssr_resolution=-16", "model.ssr_resolution", ">= 2"),
    ("drrnet", "model.cond_resolutions=[[2,4],[0,3]]", "model.cond_resolutions", ">= 2"),
    ("drrnet", "model.out_activation=relu", "model.out_activation", "sigmoid"),
    ("drrnet", "model.init_output_mean=mean", "model.init_output_mean", "'auto'"),
    ("drrnet", "model.use_pi=yes please", "model.use_pi", "true or false"),
    ("kplanes", "model.init_range=[0.1]", "model.init_range", "two numbers"),
    ("kplanes", "model.multiscale=[1,0]", "model.multiscale", ">= 1"),
    ("explorable_inr", "model.dropout=1.5", "model.dropout", "[0, 1)"),
    ("fainr", "model.top_k=0", "model.top_k", ">= 1"),
    ("demo", "dataset.cond_batch=0", "dataset.cond_batch", ">= 1"),
    ("demo", "dataset.cond_batch=null", "dataset.cond_batch", "integer"),
    ("demo", "dataset.resolution=-8", "dataset.resolution", ">= 2"),
    ("demo", "dataset.tau_x=[0.1,-0.1,0.1]", "dataset.tau_x", ">= 0"),
    ("demo", "dataset.augment=vp", "dataset.augment", "vp_sc"),
    ("demo", "dataset.dims=[]", "dataset.dims", "empty"),
    ("demo", "dataset.spatial_log2batch=4.5", "dataset.spatial_log2batch", "integer"),
])
def test_component_values_checked_against_signature(tmp_path, section, override, key, words):
    """Real components: values are checked against the signature's annotations and the range rules, before any
    data exists (the demo root here does not exist and must not be created)."""
    model = {"drrnet": "{type: drrnet}", "kplanes": "{type: kplanes}", "explorable_inr": "{type: explorable_inr}",
             "fainr": "{type: fainr}"}.get(section, "{type: drrnet}")
    root = tmp_path / "never_created"
    p = write(tmp_path, f"- model: {model}\n  dataset: {{type: demo, root: '{root}'}}\n")
    load_config(p, 0)  # the entry itself is fine
    with pytest.raises(ConfigError) as e:
        load_config(p, 0, [override])
    msg = str(e.value)
    assert key in msg and words in msg, msg
    assert not root.exists()


def test_integral_floats_become_ints(tmp_path):
    """YAML reads 1e4 as a float: an int key takes it as the integer it is."""
    p = write(tmp_path, BASE)
    e = load_config(p, 0, ["train.max_steps=1e4", "model.width=16.0"])
    assert e["train"]["max_steps"] == 10000 and type(e["train"]["max_steps"]) is int
    assert e["model"]["width"] == 16 and type(e["model"]["width"]) is int
    assert TrainConfig(max_steps=3.0).max_steps == 3
    with pytest.raises(ConfigError, match=r"train\.max_steps.*10\.5"):
        TrainConfig(max_steps=10.5)


def test_duplicate_yaml_keys_are_errors(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a config file with one names the key and the line."""
    p = write(tmp_path, """
    - model: {type: _cfgtest_model, width: 8}
      dataset: {type: _cfgtest_data, path: somewhere}
      optim:
        type: adam
        lr: 1e-3
        lr: 1e-2
    """)
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' on line 7.*line 6"):
        load_config(p, 0)
    p = write(tmp_path, """
    - model: {type: _cfgtest_model, width: 8}
      dataset: {type: _cfgtest_data, path: somewhere}
    - model: {type: _cfgtest_model}
      model: {type: _cfgtest_model, width: 4}
      dataset: {type: _cfgtest_data, path: somewhere}
    """, name="dup2.yaml")
    with pytest.raises(ConfigError, match=r"dup2\.yaml.*duplicate key 'model' on line 5"):
        load_config(p, 0)
    # a merge key followed by an explicit key is an override, not a duplicate
    merged = write(tmp_path, BASE, name="merge.yaml")
    assert load_config(merged, 1)["model"]["width"] == 16
    with pytest.raises(ConfigError, match="duplicate key 'x'"):
        load_config(merged, 0, ["model={type: _cfgtest_model, x: 1, x: 2}"])


def test_set_and_test_values_are_read_like_config_files():
    """train.py --set and test.py --test values go through the config files' YAML reader: 1e-3 is a float
    (plain PyYAML reads it as the string '1e-3', which the test section then refused)."""
    from util.config import apply_overrides, parse_test_overrides

    ov = parse_test_overrides(["error_gain=1e-3", "test.max_tiles=32", "isovalues=[0.5, 5E-1]", "dump_members="])
    assert ov == {"error_gain": 0.001, "max_tiles": 32, "isovalues": [0.5, 0.5], "dump_members": None}
    assert type(ov["error_gain"]) is float
    exp = apply_overrides({"optim": {"type": "adam"}}, ["optim.lr=1e-3"])
    assert exp["optim"]["lr"] == 0.001 and type(exp["optim"]["lr"]) is float
    for bad in ("error_gain", "a.b=1", "=1"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_test_overrides([bad])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_test_overrides(["x=[1"])
    with pytest.raises(ConfigError, match="duplicate key"):
        parse_test_overrides(["x={a: 1, a: 2}"])
