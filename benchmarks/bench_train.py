"""Training-step benchmark of DRR-Net: plain path vs fast paths, side by side, on synthetic batches.

Usage (no data needed: random weights, grids and lines U(-1, 1), batches of random voxels):

    python benchmarks/bench_train.py --config configs/demo/drrnet.yaml --config_id 0 [--steps S]
    python benchmarks/bench_train.py --paper clover --model_set ssr_resolution=64 --steps 3

A step = forward, MSE loss, backward and an Adam step (``util.optim.adam``, as in training: lr 1e-4,
eps 1e-15, PyTorch's fused implementation), on a batch shaped like the
dataset's: ``x (N_c, N_x, d)`` random voxels of a ``--data_resolution`` lattice (default: the SSR shape;
voxels on lattice vertices touch about 2 vertices each instead of 8, so pass the data's resolution to time
a real config, e.g. ``--data_resolution 32`` for the demo),
N_c / N_x from the config's ``dataset.cond_batch`` / ``2^dataset.spatial_log2batch`` (else 8 / 2048;
``--conds`` / ``--points`` override). Paths (each its own copy of the same initial model and optimizer,
same batches, interleaved step by step, warm-up steps excluded, medians; CUDA timings synchronized):

* ``plain``:       ``fast_paths=False``: pi + R_sp over the whole lattice, grid_sample, full fusion per point;
* ``fast``:        ``fast_paths=True, sparse_refine="auto"`` (sparse when the batch's stencils touch at most
                   ``sparse_refine_ratio`` of the lattice);
* ``fast_dense``:  ``sparse_refine="never"`` (fold + gather interpolation, whole-lattice refinement);
* ``fast_sparse``: ``sparse_refine="always"``;
* ``fast_unfused``: ``fused_refiner="never"`` (PE, refiner and fold through autograd instead of the chunked
                   vertex pipeline).

``--precisions fp32,bf16`` runs every path in each precision (bf16: under ``torch.autocast(bfloat16)``, as
``train.mixed_precision: bf16`` trains; the fused CPU paths then multiply in bf16, see models/fast_ops.py).
A header line names the CPU and its bf16 support (util/cpu.py: amx_bf16 / avx512_bf16 / none / unknown) and the
allocator's setting: by default glibc's malloc is set up as train.py sets it on the CPU (``util.cpu.tune_malloc``:
a step's memory kept between steps; ``--malloc default`` keeps glibc's defaults, under which the plain path's
large frees happen to raise glibc's adaptive mmap threshold for the other paths too, while a real run of the
fused paths alone does not get that).

Output: one line per path and precision ``path=<name> steps_per_s=<float> points_per_s=<float>
peak_mem_mb=<float>`` (peak extra memory of the warm-up steps, the only ones measured for memory: the memory
poller, a thread waking every millisecond, slowed a timed step by ~10-20% on 2 cores) followed by precision (fp32 / bf16), ratio_vs_plain (vs the plain path in fp32), touched (refined vertices / lattice vertices), gflops (matmul FLOPs of forward
and backward, 3x the forward's, per second) next to the measured matmul peak (``common.MatmulPeak``, sampled
between the timed step rounds), and on the first batch
loss_rel_err / grad_rel_err (max over parameters of ||g - g_plain|| / ||g_plain||) vs the plain path, in
float32 and (grad_rel_err_fp64) in float64. In float32 a ReLU gate whose pre-activation lies within rounding
of 0 can switch in one path only; with millions of gates per step of a full-size model that happens on some
batches and moves a few gradients by 1e-4 to 1e-3 relative, while float64 agrees to ~1e-15. The unit tests
(tests/test_fast_paths.py) check the 1e-5 fp32 equivalence on small models.
"""
from __future__ import annotations

import argparse
import copy
import math
import os

import torch

from common import (MatmulPeak, PeakMemory, add_model_args, build_from_args, device_of, median, model_flops,
                    setup_threads, timed)
from util.cpu import describe as describe_cpu, tune_malloc  # noqa: E402
from util.optim import adam  # noqa: E402  (after common, which puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--conds", type=int, default=None, help="N_c conditions per batch")
    p.add_argument("--points", type=int, default=None, help="N_x points per condition")
    p.add_argument("--data_resolution", type=int, nargs="+", default=None,
                   help="lattice the batch voxels come from (int or per axis; default: the SSR shape)")
    p.add_argument("--paths", default="plain,fast,fast_dense,fast_sparse,fast_unfused")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="tuned: glibc's allocator set up as train.py sets it on the CPU (util.cpu.tune_malloc); "
                        "default: glibc's defaults")
    p.add_argument("--precisions", default="fp32",
                   help="comma list of fp32 / bf16: every path runs in each (bf16: torch.autocast(bfloat16), "
                        "which train.mixed_precision: bf16 uses; the fused CPU paths then multiply in bf16)")
    args = p.parse_args(argv)
    precisions = [q.strip() for q in args.precisions.split(",") if q.strip()]
    bad = [q for q in precisions if q not in ("fp32", "bf16")]
    if bad or not precisions:
        raise SystemExit(f"--precisions: fp32 and/or bf16, got {args.precisions!r}")
    setup_threads(args)
    if args.malloc == "default":
        os.environ["DRR_MALLOC"] = "default"
    dev = device_of(args)
    malloc_state = tune_malloc() if dev.type == "cpu" else "device memory"
    model, exp, desc = build_from_args(args)
    d = model.spatial_dims
    ds = (exp or {}).get("dataset", {})
    n_c = args.conds or int(ds.get("cond_batch", 8))
    n_x = args.points or (2 ** int(ds["spatial_log2batch"]) if "spatial_log2batch" in ds else 2048)
    if args.data_resolution is None:
        data_shape = tuple(model.ssr_shape) if model.use_pi else (32,) * d
    elif len(args.data_resolution) == 1:
        data_shape = (args.data_resolution[0],) * d
    else:
        data_shape = tuple(args.data_resolution)

    g = torch.Generator().manual_seed(args.seed + 1)

    def batch():
        idx = torch.stack([torch.randint(0, n, (n_c, n_x), generator=g) for n in data_shape], dim=-1)
        x = (2.0 * idx.float() / (torch.tensor(data_shape, dtype=torch.float32) - 1) - 1.0).flip(-1)
        return x.to(dev), torch.rand(n_c, model.cond_dim, generator=g).to(dev), torch.rand(n_c, n_x, 1, generator=g).to(dev)

    batches = [batch() for _ in range(args.warmup + args.steps)]
    settings = {"plain": (False, "auto", "auto"), "fast": (True, "auto", "auto"),
                "fast_dense": (True, "never", "auto"), "fast_sparse": (True, "always", "auto"),
                "fast_unfused": (True, "auto", "never")}
    paths = [n for n in args.paths.split(",") if n in settings]
    wanted = [(n, q) for n in paths for q in precisions]        # runs: (path, precision)
    models, opts = {}, {}
    for r in wanted:
        m = copy.deepcopy(model)
        m.fast_paths, m.sparse_refine, m.fused_refiner = settings[r[0]]
        m.train()
        models[r] = m
        opts[r] = adam(m, lr=1e-4)                          # the training default (fused Adam)

    def loss_of(r, b):
        m, (x, c, v) = models[r], b
        with precision_context(r[1], dev):
            return (m(x, c).float() - v).pow(2).mean()

    # equivalence on the first batch (no optimizer step)
    grads, losses, touched = {}, {}, {}
    for r in wanted:
        m = models[r]
        m.zero_grad()
        loss = loss_of(r, batches[0])
        loss.backward()
        losses[r] = loss.item()
        grads[r] = [q.grad.detach().clone() for q in m.parameters()]
        touched[r] = m.last_refined_vertices if m.fast_paths else math.prod(m.ssr_shape)
        m.zero_grad()
    ref_path = paths[0] if "plain" not in paths else "plain"
    ref = (ref_path, "fp32") if "fp32" in precisions else (ref_path, precisions[0])
    # the same check in float64 (copies of the initial model): in float32 a ReLU pre-activation within
    # rounding of 0 can take the other branch in one path (one in millions of gates per step), which moves
    # some gradients by up to ~1e-3 relative on such batches; float64 shows the paths' equivalence itself
    grads64 = {}
    if dev.type == "cpu" or torch.cuda.is_available():
        for n in paths:
            m = copy.deepcopy(model).double()
            m.fast_paths, m.sparse_refine, m.fused_refiner = settings[n]
            m.train()
            x, c, v = (t.double() for t in batches[0])
            (m(x, c) - v).pow(2).mean().backward()
            grads64[n] = [q.grad for q in m.parameters()]

    def step(n, b):
        opt = opts[n]
        loss = loss_of(n, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # peak memory on the warm-up steps only: its poller (a thread waking every millisecond) would take a core
    # from the two-thread matrix products of a timed step
    times, mem = {n: [] for n in wanted}, {n: 0.0 for n in wanted}
    floor = MatmulPeak(dev, dtypes=(torch.float32,) + ((torch.bfloat16,) if "bf16" in precisions else ()))
    for i, b in enumerate(batches):
        for n in wanted:
            if i < args.warmup:
                with PeakMemory(dev) as pm:
                    step(n, b)
                mem[n] = max(mem[n], pm.peak_mb)
            else:
                times[n].append(timed(lambda: step(n, b), dev))
        if i >= args.warmup:
            floor.sample(repeats=1)          # the floor in the same window as the steps (common.MatmulPeak)
    peaks = floor.peaks()
    fl = model_flops(model)
    P = math.prod(model.ssr_shape) if model.use_pi else 0
    print(f"# model={desc} device={dev} threads={torch.get_num_threads()} batch={n_c}x{n_x} data_shape={list(data_shape)} "
          f"ssr={list(model.ssr_shape)} lattice_vertices={P} D_sp={model.spatial_feature_dim} steps={args.steps}")
    print("# " + describe_cpu() + f" | malloc: {malloc_state}")
    print("# matmul peak GFLOP/s: " + " ".join(f"{k}={v:.1f}" for k, v in peaks.items()))
    base = 1.0 / median(times[ref])
    for r in wanted:
        n, prec = r
        t = median(times[r])
        sps = 1.0 / t
        V = touched[r] or P
        pts = n_c * n_x
        if n == "plain":
            fwd = V * fl["spatial_refiner"] + pts * (fl["fusion_full"] + fl["decoder"])
        else:
            fwd = V * (fl["spatial_refiner"] + fl["fold"]) + pts * fl["decoder"] + n_c * fl["fusion_cond"]
        gflops = 3 * 2 * fwd * sps / 1e9
        lerr = abs(losses[r] - losses[ref]) / abs(losses[ref])
        gerr = max(float((a - b_).norm() / b_.norm().clamp_min(1e-30)) for a, b_ in zip(grads[r], grads[ref]))
        gerr64 = max(float((a - b_).norm() / b_.norm().clamp_min(1e-300))
                     for a, b_ in zip(grads64[n], grads64[ref_path])) if grads64 else float("nan")
        peak = peaks["bfloat16" if prec == "bf16" else "float32"]
        print(f"path={n} steps_per_s={sps:.4g} points_per_s={sps * pts:.6g} peak_mem_mb={mem[r]:.1f} "
              f"precision={prec} ratio_vs_plain={sps / base:.3f} touched={V}/{P} gflops={gflops:.2f} "
              f"peak_gflops={peak:.1f} loss_rel_err={lerr:.3g} grad_rel_err={gerr:.3g} "
              f"grad_rel_err_fp64={gerr64:.3g} median_s={t:.4g}", flush=True)


def precision_context(precision: str, dev):
    """The autocast of a benchmark run: none for fp32; bf16: ``torch.autocast(device, bfloat16)``, what
    ``train.mixed_precision: bf16`` runs (Accelerate's autocast)."""
    import contextlib

    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


if __name__ == "__main__":
    main()
