"""The one device default of the program: CUDA when available, else the CPU."""
from __future__ import annotations

from typing import Union

import torch

__all__ = ["default_device"]


def default_device(name: Union[str, torch.device, None] = None) -> torch.device:
    """``name`` as a torch.device (e.g. test.py / predict.py ``--device``); None: ``cuda`` when available, else
    ``cpu``."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
