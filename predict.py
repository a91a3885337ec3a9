#!/usr/bin/env python
"""Predict a field with a trained surrogate, in the simulation's own units.

Examples:
    python predict.py --run runs/demo_drrnet_0 --param front_radius=0.4 --param sharpness=20 ... --out f.npy
    python predict.py --run RUN --values 0.4 20 1.5 --resolution 64 --out f.npy --vti
    python predict.py --run RUN --values 0.5 0.5 0.5 --normalized --coords pts.npy --out v.npy
"""
import argparse
import logging
import sys

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train.py")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--param", action="append", metavar="NAME=VALUE", help="a parameter by name (repeat for each)")
    g.add_argument("--values", type=float, nargs="+", help="all parameter values in the CSV's column order")
    p.add_argument("--normalized", action="store_true", help="values are normalized to [0, 1]")
    p.add_argument("--resolution", type=int, nargs="+",
                   help="output grid: one size or one per axis in array order (default: the data's grid; for a "
                        "mesh ensemble its own vertices)")
    p.add_argument("--coords", help=".npy of (N, d) points in [-1, 1] (column 0 along the last array axis)")
    p.add_argument("--index_coords", help=".npy of (N, d) fractional array indices in array order")
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--vti", action="store_true", help="also write a .vti volume next to --out (grid output only)")
    p.add_argument("--checkpoint", help="weights (default: final model.pt, else the latest checkpoint)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from util.query import Surrogate

    try:
        params = args.values
        if args.param:
            params = {}
            for item in args.param:
                if "=" not in item:
                    raise ValueError(f"--param '{item}': expected NAME=VALUE")
                k, v = item.split("=", 1)
                params[k.strip()] = float(v)
        s = Surrogate.load(args.run, args.checkpoint, args.device)
        res = args.resolution[0] if args.resolution and len(args.resolution) == 1 else args.resolution
        out = s.predict(params, resolution=res,
                        coords=np.load(args.coords) if args.coords else None,
                        index_coords=np.load(args.index_coords) if args.index_coords else None,
                        normalized_params=args.normalized)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    np.save(args.out, out)
    print(f"wrote {args.out}: shape {out.shape}, range [{out.min():.4g}, {out.max():.4g}]")
    if args.vti:
        if out.ndim < 2:
            sys.exit("error: --vti needs grid output (no --coords; for a mesh ensemble give --resolution)")
        from util.volume_io import write_vti

        path = args.out[:-4] + ".vti" if args.out.endswith(".npy") else args.out + ".vti"
        write_vti(path, out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
