"""Datasets: member files -> normalized tensors -> batches.

Importing the package registers every dataset type (explicit imports, see docs/design.md).
"""
import importlib.util

import datasets.ensemble  # noqa: F401  (registers the "ensemble" type)

# datasets.demo registers the "demo" type
if importlib.util.find_spec("datasets.demo") is not None:
    from datasets import demo  # noqa: F401
import datasets.unstructured  # noqa: F401,E402  (registers the "unstructured" type)
