#!/usr/bin/env python
"""Evaluate trained runs (spec 5): ``python test.py --run runs/NAME [runs/OTHER ...]`` or ``--config FILE --config_id N``.

``--test KEY=VALUE`` changes a key of the run's ``test`` section for this evaluation (repeatable; value parsed
as YAML), e.g. ``--test data_path=mpl:jacksboro_fault_dem`` for a terrain run. Several runs of one task print
one table; each writes into its own ``<run>/<--out_name>``.

The run's task (config section ``task``, default ``ensemble``) does the evaluation; for the ensemble task:
it bakes the model (timed), reconstructs every test and train member at full resolution in chunks, scores the
model and the reference predictors (mean field, nearest member, IDW), prints a table and writes
``metrics.csv`` (dataset level, with the model's wins against each reference predictor and the weights scored),
``members.csv`` (per member) and ``psnr_vs_idw.png`` (member PSNR, model vs IDW) into ``<run>/eval`` (or
``--out_dir``); see tasks/ensemble/evaluation.py for the columns. Scoring weights other than the final model.pt of a
finished run (training unfinished, or ``--checkpoint``) is warned about and recorded in metrics.csv.

Every task's metrics also record the machine (columns ``cpu``, ``threads``: the last digits of a score depend on
the summation order, which thread count and SIMD width change) and the data check (``data_fingerprint``): the run's
data is compared with the fingerprint stored in its meta.json at training (value range, member counts, file sizes
and content digests); a difference is an error naming what changed, unless ``--allow_changed_data`` (then
``CHANGED: ...`` in the column); a run trained before fingerprints is scored with a one-line warning.
"""
import argparse
import logging
import os
import sys

from util.config import ConfigError, load_config, parse_test_overrides
from util.run_dir import run_dir_of


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", nargs="+", help="run directories written by train.py (several: one table)")
    src.add_argument("--config", help="config file; the run directory is derived from it as in train.py")
    p.add_argument("--config_id", "--config-id", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="with --config: the same overrides given to train.py (they can change the run name)")
    p.add_argument("--checkpoint", help="weights to evaluate: a checkpoint folder or a .pt file "
                                        "(default: the final model.pt, else the latest checkpoint)")
    p.add_argument("--test", dest="test_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's test section for this evaluation (YAML value; repeatable)")
    p.add_argument("--out_dir", help="output folder (default: <run>/eval; one run only)")
    p.add_argument("--out_name", default="eval", help="output folder inside each run (default: eval)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    p.add_argument("--allow_changed_data", action="store_true",
                   help="score even when the run's data differs from its fingerprint at training (meta.json); "
                        "recorded in the metrics, column data_fingerprint")
    p.add_argument("--chunk_size", type=int, help="points per forward call (overrides test.chunk_size)")
    p.add_argument("--splits", nargs="+", choices=["test", "train"], help="members to reconstruct")
    p.add_argument("--resolutions", nargs="+", choices=["full", "train"],
                   help="evaluation resolutions (train: the training resolution of the spatio-conditional task)")
    p.add_argument("--dump_members", type=int, nargs="*", help="cond rows to dump as .npy/.vti/.png")
    p.add_argument("--no_reference", action="store_true", help="skip the reference predictors")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from util.registry import get
    from util.build import task_type_of
    from util.run_dir import load_experiment

    try:
        runs = args.run or [run_dir_of(load_config(args.config, args.config_id, args.overrides))]
        if len(runs) > 1 and (args.out_dir or args.checkpoint):
            raise ConfigError("--out_dir and --checkpoint name one run's files; with several runs use --out_name")
        if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise ConfigError(f"--out_dir '{args.out_dir}' is an existing file; give a folder for the results "
                              f"(created when missing)")
        types = {r: task_type_of(load_experiment(r)) for r in runs}
        if len(set(types.values())) > 1:
            raise ConfigError("the runs belong to different tasks (" + ", ".join(f"{r}: {t}" for r, t in
                                                                                  types.items()) + "); "
                              "evaluate them separately")
        task_cls = get("task", types[runs[0]])
        ov = parse_test_overrides(args.test_overrides)  # the config files' YAML reader: 1e-3 is a number
        ov.update({k: v for k, v in dict(chunk_size=args.chunk_size, splits=args.splits, resolutions=args.resolutions,
                                         dump_members=args.dump_members).items() if v is not None})
        if args.no_reference:
            ov["reference"] = False
        rows, outs = [], []
        for run in runs:
            outs.append(args.out_dir or os.path.join(run, args.out_name))
            rows += task_cls.evaluate(run, out_dir=outs[-1], checkpoint=args.checkpoint, overrides=ov,
                                      overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
                                      allow_changed_data=args.allow_changed_data)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:  # ValueError: DataError and kin
        sys.exit(f"error: {e}")
    print(task_cls.format_table(rows))
    for out in outs:
        print(f"results written to {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
