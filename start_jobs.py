#!/usr/bin/env python
"""Run a list of experiments: train (and test) each, one per GPU at a time, or one at a time on CPU.

Jobs are ``CONFIG:IDS`` with IDS a number, a comma list or a range (``configs/demo/baselines.yaml:0-2``), or
given in a YAML file (``--jobs_file``: a list of {config: F, ids: [..], set: [k=v, ...]}).

    python start_jobs.py configs/demo/drrnet.yaml:0 configs/demo/baselines.yaml:0-2
    python start_jobs.py --dry-run configs/nyx/drrnet.yaml:0-4 --set train.epochs=1

Each job runs ``train.py`` then ``test.py`` (unless --no_test) with its output in ``<log_dir>/<run>.log``, in the
current working directory, as if started there by hand: config paths, ``train.log_dir`` and data paths that are
relative mean the same as for train.py, from any folder.
A job whose run already finished (``finished.json``, and ``eval/metrics.csv`` when testing) is skipped unless
``--rerun`` (which passes --overwrite). At the end a summary lists every job's exit code; the script's exit
code is 1 if any job failed. Ctrl-C terminates the running jobs and reports them as interrupted.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional


HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Job:
    config: str
    config_id: int
    overrides: List[str] = field(default_factory=list)
    run_dir: str = ""
    log_path: str = ""
    status: str = "pending"  # pending | skipped | running | ok | failed(N) | interrupted
    code: Optional[int] = None
    run_dir_existed: bool = True  # set when the job starts

    @property
    def label(self) -> str:
        return f"{self.config}:{self.config_id}"


def parse_ids(text: str, where: str) -> List[int]:
    ids: List[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
            else:
                a = b = int(part)
        except ValueError:
            raise SystemExit(f"error: '{where}': ids must look like 3, 0,2 or 0-4")
        if a > b:
            raise SystemExit(f"error: '{where}': the range {part} is reversed (first id {a} > last id {b}); "
                             f"write {b}-{a}")
        ids += list(range(a, b + 1))
    return ids


def collect_jobs(args) -> List[Job]:
    from util.config import read_config_file
    from util.config.reader import read_yaml_file

    jobs: List[Job] = []
    specs = []
    for item in args.jobs:
        cfg, _, ids = item.rpartition(":") if ":" in item else (item, "", "")
        specs.append((cfg, parse_ids(ids, item) if ids else None, []))
    if args.jobs_file:
        if not os.path.isfile(args.jobs_file):
            raise SystemExit(f"error: jobs file '{args.jobs_file}' not found (relative paths are relative to the "
                             f"current folder, {os.getcwd()})")
        entries = read_yaml_file(args.jobs_file, "jobs file") or []
        if not isinstance(entries, list):
            raise SystemExit(f"error: {args.jobs_file} must hold a list of {{config, ids, set}}")
        for e in entries:
            if not isinstance(e, dict) or "config" not in e:
                raise SystemExit(f"error: {args.jobs_file}: every entry needs 'config' (got {e!r})")
            ids = e.get("ids")
            ids = parse_ids(str(ids), args.jobs_file) if isinstance(ids, (int, str)) else ids
            if ids is not None and (not isinstance(ids, list) or not all(type(i) is int for i in ids)):
                raise SystemExit(f"error: {args.jobs_file}: 'ids' of {e['config']} must be a number, a list of "
                                 f"numbers or a text like 0-4, got {ids!r}")
            specs.append((e["config"], ids, list(e.get("set", []))))
    for cfg, ids, extra in specs:
        n = len(read_config_file(cfg))
        for i in ids if ids is not None else range(n):
            if not 0 <= i < n:
                raise SystemExit(f"error: {cfg} holds {n} configs; id {i} is out of range")
            jobs.append(Job(cfg, i, extra + list(args.set)))
    if not jobs:
        raise SystemExit("error: no jobs given")
    return jobs


def job_commands(job: Job, args) -> List[List[str]]:
    base = ["--config", job.config, "--config_id", str(job.config_id)]
    for s in job.overrides:
        base += ["--set", s]
    train = [sys.executable, os.path.join(HERE, "train.py")] + base + ["--no_progress"]
    if args.rerun:
        train.append("--overwrite")
    cmds = [train]
    if not args.no_test:
        test = [sys.executable, os.path.join(HERE, "test.py")] + base + ["--no_progress"]
        if args.rerun:
            test.append("--overwrite")
        cmds.append(test)
    return cmds


def is_finished(job: Job, args) -> bool:
    if not os.path.isfile(os.path.join(job.run_dir, "finished.json")):
        return False
    return args.no_test or os.path.isfile(os.path.join(job.run_dir, "eval", "metrics.csv"))


def slots(args) -> List[Optional[str]]:
    """One entry per concurrent job: a GPU id, or None for CPU."""
    if args.gpus is not None:
        return [g for g in args.gpus.split(",") if g != ""] or [None]
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    return [str(i) for i in range(n)] or [None]


def _shell_line(cmd) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def _start(job: Job, args, gpu: Optional[str]) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    else:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "") if args.gpus is None else ""
    script = " && ".join(_shell_line(c) for c in job_commands(job, args))
    log = open(job.log_path, "a")
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} gpu={gpu} : {script}\n")
    log.flush()
    # own process group so Ctrl-C handling can stop the whole job (train + test + accelerate children)
    # run in the caller's working directory, as train.py / test.py started by hand would: relative config paths,
    # train.log_dir and dataset paths mean the same as for the job's run_dir computed here
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=os.getcwd(), start_new_session=True)


def remove_empty_run_dir(job: Job) -> None:
    """After a job that failed or was interrupted: remove its run folder when the job created it and left it empty
    (os.rmdir: a folder holding anything, or one that existed before the job, is never touched)."""
    if job.run_dir_existed or not job.run_dir or not os.path.isdir(job.run_dir) or os.path.islink(job.run_dir):
        return
    try:
        if not os.listdir(job.run_dir):
            os.rmdir(job.run_dir)
            print(f"[clean] {job.label}: removed the empty run folder {job.run_dir} it left", flush=True)
    except OSError:
        pass


def run(jobs: List[Job], args) -> int:
    free = slots(args)
    running = {}  # pid -> (job, popen, gpu)
    queue = [j for j in jobs if j.status == "pending"]
    try:
        while queue or running:
            while queue and free:
                job, gpu = queue.pop(0), free.pop(0)
                job.run_dir_existed = os.path.lexists(job.run_dir) if job.run_dir else True
                p = _start(job, args, gpu)
                job.status = "running"
                running[p.pid] = (job, p, gpu)
                print(f"[start] {job.label} (gpu {gpu if gpu is not None else 'cpu'}) -> {job.log_path}", flush=True)
            for pid, (job, p, gpu) in list(running.items()):
                code = p.poll()
                if code is None:
                    continue
                job.code = code
                job.status = "ok" if code == 0 else f"failed({code})"
                print(f"[done ] {job.label}: {job.status}", flush=True)
                if code != 0:
                    remove_empty_run_dir(job)
                del running[pid]
                free.append(gpu)
            time.sleep(args.poll)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping running jobs", flush=True)
        for job, p, _ in running.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for job, p, _ in running.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            job.status, job.code = "interrupted", p.returncode
            remove_empty_run_dir(job)
        for j in queue:
            j.status = "not started"
    return summary(jobs)


def summary(jobs: List[Job]) -> int:
    print("\nsummary:")
    width = max(len(j.label) for j in jobs)
    for j in jobs:
        code = "" if j.code is None else f" (exit {j.code})"
        print(f"  {j.label.ljust(width)}  {j.status}{code}  {j.run_dir}")
    bad = [j for j in jobs if j.status not in ("ok", "skipped")]
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", nargs="*", help="CONFIG:IDS items (IDS: 3, 0,2 or 0-4; omitted: every config in the file)")
    p.add_argument("--jobs_file", help="YAML list of {config, ids, set}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every job")
    p.add_argument("--gpus", help="comma list of GPU ids to use (default: all visible; '' = CPU)")
    p.add_argument("--no_test", action="store_true", help="train only")
    p.add_argument("--rerun", action="store_true", help="run finished jobs again (passes --overwrite)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only")
    p.add_argument("--log_dir", default="runs/job_logs", help="folder for one log file per job")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    sys.path.insert(0, HERE)
    import yaml

    from util.config import load_config
    from util.run_dir import run_dir_of

    def one_line(e):
        return " ".join(str(e).split())

    try:
        jobs = collect_jobs(args)
    except (ValueError, FileNotFoundError, FileExistsError, yaml.YAMLError) as e:
        raise SystemExit(f"error: {one_line(e)}")  # ValueError covers ConfigError
    for j in jobs:
        try:
            j.run_dir = run_dir_of(load_config(j.config, j.config_id, j.overrides))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {j.label}: {one_line(e)}")
        j.log_path = os.path.join(args.log_dir, os.path.basename(j.run_dir) + ".log")
        if not args.rerun and is_finished(j, args):
            j.status = "skipped"
    if args.dry_run:
        for j in jobs:
            tag = "# skip (finished): " if j.status == "skipped" else ""
            for c in job_commands(j, args):
                print(tag + _shell_line(c))
        return 0
    os.makedirs(args.log_dir, exist_ok=True)

    def _term(signum, frame):  # treat SIGTERM like Ctrl-C: stop the children, print the summary
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    return run(jobs, args)


if __name__ == "__main__":
    sys.exit(main())
