"""Every registered dataset, generated from the registry (``names("dataset")``): a batch depends only on
(seed, step, rank) (docs/design.md, Batches). Two instances built with the same seed give identical batches for the
same (step, rank); another step, rank or seed gives another batch; the order of the calls does not matter.

``DATA`` maps each dataset to a builder of tiny files under a temporary folder and its config keys;
``test_every_dataset_has_tiny_data`` fails when a dataset is registered without an entry.
"""
import os

import numpy as np
import pytest
import torch

from util.registry import build, names

DATASETS = [n for n in names("dataset") if not n.startswith("_")]  # "_name": registered by a test module


def _ensemble_files(root):
    from datasets.demo import generate_demo

    p = generate_demo(str(root / "demo"), 5, 2, 6, 3, 0)
    return dict(data_dir=p["data_dir"], cond_path=p["cond_path"], cond_split_path=p["cond_split_path"])


def _mesh_files(root, n_train=5, n_test=2, n_points=40):
    """An unstructured ensemble: n_points vertices (plain coordinates), a smooth field per member."""
    rng = np.random.default_rng(0)
    coords = rng.uniform(-3.0, 3.0, (n_points, 3))
    params = rng.uniform(0.0, 1.0, (n_train + n_test, 2))
    os.makedirs(root / "mesh" / "data")
    for i, (a, b) in enumerate(params):
        v = 1.0 + np.sin(coords[:, 0] * (1 + a)) * np.cos(coords[:, 1]) + b * coords[:, 2]
        np.save(root / "mesh" / "data" / f"member_{i:04d}.npy", v.astype(np.float32))
    np.save(root / "mesh" / "coords.npy", coords)
    np.save(root / "mesh" / "cond.npy", np.concatenate([np.arange(len(params))[:, None], params], axis=1))
    np.save(root / "mesh" / "split.npy", {"cond_idx": np.arange(n_train),
                                          "cond_idx_unseen": np.arange(n_train, n_train + n_test)})
    return dict(data_dir=str(root / "mesh" / "data"), coords_path=str(root / "mesh" / "coords.npy"),
                cond_path=str(root / "mesh" / "cond.npy"), cond_split_path=str(root / "mesh" / "split.npy"),
                coords_spherical=False)


def _png(root):
    from PIL import Image

    i, j = np.meshgrid(np.arange(12), np.arange(14), indexing="ij")
    img = (127 + 100 * np.sin(i[..., None] / 3.0 + j[..., None] * np.arange(1, 4) / 4.0)).astype(np.uint8)
    Image.fromarray(img).save(root / "img.png")
    return str(root / "img.png")


def _volume(root):
    t, z, y, x = np.meshgrid(np.arange(3), np.arange(4), np.arange(5), np.arange(6), indexing="ij")
    np.save(root / "v.npy", np.sin(x + t + 0.5 * y - z).astype(np.float32))
    return str(root / "v.npy")


def _dems(root):
    from datasets.terrain_gen import fractal_surface

    (root / "dem").mkdir()
    for i in range(4):
        np.save(root / "dem" / f"r{i}.npy", (200.0 * fractal_surface(32, seed=i) + 50 * i).astype(np.float32))
    return str(root / "dem")


def _nerf_scene(root):
    from datasets.nerf_demo import generate_nerf_demo

    generate_nerf_demo(str(root / "scene"), size=8, n_train=2, n_test=1)
    return str(root / "scene")


# dataset name -> (tiny files under the folder) -> config keys of that dataset (seed excepted: injected)
DATA = {
    "ensemble": lambda r: dict(_ensemble_files(r), cond_batch=2, spatial_log2batch=5),
    "demo": lambda r: dict(root=str(r / "demo"), n_train=5, n_test=2, resolution=6, cond_batch=2,
                           spatial_log2batch=5),
    "unstructured": lambda r: dict(_mesh_files(r), cond_batch=2, spatial_log2batch=4),
    "image": lambda r: dict(path=_png(r), log2batch=5),
    "image_demo": lambda r: dict(data_dir=str(r / "photo"), log2batch=5),
    "blender": lambda r: dict(root=_nerf_scene(r), init_rays=16),
    "nerf_demo": lambda r: dict(root=str(r / "scene"), size=8, n_train=2, n_test=1, init_rays=16),
    "time_volume": lambda r: dict(path=_volume(r), batch_size=32),
    "taylor_green": lambda r: dict(root=str(r / "tg"), resolution=8, n_saves=3, t_end=0.5, reynolds=100.0,
                                   batch_size=32),
    "terrain": lambda r: dict(path=_dems(r), tile_size=16, val_fraction=0.25, test_fraction=0.25, batch_size=2),
}


def test_every_dataset_has_tiny_data():
    missing = sorted(set(DATASETS) - set(DATA))
    assert not missing, f"registered datasets without tiny data in tests/test_registry_datasets.py DATA: {missing}"
    stale = sorted(set(DATA) - set(DATASETS))
    assert not stale, f"DATA entries for datasets no longer registered: {stale}"


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not torch.equal(a[k], b[k]):
                return False
        elif isinstance(a[k], np.ndarray):
            if not np.array_equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


@pytest.fixture(scope="module", params=DATASETS)
def built(request, tmp_path_factory):
    """(name, make(seed)) with the dataset's tiny files written once per dataset."""
    name = request.param
    if name not in DATA:
        pytest.fail(f"dataset '{name}' has no tiny data (see test_every_dataset_has_tiny_data)")
    cfg = DATA[name](tmp_path_factory.mktemp(name))

    def make(seed=0):
        return build("dataset", name, section="dataset", injected={"seed": seed}, **cfg)

    return name, make


def test_batch_depends_only_on_seed_step_and_rank(built):
    name, make = built
    a, b = make(0), make(0)
    for step, rank in [(0, 0), (1, 0), (3, 1)]:
        assert _same(a.sample_batch(step, rank), b.sample_batch(step, rank)), \
            f"{name}: two instances with seed 0 differ at step {step}, rank {rank}"
    ref = a.sample_batch(1, 0)
    assert not _same(ref, a.sample_batch(2, 0)), f"{name}: steps 1 and 2 give the same batch"
    assert not _same(ref, a.sample_batch(1, 1)), f"{name}: ranks 0 and 1 give the same batch at step 1"
    assert not _same(ref, make(1).sample_batch(1, 0)), f"{name}: seeds 0 and 1 give the same batch"


def test_order_of_calls_does_not_matter(built):
    name, make = built
    a, b = make(0), make(0)
    a3, a1 = a.sample_batch(3, 0), a.sample_batch(1, 0)
    b1, b3 = b.sample_batch(1, 0), b.sample_batch(3, 0)
    assert _same(a1, b1) and _same(a3, b3), f"{name}: a batch depends on the batches drawn before it"
    assert _same(a.sample_batch(3, 0), a3), f"{name}: drawing step 3 twice gives two batches"
