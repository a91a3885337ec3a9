"""The training loop (one loop for every model), run under Hugging Face Accelerate.

Works as ``python train.py ...`` (one process, CPU or one GPU) and ``accelerate launch [--num_processes N]
train.py ...`` (data parallel: every process draws its own batch, ``sample_batch(step, rank)``, so N
processes see N x the points per step; gradients are averaged).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from util.build import build_components, task_type_of
from util.checkpoints import (CKPT_DIR, LATEST, TASK_STATE_FILE, checkpoint_dirs, first_tensor_mismatch,
                               load_resume_state, load_weights, newest_intact_checkpoint, verify_checkpoint)
from util.config import ConfigError, TrainConfig, section_kwargs
from util.fingerprint import compare_fingerprints
from util.files import atomic_torch_save, atomic_write_text
from util.cpu import cpu_features, describe as describe_cpu, tune_malloc
from util.metrics import psnr_from_mse
from util.registry import build, get
from util.run_dir import (META_FILE, RUN_MARKER_KEY, RUN_MARKER_VERSION, RunLock, check_run_dir, clear_run_dir,
                          describe_changes, read_meta, resume_changes, run_dir_of, save_experiment)

log = logging.getLogger("train")

LOG_FIELDS = ["step", "loss", "psnr", "lr"]


def resolve_precision(mode: str, cuda: bool) -> str:
    """Accelerate mixed_precision value for a TrainConfig.mixed_precision on this device."""
    if mode == "auto":
        return "fp16" if cuda else "no"
    if mode == "fp16" and not cuda:
        raise ValueError("train.mixed_precision=fp16 needs CUDA (fp16 autocast is GPU-only); use 'no' or 'auto' on CPU")
    return mode


def precision_name(accelerator) -> str:
    """The precision a run trains in: "fp32", "fp16" or "bf16" (Accelerate's "no" is fp32)."""
    mp = str(accelerator.mixed_precision)
    return "fp32" if mp == "no" else mp


def total_steps_of(tc: TrainConfig, steps_per_epoch: int) -> int:
    if tc.max_steps is not None:
        return int(tc.max_steps)
    return max(1, int(math.ceil(float(tc.epochs) * steps_per_epoch)))


def checkpoint_interval(tc: TrainConfig, steps_per_epoch: int) -> int:
    if tc.checkpoint_every_steps:
        return max(1, int(tc.checkpoint_every_steps))
    return max(1, int(round(float(tc.checkpoint_every) * steps_per_epoch)))


def _save_checkpoint(accelerator, run_dir: str, step: int, keep: int, extra: Dict[str, Any], task=None) -> None:
    """Save Accelerate state into checkpoints/step_N via a temporary folder, then repoint ``latest``.

    The folder also gets ``trainer_state.json`` (``step`` and ``extra``) and, with ``task``, the task's
    ``state_dict()`` as ``task_state.pt`` (util.checkpoints.TASK_STATE_FILE, read by
    util.checkpoints.load_task_state), both written into the staged folder before it is renamed.

    A save killed midway leaves at most a ``.tmp_*`` folder; ``latest`` keeps naming the previous checkpoint.
    Rotation keeps the ``keep`` newest checkpoints up to ``step`` and removes any of a higher step (stale).
    """
    root = os.path.join(run_dir, CKPT_DIR)
    name = f"step_{step:07d}"
    tmp = os.path.join(root, f".tmp_{name}")
    final = os.path.join(root, name)
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if task is not None:
            atomic_torch_save(task.state_dict(), os.path.join(tmp, TASK_STATE_FILE))
        atomic_write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(dict(step=step, **extra)))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, LATEST), name)
        # Rotation never deletes the checkpoint just written: a higher step on disk is stale (left by a kill
        # between the rename and the 'latest' update, or skipped by a resume fallback) and goes first.
        older = []
        for s, old in checkpoint_dirs(run_dir):
            if s > step:
                shutil.rmtree(old, ignore_errors=True)
            elif s < step:
                older.append(old)
        for old in older[:max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class _Checkpointed:
    """A task's state (``state_dict`` / ``load_state_dict``) registered with Accelerate's checkpointing, for resume.
    Registered right after the scheduler (index util.checkpoints.LEGACY_TASK_STATE_INDEX: the evaluation of runs
    written before ``task_state.pt`` reads it there); evaluation reads ``task_state.pt``."""

    def __init__(self, task):
        self.task = task

    def state_dict(self) -> Dict[str, Any]:
        return self.task.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.task.load_state_dict(state)


def _validate(accelerator, task, raw_model, step: int, run_dir: str, writer) -> None:
    """Main process: ``task.validate`` in eval mode -> a row of ``val.csv`` (rows after ``step`` from before a
    resume are dropped first) and TensorBoard ``val/*``; the others wait."""
    if accelerator.is_main_process:
        raw_model.eval()
        try:
            scores = task.validate(raw_model)
        finally:
            raw_model.train()
        if scores:
            path = os.path.join(run_dir, "val.csv")
            keys = sorted(scores)
            rows = []
            if os.path.isfile(path):
                with open(path) as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]
            rows.append({"step": step, **{k: f"{scores[k]:.8g}" for k in keys}})
            atomic_write_text(path, "\n".join([",".join(["step"] + keys)] +
                                               [",".join(str(r.get(k, "")) for k in ["step"] + keys) for r in rows])
                              + "\n")
            if writer is not None:
                for k in keys:
                    writer.add_scalar(f"val/{k}", scores[k], step)
            log.info("step %d validation: %s", step, ", ".join(f"{k} {scores[k]:.5g}" for k in keys))
    accelerator.wait_for_everyone()


def skip_together(accelerator, out):
    """A step one process skips (training_step returned None, e.g. a NeRF batch without samples) is skipped by
    every process: a lone skipper would leave the others waiting in the gradient all-reduce. One process: as is."""
    if accelerator.num_processes < 2:
        return out
    skipped = accelerator.reduce(torch.tensor(float(out is None), device=accelerator.device), reduction="sum")
    return None if float(skipped) > 0 else out


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Three float64 numbers that differ when any parameter value differs or moves (plain sum, absolute sum,
    and a sum weighted by position within and across tensors)."""
    out = torch.zeros(3, dtype=torch.float64)
    for i, p in enumerate(model.parameters()):  # on the parameters' device: only 3 numbers reach the CPU
        v = p.detach().flatten().double()
        w = (torch.arange(v.numel(), device=v.device, dtype=torch.float64) % 97 + 1) * (1 + i % 7)
        out += torch.stack([v.sum(), v.abs().sum(), (v * w).sum()]).cpu()
    return out


def check_processes_agree(accelerator, model: torch.nn.Module, step: int, task: str = "") -> None:
    """Multi-process training: every process must hold the same weights (DDP averages the gradients, so the
    optimizer steps are identical). A mismatch means a forward pass bypassed the DDP wrapper (gradients not
    averaged); RuntimeError naming the task. One process: nothing to check."""
    if accelerator.num_processes < 2:
        return
    every = accelerator.gather(weights_fingerprint(model).to(accelerator.device)[None]).cpu()
    if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-9, atol=1e-12):
        raise RuntimeError(f"after step {step} the {accelerator.num_processes} processes hold different weights "
                           f"(fingerprints {every.tolist()}): task '{task}' runs a forward pass outside the DDP "
                           f"wrapper, so its gradients are not averaged (see tasks/base.py: Task)")


def _truncate_log(path: str, step: int) -> None:
    """Keep the rows of log.csv with step <= ``step`` (a resumed run rewrites what follows)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    lines = [",".join(LOG_FIELDS)] + [",".join(r[k] for k in LOG_FIELDS) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def train(exp: Dict[str, Any], overwrite: bool = False, resume: bool = False, progress: bool = True,
          resume_changed: bool = False) -> str:
    """Train the experiment; returns the run directory.

    The run directory is locked (``train.lock``, util.run_dir.RunLock) while the main process trains into it; a
    second process on the same run is refused. With ``overwrite`` the old run is deleted only after the config,
    the data and the model have been validated (a bad data_dir leaves it untouched), and only when train.py wrote
    it (util.run_dir.looks_like_run_dir).

    ``resume`` compares the run's config.yaml with ``exp`` (util.run_dir.resume_changes) and the data's fingerprint
    with meta.json's: the same -> resume; only keys safe to change on resume (intervals, timing, a larger
    ``max_steps``, the test section) -> resume; anything else -> ConfigError naming the keys (or what changed in the
    data), unless ``resume_changed``. Every resume is recorded in meta.json's ``resumes`` list (step, checkpoint,
    changed keys, changed data). A ``max_steps`` below the checkpoint's step is refused.

    Args:
        exp: validated experiment (util.config.load_config).
        overwrite: delete an existing run directory of the same name first.
        resume: continue from the latest intact checkpoint of the existing run directory.
        progress: show a tqdm progress bar (main process).
        resume_changed: resume (implies ``resume``) even though the config or the data differ from the run's;
            the changes are recorded in meta.json's ``resumes``.
    """
    lock = RunLock(run_dir_of(exp))
    try:
        return _train(exp, overwrite, resume or resume_changed, progress, lock, resume_changed)
    finally:
        lock.release()


def _train(exp: Dict[str, Any], overwrite: bool, resume: bool, progress: bool, lock: RunLock,
           resume_changed: bool = False) -> str:
    """The steps of a run, in order; each names what it does (the order of seeds, random draws and collective
    calls is the order of these calls)."""
    tc = TrainConfig(**exp["train"])
    accelerator = _accelerator(exp, tc)
    if accelerator.device.type == "cpu":
        tune_malloc()   # the step's tensors' memory kept between steps (util/cpu.py; recorded in meta.json)
    run_dir = run_dir_of(exp)
    resumed = _claim_run_dir(accelerator, lock, run_dir, overwrite, resume, exp, tc, resume_changed)
    run = _set_up(exp, tc, accelerator, run_dir)
    if overwrite and accelerator.is_main_process:  # config, data and model are valid: now the old run may go
        clear_run_dir(run_dir)
    accelerator.wait_for_everyone()
    start = 0
    if resume:
        _check_resumed_data(run, resumed, resume_changed)
        ck, start = _load_resume_state(run, resumed)  # a damaged checkpoint: the previous intact one
        log.info("resumed from %s at step %d", ck, start)
        if start > run.total:
            raise ConfigError(_past_the_end(run.total, ck, start))
        if resumed is not None:
            resumed["record"].update(step=start, checkpoint=os.path.basename(os.path.normpath(ck)))
    writer = _open_run_files(run, start, resume, resumed)
    timer = _StepTimer(run)
    _step_loop(run, start, writer, timer, progress)
    _finish(run, writer, timer)
    return run_dir


@dataclass
class _Run:
    """What the steps of one run share: the experiment, its train section, Accelerate and the built components."""

    exp: Dict[str, Any]
    tc: TrainConfig
    accelerator: Any
    run_dir: str
    dataset: Any
    task: Any
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    raw_model: torch.nn.Module  # the model itself
    optimizer: Any
    scheduler: Any
    steps_per_epoch: int
    total: int
    ckpt_every: int

    @property
    def log_path(self) -> str:
        return os.path.join(self.run_dir, "log.csv")


def _accelerator(exp: Dict[str, Any], tc: TrainConfig):
    """Accelerate for this machine: CUDA when available, the precision of ``train.mixed_precision``, and DDP told
    whether the task leaves parameters unused in a step."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    unused = bool(get("task", task_type_of(exp)).ddp_find_unused_parameters)
    kwargs = dict(mixed_precision=resolve_precision(tc.mixed_precision, cuda), cpu=not cuda,
                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])
    try:
        return Accelerator(**kwargs)
    except ValueError as e:
        # Accelerate keeps one process-wide state: a second run in the same (single) process with another
        # precision (tests, notebooks) is refused; start that state afresh. A distributed launch has one run.
        from accelerate.state import AcceleratorState, PartialState

        if "already been initialized" not in str(e) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def _claim_run_dir(accelerator, lock: RunLock, run_dir: str, overwrite: bool, resume: bool,
                   exp: Optional[Dict[str, Any]] = None, tc: Optional[TrainConfig] = None,
                   resume_changed: bool = False) -> Optional[Dict[str, Any]]:
    """Main process: lock the run directory (creating it) and check what may be done with it; deletes nothing.
    With ``resume``: the config compared with the run's (:func:`_resume_config_check`); returns what the resume
    record of meta.json needs (None on the other processes and without ``resume``)."""
    resumed = None
    if accelerator.is_main_process:
        lock.acquire()  # creates the run directory; nothing is deleted yet
        check_run_dir(run_dir, overwrite=overwrite, resume=resume)
        if resume and exp is not None:
            resumed = _resume_config_check(run_dir, exp, tc, resume_changed)
    accelerator.wait_for_everyone()
    return resumed


def _past_the_end(total: int, ck: str, step: int) -> str:
    return (f"--resume: the run would end at step {total} (train.max_steps / train.epochs), before the step of its "
            f"checkpoint {ck} ({step}): it has already trained past that point. Resume with train.max_steps >= "
            f"{step}, or score an earlier checkpoint with test.py --checkpoint")


def _resume_config_check(run_dir: str, exp: Dict[str, Any], tc: TrainConfig, resume_changed: bool) -> Dict[str, Any]:
    """``--resume``: compare the run's config.yaml with ``exp`` (util.run_dir.resume_changes) and the checkpoint's
    step with ``train.max_steps``. Keys safe to change are logged; other changes are a ConfigError naming them
    unless ``resume_changed`` (then a warning). Returns ``{"record": the entry of meta.json's resumes, "model":
    the changed model keys}``."""
    ck = newest_intact_checkpoint(run_dir)
    step = verify_checkpoint(ck)
    if tc.max_steps is not None and step > int(tc.max_steps):
        raise ConfigError(_past_the_end(int(tc.max_steps), ck, step))
    safe, other = resume_changes(run_dir, exp)
    model = {k: v for k, v in other.items() if k == "model" or k.startswith("model.")}
    if other and not resume_changed:
        what = (f" (the model config differs: the checkpoint's weights belong to the run's model; "
                f"{describe_changes(model)})" if model else "")
        raise ConfigError(
            f"--resume: '{run_dir}' was trained with another config: {describe_changes(other)}{what}. Resume with "
            f"the run's config (its config.yaml), start a new run (--set train.run_name=NAME), or pass "
            f"--resume_changed to continue with the new values (recorded in its meta.json, 'resumes')")
    if other:
        log.warning("--resume_changed: continuing '%s' with a changed config: %s (recorded in %s, 'resumes')",
                    run_dir, describe_changes(other), META_FILE)
    if safe:
        log.info("--resume: config keys changed (safe on resume, recorded in %s): %s", META_FILE,
                 describe_changes(safe))
    record = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), step=step, checkpoint=os.path.basename(ck),
                  changed={**safe, **other}, resume_changed=bool(other))
    return dict(record=record, model=model, fingerprint=None)


def _check_resumed_data(run: _Run, resumed: Optional[Dict[str, Any]], resume_changed: bool) -> None:
    """Main process, ``--resume``: the data's fingerprint against the one in meta.json (runs written before
    fingerprints: nothing to compare). A difference is a DataError naming it unless ``resume_changed``."""
    if resumed is None:
        return
    fp = run.dataset.fingerprint()
    resumed["fingerprint"] = fp  # written into meta.json by _open_run_files
    diff = compare_fingerprints((read_meta(run.run_dir) or {}).get("data_fingerprint"), fp)
    resumed["record"]["changed_data"] = diff
    if diff and not resume_changed:
        from util.errors import DataError

        raise DataError(f"--resume: the training data of '{run.run_dir}' changed since it was trained: "
                        f"{'; '.join(diff)}. Restore the data, start a new run, or pass --resume_changed to "
                        f"continue on the new data (recorded in its meta.json, 'resumes')")
    if diff:
        log.warning("--resume_changed: the training data changed: %s (recorded in %s)", "; ".join(diff), META_FILE)
        resumed["record"]["resume_changed"] = True


def _load_resume_state(run: _Run, resumed: Optional[Dict[str, Any]]):
    """util.checkpoints.load_resume_state; when the model config changed (``--resume_changed``), a checkpoint
    whose weights do not fit the new model is a one-line ConfigError naming the first differing tensor."""
    if resumed and resumed["model"]:
        ck = newest_intact_checkpoint(run.run_dir)
        diff = first_tensor_mismatch(load_weights(ck), run.raw_model.state_dict())
        if diff is not None:
            k, saved, own = diff

            def shape(s):
                return "absent" if s is None else f"of shape {s}"

            raise ConfigError(
                f"--resume_changed: the model config differs from the run's ({describe_changes(resumed['model'])}"
                f") and its checkpoint does not fit the new model: tensor '{k}' is {shape(saved)} in {ck} and "
                f"{shape(own)} in the new model. Start a new run for the new model (--set train.run_name=NAME)")
    return load_resume_state(run.accelerator, run.run_dir)


def _set_up(exp: Dict[str, Any], tc: TrainConfig, accelerator, run_dir: str) -> _Run:
    """Seed, then dataset -> task -> model, optimizer and scheduler, prepared and registered for checkpointing."""
    from accelerate.utils import set_seed

    set_seed(tc.seed)
    # e.g. the demo ensemble is generated once, by the main process
    dataset, task, model = build_components(exp, accelerator.main_process_first)
    optimizer = build("optimizer", exp["optim"]["type"], section="optim", injected={"model": model},
                      **section_kwargs(exp, "optim"))
    steps_per_epoch = int(task.steps_per_epoch)
    total = total_steps_of(tc, steps_per_epoch)
    scheduler = build("scheduler", exp["scheduler"]["type"], section="scheduler",
                      injected={"optimizer": optimizer, "total_steps": total}, **section_kwargs(exp, "scheduler"))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(_Checkpointed(task))
    return _Run(exp=exp, tc=tc, accelerator=accelerator, run_dir=run_dir, dataset=dataset, task=task, model=model,
                raw_model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                steps_per_epoch=steps_per_epoch, total=total, ckpt_every=checkpoint_interval(tc, steps_per_epoch))


def _open_run_files(run: _Run, start: int, resume: bool, resumed: Optional[Dict[str, Any]] = None):
    """Main process: meta.json first (the run marker util.run_dir.RUN_MARKER_KEY, data facts, task type, model
    inputs, the data's fingerprint, and on resume the ``resumes`` list with this resume appended), config.yaml,
    log.csv (cut back to ``start`` on resume) and the TensorBoard writer (None on the other processes or without
    TensorBoard)."""
    accelerator, exp = run.accelerator, run.exp
    if not accelerator.is_main_process:
        return None
    fingerprint = resumed["fingerprint"] if resumed and resumed.get("fingerprint") else run.dataset.fingerprint()
    meta = {RUN_MARKER_KEY: RUN_MARKER_VERSION, **run.dataset.meta(), "task": task_type_of(exp),
            "model_inputs": run.task.model_inputs(), "data_fingerprint": fingerprint,
            "cpu_features": cpu_features(), "precision": precision_name(accelerator),
            "malloc": tune_malloc() if accelerator.device.type == "cpu" else "device memory (CUDA)"}
    if resume:
        meta["resumes"] = list((read_meta(run.run_dir) or {}).get("resumes") or []) + (
            [resumed["record"]] if resumed else [])
    atomic_write_text(os.path.join(run.run_dir, META_FILE), json.dumps(meta, indent=1))
    save_experiment(exp, run.run_dir)
    if run.tc.timing_steps == 0:
        log.info("train.timing_steps is 0: no step times are measured and no timing.json will be written")
    if resume:
        _truncate_log(run.log_path, start)
    elif not os.path.isfile(run.log_path):
        atomic_write_text(run.log_path, ",".join(LOG_FIELDS) + "\n")
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run.run_dir, "tb"), purge_step=start + 1 if resume else None)
    except Exception as e:  # tensorboard missing or broken: train anyway
        log.warning("TensorBoard logging off (%s)", e)
    n_params = sum(p.numel() for p in run.model.parameters())
    log.info("run %s: %d steps (%d per epoch), %d processes, %d parameters, device %s, precision %s; %s",
             run.run_dir, run.total, run.steps_per_epoch, accelerator.num_processes, n_params, accelerator.device,
             precision_name(accelerator), describe_cpu(meta["cpu_features"]))
    return writer


class _IntervalMeans:
    """Sums of the loss and of the loss terms over the optimizer steps of one log interval."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.terms: Dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, out) -> None:
        self.loss += out.loss.detach().float()
        for k, val in out.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + val.detach().float()
        self.n += 1

    def take(self, accelerator):
        """(mean loss, {term: mean}) over the interval and every process; the sums start again."""
        n = max(self.n, 1)
        mean_loss = accelerator.reduce(self.loss / n, reduction="mean").item()
        mean_terms = {k: accelerator.reduce(torch.as_tensor(v, device=accelerator.device) / n,
                                            reduction="mean").item() for k, v in sorted(self.terms.items())}
        self.loss.zero_()
        self.terms = {}
        self.n = 0
        return mean_loss, mean_terms


class _StepTimer:
    """Times the steady steps (after ``min(10, total // 2)`` warm-up steps) for timing.json (spec 5.6)."""

    def __init__(self, run: _Run):
        self.run = run
        self.warm = min(10, run.total // 2)
        self.times: List[float] = []
        self.cuda = torch.cuda.is_available()

    def record(self, step: int, t0: float, writer) -> None:
        run = self.run
        if self.warm <= step < self.warm + run.tc.timing_steps:
            if self.cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - t0)
            if len(self.times) == run.tc.timing_steps or step + 1 == run.total:
                _write_timing(run.accelerator, run.run_dir, self.times, run.total, writer)

    def finish(self, writer) -> None:
        """Write what was measured when the run ended before ``timing_steps`` steady steps."""
        if self.times and len(self.times) < self.run.tc.timing_steps:
            _write_timing(self.run.accelerator, self.run.run_dir, self.times, self.run.total, writer)


def _step_loop(run: _Run, start: int, writer, timer: _StepTimer, progress: bool) -> None:
    """Steps ``start`` .. total: batch -> training step -> backward / clip / optimizer and scheduler step, then
    the interval's log line, validation and checkpoint when due."""
    from tqdm.auto import tqdm

    accelerator, tc, task, model, optimizer = run.accelerator, run.tc, run.task, run.model, run.optimizer
    model.train()
    bar = tqdm(total=run.total, initial=start, disable=not (progress and accelerator.is_main_process),
               desc=os.path.basename(run.run_dir), dynamic_ncols=True)
    means = _IntervalMeans(accelerator.device)
    watch = CollapseWatch(tc.collapse_check_steps, tc.collapse_patience, tc.log_every)
    t_start = time.perf_counter()
    for step in range(start, run.total):
        t0 = time.perf_counter()
        batch = task.batch(step, accelerator.process_index, accelerator.device)
        with accelerator.autocast():
            out = task.training_step(model, batch, step)
        out = skip_together(accelerator, out)
        done = step + 1
        logging_step = done % tc.log_every == 0 or done == run.total
        if logging_step:  # the learning rates this step uses (log.csv records these, not the next step's)
            step_lrs = [g["lr"] for g in optimizer.param_groups]
        if out is not None:  # None: the task skips this step (no backward, no optimizer or scheduler step)
            accelerator.backward(out.loss)
            if logging_step and watch.active(done) and out.output is not None:
                watch.observe(accelerator, run.raw_model, out.output, done)
            if tc.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            means.add(out)
        timer.record(step, t0, writer)
        if logging_step:
            _log_interval(run, done, start, means, step_lrs, writer, bar, progress, time.perf_counter() - t_start)
        bar.update(1)
        if tc.val_every_steps is not None and (done % tc.val_every_steps == 0 or done == run.total):
            _validate(accelerator, task, run.raw_model, done, run.run_dir, writer)
        if done % run.ckpt_every == 0 or done == run.total:
            check_processes_agree(accelerator, run.raw_model, done, task_type_of(run.exp))
            _save_checkpoint(accelerator, run.run_dir, done, tc.keep_checkpoints,
                             dict(total_steps=run.total, steps_per_epoch=run.steps_per_epoch), task=task)
    bar.close()


def _log_interval(run: _Run, done: int, start: int, means: _IntervalMeans, step_lrs: List[float], writer, bar,
                  progress: bool, elapsed: float) -> None:
    """End of a log interval: mean loss and terms over every process (a non-finite loss stops the run); the main
    process appends the line of log.csv, writes TensorBoard scalars and updates the progress display."""
    accelerator = run.accelerator
    mean_loss, mean_terms = means.take(accelerator)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss is {mean_loss} at step {done}; lower the learning rate or check the data")
    if not accelerator.is_main_process:
        return
    psnr = (psnr_from_mse(mean_terms["mse"], 1.0, floor=1e-30, form="difference")
            if "mse" in mean_terms else float("nan"))
    lr = step_lrs[0]
    with open(run.log_path, "a") as f:  # appended every interval: a user tailing the run sees it move
        f.write(f"{done},{mean_loss:.8g},{psnr:.5f},{lr:.6g}\n")
    if writer is not None:
        writer.add_scalar("train/loss", mean_loss, done)
        writer.add_scalar("train/psnr", psnr, done)
        for k, val in mean_terms.items():
            writer.add_scalar(f"train/{k}", val, done)
        for g, g_lr in zip(run.optimizer.param_groups, step_lrs):
            writer.add_scalar(f"lr/{g.get('name', 'default')}", g_lr, done)
        for k, val in run.raw_model.training_stats().items():
            writer.add_scalar(k, val, done)
    bar.set_postfix(loss=f"{mean_loss:.3e}", psnr=f"{psnr:.2f}")
    if not progress:  # one printed line per log interval (batch jobs)
        print(progress_line(done, run.total, start, mean_loss, psnr, lr, elapsed), flush=True)


def _finish(run: _Run, writer, timer: _StepTimer) -> None:
    """Main process: the rest of timing.json, model.pt, the collapse warning, finished.json (written last)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        timer.finish(writer)
        atomic_torch_save(run.raw_model.state_dict(), os.path.join(run.run_dir, "model.pt"))
        _warn_if_constant(run.raw_model, run.task, accelerator.device)
        if writer is not None:
            writer.close()
        atomic_write_text(os.path.join(run.run_dir, "finished.json"), json.dumps(dict(steps=run.total)))
        log.info("finished: %s", run.run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_line(done: int, total: int, start: int, loss: float, psnr: float, lr: float, elapsed: float) -> str:
    """One log line: step, loss, PSNR, lr, elapsed time and ETA (from the steps run by this process)."""
    ran = max(done - start, 1)
    eta = elapsed / ran * (total - done)
    return (f"step {done}/{total}  loss {loss:.4e}  psnr {psnr:.2f}  lr {lr:.3g}  "
            f"elapsed {_duration(elapsed)}  eta {_duration(eta)}")


class TrainingCollapsed(RuntimeError):
    """Training stopped because the model collapsed (constant output or all-zero gradients)."""


class CollapseWatch:
    """Early-training collapse detector (spec section 4, "observed collapse").

    At every log interval of the first ``check_steps`` steps it looks at the step's predictions and
    gradients; when the output is constant over the batch (std <= 1e-6) or every gradient is exactly zero
    for ``patience`` consecutive intervals, it raises :class:`TrainingCollapsed` with what happened and what to
    change. A sigmoid output saturated this way never recovers (its gradients underflow to exactly 0), so
    training on would only waste the rest of the budget. Every process reaches the same decision.
    """

    def __init__(self, check_steps: int, patience: int, log_every: int):
        self.check_steps, self.patience, self.log_every = int(check_steps), int(patience), int(log_every)
        self.streak = 0

    def active(self, done: int) -> bool:
        return self.check_steps > 0 and done <= self.check_steps

    @torch.no_grad()
    def observe(self, accelerator, model: torch.nn.Module, pred: torch.Tensor, done: int) -> None:
        p = pred.detach().float()
        std = float(p.std()) if p.numel() > 1 else 1.0
        grads = [q.grad for q in model.parameters() if q.grad is not None]
        zero_grads = all(not bool(g.any()) for g in grads)
        flags = torch.tensor([float(std <= 1e-6), float(zero_grads)], device=accelerator.device)
        flags = accelerator.reduce(flags, reduction="sum")  # same decision on every process
        constant, zero = bool(flags[0] > 0), bool(flags[1] > 0)
        self.streak = self.streak + 1 if (constant or zero) else 0
        if self.streak < self.patience:
            return
        what = []
        if constant:
            what.append(f"outputs a constant ({float(p.mean()):.4g}) on the whole batch")
        if zero:
            what.append("every gradient is exactly 0")
        raise TrainingCollapsed(
            f"training collapsed at step {done}: the model {' and '.join(what)} for {self.patience} consecutive log "
            f"intervals ({self.patience * self.log_every} steps). A saturated output does not recover; stopped "
            f"instead of training on. Fix: {collapse_fixes(model)}; then rerun with --overwrite. "
            f"(train.collapse_check_steps: 0 turns this check off.)")


def collapse_fixes(model: torch.nn.Module) -> str:
    """The fixes of a collapsed run that ``model``'s type accepts (its config keys, util.registry.accepted_keys):
    ``model.init_output_mean: auto`` and ``model.plane_init`` only where the model has these keys, then a lower
    ``optim.lr`` and a warm-up (``scheduler.warmup_steps``, a key of every scheduler)."""
    from util.registry import accepted_keys, names

    keys: Dict[str, Any] = {}
    registered = {get("model", n): n for n in names("model")}
    for cls in type(model).__mro__:  # the registered type of the model (or of the class it derives from)
        if cls in registered:
            keys = accepted_keys("model", registered[cls], ("cond_dim", "spatial_dims", "out_dim"))
            break
    fixes = []
    if "init_output_mean" in keys:
        fixes.append("set model.init_output_mean: auto (start the output at the data mean)")
    if "plane_init" in keys:
        fixes.append("set model.plane_init: kplanes or ones (planes that start near 1 instead of a product of "
                     "small values)")
    fixes += ["lower optim.lr", "add a warm-up (scheduler.warmup_steps)"]
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def _write_timing(accelerator, run_dir, step_times, total, writer) -> None:
    if not accelerator.is_main_process or not step_times:
        return
    mean = sum(step_times) / len(step_times)
    info = dict(mean_step_s=mean, measured_steps=len(step_times), total_steps=total,
                estimated_train_h=mean * total / 3600.0, device=str(accelerator.device),
                processes=accelerator.num_processes)
    atomic_write_text(os.path.join(run_dir, "timing.json"), json.dumps(info, indent=1))
    if writer is not None:
        writer.add_scalar("timing/mean_step_s", mean, total)


@torch.no_grad()
def _warn_if_constant(model, task, device) -> None:
    """Warn when the trained model predicts (almost) the same value everywhere (a collapsed model)."""
    was = model.training
    model.eval()
    out = task.training_step(model, task.batch(0, 0, device), 0)
    model.train(was)
    if out is None or out.output is None or out.output.numel() < 2:
        return
    pred = out.output.float()
    if float(pred.std()) < 1e-6:
        log.warning("the trained model outputs a constant (%.4g) on a training batch: it has collapsed; "
                    "try a lower learning rate or warm-up (scheduler.warmup_steps)", float(pred.mean()))
