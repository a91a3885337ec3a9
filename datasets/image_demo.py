"""Demo images: photos that ship with scikit-image, written to disk as PNG on first use (nothing is downloaded).

    python -m datasets.image_demo                       # data/image_demo/astronaut.png
    python -m datasets.image_demo --photo coffee --data_dir data/image_demo

Dataset type ``image_demo`` (configs/image/demo.yaml): writes ``<data_dir>/<photo>.png`` the first time (from
the array ``skimage.data.<photo>()``, which scikit-image reads from its own package folder) and then reads it
exactly like ``dataset.type: image`` (all other keys are that type's). The bundled photos (:data:`PHOTOS`)
range from smooth (``astronaut``, ``chelsea``, ``coffee``) to highly detailed (``hubble_deep_field``,
``immunohistochemistry``, ``brick``, ``gravel``).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import warnings

import numpy as np

from datasets.image import ImageDataset
from util.errors import DataError
from util.registry import ConfigError, register

__all__ = ["PHOTOS", "photo_path", "write_photo", "image_demo"]

log = logging.getLogger(__name__)

# ``python -m datasets.image_demo`` imports the package first, which imports this module to register its type;
# runpy then warns that the module is in sys.modules (harmless: the __main__ block runs once).
warnings.filterwarnings("ignore", message=r"'datasets\.image_demo' found in sys\.modules", category=RuntimeWarning)

PHOTOS = {
    # name: (H, W, C) of the array skimage.data.<name>() returns (scikit-image 0.19-0.26; files in its package)
    "astronaut": (512, 512, 3),
    "chelsea": (300, 451, 3),
    "coffee": (400, 600, 3),
    "rocket": (427, 640, 3),
    "hubble_deep_field": (872, 1000, 3),
    "immunohistochemistry": (512, 512, 3),
    "retina": (1411, 1411, 3),
    "camera": (512, 512),
    "moon": (512, 512),
    "coins": (303, 384),
    "brick": (512, 512),
    "gravel": (512, 512),
    "grass": (512, 512),
}
"""Photos bundled with scikit-image that ``image_demo`` accepts, with their shapes."""


def photo_path(photo: str, data_dir: str) -> str:
    """``<data_dir>/<photo>.png``."""
    return os.path.join(data_dir, f"{photo}.png")


def write_photo(photo: str = "astronaut", data_dir: str = "data/image_demo", overwrite: bool = False) -> str:
    """Write ``skimage.data.<photo>()`` as an 8-bit PNG into ``data_dir`` (atomically) unless it exists.

    Returns:
        the PNG's path.

    Raises:
        ConfigError: an unknown photo name.
        DataError: scikit-image is missing or cannot read its bundled file.
    """
    if photo not in PHOTOS:
        raise ConfigError(f"dataset.photo must be one of {', '.join(PHOTOS)}; got {photo!r}")
    path = photo_path(photo, data_dir)
    if os.path.exists(path) and not overwrite:
        return path
    try:
        import skimage.data
        arr = np.asarray(getattr(skimage.data, photo)())
    except ImportError as e:
        raise DataError(f"dataset.type image_demo needs scikit-image (pip install scikit-image): {e}") from e
    except Exception as e:  # noqa: BLE001 (a missing bundled file surfaces as various errors)
        raise DataError(f"dataset.photo '{photo}': scikit-image could not read its bundled photo: {e}") from e
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    from PIL import Image

    os.makedirs(data_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)
    log.info("wrote %s (%s) from skimage.data.%s", path, "x".join(map(str, arr.shape)), photo)
    return path


# ---------------------------------------------------------------------------------------------- registry
_SET_BY_DEMO = ("path", "cache_dir")


def _image_keys(**kwargs):
    """Stand-in for ImageDataset in the registry: its config keys and docs minus the ones image_demo sets."""


_image_keys.__signature__ = inspect.Signature(
    [p for n, p in inspect.signature(ImageDataset.__init__).parameters.items() if n != "self" and n not in
     _SET_BY_DEMO])
_image_keys.__doc__ = "\n\n".join(inspect.cleandoc(d) for d in (ImageDataset.__doc__, ImageDataset.__init__.__doc__)
                                  if d)

# `python -m datasets.image_demo` runs this file a second time as __main__ after the package import registered it.
_register = register("dataset", "image_demo", forwards=_image_keys) if __name__ != "__main__" else (lambda f: f)


@_register
def image_demo(photo: str = "astronaut", data_dir: str = "data/image_demo", **kwargs) -> ImageDataset:
    """A photo bundled with scikit-image, written to ``<data_dir>/<photo>.png`` on first use, read as ``image``.

    Args:
        photo: one of astronaut (512 x 512), chelsea (300 x 451), coffee (400 x 600), rocket (427 x 640),
            hubble_deep_field (872 x 1000), immunohistochemistry (512 x 512), retina (1411 x 1411) (RGB), camera,
            moon, brick, gravel, grass (512 x 512), coins (303 x 384) (grayscale).
        data_dir: folder of the written PNG; a relative path is relative to the current working directory.
    """
    clash = sorted(set(kwargs) & set(_SET_BY_DEMO))
    if clash:
        raise ConfigError(f"dataset type 'image_demo' sets {', '.join(clash)} itself (from photo and data_dir); "
                          f"use type 'image' to read your own file")
    return ImageDataset(path=write_photo(photo, data_dir), **kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.image_demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", default="astronaut", help=f"one of {', '.join(PHOTOS)}")
    ap.add_argument("--data_dir", default="data/image_demo")
    ap.add_argument("--overwrite", action="store_true", help="write the PNG again even if it exists")
    a = ap.parse_args(argv)
    try:
        print(write_photo(a.photo, a.data_dir, a.overwrite))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
