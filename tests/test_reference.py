"""Reference predictors (spec 4): mean field, nearest member, inverse-distance weighting, by hand."""
import math

import numpy as np
import pytest
import torch

from tasks.ensemble.reference import IDWPredictor, MeanFieldPredictor, NearestMemberPredictor

# three training members at known conditions (d_c = 2); field i is constant (i + 1) with a marker voxel
CONDS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
SHAPE = (2, 3, 4)


def field(i):
    f = torch.full(SHAPE, float(i + 1))
    f[0, 0, 0] = 10.0 * (i + 1)
    return f


FIELDS = torch.stack([field(i) for i in range(3)])


class CountingFetch:
    """Callable source that records which rows were fetched."""

    def __init__(self):
        self.calls = []

    def __call__(self, i):
        self.calls.append(i)
        return field(i)


def test_mean_field_all_sources():
    expect = FIELDS.double().mean(0).float()
    for src in (FIELDS, FIELDS.numpy(), CountingFetch(), [field(i) for i in range(3)], (field(i) for i in range(3))):
        p = MeanFieldPredictor(CONDS, src)
        assert p.name == "mean_field"
        out = p.predict(torch.tensor([0.3, 0.9]))
        assert out.shape == SHAPE and out.dtype == torch.float32
        assert torch.allclose(out, expect)
        assert torch.equal(p.predict(torch.tensor([0.0, 0.0])), out)  # cached, condition ignored
    assert torch.allclose(MeanFieldPredictor(None, iter(FIELDS)).predict(None), expect)


def test_mean_field_fetches_each_member_once():
    f = CountingFetch()
    p = MeanFieldPredictor(CONDS, f)
    assert f.calls == []  # lazy
    p.predict(CONDS[0]), p.predict(CONDS[1])
    assert sorted(f.calls) == [0, 1, 2]


def test_mean_field_count_mismatch():
    with pytest.raises(ValueError):
        MeanFieldPredictor(CONDS, [field(0), field(1)]).predict(CONDS[0])
    with pytest.raises(ValueError):
        MeanFieldPredictor(CONDS, FIELDS[:2])


def test_nearest_member():
    f = CountingFetch()
    p = NearestMemberPredictor(CONDS, f)
    assert p.name == "nearest_member"
    assert p.nearest(torch.tensor([0.9, 0.2])) == 1
    assert p.nearest(torch.tensor([0.1, 0.8])) == 2
    assert p.nearest(np.array([0.2, 0.1])) == 0
    assert torch.equal(p.predict(torch.tensor([0.9, 0.2])), field(1))
    assert f.calls == [1]  # only the neighbour is fetched
    # exact ties go to the lowest index
    assert p.nearest(torch.tensor([0.5, 0.5])) == 0  # equidistant to all three
    assert p.nearest(torch.tensor([1.0, 1.0])) == 1  # equidistant to members 1 and 2
    # the prediction is a copy, not a view into stacked fields
    q = NearestMemberPredictor(CONDS, FIELDS.clone())
    out = q.predict(CONDS[0])
    out += 1
    assert torch.equal(q.predict(CONDS[0]), field(0))
    with pytest.raises(ValueError):
        p.predict(torch.tensor([0.1, 0.2, 0.3]))


def test_idw_weights_by_hand():
    c = torch.tensor([0.25, 0.25])
    d = np.array([math.hypot(0.25, 0.25), math.hypot(0.75, 0.25), math.hypot(0.25, 0.75)])
    for power in (1.0, 2.0):
        w = d ** -power
        w /= w.sum()
        expect = sum(float(w[i]) * field(i).double() for i in range(3)).float()
        p = IDWPredictor(CONDS, FIELDS, k=8, power=power)
        idx, wt = p.weights(c)
        assert idx.tolist()[0] == 0 and sorted(idx.tolist()) == [0, 1, 2]
        assert np.allclose(wt.numpy(), w[idx.numpy()])
        out = p.predict(c)
        assert out.shape == SHAPE and out.dtype == torch.float32
        assert torch.allclose(out, expect, atol=1e-6)
        # a convex combination: bounded by the member values
        assert 1.0 < float(out[1, 1, 1]) < 3.0
    assert IDWPredictor(CONDS, FIELDS).name == "idw_k8_p2"


def test_idw_k_nearest_only():
    f = CountingFetch()
    c = torch.tensor([0.8, 0.1])  # nearest: 1 (d=0.224), then 0 (d=0.806), then 2 (d=1.14)
    p = IDWPredictor(CONDS, f, k=2, power=2)
    d1, d0 = math.hypot(0.2, 0.1), math.hypot(0.8, 0.1)
    w1, w0 = d1 ** -2, d0 ** -2
    expect = (w1 * field(1).double() + w0 * field(0).double()) / (w1 + w0)
    assert torch.allclose(p.predict(c), expect.float(), atol=1e-6)
    assert sorted(f.calls) == [0, 1]
    assert IDWPredictor(CONDS, FIELDS, k=1).predict(c).equal(field(1))


def test_idw_zero_distance_returns_member():
    f = CountingFetch()
    p = IDWPredictor(CONDS, f, k=3)
    assert torch.equal(p.predict(torch.tensor([0.0, 1.0])), field(2))
    assert f.calls == [2]
    # two members at the same condition: their mean
    conds = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]])
    q = IDWPredictor(conds, FIELDS, k=3)
    assert torch.allclose(q.predict(torch.tensor([0.5, 0.5])), (field(0) + field(1)) / 2)


def test_bad_arguments():
    with pytest.raises(ValueError):
        IDWPredictor(CONDS, FIELDS, k=0)
    with pytest.raises(TypeError):
        NearestMemberPredictor(CONDS, [field(i) for i in range(3)])  # a list is not a field source for queries
    with pytest.raises(ValueError):
        NearestMemberPredictor(torch.zeros(0, 2), FIELDS[:0])
