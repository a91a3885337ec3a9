"""Datasets: member files -> normalized tensors -> batches.

Importing the package registers every dataset type (explicit imports, see docs/design.md).
"""
import importlib.util
import warnings

# ``python -m datasets.demo`` imports this package first, which already imports datasets.demo to register its
# type; runpy then warns that the module is in sys.modules. Harmless here (the module defines, its __main__
# block runs once), so that one warning is silenced.
warnings.filterwarnings("ignore", message=r"'datasets\.demo' found in sys\.modules", category=RuntimeWarning)

import datasets.ensemble  # noqa: F401  (registers the "ensemble" type)

# datasets.demo registers the "demo" type
if importlib.util.find_spec("datasets.demo") is not None:
    from datasets import demo  # noqa: F401
import datasets.unstructured  # noqa: F401,E402  (registers the "unstructured" type)
import datasets.image  # noqa: F401,E402  (registers the "image" type)
import datasets.timevolume  # noqa: F401,E402  (registers the "time_volume" type)
import datasets.taylor_green  # noqa: F401,E402  (registers the "taylor_green" type)
import datasets.terrain  # noqa: F401,E402  (registers the "terrain" type)
import datasets.image_demo  # noqa: F401,E402  (registers the "image_demo" type)
import datasets.blender  # noqa: F401,E402  (registers the "blender" type)
import datasets.nerf_demo  # noqa: F401,E402  (registers the "nerf_demo" type)
