"""Real-image check: the image demo models on several scikit-image photos, trained and scored one after another.

    python benchmarks/image_check.py --photos coffee astronaut immunohistochemistry --ids 0 1 2 3 4 5 \\
        [--config configs/image/demo.yaml] [--steps N] [--budget_s S] [--log_dir runs/image_check] [--out F.md]

For every (photo, config id): ``train.py`` (``--set dataset.photo=P``, a run name of its own, and ``--steps`` or,
with ``--budget_s``, as many steps as the model's measured step time fits into that wall-time budget), then
``test.py`` on the run; prints one markdown row per run: photo, model, steps, train wall time, PSNR, SSIM,
inference time (bake + forward of the whole image), parameters. Runs already finished in ``--log_dir`` are
scored again, not retrained (delete them to retrain). Run it on a quiet machine: the times are wall clock.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _metrics(run_dir):
    with open(os.path.join(run_dir, "eval", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("predictor", "model") == "model"]
    return rows[0]


def _step_time(config, cid, photo, log_dir, probe_steps):
    """Mean step time of the equal-steps run of (photo, id) when there is one in log_dir, else of a short probe
    run (steps probe_steps/2..probe_steps, data included)."""
    name = f"probe_{photo}_{cid}"
    rd = os.path.join(log_dir, name)
    done = os.path.join(log_dir, f"{photo}_{cid}_scfg", "timing.json")
    if os.path.isfile(done):
        rd = os.path.dirname(done)
    if not os.path.isfile(os.path.join(rd, "timing.json")):
        _run(["train.py", "--config", config, "--config_id", str(cid), "--no_progress", "--overwrite",
              "--set", f"dataset.photo={photo}", "--set", f"train.run_name={name}", "--set", f"train.log_dir={log_dir}",
              "--set", f"train.max_steps={probe_steps}", "--set", f"train.timing_steps={probe_steps // 2}",
              "--set", f"train.checkpoint_every_steps={probe_steps}"])
    with open(os.path.join(rd, "timing.json")) as f:
        return float(json.load(f)["mean_step_s"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/image/demo.yaml")
    p.add_argument("--photos", nargs="+", default=["coffee", "astronaut", "immunohistochemistry"])
    p.add_argument("--ids", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the config's)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="equal wall time: steps = budget / the model's step time (from its equal-steps run in --log_dir, else a 40-step probe)")
    p.add_argument("--log_dir", default="runs/image_check")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    log_dir = os.path.abspath(args.log_dir)
    lines = ["| photo | model (id) | steps | train s | PSNR | SSIM | infer s (bake + forward) | params |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for photo in args.photos:
        for cid in args.ids:
            tag = f"{'b' + str(int(args.budget_s)) if args.budget_s else 's' + str(args.steps or 'cfg')}"
            name = f"{photo}_{cid}_{tag}"
            rd = os.path.join(log_dir, name)
            extra = []
            steps = args.steps
            if args.budget_s:
                steps = max(10, int(args.budget_s / _step_time(args.config, cid, photo, log_dir, 40)))
            if steps:
                extra += ["--set", f"train.max_steps={steps}", "--set", f"train.checkpoint_every_steps={steps}"]
            train_s = float("nan")
            if not os.path.isfile(os.path.join(rd, "finished.json")):
                train_s = _run(["train.py", "--config", args.config, "--config_id", str(cid), "--no_progress",
                                "--overwrite", "--set", f"dataset.photo={photo}", "--set", f"train.run_name={name}",
                                "--set", f"train.log_dir={log_dir}", *extra])
            _run(["test.py", "--run", rd, "--no_progress", "--overwrite"])
            m = _metrics(rd)
            with open(os.path.join(rd, "config.yaml")) as f:
                typ = yaml.safe_load(f)["model"]["type"]
            with open(os.path.join(rd, "finished.json")) as f:
                done = json.load(f)["steps"]
            row = (f"| {photo} | {typ} ({cid}) | {done} | {train_s:.0f} | {float(m['psnr']):.2f} | "
                   f"{float(m['ssim']):.4f} | {float(m['infer_s']):.3f} ({float(m['bake_s']):.3f} + "
                   f"{float(m['infer_s']) - float(m['bake_s']):.3f}) | {int(float(m['params'])):,} |")
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
