#!/usr/bin/env python
"""Train a surrogate: ``[accelerate launch] train.py --config FILE --config_id N [--set k=v ...]``.

Writes a run directory ``<train.log_dir>/<run name>`` (see util/run_dir.py). An existing run directory is never
deleted unless ``--overwrite`` is given, and then only after the new config and data have been validated and only
when train.py wrote it (its meta.json carries the run marker); ``--resume`` continues it from its latest intact
checkpoint (a damaged one is named and skipped) when the config and the data are the ones it was trained with
(apart from keys safe to change on resume; ``--resume_changed`` continues anyway and records the change in
meta.json's ``resumes``). A run directory is locked (``train.lock``) while a process trains into it. Config and data
errors end with a one-line message (``--traceback`` shows the full traceback).
"""
import argparse
import logging
import sys

from util.config import ConfigError, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file holding a list of experiments")
    p.add_argument("--config_id", "--config-id", type=int, default=0, help="index of the experiment in the file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="delete an existing run directory of the same name")
    g.add_argument("--resume", action="store_true",
                   help="continue the existing run from its latest checkpoint; the config must be the run's, "
                        "apart from keys safe to change on resume (log/checkpoint intervals, timing, a larger "
                        "max_steps, the test section), and the data must be unchanged (meta.json's fingerprint)")
    g.add_argument("--resume_changed", action="store_true",
                   help="--resume even though the config or the data differ from the run's (recorded in its "
                        "meta.json, 'resumes')")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true",
                   help="show the full traceback of a config/data error instead of a one-line message")
    return p.parse_args(argv)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        exp = load_config(args.config, args.config_id, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {_one_line(e)}")
    from util.training import TrainingCollapsed, train

    try:
        train(exp, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
              resume_changed=args.resume_changed)
    except (ValueError, FileExistsError, FileNotFoundError, TrainingCollapsed, FloatingPointError) as e:
        # ValueError covers ConfigError and util.errors.DataError: bad input, told in one line (--traceback: all)
        if args.traceback:
            raise
        sys.exit(f"error: {_one_line(e)}")


if __name__ == "__main__":
    main()
