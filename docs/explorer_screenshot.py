#!/usr/bin/env python
"""Take the README's screenshot of the explorer (docs/explorer.png) in headless Chromium.

    python train.py --config configs/demo/drrnet.yaml --config_id 0     # the README's demo run
    python docs/explorer_screenshot.py --run runs/demo_drrnet --row 40   # -> docs/explorer.png

Serves the run's page, types the parameters of a stored run (``--row``, default: the first test run) into the
page's box, shows the 3D view as volume + isosurface at the field's median, waits until the full volume and the
isosurface are drawn, and saves a full-page PNG.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo_drrnet")
    p.add_argument("--row", type=int, default=None, help="stored run to show (default: the first test run)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "explorer.png"))
    p.add_argument("--chromium", default=None, help="the browser (default: headless.CHROMIUM, Debian's chromium)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from tasks.ensemble.explorer import ExplorerModel, app, headless

    vm = ExplorerModel.open(args.run, device="cpu")
    row = int(vm.test_rows[0]) if args.row is None else args.row
    with headless.served(vm) as port:
        with sync_playwright() as pw:
            b = headless.launch(pw, args.chromium or headless.CHROMIUM)
            page = headless.open_page(b, port, {"width": 1500, "height": 1000})
            page.get_by_text("update 1", exact=True).wait_for(timeout=60000)
            srv = app.PAGES[-1]
            page.get_by_placeholder(srv.text_box.placeholder, exact=True).fill(
                ", ".join(repr(float(v)) for v in vm.raw_of_row(row)))
            page.keyboard.press("Enter")
            page.get_by_text(f"This is stored run {row}").wait_for(timeout=60000)
            srv.wait_idle(60)
            page.wait_for_function("() => window.explorerVolumeFull === 1", timeout=60000)
            if srv.vtk is not None:
                iso = float(np.median(srv.volume))
                page.get_by_role("button", name="both", exact=True).click()
                box = page.get_by_label("isosurface value")
                box.fill(f"{iso:.4g}")
                box.press("Enter")
                page.wait_for_function("() => (window.explorerIsoPoints || 0) > 0", timeout=60000)
            page.wait_for_timeout(1000)
            page.screenshot(path=args.out, full_page=True)
            b.close()
    print(f"wrote {args.out} (run {args.run}, stored run {row})")


if __name__ == "__main__":
    main()
