"""Full-field inference benchmark of a baked DRR-Net: plain path vs fast paths, side by side.

Usage (no data needed: random weights, grids and lines U(-1, 1)):

    python benchmarks/bench_inference.py --config configs/demo/drrnet.yaml --config_id 0 [--members K] [--resolution R]
    python benchmarks/bench_inference.py --paper clover --members 2 --resolution 128

Measures (medians over ``--repeats`` interleaved repetitions, one warm-up excluded; CUDA timings are
synchronized):

* bake time: ``bake(fold=False)`` (the plain cache) and ``bake()`` (plus the folded lattice), medians of
  ``--bake_repeats``;
* full-field reconstruction of K members on an R^d lattice (default: the model's SSR shape), in points/s:
  - ``plain``:      ``tasks.ensemble.evaluation.predict_field`` with ``fast_paths=False`` (grid_sample of the D_sp
                    lattice + concatenation + full fusion layer per point): what test.py does today;
  - ``fast_forward``: the same ``predict_field`` loop with the fast forward (gather interpolation of the
                    folded lattice + per-member condition bias);
  - ``fast_grid``:  ``model.predict_grid`` (no coordinates; on the SSR shape a slice of the folded lattice,
                    on a subsampling lattice a row gather, else the gather interpolation; on CPU fp32 with hidden
                    widths a multiple of the kernel's panel width the one-pass decoder ``cpu_kernels.baked_mlp``,
                    else the per-pass decoder);
  - ``fast_grid_torch``: the same with ``DRR_BAKED_MLP=off``: the per-pass decoder (oneDNN / addmm products,
                    each layer's activations through memory), for comparison;
  - ``fast_grid_bf16`` (and ``fast_grid_fp16`` on CUDA): the same in reduced precision, with its error (on a
                    CPU with AMX-BF16 the one-pass bf16 decoder ``cpu_kernels.baked_mlp_amx``: products on the AMX
                    tiles, bias / ReLU / output layer in float32); ``fast_grid_bf16_torch``: its per-pass path
                    (``DRR_BAKED_MLP=off``: PyTorch's bf16 products);
  - ``fast_grid_members`` / ``fast_grid_members_bf16``: ``model.predict_grid_members`` (the K members in one
                    call: each block of table rows read once for all of them; bitwise ``fast_grid`` /
                    ``fast_grid_bf16``);
  - ``fast_grid_bftable``: ``predict_grid(table_dtype=torch.bfloat16)``: the folded table stored in bfloat16
                    (half the bytes of the gather), everything else float32; its floor is the fp32 one;
  - ``fast_grid_keep``: ``predict_grid(keep_rows=True)``: the folded table resampled onto the queried lattice
                    once (made in the warm-up, not timed: the time of members after the first on one lattice),
                    then per member only condition bias, ReLU and decoder; bitwise ``fast_grid``;
                    ``fast_grid_keep_bf16``: the same with bf16 products (rows kept in bf16), bitwise
                    ``fast_grid_bf16``;
* peak memory of each path (CUDA: max_memory_allocated; CPU: sampled RSS delta);
* achieved GFLOP/s of each path (its own matmul FLOPs: plain = full fusion + decoder per point, fast =
  decoder per point; 1 multiply-add = 2 FLOP) next to the measured matmul peak (``common.MatmulPeak``: the faster
  of two GEMM sizes, its median over timings taken before and between the paths' repetition rounds, so that the
  floor and the paths are measured in the same window), and the matmul-bound floor points/s = peak / (decoder
  FLOPs per point) with the fraction of it reached.

Any model of a config, several at once (``--compare 0,1,2``: e.g. the image models with and without DRR):
bake time and full-field reconstruction (``model.predict_grid`` after ``bake()``, the path test.py times) of
each config id on the same lattice (``--resolution``, default 256 per axis), interleaved repetitions, with the
ratio of each to the first id:

    python benchmarks/bench_inference.py --config configs/image/demo.yaml --compare 0,1 --resolution 512

Output: one line per path ``path=<name> points_per_s=<float> bake_s=<float>`` followed by more key=value
fields (ratio_vs_plain, gflops, peak_gflops, floor_frac, peak_mem_mb, max_abs_err, rel_l2_err vs plain).
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from common import (MatmulPeak, PeakMemory, add_model_args, build_from_args, config_model_inputs, device_of,
                    median, model_flops, setup_threads, timed)
from util.cpu import describe as describe_cpu  # noqa: E402  (after common, which puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--members", type=int, default=2, help="members reconstructed per repetition (K)")
    p.add_argument("--resolution", type=int, nargs="+", default=None,
                   help="query lattice: one int (cube/square) or one per axis in array order (default: SSR shape)")
    p.add_argument("--chunk_size", type=int, default=None, help="points per chunk (default: 2^13 CPU, 2^18 CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bake_repeats", type=int, default=3)
    p.add_argument("--paths", default="plain,fast_forward,fast_grid,fast_grid_torch,fast_grid_bf16,"
                                       "fast_grid_bf16_torch,fast_grid_fp16,fast_grid_bftable,"
                                       "fast_grid_keep,fast_grid_keep_bf16")
    p.add_argument("--breakdown", action="store_true",
                   help="also print where fast_grid's time goes: the one-pass decoder's gather + output layer vs its "
                        "hidden products, and the per-pass path's stencil / gather / matmul / activation passes")
    p.add_argument("--compare", default=None, metavar="IDS",
                   help="comma-separated config ids: time bake + full-field reconstruction of each (any model)")
    args = p.parse_args(argv)
    setup_threads(args)
    if args.compare:
        return compare_models(args)
    from tasks.ensemble.evaluation import predict_field
    from util.sampling import grid_coords

    model, _, desc = build_from_args(args)
    dev = device_of(args)
    if not getattr(model, "use_pi", False):
        raise SystemExit("bench_inference: the model has no spatial lattice (use_pi false)")
    d = model.spatial_dims
    if args.resolution is None:
        shape = tuple(model.ssr_shape)
    elif len(args.resolution) == 1:
        shape = (args.resolution[0],) * d
    else:
        shape = tuple(args.resolution)
    chunk = args.chunk_size or (1 << 18 if dev.type == "cuda" else 1 << 13)
    P = math.prod(shape)
    g = torch.Generator().manual_seed(args.seed + 1)
    conds = torch.rand(args.members, model.cond_dim, generator=g).to(dev)
    model.eval()

    # --- bake ---------------------------------------------------------------------------------------
    bake = {}
    for name, fold in (("plain", False), ("fast", True)):
        model.bake(fold=fold)                                                     # warm-up
        bake[name] = median([timed(lambda: model.bake(fold=fold), dev) for _ in range(args.bake_repeats)])
    model.bake()

    # --- paths ----------------------------------------------------------------------------------------
    coords = None

    def run_predict_field(fast):
        nonlocal coords
        if coords is None:
            coords = grid_coords(shape).to(dev)
        model.fast_paths = fast
        try:
            return [predict_field(model, coords, c, shape, chunk) for c in conds]
        finally:
            model.fast_paths = True

    def per_pass(fn):                    # the decoder as PyTorch products (DRR_BAKED_MLP=off), for comparison
        old = os.environ.get("DRR_BAKED_MLP")
        os.environ["DRR_BAKED_MLP"] = "off"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["DRR_BAKED_MLP"]
            else:
                os.environ["DRR_BAKED_MLP"] = old

    paths = {
        "plain": lambda: run_predict_field(False),
        "fast_forward": lambda: run_predict_field(True),
        "fast_grid": lambda: [model.predict_grid(shape, c, chunk) for c in conds],
        "fast_grid_torch": lambda: per_pass(lambda: [model.predict_grid(shape, c, chunk) for c in conds]),
        "fast_grid_members": lambda: list(model.predict_grid_members(shape, conds, chunk)),
        "fast_grid_members_bf16": lambda: list(model.predict_grid_members(shape, conds, chunk,
                                                                          dtype=torch.bfloat16)),
        "fast_grid_bf16": lambda: [model.predict_grid(shape, c, chunk, dtype=torch.bfloat16) for c in conds],
        "fast_grid_bf16_torch": lambda: per_pass(lambda: [model.predict_grid(shape, c, chunk, dtype=torch.bfloat16)
                                                          for c in conds]),
        "fast_grid_bftable": lambda: [model.predict_grid(shape, c, chunk, table_dtype=torch.bfloat16)
                                      for c in conds],
        "fast_grid_keep": lambda: [model.predict_grid(shape, c, chunk, keep_rows=True) for c in conds],
        "fast_grid_keep_bf16": lambda: [model.predict_grid(shape, c, chunk, keep_rows=True, dtype=torch.bfloat16)
                                        for c in conds],
        "fast_grid_fp16": lambda: [model.predict_grid(shape, c, chunk, dtype=torch.float16) for c in conds],
    }
    wanted = [n for n in args.paths.split(",") if n in paths]
    if dev.type != "cuda":
        wanted = [n for n in wanted if n != "fast_grid_fp16"]                   # CPU fp16 matmul: no kernels
    flops = model_flops(model)
    fpp = {n: 2.0 * (flops["fusion_full"] + flops["decoder"]) if n == "plain" else 2.0 * flops["decoder"]
           for n in wanted}
    floor = MatmulPeak(dev, (torch.float32, torch.bfloat16) if dev.type == "cpu" else
                       (torch.float32, torch.bfloat16, torch.float16))

    ref = None
    outs, mem, times = {}, {}, {n: [] for n in wanted}
    for n in wanted:                                                              # warm-up + outputs + memory
        with PeakMemory(dev) as pm:
            outs[n] = torch.stack(paths[n]())
        mem[n] = pm.peak_mb
    ref = outs.get("plain", outs[wanted[0]])
    for _ in range(args.repeats):          # the floor sampled between the rounds: the same window as the paths
        for n in wanted:
            times[n].append(timed(paths[n], dev))
        floor.sample()
    peaks = floor.peaks()

    print(f"# model={desc} device={dev} threads={torch.get_num_threads()} shape={list(shape)} members={args.members} "
          f"chunk={chunk} D_sp={model.spatial_feature_dim} D_c={model.cond_feature_dim} "
          f"hidden={model.fusion[0].out_features} ssr={list(model.ssr_shape)}")
    bf16_run = any("bf16" in n for n in wanted)
    one_pass = one_pass_kernels(model, shape, bf16_run)
    if dev.type == "cpu":
        print("# " + describe_cpu() + ("" if not bf16_run else " | bf16 products: " + (
            "AMX tiles (cpu_kernels.baked_mlp_amx)" if one_pass["fast_grid_bf16"] else "PyTorch")))
    print("# matmul peak GFLOP/s: " + " ".join(f"{k}={v:.1f}" for k, v in peaks.items())
          + f"; decoder matmul-bound floor (fp32): {peaks['float32'] * 1e9 / fpp.get('fast_grid', 2.0 * flops['decoder']):.4g} points/s"
          + f"; plain-path FLOPs floor: {peaks['float32'] * 1e9 / (2.0 * (flops['fusion_full'] + flops['decoder'])):.4g} points/s")
    base = None
    for n in wanted:
        t = median(times[n])
        pps = args.members * P / t
        if n == "plain":
            base = pps
        peak = peaks["bfloat16" if "bf16" in n else "float16" if "fp16" in n else "float32"]
        floor = peak * 1e9 / (2.0 * flops["decoder"])
        err = (outs[n] - ref).abs().max().item()
        rel = ((outs[n] - ref).norm() / ref.norm()).item()
        print(f"path={n} points_per_s={pps:.6g} bake_s={bake['plain' if n == 'plain' else 'fast']:.4g} "
              f"ratio_vs_plain={(pps / base) if base else float('nan'):.3f} "
              f"gflops={fpp[n] * pps / 1e9:.2f} peak_gflops={peak:.1f} floor_frac={pps / floor:.3f} "
              f"peak_mem_mb={mem[n]:.1f} max_abs_err={err:.3g} rel_l2_err={rel:.3g} median_s={t:.4g}",
              flush=True)
    if args.breakdown:
        print_breakdown(args, model, shape, conds, chunk, flops, peaks, outs, wanted, P, per_pass, one_pass)


def one_pass_kernels(model, shape, bf16: bool) -> dict:
    """Which one-pass kernel ``predict_grid`` runs here on ``shape``: {"fast_grid": fp32 cpu_kernels.baked_mlp,
    "fast_grid_bf16": bf16 cpu_kernels.baked_mlp_amx} (the model's own tests, so the answer is what it does; the
    bf16 one only with ``bf16``: it needs the bf16 copy of the table, made only when a bf16 path runs)."""
    from models.fast_ops import grid_query

    cpu = model._baked_fused.device.type == "cpu"
    q = grid_query(shape, model.ssr_shape, model._baked_fused.device)     # (the query predict_grid uses)
    return {"fast_grid": cpu and model._mlp_args(model._baked_fused, q) is not None,
            "fast_grid_bf16": cpu and bf16 and
            model._amx_args(model._lowp(torch.bfloat16)[0], torch.bfloat16) is not None}


def print_breakdown(args, model, shape, conds, chunk, flops, peaks, outs, wanted, P, per_pass, one_pass) -> None:
    """Where the fast paths' time goes. With a one-pass kernel (fp32: cpu_kernels.baked_mlp; bf16 on AMX:
    cpu_kernels.baked_mlp_amx; ``one_pass``: :func:`one_pass_kernels`) the kernel with no hidden layer (rows +
    bias + ReLU + output layer) against the whole kernel, the hidden products being the difference (``kernel=``
    lines); then the per-pass path (DRR_BAKED_MLP=off, or whatever predict_grid runs when no kernel applies) pass
    by pass (``grid_breakdown``)."""
    from models.fast_ops import grid_query

    q = grid_query(shape, model.ssr_shape, model._baked_fused.device)
    for n, dt, kernel in (("fast_grid", None, "baked_mlp"), ("fast_grid_bf16", torch.bfloat16, "baked_mlp_amx")):
        if not (one_pass[n] and n in wanted and (dt is None or q.identity)):   # (bf16: rows read in order)
            continue
        parts = [baked_breakdown(model, q, c, dt) for c in conds]                     # warm-up
        parts = [baked_breakdown(model, q, c, dt) for c in conds for _ in range(args.repeats)]
        tot = {k: median([pp[k] for pp in parts]) * args.members for k in ("gather_out", "total")}
        hidden_s = tot["total"] - tot["gather_out"]
        peak = peaks["float32" if dt is None else "bfloat16"]
        floor_s = args.members * P * 2.0 * flops["decoder"] / (peak * 1e9)
        print(f"breakdown path={n} kernel={kernel} gather_out_s={tot['gather_out']:.4g} "
              f"hidden_products_s={hidden_s:.4g} total_s={tot['total']:.4g} "
              f"gather_out_frac={tot['gather_out'] / tot['total']:.3f} matmul_floor_s={floor_s:.4g} "
              f"floor_frac_of_total={floor_s / tot['total']:.3f} "
              f"floor_frac_of_hidden_products={floor_s / hidden_s if hidden_s > 0 else float('nan'):.3f}",
              flush=True)
    names = {"fast_grid": None, "fast_grid_bf16": torch.bfloat16, "fast_grid_fp16": torch.float16}
    for n in [n for n in wanted if n in names]:
        dt = names[n]
        label = n + "_torch" if one_pass.get(n) else n
        ref = outs[n] if label == n else per_pass(lambda: torch.stack([model.predict_grid(shape, c, chunk, dtype=dt)
                                                                        for c in conds]))
        parts = [grid_breakdown(model, shape, c, chunk, dt) for c in conds]   # warm-up
        parts = [grid_breakdown(model, shape, c, chunk, dt) for c in conds for _ in range(args.repeats)]
        tot = {k: median([pp[k] for pp in parts]) * args.members for k in parts[0] if k != "out"}
        err = max((pp["out"] - o).abs().max().item() for pp, o in zip(parts[::args.repeats], ref))
        peak = peaks["bfloat16" if dt is torch.bfloat16 else "float16" if dt is torch.float16 else "float32"]
        floor_s = args.members * P * 2.0 * flops["decoder"] / (peak * 1e9)
        total = sum(tot.values())
        print(f"breakdown path={label} " + " ".join(f"{k}_s={v:.4g}" for k, v in tot.items())
              + f" total_s={total:.4g} " + " ".join(f"{k}_frac={v / total:.3f}" for k, v in tot.items())
              + f" matmul_floor_s={floor_s:.4g} floor_frac_of_total={floor_s / total:.3f} "
              f"floor_frac_of_matmul={floor_s / tot['matmul']:.3f} max_abs_diff_vs_path={err:.3g}", flush=True)


@torch.no_grad()
def baked_breakdown(model, q, c, dtype=None) -> dict:
    """Seconds of one member through the one-pass kernel on the whole lattice (``total``; fp32
    ``cpu_kernels.baked_mlp``, bf16 ``cpu_kernels.baked_mlp_amx`` on the identity lattice) and through the same
    kernel without the hidden layers (``gather_out``: the table rows or their interpolation, the condition bias,
    the ReLU and the output layer)."""
    import time

    from models import cpu_kernels

    table = model._baked_fused if dtype is None else model._lowp(dtype)[0]
    args = model._mlp_args(table, q) if dtype is None else model._amx_args(table, dtype)
    packed, hbias, w_out, b_out = args
    cb = model.cond_bias(c.reshape(1, -1).to(table.device, torch.float32))[0].contiguous()
    out = torch.empty(q.num_points)
    t = {}
    for key, L in (("gather_out", 0), ("total", packed.shape[0])):
        t0 = time.perf_counter()
        if dtype is None:
            cpu_kernels.baked_mlp(q, 0, q.num_points, table, cb, packed[:L], hbias[:L], w_out, b_out, out)
        else:
            cpu_kernels.baked_mlp_amx(table, cb, packed[:L], hbias[:L], w_out, b_out, out)
        t[key] = time.perf_counter() - t0
    return t


@torch.no_grad()
def grid_breakdown(model, shape, c, chunk_size, dtype=None) -> dict:
    """``DRRNet.predict_grid``'s per-pass baked loop (models/drrnet.py; with ``DRR_BAKED_MLP=off`` on CPU fp32
    where the one-pass decoder applies) with a clock around each pass: seconds of
    ``stencil`` (0: the corners are computed inside the gather pass), ``gather`` (GridQuery.gather_bias_relu:
    the interpolation of the folded table, or its rows on the identity lattice, plus the condition bias and
    the first ReLU; compiled in one pass on CPU fp32, else stencil tensors + gather_interp + add + relu),
    ``matmul`` (the decoder's addmm, bias included; on CPU fp32 the hidden layers' oneDNN linear with its ReLU
    fused, so their ReLU counts here), ``activation`` (ReLU passes, the output activation and the
    copy into the result), and ``out`` (the field, to check against predict_grid). Timers add a little
    overhead per chunk; the sum is close to the path's time."""
    import time

    from models.components.mlp import output_activation
    from models.drrnet import _linear_relu_onednn, _onednn_linear_relu_ok, _output_activation_
    from models.fast_ops import GridQuery

    if not model.is_baked:
        model.bake()
    dev = model._baked_fused.device
    c = c.reshape(1, -1).to(dev, torch.float32)
    lins = model.decoder.linears
    cb = model.cond_bias(c)[0]
    if dtype is None or dtype == model._baked_fused.dtype:
        table = model._baked_fused
        wb = [t for m in lins for t in (m.weight, m.bias)]
    else:
        table, *wb = model._lowp(dtype)
        cb = cb.to(dtype)
    P = math.prod(shape)
    res = torch.empty(P, device=dev, dtype=torch.float32)
    q = GridQuery(shape, model.ssr_shape, dev)
    n = min(int(chunk_size), P)
    H = table.shape[1]
    bufs = [torch.empty(n, H, device=dev, dtype=table.dtype) for _ in range(2)]
    w_t = [wb[2 * i].t() for i in range(len(lins))]
    t = dict(stencil=0.0, gather=0.0, matmul=0.0, activation=0.0)
    clock = time.perf_counter
    cb = cb.contiguous()
    last = len(lins) - 1
    direct = table.dtype == torch.float32 and w_t[last].shape[1] == 1
    fused_relu = direct and dev.type == "cpu" and _onednn_linear_relu_ok()
    for s, e in q.chunks(chunk_size):
        m = e - s
        t0 = clock()
        h = q.gather_bias_relu(table, s, e, cb, bufs[0][:m])      # stencil, gather, + cb and ReLU in one
        t["gather"] += clock() - t0                               # pass (compiled: no stencil tensors)
        for i in range(len(lins)):
            t0 = clock()
            if i < last and fused_relu:                           # oneDNN linear with the ReLU fused
                h = _linear_relu_onednn(h, wb[2 * i], wb[2 * i + 1])
                t1 = clock()
            elif i < last and w_t[i].shape[1] == H:
                nxt = bufs[(i + 1) % 2][:m]
                torch.addmm(wb[2 * i + 1], h, w_t[i], out=nxt)
                t1 = clock()
                h = nxt.relu_()
            elif i == last and direct:
                h = torch.addmm(wb[2 * i + 1], h, w_t[i], out=res[s:e].view(m, 1))
                t1 = clock()
            else:
                h = torch.addmm(wb[2 * i + 1], h, w_t[i])
                t1 = clock()
                if i < last:
                    h = h.relu_()
            t["matmul"] += t1 - t0
            t["activation"] += clock() - t1
        t0 = clock()
        if direct:
            _output_activation_(res[s:e], model.out_activation)
        else:
            res[s:e] = output_activation(h[:, 0].float(), model.out_activation)
        t["activation"] += clock() - t0
    t["out"] = res.reshape(shape)
    return t


def compare_models(args) -> None:
    """Bake and reconstruct a full field with each config id of ``--compare``, interleaved (any FieldModel)."""
    if not args.config:
        raise SystemExit("--compare needs --config")
    ids = [int(i) for i in args.compare.split(",") if i.strip()]
    models, descs, inputs = [], [], []
    for i in ids:
        args.config_id = i
        model, exp, desc = build_from_args(args)
        model.eval()
        models.append(model)
        descs.append(f"{i}:{exp['model']['type']}")
        inputs.append(config_model_inputs(exp, args))
    dev = device_of(args)
    d = int(inputs[0]["spatial_dims"])
    res = args.resolution or [256]
    shape = tuple(res * d if len(res) == 1 else res)
    chunk = args.chunk_size or (1 << 18 if dev.type == "cuda" else 1 << 16)
    P = math.prod(shape)
    g = torch.Generator().manual_seed(args.seed + 1)
    bake = {i: [] for i in ids}
    fwd = {i: [] for i in ids}
    for rep in range(args.repeats + 1):                                      # repetition 0: warm-up
        for i, m, inp in zip(ids, models, inputs):
            c = torch.rand(args.members, int(inp["cond_dim"]), generator=g).to(dev)
            tb = timed(m.bake, dev)
            tf = timed(lambda: [m.predict_grid(shape, cc, chunk) for cc in c], dev)
            if rep:
                bake[i].append(tb)
                fwd[i].append(tf)
    print(f"# config={args.config} device={dev} threads={torch.get_num_threads()} shape={list(shape)} "
          f"members={args.members} chunk={chunk} repeats={args.repeats}")
    base = None
    for i, desc, m in zip(ids, descs, models):
        tb, tf = median(bake[i]), median(fwd[i])
        total = tb + tf
        base = base or total
        params = sum(p.numel() for p in m.parameters())
        print(f"model={desc} params={params} bake_s={tb:.4g} forward_s={tf:.4g} infer_s={total:.4g} "
              f"points_per_s={args.members * P / tf:.6g} ratio_vs_first={total / base:.3f}", flush=True)


if __name__ == "__main__":
    main()
