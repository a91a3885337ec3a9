#!/usr/bin/env python
"""Predict a field with a trained surrogate, in the simulation's own units.

Examples:
    python predict.py --run runs/demo_drrnet_0 --param front_radius=0.4 --param sharpness=20 ... --out f.npy
    python predict.py --run RUN --values 0.4 20 1.5 --resolution 64 --out f.npy --vti
    python predict.py --run RUN --values 0.5 0.5 0.5 --normalized --coords pts.npy --out v.npy
"""
import argparse
import logging
import os
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
    p.add_argument("--out", required=True, help="output .npy (written exactly under this name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and .vti)")
    p.add_argument("--vti", action="store_true", help="also write a .vti volume next to --out (grid output only)")
    p.add_argument("--checkpoint", help="weights (default: final model.pt, else the latest checkpoint)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def vti_path_of(out: str) -> str:
    """The .vti written next to ``--out`` with --vti: ``f.npy`` -> ``f.vti``, ``f`` -> ``f.vti``."""
    return out[:-4] + ".vti" if out.endswith(".npy") else out + ".vti"


def check_output(path: str, overwrite: bool) -> None:
    """Refuse before any computing: an existing output without --overwrite, a missing or read-only folder.

    Raises:
        FileExistsError / FileNotFoundError / PermissionError naming the path.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise FileExistsError(f"output '{path}' is a folder; give a file name (e.g. {os.path.join(path, 'f.npy')})")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output '{path}' already exists; pass --overwrite to replace it")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder '{folder}' does not exist (for --out {path}); create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder '{folder}' is not writable (for --out {path})")


def load_points(path: str, flag: str) -> np.ndarray:
    """The array of a points file (``--coords`` / ``--index_coords``); a ValueError naming the flag and file when it
    is not a readable .npy array (its values are checked by Surrogate.predict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} '{path}' not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{flag} '{path}' is not a .npy array of (N, d) points ({e})") from None


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from tasks.ensemble.surrogate import Surrogate
    from util.files import atomic_save_npy

    try:
        at_points = args.coords is not None or args.index_coords is not None
        if args.vti and at_points:
            raise ValueError("--vti needs grid output: it cannot be combined with --coords / --index_coords")
        if args.resolution and at_points:
            raise ValueError("--resolution sets the output grid: it cannot be combined with --coords / "
                             "--index_coords (the field is predicted at the points given)")
        check_output(args.out, args.overwrite)
        if args.vti:
            check_output(vti_path_of(args.out), args.overwrite)
        params = args.values
        if args.param:
            params = {}
            for item in args.param:
                if "=" not in item:
                    raise ValueError(f"--param '{item}': expected NAME=VALUE")
                k, v = item.split("=", 1)
                k = k.strip()
                if k in params:
                    raise ValueError(f"--param {k} is given twice")
                try:
                    params[k] = float(v)
                except ValueError:
                    raise ValueError(f"--param '{item}': the value '{v}' is not a number") from None
        coords = load_points(args.coords, "--coords") if args.coords else None
        index_coords = load_points(args.index_coords, "--index_coords") if args.index_coords else None
        s = Surrogate.load(args.run, args.checkpoint, args.device)
        if args.vti and not s.has_grid and not args.resolution:
            raise ValueError("--vti needs grid output; this run's data is a mesh: give --resolution for a grid")
        res = args.resolution[0] if args.resolution and len(args.resolution) == 1 else args.resolution
        out = s.predict(params, resolution=res, coords=coords, index_coords=index_coords,
                        normalized_params=args.normalized)
        if args.vti and out.ndim < 2:
            raise ValueError("--vti needs grid output (no --coords; for a mesh ensemble give --resolution)")
        lines = [f"wrote {args.out}: shape {out.shape}, range [{out.min():.4g}, {out.max():.4g}]"]
        written = []
        try:  # every output whole (atomic writers) or, on an error, none of them
            atomic_save_npy(args.out, out)  # exactly --out (np.save would append .npy to a name without it)
            written.append(args.out)
            if args.vti:
                from util.volume_io import write_vti

                write_vti(vti_path_of(args.out), out)
                written.append(vti_path_of(args.out))
                lines.append(f"wrote {vti_path_of(args.out)}")
        except BaseException:
            for path in written:
                try:
                    os.remove(path)
                except OSError:
                    pass
            raise
        print("\n".join(lines))
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        # ValueError covers util.registry.ConfigError and util.errors.DataError
        sys.exit(f"error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
