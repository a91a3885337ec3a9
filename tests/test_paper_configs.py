"""The paper configs (configs/{nyx,mpas_graph,clover_600}, spatio_cond_gen variants, ablations, demo ablations):
they load, their models build on CPU without data with the paper's parameter counts (Table 5, baselines spec),
they carry the training settings of spec 3.2, 3.4 and 4, and test_flops.py runs on every DRR-Net paper config."""
import glob
import os
import re

import pytest
import torch

import datasets.unstructured  # noqa: F401  registers "unstructured" until datasets/__init__.py imports it
from models import drrnet as drrnet_mod
from models import explorable_inr, fainr, kplanes
from util.config import load_config, read_config_file
from util.build import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

COND_DIM = {"nyx": 3, "mpas_graph": 4, "clover_600": 6}
MODULE_KEY = {"nyx": "nyx", "mpas_graph": "mpas", "clover_600": "clover"}
# Table 5 totals, printed with one decimal in millions.
DRRNET_PAPER = {"nyx": 8.9e6, "mpas_graph": 4.6e6, "clover_600": 0.9e6}
# Measured trainable parameters of our DRR-Net (models/drrnet.py notes the same numbers).
DRRNET_OURS = {"nyx": 8_887_721, "mpas_graph": 4_642_945, "clover_600": 854_345}
# Baselines spec 1.5 / 2.3 / 3.6: exact trainable counts, config ids 0 K-Planes, 1 Explorable-INR, 2 FA-INR.
BASELINES_EXACT = {"nyx": [12_101_505, 14_720_257, 9_520_329],
                   "mpas_graph": [13_493_505, 14_720_513, 969_462],
                   "clover_600": [6_794_625, 4_464_641, 970_102]}
BASELINE_TYPES = ["kplanes", "explorable_inr", "fainr"]
BASELINE_MODULES = {"kplanes": kplanes, "explorable_inr": explorable_inr, "fainr": fainr}
# Points per step (spec 3.2 Table 6 for DRR-Net; baselines spec 0): (cond_batch, spatial_log2batch).
BATCH = {("nyx", "drrnet"): (16, 16), ("nyx", "kplanes"): (16, 16), ("nyx", "explorable_inr"): (16, 16),
         ("nyx", "fainr"): (16, 15)}
BATCH.update({("mpas_graph", t): (16, 16) for t in ["drrnet"] + BASELINE_TYPES})
BATCH.update({("clover_600", t): (32, 12) for t in ["drrnet"] + BASELINE_TYPES})
IMPORTANCE = {"nyx": "both", "mpas_graph": "coord", "clover_600": "coord"}
# Spec 3.4 noise, used by the DRR-Net paper configs (VP-SC) on Nyx and Cloverleaf.
NOISE = {"nyx": dict(tau_x=1 / 255, sigma_x=0.6 / 255, tau_c=1.5e-4, sigma_c=9e-5),
         "clover_600": dict(tau_x=1 / 128, sigma_x=0.6 / 128, tau_c=0.0016665, sigma_c=0.001)}
# TFLOPs per 1e9 points, paper Table 5.
PAPER_TFLOPS = {"nyx": 57.2, "mpas_graph": 47.3, "clover_600": 52.6}


def paper_files():
    """(dataset, file, spatio_cond_gen) of every paper config file."""
    out = []
    for ds in COND_DIM:
        for f in ("drrnet", "baselines"):
            out.append((ds, os.path.join(CONFIGS, ds, f + ".yaml"), False))
            if ds != "mpas_graph":
                out.append((ds, os.path.join(CONFIGS, ds, "spatio_cond_gen", f + ".yaml"), True))
    return out


PAPER_ENTRIES = [(ds, path, scg, i) for ds, path, scg in paper_files() for i in range(len(read_config_file(path)))]
ENTRY_IDS = [f"{os.path.relpath(p, CONFIGS)}:{i}" for _, p, _, i in PAPER_ENTRIES]


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _norm(v):
    """tuples -> lists recursively (YAML gives lists)."""
    if isinstance(v, (list, tuple)):
        return [_norm(a) for a in v]
    return v


def test_every_paper_file_exists_and_names_are_unique():
    names = []
    for ds, path, scg in paper_files():
        assert os.path.isfile(path), path
        n = len(read_config_file(path))
        assert n == (1 if path.endswith("drrnet.yaml") else 3), path
        names += [load_config(path, i)["name"] for i in range(n)]
    assert len(names) == len(set(names)) == 20  # 3 datasets x 4 models + 2 x 4 spatio-conditional


@pytest.mark.parametrize("ds,path,scg,cid", PAPER_ENTRIES, ids=ENTRY_IDS)
def test_paper_model_parameter_count(ds, path, scg, cid):
    exp = load_config(path, cid)
    typ = exp["model"]["type"]
    model = build_model(exp, COND_DIM[ds], 3)
    n = n_trainable(model)
    if typ == "drrnet":
        paper = DRRNET_PAPER[ds]
        # Within 5% of Table 5, or within half of the printed digit (0.05M): Cloverleaf measures 0.854M, which is
        # -5.07% of the printed 0.9M but rounds to it (0.85M <= n < 0.95M).
        assert abs(n - paper) <= max(0.05 * paper, 0.05e6), (n, paper)
        assert n == DRRNET_OURS[ds]
    else:
        assert typ == BASELINE_TYPES[cid]
        assert n == BASELINES_EXACT[ds][cid], (typ, n)


@pytest.mark.parametrize("ds,path,scg,cid", PAPER_ENTRIES, ids=ENTRY_IDS)
def test_model_keys_are_the_modules_paper_configs(ds, path, scg, cid):
    exp = load_config(path, cid)
    typ = exp["model"]["type"]
    module = drrnet_mod if typ == "drrnet" else BASELINE_MODULES[typ]
    want = {k: _norm(v) for k, v in module.PAPER_CONFIGS[MODULE_KEY[ds]].items() if k != "cond_dim"}
    got = {k: _norm(v) for k, v in exp["model"].items() if k != "type"}
    assert got == want


@pytest.mark.parametrize("ds,path,scg,cid", PAPER_ENTRIES, ids=ENTRY_IDS)
def test_training_settings(ds, path, scg, cid):
    exp = load_config(path, cid)
    typ, d, o = exp["model"]["type"], exp["dataset"], exp["optim"]
    # spec 4: Adam 1e-4, betas (0.9, 0.999), eps 1e-15, cosine to 1e-6 per step, 50 epochs
    assert o["type"] == "adam" and float(o["lr"]) == 1e-4 and list(o["betas"]) == [0.9, 0.999]
    assert float(o["eps"]) == 1e-15
    assert exp["scheduler"] == {"type": "cosine", "eta_min": 1e-6}
    assert exp["train"] == {"epochs": 50}
    # FA-INR: SIREN encoders at 1e-5 on Nyx and Cloverleaf, one group on MPAS (the group exists in the model)
    enc_lr = fainr.PAPER_ENCODER_LR[MODULE_KEY[ds]] if typ == "fainr" else None
    if enc_lr is None:
        assert "param_groups" not in o
    else:
        assert o["param_groups"] == {"encoder_mlps": {"lr": enc_lr}}
        from util.optim import group_parameters

        groups = group_parameters(build_model(exp, COND_DIM[ds], 3), o["param_groups"])
        enc = [g for g in groups if g.get("lr") == enc_lr]
        assert len(enc) == 1 and len(enc[0]["params"]) > 0
    # batches (Table 6 / baselines spec 0), importance (none in the super-resolution task), Nyx log transform
    assert (d["cond_batch"], d["spatial_log2batch"]) == BATCH[(ds, typ)]
    assert d["importance"] == ("none" if scg else IMPORTANCE[ds])
    assert d.get("log_transform", False) == (ds == "nyx")
    assert d["type"] == ("unstructured" if ds == "mpas_graph" else "ensemble")
    for key in ("data_dir", "cond_path", "cond_split_path") + (("coords_path",) if ds == "mpas_graph" else ()):
        assert d[key].startswith("/PATH/TO/"), key
    if ds == "mpas_graph":
        assert d["coords_spherical"] is True and exp["test"].get("ssim") is False
    # augmentation: VP-SC with the spec 3.4 noise for DRR-Net on Nyx / Cloverleaf; none otherwise
    if typ == "drrnet" and ds in NOISE:
        assert d["augment"] == "vp_sc" and d["vp_k"] == 8 and d["vp_power"] == 2.0
        for k, v in NOISE[ds].items():
            assert float(d[k]) == pytest.approx(v, rel=1e-6), k
    else:
        assert d.get("augment", "none") == "none"
    # spatio-conditional task: x2 downsampling, evaluated at full and training resolution
    assert d.get("downsample", 1) == (2 if scg else 1)
    assert exp["test"]["resolutions"] == (["full", "train"] if scg else ["full"])
    assert exp["test"]["splits"] == ["test", "train"]


def test_spatio_cond_gen_differs_from_base_only_in_the_task():
    for ds in ("nyx", "clover_600"):
        for f in ("drrnet", "baselines"):
            base = os.path.join(CONFIGS, ds, f + ".yaml")
            scg = os.path.join(CONFIGS, ds, "spatio_cond_gen", f + ".yaml")
            for i in range(len(read_config_file(base))):
                a, b = load_config(base, i), load_config(scg, i)
                assert a["model"] == b["model"] and a["optim"] == b["optim"] and a["train"] == b["train"]
                da = {k: v for k, v in a["dataset"].items() if k != "importance"}
                db = {k: v for k, v in b["dataset"].items() if k not in ("importance", "downsample")}
                assert da == db


def _flops(capsys, path, cond_dim, overrides=()):
    """Run test_flops.py's main in this process (so the "unstructured" dataset type is registered) and parse
    its one result row: (TFLOPs per 1e9 points, params)."""
    import test_flops

    args = ["--config", path, "--cond_dim", str(cond_dim), "--spatial_dims", "3"]
    for o in overrides:
        args += ["--set", o]
    test_flops.main(args)
    out = capsys.readouterr().out
    row = [l for l in out.splitlines() if re.match(r"\s*0\s+drrnet", l)]
    assert len(row) == 1, out
    parts = row[0].split()
    return float(parts[2]), int(parts[3].replace(",", ""))


# Bakes at the paper's SSR lattices (128^3 / 160x160x60 vertices through the spatial refiner) take 30-60 s each
# on the 2-core CPU. The FLOPs of a BAKED DRR-Net do not depend on the SSR resolution
# (a query costs an interpolation of the cached lattice and the MLPs; measured identical: nyx 55.936, mpas
# 45.824, clover 51.712 at the paper SSR and at 1/4 of it) and neither does the parameter count (SSR and PE
# hold no parameters), so the suite runs test_flops.py on every paper config with a coarse SSR lattice and
# checks both numbers against the full-size measurement; the unmodified configs run too (marked slow).
SMALL_SSR = {"nyx": "32", "mpas_graph": "[32,32,12]", "clover_600": "32"}
MEASURED_TFLOPS = {"nyx": 55.936, "mpas_graph": 45.824, "clover_600": 51.712}


@pytest.mark.parametrize("ds", list(COND_DIM))
def test_flops_script_on_paper_drrnet(ds, capsys):
    path = os.path.join(CONFIGS, ds, "drrnet.yaml")
    tflops, params = _flops(capsys, path, COND_DIM[ds], [f"model.ssr_resolution={SMALL_SSR[ds]}"])
    assert params == DRRNET_OURS[ds]
    assert tflops == pytest.approx(MEASURED_TFLOPS[ds], rel=1e-3)
    assert tflops == pytest.approx(PAPER_TFLOPS[ds], rel=0.05)  # paper Table 5: within 5%


@pytest.mark.slow  # paper-size bakes (30-60 s each)
@pytest.mark.parametrize("ds", list(COND_DIM))
def test_flops_script_on_paper_drrnet_full_size(ds, capsys):
    tflops, params = _flops(capsys, os.path.join(CONFIGS, ds, "drrnet.yaml"), COND_DIM[ds])
    assert params == DRRNET_OURS[ds] and tflops == pytest.approx(MEASURED_TFLOPS[ds], rel=1e-3)


# ------------------------------------------------------------------------------------------------ ablations
ABL = os.path.join(CONFIGS, "ablations", "clover_600_drrnet.yaml")
AUG = os.path.join(CONFIGS, "ablations", "clover_600_augment.yaml")
DEMO_ABL = os.path.join(CONFIGS, "demo", "ablations.yaml")
COMPONENTS = ["embedding_only", "pi_only", "refiner_no_pi", "spatial_refiner_only", "full"]


def _ablation_table(path):
    return [load_config(path, i) for i in range(len(read_config_file(path)))]


def test_clover_drrnet_ablations():
    exps = _ablation_table(ABL)
    base = load_config(os.path.join(CONFIGS, "clover_600", "drrnet.yaml"), 0)
    assert len(exps) == 14
    assert [e["model"]["variant"] for e in exps[:5]] == COMPONENTS
    assert [e["model"]["pe_frequencies"] for e in exps[5:10]] == [2, 4, 6, 8, 10]
    assert [e["model"]["ssr_resolution"] for e in exps[10:14]] == [48, 64, 96, 128]
    for i, e in enumerate(exps):
        assert e["dataset"] == base["dataset"] and e["optim"] == base["optim"] and e["train"] == base["train"]
        changed = {k for k in set(e["model"]) | set(base["model"]) if e["model"].get(k) != base["model"].get(k)}
        assert changed <= {"variant", "pe_frequencies", "ssr_resolution"}, (i, changed)
        model = build_model(e, 6, 3)  # builds (no bake) on CPU
        flags = drrnet_mod.VARIANTS[e["model"]["variant"]]
        assert model.use_pi == flags.get("use_pi", True)
    # sizes: the refiners add parameters (pi itself has none; it only widens the fusion layer's input)
    n = [n_trainable(build_model(e, 6, 3)) for e in exps[:5]]
    assert n[0] < n[1] < n[3] < n[4] == DRRNET_OURS["clover_600"] and n[0] < n[2]


def test_clover_augmentation_study():
    from datasets.augment import make_augmentation

    exps = _ablation_table(AUG)
    assert len(exps) == 16
    modes = ["none", "vc", "vp_s", "vp_sc"]
    for j, typ in enumerate(["drrnet"] + BASELINE_TYPES):
        for k, mode in enumerate(modes):
            e = exps[4 * j + k]
            assert e["model"]["type"] == typ and e["dataset"]["augment"] == mode, e["name"]
            paper = load_config(os.path.join(CONFIGS, "clover_600", "drrnet.yaml" if typ == "drrnet"
                                             else "baselines.yaml"), 0 if typ == "drrnet" else j - 1)
            assert e["model"] == paper["model"] and e["optim"] == paper["optim"]
            d = e["dataset"]
            aug = make_augmentation(mode, 3, 6, d.get("sigma_x"), d.get("tau_x"), d.get("sigma_c"), d.get("tau_c"),
                                    d.get("vp_k", 8), d.get("vp_power", 2.0))
            if aug.perturbs_x:
                assert aug.tau_x[0] == pytest.approx(1 / 128) and aug.sigma_x[0] == pytest.approx(0.6 / 128)
            if aug.perturbs_c:
                assert aug.tau_c[0] == pytest.approx(0.0016665) and aug.sigma_c[0] == pytest.approx(0.001)


def test_demo_ablations_build_train_and_bake(tmp_path):
    exps = _ablation_table(DEMO_ABL)
    demo = load_config(os.path.join(CONFIGS, "demo", "drrnet.yaml"), 0)
    assert len(exps) == 11
    assert [e["model"]["variant"] for e in exps[:5]] == COMPONENTS
    assert [e["model"]["pe_frequencies"] for e in exps[5:8]] == [2, 4, 6]
    assert [e["model"]["ssr_resolution"] for e in exps[8:11]] == [16, 24, 32]
    torch.manual_seed(0)
    x, c = torch.rand(2, 50, 3) * 2 - 1, torch.rand(2, 4)
    for e in exps:
        assert e["dataset"] == demo["dataset"] and e["train"] == demo["train"] and e["optim"] == demo["optim"]
        model = build_model(e, 4, 3)
        model.train()
        model(x, c).square().mean().backward()
        model.eval()
        with torch.no_grad():
            ref = model(x, c)
            model.bake()
            torch.testing.assert_close(model(x, c), ref, rtol=1e-4, atol=1e-5)


def test_demo_ablations_run_with_start_jobs_dry_run():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "start_jobs.py", "configs/demo/ablations.yaml", "--dry-run", "--gpus", ""],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert sum("train.py" in l for l in lines) == 11 and sum("test.py" in l for l in lines) == 11


def test_every_yaml_under_configs_loads():
    files = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
    files = [f for f in files if os.sep + "accl" + os.sep not in f]
    for f in files:
        for i in range(len(read_config_file(f))):
            load_config(f, i)
