"""configs/moe_inr: the paper entries follow appendix Table 1 (M -> CR by Eq. 1 and the Table 6 sizes) and the
paper's training settings; the demo entries load and compare equal budgets."""
import os

import pytest

from models.moe_inr import moe_param_count
from util.config import load_config, read_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "configs", "moe_inr", "paper.yaml")
DEMO = os.path.join(ROOT, "configs", "moe_inr", "demo.yaml")
T = {"vortex": 90, "ionization": 100, "combustion": 100, "argon": 150, "tangaroa": 150}  # spec Table 6


def test_paper_entries_match_table1():
    entries = read_config_file(PAPER)
    assert len(entries) == 23
    for i, e in enumerate(entries):
        exp = load_config(PAPER, i)
        name = exp["name"]
        ds = name.split("_")[1]
        cr_table = int(name.split("_cr")[1])
        M, k = exp["model"]["M"], exp["model"]["k"]
        assert k == 7 and exp["task"]["type"] == "moe_inr" and exp["task"]["pretrain"] == "kmeans"
        assert exp["optim"]["lr"] == pytest.approx(2e-5) and exp["dataset"]["batch_size"] == 16000
        assert exp["train"]["epochs"] == 300 and exp["task"]["stage1_epochs"] == 30
        z, y, x = exp["dataset"]["dims"]
        cr = z * y * x * T[ds] * 4 / (2 * moe_param_count(M, k))
        if ds == "argon":  # the published row is inconsistent (spec 6): Eq. 1 gives 3,777
            assert round(cr) == 3777
        else:
            assert cr == pytest.approx(cr_table, rel=0.025), name
    vortex = [load_config(PAPER, i) for i in range(5)]
    assert [round(256 ** 3 * 90 * 4 / (2 * moe_param_count(e["model"]["M"], 7))) for e in vortex] == \
        [1252, 2510, 5065, 10205, 20267]


def test_demo_entries_load_with_near_equal_budgets():
    a, b = load_config(DEMO, 0), load_config(DEMO, 1)
    assert a["task"]["type"] == b["task"]["type"] == "moe_inr"
    pa, pb = moe_param_count(a["model"]["M"], 7), moe_param_count(b["model"]["M"], 1)
    assert b["model"]["k"] == 1 and abs(pa - pb) / pa < 0.06 and pb >= pa  # k = 1 never gets less
