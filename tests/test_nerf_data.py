"""datasets/blender.py (Blender synthetic layout, spec vision 3.1) and datasets/nerf_demo.py (the procedural scene),
on hand-made scenes in tmp_path."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.blender import BlenderDataset, read_blender_split
from datasets.nerf_demo import (CAMERA_ANGLE_X, SCENE_AABB, generate_nerf_demo, scene_rgb_sigma)
from rendering import camera_rays_reference, march_reference, rendering_reference
from util.errors import DataError
from util.registry import ConfigError, build

W, H = 5, 3
ANGLE = 2 * math.atan(0.5)  # focal = W


def _c2w(i):
    a = 0.7 * i + 0.3
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = [4 * math.cos(a), 4 * math.sin(a), 0.5 * i]
    return m


def _pixels(i):
    """Unique opaque color per (view, pixel): R = view, G = row, B = column (x 20); one half-transparent pixel."""
    px = np.zeros((H, W, 4), np.uint8)
    for y in range(H):
        for x in range(W):
            px[y, x] = (40 * i + 10, 20 * y + 5, 20 * x + 5, 255)
    px[1, 2, 3] = 51  # alpha 0.2
    return px


def _write_scene(root, n_train=2, n_test=1, size=(W, H)):
    os.makedirs(root, exist_ok=True)
    for split, n, off in (("train", n_train, 0), ("test", n_test, 3)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        frames = []
        for i in range(n):
            px = _pixels(i + off)
            if size != (W, H):
                px = np.zeros((size[1], size[0], 4), np.uint8)
            Image.fromarray(px, "RGBA").save(os.path.join(root, split, f"r_{i}.png"))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": _c2w(i + off).tolist()})
        with open(os.path.join(root, f"transforms_{split}.json"), "w") as f:
            json.dump({"camera_angle_x": ANGLE, "frames": frames}, f)
    return str(root)


def test_batches_rays_and_colors(tmp_path):
    root = _write_scene(tmp_path / "scene")
    ds = build("dataset", "blender", root=root, init_rays=64)
    assert (ds.n_train, ds.n_test, ds.train.width, ds.train.height) == (2, 1, W, H)
    assert ds.train.focal == pytest.approx(W)
    b = ds.sample_batch(3, rank=1)
    assert set(b) == {"rays_o", "rays_d", "rgb"} and b["rgb"].shape == (64, 3)
    # deterministic in (seed, step, rank); other steps / ranks / counts differ
    b2 = ds.sample_batch(3, rank=1)
    assert all(torch.equal(b[k], b2[k]) for k in b)
    assert not torch.equal(ds.sample_batch(4, rank=1)["rgb"], b["rgb"])
    assert not torch.equal(ds.sample_batch(3, rank=0)["rgb"], b["rgb"])
    assert ds.sample_batch(3, 1, n_rays=10)["rays_o"].shape == (10, 3)
    # each ray's color names its view and pixel (opaque pixels); its ray must be that pixel's ray
    n_checked = 0
    for o, d, c in zip(b["rays_o"], b["rays_d"], b["rgb"]):
        r, g, bl = np.round(c.numpy() * 255).astype(int)
        if (r - 10) % 40 or (g - 5) % 20 or (bl - 5) % 20:
            continue  # the half-transparent pixel: composited, checked below
        i, y, x = (r - 10) // 40, (g - 5) // 20, (bl - 5) // 20
        ro, rd = camera_rays_reference(_c2w(i), x, y, W, H, W)
        assert np.allclose(o.numpy(), ro, atol=1e-6) and np.allclose(d.numpy(), rd, atol=1e-6)
        n_checked += 1
    assert n_checked > 40


def test_view_composites_on_the_background(tmp_path):
    root = _write_scene(tmp_path / "scene")
    v = BlenderDataset(root).view(0)
    assert v["rgb"].shape == v["rays_o"].shape == v["rays_d"].shape == (H, W, 3)
    px = _pixels(3).astype(np.float64) / 255
    a = px[1, 2, 3]
    assert np.allclose(v["rgb"][1, 2].numpy(), px[1, 2, :3] * a + (1 - a), atol=1e-6)  # white background
    assert np.allclose(v["rgb"][0, 0].numpy(), px[0, 0, :3], atol=1e-6)
    ro, rd = camera_rays_reference(_c2w(3), 4, 2, W, H, W)
    assert np.allclose(v["rays_d"][2, 4].numpy(), rd, atol=1e-6) and np.allclose(v["rays_o"][2, 4].numpy(), ro)
    black = BlenderDataset(root, background=[0, 0, 0]).view(0)
    assert np.allclose(black["rgb"][1, 2].numpy(), px[1, 2, :3] * a, atol=1e-6)
    train_view = BlenderDataset(root).view(1, split="train")
    assert np.allclose(train_view["rgb"][0, 0].numpy(), _pixels(1)[0, 0, :3] / 255, atol=1e-6)


def test_rgb_images_are_opaque(tmp_path):
    root = _write_scene(tmp_path / "scene")
    Image.fromarray(_pixels(0)[..., :3], "RGB").save(os.path.join(root, "train", "r_0.png"))
    ds = BlenderDataset(root)
    assert np.allclose(ds.view(0, "train")["rgb"][1, 2].numpy(), _pixels(0)[1, 2, :3] / 255, atol=1e-6)


def _edit_json(root, split, fn):
    path = os.path.join(root, f"transforms_{split}.json")
    with open(path) as f:
        meta = json.load(f)
    fn(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("case, match", [
    ("no_root", "not a folder"),
    ("no_test_json", "transforms_test.json not found"),
    ("bad_json", r"not valid JSON \(line 1"),
    ("no_angle", "camera_angle_x"),
    ("no_frames", "'frames' must be a non-empty list"),
    ("bad_matrix", "frame 1 .*transform_matrix.*4 x 4"),
    ("missing_png", r"frame 0 \('./train/r_0'\).*r_0.png' not found"),
    ("wrong_size", r"r_1.png' is 4 x 3 pixels but frame 0 is 5 x 3"),
    ("grayscale", "image mode L"),
    ("not_image", "cannot read"),
])
def test_reader_errors(tmp_path, case, match):
    root = _write_scene(tmp_path / "scene")
    if case == "no_root":
        root = str(tmp_path / "nothing")
    elif case == "no_test_json":
        os.remove(os.path.join(root, "transforms_test.json"))
    elif case == "bad_json":
        with open(os.path.join(root, "transforms_train.json"), "w") as f:
            f.write('{"camera_angle_x": 0.5, "frames": [}')
    elif case == "no_angle":
        _edit_json(root, "train", lambda m: m.pop("camera_angle_x"))
    elif case == "no_frames":
        _edit_json(root, "train", lambda m: m.update(frames=[]))
    elif case == "bad_matrix":
        _edit_json(root, "train", lambda m: m["frames"][1].update(transform_matrix=[[1, 0, 0], [0, 1, 0]]))
    elif case == "missing_png":
        os.remove(os.path.join(root, "train", "r_0.png"))
    elif case == "wrong_size":
        Image.fromarray(np.zeros((3, 4, 4), np.uint8), "RGBA").save(os.path.join(root, "train", "r_1.png"))
    elif case == "grayscale":
        Image.fromarray(np.zeros((H, W), np.uint8), "L").save(os.path.join(root, "train", "r_1.png"))
    elif case == "not_image":
        with open(os.path.join(root, "train", "r_1.png"), "wb") as f:
            f.write(b"not a png")
    with pytest.raises(DataError, match=match):
        BlenderDataset(root)


def test_config_errors(tmp_path):
    root = _write_scene(tmp_path / "scene")
    with pytest.raises(ConfigError, match="init_rays"):
        BlenderDataset(root, init_rays=0)
    with pytest.raises(ConfigError, match="background"):
        BlenderDataset(root, background=[1, 1])
    with pytest.raises(ConfigError, match="unknown key 'dataset.n_rays'"):
        build("dataset", "blender", section="dataset", root=root, n_rays=5)


# ------------------------------------------------------------------------------------------- demo scene
def test_demo_scene_layout_determinism_and_reuse(tmp_path):
    root = str(tmp_path / "demo")
    generate_nerf_demo(root, size=10, n_train=3, n_test=2)
    split = read_blender_split(root, "train")
    assert (len(split), split.width, split.height, split.camera_angle_x) == (3, 10, 10, CAMERA_ANGLE_X)
    assert len(read_blender_split(root, "test")) == 2
    # the cameras look at the origin from distance 4
    for m in split.c2w:
        assert np.linalg.norm(m[:3, 3]) == pytest.approx(4.0, rel=1e-6)
        assert np.allclose(-m[:3, 2], -m[:3, 3] / 4.0, atol=1e-6)
    files = sorted(os.listdir(os.path.join(root, "train")))
    data = {f: open(os.path.join(root, "train", f), "rb").read() for f in files}
    mtime = os.path.getmtime(os.path.join(root, "train", files[0]))
    generate_nerf_demo(root, size=10, n_train=3, n_test=2)  # same settings: reused, not rewritten
    assert os.path.getmtime(os.path.join(root, "train", files[0])) == mtime
    other = str(tmp_path / "demo2")
    generate_nerf_demo(other, size=10, n_train=3, n_test=2)
    assert all(open(os.path.join(other, "train", f), "rb").read() == data[f] for f in files)  # deterministic
    with pytest.raises(ConfigError, match="other settings"):
        generate_nerf_demo(root, size=12, n_train=3, n_test=2)
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a NeRF demo scene"):
        generate_nerf_demo(str(tmp_path / "busy"), size=10, n_train=3, n_test=2)
    ds = build("dataset", "nerf_demo", root=root, size=10, n_train=3, n_test=2, init_rays=32)
    assert ds.sample_batch(0)["rgb"].shape == (32, 3)


def test_demo_pixels_match_dense_integration_of_the_scene(tmp_path):
    # the stored pixels (straight alpha, 8 bits) composited on white equal a brute-force integration of the
    # analytic field along the same rays: every lattice interval from t = 0 through the box, no skipping
    root = str(tmp_path / "demo")
    generate_nerf_demo(root, size=12, n_train=1, n_test=1)
    v = BlenderDataset(root).view(0)
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 12, 24), rng.integers(0, 12, 24)
    o = v["rays_o"][ys, xs].double().numpy()
    d = v["rays_d"][ys, xs].double().numpy()
    full = np.ones((4, 4, 4), dtype=bool)
    ri, ts, te = march_reference(full, SCENE_AABB, o, d, np.zeros(len(o)), 1e10, 5e-3)
    x = torch.from_numpy(o[ri] + d[ri] * ((ts + te) / 2)[:, None]).float()
    rgb, sg = scene_rgb_sigma(x)
    colors, opac, _ = rendering_reference(ts.tolist(), te.tolist(), sg.double().tolist(), rgb.double().tolist(),
                                          ri.tolist(), len(o))
    assert np.allclose(v["rgb"][ys, xs].numpy(), colors, atol=3e-3)  # 8-bit rounding of rgb and alpha
    opac = np.asarray(opac)
    assert (opac > 0.99).sum() >= 4 and (opac < 0.01).sum() >= 4  # objects and background both sampled
