"""Mutation check of tests/test_mutation_survivors.py: apply each plausible one-line bug to a private copy of the
tree, run the test written to catch it, report killed / survived (not a test itself; run it by hand).

    python tests/mutation_check.py [SOURCE_TREE] [NAME_FILTER]

SOURCE_TREE (default: this repository) is copied to /tmp/mut; each mutation is one (old -> new) text replacement,
found by searching every non-test .py file of the copy (it must occur exactly once, so moved files are found),
applied, the matching tests of tests/test_mutation_survivors.py run (OMP_NUM_THREADS=1), and the file restored.
The unmutated copy must pass first.
"""
import os
import shutil
import subprocess
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""
DST = "/tmp/mut"
TEST = "tests/test_mutation_survivors.py"

# (id, description, old, new, pytest -k expression)
MUTATIONS = [
    ("1", "MoE decompression: every step at step 0's coordinates",
     "flat = np.arange(t * per + s, t * per + min(per, s + chunk_size), dtype=np.int64)",
     "flat = np.arange(s, min(per, s + chunk_size), dtype=np.int64)", "moe_decompresses"),
    ("2a", "test.py: model predicts every member at the first member's condition (grid path, baked DRR-Net)",
     "pred = model.predict_grid(shape, c.to(device), grid_chunk,",
     "pred = model.predict_grid(shape, dataset.conds([int(rows[0])])[0].to(device), grid_chunk,", "dumped"),
    ("2b", "test.py: the same in the forward path (models without a fast path)",
     "pred = predict_field(model, coords, c.to(device), shape, tc.chunk_size, autocast)",
     "pred = predict_field(model, coords, dataset.conds([int(rows[0])])[0].to(device), shape, tc.chunk_size, autocast)",
     "dumped"),
    ("3", "wins counted against references of any resolution",
     'if key is None or split != res["split"] or resolution != res["resolution"]:',
     'if key is None or split != res["split"]:', "wins"),
    ("4a", "MoE slice SSIM at data range 1 instead of 2",
     "torch.from_numpy(np.ascontiguousarray(np.take(gt, i, axis))), data_range=DATA_RANGE))",
     "torch.from_numpy(np.ascontiguousarray(np.take(gt, i, axis)))))", "slice_ssim"),
    ("4b", "SSIM: C1 ignores the data range",
     "c1 = (k1 * data_range) ** 2", "c1 = k1 ** 2", "data_range_2"),
    ("5a", "SSIM short axis: window one step too small on odd axes",
     "sizes.append(n if n % 2 == 1 else n - 1)", "sizes.append(n - 2 if n % 2 == 1 else n - 1)", "shorter"),
    ("5b", "SSIM short axis: sigma shrunk with the window",
     "taps = [gaussian_window(s, sigma).tolist() for s in sizes]",
     "taps = [gaussian_window(s, sigma * s / win_size).tolist() for s in sizes]", "shorter"),
    ("6", "dataset means skip NaN members (nanmean)",
     "out[name] = float(np.mean(vals)) if vals else math.nan",
     "out[name] = float(np.nanmean(vals)) if vals else math.nan", "nan_member"),
    ("7", "init_output_mean auto: median of the training values",
     "self._train_mean = float(self._store.mean(dtype=np.float64))",
     "self._train_mean = float(np.median(self._store))", "init_output_mean"),
    ("8", "collapse detector needs constant output AND zero gradients",
     "self.streak = self.streak + 1 if (constant or zero) else 0",
     "self.streak = self.streak + 1 if (constant and zero) else 0", "collapse"),
    ("9", "occupancy update at cell centres (no jitter)",
     "u = (c + torch.rand(c.shape, device=c.device, dtype=c.dtype, generator=generator)) / R",
     "u = (c + 0.5) / R", "occupancy"),
    ("10", "Functa inner lr: mean instead of per element",
     "z = z - self.inner_lr * g", "z = z - self.inner_lr.mean() * g", "functa"),
    ("11", "train.grad_clip ignored",
     "accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)", "pass", "grad_clip"),
    ("12", "epochs -> steps rounded instead of ceil",
     "return max(1, int(math.ceil(float(tc.epochs) * steps_per_epoch)))",
     "return max(1, int(round(float(tc.epochs) * steps_per_epoch)))", "epochs"),
    ("13", "MoE variance regularizer target not detached",
     "reg = ((var - ((mean - v) ** 2).detach()) ** 2).mean()",
     "reg = ((var - ((mean - v) ** 2)) ** 2).mean()", "variance_regularizer"),
    ("14", "terrain rmse_grad = mean of tile RMSEs",
     '"rmse_grad": math.sqrt(float(per["grad_se"].mean())),',
     '"rmse_grad": float(per["grad_se"].sqrt().mean()),', "rmse_grad"),
    ("15a", "psnr_from_mse on tensors ignores the data range",
     ["return 10.0 * torch.log10(data_range ** 2 / m64)", "return 10.0 * torch.log10(data_range ** 2 / m_t)"],
     ["return 10.0 * torch.log10(1.0 / m64)", "return 10.0 * torch.log10(1.0 / m_t)"], "psnr_from_mse"),
    ("15b", "psnr_from_mse: tensors fall through to the scalar branch",
     "if isinstance(m, torch.Tensor):", "if isinstance(m, torch.Tensor) and m.ndim == 0:", "psnr_from_mse"),
]


def sources(root):
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in (".git", "tests", "__pycache__", "runs", "data")]
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def run_test(k):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TEST, "-k", k],
                       cwd=DST, env=env, capture_output=True, text=True, timeout=600)
    lines = p.stdout.splitlines()
    last = [l for l in lines if l.strip()][-1:] or ["?"]
    why = next((l[1:].strip() for l in lines if l.startswith("E ")), "")
    return p.returncode, last[0] + (f" | {why[:110]}" if why else "")


def main():
    shutil.rmtree(DST, ignore_errors=True)
    shutil.copytree(SRC, DST, ignore=shutil.ignore_patterns(".git", "__pycache__", "data", "runs", "runs_*"))
    rc, line = run_test("not nothing_matches_this")
    print(f"baseline (no mutation): rc={rc}  {line}")
    if rc != 0:
        sys.exit("the unmutated copy must pass first")
    results = []
    for mid, desc, old, new, k in MUTATIONS:
        if ONLY and ONLY != mid:
            continue
        texts = [(f, open(f).read()) for f in sources(DST)]
        if isinstance(old, list):  # variants of one mutation (the code was reworded): the first one present
            pairs = [(o, n) for o, n in zip(old, new) if any(o in t for _, t in texts)] or [(old[0], new[0])]
            old, new = pairs[0]
        hits = [(f, t) for f, t in texts if old in t]
        if len(hits) != 1 or hits[0][1].count(old) != 1:
            results.append((mid, desc, "-", "NOT APPLIED", f"{sum(t.count(old) for _, t in hits)} matches"))
            continue
        f, text = hits[0]
        try:
            with open(f, "w") as fh:
                fh.write(text.replace(old, new))
            rc, line = run_test(k)
        finally:
            with open(f, "w") as fh:
                fh.write(text)
        results.append((mid, desc, os.path.relpath(f, DST), "killed" if rc != 0 else "SURVIVED", line))
    rc, line = run_test("not nothing_matches_this")
    print(f"after restoring every file: rc={rc}  {line}")
    w = max(len(r[2]) for r in results)
    for mid, desc, f, verdict, line in results:
        print(f"{mid:>4}  {verdict:<8}  {f:<{w}}  {desc}   [{line}]")
    n_killed = sum(r[3] == "killed" for r in results)
    print(f"{n_killed}/{len(results)} mutations killed")


if __name__ == "__main__":
    main()
