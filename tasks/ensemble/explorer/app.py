"""The explorer's page: Panel (HoloViz) widgets and Bokeh plots over the view model, vtk.js volume rendering
(Panel's ``VTKVolume``). Everything is served from the installed packages (Bokeh's and Panel's bundled JavaScript,
no CDN). One :class:`ExplorerPage` per browser session, each with its own :class:`Coalescer` worker: the page's
callbacks only submit requests; the worker computes and hands the results back to the session's document.
"""
from __future__ import annotations

import io
import logging
import math
import threading
from functools import partial
from typing import Dict, List, Optional, Sequence

import numpy as np
import panel as pn
from bokeh.models import (BasicTicker, ColorBar, ColumnDataSource, LinearColorMapper, LogColorMapper, Range1d,
                          TapTool)
from bokeh.palettes import Cividis256, Inferno256, RdBu11, Turbo256, Viridis256
from bokeh.plotting import figure

from tasks.ensemble.explorer.view_model import Coalescer, ExplorerModel, InputError, SliceView

__all__ = ["ExplorerPage", "serve", "PAGES"]

log = logging.getLogger("explore")

PALETTES = {"viridis": Viridis256, "inferno": Inferno256, "cividis": Cividis256, "turbo": Turbo256}
AXIS_LABELS = ("z (axis 0)", "y (axis 1)", "x (axis 2)")
ROW_TITLES = {"model": "model", "nearest": "nearest training run", "idw": "IDW-8",
              "truth": "true field (stored run)", "error": "error: model - truth"}
PAGES: List["ExplorerPage"] = []
"""The pages served by this process (newest last): the browser test and the benchmark read their state."""


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class ExplorerPage:
    """The page of one browser session.

    Attributes:
        view: the last :class:`SliceView` shown (None before the first update).
        volume: the last full-resolution volume shown (None before).
        updates: how many slice updates reached the page.
    """

    def __init__(self, vm: ExplorerModel):
        self.vm = vm
        self.doc = pn.state.curdoc
        self.view: Optional[SliceView] = None
        self.volume: Optional[np.ndarray] = None
        self.updates = 0
        self.volume_updates = 0
        self.updated = threading.Event()
        self._applying = False
        d3 = len(vm.shape) == 3 and vm.has_grid
        self.axes = [0, 1, 2] if d3 else [0]
        mid = (vm.lo + vm.hi) / 2
        runs = vm.run_table()
        self.runs = runs

        # -- parameters: slider + number box (EditableFloatSlider), training values marked underneath
        self.sliders = []
        self.rugs: List[ColumnDataSource] = []
        param_rows = []
        for i, name in enumerate(vm.param_names):
            lo, hi = float(vm.lo[i]), float(vm.hi[i])
            span = hi - lo if hi > lo else 1.0
            w = pn.widgets.EditableFloatSlider(label=name + (" (normalized)" if vm.normalized_units else ""),
                                               start=lo, end=hi if hi > lo else lo + 1, value=float(mid[i]),
                                               step=span / 500, fixed_start=lo, fixed_end=hi if hi > lo else lo + 1,
                                               width=300, format="0[.]0000")
            w.param.watch(self._on_params, "value")
            self.sliders.append(w)
            f = figure(height=34, width=300, x_range=Range1d(lo, hi if hi > lo else lo + 1), y_range=Range1d(0, 1),
                       toolbar_location=None, min_border=0, min_border_left=10, min_border_right=10)
            f.axis.visible = False
            f.grid.visible = False
            f.outline_line_color = None
            tr = np.asarray(runs[name])[np.asarray(runs["split"]) == "train"]
            te = np.asarray(runs[name])[np.asarray(runs["split"]) == "test"]
            f.segment(x0=tr, x1=tr, y0=[0.15] * len(tr), y1=[0.85] * len(tr), color="#1f77b4", line_width=1.5)
            f.segment(x0=te, x1=te, y0=[0.3] * len(te), y1=[0.7] * len(te), color="#ff7f0e", line_width=1)
            cur = ColumnDataSource({"x": [float(mid[i])], "y": [0.5]})
            f.scatter("x", "y", source=cur, marker="inverted_triangle", size=11, color="crimson")
            self.rugs.append(cur)
            param_rows += [w, pn.pane.Bokeh(f)]

        self.text_box = pn.widgets.TextInput(label="Go to parameters (comma-separated, simulation units)",
                                             placeholder=", ".join(_fmt(v) for v in mid), width=300)
        self.text_box.param.watch(self._on_text, "value")
        self.message = pn.pane.Alert("", alert_type="danger", visible=False, width=300, name="message")
        self.cmap = pn.widgets.Select(label="Colormap", options=list(PALETTES), value="viridis", width=140)
        self.log_scale = pn.widgets.Checkbox(label="log scale", value=False,
                                             disabled=not vm.value_range[0] > 0)
        self.cmap.param.watch(self._on_colors, "value")
        self.log_scale.param.watch(self._on_colors, "value")
        self.positions = [pn.widgets.IntSlider(label=f"slice {AXIS_LABELS[a]}", start=0, end=max(n - 1, 1),
                                               value=n // 2, width=300) for a, n in enumerate(vm.shape)] if d3 else []
        for p in self.positions:
            p.param.watch(self._on_params, "value")

        # -- parameter space: scatter matrix of the stored runs (click one: the sliders move to it)
        self.space = self._scatter_matrix(runs, mid)

        # -- slices with one fixed colour range (the data's), log optional; error on its own diverging scale
        vlo, vhi = vm.value_range
        self.lin_mapper = LinearColorMapper(palette=Viridis256, low=vlo, high=vhi)
        self.log_mapper = LogColorMapper(palette=Viridis256, low=max(vlo, 1e-12), high=max(vhi, 2e-12))
        err = 0.1 * (vhi - vlo) if vhi > vlo else 1.0
        self.err_mapper = LinearColorMapper(palette=list(reversed(RdBu11)), low=-err, high=err)
        self.sources: Dict[str, List[ColumnDataSource]] = {}
        self.glyphs: List = []
        self.bars: List[ColorBar] = []
        self.slice_rows: Dict[str, pn.Row] = {}
        names = ["model"] + (["nearest", "idw", "truth", "error"] if vm.dataset is not None else [])
        for nm in names:
            figs = []
            self.sources[nm] = []
            for a in self.axes:
                plane = [n for k, n in enumerate(vm.shape) if k != a] if d3 else list(vm.shape)
                src = ColumnDataSource({"image": [np.zeros(plane, dtype=np.float32)]}, name=f"src_{nm}_{a}")
                f = figure(title=f"{ROW_TITLES[nm]}: {AXIS_LABELS[a]}" if d3 else ROW_TITLES[nm], width=250,
                           height=230, x_range=Range1d(0, plane[1]), y_range=Range1d(0, plane[0]),
                           tools="pan,wheel_zoom,reset,save", toolbar_location="above", match_aspect=True)
                mapper = self.err_mapper if nm == "error" else self.lin_mapper
                r = f.image(image="image", x=0, y=0, dw=plane[1], dh=plane[0], source=src, color_mapper=mapper)
                if nm != "error":
                    self.glyphs.append(r.glyph)
                if a == self.axes[-1]:
                    bar = ColorBar(color_mapper=mapper, ticker=BasicTicker(), width=8, location=(0, 0))
                    f.add_layout(bar, "right")
                    f.width += 70
                    if nm != "error":
                        self.bars.append(bar)
                figs.append(pn.pane.Bokeh(f))
                self.sources[nm].append(src)
            self.slice_rows[nm] = pn.Row(*figs, visible=nm not in ("truth", "error"))

        # -- 3D: vtk.js volume rendering (coarse first, then full resolution), rotatable
        self.vtk = None
        if d3:
            self.vtk = pn.pane.VTKVolume(np.zeros(tuple(vm.shape), dtype=np.float32), width=420, height=380,
                                         display_slices=False, render_background="#222",
                                         controller_expanded=False, shadow=False)
        self.trust = pn.pane.Markdown("", width=520, name="trust")
        self.status = pn.pane.Markdown("", name="status")

        # -- downloads (built on request from the current query; nothing is read from the browser but the query)
        self.dl_npy = pn.widgets.FileDownload(callback=self._download_npy, filename="field.npy",
                                              label="Download field (.npy)", width=200)
        self.dl_vti = pn.widgets.FileDownload(callback=self._download_vti, filename="field.vti",
                                              label="Download field (.vti, ParaView)", width=200,
                                              disabled=not d3 and len(vm.shape) != 2)

        side = pn.Column("## Parameters", *param_rows, self.text_box, self.message, "### Slices",
                         *self.positions, pn.Row(self.cmap, self.log_scale), "### Downloads", self.dl_npy,
                         self.dl_vti, "(PNG of a view: the save tool above each plot)", width=340)
        main = pn.Column(self.status, self.trust,
                         pn.Row(pn.Column("### Parameter space (click a run)", self.space),
                                pn.Column("### 3D view", self.vtk) if self.vtk is not None else pn.Spacer()),
                         *self.slice_rows.values())
        self.layout = pn.Row(side, main, name="explorer")

        self.worker = Coalescer(self._handle, self._on_worker_error)
        try:
            pn.state.on_session_destroyed(lambda ctx: self.worker.close())
        except Exception:  # pragma: no cover - outside a server (tests build the page directly)
            pass
        PAGES.append(self)
        self._submit()

    # -- parameter space -------------------------------------------------------------------------------
    def _scatter_matrix(self, runs, mid):
        vm = self.vm
        colors = np.where(np.asarray(runs["split"]) == "train", "#1f77b4", "#ff7f0e")
        data = {n: np.asarray(runs[n]) for n in vm.param_names}
        data.update(row=np.asarray(runs["row"]), split=np.asarray(runs["split"]), color=colors)
        self.run_source = ColumnDataSource(data, name="runs")
        self.query_source = ColumnDataSource({n: [float(mid[i])] for i, n in enumerate(vm.param_names)})
        self.run_source.selected.on_change("indices", self._on_pick)
        names = vm.param_names
        pairs = [(i, j) for j in range(len(names)) for i in range(j)] if len(names) > 1 else []
        figs = []
        size = 150 if len(pairs) > 3 else 200
        for i, j in pairs[:10]:
            f = figure(width=size, height=size, tools="tap,reset", toolbar_location=None,
                       x_axis_label=names[i], y_axis_label=names[j], min_border=4)
            f.scatter(names[i], names[j], source=self.run_source, color="color", size=7, alpha=0.8,
                      nonselection_alpha=0.8)
            f.scatter(names[i], names[j], source=self.query_source, marker="star", size=16, color="crimson")
            f.axis.major_label_text_font_size = "7pt"
            f.axis.axis_label_text_font_size = "8pt"
            figs.append(pn.pane.Bokeh(f))
        if not figs:   # one parameter: a strip
            f = figure(width=300, height=120, tools="tap,reset", toolbar_location=None, x_axis_label=names[0])
            self.run_source.data["zero"] = np.zeros(len(runs["row"]))
            self.query_source.data["zero"] = [0.0]
            f.scatter(names[0], "zero", source=self.run_source, color="color", size=8)
            f.scatter(names[0], "zero", source=self.query_source, marker="star", size=16, color="crimson")
            figs.append(pn.pane.Bokeh(f))
        return pn.GridBox(*figs, ncols=min(3, len(figs)))

    # -- callbacks (server thread of the session) --------------------------------------------------------
    def _on_params(self, *_):
        if not self._applying:
            self._submit()

    def _submit(self):
        vals = [w.value for w in self.sliders]
        pos = [p.value for p in self.positions] if self.positions else None
        self.worker.submit((vals, pos))

    def _on_text(self, event):
        text = (event.new or "").strip()
        if not text:
            return
        try:
            q = self.vm.parse(text.split(","))
        except InputError as e:
            self._show_message(str(e))
            return
        self.set_params(q.raw)

    def set_params(self, raw: Sequence[float]) -> None:
        """Move every slider at once (one update)."""
        self._applying = True
        try:
            for w, v in zip(self.sliders, raw):
                w.value = float(v)
        finally:
            self._applying = False
        self._submit()

    def _on_pick(self, attr, old, new):
        if not new:
            return
        i = int(new[-1])
        row = int(self.run_source.data["row"][i])
        self.set_params(self.vm.raw_of_row(row))

    def _on_colors(self, *_):
        pal = PALETTES[self.cmap.value]
        self.lin_mapper.palette = pal
        self.log_mapper.palette = pal
        mapper = self.log_mapper if self.log_scale.value else self.lin_mapper
        for g in self.glyphs:
            g.color_mapper = mapper
        for b in self.bars:
            b.color_mapper = mapper

    def _show_message(self, text: str) -> None:
        self.message.object = text
        self.message.visible = bool(text)

    # -- the worker ---------------------------------------------------------------------------------------
    def _handle(self, req, superseded):
        vals, pos = req
        try:
            q = self.vm.parse(vals)
            view = self.vm.slices(q, pos) if self.vm.has_grid else None
        except InputError as e:
            self._schedule(partial(self._show_message, str(e)))
            return
        if view is not None:
            self._schedule(partial(self._apply_view, view))
        if superseded() or self.vtk is None:
            return
        coarse = self.vm.volume(q, coarse=True)
        self._schedule(partial(self._apply_volume, coarse, False))
        if superseded():
            return
        full = self.vm.volume(q)
        self._schedule(partial(self._apply_volume, full, True))

    def _on_worker_error(self, req, e):
        log.exception("explorer update failed", exc_info=e)
        self._schedule(partial(self._show_message, f"update failed: {type(e).__name__}: {e}"))

    def _schedule(self, fn):
        if self.doc is not None and getattr(self.doc, "session_context", None) is not None:
            self.doc.add_next_tick_callback(fn)
        else:  # no server session (the page built in a test): apply at once
            fn()

    def _apply_view(self, view: SliceView):
        self.view = view
        for nm, srcs in self.sources.items():
            arrs = view.fields.get(nm)
            for src, arr in zip(srcs, arrs or []):
                src.data = {"image": [np.ascontiguousarray(arr, dtype=np.float32)]}
        has_truth = "truth" in view.fields
        for nm in ("truth", "error"):
            if nm in self.slice_rows:
                self.slice_rows[nm].visible = has_truth
        q = view.query
        for i, n in enumerate(self.vm.param_names):
            self.rugs[i].data = {"x": [float(q.raw[i])], "y": [0.5]}
        self.query_source.data = {**{n: [float(q.raw[i])] for i, n in enumerate(self.vm.param_names)},
                                  **({"zero": [0.0]} if "zero" in self.query_source.data else {})}
        self._show_message("")
        t = view.trust
        lines = [f"**Query**: " + ", ".join(f"{n} = {_fmt(v)}" for n, v in zip(self.vm.param_names, q.raw))]
        if view.at_row is not None:
            lines.append(f"**This is stored run {view.at_row}**: its true field and the model's error are shown.")
        if self.vm.dataset is not None:
            lines.append(f"**Trust**: distance to the nearest training run (row {t.nearest_row}): {t.distance:.3g} "
                         f"(normalized parameters; typical spacing of the training runs {t.spacing:.3g}); "
                         f"largest |model - IDW| on the shown slices: {t.max_model_idw:.4g}")
            if t.outside_box:
                lines.append(f"⚠ **Outside the training runs' parameter box** ({', '.join(t.outside)}): the model "
                             "extrapolates.")
        else:
            lines.append("(the run's data is not readable: model only, no training runs to compare with)")
        self.trust.object = "\n\n".join(lines)
        self.updates += 1
        self.status.object = f"update {self.updates}"
        self.updated.set()

    def _apply_volume(self, vol: np.ndarray, full: bool):
        self.vtk.object = np.ascontiguousarray(vol, dtype=np.float32)
        if full:
            self.volume = vol
            self.volume_updates += 1

    # -- downloads -----------------------------------------------------------------------------------------
    def _current_field(self) -> np.ndarray:
        q = self.vm.parse([w.value for w in self.sliders])
        return self.vm.volume(q)

    def _download_npy(self):
        return io.BytesIO(self.vm.npy_bytes(self._current_field()))

    def _download_vti(self):
        return io.BytesIO(self.vm.vti_bytes(self._current_field()))


def serve(vm: ExplorerModel, port: int = 5006, host: str = "127.0.0.1", threaded: bool = False, show: bool = False):
    """Serve the page of ``vm`` at ``http://host:port/`` (blocks unless ``threaded``: then returns the server
    thread, ``.stop()`` ends it). Only the page's own origin may open its websocket."""
    pn.extension("vtk")
    local = host in ("127.0.0.1", "localhost", "::1")
    # a local page: only its own origin opens the websocket; another host (asked for, warned about) is reached
    # under names this process cannot know
    origins = [f"localhost:{port}", f"127.0.0.1:{port}"] if local else ["*"]
    return pn.serve({"/": lambda: ExplorerPage(vm).layout}, port=port, address=host, show=show, threaded=threaded,
                    websocket_origin=origins, title="Ensemble explorer", print_url=False)
