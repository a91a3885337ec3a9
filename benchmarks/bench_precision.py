"""fp32 vs bf16 training at equal steps, end to end: steps/s and the unseen members' fidelity (test.py's metrics).

Usage (each case trains once per precision with train.py, then scores with test.py; minutes per case):

    python benchmarks/bench_precision.py                        # both cases below
    python benchmarks/bench_precision.py --cases demo --threads 2
    python benchmarks/bench_precision.py --cases clover16 --precisions fp32,bf16 --log_dir runs_precision

Cases:

* ``demo``: configs/demo/drrnet.yaml id 0 (the embedded demo ensemble, 1200 steps);
* ``clover16``: configs/recipes/cpu.yaml id 0 on ``../shared/data/clover16`` (``--clover16`` to move it;
  100 train / 20 unseen CloverLeaf3D members, 16^3; 1000 steps).

Each run is ``train.py ... --set train.mixed_precision=<fp32: no | bf16> --set train.run_name=<case>_<precision>``
(under ``--log_dir``, overwritten), then ``test.py --run ... --no_reference --splits test``. Printed per run:
``case=... precision=... steps_per_s=... (1 / timing.json's mean_step_s) psnr_dataset=... psnr_member_mean=...
rel_l2=...`` (the unseen members, full resolution, from eval/metrics.csv), then per case bf16 vs fp32: the
differences and whether bf16 passes the issue's rule for becoming the CPU default (every fidelity number within
0.1 dB and Rel L2 within 1% relative of fp32).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import ROOT  # noqa: E402

CASES = {
    "demo": dict(config="configs/demo/drrnet.yaml", config_id=0, sets=[]),
    "clover16": dict(config="configs/recipes/cpu.yaml", config_id=0, data=True, sets=[]),
}
MP = {"fp32": "'no'", "bf16": "bf16"}  # quoted: YAML reads a bare no as false


def case_sets(name: str, clover: str):
    c = CASES[name]
    sets = list(c["sets"])
    if c.get("data"):
        sets += [f"dataset.data_dir={clover}/data", f"dataset.cond_path={clover}/cond.npy",
                 f"dataset.cond_split_path={clover}/split.npy"]
    return c, sets


def run(cmd, env):
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"bench_precision: '{' '.join(cmd)}' failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout


def scores(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "eval", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["predictor"] == "model" and r["split"] == "test"
                and r["resolution"] == "full"]
    if not rows:
        raise SystemExit(f"bench_precision: no model row for the test split in {run_dir}/eval/metrics.csv")
    r = rows[0]
    return {k: float(r[k]) for k in ("psnr_dataset", "psnr_member_mean", "rel_l2")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="demo,clover16")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--clover16", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "clover16"))
    p.add_argument("--log_dir", default=os.path.join(ROOT, "runs_precision"))
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: inherited)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    args = p.parse_args(argv)
    from util.cpu import describe

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"# {describe()} | OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    results = {}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        c, sets = case_sets(case, args.clover16)
        for prec in [q.strip() for q in args.precisions.split(",") if q.strip()]:
            name = f"{case}_{prec}"
            all_sets = sets + args.sets + [f"train.mixed_precision={MP[prec]}", f"train.run_name={name}",
                                           f"train.log_dir={args.log_dir}"]
            set_args = [a for s in all_sets for a in ("--set", s)]
            run([sys.executable, "train.py", "--config", c["config"], "--config_id", str(c["config_id"]),
                 *set_args, "--overwrite", "--no_progress"], env)
            rd = os.path.join(args.log_dir, name)
            run([sys.executable, "test.py", "--run", rd, "--no_reference", "--splits", "test", "--overwrite",
                 "--no_progress"], env)
            timing = json.load(open(os.path.join(rd, "timing.json")))
            meta = json.load(open(os.path.join(rd, "meta.json")))
            r = dict(steps_per_s=1.0 / timing["mean_step_s"], **scores(rd))
            results[(case, prec)] = r
            print(f"case={case} precision={prec} ran_as={meta.get('precision')} steps_per_s={r['steps_per_s']:.4g} "
                  f"psnr_dataset={r['psnr_dataset']:.4f} psnr_member_mean={r['psnr_member_mean']:.4f} "
                  f"rel_l2={r['rel_l2']:.5f}", flush=True)
        a, b = results.get((case, "fp32")), results.get((case, "bf16"))
        if a and b:
            d_ds, d_mm = b["psnr_dataset"] - a["psnr_dataset"], b["psnr_member_mean"] - a["psnr_member_mean"]
            d_rl = (b["rel_l2"] - a["rel_l2"]) / a["rel_l2"]
            ok = d_ds >= -0.1 and d_mm >= -0.1 and d_rl <= 0.01
            print(f"case={case} bf16_vs_fp32 speedup={b['steps_per_s'] / a['steps_per_s']:.3f} "
                  f"d_psnr_dataset={d_ds:+.4f} d_psnr_member_mean={d_mm:+.4f} d_rel_l2_rel={d_rl:+.4f} "
                  f"within_0.1dB_1pct={ok}", flush=True)
    return results


if __name__ == "__main__":
    main()
