"""The explorer's view model: what the page shows, computed without any web framework.

    >>> vm = ExplorerModel.open("runs/demo_drrnet")
    >>> q = vm.parse([0.4, 20, 1.5, 0.3])            # simulation units (InputError with a message when bad)
    >>> view = vm.slices(q, positions=None)          # model / nearest / IDW (/ truth, error) on three planes
    >>> view.trust.distance, view.trust.outside_box
    >>> coarse, full = vm.volume(q, coarse=True), vm.volume(q)

Parameters come in the simulation's units (names and ranges from the run's meta.json; normalized [0, 1] when the
data had none). The model is queried only on what is shown: the three slice planes and the volume through
``predict_grid`` (a baked DRR-Net: its folded table kept resampled onto the data's grid; other models ``forward`` at
the planes' vertices). The references are
test.py's (``tasks.ensemble.reference``): the nearest training member and IDW over the 8 nearest training members
(power 2), both in the normalized value space test.py scores in, shown in data units.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from models.drrnet import DRRNet
from tasks.ensemble.reference import IDWPredictor, NearestMemberPredictor
from tasks.ensemble.surrogate import Surrogate, denormalize
from util.cpu import cpu_features
from util.sampling import axis_coords

__all__ = ["ExplorerModel", "InputError", "RunRefused", "Query", "SliceView", "Trust", "Coalescer",
           "IDW_K", "IDW_POWER"]

IDW_K, IDW_POWER = 8, 2.0
"""The IDW reference of the page: test.py's defaults (``test.ref_k``, ``test.ref_power``)."""

AT_RUN_TOL = 1e-6
"""A query within this normalized distance of a stored run is that run (its true field and error are shown);
the stored conditions are float32."""
DISPLAY_BF16 = True
"""The 3D view's volume with bf16 products where the CPU has AMX-BF16 (``ExplorerModel.display_dtype``)."""
KEEP_ROWS_BYTES = 1 << 30
"""Largest DRR-Net table resampled onto the data's grid that the explorer keeps (``ExplorerModel.volume``)."""
VOLUME_CHUNK = 1 << 14
"""Points per chunk of a volume on the CPU (the decoder's activations of a chunk stay in the caches: 2^16 was 1.7x
slower than 2^14 on the paper Cloverleaf model)."""


class InputError(ValueError):
    """Bad input from the page (NaN, text, out of range): its message is shown in the page."""


class RunRefused(ValueError):
    """The run cannot be explored (not an ensemble run, no weights, ...): one line for the terminal."""


@dataclass
class Query:
    """One checked parameter setting: ``raw`` in simulation units, ``c`` normalized (the model's condition)."""
    raw: np.ndarray
    c: np.ndarray


@dataclass
class Trust:
    """How far to trust the model at a query.

    Attributes:
        distance: Euclidean distance from the query to the nearest training run, in normalized parameter space
            (every parameter scaled to [0, 1] over the ensemble's range: the space IDW and nearest use).
        spacing: the median distance from a training run to its nearest other training run (the ensemble's typical
            spacing, to read ``distance`` against).
        nearest_row: cond.npy row of the nearest training run.
        max_model_idw: largest |model - IDW| over the shown field (data units).
        outside_box: the query lies outside the box spanned by the training runs' parameters.
        outside: names of the parameters outside that box.
    """
    distance: float
    spacing: float
    nearest_row: int
    max_model_idw: float
    outside_box: bool
    outside: List[str] = field(default_factory=list)


@dataclass
class SliceView:
    """Everything the page shows for one query, on the shown planes.

    ``fields[name][axis]``: 2D arrays (data units) for name in ``model``, ``nearest``, ``idw`` and, when the query is a
    stored run, ``truth`` and ``error`` (model - truth); axis 0, 1, 2 = the plane normal to array axis 0 (D), 1, 2 at
    ``positions[axis]``. A 2D ensemble has one "slice" (axis 0): the whole field. ``at_row``: the stored run the
    query is (None otherwise).
    """
    query: Query
    positions: List[int]
    fields: Dict[str, List[np.ndarray]]
    trust: Trust
    at_row: Optional[int]


class ExplorerModel:
    """A trained ensemble surrogate with its training runs, for the explorer.

    Args:
        surrogate: the loaded :class:`~tasks.ensemble.surrogate.Surrogate` (baked).
        dataset: the run's dataset (for the training runs' fields; None: model only, no references).
    """

    def __init__(self, surrogate: Surrogate, dataset=None):
        self.s = surrogate
        self.meta = surrogate.meta
        self.dataset = dataset
        d_c = int(self.meta["cond_dim"])
        self.d_c = d_c
        names = self.meta.get("param_names")
        self.normalized_units = names is None
        self.param_names = list(names) if names else [f"c{i}" for i in range(d_c)]
        if self.normalized_units:
            self.lo, self.hi = np.zeros(d_c), np.ones(d_c)
        else:
            self.lo = np.asarray(self.meta["param_min"], dtype=np.float64)
            self.hi = np.asarray(self.meta["param_max"], dtype=np.float64)
        self.shape = tuple(int(n) for n in self.meta["spatial_shape"])
        self.has_grid = surrogate.has_grid
        self.value_range = (float(denormalize(np.array([0.0]), self.meta)[0]),
                            float(denormalize(np.array([1.0]), self.meta)[0]))
        self.train_rows = np.zeros(0, dtype=np.int64)
        self.test_rows = np.zeros(0, dtype=np.int64)
        self._field_cache: Dict[int, np.ndarray] = {}
        # the products' dtype of the 3D view's volume (volume(display=True)): bfloat16 for a baked DRR-Net on a CPU
        # with AMX-BF16 (util.cpu; 1.7x faster at 64^3 on the paper Cloverleaf model, ~4e-4 relative L2 from
        # float32), else None (float32)
        self.display_dtype: Optional[torch.dtype] = None
        if DISPLAY_BF16 and surrogate.device.type == "cpu" and self._fast_table() is not None \
                and cpu_features()["bf16"] == "amx_bf16":
            self.display_dtype = torch.bfloat16
        if dataset is not None:
            self.train_rows = np.asarray(dataset.train_idx, dtype=np.int64)
            self.test_rows = np.asarray(dataset.test_idx, dtype=np.int64)
            rows = np.concatenate([self.train_rows, self.test_rows])
            self.row_conds = {int(r): dataset.conds([int(r)])[0].double().numpy() for r in rows}
            tr_c = np.stack([self.row_conds[int(r)] for r in self.train_rows])
            fetch = lambda i: torch.from_numpy(self.normalized_field(int(self.train_rows[i])))  # noqa: E731
            self.nearest_ref = NearestMemberPredictor(tr_c, fetch)
            self.idw_ref = IDWPredictor(tr_c, fetch, k=IDW_K, power=IDW_POWER)
            self.train_lo, self.train_hi = tr_c.min(axis=0), tr_c.max(axis=0)
            if len(tr_c) > 1:
                dd = np.linalg.norm(tr_c[:, None] - tr_c[None], axis=-1)
                np.fill_diagonal(dd, np.inf)
                self.spacing = float(np.median(dd.min(axis=1)))
            else:
                self.spacing = float("nan")
        else:
            self.row_conds = {}
            self.nearest_ref = self.idw_ref = None
            self.train_lo, self.train_hi = np.zeros(d_c), np.ones(d_c)
            self.spacing = float("nan")
        self._plane_cache: Dict[tuple, torch.Tensor] = {}

    # -- opening a run ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: str, device: Optional[str] = None, with_data: bool = True) -> "ExplorerModel":
        """The run's surrogate (final weights) and, when its data is readable, its training runs.

        Raises:
            RunRefused: one line: not a run folder, not an ensemble run, no weights, weights that do not load.
        """
        from util.files import read_json

        meta_p = os.path.join(run_dir, "meta.json")
        if not os.path.isfile(meta_p):
            raise RunRefused(f"'{run_dir}' is not a run folder written by train.py (no meta.json)")
        try:
            meta = read_json(meta_p)
        except (OSError, ValueError) as e:
            raise RunRefused(f"'{meta_p}' is not readable JSON ({e})") from None
        task = meta.get("task", "ensemble")
        if task != "ensemble":
            raise RunRefused(f"'{run_dir}' is a '{task}' run: the explorer shows ensemble surrogates only")
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        has_ckpt = os.path.isdir(ckpt_dir) and any(os.scandir(ckpt_dir))
        if not os.path.isfile(os.path.join(run_dir, "model.pt")) and not has_ckpt:
            raise RunRefused(f"'{run_dir}' has no weights (no model.pt, no checkpoint): train it first")
        try:
            s = Surrogate.load(run_dir, device=device)
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise RunRefused(f"'{run_dir}': the model does not load ({' '.join(str(e).split())})") from None
        dataset = None
        if with_data:
            try:
                from util.build import build_dataset
                from util.run_dir import load_experiment

                dataset = build_dataset(load_experiment(run_dir))
            except Exception as e:  # the data may have moved: the model alone still explores
                import logging

                logging.getLogger("explore").warning("the run's data is not readable (%s): showing the model only, "
                                                     "without the training runs", " ".join(str(e).split()))
        return cls(s, dataset)

    # -- parameters --------------------------------------------------------------------------------------
    def parse(self, values: Sequence[Any]) -> Query:
        """Values from the page (numbers or text) in simulation units -> a checked :class:`Query`.

        Raises:
            InputError: wrong count, text that is no number, NaN / infinity, or a value outside the ensemble's
                parameter range (the message names the parameter and the range).
        """
        try:
            vals = list(values)
        except TypeError:
            raise InputError(f"expected {self.d_c} parameter values") from None
        if len(vals) != self.d_c:
            raise InputError(f"expected {self.d_c} parameter values ({', '.join(self.param_names)}), got {len(vals)}")
        raw = np.empty(self.d_c)
        for i, (name, v) in enumerate(zip(self.param_names, vals)):
            try:
                x = float(v.strip() if isinstance(v, str) else v)
            except (TypeError, ValueError):
                raise InputError(f"{name}: '{str(v)[:40]}' is not a number") from None
            if not math.isfinite(x):
                raise InputError(f"{name}: {x} is not a finite number")
            lo, hi = self.lo[i], self.hi[i]
            tol = 1e-9 * max(1.0, abs(hi - lo))
            if x < lo - tol or x > hi + tol:
                raise InputError(f"{name} = {x:g} is outside the ensemble's range [{lo:g}, {hi:g}]")
            raw[i] = min(max(x, lo), hi)
        span = np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        c = np.where(self.hi > self.lo, (raw - self.lo) / span, 0.0)
        q = Query(raw=raw, c=c)
        at = self.at_row(q)
        if at is not None:   # a stored run: its own (float32) condition, as test.py queries it
            q.c = self.row_conds[at].copy()
        return q

    def raw_of_row(self, row: int) -> np.ndarray:
        """A stored run's parameters in simulation units."""
        c = self.row_conds[int(row)]
        return self.lo + c * (self.hi - self.lo)

    def run_table(self) -> Dict[str, np.ndarray]:
        """The stored runs for the parameter-space view: ``row``, ``split`` (train/test) and one column per
        parameter (simulation units)."""
        rows = np.concatenate([self.train_rows, self.test_rows])
        out: Dict[str, Any] = {"row": rows, "split": np.array(["train"] * len(self.train_rows) +
                                                              ["test"] * len(self.test_rows))}
        raw = np.stack([self.raw_of_row(r) for r in rows]) if len(rows) else np.zeros((0, self.d_c))
        for i, n in enumerate(self.param_names):
            out[n] = raw[:, i]
        return out

    def at_row(self, q: Query) -> Optional[int]:
        """The stored run (train or test) whose condition the query is, else None."""
        for r, c in self.row_conds.items():
            if float(np.linalg.norm(c - q.c)) <= AT_RUN_TOL:
                return int(r)
        return None

    # -- fields ------------------------------------------------------------------------------------------
    def normalized_field(self, row: int) -> np.ndarray:
        """A stored run's field, normalized as in training (cached)."""
        f = self._field_cache.get(int(row))
        if f is None:
            f = self.dataset.full_field(int(row)).numpy().astype(np.float32)
            self._field_cache[int(row)] = f
        return f

    def field(self, row: int) -> np.ndarray:
        """A stored run's field in data units."""
        return denormalize(self.normalized_field(row), self.meta)

    def default_positions(self) -> List[int]:
        return [n // 2 for n in self.shape]

    def _check_positions(self, positions: Optional[Sequence[Any]]) -> List[int]:
        if positions is None:
            return self.default_positions()
        pos = []
        for a, (p, n) in enumerate(zip(positions, self.shape)):
            try:
                k = int(p)
            except (TypeError, ValueError):
                raise InputError(f"slice position {p!r} is not an integer") from None
            if not 0 <= k < n:
                raise InputError(f"slice position {k} along axis {a} is outside [0, {n - 1}]")
            pos.append(k)
        return pos

    def _plane_coords(self, axis: int, k: int) -> torch.Tensor:
        """Coordinates (n1 * n2, d) of the vertices of the plane normal to array ``axis`` at index ``k`` (C order of
        the remaining axes; column 0 along the last array axis, as ``grid_coords``)."""
        key = (axis, k)
        x = self._plane_cache.get(key)
        if x is None:
            axes = [axis_coords(n) for n in self.shape]
            axes[axis] = axes[axis][k:k + 1]
            mesh = np.meshgrid(*axes, indexing="ij")
            x = torch.from_numpy(np.stack([m.ravel() for m in mesh[::-1]], axis=1).astype(np.float32))
            x = x.to(self.s.device)
            if len(self._plane_cache) > 64:
                self._plane_cache.clear()
            self._plane_cache[key] = x
        return x

    @torch.no_grad()
    def _model_at(self, x: torch.Tensor, c: np.ndarray) -> np.ndarray:
        """Normalized model values at coordinates ``x`` (N, d) for condition ``c`` (test.py's chunked
        reconstruction, tasks.ensemble.evaluation.predict_field)."""
        from tasks.ensemble.evaluation import predict_field

        ct = torch.as_tensor(c, dtype=torch.float32, device=self.s.device)
        return predict_field(self.s.model, x, ct, (x.shape[0],), self.s.chunk_size).cpu().numpy()

    def model_plane(self, q: Query, axis: int, k: int) -> np.ndarray:
        """The model's field (data units) on one plane: only that plane's vertices are queried."""
        return self._model_planes(q, [axis], [k])[0]

    def _model_planes(self, q: Query, axes: Sequence[int], ks: Sequence[int]) -> List[np.ndarray]:
        """The model's field (data units) on the planes ``axes[i]`` at index ``ks[i]`` (3D grids), the whole field
        (2D grids) or the vertices (mesh ensembles)."""
        if not self.has_grid:   # a mesh: its vertices
            self.mesh_vertices()
            return [denormalize(self._model_at(self._plane_cache["mesh"], q.c), self.meta)]
        if len(self.shape) == 2:
            x = self._plane_coords_2d()
            return [denormalize(self._model_at(x, q.c), self.meta).reshape(self.shape)]
        shapes = [[n for a, n in enumerate(self.shape) if a != axis] for axis in axes]
        if self._keeps_rows():   # the planes' vertices read from the table kept on the data's grid (the volume's),
            idx = []             # all planes in one query
            for axis, k in zip(axes, ks):
                i = self._plane_cache.get(("idx", axis, k))
                if i is None:
                    i = torch.from_numpy(np.take(np.arange(math.prod(self.shape)).reshape(self.shape), k, axis=axis)
                                         .ravel())
                    self._plane_cache[("idx", axis, k)] = i
                idx.append(i)
            c = torch.as_tensor(q.c, dtype=torch.float32, device=self.s.device)
            v = self.s.model.predict_grid(self.shape, c, self._chunk(), keep_rows=True, vertices=torch.cat(idx))
            parts = torch.split(v, [len(i) for i in idx])
            return [denormalize(p.cpu().numpy(), self.meta).reshape(sh) for p, sh in zip(parts, shapes)]
        return [denormalize(self._model_at(self._plane_coords(axis, k), q.c), self.meta).reshape(sh)
                for axis, k, sh in zip(axes, ks, shapes)]

    def _fast_table(self) -> Optional[torch.Tensor]:
        """The folded table of a baked DRR-Net on its fast path (None for any other model)."""
        m = self.s.model
        return getattr(m, "_baked_fused", None) if isinstance(m, DRRNet) and m.is_baked and m.fast_paths else None

    def _keeps_rows(self) -> bool:
        """A baked DRR-Net whose folded table, resampled onto the data's grid, fits ``KEEP_ROWS_BYTES``: the volume
        and the slices read the kept rows (``predict_grid(keep_rows=True)``)."""
        table = self._fast_table()
        return self.has_grid and table is not None and math.prod(self.shape) * table.shape[1] * 4 <= KEEP_ROWS_BYTES

    def _chunk(self) -> int:
        return self.s.chunk_size if self.s.device.type == "cuda" else VOLUME_CHUNK

    def _plane_coords_2d(self) -> torch.Tensor:
        x = self._plane_cache.get("2d")
        if x is None:
            from util.sampling import grid_coords

            x = grid_coords(self.shape).to(self.s.device)
            self._plane_cache["2d"] = x
        return x

    @staticmethod
    def _cut(f: np.ndarray, axis: int, k: int) -> np.ndarray:
        return f if f.ndim <= 2 else np.take(f, k, axis=axis)

    def mesh_vertices(self) -> np.ndarray:
        """A mesh ensemble's vertex coordinates (N, d) as the model sees them (normalized; cached)."""
        x = self._plane_cache.get("mesh")
        if x is None:
            x = torch.from_numpy(np.asarray(self.s.mesh_coords(), dtype=np.float32)).to(self.s.device)
            self._plane_cache["mesh"] = x
        return x.cpu().numpy()

    def _idw_plane(self, q: Query, axis: int, k: int) -> np.ndarray:
        """IDW-8 on one plane (normalized): the weights of test.py's IDWPredictor over the planes of its members."""
        idx, w = self.idw_ref.weights(q.c)
        acc = None
        for i, wi in zip(idx.tolist(), w.tolist()):
            p = self._cut(self.normalized_field(int(self.train_rows[i])), axis, k).astype(np.float64)
            acc = p * wi if acc is None else acc + p * wi
        return acc.astype(np.float32)

    def _layout(self, positions: Optional[Sequence[Any]]) -> Tuple[List[int], List[int]]:
        """(positions, axes) of the shown planes: 3D grids three planes, 2D grids and meshes one "slice"."""
        if not self.has_grid:
            return [0], [0]
        pos = self._check_positions(positions)
        return pos, ([0] if len(self.shape) == 2 else [0, 1, 2])

    def model_slices(self, q: Query, positions: Optional[Sequence[Any]] = None) -> List[np.ndarray]:
        """The model's part of :meth:`slices` alone (what the page draws first)."""
        pos, axes = self._layout(positions)
        return self._model_planes(q, axes, [pos[a] for a in axes])

    def slices(self, q: Query, positions: Optional[Sequence[Any]] = None,
               model: Optional[List[np.ndarray]] = None) -> SliceView:
        """The query's view on the three planes through ``positions`` (array indices; default: the centre).

        2D ensembles: one "slice", the whole field. Unstructured (mesh) ensembles: one "slice", the values at all
        the mesh's vertices (``(N,)`` arrays; positions are ignored; :meth:`mesh_vertices` gives their coordinates).
        ``model``: the model's planes already computed by :meth:`model_slices` for the same query and positions.
        """
        pos, axes = self._layout(positions)
        if model is None:
            model = self._model_planes(q, axes, [pos[a] for a in axes])
        fields: Dict[str, List[np.ndarray]] = {"model": list(model)}
        at = self.at_row(q) if self.dataset is not None else None
        max_diff, near_row, dist = float("nan"), -1, float("nan")
        if self.dataset is not None:
            near = self.nearest_ref.nearest(q.c)
            near_row = int(self.train_rows[near])
            dist = float(self.nearest_ref.distances(q.c)[near])
            fields["nearest"] = [self._cut(self.field(near_row), a, pos[a]) for a in axes]
            fields["idw"] = [denormalize(self._idw_plane(q, a, pos[a]), self.meta) for a in axes]
            max_diff = float(max(np.abs(m - i).max() for m, i in zip(fields["model"], fields["idw"])))
            if at is not None:
                fields["truth"] = [self._cut(self.field(at), a, pos[a]) for a in axes]
                fields["error"] = [m - t for m, t in zip(fields["model"], fields["truth"])]
        tol = 1e-9
        out = [n for i, n in enumerate(self.param_names)
               if q.c[i] < self.train_lo[i] - tol or q.c[i] > self.train_hi[i] + tol]
        trust = Trust(distance=dist, spacing=self.spacing, nearest_row=near_row, max_model_idw=max_diff,
                      outside_box=bool(out), outside=out)
        return SliceView(query=q, positions=pos, fields=fields, trust=trust, at_row=at)

    @torch.no_grad()
    def volume(self, q: Query, coarse: bool = False, display: bool = False) -> np.ndarray:
        """The model's whole field in data units: the data's grid (``coarse``: every axis halved, at least 2
        vertices, for a quick first picture), or for a mesh ensemble its values at the vertices.

        Gridded: the model's ``predict_grid`` (DRR-Net: its baked fast path). The full-resolution field of a baked
        DRR-Net keeps the folded table resampled onto the data's grid (``predict_grid(keep_rows=True)``: made by
        the first volume, prod(shape) x hidden float32, when that is at most ``KEEP_ROWS_BYTES``): every later
        volume costs the condition bias and the decoder only (1.7x faster on the paper Cloverleaf model at 64^3),
        with bitwise the same field. ``display``: for the 3D view only, products in ``display_dtype``
        (downloads and the slices stay float32).
        """
        if not self.has_grid:
            return self.s.predict(list(q.c), normalized_params=True)
        shape = tuple(max(2, (n + 1) // 2) for n in self.shape) if coarse else self.shape
        m = self.s.model   # every FieldModel has predict_grid (DRR-Net's: the folded lattice)
        c = torch.as_tensor(q.c, dtype=torch.float32, device=self.s.device)
        kw = {}
        if not coarse and self._keeps_rows():
            kw["keep_rows"] = True
        if display and self.display_dtype is not None:
            kw["dtype"] = self.display_dtype
        v = m.predict_grid(shape, c, self._chunk(), **kw)
        if v.ndim == len(shape) + 1:   # (*shape, C): the field is channel 0
            v = v[..., 0]
        return denormalize(v.reshape(shape).cpu().numpy(), self.meta)

    # -- downloads ---------------------------------------------------------------------------------------
    @staticmethod
    def npy_bytes(f: np.ndarray) -> bytes:
        """The field as .npy bytes (for a download; nothing is written on the server)."""
        buf = io.BytesIO()
        np.save(buf, np.asarray(f, dtype=np.float32), allow_pickle=False)
        return buf.getvalue()

    @staticmethod
    def vti_bytes(f: np.ndarray, name: str = "value") -> bytes:
        """The field as .vti bytes (ParaView; ``util.volume_io.write_vti`` into a private temporary folder)."""
        from util.volume_io import write_vti

        with tempfile.TemporaryDirectory(prefix="explore_") as d:
            p = os.path.join(d, "field.vti")
            write_vti(p, np.asarray(f, dtype=np.float32), name=name)
            with open(p, "rb") as fh:
                return fh.read()


class Coalescer:
    """One worker thread and a one-slot queue: a newer request replaces a queued one (fast dragging never queues
    stale work); a job may also ask :meth:`superseded` between its stages (progressive volume) and stop.

    Args:
        handle: ``handle(request, superseded) -> None`` run on the worker for each request taken; ``superseded()``
            is True once a newer request is waiting. Exceptions are passed to ``on_error(request, exc)``.
    """

    def __init__(self, handle: Callable[[Any, Callable[[], bool]], None],
                 on_error: Optional[Callable[[Any, BaseException], None]] = None):
        self._handle, self._on_error = handle, on_error
        self._cv = threading.Condition()
        self._pending: Any = None
        self._has_pending = False
        self._busy = False
        self._stop = False
        self.handled: List[Any] = []    # requests taken (most recent last; for tests and the benchmark)
        self._thread = threading.Thread(target=self._run, name="explorer-worker", daemon=True)
        self._thread.start()

    def submit(self, request: Any) -> None:
        with self._cv:
            self._pending, self._has_pending = request, True
            self._cv.notify_all()

    def superseded(self) -> bool:
        return self._has_pending

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or running (True), or ``timeout`` seconds passed (False)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._has_pending and not self._busy, timeout)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._has_pending or self._stop)
                if self._stop:
                    return
                req, self._pending, self._has_pending = self._pending, None, False
                self._busy = True
                self.handled.append(req)
            try:
                self._handle(req, self.superseded)
            except BaseException as e:  # noqa: BLE001 - reported to the page, the worker goes on
                if self._on_error is not None:
                    self._on_error(req, e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
