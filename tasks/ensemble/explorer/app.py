"""The explorer's page: Panel (HoloViz) widgets and Bokeh plots over the view model, vtk.js volume rendering
(Panel's ``VTKVolume``). Everything is served from the installed packages (Bokeh's and Panel's bundled JavaScript,
no CDN). One :class:`ExplorerPage` per browser session, each with its own :class:`Coalescer` worker: the page's
callbacks only submit requests; the worker computes and hands the results back to the session's document.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import threading
import time
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import panel as pn
from bokeh.models import (BasicTicker, ColorBar, ColumnDataSource, CustomJS, LinearColorMapper, LogColorMapper,
                          Range1d)
from bokeh.palettes import Cividis256, Inferno256, RdBu11, Turbo256, Viridis256
from bokeh.plotting import figure

from tasks.ensemble.explorer.view_model import Coalescer, ExplorerModel, InputError, SliceView

__all__ = ["ExplorerPage", "serve", "PAGES"]

log = logging.getLogger("explore")

PALETTES = {"viridis": Viridis256, "inferno": Inferno256, "cividis": Cividis256, "turbo": Turbo256}
AXIS_LABELS = ("z (axis 0)", "y (axis 1)", "x (axis 2)")
ROW_TITLES = {"model": "model", "nearest": "nearest training run", "idw": "IDW-8",
              "truth": "true field (stored run)", "error": "error: model - truth"}
VOLUME_JS = """
// The volume arrives as a binary float32 array (Fortran order, VTKVolume's layout) in a ColumnDataSource; write it
// into the vtk.js image data of the page's VTKVolume view and render once. Setting the pane's object instead makes
// Panel's view tear the whole vtk.js scene down and rebuild it (new WebGL context, shader compiles, controller
// widget): ~1.2-1.9 s of blocked main thread per update in software WebGL, against ~60-80 ms for this.
// The same code runs when the 3D view's settings (`iso`: volume / isosurface / both, the isosurface value) change.
function find(view) {
  if (view._vtk_renwin != null && view.volume !== undefined && 'vtk_image_data' in view) return view;
  for (const child of view.children()) { const v = find(child); if (v != null) return v; }
  return null;
}
function guard(view) {
  // Bokeh lays the whole page out again after any change of text or widgets, and Panel's VTK view answers every
  // layout with a resize and a render of the 3D scene: ~250 ms of readPixels per slice update in software WebGL,
  // for an unchanged picture. Same size: skip both (a real resize still goes through).
  if (view.__explorer_guard) return;
  view.__explorer_guard = true;
  const after = view.after_layout.bind(view);
  view.after_layout = function () {
    const c = view._vtk_container;
    const size = c.clientWidth + "x" + c.clientHeight;
    if (size !== view.__explorer_size) { view.__explorer_size = size; return after(); }
    const renderable = view._renderable;   // Panel's view resizes and renders only when this is set
    view._renderable = false;
    try { return after(); } finally {
      view._renderable = renderable;
      window.explorerVtkLayoutSkips = (window.explorerVtkLayoutSkips || 0) + 1;
    }
  };
}
function apply(tries) {
  let view = null;
  for (const root of Bokeh.index) { view = find(root); if (view != null) break; }
  if (view != null) guard(view);
  const volume = view != null ? view.volume : undefined;
  if (volume == null) {   // the 3D view is not built yet
    if (tries < 400) setTimeout(() => apply(tries + 1), 50);
    return;
  }
  const t0 = performance.now();
  const image = volume.getMapper().getInputData();
  if (cb_obj === src) {   // a new volume (else: only the 3D view's settings changed)
    const values = src.data.v[0];
    const scalars = image.getPointData().getScalars();
    if (scalars.getData().length !== values.length) return;
    scalars.getData().set(values);
    scalars.modified();
    image.modified();
  }
  // volume rendering and / or an isosurface (vtk.js' marching cubes on the same image, built once)
  const mode = iso.data.mode[0];
  volume.setVisibility(mode !== "isosurface");
  let surf = view.__explorer_iso;
  if (mode !== "volume" && surf == null) {
    const mc = vtk.Filters.General.vtkImageMarchingCubes.newInstance({computeNormals: true, mergePoints: true});
    mc.setInputData(image);
    const mapper = vtk.Rendering.Core.vtkMapper.newInstance({scalarVisibility: false});
    mapper.setInputConnection(mc.getOutputPort());
    const actor = vtk.Rendering.Core.vtkActor.newInstance();
    actor.setMapper(mapper);
    actor.getProperty().setColor(0.85, 0.85, 0.8);
    view._vtk_renwin.getRenderer().addActor(actor);
    surf = view.__explorer_iso = {mc, actor};
  }
  if (surf != null) {
    surf.actor.setVisibility(mode !== "volume");
    surf.mc.setContourValue(iso.data.value[0]);
    if (mode !== "volume") {
      surf.mc.update();
      window.explorerIsoPoints = surf.mc.getOutputData().getNumberOfPoints();
    }
  }
  const renwin = view._vtk_renwin.getRenderWindow();
  if (cb_obj !== src) { renwin.render(); return; }
  // a new volume. While dragging (`preview`): drawn first with a longer ray step (PREVIEW_STEP x the view's own;
  // the view's step restored at once, vtk.js has read it into this frame), and again at the view's step once the
  // page has been quiet for REFINE_DELAY_MS with no newer volume or slices (software WebGL: ~230 ms of ray casting
  // at the view's step, ~85 ms at 4x, the page blocked meanwhile). Otherwise drawn at the view's step at once.
  const mapper = volume.getMapper();
  const step = mapper.getSampleDistance();
  if (window.explorerViewStep === undefined) window.explorerViewStep = step;
  const preview = src.data.preview[0] === 1;
  if (preview) mapper.setSampleDistance(step * PREVIEW_STEP);
  try { renwin.render(); } finally { mapper.setSampleDistance(step); }
  const n = window.explorerVolumeUpdates = (window.explorerVolumeUpdates || 0) + 1;
  window.explorerVolumeRenderMs = performance.now() - t0;   // the page's own work; WebGL draws in the frame
  const full = src.data.full[0];
  const framed = (f) => requestAnimationFrame(() => setTimeout(f, 0));   // after the frame holding the picture
  const refined = () => {
    window.explorerVolumeRefined = n;
    if (full === 1) window.explorerVolumeRefinedAt = performance.now();
  };
  framed(() => {
    if (full === 1) window.explorerVolumeAt = performance.now();
    window.explorerVolumeFull = full;
    if (!preview) { refined(); return; }
    const shown = performance.now();
    setTimeout(() => {
      if (window.explorerVolumeUpdates !== n || (window.explorerSlicesDrawnAt || 0) > shown) return;   // moving on
      renwin.render();
      framed(refined);
    }, REFINE_DELAY_MS);
  });
}
apply(0);
"""
PREVIEW_STEP = 4
"""While dragging, the 3D view draws each new volume first with this many times its ray step (VOLUME_JS), then
redraws it at its own step once the page is quiet."""
REFINE_DELAY_MS = 150
"""Quiet time (no newer volume, no newer slices) before the 3D view redraws a new volume at its own ray step."""
VOLUME_JS = VOLUME_JS.replace("PREVIEW_STEP", str(PREVIEW_STEP)).replace("REFINE_DELAY_MS", str(REFINE_DELAY_MS))

DRAWN_JS = """
// the model's slice arrived: once the browser has painted it (after the next animation frame), tell the server
requestAnimationFrame(() => setTimeout(() => {
  window.explorerSlicesDrawnAt = performance.now();
  drawn.data = {n: [drawn.data.n[0] + 1]};
}, 0));
"""

TRUST_HEIGHT = 160
"""Height (px) of the query / trust text: room for its four paragraphs at the most."""
HIDDEN = {"visibility": "hidden"}
"""The style of a slice row that keeps its place in the page but is not shown."""
SHOWN = {"visibility": "visible"}
"""(BokehJS applies the keys of a new style and keeps the others: "shown" is said, not left out.)"""

PAGES: List["ExplorerPage"] = []
"""The pages served by this process (newest last): the browser test and the benchmark read their state."""


def _twin(mapper):
    """A new colour mapper with ``mapper``'s class, palette and range."""
    return type(mapper)(palette=list(mapper.palette), low=mapper.low, high=mapper.high)


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
        # (number of the newest model update sent, its event set when the page reports it drawn)
        self._after_drawn: Optional[Tuple[int, threading.Event]] = None
        self._slider_values: Optional[List[float]] = None   # typed / picked values the sliders still have to show
        self.drawn: Optional[ColumnDataSource] = None
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
            _undebounced(w)
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
        _undebounced(self.text_box)
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
            _undebounced(p)

        # -- parameter space: scatter matrix of the stored runs (click one: the sliders move to it)
        self.space = self._scatter_matrix(runs, mid)

        vlo, vhi = vm.value_range
        # -- 3D: vtk.js volume rendering (coarse first, then full resolution), rotatable.
        # The pane is built once, on a placeholder spanning the data's value range (its transfer functions keep
        # that fixed range, like the slices' colour bar); every later volume travels as binary float32 in
        # `vol_source` and is written into the vtk.js image in place (VOLUME_JS).
        self.vtk = None
        self.vol_source = None
        if d3:
            placeholder = np.full(tuple(vm.shape), vlo, dtype=np.float32)
            placeholder.flat[-1] = vhi
            self.vtk = pn.pane.VTKVolume(placeholder, width=420, height=380,
                                         display_slices=False, render_background="#222",
                                         controller_expanded=False, shadow=False)
            self.vol_source = ColumnDataSource({"v": [placeholder.ravel(order="F")], "full": [0], "preview": [0]},
                                               name="volume")
            # the 3D view's settings: volume rendering and / or an isosurface at a value (the data's units; with
            # the log scale on, at the same place on the log scale as the volume's colours)
            self.view3d = pn.widgets.RadioButtonGroup(label="3D view", options=["volume", "isosurface", "both"],
                                                      value="volume", width=300)
            self.iso_value = pn.widgets.FloatInput(label="isosurface value", value=float((vlo + vhi) / 2),
                                                   start=float(vlo), end=float(vhi), width=140)
            self.iso_source = ColumnDataSource({"mode": ["volume"], "value": [float((vlo + vhi) / 2)]}, name="iso")
            self.view3d.param.watch(self._on_view3d, "value")
            self.iso_value.param.watch(self._on_view3d, "value")
            js = CustomJS(args=dict(src=self.vol_source, iso=self.iso_source), code=VOLUME_JS)
            self.vol_source.js_on_change("data", js)
            self.iso_source.js_on_change("data", js)
            # the browser tells when it has drawn the model's slices (DRAWN_JS); only then their volume is sent
            self.drawn = ColumnDataSource({"n": [0]}, name="drawn")
            self.drawn.on_change("data", self._on_drawn)

        # -- slices with one fixed colour range (the data's), log optional; error on its own diverging scale
        self.lin_mapper = LinearColorMapper(palette=Viridis256, low=vlo, high=vhi)
        self.log_mapper = LogColorMapper(palette=Viridis256, low=max(vlo, 1e-12), high=max(vhi, 2e-12))
        err = 0.1 * (vhi - vlo) if vhi > vlo else 1.0
        self.err_mapper = LinearColorMapper(palette=list(reversed(RdBu11)), low=-err, high=err)
        # the colour bars read twins of these: BokehJS re-scans a mapper whenever an image using it gets new data
        # and every colour bar on that mapper repaints then (four bars, ~10 ms of each slice update in the browser)
        self.bar_mappers = {id(m): _twin(m) for m in (self.lin_mapper, self.log_mapper, self.err_mapper)}
        self.sources: Dict[str, List[ColumnDataSource]] = {}
        self.glyphs: List = []
        self.bars: List[ColorBar] = []
        self.slice_rows: Dict[str, pn.Row] = {}
        names = ["model"] + (["nearest", "idw", "truth", "error"] if vm.dataset is not None else [])
        # a mesh (unstructured) ensemble: its vertices as points, two of their coordinates as the projection
        self.mesh = not vm.has_grid
        self.projection = None
        if self.mesh:
            self.xyz = vm.mesh_vertices()
            dims = self.xyz.shape[1]
            pairs = [(i, j) for i in range(dims) for j in range(i + 1, dims)]
            spread = [float(np.ptp(self.xyz[:, i]) * np.ptp(self.xyz[:, j])) for i, j in pairs]
            self.projection = pn.widgets.Select(label="Vertices: projection on coordinates",
                                                options={f"x{i} - x{j}": (i, j) for i, j in pairs},
                                                value=pairs[int(np.argmax(spread))], width=200)
            self.projection.param.watch(self._on_projection, "value")
        for nm in names:
            figs = []
            self.sources[nm] = []
            for a in self.axes:
                if self.mesh:
                    figs.append(self._point_view(nm))
                    continue
                plane = [n for k, n in enumerate(vm.shape) if k != a] if d3 else list(vm.shape)
                src = ColumnDataSource({"image": [np.zeros(plane, dtype=np.float32)]}, name=f"src_{nm}_{a}")
                f = figure(title=f"{ROW_TITLES[nm]}: {AXIS_LABELS[a]}" if d3 else ROW_TITLES[nm], width=250,
                           height=230, x_range=Range1d(0, plane[1]), y_range=Range1d(0, plane[0]),
                           tools="pan,wheel_zoom,reset,save", toolbar_location="above", match_aspect=True)
                mapper = self.err_mapper if nm == "error" else self.lin_mapper
                r = f.image(image="image", x=0, y=0, dw=plane[1], dh=plane[0], source=src, color_mapper=mapper)
                if nm != "error":
                    self.glyphs.append(r.glyph)
                if nm == "model" and a == self.axes[0] and self.vol_source is not None:
                    f.tags = [self.vol_source, self.drawn, self.iso_source]   # into the page's document
                    src.js_on_change("data", CustomJS(args=dict(drawn=self.drawn), code=DRAWN_JS))
                figs.append(pn.pane.Bokeh(f))
                self.sources[nm].append(src)
            figs.append(self._bar_figure(nm, 260 if self.mesh else 230))
            # the true field and the error rows keep their place in the page, hidden by CSS while the query is not
            # a stored run: toggling `visible` made Bokeh lay the whole page out again (~0.7 s in software
            # rendering for each move onto or off a stored run); a style change needs no layout
            self.slice_rows[nm] = pn.Row(*figs, styles=HIDDEN if nm in ("truth", "error") else SHOWN)

        # fixed sizes: a text pane that grows or shrinks (the extrapolation warning coming and going) sets off the
        # page's resize observers and Bokeh lays the whole page out again (~0.35 s in software rendering)
        self.trust = pn.pane.Markdown("", width=520, height=TRUST_HEIGHT, name="trust",
                                      styles={"overflow-y": "auto"})
        self.status = pn.pane.Markdown("", width=200, height=30, name="status")

        # -- downloads (built on request from the current query; nothing is read from the browser but the query)
        self.dl_npy = pn.widgets.FileDownload(callback=self._download_npy, filename="field.npy",
                                              label="Download field (.npy)", width=200)
        self.dl_vti = pn.widgets.FileDownload(callback=self._download_vti, filename="field.vti",
                                              label="Download field (.vti, ParaView)", width=200,
                                              disabled=not d3 and len(vm.shape) != 2)

        side = pn.Column("## Parameters", *param_rows, self.text_box, self.message,
                         "### Vertices" if self.mesh else "### Slices", *self.positions,
                         *([self.projection] if self.projection is not None else []),
                         pn.Row(self.cmap, self.log_scale), "### Downloads", self.dl_npy, self.dl_vti,
                         "(PNG of a view: the save tool above each plot)", width=340)
        main = pn.Column(self.status, self.trust,
                         pn.Row(pn.Column("### Parameter space (click a run)", self.space),
                                pn.Column("### 3D view", self.vtk, self.view3d, self.iso_value)
                                if self.vtk is not None else pn.Spacer()),
                         *self.slice_rows.values())
        self.layout = pn.Row(side, main, name="explorer")

        # two workers: the slices never wait behind a volume (a full 64^3 volume takes ~0.5 s on this CPU and
        # cannot be interrupted); each coalesces its own requests (only the newest waits)
        self.worker = Coalescer(self._handle, self._on_worker_error)
        self._last_change = -math.inf
        self.vol_worker = Coalescer(self._handle_volume, self._on_worker_error) if self.vtk is not None else None
        try:
            pn.state.on_session_destroyed(lambda ctx: self.close())
        except Exception:  # pragma: no cover - outside a server (tests build the page directly)
            pass
        PAGES.append(self)
        if self._in_server():
            # the first update once the browser holds the document: a change made before it pulled the document
            # would not fire the volume's JavaScript callback (the 3D view would keep its placeholder)
            pn.state.onload(self._submit)
        else:
            self._submit()

    def _point_view(self, nm: str):
        """One row of a mesh ensemble: a scatter of its vertices (the chosen projection) coloured by value."""
        i, j = self.projection.value
        n = len(self.xyz)
        src = ColumnDataSource({"x": self.xyz[:, i].copy(), "y": self.xyz[:, j].copy(),
                                "value": np.zeros(n, dtype=np.float32)}, name=f"src_{nm}_0")
        f = figure(title=ROW_TITLES[nm], width=330, height=260, tools="pan,wheel_zoom,box_zoom,reset,save",
                   toolbar_location="above", match_aspect=True)
        mapper = self.err_mapper if nm == "error" else self.lin_mapper
        size = 6 if n <= 2000 else 3 if n <= 50000 else 1
        r = f.scatter("x", "y", source=src, size=size, line_color=None,
                      fill_color={"field": "value", "transform": mapper})
        if nm != "error":
            self.glyphs.append(r.glyph)
        self.sources[nm].append(src)
        return pn.pane.Bokeh(f)

    def _bar_figure(self, nm: str, height: int):
        """A row's colour bar in a figure of its own, on a twin of the row's mapper: it repaints only when the
        colours change. Inside a slice's figure it was repainted with every new slice, and in software rendering
        one colour bar's paint took ~80 ms (its tick labels' font metrics force style and layout)."""
        mapper = self.bar_mappers[id(self.err_mapper if nm == "error" else self.lin_mapper)]
        f = figure(width=80, height=height, toolbar_location=None, x_range=Range1d(0, 1), y_range=Range1d(0, 1),
                   min_border_left=0, min_border_right=0, outline_line_color=None)
        f.axis.visible = False
        f.grid.visible = False
        f.rect(x=[0.5], y=[0.5], width=[0.0], height=[0.0], alpha=0.0)   # a plot needs a renderer
        bar = ColorBar(color_mapper=mapper, ticker=BasicTicker(), width=8, location=(0, 0))
        f.add_layout(bar, "left")
        if nm != "error":
            self.bars.append(bar)
        return pn.pane.Bokeh(f)

    def _on_projection(self, *_):
        i, j = self.projection.value
        for srcs in self.sources.values():
            for src in srcs:
                src.data.update(x=self.xyz[:, i].copy(), y=self.xyz[:, j].copy())

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
    def _on_params(self, event=None):
        if self._applying:
            return
        vals = self._slider_values
        if vals is not None:   # typed values the sliders do not show yet stay the query's, but for a moved slider
            vals = [float(event.new) if event is not None and event.obj is w else v
                    for w, v in zip(self.sliders, vals)]
            self._slider_values = vals
        self._submit(vals)

    def _submit(self, vals: Optional[Sequence[float]] = None):
        vals = [w.value for w in self.sliders] if vals is None else list(vals)
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
        """Move every slider at once (one update). The update is asked for first; the sliders move at once, or on
        a served page with the rest of the view (after the browser has drawn the model's slices: six sliders
        to redraw cost the page ~15 ms before the slices)."""
        raw = [float(v) for v in raw]
        self._submit(raw)
        if self._progressive():
            self._slider_values = raw
        else:
            self._move_sliders(raw)

    def _move_sliders(self, raw: Sequence[float]) -> None:
        """The sliders to ``raw`` without a new update (their changes to the page as one message)."""
        self._applying = True
        try:
            with pn.io.hold(self.doc) if self._in_server() else contextlib.nullcontext():
                for w, v in zip(self.sliders, raw):
                    w.value = v
        finally:
            self._applying = False

    def _on_pick(self, attr, old, new):
        if not new:
            return
        i = int(new[-1])
        row = int(self.run_source.data["row"][i])
        self.set_params(self.vm.raw_of_row(row))

    def _on_colors(self, *_):
        pal = PALETTES[self.cmap.value]
        for m in (self.lin_mapper, self.log_mapper):
            m.palette = pal
            self.bar_mappers[id(m)].palette = pal
        mapper = self.log_mapper if self.log_scale.value else self.lin_mapper
        for g in self.glyphs:
            if self.mesh:
                g.fill_color = {"field": "value", "transform": mapper}
            else:
                g.color_mapper = mapper
        for b in self.bars:
            b.color_mapper = self.bar_mappers[id(mapper)]
        if self.vtk is not None:   # the 3D view follows the log scale: the shown volume and the isosurface value
            self._on_view3d()
            if self.volume is not None:
                self._apply_volume(self.volume, True)

    def _on_view3d(self, *_):
        try:
            v = float(self.iso_value.value)
        except (TypeError, ValueError):
            v = float("nan")
        if not math.isfinite(v):
            self._show_message(f"isosurface value: expected a number, got {self.iso_value.value!r}")
            return
        self.iso_source.data = {"mode": [self.view3d.value], "value": [float(self._display(np.float32(v)))]}

    def _display(self, vol: np.ndarray) -> np.ndarray:
        """A field as the 3D view shows it: as is, or with the log scale on, its log position mapped onto the
        data's value range (the volume's colour and opacity functions span that fixed range)."""
        if not self.log_scale.value:
            return vol
        lo, hi = self.vm.value_range
        llo, lhi = math.log10(lo), math.log10(hi)
        t = (np.log10(np.maximum(np.asarray(vol, dtype=np.float64), lo)) - llo) / (lhi - llo)
        return (lo + np.clip(t, 0.0, 1.0) * (hi - lo)).astype(np.float32)

    def _show_message(self, text: str) -> None:
        self.message.object = text
        self.message.visible = bool(text)

    # -- the worker ---------------------------------------------------------------------------------------
    def _handle(self, req, superseded):
        vals, pos = req
        try:
            q = self.vm.parse(vals)
            model = self.vm.model_slices(q, pos)
        except InputError as e:
            self._schedule(partial(self._show_message, str(e)))
            return
        if self.vol_worker is None:   # no 3D view: the whole view at once
            self._schedule(partial(self._apply_view, self.vm.slices(q, pos, model=model)))
            return
        now = time.monotonic()
        dragging, self._last_change = now - self._last_change < DRAG_S, now
        # progressive, paced by the browser: the model's slices now; the references meanwhile; the volume is
        # computed once the slices are on their way (niced, while the browser draws them) but sent only once the
        # browser has drawn them (DRAWN_JS -> _on_drawn sets `drawn`), and the rest of the view after the volume. On
        # 2 cores anything else the page draws while it draws the model's slices delays them (drawing the
        # references and the volume at the same time doubled their latency). A page built outside a server: at once.
        sent, drawn = threading.Event(), threading.Event()
        if not self._progressive():
            drawn.set()
        self._schedule(partial(self._send_model, model, sent, drawn))
        self.vol_worker.submit((self.vm.slices(q, pos, model=model), dragging, sent, drawn))

    def _send_model(self, model: List[np.ndarray], sent: threading.Event, drawn: threading.Event) -> None:
        try:
            self._held(self._apply_model, model)
            if not drawn.is_set():
                self._after_drawn = (self.updates, drawn)   # released by the page's ack of this model update
        finally:
            sent.set()

    def _on_drawn(self, attr, old, new):
        """The browser drew model updates up to number ``new["n"]`` (DRAWN_JS counts them): once that is the newest
        one sent, its volume may go (an ack of older slices does not release it)."""
        pending = self._after_drawn
        if pending is not None and int(new["n"][0]) >= pending[0]:
            self._after_drawn = None
            pending[1].set()

    def _in_server(self) -> bool:
        return self.doc is not None and getattr(self.doc, "session_context", None) is not None

    def _progressive(self) -> bool:
        """Updates paced by the browser's DRAWN_JS ack: a served page with a 3D view."""
        return self.drawn is not None and self._in_server()

    def _handle_volume(self, req, superseded):
        """The volume of a view (while dragging: a coarse one first, upsampled to the full lattice so that the
        browser's vtk.js image keeps its size), sent once the browser has drawn the view's model slices, then the
        rest of the view; nothing of it once a newer request waits."""
        view, dragging, sent, drawn = req
        _lower_priority()
        sent.wait(DRAWN_TIMEOUT_S)   # the model's slices go out first
        if superseded():
            return
        vols = []
        if COARSE_FIRST and dragging:
            vols.append((_upsample(self.vm.volume(view.query, coarse=True, display=True), self.vm.shape), False))
        vols.append((self.vm.volume(view.query, display=True), True))
        deadline = time.monotonic() + DRAWN_TIMEOUT_S
        while not drawn.wait(0.01):   # the browser is still drawing the model's slices
            if superseded():
                return
            if time.monotonic() > deadline:   # no word from the page: go on
                break
        if superseded():
            return
        for vol, full in vols:
            self._schedule(partial(self._apply_volume, vol, full, dragging))
        self._schedule(partial(self._held, self._apply_rest, view))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until both workers are idle (slices first: they feed the volume worker)."""
        ok = self.worker.wait_idle(timeout)
        return (self.vol_worker.wait_idle(timeout) if self.vol_worker is not None else True) and ok

    def close(self) -> None:
        self.worker.close()
        if self.vol_worker is not None:
            self.vol_worker.close()

    def _on_worker_error(self, req, e):
        log.exception("explorer update failed", exc_info=e)
        self._schedule(partial(self._show_message, f"update failed: {type(e).__name__}: {e}"))

    def _schedule(self, fn):
        if self._in_server():
            self.doc.add_next_tick_callback(fn)
        else:  # no server session (the page built in a test): apply at once
            fn()

    def _apply_view(self, view: SliceView):
        """The whole view at once (pages without a 3D view, and pages built outside a server)."""
        self._held(self._apply_model, view.fields["model"])
        self._held(self._apply_rest, view)

    def _held(self, apply, *args):
        """``apply(*args)`` as one batch of document events (in a server session)."""
        with pn.io.hold(self.doc) if self._in_server() else contextlib.nullcontext():
            apply(*args)

    def _set_row(self, nm: str, arrs) -> None:
        for src, arr in zip(self.sources[nm], arrs or []):
            if self.mesh:
                src.data["value"] = np.ascontiguousarray(arr, dtype=np.float32)
            else:
                src.data = {"image": [np.ascontiguousarray(arr, dtype=np.float32)]}

    def _apply_model(self, model: List[np.ndarray]):
        self._set_row("model", model)
        self.updates += 1

    def _apply_rest(self, view: SliceView):
        self.view = view
        pending, self._slider_values = self._slider_values, None
        if pending is not None:
            self._move_sliders(pending)
        for nm in self.sources:
            if nm != "model":
                self._set_row(nm, view.fields.get(nm))
        has_truth = "truth" in view.fields
        for nm in ("truth", "error"):
            if nm in self.slice_rows and self.row_shown(nm) != has_truth:
                self.slice_rows[nm].styles = SHOWN if has_truth else HIDDEN
        q = view.query
        for i, n in enumerate(self.vm.param_names):
            if self.rugs[i].data["x"][0] != float(q.raw[i]):   # each changed mark costs the browser a repaint
                self.rugs[i].data = {"x": [float(q.raw[i])], "y": [0.5]}
        self._set_star(q)
        self._show_message("")
        t = view.trust
        lines = ["**Query**: " + ", ".join(f"{n} = {_fmt(v)}" for n, v in zip(self.vm.param_names, q.raw))]
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
        self.status.object = f"update {self.updates}"
        self.updated.set()

    def row_shown(self, nm: str) -> bool:
        """Whether the slice row ``nm`` (model, nearest, idw, truth, error) is shown in the page."""
        return self.slice_rows[nm].styles.get("visibility") != "hidden"

    def _set_star(self, q) -> None:
        """The query's mark in the parameter-space view."""
        self.query_source.data = {**{n: [float(q.raw[i])] for i, n in enumerate(self.vm.param_names)},
                                  **({"zero": [0.0]} if "zero" in self.query_source.data else {})}

    def _apply_volume(self, vol: np.ndarray, full: bool, preview: bool = False):
        """Send a volume: binary float32 in VTKVolume's (Fortran) order; VOLUME_JS writes it into the vtk.js image in
        place (``preview``: drawn first with a longer ray step, while dragging)."""
        shown = self._display(np.asarray(vol, dtype=np.float32))
        self.vol_source.data = {"v": [shown.ravel(order="F")], "full": [int(full)], "preview": [int(preview)]}
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


VOLUME_NICE = 10
"""Niceness added to the volume worker thread (0: none)."""
DRAWN_TIMEOUT_S = 2.0
"""The volume worker waits at most this long for the browser's word that it drew the slices."""
COARSE_FIRST = False
"""While the parameters change quickly (dragging: the previous change less than DRAG_S ago), send a coarse volume
(every axis halved) before the full one. Off: the full 64^3 volume of the paper model takes ~40 ms on the server,
and in software WebGL each extra volume costs the browser a render (~85-230 ms)."""
DRAG_S = 0.5
_NICED = set()


def _lower_priority() -> None:
    """Run the calling (volume) thread at a lower CPU priority (Linux: nice + 10, once per thread): on a 2-core
    machine the volume would otherwise take the core the browser needs to draw the slices just sent."""
    tid = threading.get_native_id()
    if tid in _NICED or not VOLUME_NICE or not hasattr(os, "setpriority"):
        return
    _NICED.add(tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + VOLUME_NICE))
    except OSError:  # pragma: no cover - not permitted: run at normal priority
        pass


def _undebounced(widget) -> None:
    """Panel holds a widget's first change from the browser for 50 ms (``Syncable._debounce``) to batch quick
    changes; the explorer coalesces in its own workers, so the page's sliders hand every change on at once (a
    50 ms of the 100 ms budget for the slices)."""
    for w in widget.select(pn.widgets.Widget):
        w._debounce = 0


def _upsample(vol: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A coarse volume (every axis halved, ``ExplorerModel.volume(coarse=True)``) on the full lattice: nearest."""
    idx = [np.rint(np.arange(n) * ((c - 1) / max(n - 1, 1))).astype(np.int64) for n, c in zip(shape, vol.shape)]
    return vol[np.ix_(*idx)]


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
