"""Training from a memory-mapped ensemble (``dataset.storage: mmap``) vs the same ensemble held in memory.

Usage:

    python benchmarks/bench_mmap.py [--members 600] [--resolution 128] [--steps 30] [--dir /tmp/drr_mmap_bench]

Writes a synthetic ensemble in the reference layout (``member_XXXX.npy`` float32 fields of ``--resolution``^3,
``cond.npy``, ``split.npy``; 90% of the members train) under ``--dir`` (kept and reused on the next run; delete
it yourself), then trains ``--steps`` steps of a DRR-Net (the model section of ``--config`` / ``--config_id``,
default configs/recipes/cpu.yaml id 1, with the dataset's cond_dim) once from ``storage: mmap`` and once from
``storage: memory``, each in its own process (so that each peak RSS is its own), on the same batches
(``sample_batch(step)`` depends on (seed, step) only; the children print a hash of their first batches and the
parent checks they are equal). Importance sampling (``--importance``, default ``both``: members and
coordinates by value histogram) is included: it is computed at construction from every training member.

The default size is the issue's 600 x 128^3 float32 (5.0 GB) when the free disk under ``--dir`` holds it with a
25% margin, else as many members as fit (printed). "Larger than RAM" needs data larger than the machine's
memory, or a cold page cache: ``--drop_caches`` writes /proc/sys/vm/drop_caches before the mmap run (root only;
affects the whole machine; otherwise the mmap run reads files the writer left in the page cache, say so when
reporting).

Output: a header (machine, CPU features, RAM, disk free, data size), then per storage one line
``storage=<mmap|memory> steps_per_s=<float> batch_s=<float> step_s=<float> setup_s=<float> peak_rss_mb=<float>
batches_hash=<hex>``, then ``ratio_memory_over_mmap=<float>`` (steps/s of memory / steps/s of mmap; the issue's
goal: <= 1.5) and ``same_batches=<True|False>``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import ROOT  # noqa: E402  (puts the repository on sys.path)

DEFAULT_MEMBERS, DEFAULT_RES, COND_DIM = 600, 128, 4


def data_bytes(members: int, res: int) -> int:
    return members * res ** 3 * 4


def choose_members(requested, res: int, folder: str) -> tuple:
    """(members, note): the requested number, or the default 600 reduced to what fits the free disk (25% margin)."""
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if requested:
        return int(requested), ""
    fit = int(free / 1.25 // data_bytes(1, res))
    if fit >= DEFAULT_MEMBERS:
        return DEFAULT_MEMBERS, ""
    return max(fit, 4), (f"only {free / 2 ** 30:.1f} GiB free under {folder}: {max(fit, 4)} members instead of "
                         f"{DEFAULT_MEMBERS}")


def write_ensemble(root: str, members: int, res: int, seed: int = 0) -> dict:
    """Synthetic smooth fields (separable sines and a blob, parameters per member) in the reference layout;
    reused when ``root`` already holds the same ensemble (stamp.json)."""
    stamp = dict(members=members, resolution=res, seed=seed, cond_dim=COND_DIM, version=1)
    data = os.path.join(root, "data")
    paths = dict(data_dir=data, cond_path=os.path.join(root, "cond.npy"),
                 cond_split_path=os.path.join(root, "split.npy"))
    stamp_file = os.path.join(root, "stamp.json")
    if os.path.isfile(stamp_file) and json.load(open(stamp_file)) == stamp:
        return paths
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(data)
    rng = np.random.default_rng(seed)
    params = rng.random((members, COND_DIM)).astype(np.float32)
    t = np.linspace(0.0, 1.0, res, dtype=np.float32)
    for i, p in enumerate(params):
        z = np.sin((2 + 6 * p[0]) * np.pi * t)[:, None, None]
        y = np.cos((1 + 5 * p[1]) * np.pi * t + p[2])[None, :, None]
        x = np.sin((3 + 4 * p[2]) * np.pi * t + p[3])[None, None, :]
        r2 = (t[:, None, None] - p[0]) ** 2 + (t[None, :, None] - p[1]) ** 2 + (t[None, None, :] - p[3]) ** 2
        field = (z * y + 0.5 * x + 2.0 * p[3] * np.exp(-r2 / (0.02 + 0.05 * p[1]))).astype(np.float32)
        np.save(os.path.join(data, f"member_{i:04d}.npy"), field)
    cond = np.concatenate([np.arange(members, dtype=np.float32)[:, None], params], axis=1)
    np.save(paths["cond_path"], cond)
    n_train = max(1, int(round(0.9 * members)))
    np.save(paths["cond_split_path"], {"cond_idx": np.arange(n_train), "cond_idx_unseen": np.arange(n_train, members)},
            allow_pickle=True)
    with open(stamp_file, "w") as f:
        json.dump(stamp, f)
    return paths


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def child(args) -> dict:
    """One storage mode: build the dataset and model, train ``steps`` steps; returns the measurements."""
    import torch

    import datasets  # noqa: F401  (registers the datasets)
    import models  # noqa: F401
    from datasets.ensemble import EnsembleDataset
    from util.build import build_model
    from util.config import load_config
    from util.optim import adam

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = json.loads(args.paths)
    rss0 = _rss_peak_mb()
    t0 = time.perf_counter()
    ds = EnsembleDataset(**paths, storage=args.storage, importance=args.importance,
                         impsmp_cluster_size=args.cluster_size, cond_batch=args.cond_batch,
                         spatial_log2batch=args.log2batch, seed=args.seed)
    setup_s = time.perf_counter() - t0
    exp = load_config(args.config, args.config_id)
    torch.manual_seed(args.seed)
    model = build_model(exp, inputs=dict(cond_dim=ds.cond_dim, spatial_dims=ds.spatial_dims, out_dim=1))
    model.train()
    opt = adam(model, lr=1e-4)
    h = hashlib.sha256()
    batch_t, step_t = [], []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        b = ds.sample_batch(step)
        tb = time.perf_counter() - t
        if step < args.hash_batches:
            for k in ("x", "c", "v", "member"):
                h.update(b[k].numpy().tobytes())
        loss = (model(b["x"], b["c"]).float() - b["v"]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ts = time.perf_counter() - t
        if step >= args.warmup:
            batch_t.append(tb)
            step_t.append(ts)
    return dict(storage=args.storage, steps_per_s=len(step_t) / sum(step_t), batch_s=float(np.median(batch_t)),
                step_s=float(np.median(step_t)), setup_s=setup_s, peak_rss_mb=_rss_peak_mb(),
                rss_before_data_mb=rss0, batches_hash=h.hexdigest()[:16])


def _drop_caches() -> str:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "page cache dropped"
    except OSError as e:
        return f"could not drop the page cache ({e.strerror}): the mmap run may read cached pages"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=None, help="ensemble members (default 600, or what fits the disk)")
    p.add_argument("--resolution", type=int, default=DEFAULT_RES, help="fields of resolution^3")
    p.add_argument("--dir", default=os.path.join("/tmp", "drr_mmap_bench"), help="folder of the synthetic data")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--importance", default="both", choices=["none", "coord", "member", "both"])
    p.add_argument("--cluster_size", type=int, default=64, help="dataset.impsmp_cluster_size")
    p.add_argument("--cond_batch", type=int, default=16)
    p.add_argument("--log2batch", type=int, default=11)
    p.add_argument("--config", default=os.path.join(ROOT, "configs/recipes/cpu.yaml"))
    p.add_argument("--config_id", type=int, default=1)
    p.add_argument("--storages", default="mmap,memory")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hash_batches", type=int, default=5, help="batches hashed for the same-batches check")
    p.add_argument("--drop_caches", action="store_true", help="drop the page cache before the mmap run (root)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--storage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return None

    from util.cpu import describe

    members, note = choose_members(args.members, args.resolution, args.dir)
    root = os.path.join(args.dir, f"{members}x{args.resolution}")
    t = time.perf_counter()
    paths = write_ensemble(root, members, args.resolution, args.seed)
    write_s = time.perf_counter() - t
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    free = shutil.disk_usage(args.dir).free
    size = data_bytes(members, args.resolution)
    print(f"# {describe()} | RAM {ram / 2 ** 30:.1f} GiB | free disk under {args.dir}: {free / 2 ** 30:.1f} GiB")
    print(f"# data {members} x {args.resolution}^3 float32 = {size / 2 ** 30:.2f} GiB in {root} "
          f"(written or checked in {write_s:.1f} s); {'larger' if size > ram else 'smaller'} than RAM")
    if note:
        print(f"# {note}")
    print(f"# model {args.config}#{args.config_id}, batch {args.cond_batch}x{2 ** args.log2batch}, importance "
          f"{args.importance} (cluster {args.cluster_size}), {args.steps} steps after {args.warmup} warm-up")
    results = {}
    for storage in [s.strip() for s in args.storages.split(",") if s.strip()]:
        if storage == "mmap" and args.drop_caches:
            print(f"# {_drop_caches()}")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--storage", storage, "--paths", json.dumps(paths)]
        for k in ("steps", "warmup", "importance", "cluster_size", "cond_batch", "log2batch", "config", "config_id",
                  "seed", "hash_batches", "threads"):
            v = getattr(args, k)
            if v is not None:
                cmd += [f"--{k}", str(v)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not lines:
            raise SystemExit(f"bench_mmap: the {storage} run failed:\n{res.stderr[-3000:]}")
        r = json.loads(lines[-1][len("RESULT "):])
        results[storage] = r
        print(f"storage={storage} steps_per_s={r['steps_per_s']:.4g} batch_s={r['batch_s']:.4g} "
              f"step_s={r['step_s']:.4g} setup_s={r['setup_s']:.3g} peak_rss_mb={r['peak_rss_mb']:.0f} "
              f"batches_hash={r['batches_hash']}", flush=True)
    if "mmap" in results and "memory" in results:
        ratio = results["memory"]["steps_per_s"] / results["mmap"]["steps_per_s"]
        same = results["memory"]["batches_hash"] == results["mmap"]["batches_hash"]
        print(f"ratio_memory_over_mmap={ratio:.3f} same_batches={same}")
    return results


if __name__ == "__main__":
    main()
