"""The MoE-INR task (spec moe_inr.md 3-5): two-stage training of model ``moe_inr`` on a time-varying volume.

Stage 1 (steps [0, S1), pre-training): policy + encoder learn a ground-truth expert label per coordinate,
cross-entropy on the policy's pre-softmax logits (Eq. 2 read as standard CE). The label comes from
``pretrain``:

- "kmeans" (default, the paper's best): k-means of voxel features into k clusters. The features are set by
  ``kmeans_features`` ("value": the normalized value; "value_xyz" / "value_xyzt": the value plus the spatial /
  space-time coordinates scaled by ``kmeans_coord_weight``). Centroids are fitted once at construction on
  ``kmeans_samples`` voxels drawn with ``kmeans_seed`` (k-means++ seeding, then Lloyd iterations, all NumPy
  float64, deterministic); every voxel's label is its nearest centroid, computed from the batch's own features
  (so no per-voxel label array is stored, the labelling of all voxels is implied).
- "random": a fixed pseudo-random expert per voxel (a multiplicative hash of the flat voxel index and
  ``kmeans_seed``).
- "spatial": k equal slabs along ``spatial_axis`` ("longest" spatial axis by default; "x", "y", "z"), the same
  for every time step (how the paper cuts its 7 blocks is not stated).
- "temporal": k equal contiguous time intervals.
- "load_balance": no labels; the load-balancing loss L_LB = (k / N^2) sum_j c_j s_j (Eq. 3) over the batch
  (c_j = coordinates whose argmax is j, s_j = sum of p_j).
- "none": no stage 1 (stage 2 from step 0).

Stage 2 (steps >= S1): every part jointly, per coordinate L = sum_j p_j loss(v_j, v) (Eq. 4), averaged over
the batch; ``expert_loss`` "l1" |v_j - v| (the text's ||.||_2 of a scalar, default) or "l2" (v_j - v)^2.
In the model's "average" mode the stage-2 loss is instead the mean over the averaged experts of loss(v_j, v)
(an ensemble; spec Table 5) plus ``var_weight`` times the variance regularizer: the paper takes it from RMDSRN
without giving its form; here it is a calibration term mean((var - sg((mean - v)^2))^2) that pulls the
experts' spread toward the squared error of their mean (sg = stop-gradient on the target).

S1 = ``stage1_steps`` if set, else round(``stage1_epochs`` x steps_per_epoch). The stage is a function of the
step only, so a resumed run continues in the right stage; the k-means centroids are also kept in
:meth:`MoETask.state_dict` (a resumed run uses the saved ones).

Logged terms: ``loss``, ``ce`` (stage 1 label schemes) or ``lb`` (load balance), ``expert`` (stage 2), ``var``
(average mode), ``stage``, and ``mse`` = the MSE of the top-1 prediction divided by 4 (the data are in [-1, 1],
range 2), so the logged PSNR equals the PSNR with peak = the data range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datasets.timevolume import time_coords
from tasks.base import StepOutput, Task
from util.registry import ConfigError, register

__all__ = ["MoETask", "MoETestConfig", "PRETRAIN_SCHEMES", "kmeans_fit", "KMEANS_FEATURES"]

PRETRAIN_SCHEMES = ("kmeans", "random", "spatial", "temporal", "load_balance", "none")
KMEANS_FEATURES = ("value", "value_xyz", "value_xyzt")
EXPERT_LOSSES = ("l1", "l2")
SPATIAL_AXES = ("longest", "x", "y", "z")


def kmeans_fit(feats: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """k-means (k-means++ seeding, Lloyd iterations) of ``feats`` (n, f): centroids (k, f) float64.

    Deterministic for a seed. An emptied cluster is re-seeded at the point farthest from its centroid. Lloyd
    stops early when no label changes.
    """
    x = np.asarray(feats, dtype=np.float64)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {n}")
    rng = np.random.default_rng([int(seed), 7919])
    cent = np.empty((k, x.shape[1]))
    cent[0] = x[rng.integers(n)]
    d2 = ((x - cent[0]) ** 2).sum(1)
    for j in range(1, k):
        tot = d2.sum()
        i = int(rng.choice(n, p=d2 / tot)) if tot > 0 else int(rng.integers(n))
        cent[j] = x[i]
        d2 = np.minimum(d2, ((x - cent[j]) ** 2).sum(1))
    labels = None
    for _ in range(int(iters)):
        dist = ((x[:, None, :] - cent[None]) ** 2).sum(-1)
        new = dist.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            sel = labels == j
            if sel.any():
                cent[j] = x[sel].mean(0)
            else:
                far = int(dist[np.arange(n), labels].argmax())
                cent[j] = x[far]
    return cent


@dataclass
class MoETestConfig:
    """Keys of the ``test`` section for task ``moe_inr`` (what test.py evaluates; tasks/moe_inr/evaluation.py).

    Attributes:
        chunk_size: coordinates per forward call when decompressing.
        isovalues: isovalues (normalized [-1, 1] scale) of the chamfer distances; one not crossed by the truth
            of a time step is skipped there.
        cd_max_points: isosurface vertices kept per surface (random subsample, seed 0) for the KD-tree distances.
        cd_steps: time steps whose isosurfaces are compared (empty: every step).
        ssim: SSIM (data range 2) on the middle slice of each spatial axis, every time step.
        lpips: LPIPS-VGG on the same slices (values mapped to [0, 1], gray repeated to RGB) when the lpips
            package and its VGG weights are on this machine; otherwise one log line says why (never downloads).
        baselines: compressors matched to the INR's mean PSNR: any of "sz3" (package pysz, error bound),
            "zfp" (package zfpy, fixed accuracy: its tolerance moves in powers of two, so the match is often
            missed by several dB), "zfp_rate" (zfpy fixed rate, bits per value: matches closely).
        psnr_tol: bisection stops when the compressor's mean PSNR is within this many dB of the target.
        bisect_iters: at most this many bisection steps.
        ji_quantile: uncertainty mode: voxels above this quantile of variance / of error form the two sets of
            the Jaccard index.
        ji_tolerance: uncertainty mode: spatial tolerance of the Jaccard index in voxels (0 = plain Jaccard).
        save_volume: write the decompressed normalized volume as decompressed.npy.
    """

    chunk_size: int = 65536
    isovalues: List[float] = field(default_factory=lambda: [-0.5, 0.0, 0.5])
    cd_max_points: int = 20000
    cd_steps: List[int] = field(default_factory=list)
    ssim: bool = True
    lpips: bool = True
    baselines: List[str] = field(default_factory=list)
    psnr_tol: float = 0.05
    bisect_iters: int = 40
    ji_quantile: float = 0.9
    ji_tolerance: int = 1
    save_volume: bool = False

    def __post_init__(self):
        if int(self.chunk_size) < 1:
            raise ConfigError(f"test.chunk_size must be >= 1, got {self.chunk_size}")
        if int(self.cd_max_points) < 1:
            raise ConfigError(f"test.cd_max_points must be >= 1, got {self.cd_max_points}")
        for b in self.baselines:
            if b not in ("sz3", "zfp", "zfp_rate"):
                raise ConfigError(f"test.baselines: unknown compressor '{b}', expected any of sz3, zfp, zfp_rate")
        if not self.psnr_tol > 0:
            raise ConfigError(f"test.psnr_tol must be > 0, got {self.psnr_tol}")
        if int(self.bisect_iters) < 1:
            raise ConfigError(f"test.bisect_iters must be >= 1, got {self.bisect_iters}")
        if not 0 < self.ji_quantile < 1:
            raise ConfigError(f"test.ji_quantile must be in (0, 1), got {self.ji_quantile}")
        if int(self.ji_tolerance) < 0:
            raise ConfigError(f"test.ji_tolerance must be >= 0, got {self.ji_tolerance}")
        if any(int(s) < 0 for s in self.cd_steps):
            raise ConfigError(f"test.cd_steps must be time steps >= 0, got {self.cd_steps}")


def _unwrap(model):
    return getattr(model, "module", model)


@register("task", "moe_inr")
class MoETask(Task):
    """MoE-INR compression of one time-varying volume: stage 1 pre-training on expert labels, stage 2 the
    probability-weighted expert loss (see the module docstring). Dataset: ``time_volume`` / ``taylor_green``;
    model: ``moe_inr``.

    Args:
        dataset: the run's dataset (injected).
        pretrain: stage-1 scheme: "kmeans", "random", "spatial", "temporal", "load_balance" or "none".
        stage1_epochs: length of stage 1 in epochs (paper: 30 of 300), used when stage1_steps is null.
        stage1_steps: length of stage 1 in steps (overrides stage1_epochs).
        k: number of experts; must equal model.k (labels are drawn from 0..k-1).
        expert_loss: per-expert error of Eq. 4: "l1" (|v_j - v|, default) or "l2" ((v_j - v)^2).
        stage1_recon_weight: weight of the stage-2 loss added in stage 1 (0 = labels only, the paper's
            description; whether the paper adds one is not stated).
        kmeans_features: clustered voxel features: "value", "value_xyz" or "value_xyzt".
        kmeans_coord_weight: scale of the coordinate features relative to the value (both in [-1, 1]).
        kmeans_samples: voxels drawn to fit the centroids.
        kmeans_iters: maximum Lloyd iterations.
        kmeans_seed: seed of the k-means sample and seeding, and of the "random" labels.
        spatial_axis: axis of the "spatial" slabs: "longest", "x", "y" or "z".
        var_weight: weight of the variance regularizer in the model's "average" mode (0 = off).
    """

    test_config = MoETestConfig
    ddp_find_unused_parameters = True  # stage 1 trains on expert labels: the experts get no gradient there

    def __init__(self, dataset, pretrain: str = "kmeans", stage1_epochs: float = 30.0,
                 stage1_steps: Optional[int] = None, k: int = 7, expert_loss: str = "l1",
                 stage1_recon_weight: float = 0.0, kmeans_features: str = "value", kmeans_coord_weight: float = 1.0,
                 kmeans_samples: int = 100000, kmeans_iters: int = 50, kmeans_seed: int = 0,
                 spatial_axis: str = "longest", var_weight: float = 0.0):
        super().__init__(dataset)
        for key, val, allowed in (("pretrain", pretrain, PRETRAIN_SCHEMES), ("expert_loss", expert_loss, EXPERT_LOSSES),
                                  ("kmeans_features", kmeans_features, KMEANS_FEATURES),
                                  ("spatial_axis", spatial_axis, SPATIAL_AXES)):
            if val not in allowed:
                raise ConfigError(f"task.{key} must be one of {', '.join(allowed)}; got {val!r}")
        for key, val, lo in (("k", k, 1), ("kmeans_samples", kmeans_samples, 1), ("kmeans_iters", kmeans_iters, 1),
                             ("kmeans_seed", kmeans_seed, 0)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise ConfigError(f"task.{key} must be an integer >= {lo}, got {val!r}")
        if stage1_steps is not None and (not isinstance(stage1_steps, int) or stage1_steps < 0):
            raise ConfigError(f"task.stage1_steps must be an integer >= 0 or null, got {stage1_steps!r}")
        if not float(stage1_epochs) >= 0:
            raise ConfigError(f"task.stage1_epochs must be >= 0, got {stage1_epochs!r}")
        for key, val in (("stage1_recon_weight", stage1_recon_weight), ("var_weight", var_weight),
                         ("kmeans_coord_weight", kmeans_coord_weight)):
            if not float(val) >= 0:
                raise ConfigError(f"task.{key} must be >= 0, got {val!r}")
        if dataset.spatial_dims != 4 or dataset.cond_dim != 0:
            raise ConfigError("task moe_inr needs a time-varying volume dataset (dataset.type time_volume or "
                              "taylor_green: 4 coordinate columns, no condition)")
        self.pretrain, self.k, self.expert_loss = pretrain, int(k), expert_loss
        self.stage1_recon_weight, self.var_weight = float(stage1_recon_weight), float(var_weight)
        self.kmeans_features, self.kmeans_coord_weight = kmeans_features, float(kmeans_coord_weight)
        self.kmeans_samples, self.kmeans_iters, self.kmeans_seed = kmeans_samples, kmeans_iters, kmeans_seed
        shape = dataset.shape
        if spatial_axis == "longest":  # x = column 0 = last array axis; ties go to x
            sizes = {"x": shape[3], "y": shape[2], "z": shape[1]}
            spatial_axis = max(sizes, key=lambda a: (sizes[a], -"xyz".index(a)))
        self.spatial_axis = spatial_axis
        if pretrain == "none":
            self.stage1_steps = 0
        elif stage1_steps is not None:
            self.stage1_steps = int(stage1_steps)
        else:
            self.stage1_steps = int(round(float(stage1_epochs) * int(dataset.steps_per_epoch)))
        if pretrain == "temporal" and shape[0] < self.k:
            raise ConfigError(f"task.pretrain 'temporal' cuts T={shape[0]} time steps into k={self.k} intervals; "
                              f"needs T >= k")
        self.centroids: Optional[Tensor] = None
        if pretrain == "kmeans" and self.stage1_steps > 0:
            self.centroids = torch.from_numpy(self._fit_centroids())

    # ------------------------------------------------------------------------------------------ labels
    def _features(self, x: Tensor, v: Tensor) -> Tensor:
        """(P, f) k-means features of coordinates x (P, 4) and values v (P,)."""
        cols = [v.reshape(-1, 1)]
        if self.kmeans_features != "value":
            n = 3 if self.kmeans_features == "value_xyz" else 4
            cols.append(self.kmeans_coord_weight * x[:, :n])
        return torch.cat(cols, dim=1)

    def _fit_centroids(self) -> np.ndarray:
        ds = self.dataset
        rng = np.random.default_rng([self.kmeans_seed, 104729])
        n = min(self.kmeans_samples, ds.n_voxels)
        flat = rng.choice(ds.n_voxels, size=n, replace=False) if n == ds.n_voxels or ds.n_voxels < 10 * n \
            else rng.integers(0, ds.n_voxels, size=n)
        x = torch.from_numpy(time_coords(flat, ds.shape))
        v = torch.from_numpy(ds.gather(flat))
        if n < self.k:
            raise ConfigError(f"task.pretrain 'kmeans': the volume has {ds.n_voxels} voxels, fewer than k={self.k}")
        return kmeans_fit(self._features(x, v).numpy(), self.k, self.kmeans_seed, self.kmeans_iters)

    def labels(self, batch: Dict[str, Tensor]) -> Tensor:
        """Ground-truth expert per coordinate of the batch, int64 (P,) (stage-1 label schemes)."""
        x = batch["x"].reshape(-1, 4)
        k = self.k
        if self.pretrain == "kmeans":
            f = self._features(x.double(), batch["v"].reshape(-1).double())
            c = self.centroids.to(device=f.device, dtype=torch.float64)
            return torch.cdist(f, c).argmin(dim=1)
        if self.pretrain == "random":
            idx = batch["index"].reshape(-1).to(torch.int64)
            h = ((idx + self.kmeans_seed * 40503) * 2654435761) % 4294967296  # Knuth multiplicative hash
            return (h * k) // 4294967296
        col = 3 if self.pretrain == "temporal" else "xyz".index(self.spatial_axis)
        u = (x[:, col].double() + 1.0) * 0.5  # [0, 1]
        return torch.clamp((u * k).floor().long(), 0, k - 1)

    # ------------------------------------------------------------------------------------------ stages
    def stage(self, step: int) -> int:
        """1 for steps [0, stage1_steps), else 2."""
        return 1 if step < self.stage1_steps else 2

    def model_inputs(self) -> Dict[str, int]:
        """One scalar field over (x, y, z, t): cond_dim 0, spatial_dims 4, out_dim 1."""
        return {"cond_dim": 0, "spatial_dims": 4, "out_dim": 1}

    @classmethod
    def model_inputs_without_data(cls, exp: Dict[str, Any]) -> Optional[Dict[str, int]]:
        """The same for every time-varying volume (no data needed)."""
        return {"cond_dim": 0, "spatial_dims": 4, "out_dim": 1}

    def _expert_err(self, values: Tensor, v: Tensor) -> Tensor:
        d = values - v
        return d.abs() if self.expert_loss == "l1" else d * d

    def training_step(self, model, batch: Dict[str, Tensor], step: int) -> Optional[StepOutput]:
        """(loss, terms, top-1 prediction (B, N, 1)) of the batch at ``step``; see the module docstring."""
        raw = _unwrap(model)
        if getattr(raw, "k", self.k) != self.k:
            raise ConfigError(f"task.k={self.k} differs from model.k={raw.k}; set both to the same expert count")
        if batch["x"].numel() == 0:
            return None
        out = model(batch["x"], batch["c"], all_experts=True)
        logits = out["logits"].float().reshape(-1, self.k)
        values = out["values"].float().reshape(-1, self.k)
        v = batch["v"].reshape(-1, 1).float()
        p = torch.softmax(logits, dim=-1)
        stage = self.stage(step)
        terms: Dict[str, Tensor] = {}
        average = getattr(raw, "mode", "top1") == "average"
        if average:
            mean, var = raw._mean_var(logits, values)
            n = raw.average_experts
            sel = values if not n or n == self.k else values.gather(-1, logits.topk(n, dim=-1).indices)
            expert = self._expert_err(sel, v).mean()
            reg = ((var - ((mean - v) ** 2).detach()) ** 2).mean()
            terms["var"] = reg.detach()
            stage2 = expert + self.var_weight * reg
            pred = mean
        else:
            expert = (p * self._expert_err(values, v)).sum(dim=-1).mean()
            stage2 = expert
            pred = values.gather(-1, logits.argmax(dim=-1, keepdim=True))
        if stage == 1:
            if self.pretrain == "load_balance":
                n = logits.shape[0]
                counts = torch.bincount(logits.argmax(dim=-1), minlength=self.k).to(p.dtype)
                pre = self.k / float(n * n) * (counts * p.sum(dim=0)).sum()
                terms["lb"] = pre.detach()
            else:
                pre = F.cross_entropy(logits, self.labels(batch))
                terms["ce"] = pre.detach()
            loss = pre + self.stage1_recon_weight * stage2 if self.stage1_recon_weight else pre
        else:
            loss = stage2
        terms["expert"] = expert.detach()
        terms["loss"] = loss.detach()
        terms["stage"] = torch.tensor(float(stage))
        terms["mse"] = (torch.mean((pred.detach() - v) ** 2) / 4.0)
        return StepOutput(loss, terms, pred.detach().reshape(batch["v"].shape))

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """The k-means centroids (when used) and the stage boundary."""
        d: Dict[str, Any] = {"stage1_steps": self.stage1_steps}
        if self.centroids is not None:
            d["centroids"] = self.centroids.clone()
        return d

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        if "stage1_steps" in d and int(d["stage1_steps"]) != self.stage1_steps:
            raise ConfigError(f"checkpoint was trained with {d['stage1_steps']} stage-1 steps, the config gives "
                              f"{self.stage1_steps}; resume with the same task.stage1_steps / stage1_epochs")
        if d.get("centroids") is not None:
            self.centroids = torch.as_tensor(d["centroids"], dtype=torch.float64).clone()

    # --------------------------------------------------------------------------------------- evaluation
    @classmethod
    def result_files(cls, test_config) -> List[str]:
        from tasks.moe_inr.evaluation import result_files

        return result_files(test_config)

    @classmethod
    def score(cls, ctx):
        """tasks/moe_inr/evaluation.score: the fp16 artifact decompressed and scored per time step, then the
        baseline compressors matched to its PSNR; ``metrics.json`` and ``per_step.csv``."""
        from tasks.moe_inr.evaluation import score

        return score(ctx)

    @staticmethod
    def format_table(rows: List[Dict[str, Any]]) -> str:
        from tasks.moe_inr.evaluation import format_table

        return format_table(rows)
