"""Simple reference predictors built from the training members only (spec 4, last paragraph).

Every surrogate has to beat these: the mean of the training fields, the nearest training member in
(normalized) condition space, and inverse-distance weighting (IDW) of the k nearest training members.

Common interface::

    pred = MeanFieldPredictor(train_conds, fields)
    field = pred.predict(c)     # c: (d_c,) normalized condition -> tensor of spatial_shape
    pred.name                   # "mean_field" / "nearest_member" / "idw_k8_p2"

``train_conds`` is an (n_train, d_c) tensor/array of normalized conditions; ``fields`` gives the training
fields, row i of ``train_conds`` <-> field i, in one of three forms:

- a callable ``fetch(i) -> tensor`` (i = 0 .. n_train-1), e.g. a memory-mapped dataset read: fields are
  loaded on demand, one at a time;
- a stacked tensor/array of shape (n_train, *spatial_shape) (simple, but all fields in memory);
- (:class:`MeanFieldPredictor` only) any iterable of fields, consumed once.

Memory (100 members x 256^3 float32 = 6.7 GB stacked): with a callable, the mean field holds one field plus
a float64 accumulator (~200 MB for 256^3), computed once on the first ``predict`` and cached; the nearest
member predictor fetches one field per query; IDW fetches its k fields one after the other and keeps a float64
accumulator, so a query needs ~ 2 fields of memory whatever k is. Nothing besides the mean is cached.

Outputs live on the device of the fetched fields and have their dtype (float32 for float32 fields);
accumulation is float64.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

__all__ = ["ReferencePredictor", "MeanFieldPredictor", "NearestMemberPredictor", "IDWPredictor",
           "make_fetch"]

FieldSource = Union[Callable[[int], torch.Tensor], torch.Tensor, np.ndarray, Iterable]


def make_fetch(fields: FieldSource) -> Callable[[int], torch.Tensor]:
    """A ``fetch(i) -> tensor`` for a callable (returned wrapped) or a stacked (n, ...) tensor/array."""
    if callable(fields):
        return lambda i: torch.as_tensor(fields(int(i)))
    if isinstance(fields, (torch.Tensor, np.ndarray)):
        return lambda i: torch.as_tensor(fields[int(i)])
    raise TypeError(f"fields must be a callable i -> field or a stacked (n, ...) tensor/array, "
                    f"got {type(fields).__name__}")


def _conds(train_conds) -> torch.Tensor:
    c = torch.as_tensor(train_conds).detach().to("cpu", torch.float64)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"train_conds must have shape (n_train >= 1, d_c), got {tuple(c.shape)}")
    return c


class ReferencePredictor:
    """Base class: ``name`` and ``predict(c) -> field``; holds the training conditions and the field source."""

    name: str = "reference"

    def __init__(self, train_conds, fields: FieldSource):
        self.train_conds = _conds(train_conds)
        self.n_train, self.cond_dim = self.train_conds.shape
        if isinstance(fields, (torch.Tensor, np.ndarray)) and len(fields) != self.n_train:
            raise ValueError(f"{len(fields)} stacked fields for {self.n_train} training conditions")
        self._fields = fields
        is_source = callable(fields) or isinstance(fields, (torch.Tensor, np.ndarray))
        self._fetch = make_fetch(fields) if is_source else None

    def distances(self, c) -> torch.Tensor:
        """Euclidean distances (float64, CPU) from condition ``c`` (d_c,) to every training condition."""
        c = torch.as_tensor(c).detach().to("cpu", torch.float64).reshape(-1)
        if c.numel() != self.cond_dim:
            raise ValueError(f"condition has {c.numel()} values, expected {self.cond_dim}")
        return torch.linalg.vector_norm(self.train_conds - c[None], dim=1)

    def fetch(self, i: int) -> torch.Tensor:
        """Training field i as a tensor."""
        if self._fetch is None:
            raise TypeError(f"{type(self).__name__} needs a callable i -> field or stacked fields, "
                            "not a one-shot iterable")
        return self._fetch(i)

    def predict(self, c) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, c) -> torch.Tensor:
        return self.predict(c)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_train={self.n_train}, d_c={self.cond_dim})"


class MeanFieldPredictor(ReferencePredictor):
    """The mean of the training fields, whatever the condition.

    Args:
        train_conds: (n_train, d_c) training conditions (only their count is used, to know how many fields to
            fetch through a callable; may be None with an iterable or stacked ``fields``).
        fields: callable ``i -> field``, stacked (n_train, ...) tensor/array, or an iterable of fields
            (consumed once, on the first ``predict``).

    The mean is accumulated in float64 one field at a time on the first ``predict`` and cached.
    """

    name = "mean_field"

    def __init__(self, train_conds, fields: FieldSource):
        if train_conds is None:
            if callable(fields):
                raise ValueError("MeanFieldPredictor with a callable needs train_conds (the member count)")
            self.train_conds = None
            self.n_train, self.cond_dim = None, None
            self._fields = fields
            self._fetch = make_fetch(fields) if isinstance(fields, (torch.Tensor, np.ndarray)) else None
        else:
            super().__init__(train_conds, fields)
        self._mean: Optional[torch.Tensor] = None

    def _iter_fields(self):
        f = self._fields
        if callable(f) or isinstance(f, (torch.Tensor, np.ndarray)):
            fetch = make_fetch(f)
            n = self.n_train if self.n_train is not None else len(f)
            for i in range(n):
                yield fetch(i)
        else:
            for x in f:
                yield torch.as_tensor(x)

    @property
    def mean(self) -> torch.Tensor:
        """The mean training field (computed on first access)."""
        if self._mean is None:
            acc, n, dtype = None, 0, None
            for x in self._iter_fields():
                if acc is None:
                    acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
                    dtype = x.dtype if x.is_floating_point() else torch.float32
                elif tuple(x.shape) != tuple(acc.shape):
                    raise ValueError(f"training field {n} has shape {tuple(x.shape)}, expected {tuple(acc.shape)}")
                acc += x.to(acc.device, torch.float64)
                n += 1
            if n == 0:
                raise ValueError("no training fields")
            if self.n_train is not None and n != self.n_train:
                raise ValueError(f"{n} training fields for {self.n_train} training conditions")
            self._mean = (acc / n).to(dtype)
            self._fields = self._fetch = None  # an iterable is consumed; keep no reference to the data
        return self._mean

    def predict(self, c=None) -> torch.Tensor:
        """The mean field (a new tensor each call; ``c`` is ignored)."""
        return self.mean.clone()


class NearestMemberPredictor(ReferencePredictor):
    """The field of the training member whose normalized condition is nearest (Euclidean) to the query.

    Args:
        train_conds: (n_train, d_c) normalized training conditions.
        fields: callable ``i -> field`` or stacked (n_train, ...) tensor/array.

    Ties go to the lowest training index.
    """

    name = "nearest_member"

    def __init__(self, train_conds, fields: FieldSource):
        super().__init__(train_conds, fields)
        make_fetch(fields)  # type check: a callable or stacked fields

    def nearest(self, c) -> int:
        """Index of the nearest training member."""
        return int(torch.argmin(self.distances(c)))

    def predict(self, c) -> torch.Tensor:
        return self.fetch(self.nearest(c)).clone()


class IDWPredictor(ReferencePredictor):
    """Inverse-distance weighting of the k nearest training members' fields.

    ``pred(c) = sum_i w_i f_i / sum_i w_i`` over the k nearest training members, ``w_i = 1 / d_i^power``,
    d_i the Euclidean distance in normalized condition space. If the query coincides with training
    conditions (distance <= ``eps``), the prediction is that member's field (the mean of the fields of all
    members at zero distance, which is the limit of the weights).

    Args:
        train_conds: (n_train, d_c) normalized training conditions.
        fields: callable ``i -> field`` or stacked (n_train, ...) tensor/array.
        k: number of neighbours (min(k, n_train) are used).
        power: distance power p of the weights 1 / d^p.
        eps: distances at or below this count as zero.
    """

    def __init__(self, train_conds, fields: FieldSource, k: int = 8, power: float = 2.0, eps: float = 1e-12):
        super().__init__(train_conds, fields)
        make_fetch(fields)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        self.k = int(k)
        self.power = float(power)
        self.eps = float(eps)
        self.name = f"idw_k{self.k}_p{self.power:g}"

    def weights(self, c):
        """(indices, normalized weights) of the neighbours used for query ``c`` (float64, CPU)."""
        d = self.distances(c)
        k = min(self.k, self.n_train)
        order = torch.sort(d, stable=True).indices[:k]
        dk = d[order]
        zero = dk <= self.eps
        if bool(zero.any()):
            idx = order[zero]
            return idx, torch.full((idx.numel(),), 1.0 / idx.numel(), dtype=torch.float64)
        w = dk ** (-self.power)
        return order, w / w.sum()

    def predict(self, c) -> torch.Tensor:
        idx, w = self.weights(c)
        acc, dtype = None, None
        for i, wi in zip(idx.tolist(), w.tolist()):
            x = self.fetch(i)
            if acc is None:
                acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
                dtype = x.dtype if x.is_floating_point() else torch.float32
            acc.add_(x.to(acc.device, torch.float64), alpha=wi)
        return acc.to(dtype)
