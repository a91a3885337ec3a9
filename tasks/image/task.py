"""The image task: one picture as a single field f(x) -> RGB (or gray) values (spec vision 1), and its evaluation.

Training is the base task's: batches ``x (1, N, 2)``, ``c (1, 0)``, ``v (1, N, C)`` from
``datasets.image.ImageDataset`` (N random pixels, VP-S), MSE loss. Evaluation (``test.py`` through
:meth:`ImageTask.evaluate`, options in the ``test`` section, :class:`ImageTestConfig`):

1. the run's model is loaded (``util.build.load_trained_model``), baked (``model.bake()``) and run at every pixel of
   the full-resolution image in chunks (``model(x, c)`` with ``c`` of shape (1, 0)); with ``dataset.downsample
   > 1`` (spec 1.5) that is the resolution the model never saw (``resolutions: [full, train]`` also scores the
   training resolution);
2. ``tasks.image.evaluation.evaluate_image`` scores it: PSNR over the whole image, SSIM on true image tiles (default)
   and/or the reference's raster-chunk protocol (spec 1.4), LPIPS-VGG only when its weights are on this machine
   (one log line otherwise), the reference's chunk-averaged PSNR beside ours; inference time = bake + the
   forward calls of all chunks;
3. ``<out_dir>/metrics.csv`` (columns :data:`IMAGE_FIELDS`, one row per resolution) and, with ``save_png``,
   ``<out_dir>/<resolution>_pred.png`` (the prediction, 8 bit) and ``<resolution>_error.png`` (|pred - truth|
   averaged over channels, times ``error_gain``, as a colormap) are written; existing results are not replaced
   without ``overwrite``.

Rows (and metrics.csv columns): ``predictor`` (model), ``split`` (image), ``resolution`` (full / train),
``height``, ``width``, ``channels``, ``psnr`` (whole image, normalized values, data range 1), ``ssim`` (tile
protocol; empty unless requested), ``lpips`` (tiles; empty when unavailable), ``mse``, ``psnr_chunked``
(the reference's mean-over-chunks MSE), ``ssim_raster``, ``lpips_raster`` (the reference's raster chunks),
``ssim_protocol``, ``ssim_tile``, ``bake_s``, ``forward_s``, ``infer_s`` (= bake_s + forward_s),
``points_per_s``, ``chunk_size``, ``params`` (trainable parameters), ``weights``, ``step``, ``total_steps`` (as
tasks/ensemble/evaluation.py: which weights were scored).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from tasks.base import CsvFile, EvalContext, Scores, Task
from util.config import check_dataclass_fields
from util.device import default_device
from util.tables import fmt_cell, text_table
from util.registry import ConfigError, register

log = logging.getLogger("test")

__all__ = ["ImageTask", "ImageTestConfig", "IMAGE_FIELDS", "evaluate_model", "format_table",
           "image_channels_from_header"]

IMAGE_FIELDS = ["predictor", "split", "resolution", "height", "width", "channels", "psnr", "ssim", "lpips", "mse",
                "psnr_chunked", "ssim_raster", "lpips_raster", "ssim_protocol", "ssim_tile", "bake_s", "forward_s",
                "infer_s", "points_per_s", "chunk_size", "params", "weights", "step", "total_steps"]
"""Columns of an image run's metrics.csv."""
METRICS_FILE = "metrics.csv"

SSIM_PROTOCOLS = ("tiles", "raster", "both")
COLORMAPS = ("hot", "gray")
RESOLUTIONS = ("full", "train")
#: default points per forward chunk: the reference's eval_batch_size on CUDA, smaller on CPU (activations of a
#: 128-wide decoder: chunk x 128 x 4 bytes per layer)
CUDA_CHUNK = 1 << 21
CPU_CHUNK = 1 << 18


@dataclass
class ImageTestConfig:
    """Keys of the ``test`` section of an image run (task ``image``).

    Attributes:
        chunk_size: points per forward call when reconstructing the image; null: 2097152 on CUDA (the
            reference's eval_batch_size) and 262144 on CPU.
        resolutions: "full" (the original image; the only one the reference scores) and/or "train" (the
            training image: differs from full only with dataset.downsample > 1).
        ssim_protocol: "tiles" (SSIM on true image tiles of at most ssim_tile x ssim_tile pixels, mean over
            tiles), "raster" (the reference's protocol, spec 1.4: consecutive row-major chunks of reference_chunk
            pixels re-wrapped to a window of the image's aspect ratio; to compare with the paper's numbers) or
            "both". LPIPS follows the same choice.
        ssim_tile: largest tile side of the tile protocol (tiles are near-equal, >= 11 pixels so the 11 x 11
            SSIM window fits).
        reference_chunk: pixels per chunk of the reference's chunk-averaged MSE (column psnr_chunked) and area of
            its raster SSIM/LPIPS window (2097152 in the reference).
        lpips: compute LPIPS-VGG when the lpips package and its VGG weights are on this machine (nothing is
            downloaded; otherwise the column is empty and one log line says why).
        raw_targets: score against the un-normalized image (uint8 / 255, the reference's super-resolution
            targets, spec 1.5) instead of the image normalized with the training min/max.
        save_png: write <resolution>_pred.png and <resolution>_error.png into the output folder.
        error_gain: the error image shows min(1, gain x abs(pred - truth)) (mean over channels): 10 makes an error
            of 0.1 of the value range full scale.
        error_colormap: "hot" (black-red-yellow-white, RGB PNG) or "gray".
    """

    chunk_size: Optional[int] = None
    resolutions: List[str] = field(default_factory=lambda: ["full"])
    ssim_protocol: str = "tiles"
    ssim_tile: int = 512
    reference_chunk: int = 2097152
    lpips: bool = True
    raw_targets: bool = False
    save_png: bool = True
    error_gain: float = 10.0
    error_colormap: str = "hot"

    def __post_init__(self):
        check_dataclass_fields(self, "test")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ConfigError(f"test.chunk_size must be >= 1 or null (auto), got {self.chunk_size}")
        for r in self.resolutions:
            if r not in RESOLUTIONS:
                raise ConfigError(f"test.resolutions: unknown resolution '{r}', expected 'full' and/or 'train'")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ConfigError(f"test.resolutions lists a resolution twice: {self.resolutions}")
        if self.raw_targets and "train" in self.resolutions:
            raise ConfigError("test.raw_targets applies to the full-resolution image only; remove 'train' from "
                              "test.resolutions or set test.raw_targets: false")
        if self.ssim_protocol not in SSIM_PROTOCOLS:
            raise ConfigError(f"test.ssim_protocol must be one of {', '.join(SSIM_PROTOCOLS)}, "
                              f"got {self.ssim_protocol!r}")
        if int(self.ssim_tile) < 11:
            raise ConfigError(f"test.ssim_tile must be >= 11 (the SSIM window is 11 x 11), got {self.ssim_tile}")
        if int(self.reference_chunk) < 1:
            raise ConfigError(f"test.reference_chunk must be >= 1, got {self.reference_chunk}")
        if not (self.error_gain > 0 and math.isfinite(self.error_gain)):
            raise ConfigError(f"test.error_gain must be a finite number > 0, got {self.error_gain}")
        if self.error_colormap not in COLORMAPS:
            raise ConfigError(f"test.error_colormap must be one of {', '.join(COLORMAPS)}, "
                              f"got {self.error_colormap!r}")



def image_channels_from_header(path: str) -> Optional[int]:
    """Channels the image dataset will use for ``path`` (1 or 3; RGBA and palette images give 3), read from the
    file header only (.npy shape, Pillow's mode without decoding); None when the file is missing or unreadable."""
    try:
        if str(path).lower().endswith(".npy"):
            shape = np.load(path, mmap_mode="r").shape
            return 1 if len(shape) == 2 else (3 if shape[-1] in (3, 4) else int(shape[-1]))
        from PIL import Image

        with Image.open(path) as im:
            mode = im.mode
    except Exception:  # noqa: BLE001 - any failure: the data decides later
        return None
    if mode in ("1", "L", "I", "F") or mode.startswith("I;"):
        return 1
    if mode in ("LA", "La", "PA"):
        return 2 if mode != "PA" else 3
    return 3


class _TrainResolution:
    """The training image of an ImageDataset seen through the ``image_shape`` / ``rows`` interface."""

    def __init__(self, dataset):
        self.image_shape = tuple(int(s) for s in dataset.train_shape)
        self.rows = dataset.train_rows


def evaluate_model(model, dataset, test_config: Optional[ImageTestConfig] = None, out_dir: Optional[str] = None,
                   device=None, autocast: Optional[bool] = None, progress: bool = True) -> List[Dict[str, Any]]:
    """Score a model on an image dataset (no run directory needed; :meth:`ImageTask.evaluate` calls it).

    Per resolution of ``test_config.resolutions``: unbake, then ``tasks.image.evaluation.evaluate_image`` with
    ``model.bake`` as the timed bake and ``model(x, c)`` (``c`` of shape (1, 0)) on the pixel coordinates of that
    resolution; PNGs into ``out_dir`` when given and ``save_png``. SSIM and LPIPS run on the model's device (float64
    SSIM; on CPU about 0.1-0.3 s per 512 x 512 tile and channel on 2 cores).

    Args:
        model: a ``models.base.FieldModel`` with cond_dim 0 and out_dim = the image's channels.
        dataset: ``datasets.image.ImageDataset`` (full-resolution rows via ``rows``, training rows via
            ``train_rows``).
        test_config: the options (default ``ImageTestConfig()``).
        out_dir: folder of the PNGs (None: no PNGs).
        device: where the model runs (default: CUDA when available, else CPU).
        autocast: fp16 autocast around the forward calls (default: on CUDA only).
        progress: log a line before and after each resolution (else at debug level).

    Returns:
        One row per resolution with the :data:`IMAGE_FIELDS` metrics (no weights columns) plus ``pred_png`` and
        ``error_png`` (paths or None).
    """
    from tasks.image.evaluation import evaluate_image, lpips_status

    tc = test_config or ImageTestConfig()
    device = default_device(device)
    autocast = (device.type == "cuda") if autocast is None else bool(autocast)
    if autocast and device.type != "cuda":
        raise ValueError("fp16 autocast for the image evaluation needs a CUDA device (fp32 on CPU)")
    chunk = int(tc.chunk_size) if tc.chunk_size is not None else (CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK)
    info = log.info if progress else log.debug
    use_lpips = tc.lpips
    if use_lpips:
        ok, why = lpips_status()
        if not ok:
            log.info("%s", why)
            use_lpips = False
    model.to(device)
    model.eval()
    c_empty = torch.zeros(1, 0, device=device)
    params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    rows = []
    for res in tc.resolutions:
        truth = dataset if res == "full" else _TrainResolution(dataset)
        H, W = truth.image_shape
        info("image evaluation at %s resolution (%d x %d), chunks of %d points, SSIM protocol %s", res, H, W,
                 chunk, tc.ssim_protocol)
        model.unbake()  # every resolution's inference time includes its bake
        r = evaluate_image(lambda x: model(x, c_empty), truth, chunk_size=chunk, device=device, autocast=autocast,
                           bake=model.bake, protocol=tc.ssim_protocol, tile=int(tc.ssim_tile),
                           mse_chunk=int(tc.reference_chunk), raster_chunk=int(tc.reference_chunk),
                           lpips=use_lpips, raw_truth=tc.raw_targets and res == "full", metric_device=device,
                           out_dir=out_dir if tc.save_png else None, prefix=res, error_gain=tc.error_gain,
                           colormap=tc.error_colormap)
        rows.append(dict(predictor="model", split="image", resolution=res, height=r["height"], width=r["width"],
                         channels=r["channels"], psnr=r["psnr"], ssim=r["ssim"], lpips=r["lpips"], mse=r["mse"],
                         psnr_chunked=r["psnr_chunked"], ssim_raster=r["ssim_raster"],
                         lpips_raster=r["lpips_raster"], ssim_protocol=tc.ssim_protocol, ssim_tile=int(tc.ssim_tile),
                         bake_s=r["bake_s"], forward_s=r["forward_s"], infer_s=r["infer_s"],
                         points_per_s=r["points_per_s"], chunk_size=chunk, params=params,
                         pred_png=r["pred_png"], error_png=r["error_png"]))
        info("%s: PSNR %.3f dB, SSIM %s, inference %.3f s (bake %.3f s)", res, r["psnr"],
                 fmt_cell(r["ssim"] if tc.ssim_protocol != "raster" else r["ssim_raster"]), r["infer_s"], r["bake_s"])
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Plain-text table of image evaluation rows (one per resolution); a last line names the weights scored."""
    cols = ["resolution", "height", "width", "psnr", "ssim", "ssim_raster", "lpips", "psnr_chunked", "bake_s",
            "infer_s", "params"]
    table = text_table([cols] + [[fmt_cell(r.get(c)) for c in cols] for r in rows], rule=True)
    if rows and "weights" in rows[0]:
        from util.evaluation_common import weights_line

        table += "\n" + weights_line(rows[0])
    return table


@register("task", "image")
class ImageTask(Task):
    """One image as a single field (spec vision 1): x = (column, row) in [-1, 1] -> the pixel's C values.

    Training: the base task (``dataset.sample_batch``, MSE over the batch and channels); model inputs
    ``cond_dim`` 0, ``spatial_dims`` 2, ``out_dim`` = the image's channels. Evaluation: see the module docstring
    and :class:`ImageTestConfig` (the ``test`` section).

    Args:
        dataset: the run's image dataset (injected).
    """

    test_config = ImageTestConfig

    def __init__(self, dataset):
        super().__init__(dataset)
        if int(dataset.cond_dim) != 0 or not hasattr(dataset, "rows"):  # rows: an image dataset
            raise ConfigError(f"task.type 'image' needs an image dataset (dataset.type: image), got "
                              f"{type(dataset).__name__}")

    @classmethod
    def model_inputs_without_data(cls, exp: Dict[str, Any]) -> Optional[Dict[str, int]]:
        """cond_dim 0, spatial_dims 2; out_dim from the image file's header when it is here, else 3 (the paper's
        RGB images, whose gigapixel files are usually absent)."""
        path = (exp.get("dataset") or {}).get("path")
        channels = image_channels_from_header(path) if path else None
        return {"cond_dim": 0, "spatial_dims": 2, "out_dim": 3 if channels is None else int(channels)}

    @classmethod
    def result_files(cls, test_config: ImageTestConfig) -> List[str]:
        """``metrics.csv``, and with ``save_png`` the prediction and error PNGs of each resolution."""
        names = [METRICS_FILE]
        if test_config.save_png:
            names += [f"{res}_{kind}.png" for res in test_config.resolutions for kind in ("pred", "error")]
        return names

    @classmethod
    def score(cls, ctx: EvalContext) -> Scores:
        """Score a trained image run (:func:`evaluate_model` on the run's dataset; the PNGs into the output folder);
        rows: :data:`IMAGE_FIELDS` plus ``pred_png``, ``error_png``; ``metrics.csv`` holds them."""
        dataset = ctx.dataset()
        rows = evaluate_model(ctx.model, dataset, ctx.test_config, ctx.out_dir, ctx.device, ctx.autocast,
                              ctx.progress)
        return Scores(rows, {METRICS_FILE: CsvFile(rows, IMAGE_FIELDS, nan_cell="")})

    @classmethod
    def report_tables(cls, group, runs, flops: bool = False):
        """``python -m util.results``: this task's tables (tasks/image/tables.py)."""
        from tasks.image.tables import report_tables

        return report_tables(group, runs, flops)

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        return format_table(rows)
