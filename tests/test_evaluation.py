"""test.py / tasks.ensemble.evaluation end to end on a tiny hand-made 2D ensemble, every number recomputed independently.

The ensemble (8 x 8 fields in data units 100..300, 2 parameters) has 8 training members and 3 test members.
Test member row 0 is a trap: its parameters equal those of training row 4, but its values are row 4's inverted.
Built from the training members only, the nearest-member and IDW predictors must return row 4's field there; a
predictor that also saw the test members would return row 0 itself (exact: it comes first in cond.npy) or a mix.
"""
import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil

import numpy as np
import pytest
import yaml

from tasks.ensemble.evaluation import _add_wins, _Scorer, evaluate, psnr_scatter_png, WIN_COLOR, LOSS_COLOR
from util.evaluation_common import scored_weights

N = 8  # grid size
TRAIN_ROWS = [1, 2, 3, 4, 5, 6, 7, 8]
TEST_ROWS = [0, 9, 10]
TRAP, TWIN = 0, 4  # test row 0 has the parameters of training row 4
K = 2  # IDW neighbours
SSIM_WIN = 3

TINY_MODEL = dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
                  spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
                  cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)


def _field(p):
    y, x = np.meshgrid(np.linspace(0, 1, N), np.linspace(0, 1, N), indexing="ij")
    return 200.0 + 90.0 * np.sin(3.0 * x * (0.5 + p[0]) + 2.0 * y * (0.3 + p[1]) + 2.0 * p[0])


def make_ensemble(root):
    rng = np.random.default_rng(7)
    params = rng.uniform(0.05, 0.95, size=(11, 2))
    params[TRAP] = params[TWIN]
    fields = [_field(p) for p in params]
    fields[TRAP] = 400.0 - fields[TWIN]  # same parameters, very different values
    data = root / "data"
    data.mkdir(parents=True)
    for i, f in enumerate(fields):
        np.save(data / f"m{i:02d}.npy", f.astype(np.float32))
    cond = np.concatenate([np.arange(11)[:, None], params], axis=1)
    np.save(root / "cond.npy", cond)
    np.save(root / "split.npy", {"cond_idx": np.array(TRAIN_ROWS), "cond_idx_unseen": np.array(TEST_ROWS)},
            allow_pickle=True)
    return data, params


def write_config(root, data):
    exp = dict(
        model=TINY_MODEL,
        dataset=dict(type="ensemble", data_dir=str(data), cond_path=str(root / "cond.npy"),
                     cond_split_path=str(root / "split.npy"), cond_batch=2, spatial_log2batch=5),
        optim=dict(type="adam", lr=1e-3),
        scheduler=dict(type="cosine"),
        train=dict(max_steps=6, log_dir=str(root / "runs"), checkpoint_every_steps=3, log_every=3,
                   keep_checkpoints=10, timing_steps=2),
        test=dict(chunk_size=50, ssim_win_size=SSIM_WIN, ref_k=K, dump_members=TEST_ROWS, dump_vti=False,
                  dump_png=False),
    )
    p = root / "tiny.yaml"
    p.write_text(yaml.safe_dump([exp]))
    return str(p)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train the tiny run once (6 steps) and evaluate it through test.py's main; returns facts for the tests."""
    from train import main as train_main
    from test import main as test_main
    from util.config import load_config
    from util.run_dir import run_dir_of

    root = tmp_path_factory.mktemp("evaluation")
    data, params = make_ensemble(root)
    cfg = write_config(root, data)
    train_main(["--config", cfg, "--config_id", "0", "--no_progress"])
    rd = run_dir_of(load_config(cfg, 0))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        test_main(["--run", rd, "--no_progress"])
    return dict(root=root, data=data, params=params, run_dir=rd, stdout=out.getvalue())


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def raw(data, row):
    return np.load(os.path.join(data, f"m{row:02d}.npy")).astype(np.float64)


def norm_range(data):
    """value_min / value_max over the training members, from the raw files."""
    vals = np.stack([raw(data, r) for r in TRAIN_ROWS])
    return float(vals.min()), float(vals.max())


def ssim_2d(a, b, win=SSIM_WIN, sigma=1.5):
    """SSIM of two 2D fields, Gaussian window, valid region, data range 1 (written out with explicit sums)."""
    j = np.arange(win) - (win - 1) / 2
    g = np.exp(-j ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    h, wd = a.shape
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(h - win + 1):
        for k in range(wd - win + 1):
            pa, pb = a[i:i + win, k:k + win], b[i:i + win, k:k + win]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma * ma, (w * pb * pb).sum() - mb * mb
            cov = (w * pa * pb).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def scores(pred, gt):
    mse = float(np.mean((pred - gt) ** 2))
    return dict(mse=mse, psnr=-10 * math.log10(mse), rel_l2=float(np.linalg.norm(pred - gt) / np.linalg.norm(gt)),
                ssim=ssim_2d(pred, gt), md=float(np.abs(pred - gt).max()))


def reference_predictions(data, params, lo, hi):
    """Mean field, nearest member and IDW (k=K, p=2) of each test row, from the training files alone."""
    train = {r: (raw(data, r) - lo) / (hi - lo) for r in TRAIN_ROWS}
    mean = np.mean([train[r] for r in TRAIN_ROWS], axis=0)
    out = {}
    for t in TEST_ROWS:
        d = {r: float(np.linalg.norm(params[r] - params[t])) for r in TRAIN_ROWS}
        order = sorted(TRAIN_ROWS, key=lambda r: (d[r], r))
        nearest = train[order[0]]
        if d[order[0]] == 0:
            idw = train[order[0]]
        else:
            w = np.array([d[r] ** -2.0 for r in order[:K]])
            idw = sum(wi * train[r] for wi, r in zip(w / w.sum(), order[:K]))
        out[t] = {"mean_field": mean, "nearest_member": nearest, f"idw_k{K}_p2": idw}
    return out


def test_metrics_recomputed_from_dumps_in_data_units(run):
    ev = os.path.join(run["run_dir"], "eval")
    data = run["data"]
    lo, hi = norm_range(data)
    meta = json.load(open(os.path.join(run["run_dir"], "meta.json")))
    assert (meta["value_min"], meta["value_max"]) == pytest.approx((lo, hi))
    members = {(r["predictor"], r["split"], int(r["row"])): r for r in read_csv(os.path.join(ev, "members.csv"))}
    per = {}
    for t in TEST_ROWS:
        true = np.load(os.path.join(ev, "dumps", f"member{t:04d}_full_true.npy")).astype(np.float64)
        pred = np.load(os.path.join(ev, "dumps", f"member{t:04d}_full_pred.npy")).astype(np.float64)
        # dumps are in data units: the truth is the member file itself, the prediction lies in the data's range
        np.testing.assert_allclose(true, raw(data, t), rtol=1e-5)
        assert pred.shape == (N, N) and lo - 0.5 * (hi - lo) < pred.mean() < hi + 0.5 * (hi - lo)
        s = scores((pred - lo) / (hi - lo), (true - lo) / (hi - lo))
        per[t] = s
        got = members[("model", "test", t)]
        for k in ("mse", "psnr", "rel_l2", "ssim", "md"):
            assert float(got[k]) == pytest.approx(s[k], rel=2e-4, abs=1e-6), (t, k)
    rows = {(r["predictor"], r["split"]): r for r in read_csv(os.path.join(ev, "metrics.csv"))}
    m = rows[("model", "test")]
    assert int(m["members"]) == len(TEST_ROWS)
    mse_mean = np.mean([per[t]["mse"] for t in TEST_ROWS])
    assert float(m["psnr_dataset"]) == pytest.approx(-10 * math.log10(mse_mean), rel=1e-4)
    assert float(m["psnr_member_mean"]) == pytest.approx(np.mean([per[t]["psnr"] for t in TEST_ROWS]), rel=1e-4)
    for k in ("rel_l2", "ssim", "md", "mse"):
        assert float(m[k]) == pytest.approx(np.mean([per[t][k] for t in TEST_ROWS]), rel=2e-4), k
    assert float(m["psnr_dataset"]) != pytest.approx(float(m["psnr_member_mean"]), abs=1e-3)  # two different means


def test_reference_predictors_use_training_members_only(run):
    ev = os.path.join(run["run_dir"], "eval")
    data, params = run["data"], run["params"]
    lo, hi = norm_range(data)
    refs = reference_predictions(data, params, lo, hi)
    members = read_csv(os.path.join(ev, "members.csv"))
    seen = set()
    for r in members:
        if r["predictor"] == "model":
            continue
        assert r["split"] == "test"  # reference predictors are scored on unseen members only
        t = int(r["row"])
        gt = (raw(data, t) - lo) / (hi - lo)
        s = scores(refs[t][r["predictor"]], gt)
        assert math.isfinite(float(r["psnr"])), r  # nothing is exact: no test member leaked into a reference
        assert float(r["psnr"]) == pytest.approx(s["psnr"], rel=1e-4), (r["predictor"], t)
        assert float(r["ssim"]) == pytest.approx(s["ssim"], rel=2e-4, abs=1e-6), (r["predictor"], t)
        seen.add((r["predictor"], t))
    assert len(seen) == 3 * len(TEST_ROWS)
    # the trap: nearest and IDW return the field of training row TWIN (same parameters), not the test member
    twin = (raw(data, TWIN) - lo) / (hi - lo)
    trap = (raw(data, TRAP) - lo) / (hi - lo)
    for name in ("nearest_member", f"idw_k{K}_p2"):
        row = next(r for r in members if r["predictor"] == name and int(r["row"]) == TRAP)
        assert float(row["psnr"]) == pytest.approx(scores(twin, trap)["psnr"], rel=1e-5)
        assert float(row["psnr"]) < 15  # far from exact


def test_wins_recomputed_from_members_csv_and_printed(run):
    ev = os.path.join(run["run_dir"], "eval")
    members = read_csv(os.path.join(ev, "members.csv"))
    psnr = {}
    for r in members:
        if r["split"] == "test":
            psnr.setdefault(r["predictor"], {})[int(r["row"])] = float(r["psnr"])
    m = next(r for r in read_csv(os.path.join(ev, "metrics.csv")) if r["predictor"] == "model" and r["split"] == "test")
    assert int(m["wins_of"]) == len(TEST_ROWS)
    table = run["stdout"]
    for short, name in (("mean", "mean_field"), ("nearest", "nearest_member"), ("idw", f"idw_k{K}_p2")):
        wins = sum(psnr["model"][t] > psnr[name][t] for t in TEST_ROWS)
        assert int(m[f"wins_vs_{short}"]) == wins, short
    head = table.splitlines()[0].split()
    model_line = next(l for l in table.splitlines() if l.startswith("model") and " test " in l).split()
    for short in ("mean", "nearest", "idw"):
        assert model_line[head.index(f"wins_vs_{short}")] == f"{m[f'wins_vs_{short}']}/{len(TEST_ROWS)}"
    assert "psnr_member_mean" in head
    # the training split has no reference rows: no wins there
    mt = next(r for r in read_csv(os.path.join(ev, "metrics.csv")) if r["predictor"] == "model" and r["split"] == "train")
    assert mt["wins_vs_idw"] == "" and mt["wins_of"] == ""


def test_add_wins_counts_strictly_higher_per_reference():
    """Mixed outcomes, a tie and an exact member: each wins column counts its own predictor."""
    def scorer(pred, psnrs):
        sc = _Scorer(pred, "test", "full", False, 3)
        sc.rows = [dict(row=r, psnr=p) for r, p in psnrs.items()]
        return sc

    model = scorer("model", {0: 30.0, 1: 20.0, 2: 25.0, 3: math.inf})
    scs = [model, scorer("mean_field", {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}),
           scorer("nearest_member", {0: 31.0, 1: 19.0, 2: 25.0, 3: math.inf}),
           scorer("idw_k8_p2", {0: 29.0, 1: 21.0, 2: 26.0, 3: 40.0}), scorer("model", {})]
    scs[-1].key = ("model", "train", "full")
    results = [dict(predictor=p, split=s, resolution=r) for p, s, r in (sc.key for sc in scs)]
    _add_wins(results, scs)
    assert (results[0]["wins_vs_mean"], results[0]["wins_vs_nearest"], results[0]["wins_vs_idw"]) == (4, 1, 2)
    assert results[0]["wins_of"] == 4
    assert all("wins_of" not in r for r in results[1:])


def test_scatter_png(run, tmp_path):
    from PIL import Image

    ev = os.path.join(run["run_dir"], "eval")
    png = os.path.join(ev, "psnr_vs_idw.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    # the points sit where the PSNRs put them, coloured by who wins
    ref, mod = [28.0, 31.0, 35.0, 30.0], [30.0, 29.0, 36.0, math.inf]
    out = psnr_scatter_png(str(tmp_path / "s.png"), ref, mod, title="t", xlabel="x")
    assert out["wins"] == 3 and out["members"] == 4 and out["points"][3] is None
    img = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    pts = out["points"][:3]
    for (px, py), win in zip(pts, (True, False, True)):
        assert tuple(img[py, px]) == (WIN_COLOR if win else LOSS_COLOR)
    # higher PSNR is further right (x) and further up (y: smaller pixel row); the axes share one scale
    assert pts[0][0] < pts[1][0] < pts[2][0] and pts[2][1] < pts[0][1] < pts[1][1]
    assert (pts[2][0] - pts[0][0]) / (35 - 28) == pytest.approx((pts[0][1] - pts[2][1]) / (36 - 30), abs=0.5)
    # the data-space points are the inputs; a win lies above the drawn diagonal, a loss below it
    assert img.shape == (640, 640, 3)
    assert out["xy"] == [(28.0, 30.0), (31.0, 29.0), (35.0, 36.0), None]
    (c0, r0), (c1, r1) = out["diagonal"]
    assert c0 < c1 and r0 > r1 and (r0 - r1) == pytest.approx(c1 - c0, abs=1.5)  # 45 degrees
    for (px, py), win in zip(pts, (True, False, True)):
        diag_row = r0 + (px - c0) * (r1 - r0) / (c1 - c0)
        assert (py < diag_row - 3) if win else (py > diag_row + 3)
    cm, rm = (c0 + c1) // 2, (r0 + r1) // 2  # the diagonal is drawn (grey, not the white background)
    assert any(tuple(img[rm + dr, cm + dc]) != (255, 255, 255) for dr in (-1, 0, 1) for dc in (-1, 0, 1))


def _copy_run(run, name):
    dst = os.path.join(os.path.dirname(run["run_dir"]), name)
    shutil.copytree(run["run_dir"], dst, ignore=shutil.ignore_patterns("eval"))
    return dst


def test_unfinished_run_warns_and_records_weights(run, caplog):
    rd = _copy_run(run, "unfinished")
    os.remove(os.path.join(rd, "finished.json"))
    os.remove(os.path.join(rd, "model.pt"))
    shutil.rmtree(os.path.join(rd, "checkpoints", "step_0000006"))
    with open(os.path.join(rd, "checkpoints", "latest"), "w") as f:
        f.write("step_0000003")
    with caplog.at_level(logging.WARNING, logger="test"):
        rows = evaluate(rd, overrides=dict(splits=["test"], dump_members=[]), progress=False)
    assert any("not finished" in m and "checkpoint step_0000003" in m and "step 3 of 6" in m
               for m in caplog.messages), caplog.messages
    csv_rows = read_csv(os.path.join(rd, "eval", "metrics.csv"))
    assert {(r["weights"], r["step"], r["total_steps"]) for r in csv_rows} == {("checkpoint step_0000003", "3", "6")}
    assert rows[0]["final_weights"] is False
    # the record names the weights really scored: the same numbers as scoring that checkpoint explicitly
    ck = os.path.join(run["run_dir"], "checkpoints", "step_0000003")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test"):
        explicit = evaluate(run["run_dir"], out_dir=os.path.join(rd, "explicit"), checkpoint=ck,
                            overrides=dict(splits=["test"], dump_members=[]), progress=False)
    assert explicit[0]["psnr_dataset"] == pytest.approx(rows[0]["psnr_dataset"], rel=1e-6)
    assert any("not the final model.pt" in m and "step_0000003" in m for m in caplog.messages), caplog.messages
    assert read_csv(os.path.join(rd, "explicit", "metrics.csv"))[0]["weights"] == "checkpoint step_0000003"
    # and differ from the final weights' numbers
    final = read_csv(os.path.join(run["run_dir"], "eval", "metrics.csv"))[0]
    assert float(final["psnr_dataset"]) != pytest.approx(rows[0]["psnr_dataset"], rel=1e-6)
    # model.pt written but finished.json not (killed in between): still an unfinished run
    rd2 = _copy_run(run, "no_finished_marker")
    os.remove(os.path.join(rd2, "finished.json"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="test"):
        rows2 = evaluate(rd2, overrides=dict(splits=["test"], dump_members=[]), progress=False)
    assert rows2[0]["final_weights"] is False and rows2[0]["weights"] == "model.pt" and rows2[0]["step"] == 6
    assert any("not finished" in m and "model.pt" in m for m in caplog.messages), caplog.messages


def test_finished_run_records_final_weights_without_warning(run):
    rows = read_csv(os.path.join(run["run_dir"], "eval", "metrics.csv"))
    assert {(r["weights"], r["step"], r["total_steps"]) for r in rows} == {("model.pt", "6", "6")}
    assert "weights: model.pt (step 6 of 6)" in run["stdout"] and "NOT the final" not in run["stdout"]
    w = scored_weights(run["run_dir"])
    assert w == dict(weights="model.pt", step=6, total_steps=6, final_weights=True)


def test_test_py_data_error_is_one_line(run, capsys):
    """A member file of the wrong shape: test.py exits with one 'error: ...' line naming the file."""
    from test import main as test_main

    rd = _copy_run(run, "bad_member")
    bad = run["root"] / "data_bad"
    shutil.copytree(run["data"], bad)
    np.save(bad / f"m{TEST_ROWS[1]:02d}.npy", np.zeros((N - 1, N - 1), dtype=np.float32))
    cfg_p = os.path.join(rd, "config.yaml")
    cfg = yaml.safe_load(open(cfg_p))
    cfg["dataset"]["data_dir"] = str(bad)
    with open(cfg_p, "w") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(SystemExit) as e:
        test_main(["--run", rd, "--no_progress", "--splits", "test"])
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and f"m{TEST_ROWS[1]:02d}.npy" in msg


def test_damaged_model_pt_records_the_checkpoint_scored_instead(run, caplog):
    """When load_trained_model skips a damaged model.pt for the newest intact checkpoint, metrics.csv names that
    checkpoint (not model.pt) and the run is reported as scored with non-final weights."""
    rd = _copy_run(run, "damaged_final")
    with open(os.path.join(rd, "model.pt"), "wb") as f:
        f.write(b"not a state dict")
    with caplog.at_level(logging.WARNING):
        rows = evaluate(rd, overrides=dict(splits=["test"], dump_members=[]), progress=False)
    assert (rows[0]["weights"], rows[0]["step"], rows[0]["final_weights"]) == ("checkpoint step_0000006", 6, False)
    assert any("not the final model.pt" in m for m in caplog.messages), caplog.messages
