"""The Blender synthetic (nerf_synthetic) layout: posed RGBA views of one scene -> rays and target colors.

Layout (read as it is, spec vision 3.1)::

    root/transforms_train.json   {"camera_angle_x": float, "frames": [{"file_path": "./train/r_0",
    root/transforms_test.json                                         "transform_matrix": 4 x 4 c2w}, ...]}
    root/train/r_0.png ...       RGBA (or RGB: opaque) 8-bit PNGs, all of one size

``file_path`` is relative to ``root``; ".png" is appended when it has no extension. Cameras are OpenGL c2w
(``rendering.rays``), focal = 0.5 W / tan(0.5 camera_angle_x). Colors are composited on the background
(white by default): rgb * alpha + bkgd * (1 - alpha), in [0, 1]. The dataset's near/far (2, 6) are not used
(the renderer marches from t = 0 through the scene box).

Batches (``sample_batch(step, rank, n_rays)``): ``n_rays`` rays, each a uniformly drawn training view and pixel
(numpy ``default_rng([seed, step, rank])``, so a batch depends only on (seed, step, rank, n_rays)); the ray count
is the caller's (the NeRF task adapts it to the samples per ray, spec 3.5). Test views are rendered whole
(:meth:`BlenderDataset.view`).

Memory: training pixels are kept as uint8 RGBA (4 bytes per pixel: 100 x 800^2 -> 256 MB); test views are read
one at a time when asked for. Every frame's JSON entry and PNG header (size, mode) is checked at construction.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from datasets.base import Dataset
from rendering.rays import blender_focal, camera_rays, image_rays
from util.errors import DataError
from util.registry import ConfigError, register

__all__ = ["BlenderSplit", "read_blender_split", "read_frame_image", "BlenderDataset"]

log = logging.getLogger(__name__)


@dataclass
class BlenderSplit:
    """One split's cameras: ``c2w (N, 4, 4)`` float32, image files, size, focal length."""

    root: str
    split: str
    json_path: str
    files: List[str]
    c2w: np.ndarray
    camera_angle_x: float
    width: int
    height: int

    @property
    def focal(self) -> float:
        return blender_focal(self.width, self.camera_angle_x)

    def __len__(self) -> int:
        return len(self.files)


def _frame_file(root: str, file_path: str) -> str:
    path = os.path.join(root, os.path.normpath(file_path))
    return path if os.path.splitext(path)[1] else path + ".png"


def _png_header(path: str, where: str) -> Tuple[int, int, str]:
    from PIL import Image

    if not os.path.isfile(path):
        raise DataError(f"{where}: image file '{path}' not found")
    try:
        with Image.open(path) as im:
            return im.size[0], im.size[1], im.mode
    except Exception as e:
        raise DataError(f"{where}: cannot read '{path}' as an image ({type(e).__name__}: {e})") from e


def read_blender_split(root: str, split: str) -> BlenderSplit:
    """Read and check ``root/transforms_<split>.json`` and the headers of its images.

    Raises:
        DataError: missing/bad JSON (with line and column), missing keys, a transform that is not 4 x 4 finite
            numbers, a missing or unreadable image, images of different sizes, an image mode other than
            RGBA / RGB (each message names the file and frame).
    """
    if not os.path.isdir(root):
        raise DataError(f"dataset.root '{root}': not a folder (expected a Blender scene folder with "
                        f"transforms_train.json, transforms_test.json and the PNG views)")
    path = os.path.join(root, f"transforms_{split}.json")
    if not os.path.isfile(path):
        raise DataError(f"dataset.root '{root}': transforms_{split}.json not found (Blender layout: "
                        f"transforms_{{train,test}}.json next to the image folders)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object with 'camera_angle_x' and 'frames', got "
                        f"{type(meta).__name__}")
    angle = meta.get("camera_angle_x")
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not (0 < float(angle) < math.pi):
        raise DataError(f"{path}: 'camera_angle_x' must be a number in (0, pi) radians (horizontal field of view), "
                        f"got {angle!r}")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{path}: 'frames' must be a non-empty list of {{'file_path', 'transform_matrix'}} "
                        f"entries, got {type(frames).__name__ if frames is not None else 'nothing'}")
    files, mats = [], []
    size = None
    for i, fr in enumerate(frames):
        where = f"{path} frame {i}"
        if not isinstance(fr, dict) or not isinstance(fr.get("file_path"), str) or not fr.get("file_path"):
            raise DataError(f"{where}: needs a string 'file_path' (image path relative to the scene folder)")
        where = f"{where} ('{fr['file_path']}')"
        try:
            m = np.asarray(fr.get("transform_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            m = None
        if m is None or m.shape != (4, 4) or not np.isfinite(m).all():
            raise DataError(f"{where}: 'transform_matrix' must be a 4 x 4 list of finite numbers (camera-to-world), "
                            f"got {fr.get('transform_matrix')!r:.80}")
        file = _frame_file(root, fr["file_path"])
        w, h, mode = _png_header(file, where)
        if mode not in ("RGBA", "RGB"):
            raise DataError(f"{where}: '{file}' has image mode {mode}; expected RGBA (or RGB) 8-bit")
        if size is None:
            size = (w, h)
        elif (w, h) != size:
            raise DataError(f"{where}: '{file}' is {w} x {h} pixels but frame 0 is {size[0]} x {size[1]}; all views "
                            f"of a split must have one size")
        files.append(file)
        mats.append(m)
    return BlenderSplit(root=root, split=split, json_path=path, files=files, c2w=np.stack(mats).astype(np.float32),
                        camera_angle_x=float(angle), width=size[0], height=size[1])


def read_frame_image(file: str, width: int, height: int) -> np.ndarray:
    """The pixels of one view as uint8 RGBA ``(H, W, 4)`` (RGB gets alpha 255); a size other than
    ``width x height`` is a DataError naming the file."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            im.load()
            if im.mode not in ("RGBA", "RGB"):
                raise DataError(f"'{file}': image mode {im.mode}; expected RGBA (or RGB) 8-bit")
            arr = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read '{file}' as an image ({type(e).__name__}: {e})") from e
    if arr.shape[:2] != (height, width):
        raise DataError(f"'{file}' is {arr.shape[1]} x {arr.shape[0]} pixels, expected {width} x {height}")
    return arr


def _composite(rgba: np.ndarray, bkgd: np.ndarray) -> np.ndarray:
    """uint8 RGBA (..., 4) -> float32 RGB in [0, 1] on the background: rgb a + bkgd (1 - a)."""
    x = rgba.astype(np.float32) / 255.0
    a = x[..., 3:4]
    return x[..., :3] * a + bkgd.astype(np.float32) * (1.0 - a)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@register("dataset", "blender")
class BlenderDataset(Dataset):
    """Posed views of one scene in the Blender synthetic layout (spec vision 3.1), for NeRF training.

    Batches are ``{"rays_o": (N, 3), "rays_d": (N, 3), "rgb": (N, 3)}`` float32 tensors: N rays through pixel
    centres of uniformly drawn training views and pixels, unit directions, target colors composited on the
    background.

    Args:
        root: the scene folder (``transforms_train.json``, ``transforms_test.json``, the PNG views).
        train_split: split whose views are trained on (``transforms_<train_split>.json``).
        test_split: split rendered by the evaluation.
        init_rays: rays of a batch unless the caller asks for another count (the NeRF task starts here and
            adapts it, spec 3.5).
        background: background color composited under the views' alpha, 3 numbers in [0, 1] (white = the
            reference).
        seed: batch seed: batch = f(seed, step, rank, n_rays) (42 as the reference's ray generator).
    """

    def __init__(self, root: str, train_split: str = "train", test_split: str = "test", init_rays: int = 1024,
                 background: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 42):
        if not _is_int(init_rays) or init_rays < 1:
            raise ConfigError(f"dataset.init_rays must be an integer >= 1, got {init_rays!r}")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"dataset.seed must be an integer >= 0, got {seed!r}")
        try:
            bk = np.asarray([float(v) for v in background], dtype=np.float64)
        except (TypeError, ValueError):
            bk = np.zeros(0)
        if bk.shape != (3,) or not ((bk >= 0) & (bk <= 1)).all():
            raise ConfigError(f"dataset.background must be 3 numbers in [0, 1] (RGB), got {background!r}")
        self.root, self.train_split, self.test_split = str(root), train_split, test_split
        self.init_rays, self.seed = int(init_rays), int(seed)
        self.background = bk.astype(np.float32)
        self.train = read_blender_split(self.root, train_split)
        self.test = read_blender_split(self.root, test_split)
        self._pixels = np.empty((len(self.train), self.train.height, self.train.width, 4), dtype=np.uint8)
        for i, f in enumerate(self.train.files):
            self._pixels[i] = read_frame_image(f, self.train.width, self.train.height)
        self._c2w = torch.from_numpy(self.train.c2w)
        log.info("blender scene %s: %d train views (%s), %d test views (%s), %d x %d px, focal %.2f", self.root,
                 len(self.train), train_split, len(self.test), test_split, self.train.width, self.train.height,
                 self.train.focal)

    # --------------------------------------------------------------------------------------------- shapes
    spatial_dims = 3
    out_dim = 3  # rgb (cond_dim 0: the base's)

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)

    @property
    def steps_per_epoch(self) -> int:
        """Training pixels / init_rays (rounded up)."""
        return max(1, -(-self._pixels.shape[0] * self.train.height * self.train.width // self.init_rays))

    @property
    def train_value_mean(self) -> float:
        """Mean of the composited training colors."""
        return float(_composite(self._pixels[:, ::4, ::4], self.background).mean())

    def meta(self) -> dict:
        """JSON facts of the data: root, splits, sizes, focal lengths, background, seed, init_rays."""
        return {"root": self.root, "train_split": self.train_split, "test_split": self.test_split,
                "n_train": self.n_train, "n_test": self.n_test, "width": self.train.width,
                "height": self.train.height, "focal": self.train.focal, "test_width": self.test.width,
                "test_height": self.test.height, "test_focal": self.test.focal,
                "background": self.background.tolist(), "seed": self.seed, "init_rays": self.init_rays,
                "cond_dim": 0, "spatial_dims": 3}

    # -------------------------------------------------------------------------------------------- batches
    def sample_batch(self, step: int, rank: int = 0, n_rays: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The training rays of (seed, step, rank): ``rays_o``, ``rays_d``, ``rgb`` ``(n_rays, 3)`` float32.

        Args:
            step, rank: integers >= 0.
            n_rays: rays in the batch (default ``init_rays``).
        """
        if not (_is_int(step) and step >= 0 and _is_int(rank) and rank >= 0):
            raise ValueError(f"step and rank must be integers >= 0, got step={step!r}, rank={rank!r}")
        n = self.init_rays if n_rays is None else int(n_rays)
        if n < 1:
            raise ValueError(f"n_rays must be >= 1, got {n_rays!r}")
        rng = np.random.default_rng([self.seed, int(step), int(rank)])
        img = rng.integers(0, self.n_train, size=n)
        x = rng.integers(0, self.train.width, size=n)
        y = rng.integers(0, self.train.height, size=n)
        rgb = _composite(self._pixels[img, y, x], self.background)
        o, d = camera_rays(self._c2w[torch.from_numpy(img)], torch.from_numpy(x), torch.from_numpy(y),
                           self.train.width, self.train.height, self.train.focal)
        return {"rays_o": o, "rays_d": d, "rgb": torch.from_numpy(np.ascontiguousarray(rgb))}

    def view(self, index: int, split: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """All rays of one view: ``rays_o``, ``rays_d``, ``rgb`` ``(H, W, 3)`` float32 (test split by default)."""
        sp = self.test if split in (None, self.test_split) else self.train if split == self.train_split else None
        if sp is None:
            raise ValueError(f"split must be '{self.train_split}' or '{self.test_split}', got {split!r}")
        if not 0 <= index < len(sp):
            raise IndexError(f"view {index} out of range: split '{sp.split}' has {len(sp)} views")
        rgba = self._pixels[index] if sp is self.train else read_frame_image(sp.files[index], sp.width, sp.height)
        o, d = image_rays(torch.from_numpy(sp.c2w[index]), sp.width, sp.height, sp.focal)
        return {"rays_o": o, "rays_d": d, "rgb": torch.from_numpy(_composite(rgba, self.background))}

    def __repr__(self) -> str:
        return (f"BlenderDataset({self.root!r}, {self.n_train} x {self.train_split}, {self.n_test} x "
                f"{self.test_split}, {self.train.width} x {self.train.height})")
