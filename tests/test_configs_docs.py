"""Every shipped config validates and builds its model; every config key is documented and docs/config.md is current."""
import glob
import os

import pytest

from util.config import load_config, read_config_file
from util.docs import DOC_PATH, render, undocumented
from util.build import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if os.sep + "accl" + os.sep not in p)


def test_there_are_configs():
    assert any(p.endswith(os.path.join("demo", "drrnet.yaml")) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_validates(path):
    for i in range(len(read_config_file(path))):
        exp = load_config(path, i)
        assert exp["model"]["type"] and exp["dataset"]["type"]


def test_demo_configs_build_their_models():
    for path in CONFIGS:
        if os.sep + "demo" + os.sep not in path:
            continue
        for i in range(len(read_config_file(path))):
            model = build_model(load_config(path, i), cond_dim=4, spatial_dims=3)
            assert sum(p.numel() for p in model.parameters()) > 0


def test_every_config_key_is_documented():
    assert undocumented() == []


def test_config_reference_is_current():
    with open(DOC_PATH) as f:
        assert f.read() == render(), "docs/config.md is out of date: run python -m util.docs"
