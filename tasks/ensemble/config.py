"""The ``test`` section of the ensemble task (keys of :class:`EnsembleTestConfig`, validated at config load)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from util.config import ConfigError, check_dataclass_fields


@dataclass
class EnsembleTestConfig:
    """Keys of the ``test`` section (what test.py evaluates and writes).

    Attributes:
        chunk_size: points per forward call when reconstructing a full field.
        splits: which members to reconstruct: any of "test" (unseen) and "train".
        resolutions: "full" (original resolution) and/or "train" (the training resolution; differs from
            full only in the spatio-conditional task, dataset.downsample > 1).
        ssim: compute 3D/2D SSIM (Gaussian window, data range 1).
        ssim_win_size: SSIM window size (odd).
        reference: also score the reference predictors (mean field, nearest member, IDW).
        ref_k: neighbours of the IDW reference predictor.
        ref_power: distance power of the IDW reference predictor (weights 1 / d^power).
        dump_members: cond rows whose predicted and true volumes are written (.npy, .vti, PNG slices).
        dump_vti: write .vti files for dumped members.
        dump_png: write PNG middle slices (prediction, truth, error) for dumped members.
    """

    chunk_size: int = 262144
    splits: List[str] = field(default_factory=lambda: ["test", "train"])
    resolutions: List[str] = field(default_factory=lambda: ["full"])
    ssim: bool = True
    ssim_win_size: int = 11
    reference: bool = True
    ref_k: int = 8
    ref_power: float = 2.0
    dump_members: List[int] = field(default_factory=list)
    dump_vti: bool = True
    dump_png: bool = True

    def __post_init__(self):
        check_dataclass_fields(self, "test")
        if self.ref_power <= 0:
            raise ConfigError(f"test.ref_power must be > 0, got {self.ref_power}")
        if any(m < 0 for m in self.dump_members):
            raise ConfigError(f"test.dump_members must be cond rows >= 0, got {self.dump_members}")
        if int(self.chunk_size) < 1:
            raise ConfigError(f"test.chunk_size must be >= 1, got {self.chunk_size}")
        for s in self.splits:
            if s not in ("test", "train"):
                raise ConfigError(f"test.splits: unknown split '{s}', expected 'test' and/or 'train'")
        for r in self.resolutions:
            if r not in ("full", "train"):
                raise ConfigError(f"test.resolutions: unknown resolution '{r}', expected 'full' and/or 'train'")
        if self.ssim_win_size < 3 or self.ssim_win_size % 2 == 0:
            raise ConfigError(f"test.ssim_win_size must be an odd number >= 3, got {self.ssim_win_size}")
        if self.ref_k < 1:
            raise ConfigError(f"test.ref_k must be >= 1, got {self.ref_k}")
