#!/usr/bin/env python
"""FLOPs and parameter counts (spec 6): ``python test_flops.py --config FILE [--config_id N ...]``.

Builds each model of the file on CPU, bakes it when it has a bake step, and prints fvcore TFLOPs per 1e9 points
(100 conditions x 1000 coordinates, one multiply-add = one flop) and the parameter count. The run's task decides
what a point costs (``Task.count_flops``): terrain counts a tile's encode + decode per pixel.

The model's data-derived arguments (cond_dim, spatial_dims, out_dim) come from --cond_dim / --spatial_dims /
--out_dim, else from the task when it knows them without data (e.g. the image task: 2D, no condition, the
configured channels), else from the data (the dataset is built, so the data must be present).
"""
import argparse
import logging
import sys

from util.config import ConfigError, load_config, read_config_file


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--config_id", "--config-id", type=int, nargs="*", help="ids to count (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--cond_dim", type=int, help="number of condition parameters (default: from the data)")
    p.add_argument("--spatial_dims", type=int, choices=[1, 2, 3], help="default: from the task or the data")
    p.add_argument("--out_dim", type=int, help="output channels (default: from the task or the data)")
    p.add_argument("--n_cond", type=int, default=100)
    p.add_argument("--n_points", type=int, default=1000)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from util.build import build_model, resolve_model_inputs, task_type_of
    from util.registry import get

    try:
        ids = args.config_id if args.config_id else list(range(len(read_config_file(args.config))))
        rows = []
        for i in ids:
            exp = load_config(args.config, i, args.overrides)
            given = {k: getattr(args, k) for k in ("cond_dim", "spatial_dims", "out_dim")}  # None: not given
            inputs = resolve_model_inputs(exp, given=given)
            model = build_model(exp, inputs=inputs)
            r = get("task", task_type_of(exp)).count_flops(model, inputs, args.n_cond, args.n_points)
            rows.append((i, exp["model"]["type"], r))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{'id':>3}  {'model':<16} {'TFLOPs/1e9 pts':>15} {'params':>12}  uncounted ops")
    for i, name, r in rows:
        print(f"{i:>3}  {name:<16} {r['tflops_per_1e9_points']:>15.2f} {r['params']:>12,}  {', '.join(r['uncounted'])}")


if __name__ == "__main__":
    main()
