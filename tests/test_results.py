"""util.results (the collector) and the tables of the ensemble and image tasks (tasks/<task>/tables.py), from
hand-written run directories (nothing is trained)."""
import csv
import json
import logging
import math
import os

import pytest
import torch
import yaml

from tasks.ensemble import tables as ET
from tasks.image import tables as IT
from util import results as R
from tasks.ensemble.evaluation import DATASET_FIELDS

REFS = ("mean_field", "nearest_member", "idw_k8_p2")


def metrics_row(predictor, split, resolution, rel_l2, psnr, ssim, members=5, infer_s=float("nan"), wins=None,
                weights="model.pt", step=10):
    """A metrics.csv row as test.py writes it; ``wins`` = (vs mean, vs nearest, vs idw) for model rows."""
    row = dict(predictor=predictor, split=split, resolution=resolution, members=members, rel_l2=rel_l2,
               psnr_dataset=psnr, psnr_member_mean=psnr + 0.5, ssim=ssim, md=0.5, mse=10 ** (-psnr / 10),
               bake_s=float("nan") if predictor != "model" else 0.01, infer_s=infer_s,
               infer_s_per_member=infer_s / members, points_per_s=1e6, weights=weights, step=step, total_steps=10)
    if wins is not None:
        row.update(wins_vs_mean=wins[0], wins_vs_nearest=wins[1], wins_vs_idw=wins[2], wins_of=members)
    return row


def ref_rows(resolution="full", shift=0.0):
    return [metrics_row("mean_field", "test", resolution, 0.25 + shift, 20.0, 0.5),
            metrics_row("nearest_member", "test", resolution, 0.125, 24.0, 0.75),
            metrics_row("idw_k8_p2", "test", resolution, 0.1, 25.0, 0.8)]


def make_run(root, name, model_type="drrnet", rows=None, dataset=None, finished=True, evaluated=True,
             train_h=1.25, model=None):
    """A run directory as train.py + test.py leave it (config.yaml, meta.json, timing.json, finished.json,
    eval/metrics.csv), written by hand."""
    d = root / name
    (d / "eval").mkdir(parents=True)
    cfg = dict(name=name, model=model or dict(type=model_type),
               dataset=dataset or dict(type="demo", root=str(root / "data" / "blast")),
               train=dict(max_steps=10, log_dir=str(root)))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "meta.json").write_text(json.dumps(dict(cond_dim=2, spatial_shape=[6, 6])))
    if train_h is not None:
        (d / "timing.json").write_text(json.dumps(dict(mean_step_s=0.01, total_steps=10, estimated_train_h=train_h)))
    if finished:
        (d / "finished.json").write_text(json.dumps(dict(steps=10)))
    if evaluated:
        with open(d / "eval" / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=DATASET_FIELDS)
            w.writeheader()
            for r in rows if rows is not None else []:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return str(d)


def cond_rows(rel, psnr, ssim, infer_s, wins=(5, 4, 3), **kw):
    return ([metrics_row("model", "test", "full", rel, psnr, ssim, infer_s=infer_s, wins=wins, **kw)] + ref_rows()
            + [metrics_row("model", "train", "full", rel / 2, psnr + 3, ssim, members=20, infer_s=2 * infer_s)])


class FakeModel(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.frozen = torch.nn.Parameter(torch.zeros(7), requires_grad=False)


@pytest.fixture
def fake_loader(monkeypatch):
    """load_trained_model replaced: a model whose trainable parameter count depends on the model type."""
    sizes = {"drrnet": 8_912_345, "kplanes": 12_100_000, "fainr": 4745}

    def load(run_dir, checkpoint=None, map_location="cpu"):
        exp = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
        return FakeModel(sizes.get(exp["model"]["type"], 10)), exp, dict(cond_dim=2, spatial_shape=[6, 6])

    import util.build

    monkeypatch.setattr(util.build, "load_trained_model", load)
    return sizes


def table_lines(md, title_start):
    """Body rows (lists of stripped cells) of the Markdown table under the heading starting with title_start."""
    lines = md.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith("## " + title_start))
    out = []
    for l in lines[i + 4:]:
        if not l.startswith("|"):
            break
        out.append([c.strip() for c in l.strip().strip("|").split("|")])
    header = [c.strip() for c in lines[i + 2].strip().strip("|").split("|")]
    return header, out


def test_formatting():
    assert R.fmt_rel_l2(0.0318) == "3.18e-2"
    assert R.fmt_rel_l2(0.19649) == "1.96e-1"
    assert R.fmt_rel_l2(1.234) == "1.23e0"
    assert R.fmt_rel_l2(float("nan")) == "-" and R.fmt_rel_l2(None) == "-"
    assert R.fmt_psnr(44.6912) == "44.69" and R.fmt_psnr(28.855) in ("28.86", "28.85")
    assert R.fmt_ssim(0.98612) == ".986" and R.fmt_ssim(1.0) == "1.000" and R.fmt_ssim(-0.0123) == "-.012"
    assert R.fmt_ssim(float("nan")) == "-"
    assert R.fmt_params(8_912_345) == "8.9M" and R.fmt_params(950_000) == "0.9M"
    assert R.fmt_params(4745) == "4.7K" and R.fmt_params(12) == "12"
    assert R.fmt_float(57.23) == "57.2" and R.fmt_float(2569.24) == "2569.2" and R.fmt_float(0.05234) == "0.0523"
    assert ET.reference_display_name("idw_k8_p2") == "IDW (k=8, p=2)"
    assert ET.reference_display_name("idw_k4_p1.5") == "IDW (k=4, p=1.5)"
    assert ET.reference_display_name("mean_field") == "Mean field"
    assert ET.model_display_name("explorable_inr") == "Explorable-INR" and ET.model_display_name("xyz") == "xyz"


def test_dataset_label():
    assert R.dataset_label(dict(dataset=dict(type="demo", root="data/demo"))) == "demo"
    assert R.dataset_label(dict(dataset=dict(type="ensemble", data_dir="/x/nyx/"))) == "ensemble_nyx"
    assert R.dataset_label(dict(dataset=dict(type="ensemble", data_dir="/x/mpas/data"))) == "ensemble_mpas-data"
    assert R.dataset_label(dict(dataset=dict(type="demo"))) == "demo"
    cfg = dict(dataset=dict(type="ensemble", data_dir="/x/nyx"), name="a b")
    assert R.dataset_label(cfg, "none") == "all"
    assert R.dataset_label(cfg, "name") == "a_b"
    assert R.dataset_label(cfg, "dataset.data_dir") == "nyx"


def test_conditional_table_numbers_and_reference_rows(tmp_path, fake_loader, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    make_run(runs, "nyx_drr", "drrnet", cond_rows(0.0318, 44.6912, 0.98612, 10.71), train_h=2.345)
    make_run(runs, "nyx_kp", "kplanes", cond_rows(0.19649, 28.8601, 0.797, 21.6), train_h=None)
    other = dict(type="ensemble", data_dir="/data/mpas")
    make_run(runs, "mpas_fa", "fainr", cond_rows(0.00558, 52.13, float("nan"), 89.8), dataset=other)

    assert R.main([str(runs), "--title", "Demo"]) == 0
    out = capsys.readouterr().out
    assert "# Demo: demo_blast" in out and "# Demo: ensemble_mpas" in out
    sections = {sec.split("\n", 1)[0]: sec for sec in out.split("# Demo: ")[1:]}
    blast, mpas = sections["demo_blast"], sections["ensemble_mpas"]
    header, rows = table_lines(blast, "Conditional generalization")
    assert header == ["dataset", "model", "Rel L2", "PSNR", "member-mean PSNR", "SSIM", "wins vs IDW",
                      "TFLOPs/1e9 pts", "infer s", "training h", "params"]
    # models in the paper's order (K-Planes before DRR-Net), then the reference predictors
    assert [r[1] for r in rows] == ["K-Planes", "DRR-Net", "Mean field", "Nearest member", "IDW (k=8, p=2)"]
    assert rows[0] == ["demo_blast", "K-Planes", "1.96e-1", "28.86", "29.36", ".797", "3/5", "-", "21.6", "-",
                       "12.1M"]
    assert rows[1] == ["demo_blast", "DRR-Net", "3.18e-2", "44.69", "45.19", ".986", "3/5", "-", "10.7", "2.3",
                       "8.9M"]
    assert rows[2] == ["demo_blast", "Mean field", "2.50e-1", "20.00", "20.50", ".500", "", "", "", "", ""]
    assert rows[4][2:6] == ["1.00e-1", "25.00", "25.50", ".800"]
    assert "taken from run 'nyx_drr'" in blast or "taken from run 'nyx_kp'" in blast
    assert "identical in the other 1 run(s)" in blast
    assert "pass --flops" in blast
    assert "Spatio-conditional" not in out  # no downsampled run, no resolution=train rows
    _, rows = table_lines(mpas, "Conditional generalization")
    assert rows[0] == ["ensemble_mpas", "FA-INR", "5.58e-3", "52.13", "52.63", "-", "3/5", "-", "89.8", "1.2",
                       "4.7K"]


def test_same_model_type_named_by_run_and_reference_mismatch_warned(tmp_path, fake_loader, caplog):
    runs = tmp_path / "runs"
    runs.mkdir()
    a = make_run(runs, "drr_a", "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
    rows_b = cond_rows(0.04, 43.0, 0.97, 1.0)
    rows_b[1] = metrics_row("mean_field", "test", "full", 0.3, 19.0, 0.4)  # different data?
    b = make_run(runs, "drr_b", "drrnet", rows_b)
    found, skipped = R.collect_runs([str(runs / "drr_*")])
    assert [r.name for r in found] == ["drr_a", "drr_b"] and not skipped
    with caplog.at_level(logging.WARNING, logger="results"):
        t = ET.conditional_table("demo_blast", found)
    assert [r["model"] for r in t.rows][:2] == ["DRR-Net (drr_a)", "DRR-Net (drr_b)"]
    assert t.rows[2]["rel_l2"] == pytest.approx(0.25)  # reference rows of the first run
    assert any("drr_b" in m and "differ" in m for m in caplog.messages)
    assert any("WARNING" in n for n in t.notes)
    assert a and b


def test_unfinished_and_unevaluated_runs_skipped_with_warning(tmp_path, fake_loader, caplog, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    make_run(runs, "done", "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
    make_run(runs, "still_training", "drrnet", cond_rows(0.05, 40.0, 0.9, 1.0), finished=False)
    make_run(runs, "not_tested", "kplanes", evaluated=False)
    with caplog.at_level(logging.WARNING, logger="results"):
        assert R.main([str(runs / "*"), str(tmp_path / "nothing_here")]) == 0
    msgs = "\n".join(caplog.messages)
    assert "still_training" in msgs and "finished.json" in msgs
    assert "not_tested" in msgs and "metrics.csv" in msgs
    assert "nothing_here" in msgs
    out = capsys.readouterr().out
    _, rows = table_lines(out, "Conditional generalization")
    assert [r[1] for r in rows][0] == "DRR-Net" and len(rows) == 4
    assert "Skipped" in out and "still_training" in out
    # nothing usable: exit code 1
    assert R.main([str(runs / "still_training")]) == 1


def spatio_rows():
    rows = [metrics_row("model", "test", "full", 0.05, 40.0, 0.95, infer_s=3.0, wins=(5, 5, 4)),
            metrics_row("model", "train", "full", 0.04, 41.5, 0.96, members=20, infer_s=12.0)]
    rows += ref_rows("full")
    rows += [metrics_row("model", "test", "train", 0.03, 42.25, 0.97, infer_s=0.5, wins=(3, 3, 2)),
             metrics_row("model", "train", "train", 0.02, 45.0, 0.99, members=20, infer_s=2.0)]
    rows += ref_rows("train", shift=0.5)
    return rows


def test_spatio_conditional_table(tmp_path, fake_loader, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    make_run(runs, "cond", "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
    ds = dict(type="demo", root=str(runs / "data" / "blast"), downsample=2)
    make_run(runs, "spatio", "drrnet", spatio_rows(), dataset=ds)
    assert R.main([str(runs / "cond"), str(runs / "spatio"), "--out_dir", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    _, cond = table_lines(out, "Conditional generalization")
    assert [r[1] for r in cond][0] == "DRR-Net" and len(cond) == 4  # the downsampled run is not in Table 2
    header, rows = table_lines(out, "Spatio-conditional")
    assert header[:11] == ["dataset", "model", "resolution", "unseen Rel L2", "unseen PSNR",
                           "unseen member-mean PSNR", "unseen SSIM", "unseen wins vs IDW", "trained Rel L2",
                           "trained PSNR", "trained SSIM"]
    assert rows[0][1:11] == ["DRR-Net", "full", "5.00e-2", "40.00", "40.50", ".950", "4/5", "4.00e-2", "41.50",
                             ".960"]
    assert rows[1][1:11] == ["DRR-Net", "train (1/2)", "3.00e-2", "42.25", "42.75", ".970", "2/5", "2.00e-2",
                             "45.00", ".990"]
    assert rows[1][12] == "0.5"  # infer s of the unseen members at that resolution
    refs = rows[2:]
    assert [r[1] for r in refs] == ["Mean field", "Nearest member", "IDW (k=8, p=2)"] * 2
    assert refs[0][2] == "full" and refs[0][3] == "2.50e-1" and refs[0][7:11] == ["", "", "", ""]
    assert refs[0][5] == "20.50"  # member-mean PSNR of the reference rows too
    assert refs[3][2] == "train (1/2)" and refs[3][3] == "7.50e-1"
    # CSV: long form, unrounded, both tables
    with open(tmp_path / "res" / "results_demo_blast.csv") as f:
        crows = list(csv.DictReader(f))
    sp = [r for r in crows if r["table"] == "spatio_conditional" and r["predictor"] == "model"]
    assert {(r["split"], r["resolution"]) for r in sp} == {("test", "full"), ("train", "full"), ("test", "train"),
                                                          ("train", "train")}
    r = next(r for r in sp if r["split"] == "train" and r["resolution"] == "train")
    assert float(r["psnr"]) == pytest.approx(45.0) and r["fields"] == "trained" and r["params"] == "8912345"
    r = next(r for r in sp if r["split"] == "test" and r["resolution"] == "full")
    assert (r["wins_vs_mean"], r["wins_vs_nearest"], r["wins_vs_idw"], r["wins_of"]) == ("5", "5", "4", "5")
    assert float(r["psnr_member_mean"]) == pytest.approx(40.5) and r["weights"] == "model.pt" and r["step"] == "10"
    assert any(r["table"] == "conditional" and r["predictor"] == "idw_k8_p2" for r in crows)


def test_spatio_from_train_resolution_rows_only(tmp_path, fake_loader):
    runs = tmp_path / "runs"
    runs.mkdir()
    make_run(runs, "s", "kplanes", spatio_rows())  # downsample not set, but resolution=train rows
    found, _ = R.collect_runs([str(runs / "s")])
    assert ET.is_spatio(found[0])
    t = ET.spatio_table(found[0].group, found)
    assert [r["resolution"] for r in t.rows[:2]] == ["full", "train"]


def test_out_dir_and_overwrite(tmp_path, fake_loader, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    make_run(runs, "r", "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
    out = tmp_path / "res"
    assert R.main([str(runs / "r"), "--out_dir", str(out)]) == 0
    md, csvp = out / "results_demo_blast.md", out / "results_demo_blast.csv"
    assert md.is_file() and csvp.is_file()
    assert "| demo_blast | DRR-Net" in md.read_text()
    md.write_text("edited")
    capsys.readouterr()
    assert R.main([str(runs / "r"), "--out_dir", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert md.read_text() == "edited"
    assert R.main([str(runs / "r"), "--out_dir", str(out), "--overwrite"]) == 0
    assert "DRR-Net" in md.read_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script inside fvcore
def test_params_and_flops_with_a_real_drrnet(tmp_path):
    from util.build import build_model

    model_cfg = dict(type="drrnet", spatial_resolutions=[4, 8], cond_resolutions=[2, 4], spatial_channels=2,
                     cond_channels=2, pe_frequencies=2, hidden_dim=16, spatial_refiner_layers=1,
                     cond_refiner_layers=1)
    runs = tmp_path / "runs"
    runs.mkdir()
    ds = dict(type="demo", root=str(tmp_path / "demo"), n_train=4, n_test=2, resolution=6, spatial_dims=2)
    d = make_run(runs, "tiny", rows=cond_rows(0.03, 44.0, 0.98, 1.0), dataset=ds, model=model_cfg)
    model = build_model(dict(model=model_cfg), 2, 2)
    torch.save(model.state_dict(), os.path.join(d, "model.pt"))
    found, _ = R.collect_runs([d])
    R.add_model_stats(found, flops=True, n_cond=4, n_points=50)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert found[0].params == n
    assert found[0].tflops is not None and found[0].tflops > 0 and math.isfinite(found[0].tflops)
    t = ET.conditional_table(found[0].group, found, flops=True)
    md = t.markdown()
    assert R.fmt_float(found[0].tflops) in md and R.fmt_params(n) in md
    assert not any("--flops" in n for n in t.notes)


def test_params_fall_back_to_the_architecture(tmp_path, monkeypatch, caplog):
    """A run whose trained model cannot be loaded still gets its parameter count (from config + meta)."""
    import util.build

    def broken(run_dir, checkpoint=None, map_location="cpu"):
        raise util.build.ConfigError("unknown dataset type 'gone'")

    monkeypatch.setattr(util.build, "load_trained_model", broken)
    model_cfg = dict(type="drrnet", spatial_resolutions=[4], cond_resolutions=[2], pe_frequencies=1, hidden_dim=8,
                     spatial_refiner_layers=0, cond_refiner_layers=0)
    runs = tmp_path / "runs"
    runs.mkdir()
    d = make_run(runs, "arch", rows=cond_rows(0.03, 44.0, 0.98, 1.0), model=model_cfg)
    found, _ = R.collect_runs([d])
    with caplog.at_level(logging.WARNING, logger="results"):
        R.add_model_stats(found)
    n = sum(p.numel() for p in util.build.build_model(dict(model=model_cfg), 2, 2).parameters())
    assert found[0].params == n and found[0].tflops is None
    assert any("arch" in m and "architecture" in m for m in caplog.messages)
    (runs / "arch" / "meta.json").unlink()  # nothing to build from: params stay blank, with a warning
    found[0].params = None
    R.add_model_stats(found)
    assert found[0].params is None
    assert R.fmt_params(found[0].params) == "-"


def test_old_metrics_without_wins_and_runs_scored_with_a_checkpoint(tmp_path, fake_loader, caplog):
    """A metrics.csv from before the wins/weights columns still reads ('-'); a run scored with a checkpoint
    instead of its final model.pt is named in a warning note, a final one is not."""
    runs = tmp_path / "runs"
    runs.mkdir()
    old = make_run(runs, "old", "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
    fields = [f for f in DATASET_FIELDS if not f.startswith("wins") and f not in ("weights", "step", "total_steps")]
    with open(os.path.join(old, "eval", "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in cond_rows(0.03, 44.0, 0.98, 1.0):
            w.writerow(r)
    make_run(runs, "ck", "kplanes", cond_rows(0.05, 40.0, 0.9, 1.0, wins=(2, 1, 0),
                                              weights="checkpoint step_0000004", step=4))
    found, _ = R.collect_runs([str(runs)])
    with caplog.at_level(logging.WARNING, logger="results"):
        t = ET.conditional_table(found[0].group, found)
    by_model = {r["model"]: r for r in t.rows}
    cells = dict(zip([r["model"] for r in t.rows], t.cells()))
    wins_col = [c.key for c in t.columns].index("wins_idw")
    assert cells["DRR-Net"][wins_col] == "-" and cells["K-Planes"][wins_col] == "0/5"
    assert by_model["K-Planes"]["psnr_mm"] == pytest.approx(40.5)
    warned = [n for n in t.notes if n.startswith("WARNING")]
    assert len(warned) == 1 and "'ck'" in warned[0] and "checkpoint step_0000004 (step 4 of 10)" in warned[0]
    assert any("'ck'" in m and "final model.pt" in m for m in caplog.messages)
    assert not any("'old'" in m for m in caplog.messages)


# ------------------------------------------------------------------------------------------------ images
def image_row(resolution, psnr, ssim, lpips=float("nan"), ssim_raster=float("nan"), psnr_chunked=float("nan"),
              infer_s=2.5, bake_s=0.5, params=123456, protocol="tiles", weights="model.pt", step=10):
    """A metrics.csv row as tasks/image/task.py writes it."""
    return dict(predictor="model", split="image", resolution=resolution, height=20, width=30, channels=3, psnr=psnr,
                ssim=ssim, lpips=lpips, mse=10 ** (-psnr / 10), psnr_chunked=psnr_chunked, ssim_raster=ssim_raster,
                lpips_raster=float("nan"), ssim_protocol=protocol, ssim_tile=512, bake_s=bake_s, forward_s=infer_s - bake_s,
                infer_s=infer_s, points_per_s=1e6, chunk_size=262144, params=params, weights=weights, step=step,
                total_steps=10)


def make_image_run(root, name, model_type, rows, downsample=1, image="/data/pearl.png"):
    from tasks.image.task import IMAGE_FIELDS

    d = root / name
    (d / "eval").mkdir(parents=True)
    ds = dict(type="image", path=image)
    if downsample > 1:
        ds["downsample"] = downsample
    cfg = dict(name=name, task=dict(type="image"), model=dict(type=model_type), dataset=ds,
               train=dict(max_steps=10, log_dir=str(root)))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "meta.json").write_text(json.dumps(dict(task="image", model_inputs=dict(cond_dim=0, spatial_dims=2,
                                                                                 out_dim=3))))
    (d / "timing.json").write_text(json.dumps(dict(estimated_train_h=0.5)))
    (d / "finished.json").write_text(json.dumps(dict(steps=10)))
    with open(d / "eval" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=IMAGE_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float)
                                                                                else v)) for k, v in r.items()})
    return str(d)


def test_image_runs_get_a_table_of_their_own(tmp_path, fake_loader, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    make_run(runs, "ens", "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
    make_image_run(runs, "pearl_grid", "grid", [image_row("full", 30.126, 0.8512, infer_s=1.25, bake_s=0.0)])
    make_image_run(runs, "pearl_drr", "mrgrid_drr", [image_row("full", 31.254, 0.9123, lpips=0.1234, infer_s=1.5)])
    make_image_run(runs, "pearl_sr", "ngp", [image_row("train", 35.0, 0.95), image_row("full", 28.5, 0.75)],
                   downsample=2)
    make_image_run(runs, "tokyo_siren", "siren", [image_row("full", 25.0, 0.6)], image="/data/tokyo.jpg")
    assert R.main([str(runs), "--out_dir", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    sections = {sec.split("\n", 1)[0]: sec for sec in out.split("# Results: ")[1:]}
    assert set(sections) == {"demo_blast", "image_pearl", "image_tokyo"}
    assert "Images" not in sections["demo_blast"] and "Conditional generalization" in sections["demo_blast"]
    pearl = sections["image_pearl"]
    assert "Conditional generalization" not in pearl and "Spatio-conditional" not in pearl
    header, rows = table_lines(pearl, "Images: image_pearl")
    # no run was scored with the raster protocol / chunked PSNR: those columns are left out
    assert header == ["dataset", "model", "trained at", "resolution", "PSNR", "SSIM", "LPIPS", "infer s", "bake s",
                      "training h", "params"]
    # paper order of the image configs: MRGrid+DRR, Grid, NGP; the SR run's full resolution first
    assert [r[1:4] for r in rows] == [["MRGrid+DRR", "full", "full"], ["Grid", "full", "full"],
                                      ["NGP", "1/2", "full"], ["NGP", "1/2", "train (1/2)"]]
    assert rows[0][4:] == ["31.25", ".912", ".123", "1.5", "0.5", "0.5", "10"]  # params from the (fake) model
    assert rows[1][4:7] == ["30.13", ".851", "-"] and rows[1][8] == "0"
    assert rows[2][4:6] == ["28.50", ".750"] and rows[3][4:6] == ["35.00", ".950"]
    _, rows = table_lines(sections["image_tokyo"], "Images: image_tokyo")
    assert [r[1] for r in rows] == ["SIREN"]
    with open(tmp_path / "res" / "results_image_pearl.csv") as f:
        crows = list(csv.DictReader(f))
    assert {r["table"] for r in crows} == {"image"} and len(crows) == 4
    drr = next(r for r in crows if r["model_type"] == "mrgrid_drr")
    assert float(drr["lpips"]) == pytest.approx(0.1234) and float(drr["psnr"]) == pytest.approx(31.254)
    assert drr["height"] == "20" and drr["weights"] == "model.pt" and drr["lpips"] != ""


def test_image_table_reference_protocol_columns_params_from_csv_and_checkpoint_warning(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    make_image_run(runs, "a", "grid_drr", [image_row("full", 30.0, 0.9, ssim_raster=0.8771, psnr_chunked=30.5,
                                                     protocol="both", params=4_700)])
    make_image_run(runs, "b", "grid", [image_row("full", 29.0, 0.85, weights="checkpoint step_0000004", step=4)])
    found, skipped = R.collect_runs([str(runs)])
    assert not skipped and all(r.task_type == "image" for r in found)
    tables = R.task_tables(found[0].group, found)  # the image task's tables only, through the registry
    assert [t.kind for t in tables] == ["image"]
    t = tables[0]
    assert t.csv_fields == IT.CSV_FIELDS
    headers = [c.header for c in t.columns]
    assert "SSIM (raster)" in headers and "PSNR (chunked)" in headers
    cells = dict(zip([r["model"] for r in t.rows], t.cells()))
    col = {h: i for i, h in enumerate(headers)}
    assert cells["Grid+DRR"][col["SSIM (raster)"]] == ".877" and cells["Grid+DRR"][col["PSNR (chunked)"]] == "30.50"
    assert cells["Grid"][col["SSIM (raster)"]] == "-"
    assert cells["Grid+DRR"][col["params"]] == "4.7K"  # no model loaded: the params column of metrics.csv
    assert any("raster" in n for n in t.notes) and any("both" in n for n in t.notes)
    warned = [n for n in t.notes if n.startswith("WARNING")]
    assert len(warned) == 1 and "'b'" in warned[0] and "checkpoint step_0000004" in warned[0]
    assert R.dataset_label(dict(dataset=dict(type="image", path="/x/y/pearl.png"))) == "image_pearl"
    assert R.dataset_label(dict(dataset=dict(type="image_demo", photo="coffee", data_dir="d/img"))) == "image_demo_coffee"


def test_tables_come_from_each_task_and_csv_columns_from_its_tables(tmp_path, caplog):
    """The collector asks each run's task class for its tables (registry): ensemble and image runs of one group get
    their own task's tables, a task without tables (nerf) none, an unregistered task type a warning; each CSV
    holds the leading columns plus those of its group's tables."""
    from util.registry import get

    runs = tmp_path / "runs"
    runs.mkdir()
    make_run(runs, "ens", "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
    make_image_run(runs, "img", "grid", [image_row("full", 30.0, 0.9)])
    for name, task in (("rf", "nerf"), ("odd", "no_such_task")):
        d = make_run(runs, name, "drrnet", cond_rows(0.03, 44.0, 0.98, 1.0))
        cfg = yaml.safe_load(open(os.path.join(d, "config.yaml")))
        cfg["task"] = dict(type=task)
        open(os.path.join(d, "config.yaml"), "w").write(yaml.safe_dump(cfg))
    assert get("task", "nerf").report_tables("g", [], False) == []
    found, _ = R.collect_runs([str(runs)], group_by="none")
    with caplog.at_level(logging.WARNING, logger="results"):
        rep = R.group_report("all", found)
    assert [t.kind for t in rep.tables] == ["conditional", "image"]  # tasks in name order: ensemble, image
    assert [r["model"] for r in rep.tables[0].rows][0] == "DRR-Net"  # not the nerf run's
    assert any("odd" in m and "no_such_task" in m for m in caplog.messages)
    assert rep.csv_fields == R.CSV_LEADING + ET.CSV_FIELDS + [f for f in IT.CSV_FIELDS if f not in ET.CSV_FIELDS]
    by_group = {rep.group: rep for rep in R.make_reports(R.collect_runs([str(runs / "ens"), str(runs / "img")])[0])}
    assert by_group["demo_blast"].csv_fields == R.CSV_LEADING + ET.CSV_FIELDS
    assert by_group["image_pearl"].csv_fields == R.CSV_LEADING + IT.CSV_FIELDS
