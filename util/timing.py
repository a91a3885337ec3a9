"""Wall-clock timing helpers shared by every task's evaluation and the benchmarks."""
from __future__ import annotations

from typing import Union

import torch

__all__ = ["synchronize"]


def synchronize(device: Union[str, torch.device, None]) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA), so a wall-clock timing measures finished
    work; a no-op on the CPU (and for None). ``"cuda"`` without an index is the current CUDA device."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
