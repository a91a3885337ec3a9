"""The terrain task (``task: {type: terrain}``): amortized INRs of DEM tiles (spec huvr 1-5).

Training: a batch is B normalized tiles (``datasets.terrain``); the loss is the MSE of the model's
reconstruction (each method's own encoder or inner loop, then its decoder) plus the model's extra terms
(HUVR's distillation when a teacher is set). Logged terms: ``mse`` (gives the logged PSNR) and the extra terms.

Evaluation (:meth:`TerrainTask.evaluate`, :func:`benchmark`): every method is scored on the same tiles (the
split of the run's dataset config, or another source via ``test.data_path``):

- ``psnr``: per tile on the normalized tile, peak = the ground-truth tile's range (spec 3), mean over tiles; a
  constant tile (range 0) has no PSNR: it is left out of the means (PSNR, seam_dpsnr, validation), the column
  ``psnr_flat_tiles`` counts such tiles (present only when there are some), and its tiles.csv row has an empty
  ``psnr`` and a ``note`` saying why (a DEM whose every tile is constant is refused by the dataset);
- ``rmse_z_m``: RMSE in metres over every pixel of every tile (pooled; aggregation NR);
- ``rmse_grad``: RMSE (m/px) of the gradient vector vs central differences of the ground truth, on interior
  pixels (the 1-px border is excluded; NR); prediction by autodiff of the coordinate network for continuous
  decoders (Functa, HUVR+SIREN; chain rule to m/px), central differences of the raster otherwise (spec 3);
  ``rmse_lap``: the same for the Laplacian (m/px^2; 5-point stencil vs the autodiff Hessian trace);
  ``max_grad`` / ``max_lap``: the worst tile's RMSE; ``slope_mae_deg``: mean absolute slope-angle error (degrees,
  with each tile's pixel size in metres along rows and columns, ``pixel_m`` of the dataset);
- seams (patch models): ``seam_dpsnr`` = PSNR of pixels within ``seam_width`` px of an internal patch border minus
  PSNR of the other pixels (spec 7), ``seam_step_m`` / ``step_m``: RMSE (m) of the height step between adjacent
  pixels across a patch border / elsewhere, minus the ground truth's step;
- ``bpp``: 32 x payload floats / pixels (fp32 payload);
- ``enc_ms`` / ``dec_ms``: wall time per tile of encoding (Functa: its inner loop) and of decoding a payload;
- ``gflops_enc`` / ``gflops_dec`` / ``gflops_infer`` per tile and ``kflops_px_dec`` / ``kflops_px_infer`` per
  pixel, from fvcore counts times 2 (the paper's 2 FLOPs per multiply-add; fvcore counts one); Functa's infer =
  (1 + 3 inner_steps) decoder passes (forward + 2 x backward per step, then the final forward; spec 4).

Post-training quantization (``test.ptq_bits``, spec 5): the fp32 pass's payloads are quantized per dimension
(models/terrain/quant.py; scales per tile, or over the evaluated set for one-token payloads: ``test.ptq_scope``)
and decoded; rows give bits, scope, BPP uncompressed and entropy-coded, PSNR, RMSE_z, RMSE_grad, RMSE_lap and
whether the row dominates the fp32 payload in rate-distortion. ``test.quantize_decoder`` (bits) also
fake-quantizes the shared decoder's weight matrices per output row.

Files written to ``<run_dir>/eval`` (or ``out_dir``): ``metrics.csv`` (the fp32 row, with the data evaluated and
its pixel size), ``ptq.csv``, ``tiles.csv`` (per-tile PSNR / RMSE_z / gradient RMSE, for terrain-regime bins) and
``tiles.png`` (``test.figure_tiles`` tiles: truth, reconstruction, error and both slope-angle maps).

    python test.py --run RUN_DIR [RUN_DIR ...] [--test KEY=VALUE ...]   # several runs: one table
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.base import CsvFile, EvalContext, Scores, StepOutput, Task
from util.files import atomic_write
from util.metrics import psnr_from_mse
from util.tables import text_table
from util.timing import synchronize
from util.registry import ConfigError, register

__all__ = ["TerrainTask", "TerrainTestConfig", "benchmark", "tile_metrics", "seam_masks", "count_flops_terrain",
           "format_rows"]


@dataclass
class TerrainTestConfig:
    """Keys of the ``test`` section of terrain runs.

    Attributes:
        split: tiles evaluated: ``test``, ``val`` or ``train`` of the run's dataset (ignored with data_path).
        max_tiles: evaluate at most this many tiles (evenly spaced over the split; null = all).
        batch_size: tiles per encode / decode call.
        data_path: evaluate on another terrain source instead (a file, folder or named source such as
            ``mpl:jacksboro_fault_dem``; every tile of it, out of domain), tiled like the run's dataset.
        derivatives: ``auto`` (autodiff for continuous decoders, spec 3) or ``fd`` (central differences of the
            decoded raster for every method).
        seam_width: pixels on each side of an internal patch border counted as seam pixels.
        ptq_bits: payload bit widths of the post-training quantization table (empty: no table).
        ptq_scope: ``auto`` (``tile`` for payloads of several tokens per tile, ``dataset`` for one token per
            tile: Functa), ``tile`` (per-tile per-dimension scales, d x 16 side bits per tile, entropy coders fit
            per tile) or ``dataset`` (one scale per dimension over the evaluated tiles, stored once, entropy
            coders fit on the evaluated set). Per-tile scales on a one-token payload store every value as its
            own scale: lossless, and dearer than fp16.
        quantize_decoder: bits of the shared decoder's weights in the PTQ rows (null: kept in fp32).
        timing_repeats: timed passes (after one warm-up pass) of encode and decode; the median is reported.
        flops: count FLOPs with fvcore.
        encode_steps: inner-loop steps when encoding with a model fitted by gradient steps (Functa); null: the
            model's own ``inner_steps``. More steps cost more encoding time (and FLOPs) and may fit better.
        figure_tiles: tiles drawn in ``tiles.png`` (evenly spaced over the evaluated ones; 0: no figure): heights
            of the truth and the reconstruction, the error, and both slope-angle maps.
    """

    split: str = "test"
    max_tiles: Optional[int] = 64
    batch_size: int = 8
    data_path: Optional[str] = None
    derivatives: str = "auto"
    seam_width: int = 1
    ptq_bits: List[int] = field(default_factory=lambda: [16, 8, 6, 4, 2])
    ptq_scope: str = "auto"
    quantize_decoder: Optional[int] = None
    timing_repeats: int = 3
    flops: bool = True
    figure_tiles: int = 4
    encode_steps: Optional[int] = None

    def __post_init__(self):
        from util.config import check_dataclass_fields

        check_dataclass_fields(self, "test")
        for key, val, allowed in (("split", self.split, ("test", "val", "train")),
                                  ("derivatives", self.derivatives, ("auto", "fd")),
                                  ("ptq_scope", self.ptq_scope, ("auto", "tile", "dataset"))):
            if val not in allowed:
                raise ConfigError(f"test.{key} must be one of {', '.join(allowed)}; got {val!r}")
        for key, lo in (("batch_size", 1), ("seam_width", 1), ("timing_repeats", 1), ("figure_tiles", 0)):
            if getattr(self, key) < lo:
                raise ConfigError(f"test.{key} must be >= {lo}, got {getattr(self, key)}")
        if self.encode_steps is not None and self.encode_steps < 1:
            raise ConfigError(f"test.encode_steps must be null or >= 1, got {self.encode_steps}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(f"test.max_tiles must be null or >= 1, got {self.max_tiles}")
        if any(b < 2 or b > 32 for b in self.ptq_bits):
            raise ConfigError(f"test.ptq_bits must be integers in 2..32, got {self.ptq_bits}")
        if self.quantize_decoder is not None and not 2 <= self.quantize_decoder <= 16:
            raise ConfigError(f"test.quantize_decoder must be null or 2..16 bits, got {self.quantize_decoder}")


@register("task", "terrain")
class TerrainTask(Task):
    """Amortized terrain INRs: tiles -> payload -> tiles, MSE loss (plus the model's distillation terms).

    Args:
        dataset: the run's dataset (injected; a ``terrain`` dataset).
    """

    test_config = TerrainTestConfig
    has_validation = True
    model_arguments = ("spatial_dims", "tile_size")

    def __init__(self, dataset):
        super().__init__(dataset)
        if not hasattr(dataset, "tile_size") or not hasattr(dataset, "tiles"):
            raise ConfigError(f"task type 'terrain' needs a dataset of type 'terrain', got {type(dataset).__name__}")

    def model_inputs(self) -> Dict[str, int]:
        return {"spatial_dims": 2, "tile_size": int(self.dataset.tile_size)}

    @classmethod
    def model_inputs_without_data(cls, exp: Dict[str, Any]) -> Optional[Dict[str, int]]:
        return {"spatial_dims": 2, "tile_size": int((exp.get("dataset") or {}).get("tile_size", 256))}

    @property
    def output_mean(self) -> Optional[float]:
        return 0.0

    def validate(self, model, max_tiles: int = 64, batch_size: int = 16) -> Optional[Dict[str, float]]:
        """Mean normalized MSE and per-tile PSNR (peak: the tile's range) over at most ``max_tiles`` validation
        tiles (evenly spaced; the same ones every time)."""
        idx = self.dataset.split_indices("val")
        if len(idx) == 0:
            return None
        if len(idx) > max_tiles:
            idx = idx[np.linspace(0, len(idx) - 1, max_tiles).round().astype(np.int64)]
        dev = next(model.parameters()).device
        mse, psnr, peak = [], [], []
        with torch.no_grad():
            for s in range(0, len(idx), batch_size):
                t = self.dataset.tiles(idx[s:s + batch_size])["tile"].to(dev)
                e = ((model.reconstruct(t).float() - t) ** 2).mean(dim=(1, 2, 3)).double()
                mse.append(e.cpu())
                peak.append((t.amax(dim=(1, 2, 3)) - t.amin(dim=(1, 2, 3))).double().cpu())
                psnr.append(_psnr(e.cpu(), peak[-1]))
        out = {"mse": float(torch.cat(mse).mean())}
        mean, n_flat = _mean_psnr(torch.cat(psnr), torch.cat(peak))
        if mean is not None:
            out["psnr"] = mean
        if n_flat:
            out["psnr_flat_tiles"] = n_flat
        return out

    @classmethod
    def count_flops(cls, model, inputs: Dict[str, Any], n_cond: int = 100, n_points: int = 1000) -> Dict[str, Any]:
        """Per pixel of a tile, encode + decode (Functa: with its inner loop), in multiply-adds (the evaluation's
        GFLOPs columns count 2 per multiply-add, as the paper)."""
        T = int(inputs["tile_size"])
        model.eval()
        fl = count_flops_terrain(model, T)
        per_px = fl["infer"] * 1e9 / 2.0 / (T * T)
        return {"tflops_per_1e9_points": per_px * 1e9 / 1e12,
                "params": sum(p.numel() for p in model.parameters() if p.requires_grad), "uncounted": []}

    def training_step(self, model, batch: Dict[str, Tensor], step: int) -> Optional[StepOutput]:
        tiles = batch["tile"]
        recon, extra = model(tiles=tiles)  # through the (DDP) wrapper: gradients synchronized across processes
        mse = F.mse_loss(recon.float(), tiles.float())
        loss = mse
        terms = {"mse": mse.detach()}
        for k, v in extra.items():
            loss = loss + v.float()
            terms[k] = v.detach()
        return StepOutput(loss, terms, recon)

    # --------------------------------------------------------------------------------------- evaluation
    @classmethod
    def result_files(cls, test_config) -> List[str]:
        return ["metrics.csv", "ptq.csv", "tiles.csv", "tiles.png"]

    @classmethod
    def score(cls, ctx: EvalContext) -> Scores:
        """:func:`benchmark` of the run's model on its data (or ``test.data_path``); ``tiles.png`` written here;
        rows: the fp32 row then the quantization rows; files ``metrics.csv``, ``ptq.csv``, ``tiles.csv``."""
        model, exp, tc, run_dir, dev = ctx.model, ctx.exp, ctx.test_config, ctx.run_dir, ctx.device
        if tc.data_path is not None:
            # the other source's own pixel size and nodata value, not the training data's
            ds_cfg = {k: v for k, v in exp["dataset"].items()
                      if k not in ("type", "path", "split_by", "gsd", "nodata")}
            from datasets.terrain import TerrainDataset
            from util.errors import DataError

            try:
                dataset = TerrainDataset(path=tc.data_path, split_by="none", **ds_cfg)
            except DataError as e:  # the source is the test section's, not the run's dataset.path
                raise DataError(str(e).replace(f"dataset.path '{tc.data_path}'", f"test.data_path '{tc.data_path}'")
                                ) from None
            split, label = "test", tc.data_path
        else:
            dataset = ctx.dataset()
            split, label = tc.split, f"{exp['dataset'].get('path', '')}:{tc.split}"
        name = os.path.basename(os.path.normpath(run_dir))  # the run directory: unique even with train.run_name
        res = benchmark(model.to(dev), dataset, tc, split=split, device=dev, name=name)
        res["row"]["data"] = label
        sizes = np.unique(dataset.pixel_m[dataset.region_of_tile[[r["index"] for r in res["tiles"]]]], axis=0)
        res["row"]["pixel_m"] = "; ".join(f"{a:.4g} x {b:.4g}" for a, b in sizes)  # rows x columns, metres
        if tc.figure_tiles:
            rows = res["tiles"]
            pick = np.linspace(0, len(rows) - 1, min(tc.figure_tiles, len(rows))).round().astype(np.int64)
            write_tile_figure(ctx.path("tiles.png"), model, dataset, np.array([rows[k]["index"] for k in pick]), dev,
                              f"{name} on {label}", tc)
        return Scores([res["row"]] + res["ptq"], {"metrics.csv": CsvFile([res["row"]]), "ptq.csv": CsvFile(res["ptq"]),
                                                  "tiles.csv": CsvFile(res["tiles"])})

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        """The fp32 rows (one per run), then the quantization rows."""
        fp = [r for r in rows if "floats" in r]
        q = [r for r in rows if "floats" not in r]
        return format_rows(fp) + ("\n\npost-training quantization of the payload:\n" + format_rows(q) if q else "")


# ---------------------------------------------------------------------------------------------- metrics
def seam_masks(T: int, p: int, w: int, device=None):
    """(seam pixel mask (T, T), seam column-step mask (T, T-1)): pixels within w of an internal patch border,
    and the horizontal steps (j -> j+1) that cross a border (the vertical ones are the transpose)."""
    i = torch.arange(T, device=device)
    near = torch.zeros(T, dtype=torch.bool, device=device)
    for k in range(1, T // p):
        near |= (i >= k * p - w) & (i <= k * p + w - 1)
    pix = near[:, None] | near[None, :]
    j = torch.arange(T - 1, device=device)
    cross = ((j + 1) % p == 0)[None, :].expand(T, -1)
    return pix, cross


def _psnr(mse: Tensor, peak: Tensor) -> Tensor:
    """Per-tile PSNR ``10 log10(peak^2 / max(mse, 1e-20))`` in the MSE's dtype (util.metrics.psnr_from_mse)."""
    return psnr_from_mse(mse, peak, floor=1e-20, float64=False)


def _autodiff_derivatives(model, z: Tensor, T: int) -> tuple:
    """Gradient (d/drow, d/dcol) and Laplacian of the normalized output on interior pixels, per pixel units."""
    from models.terrain.common import pixel_coords

    B = z.shape[0]
    x = pixel_coords(T, device=z.device).reshape(T, T, 2)[1:-1, 1:-1].reshape(1, -1, 2).expand(B, -1, -1)
    x = x.clone().requires_grad_(True)
    k = 2.0 / (T - 1)  # d(coordinate)/d(pixel)
    with torch.enable_grad():
        y = model.decode_points(z.detach(), x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        lap = 0.0
        for a in range(2):
            (h,) = torch.autograd.grad(g[..., a].sum(), x, retain_graph=True)
            lap = lap + h[..., a]
    shape = (B, T - 2, T - 2)
    return ((g[..., 1] * k).reshape(shape).detach(), (g[..., 0] * k).reshape(shape).detach(),
            (lap * k * k).reshape(shape).detach())


def tile_metrics(pred_n: Tensor, gt: Dict[str, Tensor], gsd, patch: Optional[int], seam_width: int,
                 deriv_n: Optional[tuple] = None) -> Dict[str, Tensor]:
    """Per-tile metrics of normalized predictions (B, 1, T, T) against the ground truth dict of dataset.tiles().

    ``gsd``: metres per pixel for slope angles: None (the tiles' own ``gt["pixel_m"]``, per tile and axis), a
    number or a (row, column) pair.
    ``deriv_n``: autodiff (d/drow, d/dcol, Laplacian) of the normalized prediction on interior pixels (per pixel
    units); None: central differences of the prediction.

    Returns per-tile (B,) float64 tensors: mse_n, peak_n, mse_m, grad_se (mean squared gradient error, m/px),
    lap_se, slope_ae (mean absolute slope-angle error, degrees) and, with ``patch``, seam / interior mse_n and
    seam / other step squared errors (m).
    """
    from datasets.terrain import central_gradient, laplacian_5pt, pixel_pair, slope_angle

    t_n = gt["tile"][:, 0].double().to(pred_n.device)
    p_n = pred_n[:, 0].double()
    mu = gt["mu"].double().to(pred_n.device)[:, None, None]
    sd = gt["sigma"].double().to(pred_n.device)[:, None, None]
    t_m, p_m = t_n * sd + mu, p_n * sd + mu
    out = {"mse_n": ((p_n - t_n) ** 2).mean(dim=(1, 2)), "peak_n": t_n.amax(dim=(1, 2)) - t_n.amin(dim=(1, 2)),
           "mse_m": ((p_m - t_m) ** 2).mean(dim=(1, 2))}
    gr, gc = central_gradient(t_m)
    lt = laplacian_5pt(t_m)
    if deriv_n is None:
        pr, pc = central_gradient(p_m)
        lp = laplacian_5pt(p_m)
    else:
        pr, pc, lp = (d.double() * sd for d in deriv_n)
    out["grad_se"] = ((pr - gr) ** 2 + (pc - gc) ** 2).mean(dim=(1, 2))
    out["lap_se"] = ((lp - lt) ** 2).mean(dim=(1, 2))
    if gsd is None:
        px = gt["pixel_m"].double().to(pred_n.device)
        s_r, s_c = px[:, 0, None, None], px[:, 1, None, None]
    else:
        s_r, s_c = pixel_pair(gsd)
    out["slope_ae"] = (slope_angle(pr, pc, s_r, s_c) - slope_angle(gr, gc, s_r, s_c)).abs().mean(dim=(1, 2))
    if patch is not None and t_n.shape[-1] // patch >= 2:
        pix, cross = seam_masks(t_n.shape[-1], patch, seam_width, device=pred_n.device)
        se = (p_n - t_n) ** 2
        out["seam_mse_n"] = se[:, pix].mean(dim=1)
        out["inner_mse_n"] = se[:, ~pix].mean(dim=1)
        dstep_c = (p_m[..., 1:] - p_m[..., :-1]) - (t_m[..., 1:] - t_m[..., :-1])  # (B, T, T-1)
        dstep_r = ((p_m[..., 1:, :] - p_m[..., :-1, :]) - (t_m[..., 1:, :] - t_m[..., :-1, :])).transpose(1, 2)
        st = torch.cat([dstep_c, dstep_r], dim=1) ** 2
        cr = torch.cat([cross, cross], dim=0)
        out["seam_step_se"] = st[:, cr].mean(dim=1)
        out["step_se"] = st[:, ~cr].mean(dim=1)
    return out


@torch.no_grad()
def write_tile_figure(path: str, model, dataset, idx: np.ndarray, dev, title: str = "",
                      tc: Optional[TerrainTestConfig] = None) -> None:
    """PNG of tiles ``idx``: truth and reconstruction heights (m, one colour range per tile), absolute error (m),
    and the slope angle (degrees) of both, with each tile's pixel size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from datasets.terrain import slope_degrees

    gt = dataset.tiles(idx)
    pred_n = model.decode(_encode(model, gt["tile"].to(dev), tc))[:, 0].double().cpu()
    sd, mu = gt["sigma"][:, None, None], gt["mu"][:, None, None]
    truth, pred = gt["metres"].numpy(), (pred_n * sd + mu).numpy()
    cols = ("truth (m)", "reconstruction (m)", "|error| (m)", "slope, truth (deg)", "slope, reconstruction (deg)")
    fig = Figure(figsize=(3.0 * len(cols), 2.7 * len(idx) + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(idx), len(cols), squeeze=False)
    for r, i in enumerate(idx):
        px = gt["pixel_m"][r].tolist()
        s_t, s_p = slope_degrees(truth[r], px), slope_degrees(pred[r], px)
        lo, hi = float(truth[r].min()), float(truth[r].max())
        smax = float(max(s_t.max(), s_p.max()))
        psnr = float(_psnr(torch.tensor(((pred_n[r] - gt["tile"][r, 0].double()) ** 2).mean().item()),
                           torch.tensor(float(gt["tile"][r].max() - gt["tile"][r].min()))))
        panels = ((truth[r], "terrain", lo, hi), (pred[r], "terrain", lo, hi),
                  (np.abs(pred[r] - truth[r]), "magma", 0.0, None), (s_t, "viridis", 0.0, smax),
                  (s_p, "viridis", 0.0, smax))
        for c, (img, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        region = dataset.region_names[int(dataset.region_of_tile[i])]
        quality = f"{psnr:.2f} dB" if hi > lo else "constant tile: no PSNR"
        axes[r, 0].set_ylabel(f"tile {int(i)} ({region})\n{quality}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))


def _encode(model, tiles: Tensor, tc: Optional[TerrainTestConfig]) -> Tensor:
    """model.encode, with ``tc.encode_steps`` inner-loop steps for inner-loop encoders."""
    if tc is not None and tc.encode_steps is not None and model.inner_loop:
        return model.encode(tiles, steps=tc.encode_steps)
    return model.encode(tiles)


def count_flops_terrain(model, tile_size: int, device=None, steps: Optional[int] = None) -> Dict[str, float]:
    """fvcore multiply-add counts x 2 (GFLOPs per tile) of encode, hypernetwork decode, coordinate decode, infer
    (``steps``: inner-loop steps of an inner-loop encoder; default its own)."""
    from util.flops import _quiet_fvcore

    with _quiet_fvcore():
        from fvcore.nn import FlopCountAnalysis

    def count(mod, inp) -> float:
        fca = FlopCountAnalysis(mod, (inp,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with _quiet_fvcore():
            return 2.0 * float(fca.total())

    dev = device or next(model.parameters()).device
    tiles = torch.zeros(1, 1, tile_size, tile_size, device=dev)
    model.eval()
    model.set_sdpa(False)
    try:
        with torch.no_grad():
            z = model.encode(tiles) if not model.inner_loop else torch.zeros(1, *model.payload_shape, device=dev)
            mods = model.flop_modules()
            out = {"enc": 0.0, "dec": 0.0, "neudec": 0.0}
            if "enc" in mods:
                out["enc"] = count(mods["enc"], tiles)
            if "dec" in mods:
                out["dec"] = count(mods["dec"], z)
                out["neudec"] = count(mods["neudec"], model.hyper_decode(z))
            else:
                out["neudec"] = count(mods["neudec"], z)
    finally:
        model.set_sdpa(True)
    if model.inner_loop:  # forward + 2 x backward of the decoder per step
        inner = 3.0 * (int(steps) if steps is not None else model.inner_steps) * out["neudec"]
    else:
        inner = 0.0
    out["infer"] = out["enc"] + out["dec"] + out["neudec"] + inner
    return {k: v / 1e9 for k, v in out.items()}


def _decoder_modules(model) -> List[torch.nn.Module]:
    """The shared decoder: every child module except the encoder parts."""
    skip = {"encoder", "bottleneck", "embed", "blocks", "norm", "head_enc"}
    return [m for n, m in model.named_children() if n not in skip]


@torch.no_grad()
def _run(model, dataset, idx: np.ndarray, tc: TerrainTestConfig, dev, payloads: Optional[Tensor] = None,
         timing: bool = False):
    """Encode / decode / score tiles in batches -> (per-tile metrics, (encode s, decode s) per tile, payloads).

    ``payloads``: (len(idx), n, d) payloads to decode instead of encoding the tiles (the quantized rows);
    returned: the payloads decoded, (len(idx), n, d) on the CPU.
    """
    patch = getattr(model, "patch_size", None)
    use_ad = tc.derivatives == "auto" and getattr(model, "continuous", False)
    per: Dict[str, List[Tensor]] = {}
    enc_t, dec_t, zs = [], [], []
    for s in range(0, len(idx), tc.batch_size):
        gt = dataset.tiles(idx[s:s + tc.batch_size])
        tiles = gt["tile"].to(dev)
        if payloads is not None:
            z = payloads[s:s + tc.batch_size].to(dev)
            pred = model.decode(z)
        elif timing:
            reps_e, reps_d = [], []
            for r in range(tc.timing_repeats + 1):
                synchronize(dev)
                t0 = time.perf_counter()
                z = _encode(model, tiles, tc)
                synchronize(dev)
                t1 = time.perf_counter()
                pred = model.decode(z)
                synchronize(dev)
                t2 = time.perf_counter()
                if r > 0 or tc.timing_repeats == 0:
                    reps_e.append((t1 - t0) / len(tiles))
                    reps_d.append((t2 - t1) / len(tiles))
            enc_t.append(float(np.median(reps_e)))
            dec_t.append(float(np.median(reps_d)))
        else:
            z = _encode(model, tiles, tc)
            pred = model.decode(z)
        zs.append(z.detach().float().cpu())
        deriv = _autodiff_derivatives(model, z, dataset.tile_size) if use_ad else None
        m = tile_metrics(pred, gt, None, patch, tc.seam_width, deriv)
        for k, v in m.items():
            per.setdefault(k, []).append(v.cpu())
    per_t = {k: torch.cat(v) for k, v in per.items()}
    return per_t, (float(np.mean(enc_t)) if enc_t else None, float(np.mean(dec_t)) if dec_t else None), torch.cat(zs)


def _mean_psnr(psnr: Tensor, peak: Tensor) -> tuple:
    """(mean of the per-tile PSNRs over the tiles whose range is > 0, number of constant tiles left out).

    A constant tile has no PSNR (its peak, the tile's range, is 0: the ratio is -inf or nan), so it is left out
    and counted instead; the mean is None when every tile is constant. Without constant tiles: the plain mean."""
    flat = ~(peak > 0)
    if not bool(flat.any()):
        return float(psnr.mean()), 0
    keep = ~flat
    return (float(psnr[keep].mean()) if bool(keep.any()) else None), int(flat.sum())


def _summary(per: Dict[str, Tensor]) -> Dict[str, float]:
    psnr, n_flat = _mean_psnr(_psnr(per["mse_n"], per["peak_n"]), per["peak_n"])
    out = {"psnr": psnr,
           "rmse_z_m": math.sqrt(float(per["mse_m"].mean())),
           "rmse_grad": math.sqrt(float(per["grad_se"].mean())),
           "rmse_lap": math.sqrt(float(per["lap_se"].mean())),
           "max_grad": float(per["grad_se"].sqrt().max()), "max_lap": float(per["lap_se"].sqrt().max()),
           "slope_mae_deg": float(per["slope_ae"].mean())}
    if "seam_mse_n" in per:
        out["seam_dpsnr"] = _mean_psnr(_psnr(per["seam_mse_n"], per["peak_n"]) - _psnr(per["inner_mse_n"],
                                                                                       per["peak_n"]),
                                       per["peak_n"])[0]
        out["seam_step_m"] = math.sqrt(float(per["seam_step_se"].mean()))
        out["step_m"] = math.sqrt(float(per["step_se"].mean()))
    if n_flat:  # the reason for a PSNR over fewer tiles (or none): constant tiles have no PSNR
        out["psnr_flat_tiles"] = n_flat
    return out


def benchmark(model, dataset, tc: Optional[TerrainTestConfig] = None, split: str = "test", device=None,
              name: str = "") -> Dict[str, Any]:
    """Score one model on a terrain dataset's split (see the module docstring).

    Returns:
        {"row": fp32 summary row, "ptq": [one row per payload bit width], "tiles": [per-tile rows]}.
    """
    tc = tc or TerrainTestConfig()
    if tc.encode_steps is not None and not model.inner_loop:
        raise ConfigError(f"test.encode_steps applies to models that encode by inner-loop gradient steps (Functa); "
                          f"{type(model).__name__} encodes in one forward pass")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    idx = dataset.split_indices(split)
    if len(idx) == 0:
        raise ValueError(f"the {split} split of {dataset!r} holds no tiles")
    if tc.max_tiles is not None and len(idx) > tc.max_tiles:
        idx = idx[np.linspace(0, len(idx) - 1, tc.max_tiles).round().astype(np.int64)]
    T = dataset.tile_size
    px = T * T
    per, (enc_s, dec_s), z_all = _run(model, dataset, idx, tc, dev, timing=True)
    row: Dict[str, Any] = {"method": name or type(model).__name__, "model": type(model).__name__, "bits": 32,
                           "tiles": int(len(idx)), "floats": model.payload_floats,
                           "bpp": 32.0 * model.payload_floats / px, **_summary(per),
                           "enc_ms": 1e3 * enc_s, "dec_ms": 1e3 * dec_s,
                           "derivatives": "autodiff" if tc.derivatives == "auto" and model.continuous else "fd"}
    if model.inner_loop:
        row["encode_steps"] = int(tc.encode_steps if tc.encode_steps is not None else model.inner_steps)
    if tc.flops:
        fl = count_flops_terrain(model, T, dev, tc.encode_steps)
        row.update({"gflops_enc": fl["enc"], "gflops_dec": fl["dec"] + fl["neudec"], "gflops_infer": fl["infer"],
                    "kflops_px_dec": 1e6 * (fl["dec"] + fl["neudec"]) / px, "kflops_px_infer": 1e6 * fl["infer"] / px})
    tiles_rows = [{"index": int(i), "region": dataset.region_names[int(dataset.region_of_tile[i])],
                   # a constant tile (range 0) has no PSNR: an empty cell, and its ``note`` says why
                   "psnr": float(_psnr(per["mse_n"][k], per["peak_n"][k])) if per["peak_n"][k] > 0 else None,
                   "rmse_z_m": math.sqrt(float(per["mse_m"][k])), "rmse_grad": math.sqrt(float(per["grad_se"][k]))}
                  for k, i in enumerate(idx)]
    for r in tiles_rows:
        if r["psnr"] is None:
            r["note"] = "constant tile (range 0): no PSNR"
    ptq_rows = []
    if tc.ptq_bits:
        from models.terrain.quant import default_scope, entropy_bits, quantize_payload, quantize_weights_

        qmodel = model
        if tc.quantize_decoder is not None:
            qmodel = copy.deepcopy(model)
            for m in _decoder_modules(qmodel):
                quantize_weights_(m, tc.quantize_decoder)
        # the fp32 pass's payloads, quantized over every evaluated tile at once (so ``dataset`` scales and coders
        # are those of the whole set, not of one batch); encoders are deterministic, so nothing is re-encoded
        scope = default_scope(z_all.shape[1]) if tc.ptq_scope == "auto" else tc.ptq_scope
        for bits in tc.ptq_bits:
            zq, q, _, side = quantize_payload(z_all, bits, scope)
            code = entropy_bits(q, scope)
            per_q, _, _ = _run(qmodel, dataset, idx, tc, dev, payloads=zq)
            s = _summary(per_q)
            n_vals = model.payload_floats
            bpp_u = (n_vals * bits + side) / px
            bpp_e = float((code + side).mean()) / px
            ptq_rows.append({"method": row["method"], "model": row["model"], "bits": bits, "scope": scope,
                             "decoder_bits": tc.quantize_decoder or 32, "bpp": bpp_u, "bpp_ent": bpp_e,
                             "psnr": s["psnr"], "rmse_z_m": s["rmse_z_m"], "rmse_grad": s["rmse_grad"],
                             "rmse_lap": s["rmse_lap"],
                             "dominates_fp32": bool(s["psnr"] is not None and row["psnr"] is not None
                                                    and bpp_e <= row["bpp"] and s["psnr"] >= row["psnr"]
                                                    and (bpp_e < row["bpp"] or s["psnr"] > row["psnr"]))})
            if "psnr_flat_tiles" in s:
                ptq_rows[-1]["psnr_flat_tiles"] = s["psnr_flat_tiles"]
    return {"row": row, "ptq": ptq_rows, "tiles": tiles_rows}


_COLS = [("method", "{}"), ("bits", "{}"), ("scope", "{}"), ("floats", "{}"), ("encode_steps", "{}"), ("bpp", "{:.3f}"), ("bpp_ent", "{:.3f}"),
         ("psnr", "{:.2f}"), ("psnr_flat_tiles", "{}"), ("rmse_z_m", "{:.3f}"), ("rmse_grad", "{:.4f}"), ("rmse_lap", "{:.4f}"),
         ("slope_mae_deg", "{:.2f}"), ("seam_dpsnr", "{:+.2f}"), ("seam_step_m", "{:.3f}"), ("step_m", "{:.3f}"),
         ("enc_ms", "{:.2f}"), ("dec_ms", "{:.2f}"), ("kflops_px_dec", "{:.1f}"), ("kflops_px_infer", "{:.1f}")]


def format_rows(rows: List[Dict[str, Any]]) -> str:
    """Plain-text table of benchmark rows (columns present in any row; '-' where a row lacks one)."""
    cols = [(k, f) for k, f in _COLS if any(k in r for r in rows)]
    cells = [[k for k, _ in cols]] + [[f.format(r[k]) if r.get(k) is not None else "-" for k, f in cols]
                                      for r in rows]
    return text_table(cells, align="right")
