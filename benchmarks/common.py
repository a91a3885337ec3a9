"""Shared helpers of the benchmarks (benchmarks/bench_inference.py, benchmarks/bench_train.py).

* model construction without data: ``--config F --config_id N`` (the ``model`` section, cond_dim /
  spatial_dims from ``--cond_dim`` / ``--spatial_dims``) or ``--paper clover|nyx|mpas``
  (``models.drrnet.PAPER_CONFIGS``), plus ``--model_set key=value`` overrides of model keys (YAML values);
  random weights, the grids and lines re-initialised U(-1, 1) so that every path sees non-trivial features;
* timing with device synchronization (CUDA) and medians over interleaved repetitions, so that load from
  other processes on a shared machine hits every path alike;
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` (minus what was allocated before); CPU the peak of
  the bytes in use by malloc (glibc ``mallinfo2``: heap + mmapped blocks, where PyTorch's CPU tensors live)
  sampled every 1 ms by a thread, minus the bytes before; without glibc >= 2.33 the resident set size is
  sampled instead, which misses memory the allocator reuses (``tracemalloc`` does not see PyTorch's
  allocations and ``ru_maxrss`` is a process-lifetime maximum);
* the measured matmul peak of the machine (median GFLOP/s of fp32 (and bf16) ``torch.mm`` at a few sizes;
  one multiply-add = 2 FLOP).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from util.device import default_device  # noqa: E402 (after the sys.path set-up)
from util.timing import synchronize  # noqa: E402 (after the sys.path set-up)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="experiment YAML (its model section is used)")
    p.add_argument("--config_id", type=int, default=0)
    p.add_argument("--paper", default=None, choices=["clover", "nyx", "mpas"],
                   help="use models.drrnet.PAPER_CONFIGS[name] instead of a config file")
    p.add_argument("--model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model key (YAML value), e.g. ssr_resolution=64; repeatable")
    p.add_argument("--cond_dim", type=int, default=None, help="d_c (default: the paper config's, else 4)")
    p.add_argument("--spatial_dims", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: all)")
    p.add_argument("--seed", type=int, default=0)


def config_model_inputs(exp, args) -> Dict[str, int]:
    """A config's model inputs without data (util.build.resolve_model_inputs): the task's when it knows them
    (e.g. images: 2D, no condition), else --cond_dim (default 4) / --spatial_dims."""
    from util.build import resolve_model_inputs

    return resolve_model_inputs(exp, data=False, defaults={"cond_dim": args.cond_dim or 4,
                                                           "spatial_dims": args.spatial_dims})


# tasks whose models are fields f(x, c) queried on points, which these benchmarks time; the others are timed by
# their evaluation
BENCHMARKED_TASKS = ("ensemble", "image")
TIMED_ELSEWHERE = {"terrain": "test.py (encode / decode ms per tile, medians) and test_flops.py (FLOPs per pixel)",
                   "nerf": "test.py (render seconds per test view after the bake) and train.py's timing.json",
                   "moe_inr": "test.py (decompression seconds) and train.py's timing.json"}


def build_from_args(args):
    """(model, exp-or-None, description) from the model arguments; the model is on ``args.device``."""
    from util.config import yaml_load

    import models  # noqa: F401  (registers the model classes)
    from models.drrnet import PAPER_CONFIGS, DRRNet

    torch.manual_seed(args.seed)
    overrides = {}
    for kv in args.model_set:
        k, _, v = kv.partition("=")
        overrides[k.strip()] = yaml_load(v)
    if args.paper:
        cfg = dict(PAPER_CONFIGS[args.paper])
        cond_dim = args.cond_dim or int(cfg.pop("cond_dim"))
        cfg.pop("cond_dim", None)
        model = DRRNet(cond_dim=cond_dim, spatial_dims=args.spatial_dims, **{**cfg, **overrides})
        exp, desc = None, f"paper:{args.paper}"
    elif args.config:
        import datasets  # noqa: F401
        from util.build import build_model, task_type_of
        from util.config import load_config

        exp = load_config(args.config, args.config_id)
        task = task_type_of(exp)
        if task not in BENCHMARKED_TASKS:
            raise SystemExit(f"{os.path.basename(sys.argv[0])}: {args.config}#{args.config_id} is a '{task}' run; these "
                             f"benchmarks time field models f(x, c) ({', '.join(BENCHMARKED_TASKS)} tasks); "
                             f"'{task}' is timed by {TIMED_ELSEWHERE.get(task, 'its evaluation (test.py)')}")
        exp["model"].update(overrides)
        model = build_model(exp, inputs=config_model_inputs(exp, args))
        desc = f"{args.config}#{args.config_id}"
    else:
        raise SystemExit("give --config F [--config_id N] or --paper NAME")
    if overrides:
        desc += " " + " ".join(args.model_set)
    scramble(model)
    return model.to(device_of(args)), exp, desc


def device_of(args) -> torch.device:
    """``--device`` as a torch.device; default: cuda when available (util.device.default_device)."""
    return default_device(args.device)


def setup_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


@torch.no_grad()
def scramble(model, a: float = 1.0, seed: int = 2) -> None:
    """Grids and condition lines U(-a, a) (the default 1e-3 init makes every feature nearly constant)."""
    g = torch.Generator().manual_seed(seed)
    for name in ("spatial_grids", "cond_lines"):
        mod = getattr(model, name, None)
        if mod is None:
            continue
        for p in mod.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 * a - a).to(p.device, p.dtype))


sync = synchronize  # util.timing.synchronize: the one CUDA sync of every timing


def timed(fn: Callable[[], object], device) -> float:
    """Wall seconds of ``fn()`` (synchronized on CUDA)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median(xs: List[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_reader() -> Optional[Callable[[], int]]:
    """Bytes in use by glibc malloc (heap in use + mmapped blocks), or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def read() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)
    return read


_MALLOC_BYTES = _malloc_reader()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: ru_maxrss (a lifetime maximum) is the best available
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``; then ``pm.peak_mb``: peak extra memory inside the block."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.read = _MALLOC_BYTES or _rss_bytes
            self.base = self.read()
            self.peak = self.base
            self.stop = threading.Event()

            def poll():
                while not self.stop.is_set():
                    self.peak = max(self.peak, self.read())
                    time.sleep(0.001)

            self.thread = threading.Thread(target=poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.read())
            self.peak_mb = (self.peak - self.base) / 2 ** 20
        return False


class MatmulPeak:
    """The measured matmul GFLOP/s per dtype (2 FLOP per multiply-add), sampled as often as a benchmark likes.

    On construction each dtype's sizes are timed ``repeats`` times and the fastest size (by median) is kept;
    :meth:`sample` times that size again per dtype. A benchmark that calls it between the repetitions of the
    paths it compares with the floor measures numerator and denominator in the same window (the machines' speed
    drifts by 10-30% between minutes). :meth:`peaks` is each dtype's median over all its samples of the kept size.
    """

    def __init__(self, device, dtypes=(torch.float32,), sizes=((32768, 128, 128), (4096, 1024, 1024)),
                 repeats: int = 7):
        self.device = torch.device(device)
        self.kept = {}                                   # dtype name -> (flop, a, b, samples)
        for dt in dtypes:
            best = None
            for m, k, n in sizes:
                a = torch.randn(m, k, device=self.device).to(dt)
                b = torch.randn(k, n, device=self.device).to(dt)
                torch.mm(a, b)
                ts = [timed(lambda: torch.mm(a, b), self.device) for _ in range(max(1, int(repeats)))]
                flop = 2.0 * m * k * n
                if best is None or flop / median(ts) > best[0] / median(best[3]):
                    best = (flop, a, b, ts)
            self.kept[str(dt).replace("torch.", "")] = best

    def sample(self, repeats: int = 3) -> None:
        """Time each dtype's kept size ``repeats`` more times, after one untimed product (the operands back in the
        caches, as in the first burst: a single product right after other work ran 15-25% slower here)."""
        for flop, a, b, ts in self.kept.values():
            torch.mm(a, b)
            ts.extend(timed(lambda: torch.mm(a, b), self.device) for _ in range(max(1, int(repeats))))

    def peaks(self) -> Dict[str, float]:
        return {name: flop / median(ts) / 1e9 for name, (flop, a, b, ts) in self.kept.items()}


def model_flops(model) -> Dict[str, float]:
    """Multiply-adds per point / per vertex of a DRRNet's parts (1 MAC counted as 2 FLOP by the callers).

    Keys: fusion_full (the plain fusion layer, (D_sp + D_c) x hidden), fusion_cond (D_c x hidden, once per
    condition), fold (D_sp x hidden), decoder, spatial_refiner (per lattice vertex).
    """
    H = model.fusion[0].out_features
    D_sp, D_c = model.spatial_feature_dim, model.cond_feature_dim
    dec = sum(m.in_features * m.out_features for m in model.decoder.modules() if isinstance(m, torch.nn.Linear))
    ref = 0
    if model.spatial_refiner is not None:
        for blk in model.spatial_refiner.blocks:
            ref += 3 * blk.hidden * D_sp
    return dict(fusion_full=(D_sp + D_c) * H, fusion_cond=D_c * H, fold=D_sp * H, decoder=dec,
                spatial_refiner=ref)
