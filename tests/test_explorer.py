"""The browser explorer (issue 22): the view model against Surrogate.predict / predict.py and references computed
here independently (nearest run, IDW-8, distance, box flag), bad input, refusals, update coalescing; and a real
headless Chromium that opens the page, moves a slider and reads the served slice back."""
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
import yaml

import tasks  # noqa: F401  (registers every task)
from tasks.ensemble.explorer.headless import CHROMIUM
from tasks.ensemble.surrogate import denormalize
from util.config import load_config
from util.training import train

SHAPE = (6, 7, 8)
NAMES = ["radius", "speed", "gamma"]
TRAIN_ROWS = list(range(10))
TEST_ROWS = [10, 11]
TINY_DRR = dict(type="drrnet", spatial_resolutions=[4, 6], spatial_channels=2, pe_frequencies=2,
                spatial_refiner_layers=1, spatial_hidden_mult=2.0, cond_resolutions=[2, 4], cond_channels=2,
                cond_refiner_layers=1, cond_hidden_mult=2.0, hidden_dim=16, decoder_layers=2)


def _field(p):
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in SHAPE], indexing="ij")
    return (3.0 + np.sin(4 * x * (0.5 + p[0]) + 3 * y * p[1] / 10 + z * p[2])).astype(np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained 3D ensemble run (seconds) with parameter names and ranges; test row 11 lies outside the
    training runs' box in 'speed'."""
    root = tmp_path_factory.mktemp("explore")
    rng = np.random.default_rng(3)
    params = np.column_stack([rng.uniform(0.2, 0.8, 12), rng.uniform(2.0, 8.0, 12), rng.uniform(1.0, 2.0, 12)])
    params[11, 1] = 9.5   # a test run beyond every training run's speed
    data = root / "data"
    data.mkdir()
    for i, p in enumerate(params):
        np.save(data / f"m{i:02d}.npy", _field(p))
    lo, hi = params.min(0), params.max(0)   # cond.npy: normalized; cond_meta.json: the units
    np.save(root / "cond.npy", np.concatenate([np.arange(12)[:, None], (params - lo) / (hi - lo)], axis=1))
    np.save(root / "split.npy", {"cond_idx": np.array(TRAIN_ROWS), "cond_idx_unseen": np.array(TEST_ROWS)},
            allow_pickle=True)
    (root / "cond_meta.json").write_text(json.dumps({"names": NAMES, "min": lo.tolist(),
                                                     "max": hi.tolist()}))
    exp = dict(name="tiny", model=TINY_DRR,
               dataset=dict(type="ensemble", data_dir=str(data), cond_path=str(root / "cond.npy"),
                            cond_split_path=str(root / "split.npy"), cond_batch=2, spatial_log2batch=5),
               optim=dict(type="adam", lr=1e-2), scheduler=dict(type="constant"),
               train=dict(max_steps=8, log_dir=str(root / "runs"), log_every=4, collapse_check_steps=0))
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump([exp]))
    run_dir = train(load_config(str(cfg)), progress=False)
    return dict(dir=str(run_dir), params=params, fields=[np.load(data / f"m{i:02d}.npy") for i in range(12)])


@pytest.fixture(scope="module")
def vm(run):
    from tasks.ensemble.explorer import ExplorerModel

    return ExplorerModel.open(run["dir"], device="cpu")


def _normalized(run, raw):
    lo, hi = run["params"].min(0), run["params"].max(0)
    return (np.asarray(raw, dtype=np.float64) - lo) / (hi - lo)


def test_view_matches_surrogate_and_independent_references(run, vm):
    from tasks.ensemble.surrogate import Surrogate

    raw = [0.45, 5.0, 1.4]   # no stored run
    q = vm.parse(raw)
    view = vm.slices(q, positions=[1, 5, 2])
    full = Surrogate.load(run["dir"], device="cpu").predict(dict(zip(NAMES, raw)))
    planes = [full[1], full[:, 5], full[:, :, 2]]
    for a in range(3):
        np.testing.assert_allclose(view.fields["model"][a], planes[a], rtol=1e-5, atol=1e-5)
        # the three planes in one query (the page's first message) = each plane on its own (up to the matrix
        # products' blocking for another number of rows)
        np.testing.assert_allclose(view.fields["model"][a], vm.model_plane(q, a, [1, 5, 2][a]), rtol=1e-6, atol=0)
    model = vm.model_slices(q, positions=[1, 5, 2])
    assert all(np.array_equal(m, f) for m, f in zip(model, view.fields["model"]))
    assert vm.slices(q, positions=[1, 5, 2], model=model).fields["model"] == model
    np.testing.assert_allclose(vm.volume(q), full, rtol=1e-5, atol=1e-5)
    assert vm.volume(q, coarse=True).shape == (3, 4, 4)
    # the volume keeps DRR-Net's table resampled onto the data's grid: bitwise predict_grid's interpolating path,
    # again for another query (the kept rows reused)
    m = vm.s.model
    for qq in (q, vm.parse(np.asarray(raw) * 0.9 + 0.1 * run["params"][TRAIN_ROWS[0]])):
        c32 = torch.as_tensor(qq.c, dtype=torch.float32)
        want = denormalize(m.predict_grid(SHAPE, c32).numpy(), vm.meta)
        np.testing.assert_array_equal(vm.volume(qq), want)
        assert m._rows_cache[torch.float32][0][0] == SHAPE
    # the 3D view's volume: bf16 products on a CPU with AMX-BF16 (bitwise predict_grid in bf16), else float32
    from util.cpu import cpu_features

    amx = cpu_features()["bf16"] == "amx_bf16"
    assert vm.display_dtype == (torch.bfloat16 if amx else None)
    shown = vm.volume(q, display=True)
    want = denormalize(m.predict_grid(SHAPE, torch.as_tensor(q.c, dtype=torch.float32),
                                      dtype=vm.display_dtype).numpy(), vm.meta)
    np.testing.assert_array_equal(shown, want)
    np.testing.assert_allclose(shown, full, rtol=1e-2, atol=1e-2)

    # nearest training run and IDW-8 (power 2), by hand in normalized parameter space
    c = _normalized(run, raw)
    tr_c = _normalized(run, run["params"][TRAIN_ROWS])
    d = np.sqrt(((tr_c - c) ** 2).sum(1))
    near = TRAIN_ROWS[int(np.argmin(d))]
    order = np.argsort(d, kind="stable")[:8]
    w = 1 / d[order] ** 2
    idw = sum(wi * run["fields"][TRAIN_ROWS[i]] for wi, i in zip(w / w.sum(), order))
    for a, cut in enumerate([lambda f: f[1], lambda f: f[:, 5], lambda f: f[:, :, 2]]):
        np.testing.assert_allclose(view.fields["nearest"][a], cut(run["fields"][near]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(view.fields["idw"][a], cut(idw), rtol=1e-4, atol=1e-4)
    t = view.trust
    assert t.nearest_row == near and t.distance == pytest.approx(d.min(), rel=1e-6)
    assert t.max_model_idw == pytest.approx(max(np.abs(view.fields["model"][a] - cut(idw)).max() for a, cut in
                                                enumerate([lambda f: f[1], lambda f: f[:, 5],
                                                           lambda f: f[:, :, 2]])), abs=1e-4)
    assert not t.outside_box and view.at_row is None and "truth" not in view.fields


def test_stored_run_shows_truth_error_and_box_flag(run, vm):
    q = vm.parse(run["params"][11])   # a test run outside the training box in 'speed'
    view = vm.slices(q)
    assert view.at_row == 11
    assert view.trust.outside_box and view.trust.outside == ["speed"]
    z = SHAPE[0] // 2
    np.testing.assert_allclose(view.fields["truth"][0], run["fields"][11][z], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(view.fields["error"][0], view.fields["model"][0] - run["fields"][11][z], atol=1e-5)
    q = vm.parse(run["params"][4])    # a training run: distance 0, nearest and IDW are that run
    view = vm.slices(q)
    assert view.at_row == 4 and view.trust.nearest_row == 4 and view.trust.distance == 0
    np.testing.assert_allclose(view.fields["idw"][0], run["fields"][4][z], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("values, words", [
    (["abc", 5, 1.5], "'abc' is not a number"), ([float("nan"), 5, 1.5], "not a finite number"),
    ([0.5, 1e6, 1.5], "speed = 1e+06 is outside"), ([0.5], "expected 3 parameter values"),
    (["", 5, 1.5], "is not a number"), ([None, 5, 1.5], "is not a number")])
def test_bad_input_is_a_message(vm, values, words):
    from tasks.ensemble.explorer import InputError

    with pytest.raises(InputError, match=words.replace("+", r"\+").replace("(", r"\(")):
        vm.parse(values)
    with pytest.raises(InputError, match="outside"):
        vm.slices(vm.parse([0.5, 5, 1.5]), positions=[0, 0, 99])


def test_downloads_are_readable(vm, tmp_path):
    import io

    f = vm.volume(vm.parse([0.5, 5, 1.5]))
    assert np.array_equal(np.load(io.BytesIO(vm.npy_bytes(f))), f)
    vti = vm.vti_bytes(f)
    assert vti.startswith(b"<?xml") or b"<VTKFile" in vti[:200]


def test_refusals_are_one_line(run, tmp_path, capsys):
    import explore

    other = tmp_path / "img"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"task": "image"}))
    no_w = tmp_path / "now"
    no_w.mkdir()
    shutil.copy(os.path.join(run["dir"], "meta.json"), no_w / "meta.json")
    for path, words in [(other, "is a 'image' run"), (no_w, "has no weights"), (tmp_path / "nope", "no meta.json")]:
        with pytest.raises(SystemExit) as e:
            explore.main(["--run", str(path)])
        msg = str(e.value.code)
        assert msg.startswith("error:") and words in msg and "\n" not in msg


def test_typed_values_stay_the_query_until_the_sliders_show_them(run, vm):
    """On a served page typed values reach the sliders only with the rest of the view; a slice position or one
    parameter slider moved meanwhile keeps the other typed values in the query (not the sliders' old ones)."""
    from tasks.ensemble.explorer import app

    page = app.ExplorerPage(vm)   # no server: updates apply at once on the worker
    try:
        assert page.wait_idle(30)
        typed = [float(v) for v in run["params"][11]]
        page._slider_values = list(typed)            # as set_params leaves them on a served page
        page.positions[0].value = 1                  # a slice position moved
        assert page.wait_idle(30)
        np.testing.assert_allclose(page.view.query.raw, typed)
        assert page.view.positions[0] == 1
        lo, hi = float(vm.lo[0]), float(vm.hi[0])
        page.sliders[0].value = (lo + hi) / 2        # one parameter slider moved
        assert page.wait_idle(30)
        np.testing.assert_allclose(page.view.query.raw, [(lo + hi) / 2] + typed[1:])
        # outside a server the rest of the view came at once: the sliders show the query now
        assert page._slider_values is None
        assert [w.value for w in page.sliders] == pytest.approx([(lo + hi) / 2] + typed[1:])
    finally:
        page.close()


def test_drawn_ack_releases_only_its_own_volume(vm):
    """The page's ack of older slices (DRAWN_JS counts the model updates it drew) does not release the volume of a
    newer update; the ack of that update, or of a later one, does."""
    from tasks.ensemble.explorer import app

    page = app.ExplorerPage(vm)
    try:
        assert page.wait_idle(30)
        ev = threading.Event()
        page._after_drawn = (3, ev)        # model update 3 sent, its volume waiting
        page._on_drawn("data", None, {"n": [2]})
        assert not ev.is_set() and page._after_drawn == (3, ev)
        page._on_drawn("data", None, {"n": [3]})
        assert ev.is_set() and page._after_drawn is None
    finally:
        page.close()


def test_colour_bars_follow_the_colours_on_mappers_of_their_own(vm):
    """The colour bars never share a mapper with a slice image (BokehJS repaints every bar on a shared mapper with
    each new image), and still show the chosen palette and scale."""
    from bokeh.models import LogColorMapper

    from tasks.ensemble.explorer import app

    page = app.ExplorerPage(vm)
    try:
        assert page.wait_idle(30)
        image_mappers = {id(g.color_mapper) for g in page.glyphs} | {id(page.err_mapper)}
        assert page.bars and all(id(b.color_mapper) not in image_mappers for b in page.bars)
        page.cmap.value = [k for k in app.PALETTES if k != page.cmap.value][0]
        page.log_scale.value = True
        for b in page.bars:
            assert isinstance(b.color_mapper, LogColorMapper) and id(b.color_mapper) not in image_mappers
            assert list(b.color_mapper.palette) == list(app.PALETTES[page.cmap.value])
            assert (b.color_mapper.low, b.color_mapper.high) == (page.log_mapper.low, page.log_mapper.high)
        assert all(g.color_mapper is page.log_mapper for g in page.glyphs)
    finally:
        page.close()


def test_coalescer_drops_stale_requests():
    from tasks.ensemble.explorer import Coalescer

    gate, seen = threading.Event(), []

    def handle(req, superseded):
        if req == 0:
            gate.wait(5)
            seen.append(("superseded", superseded()))
        seen.append(req)

    c = Coalescer(handle)
    try:
        c.submit(0)
        time.sleep(0.05)
        for i in range(1, 6):   # fast dragging while request 0 runs
            c.submit(i)
        gate.set()
        assert c.wait_idle(5)
        assert seen == [("superseded", True), 0, 5] and c.handled == [0, 5]
    finally:
        c.close()


# ------------------------------------------------------------------------------------------- headless browser
@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs Debian's chromium)")
        pytest.skip(f"no {CHROMIUM} (apt-get install -y chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from tasks.ensemble.explorer import headless

    with sync_playwright() as p:
        b = headless.launch(p)
        try:
            yield b
        finally:
            b.close()


def _in_session(srv, fn):
    """Run ``fn`` as a callback of the page's server session (a widget changed from the test thread) and wait."""
    done = threading.Event()

    def run():
        try:
            fn()
        finally:
            done.set()
    srv.doc.add_next_tick_callback(run)
    assert done.wait(30)


_FIND_VIEW_JS = """(pred => {
  function find(v) { if (pred(v)) return v; for (const c of v.children()) { const r = find(c); if (r) return r; }
                     return null; }
  for (const root of Bokeh.index) { const v = find(root); if (v != null) return v; } return null; })"""
"""A JavaScript function: the page's first Bokeh view (depth first) for which ``pred(view)`` holds, or null."""
_VTK_VIEW_JS = f"{_FIND_VIEW_JS}(v => v._vtk_renwin != null && v.volume !== undefined)"


def _row_visibility_js(srv, nm):
    """JavaScript: the CSS visibility of slice row ``nm``'s element in the page."""
    rid = next(iter(srv.slice_rows[nm]._models.values()))[0].id
    return f"getComputedStyle({_FIND_VIEW_JS}(v => v.model.id === {rid!r}).el).visibility"


def _row_visibility(page, srv, nm):
    return page.evaluate(f"() => {_row_visibility_js(srv, nm)}")


def _served_plane(page, name):
    return np.asarray(page.evaluate(
        f"() => Array.from(Bokeh.documents[0].get_model_by_name('{name}').data.image[0])"), dtype=np.float32)


def test_browser_moves_a_slider_and_sees_predict_py_output(run, vm, browser, tmp_path):
    import predict
    from tasks.ensemble.explorer import app, headless

    outside, errors = [], []

    def listen(page):
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
            (f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", "data:", "blob:")) else None)

    with headless.served(vm) as port:
        page = headless.open_page(browser, port, {"width": 1400, "height": 1200}, setup=listen)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                               "Bokeh.documents[0].get_model_by_name('src_model_0') !== null", timeout=30000)
        page.get_by_text("update 1", exact=True).wait_for(timeout=30000)
        srv = app.PAGES[-1]
        before = _served_plane(page, "src_model_0")
        box = page.locator(".noUi-handle").first.bounding_box()   # drag the first parameter's slider right
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        for dx in range(10, 90, 10):
            page.mouse.move(box["x"] + box["width"] / 2 + dx, box["y"] + box["height"] / 2)
        page.mouse.up()
        deadline = time.time() + 30
        while np.array_equal(_served_plane(page, "src_model_0"), before) and time.time() < deadline:
            page.wait_for_timeout(100)
        srv.wait_idle(30)
        page.wait_for_timeout(300)
        after = _served_plane(page, "src_model_0")
        raw = srv.view.query.raw
        assert raw[0] > float(np.mean(vm.lo[0] + vm.hi[0]) / 2)   # the slider moved right
        assert not np.allclose(after, before)
        out = tmp_path / "f.npy"
        predict.main(["--run", run["dir"], "--values", *[repr(float(v)) for v in raw], "--out", str(out)])
        expect = np.load(out)[SHAPE[0] // 2]
        np.testing.assert_allclose(after.reshape(expect.shape), expect, rtol=1e-5, atol=1e-5)
        # a stored run typed into the text box: truth and error rows appear (kept in the layout, hidden by CSS)
        assert _row_visibility(page, srv, "truth") == "hidden" and not srv.row_shown("truth")
        page.get_by_placeholder(srv.text_box.placeholder, exact=True).fill(", ".join(repr(float(v)) for v in run["params"][11]))
        page.keyboard.press("Enter")
        page.get_by_text("This is stored run 11").wait_for(timeout=30000)
        assert srv.view.at_row == 11 and srv.row_shown("error") and srv.row_shown("truth")
        # the sliders moved to the typed values (with the rest of the view), in the server and in the page
        srv.wait_idle(30)
        typed = [float(v) for v in run["params"][11]]
        page.wait_for_function("([id, v]) => Math.abs(Bokeh.documents[0].get_model_by_id(id).value - v) < 1e-9",
                               arg=[next(iter(srv.sliders[-1]._slider._models.values()))[0].id, typed[-1]],
                               timeout=30000)
        assert [w.value for w in srv.sliders] == pytest.approx(typed, abs=1e-12)
        page.wait_for_function(f"() => {_row_visibility_js(srv, 'error')} === 'visible'", timeout=30000)
        assert _row_visibility(page, srv, "truth") == "visible"
        # the 3D view: the full volume written into the browser's vtk.js image in place (binary, no rebuild)
        page.wait_for_function("() => window.explorerVolumeFull === 1", timeout=30000)
        assert page.evaluate("() => window.explorerVolumeUpdates") >= 2
        # drawn first with a longer ray step, then redrawn at the view's own step (restored after the preview)
        page.wait_for_function("() => window.explorerVolumeRefined === window.explorerVolumeUpdates", timeout=30000)
        steps = page.evaluate(f"() => {{ const v = {_VTK_VIEW_JS}; return [v.volume.getMapper().getSampleDistance(), "
                              f"window.explorerViewStep]; }}")
        assert steps[0] == steps[1] and steps[0] > 0
        # slice updates re-laid the page out without re-rendering the unchanged 3D scene (the layout guard)
        assert page.evaluate("() => window.explorerVtkLayoutSkips || 0") >= 1
        # an isosurface at a value inside the field's range (vtk.js marching cubes in the page), none above it
        srv.wait_idle(30)
        field = srv.volume
        iso = float(np.percentile(field, 50))
        page.get_by_role("button", name="isosurface", exact=True).click()
        _in_session(srv, lambda: setattr(srv.iso_value, "value", iso))   # as typed into the page's box
        page.wait_for_function(f"() => Bokeh.documents[0].get_model_by_name('iso').data.value[0] === {iso!r}",
                               timeout=30000)
        page.wait_for_function("() => (window.explorerIsoPoints || 0) > 0", timeout=30000)
        _in_session(srv, lambda: setattr(srv.iso_value, "value", float(field.max()) + 1.0))
        page.wait_for_function("() => window.explorerIsoPoints === 0", timeout=30000)
        assert srv.iso_source.data["mode"] == ["isosurface"]
        # the log scale reaches the 3D view: the volume sent is the field's log position on the data's range
        _in_session(srv, lambda: setattr(srv.log_scale, "value", True))
        lo, hi = vm.value_range
        expect = lo + (np.log10(field) - np.log10(lo)) / (np.log10(hi) - np.log10(lo)) * (hi - lo)
        sent = np.asarray(srv.vol_source.data["v"][0]).reshape(field.shape, order="F")
        np.testing.assert_allclose(sent, np.clip(expect, lo, hi), rtol=1e-5, atol=1e-6)
        _in_session(srv, lambda: setattr(srv.iso_value, "value", float("nan")))
        assert "isosurface value" in srv.message.object and srv.message.visible
        assert errors == [], f"errors in the page: {errors[:3]}"
        page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        assert os.path.getsize(tmp_path / "explorer.png") > 10000
        assert outside == [], f"the page fetched from outside the server: {outside[:3]}"


# ------------------------------------------------------------------------------------------- mesh ensembles
def test_mesh_run_point_view(tmp_path):
    """An unstructured (mesh) run: the view is the values at the mesh's vertices (model = Surrogate.predict there,
    nearest = that training run's field, IDW-8 = the inverse-distance mix computed here), and the page shows them
    as points coloured by value."""
    from tests.test_unstructured import TINY_MODEL, make_mesh_ensemble

    from tasks.ensemble.explorer import ExplorerModel
    from tasks.ensemble.explorer import app
    from tasks.ensemble.surrogate import Surrogate

    paths = make_mesh_ensemble(str(tmp_path / "mesh"))
    exp = dict(name="mesh", model=TINY_MODEL,
               dataset=dict(type="unstructured", cond_batch=2, spatial_log2batch=6, **paths),
               optim=dict(type="adam", lr=1e-3), scheduler=dict(type="constant"),
               train=dict(max_steps=3, log_dir=str(tmp_path / "runs"), log_every=3, collapse_check_steps=0))
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump([exp]))
    rd = str(train(load_config(str(cfg)), progress=False))
    vm = ExplorerModel.open(rd, device="cpu")
    assert not vm.has_grid
    q = vm.parse([0.3, 0.6])
    view = vm.slices(q)
    n = len(vm.mesh_vertices())
    expect = Surrogate.load(rd, device="cpu").predict([0.3, 0.6], normalized_params=True)
    assert view.fields["model"][0].shape == (n,) == expect.shape
    np.testing.assert_allclose(view.fields["model"][0], expect, rtol=1e-5, atol=1e-5)
    conds = {int(r): vm.row_conds[int(r)] for r in vm.train_rows}
    d = {r: float(np.linalg.norm(c - q.c)) for r, c in conds.items()}
    near = min(d, key=d.get)
    assert view.trust.nearest_row == near
    np.testing.assert_allclose(view.fields["nearest"][0], vm.field(near), rtol=1e-6)
    k = sorted(d, key=d.get)[:8]
    w = np.array([1.0 / d[r] ** 2 for r in k])
    idw = sum(wi * vm.normalized_field(r).astype(np.float64) for wi, r in zip(w / w.sum(), k))
    from tasks.ensemble.surrogate import denormalize

    np.testing.assert_allclose(view.fields["idw"][0], denormalize(idw, vm.meta), rtol=1e-4, atol=1e-5)
    page = app.ExplorerPage(vm)   # no server: updates apply at once on the worker
    try:
        page.set_params([0.3, 0.6])
        assert page.wait_idle(30)
        src = page.sources["model"][0]
        np.testing.assert_allclose(src.data["value"], expect, rtol=1e-5, atol=1e-5)
        i, j = page.projection.value
        np.testing.assert_array_equal(src.data["x"], vm.mesh_vertices()[:, i])
        assert page.vtk is None and page.message.visible is False
    finally:
        page.close()
