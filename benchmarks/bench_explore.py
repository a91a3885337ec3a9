#!/usr/bin/env python
"""Latency of the browser explorer (issue 22): p50 / p95 per parameter update.

Server side (the view model, as the page's worker runs it): the three slices (model planes + nearest + IDW-8 + the
trust cue), the coarse volume and the full volume (the 3D view's: ``volume(display=True)``). End to end
(``--browser``): headless Chromium (software WebGL) on the served page, on the browser's clock, from a parameter
change (alternately: the first parameter's slider moved, as a drag does, and all six typed into the page's box, from
the page's Enter keydown) to the frame that shows the model's new slice (DRAWN_JS's stamp), the frame that shows
the full volume (drawn with the preview ray step; VOLUME_JS's stamp) and the frame that shows it redrawn at the
view's own ray step. Each update starts once the previous one is fully drawn and at least DRAG_S + 0.1 s after it
(a single change, not a drag: no preview ray step, so both volume stamps coincide). The queries are drawn
independently of the runs' conditions (a query on a stored run also shows its truth and error rows).

The model: the paper's Cloverleaf DRR-Net (configs/clover_600/drrnet.yaml, 6 parameters) with random weights, baked,
on a 64^3 field; the training runs are random fields (only their count matters to the timing).

    python benchmarks/bench_explore.py                      # server side, 50 updates
    python benchmarks/bench_explore.py --browser --n 30     # and end to end in /usr/bin/chromium

Targets (issue 22, 2-core CPU): slices within 100 ms p95, the full 3D field within 500 ms p95.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Runs:
    """The dataset interface the view model reads (train/test rows, conditions, fields), with random fields."""

    def __init__(self, n_train, n_test, cond_dim, shape, seed=0):
        rng = np.random.default_rng(seed)
        self.train_idx = np.arange(n_train)
        self.test_idx = np.arange(n_train, n_train + n_test)
        self._c = rng.uniform(0, 1, (n_train + n_test, cond_dim)).astype(np.float32)
        base = rng.uniform(0, 1, shape).astype(np.float32)
        self._f = [np.clip(base + 0.05 * rng.standard_normal(shape, dtype=np.float32), 0, 1)
                   for _ in range(n_train + n_test)]

    def conds(self, rows):
        return torch.from_numpy(self._c[np.asarray(rows)])

    def full_field(self, row):
        return torch.from_numpy(self._f[int(row)])


def build(args):
    import models  # noqa: F401
    from tasks.ensemble.explorer import ExplorerModel
    from tasks.ensemble.surrogate import Surrogate
    from util.build import build_model
    from util.config import load_config

    torch.manual_seed(0)
    exp = load_config(args.config, 0)
    model = build_model(exp, inputs={"cond_dim": args.cond_dim, "spatial_dims": 3})
    with torch.no_grad():   # random weights of a trained magnitude (not the zero-ish init)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    shape = [args.res] * 3
    meta = {"cond_dim": args.cond_dim, "spatial_shape": shape, "spatial_dims": 3, "has_grid": True,
            "value_min": 0.0, "value_max": 1.0, "log_transform": False,
            "param_names": [f"p{i}" for i in range(args.cond_dim)], "param_min": [0.0] * args.cond_dim,
            "param_max": [1.0] * args.cond_dim}
    t = time.perf_counter()
    s = Surrogate(model, meta, args.device or "cpu")
    bake = time.perf_counter() - t
    return ExplorerModel(s, _Runs(args.n_train, 10, args.cond_dim, tuple(shape))), bake


def pct(xs):
    a = np.asarray(xs) * 1e3
    return f"p50 {np.percentile(a, 50):7.1f} ms   p95 {np.percentile(a, 95):7.1f} ms   (n={len(a)})"


def server_side(vm, n, rng):
    out = {"slices": [], "coarse volume": [], "full volume": []}
    q0 = vm.parse(rng.uniform(0, 1, vm.d_c))
    vm.slices(q0), vm.volume(q0, coarse=True, display=True), vm.volume(q0, display=True)     # warm-up
    for _ in range(n):
        q = vm.parse(rng.uniform(0, 1, vm.d_c))
        t0 = time.perf_counter()
        vm.slices(q)
        t1 = time.perf_counter()
        vm.volume(q, coarse=True, display=True)
        t2 = time.perf_counter()
        vm.volume(q, display=True)
        t3 = time.perf_counter()
        out["slices"].append(t1 - t0)
        out["coarse volume"].append(t2 - t1)
        out["full volume"].append(t3 - t2)
    return out


def end_to_end(vm, n, rng):
    from playwright.sync_api import sync_playwright

    from tasks.ensemble.explorer import app, headless

    out = {f"{w} ({d})": [] for d in ("slider", "typed") for w in ("slices", "full volume", "refined 3D")}
    out["3D render call in the page"] = []   # of the full volume: write into vtk.js' image + render() (JS only)
    with headless.served(vm) as port:
        with sync_playwright() as p:
            b = headless.launch(p)
            page = headless.open_page(b, port, {"width": 1400, "height": 1200})
            page.get_by_text("update 1", exact=True).wait_for(timeout=60000)
            srv = app.PAGES[-1]
            box = page.get_by_placeholder(srv.text_box.placeholder, exact=True)
            # a typed update starts when the page sees the Enter key (not when the driver sends it)
            page.evaluate("() => document.addEventListener('keydown', e => { if (e.key === 'Enter') "
                          "window.explorerEnterAt = performance.now(); }, true)")
            get = "Bokeh.documents[0].get_model_by_name('src_model_0').data.image[0]"
            # the Bokeh slider model of the first parameter (a drag in the page moves its value the same way)
            slider_id = next(iter(srv.sliders[0]._slider._models.values()))[0].id
            last = time.monotonic()
            for i in range(2 * n + 2):
                drive = "slider" if i % 2 == 0 else "typed"
                srv.wait_idle(30)
                page.evaluate(f"() => {{ window.__prev = Array.from({get}.slice(0, 256)); }}")
                page.wait_for_function("() => window.explorerVolumeFull === 1 && window.explorerVolumeRefined === "
                                       "window.explorerVolumeUpdates", polling=5, timeout=30000)   # a pause
                page.evaluate("() => { window.explorerVolumeFull = 0; }")
                time.sleep(max(0.0, app.DRAG_S + 0.1 - (time.monotonic() - last)))   # a single change, not a drag
                last = time.monotonic()
                if drive == "slider":
                    t0 = page.evaluate("([id, v]) => { const t = performance.now(); "
                                       "Bokeh.documents[0].get_model_by_id(id).value = v; return t; }",
                                       [slider_id, float(rng.uniform(0, 1))])
                else:
                    box.fill(", ".join(f"{v:.6f}" for v in rng.uniform(0, 1, vm.d_c)))
                    box.press("Enter")
                    t0 = page.evaluate("() => window.explorerEnterAt")
                # the model's slice painted (the page's DRAWN_JS stamps it), then the full volume written into the
                # browser's vtk.js image and its frame drawn (preview ray step), then redrawn at the view's own
                # step (VOLUME_JS stamps both); all on the browser's clock, after the frame that shows them
                page.wait_for_function(f"() => {{ const a = {get}; return window.__prev.some((v, i) => v !== a[i]) "
                                       f"&& window.explorerSlicesDrawnAt > {t0}; }}", polling=5, timeout=30000)
                page.wait_for_function(f"() => window.explorerVolumeFull === 1 && window.explorerVolumeAt > {t0} "
                                       f"&& window.explorerVolumeRefinedAt > {t0}", polling=5, timeout=30000)
                t1, t2, t3, r = page.evaluate("() => [window.explorerSlicesDrawnAt, window.explorerVolumeAt, "
                                              "window.explorerVolumeRefinedAt, window.explorerVolumeRenderMs]")
                if i >= 2:   # the first of each is a warm-up
                    out[f"slices ({drive})"].append((t1 - t0) / 1e3)
                    out[f"full volume ({drive})"].append((t2 - t0) / 1e3)
                    out[f"refined 3D ({drive})"].append((t3 - t0) / 1e3)
                    out["3D render call in the page"].append(r / 1e3)
            b.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/clover_600/drrnet.yaml")
    p.add_argument("--cond_dim", type=int, default=6, help="Cloverleaf: 6 parameters")
    p.add_argument("--res", type=int, default=64, help="field resolution per axis")
    p.add_argument("--n_train", type=int, default=40, help="training runs (random fields) for nearest / IDW")
    p.add_argument("--n", type=int, default=50, help="updates timed")
    p.add_argument("--browser", action="store_true", help="also end to end in headless Chromium")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vm, bake = build(args)
    # queries independent of the runs' random conditions (seed 0): with the same seed the typed queries were the
    # stored runs' conditions, and each move onto or off a stored run (truth and error rows) is not what is timed
    rng = np.random.default_rng(2026)
    print(f"explorer latency: {args.config} (random weights), {args.res}^3 field, d_c {args.cond_dim}, "
          f"device {vm.s.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; bake {bake:.2f} s")
    for k, v in server_side(vm, args.n, rng).items():
        print(f"  server  {k:24s} {pct(v)}")
    if args.browser:
        for k, v in end_to_end(vm, args.n, rng).items():
            print(f"  browser {k:24s} {pct(v)}")


if __name__ == "__main__":
    main()
