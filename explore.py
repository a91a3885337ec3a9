#!/usr/bin/env python
"""Explore a trained ensemble surrogate in the browser: drag a parameter, see the field, compare with the runs.

Examples:
    python explore.py --run runs/demo_drrnet                 # http://127.0.0.1:5006/
    python explore.py --run RUN --port 8080 --device cuda

The page (Panel + Bokeh + vtk.js, all served from the installed packages) shows the model's three orthogonal
slices and 3D view at the chosen parameters beside the nearest training run, IDW-8 and, for a stored run, its true
field and the error; the trust cue; downloads (.npy, .vti). The code lives in tasks/ensemble/explorer/.
"""
import argparse
import logging
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of an ensemble run written by train.py")
    p.add_argument("--port", type=int, default=5006, help="port (default 5006)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; another address exposes the page "
                        "and the model to the network, with a warning)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device of the model (default: cuda when available)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from tasks.ensemble.explorer.view_model import ExplorerModel, RunRefused

    if not 0 < args.port < 65536:
        sys.exit(f"error: --port {args.port} is not a port number (1..65535)")
    try:
        vm = ExplorerModel.open(args.run, device=args.device)
    except RunRefused as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    from tasks.ensemble.explorer.app import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {args.host}: anyone who can reach this machine on port {args.port} can use the page "
              "(and the model); there is no authentication", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"explorer of {args.run}: http://{host}:{args.port}/  (Ctrl-C to stop)", flush=True)
    try:
        serve(vm, port=args.port, host=args.host)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
