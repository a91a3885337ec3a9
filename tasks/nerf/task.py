"""The NeRF task: a radiance field of one scene from posed views (spec vision 3.4-3.5), and its evaluation.

Per training step (``training_step``), as ``train_ngp_nerf_occ.py`` / ``train_mlp_nerf.py`` (the model's
``begin_step(step)`` runs first: the DRR grid fields refine their lattice once per step, shared by the grid
update, the visibility pass and the rendering pass, models/nerf.py):

1. occupancy-grid update (``update_every_n_steps``: every ``update_every`` steps, all cells before
   ``warmup_steps``, EMA ``ema_decay``, threshold ``occ_thre``) with ``occ_eval_fn(x) = density(x) *
   render_step_size`` (the unwrapped model, no grad);
2. sampling of the batch's rays (stratified in training; densities for the transmittance early stop without
   grad), then rendering with grad through the model's ``forward`` (white background by default);
3. a step with no samples returns None (the loop skips it: no backward, no optimizer or scheduler step);
4. dynamic ray count: ``n_rays <- int(n_rays * target_samples / n_samples)`` for the next batch;
5. loss = ``loss_scale`` x smooth-L1 (beta 1) of the rendered colors against the targets; ``loss_scale`` 1024
   keeps the reference's never-unscaled GradScaler(2^10) gradients (spec 3.5 / 4: on CPU the scaler is off).
   Logged terms: ``mse`` (also gives the logged PSNR), ``n_rays``, ``n_samples``.

Task state (checkpointed): the occupancy grid, the current ray count. Random numbers (the stratified jitter and
the cells drawn by the grid update) come from a generator seeded by (seed, step), so a resumed run continues
identically.

Evaluation (``test.py`` -> :meth:`NeRFTask.evaluate`, ``test:`` keys in :class:`NeRFTestConfig`): the run's model
in eval mode is baked once (timed), then every test view is rendered by the training renderer, not stratified, in
chunks of ``chunk_rays`` rays (timed per view); PSNR (mean of per-view PSNRs), SSIM (Gaussian 11 x 11, mean over
channels and views), render time per view; predicted and error PNGs per view; ``metrics.csv`` holds one row per
view and a final ``mean`` row. The occupancy grid is the one saved with the weights scored (the checkpoint's
``task_state.pt``, util.checkpoints.load_task_state; for model.pt the final checkpoint's); a run without one gets
a grid rebuilt from the trained density (all cells, ``rebuild_updates`` warm-up updates; a warning says so).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rendering.occupancy import OccupancyGrid
from rendering.renderer import BACKENDS, render_rays
from tasks.base import CsvFile, EvalContext, Scores, StepOutput, Task
from util.config import check_dataclass_fields
from util.device import default_device
from util.files import atomic_write
from util.tables import text_table
from util.registry import ConfigError, register

log = logging.getLogger("test")

__all__ = ["NeRFTask", "NeRFTestConfig", "NERF_FIELDS", "GRID_STATE_KEY"]

NERF_FIELDS = ["view", "psnr", "ssim", "mse", "render_s", "n_samples", "bake_s", "params", "weights", "step",
               "total_steps"]
GRID_STATE_KEY = "nerf_occupancy"


@dataclass
class NeRFTestConfig:
    """Keys of the ``test`` section of a NeRF run (task ``nerf``).

    Attributes:
        chunk_rays: rays rendered at a time (8192 as the grid script; the vanilla script used 4096).
        max_views: render only the first this many test views (null: all).
        save_png: write ``view_<i>_pred.png`` and ``view_<i>_error.png`` (|pred - truth| x error_gain, mean over
            channels, gray) into the output folder.
        error_gain: gain of the error image.
        rebuild_updates: warm-up grid updates used to rebuild the occupancy grid when the run saved none.
    """
    chunk_rays: int = 8192
    max_views: Optional[int] = None
    save_png: bool = True
    error_gain: float = 5.0
    rebuild_updates: int = 4

    def __post_init__(self):
        check_dataclass_fields(self, "test")
        if int(self.chunk_rays) < 1:
            raise ConfigError(f"test.chunk_rays must be >= 1, got {self.chunk_rays}")
        if self.max_views is not None and int(self.max_views) < 1:
            raise ConfigError(f"test.max_views must be >= 1 or null (all views), got {self.max_views}")
        if not (self.error_gain > 0 and math.isfinite(self.error_gain)):
            raise ConfigError(f"test.error_gain must be a finite number > 0, got {self.error_gain}")
        if int(self.rebuild_updates) < 1:
            raise ConfigError(f"test.rebuild_updates must be >= 1, got {self.rebuild_updates}")


def _unwrap(model):
    return getattr(model, "module", model)


@register("task", "nerf")
class NeRFTask(Task):
    """Radiance field of one scene from posed views with occupancy-grid rendering (spec vision 3.4-3.5).

    Needs a dataset with ray batches (``dataset.type: blender`` or ``nerf_demo``) and a radiance-field model
    (``models.nerf.RadianceField``: ``density`` and ``forward(x, c, d)``). Model inputs: ``aabb`` (the scene box,
    for models that accept it), ``cond_dim`` 0, ``spatial_dims`` 3, ``out_dim`` 4.

    Args:
        dataset: the run's dataset (injected).
        aabb: scene box (xmin, ymin, zmin, xmax, ymax, zmax) of the occupancy grid and of the grid models.
        grid_resolution: occupancy-grid cells per axis.
        render_step_size: lattice step of the marcher (also the factor of occ_eval_fn).
        occ_thre: occupancy threshold (cells occupied when occ > min(mean, occ_thre)).
        ema_decay: EMA decay of the grid update.
        warmup_steps: steps during which every grid update evaluates every cell.
        update_every: grid update interval in steps.
        alpha_thre: drop samples with alpha below min(alpha_thre, mean occupancy) (0: off).
        early_stop_eps: transmittance below which samples are dropped.
        near_plane: start of the marched segment of every ray.
        far_plane: end of the marched segment.
        target_samples: samples per step the dynamic ray count aims at (2^16 as the reference).
        max_rays: upper bound of the ray count (null: none, as the reference).
        loss_scale: factor of the smooth-L1 loss (1024 = the reference's never-unscaled GradScaler).
        background: background color blended under the rendering (white as the data).
        backend: "torch" (rendering/) or "nerfacc" (the optional package, CUDA only).
        seed: seed of the stratified jitter and of the grid updates' random cells.
    """

    test_config = NeRFTestConfig
    model_arguments = ("aabb", "cond_dim", "spatial_dims", "out_dim")

    def __init__(self, dataset, aabb: Sequence[float] = (-1.5, -1.5, -1.5, 1.5, 1.5, 1.5), grid_resolution: int = 128,
                 render_step_size: float = 5e-3, occ_thre: float = 0.01, ema_decay: float = 0.95,
                 warmup_steps: int = 256, update_every: int = 16, alpha_thre: float = 0.0,
                 early_stop_eps: float = 1e-4, near_plane: float = 0.0, far_plane: float = 1e10,
                 target_samples: int = 1 << 16, max_rays: Optional[int] = None, loss_scale: float = 1024.0,
                 background: Sequence[float] = (1.0, 1.0, 1.0), backend: str = "torch", seed: int = 0):
        super().__init__(dataset)
        if not hasattr(dataset, "sample_batch") or not hasattr(dataset, "view"):
            raise ConfigError(f"task.type 'nerf' needs a ray dataset (dataset.type: blender or nerf_demo), got "
                              f"{type(dataset).__name__}")
        for key, val in (("grid_resolution", grid_resolution), ("warmup_steps", warmup_steps),
                         ("update_every", update_every), ("target_samples", target_samples)):
            if not isinstance(val, int) or isinstance(val, bool) or val < (0 if key == "warmup_steps" else 1):
                raise ConfigError(f"task.{key} must be a positive integer, got {val!r}")
        for key, val in (("render_step_size", render_step_size), ("loss_scale", loss_scale)):
            if not (isinstance(val, (int, float)) and val > 0 and math.isfinite(val)):
                raise ConfigError(f"task.{key} must be a finite number > 0, got {val!r}")
        if not 0 < ema_decay <= 1:
            raise ConfigError(f"task.ema_decay must lie in (0, 1], got {ema_decay!r}")
        if not 0 <= near_plane < far_plane:
            raise ConfigError(f"task.near_plane / far_plane must satisfy 0 <= near < far, got {near_plane}, {far_plane}")
        if max_rays is not None and (not isinstance(max_rays, int) or max_rays < 1):
            raise ConfigError(f"task.max_rays must be a positive integer or null, got {max_rays!r}")
        if backend not in BACKENDS:
            raise ConfigError(f"task.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if len(list(background)) != 3:
            raise ConfigError(f"task.background must be 3 numbers (RGB), got {background!r}")
        try:
            self.grid = OccupancyGrid(aabb, grid_resolution)
        except ValueError as e:
            raise ConfigError(f"task.aabb / task.grid_resolution: {e}") from e
        self.aabb = [float(v) for v in aabb]
        self.render_step_size, self.occ_thre, self.ema_decay = float(render_step_size), float(occ_thre), ema_decay
        self.warmup_steps, self.update_every = warmup_steps, update_every
        self.alpha_thre, self.early_stop_eps = float(alpha_thre), float(early_stop_eps)
        self.near_plane, self.far_plane = float(near_plane), float(far_plane)
        self.target_samples, self.max_rays, self.loss_scale = target_samples, max_rays, float(loss_scale)
        self.background = torch.tensor([float(v) for v in background])
        self.backend, self.seed = backend, int(seed)
        self.n_rays = int(dataset.init_rays)

    # ------------------------------------------------------------------------------------- model inputs
    def model_inputs(self) -> Dict[str, Any]:
        return {"aabb": list(self.aabb), "cond_dim": 0, "spatial_dims": 3, "out_dim": 4}

    @classmethod
    def model_inputs_without_data(cls, exp: Dict[str, Any]) -> Dict[str, Any]:
        aabb = (exp.get("task") or {}).get("aabb", [-1.5, -1.5, -1.5, 1.5, 1.5, 1.5])
        return {"aabb": list(aabb), "cond_dim": 0, "spatial_dims": 3, "out_dim": 4}

    @property
    def output_mean(self) -> Optional[float]:
        return None

    # ----------------------------------------------------------------------------------------- training
    def batch(self, step: int, rank: int, device) -> Dict[str, torch.Tensor]:
        b = self.dataset.sample_batch(step, rank=rank, n_rays=self.n_rays)
        return {k: v.to(device, non_blocking=True) for k, v in b.items()}

    def _generator(self, step: int, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + int(step)) % (2 ** 63))
        return g

    def render(self, model, rays_o: torch.Tensor, rays_d: torch.Tensor, stratified: bool,
               generator: Optional[torch.Generator] = None, chunk: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Render rays ``(N, 3)`` through the model with this task's grid and settings (see render_rays)."""
        device = rays_o.device
        self.grid.to(device)
        raw = _unwrap(model)
        c = torch.zeros(1, 0, device=device)

        def rgb_sigma(x, d):
            out = model(x[None], c, d[None])[0]
            return out[:, :3], out[:, 3]

        def sigma(x):
            return raw.density(x)

        return render_rays(self.grid, rays_o, rays_d, rgb_sigma, sigma, render_step_size=self.render_step_size,
                           near_plane=self.near_plane, far_plane=self.far_plane, stratified=stratified,
                           render_bkgd=self.background.to(device), alpha_thre=self.alpha_thre,
                           early_stop_eps=self.early_stop_eps, generator=generator, backend=self.backend, chunk=chunk)

    def update_grid(self, model, step: int, generator: Optional[torch.Generator] = None) -> bool:
        """The occupancy update of ``step`` (every ``update_every`` steps); returns whether it ran."""
        raw = _unwrap(model)
        self.grid.train()
        dt = self.render_step_size
        return self.grid.update_every_n_steps(step, lambda x: raw.density(x) * dt, occ_thre=self.occ_thre,
                                              ema_decay=self.ema_decay, warmup_steps=self.warmup_steps,
                                              n=self.update_every, generator=generator)

    def training_step(self, model, batch: Dict[str, torch.Tensor], step: int) -> Optional[StepOutput]:
        training = _unwrap(model).training
        device = batch["rays_o"].device
        g = self._generator(step, device)
        self.grid.to(device)
        if training:
            _unwrap(model).begin_step(step)   # a per-step cache (the DRR grids' refined lattice) starts afresh
            self.update_grid(model, step, g)
        out = self.render(model, batch["rays_o"], batch["rays_d"], stratified=training, generator=g)
        n_samples = int(out["n_samples"])
        if n_samples == 0:
            return None
        n_rays = batch["rays_o"].shape[0]
        if training:
            new = int(self.n_rays * (self.target_samples / float(n_samples)))
            self.n_rays = max(1, new if self.max_rays is None else min(new, self.max_rays))
        colors = out["colors"].float()
        target = batch["rgb"].float()
        loss = F.smooth_l1_loss(colors, target) * self.loss_scale
        mse = F.mse_loss(colors.detach(), target)
        terms = {"mse": mse, "n_rays": torch.tensor(float(n_rays), device=device),
                 "n_samples": torch.tensor(float(n_samples), device=device)}
        return StepOutput(loss, terms, colors)

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {GRID_STATE_KEY: {k: v.detach().cpu() for k, v in self.grid.state_dict().items()},
                "n_rays": int(self.n_rays)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if GRID_STATE_KEY in state:
            self.grid.load_state_dict(state[GRID_STATE_KEY])
        if "n_rays" in state:
            self.n_rays = int(state["n_rays"])

    # --------------------------------------------------------------------------------------- evaluation
    def rebuild_grid(self, model, updates: int = 4) -> None:
        """Occupancy from a trained model's density: ``updates`` all-cell updates (jittered points, EMA)."""
        raw = _unwrap(model)
        dt = self.render_step_size
        device = next(raw.parameters()).device
        self.grid.to(device)
        with torch.no_grad():
            for i in range(updates):
                self.grid.update(0, lambda x: raw.density(x) * dt, occ_thre=self.occ_thre, ema_decay=self.ema_decay,
                                 warmup_steps=1, generator=self._generator(i, device))

    def evaluate_model(self, model, test_config: Optional[NeRFTestConfig] = None, out_dir: Optional[str] = None,
                       device=None, progress: bool = True) -> List[Dict[str, Any]]:
        """Render and score the test views (no run directory needed); rows per view plus a ``mean`` row."""
        from PIL import Image

        from util.metrics import mse as mse_of, psnr_from_mse, ssim
        from util.timing import synchronize

        tc = test_config or NeRFTestConfig()
        device = default_device(device)
        info = log.info if progress else log.debug
        model.to(device)
        model.eval()
        self.grid.to(device)
        t0 = time.perf_counter()
        model.bake()
        synchronize(device)
        bake_s = time.perf_counter() - t0
        params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
        n_views = self.dataset.n_test if tc.max_views is None else min(int(tc.max_views), self.dataset.n_test)
        rows = []
        for i in range(n_views):
            v = self.dataset.view(i)
            H, W = v["rgb"].shape[:2]
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.render(model, v["rays_o"].reshape(-1, 3).to(device), v["rays_d"].reshape(-1, 3).to(device),
                                  stratified=False, chunk=int(tc.chunk_rays))
            synchronize(device)
            render_s = time.perf_counter() - t0
            pred = out["colors"].float().clamp(0, 1).reshape(H, W, 3).cpu()
            truth = v["rgb"].float()
            mse = mse_of(pred, truth, dtype=torch.float32)  # the mean in float32, as the view PSNRs always were
            psnr = psnr_from_mse(mse, 1.0, floor=1e-20, form="difference")
            s = float(np.mean([ssim(pred[..., k].double(), truth[..., k].double()) for k in range(3)])) \
                if min(H, W) >= 11 else float("nan")
            rows.append(dict(view=i, psnr=psnr, ssim=s, mse=mse, render_s=render_s, n_samples=int(out["n_samples"]),
                             bake_s=bake_s, params=params))
            if out_dir is not None and tc.save_png:
                img = Image.fromarray((pred.numpy() * 255 + 0.5).astype(np.uint8))
                atomic_write(os.path.join(out_dir, f"view_{i:03d}_pred.png"), lambda f: img.save(f, format="PNG"))
                err = ((pred - truth).abs().mean(-1) * tc.error_gain).clamp(0, 1).numpy()
                img = Image.fromarray((err * 255 + 0.5).astype(np.uint8))
                atomic_write(os.path.join(out_dir, f"view_{i:03d}_error.png"), lambda f: img.save(f, format="PNG"))
            info("view %d/%d: PSNR %.3f dB, SSIM %.4f, %.3f s", i + 1, n_views, psnr, s, render_s)
        mean = dict(view="mean", psnr=float(np.mean([r["psnr"] for r in rows])),
                    ssim=float(np.mean([r["ssim"] for r in rows])), mse=float(np.mean([r["mse"] for r in rows])),
                    render_s=float(np.mean([r["render_s"] for r in rows])),
                    n_samples=float(np.mean([r["n_samples"] for r in rows])), bake_s=bake_s, params=params)
        return rows + [mean]

    @classmethod
    def score(cls, ctx: EvalContext) -> Scores:
        """Score a trained NeRF run: :meth:`evaluate_model` with the occupancy grid saved with the weights scored
        (util.checkpoints.load_task_state), or, for a run without one, a grid rebuilt from the trained density
        (a warning says so); ``metrics.csv`` (rows per view and ``mean``) and PNGs; see the module docstring."""
        from util.build import build_task
        from util.checkpoints import load_task_state

        model, tc = ctx.model, ctx.test_config
        task = build_task(ctx.exp, ctx.dataset())
        state = load_task_state(ctx.run_dir, ctx.weights_path)
        if state is not None and GRID_STATE_KEY in state:
            task.load_state_dict(state)
        else:
            log.warning("'%s': no saved occupancy grid found; rebuilding it from the trained density", ctx.run_dir)
            model.to(ctx.device)
            task.rebuild_grid(model, int(tc.rebuild_updates))
        rows = task.evaluate_model(model, tc, ctx.out_dir, ctx.device, ctx.progress)
        return Scores(rows, {"metrics.csv": CsvFile(rows, NERF_FIELDS)})

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        mean = [r for r in rows if r.get("view") == "mean"]
        cols = ["view", "psnr", "ssim", "render_s", "n_samples", "bake_s", "params"]
        return text_table([cols] + [[(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")))
                                     for c in cols] for r in mean])
