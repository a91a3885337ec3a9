"""The explorer in headless Chromium: what the browser test, ``benchmarks/bench_explore.py`` and
``docs/explorer_screenshot.py`` share (a served page on a free local port, Debian's chromium with software WebGL,
opening the page once the threaded server is up). Playwright is passed in, not imported here."""
from __future__ import annotations

import contextlib
import socket
import time
from typing import Callable, Iterator, Optional

CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium (``apt-get install -y chromium``; Playwright's own browser builds cannot be downloaded here)."""
CHROMIUM_ARGS = ["--no-sandbox", "--use-gl=swiftshader", "--enable-unsafe-swiftshader"]
"""Root without a sandbox; WebGL (the 3D view) in software."""


def free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


@contextlib.contextmanager
def served(vm) -> Iterator[int]:
    """Serve ``vm``'s page on a free 127.0.0.1 port in a background thread; yields the port, stops on exit."""
    from tasks.ensemble.explorer import app

    port = free_port()
    server = app.serve(vm, port=port, threaded=True)
    try:
        yield port
    finally:
        server.stop()


def launch(playwright, executable: str = CHROMIUM):
    """A headless Chromium browser (``playwright``: the object of ``sync_playwright()``)."""
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def open_page(browser, port: int, viewport: dict, setup: Optional[Callable] = None):
    """A new page on the served explorer; ``setup(page)`` runs before it loads (listeners). Retries while the
    threaded server is still starting."""
    page = browser.new_page(viewport=viewport)
    if setup is not None:
        setup(page)
    for _ in range(50):
        try:
            page.goto(f"http://127.0.0.1:{port}/")
            break
        except Exception:  # noqa: BLE001 - the server is not listening yet
            time.sleep(0.2)
    return page
