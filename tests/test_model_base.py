"""The model contract (models/base.py): defaults of bake / predict_grid."""
import torch
from torch import nn

from models.base import FieldModel
from util.sampling import grid_coords


class _Affine(FieldModel):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 + 2, 2)

    def forward(self, x, c):
        return self.lin(torch.cat([x, c[:, None, :].expand(-1, x.shape[1], -1)], -1))


def test_predict_grid_default_equals_forward_on_grid_coords_for_every_chunk_size():
    torch.manual_seed(0)
    m = _Affine()
    c = torch.rand(2)
    shape = (3, 4, 5)
    want = m(grid_coords(shape)[None], c[None])[0]
    for chunk in (1, 7, 60, 1000):
        got = m.predict_grid(shape, c, chunk_size=chunk)
        assert got.shape == (3, 4, 5, 2)
        got = got.reshape(60, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # matmul blocking may differ per chunk size


def test_bake_default_sets_eval_and_train_unbakes():
    m = _Affine()
    assert not m.is_baked
    m.bake()
    assert m.is_baked and not m.training
    m.train()
    assert not m.is_baked
    assert m.param_groups() == {} and m.training_stats() == {}


def test_predict_grid_single_channel_has_the_lattice_shape():
    class _One(_Affine):
        def forward(self, x, c):
            return super().forward(x, c)[..., :1]

    torch.manual_seed(0)
    m = _One()
    c = torch.rand(2)
    want = m(grid_coords((2, 4, 5))[None], c[None])[0, :, 0].reshape(2, 4, 5)
    got = m.predict_grid((2, 4, 5), c, chunk_size=7)
    assert got.shape == (2, 4, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
