"""The one run loop, knowing no stage: setup, the dry-run refusals, the run-directory lock, resume (or a stage's own
start: weights from ``train.init_from``, a WSD branch point), the iteration budget, metrics, progress, checkpoints
of every role as one unit, the stop signal and the result.

A stage (``evolm_nemo.stages``) supplies what differs: its roles (the models it trains: one, or RL's actor + critic),
its step (microbatches through the engine, ``train.engine.train_step``; RL: rollout -> reward -> advantages -> engine
updates), what it measures on the live model, and what it records. The loop calls, in this order::

    stage = make_stage(cfg, plan, rt)      # data and tokenizer checks, before the run directory is locked
    roles = stage.build(rt)                # models, optimizers, schedulers (roles[0] commits the set)
    start = resume | stage.start(roles)    # a resumed checkpoint of every role, else the stage's start
    stage.restore(start, state); stage.prepare(model, rt, start, out)
    for it: record = stage.step(it) + stage.metrics(it, step_s, ...) + stage.evaluate(model, rt, step, last)
            stage.snapshots(step) (kept checkpoints), checkpoints of every role, the stop signal
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.compose import changed_keys, to_dict
from evolm_nemo.config.errors import ConfigError, out_of_memory
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.validate import Plan, check_shape
from evolm_nemo.model.build import param_count
from evolm_nemo.runtime.distributed import Runtime, resolve_precision, setup
from evolm_nemo.runtime.signals import StopSignal, Stopped, children_die_with_parent
from evolm_nemo.train import tracking
from evolm_nemo.train.metrics import MetricsWriter, peak_flops

MAIN = "checkpoints"  # <run>/checkpoints: the first role's checkpoints; their commit is the commit of the set


@dataclass
class Role:
    """One trained model of a run: saved under ``<run>/<dir>`` (with ``meta`` added to its evolm.json) and loaded
    from there on resume. A run's roles are one unit: the others are written first, ``roles[0]`` last."""

    model: Any
    optimizer: Any
    scheduler: Any
    make_scheduler: Callable = field(repr=False)  # make_scheduler(iters, warmup=None): a new scheduler
    dir: str = MAIN
    meta: dict = field(default_factory=dict)


@dataclass
class Start:
    """Where a run that resumes nothing starts: the iteration, the parent's evolm.json, and (a WSD branch) its own
    lineage and a note for the first line."""

    iteration: int = 0
    parent_meta: dict | None = None
    lineage: dict | None = None
    note: str = ""


@dataclass
class TrainResult:
    """What a finished (or already complete) run hands back, on every rank."""

    iterations: int
    start: int  # the iteration this invocation started at (resumed runs: > 0)
    losses: list[float]  # the stage's history: the loss per iteration (RL: the mean reward, history_key)
    checkpoint: str  # the committed checkpoint at the end ("" when none)
    tokenizer: str  # tokenizer reference (dir or hub name) the run used
    out_dir: str
    runtime: Runtime = field(repr=False)
    model: Any = field(repr=False, default=None)  # the live DDP-wrapped model (for in-process generation)
    history_key: str = "loss"  # the record key ``losses`` holds


def lineage(cfg: RootConfig, parent_meta: dict | None, record: dict) -> dict:
    """A new run's lineage: its parent's stages, then this one (``record``: what the stage says of its data)."""
    previous = list((parent_meta or {}).get("lineage", {}).get("stages", []))
    return {"stages": previous + [{"stage": cfg.stage, "model": cfg.model.name, **record}],
            # absolute: the lineage is read from other working directories (release, reports)
            "parent": os.path.abspath(os.path.expanduser(cfg.train.init_from)) if cfg.train.init_from else None,
            **{k: v for k, v in (cfg.lineage or {}).items() if k not in ("stages", "parent")}}


def progress_bar(cfg: RootConfig, rt: Runtime, iters: int, start: int):
    if not (rt.is_main and cfg.train.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=iters, initial=start, desc=cfg.stage, unit="it", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 15.0)


IDENTITY = "data_identity"  # evolm.json: what defines the run's data and batch (the stage's ``data_identity``)


def identity_change(path: Path, theirs: dict, ours: dict) -> ConfigError | None:
    """The first key of a run's data identity (config key -> value; content fingerprints are ``sha256:...``
    strings) whose value in the checkpoint ``path`` (``theirs``) differs from this recipe's (``ours``), as a
    ConfigError naming it; keys one side lacks (checkpoints from before a key was recorded) are not compared."""
    for key, value in ours.items():
        if key not in theirs or theirs[key] == value:
            continue
        if any(isinstance(v, str) and v.startswith("sha256:") for v in (value if isinstance(value, list) else [value])):
            what = f"was trained on other data than {key} holds now (content {_short(theirs[key])} -> {_short(value)})"
        else:
            what = f"was trained with {key}={_short(theirs[key])}, this recipe has {_short(value)}"
        return ConfigError(key, f"{path} {what}; a run resumes on the data and batch it started with: keep them, or "
                                f"go on as a new run from it (train.init_from={path} with a new run.out_dir, or "
                                "train.resume=false train.overwrite=true to replace this one)")
    return None


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return str(value)


def settings_change(path: Path, meta: dict, ours: dict) -> ConfigError | None:
    """The first of ``ours`` (dotted key -> value: ``stages.run_settings``) whose value differs from the recipe the
    checkpoint ``path`` records (``meta``, its evolm.json: ``config``), as a ConfigError naming it and how many more
    differ; keys the record lacks (checkpoints from before a key existed) are not compared. ``train.precision`` is
    compared as the run ran it (``precision``, recorded resolved: ``auto`` is bf16 on GPU, fp32 on CPU) with what
    this recipe runs here, so naming the precision ``auto`` meant is no change (a checkpoint from before the record
    has its ``auto`` read as this machine runs it)."""
    config = meta.get("config") or {}
    if "train.precision" in ours and isinstance(config.get("train"), dict) and "precision" in config["train"]:
        ran = meta.get("precision") or resolve_precision(config["train"]["precision"])
        ours = {**ours, "train.precision": resolve_precision(ours["train.precision"])}
        config = {**config, "train": {**config["train"], "precision": ran}}
    changed = changed_keys(config, ours)
    if not changed:
        return None
    key, theirs, value = changed[0]
    more = f" (and {', '.join(k for k, _, _ in changed[1:])})" if changed[1:] else ""
    return ConfigError(key, f"{path} was trained with {key}={_short(theirs)}, this recipe has {_short(value)}{more}; "
                            "a run resumes with the settings it started with: keep them, or go on as a new run from "
                            f"it (train.init_from={path} with a new run.out_dir, or train.resume=false "
                            "train.overwrite=true to replace this one)")


def resume_check(cfg: RootConfig, plan_iters: int, identity: dict | None = None,
                 settings: dict | None = None) -> Callable[[Path, dict], None]:
    """What a checkpoint must agree on for this recipe to resume it: the model shape, the iteration budget --
    changing ``train.iters`` / ``train.tokens`` on resume is refused (the schedule and the data order were laid out
    for the old one), naming the two ways forward --, what defines the data and batch (``identity``) and the
    other settings of the run (``settings``, ``stages.run_settings``: an optimizer, sampling or reward setting
    changed on resume would make the run other than the one its checkpoints record)."""

    def check(path: Path, meta: dict) -> None:
        check_shape(cfg.model, meta, lambda ours, theirs, name: f"{ours} differs from {theirs} in {path} (model "
                                                               f"{name}), the checkpoint this run would resume; "
                                                               "use the model it was trained with, or a new "
                                                               "run.out_dir")
        planned, done = meta.get("planned_iters"), int(meta.get("iteration", 0))
        if (planned is not None and planned != plan_iters) or done > plan_iters:
            key = "train.tokens" if cfg.train.tokens else "train.iters"
            was = f"was planned for {planned} iterations" if planned is not None else f"is at iteration {done}"
            raise ConfigError(key, f"{path} {was} and this recipe plans {plan_iters}; resume with "
                                   f"train.iters={planned if planned is not None else done} train.tokens=null, or "
                                   f"branch off with train.init_from={path} and a new run.out_dir")
        change = identity_change(path, meta.get(IDENTITY) or {}, identity or {}) or \
            settings_change(path, meta, settings or {})
        if change is not None:
            raise change

    return check


def stop_line(rt: Runtime, signum: int, step: int, saved, save_on_signal: bool) -> Stopped:
    """Say (rank 0, one line on stderr) that a stop signal ended the run and what is on disk; returns the exception
    to raise (exit code 143)."""
    if saved is not None and int(Path(saved).name.split("_")[1]) == step:
        what = f"checkpoint {saved} committed"
    else:
        what = f"the last checkpoint is {saved}" if saved is not None else "no checkpoint was written"
        what += "" if save_on_signal else " (train.save_on_signal=false)"
    message = f"[evolm] stopped by {StopSignal.name(signum)} after iteration {step}: {what}; rerun the same " \
              "command to resume"
    if rt.is_main:
        print(message, file=sys.stderr, flush=True)
    return Stopped(message)


def fit(cfg: RootConfig, plan: Plan, make_stage: Callable, dirs: tuple[str, ...] = (MAIN,),
        identity: dict | None = None, settings: dict | None = None, kept: tuple[str, ...] = ()) -> TrainResult:
    """Train ``cfg`` for ``plan.iters`` iterations (resuming if possible) with the stage ``make_stage(cfg, plan, rt)``
    builds (see ``evolm_nemo.stages.base.Stage``), whose roles are saved under ``dirs`` of the run directory and its
    kept checkpoints (``Stage.snapshots``) under ``kept``.
    ``identity`` (the stage's ``data_identity``: what defines its data and batch) is recorded in every checkpoint,
    and a resume that changes it or ``settings`` (``stages.run_settings``) is refused. SIGTERM ends it after the
    current iteration (saved first with ``train.save_on_signal``) by raising ``Stopped`` (exit code 143)."""
    children_die_with_parent()
    with StopSignal() as stop:
        try:
            return _fit(cfg, plan, make_stage, dirs, identity or {}, settings or {}, kept, stop)
        except Exception as exc:
            what = out_of_memory(exc)
            if what is None:
                raise
            raise memory_error(cfg, what) from None


def memory_error(cfg: RootConfig, what: str) -> ConfigError:
    """The one line for a run that does not fit in memory (``what``: ``config.errors.out_of_memory``), naming the
    keys that shrink what one step holds."""
    p, m = cfg.parallel, cfg.model
    key = "parallel.max_tokens_per_microbatch" if p.max_tokens_per_microbatch else "parallel.micro_batch_size"
    return ConfigError(key, f"out of memory ({what}) with {key}={getattr(p, key.split('.')[1])}, "
                            f"model.seq_length={m.seq_length}, parallel.tp={p.tp}, parallel.pp={p.pp}; lower {key} "
                            "(the loss does not depend on it; RL rollouts: rl.rollout_micro_batch_size), "
                            "model.seq_length or the model, or spread it over more GPUs (parallel.tp, parallel.pp)")


def _fit(cfg: RootConfig, plan: Plan, make_stage: Callable, dirs: tuple[str, ...], identity: dict, settings: dict,
         kept: tuple[str, ...], stop: StopSignal) -> TrainResult:
    p, t = cfg.parallel, cfg.train
    rt = setup(p.tp, p.pp, t.seed, t.precision)
    stop.device = rt.device
    tracking.check(cfg)  # logger.wandb / logger.mlflow: their packages, before anything is built
    out = Path(cfg.run.out_dir)
    roots = [out / d for d in dirs]
    starting = dict(resume=t.resume, overwrite=t.overwrite, check=resume_check(cfg, plan.iters, identity, settings),
                    kept=[out / d for d in kept])
    planned = ckpt.start_run(out, roots, dry=True, **starting)  # the cheap refusals first: names, sizes, shape, budget
    if rt.is_main:
        tracking.reach(cfg)  # the tracking store answers (its runs open once the model is built)
    stage = make_stage(cfg, plan, rt)  # data and tokenizer checks happen here, before the run directory exists
    if planned.checkpoint is None:
        stage.check_parent()  # a fresh run's parent too
    ckpt.lock_run_dir(out)
    begin = ckpt.start_run(out, roots, **starting)  # checksums, fall-back, overwrite: under the lock
    roles = stage.build(rt)
    layout = {"tp": p.tp, "pp": p.pp, "dp": plan.dp}
    resumed = begin.checkpoint is not None
    if resumed:
        state = _resume(begin.checkpoint, roles, roots, layout)
        start = Start(state["iteration"], state["meta"], state["meta"].get("lineage"))
    else:
        state, start = {}, stage.start(roles, layout)
    stage.restore(start.iteration, state)
    stage.prepare(roles[0].model, rt, start.iteration, out)  # e.g. DPO's reference log-probs, before the first step
    _say_start(cfg, plan, rt, stage, start, resumed)
    if not resumed and start.lineage is None:
        start.lineage = lineage(cfg, start.parent_meta, stage.lineage())
    meta = {"model": dataclasses.asdict(cfg.model), "config": to_dict(cfg), "tokenizer": _tokenizer_ref(stage),
            "stage": cfg.stage, "lineage": start.lineage, "head": stage.head, "run_id": begin.run_id,
            "planned_iters": plan.iters, IDENTITY: identity, "precision": resolve_precision(t.precision)}
    parent = state["meta"].get(ckpt.PARENT_RUN) if resumed else (
        {"run_id": start.parent_meta.get("run_id"), "iteration": start.parent_meta.get("iteration")}
        if start.parent_meta else None)
    if parent is not None:
        meta[ckpt.PARENT_RUN] = parent
    if start.iteration >= plan.iters and rt.is_main:
        print(f"[evolm] {out} is complete: {begin.checkpoint} is at iteration {start.iteration} of {plan.iters}; "
              "nothing to train", flush=True)
    if signum := stop.requested():
        raise stop_line(rt, signum, start.iteration, begin.checkpoint, t.save_on_signal)
    history, saved = _iterate(cfg, plan, rt, stage, roles, start.iteration, meta, layout, begin.checkpoint, stop)
    return TrainResult(iterations=plan.iters, start=start.iteration, losses=history,
                       checkpoint=str(saved or begin.checkpoint or ""), tokenizer=stage.tokenizer, out_dir=str(out),
                       runtime=rt, model=roles[0].model, history_key=stage.history_key)


def _resume(checkpoint: Path, roles: list[Role], roots: list[Path], layout: dict) -> dict:
    """Every role from its namesake of ``checkpoint`` (verified by ``ckpt.start_run``); the random state from the
    first. Returns the first role's common state. A checkpoint that cannot be loaded although its checksums hold
    (files altered with their record: pickled code) is refused in one line, naming the way to start over."""
    try:
        state = ckpt.load(checkpoint, [roles[0].model], roles[0].optimizer, roles[0].scheduler, layout=layout,
                          verified=True)
        for role, root in zip(roles[1:], roots[1:]):
            ckpt.load(root / checkpoint.name, [role.model], role.optimizer, role.scheduler, restore_rng=False,
                      layout=layout, verified=True)
    except ckpt.CheckpointError as exc:
        raise ConfigError("train.resume", f"{exc}; remove it to resume from the one before, or start over with "
                                          "train.resume=false train.overwrite=true") from None
    return state


def _tokenizer_ref(stage) -> str:
    return os.path.abspath(stage.tokenizer) if os.path.isdir(stage.tokenizer) else stage.tokenizer


def _say_start(cfg: RootConfig, plan: Plan, rt: Runtime, stage, start: Start, resumed: bool) -> None:
    if not rt.is_main:
        return
    p, m, t = cfg.parallel, cfg.model, cfg.train
    capped = (f" (train.epochs={t.epochs} caps train.iters={t.iters})"
              if t.epochs is not None and t.iters is not None and plan.iters < t.iters else "")
    print(f"[evolm] {cfg.stage} {m.name}: {param_count(m) / 1e6:.2f}M params | tp={p.tp} pp={p.pp} dp={plan.dp} "
          f"sp={p.sp} | {rt.dtype} on {rt.device.type} | {plan.iters} iters{capped} | {stage.describe()}"
          + (f" | resuming at iteration {start.iteration}" if resumed and start.iteration else "") + start.note,
          flush=True)


def _save(out: Path, roles: list[Role], step: int, meta: dict, extra: dict, keep_last: int,
          layout: dict) -> Path:
    """Every role's checkpoint at ``step``: the others first, ``roles[0]`` last (its commit is the commit of the
    set, which ``ckpt.start_run`` checks on resume); older sets are pruned only once the new one is committed."""
    for role in reversed(roles):
        path = ckpt.save(out / role.dir, step, [role.model], role.optimizer, role.scheduler, extra=extra,
                         meta={**meta, **role.meta}, layout=layout)
    ckpt.prune([out / role.dir for role in roles], meta.get("run_id"), keep_last, path.name)
    return path


def _iterate(cfg: RootConfig, plan: Plan, rt: Runtime, stage, roles: list[Role], start: int, meta: dict,
             layout: dict, resumed_from, stop: StopSignal) -> tuple[list[float], Path | None]:
    t, out = cfg.train, Path(cfg.run.out_dir)
    trackers = None
    if rt.is_main and start < plan.iters:  # W&B / MLflow runs: new, or the resumed run's own (tracking.json)
        trackers = tracking.open_trackers(cfg, out, meta["run_id"], meta["config"], start)
    writer = MetricsWriter(out, enabled=rt.is_main, tensorboard=t.tensorboard, truncate_after=start,
                           trackers=trackers)
    peak = peak_flops(t.peak_tflops, rt.device)
    bar = progress_bar(cfg, rt, plan.iters, start)
    history, saved = [], None
    tick = time.perf_counter()
    status = "FAILED"  # how the tracker runs end
    try:
        for it in range(start, plan.iters):
            step, record = it + 1, stage.step(it)
            now = time.perf_counter()
            dt, tick = now - tick, now
            for key in stage.finite_keys:  # before anything of this iteration is written or saved
                if key in record and not math.isfinite(record[key]):
                    raise ConfigError("optim.lr", f"{key} is {record[key]} at iteration {step}: the run diverged and "
                                                  f"stops (last checkpoint: {saved or resumed_from}); lower optim.lr "
                                                  "or check the data")
            record = {"iteration": step, **record, **stage.metrics(it, dt, peak, rt.world_size), "step_s": dt}
            history.append(record[stage.history_key])
            measured = stage.evaluate(roles[0].model, rt, step, last=step == plan.iters)  # every rank takes part
            record.update(measured)
            if measured or step % t.log_interval == 0 or step == plan.iters:
                writer.write(record)
            if bar is not None:
                bar.set_postfix(**stage.postfix(record))
                bar.update(1)
            wrote = False
            for sub, extra_meta in stage.snapshots(step):  # kept checkpoints, never pruned (WSD branch points)
                ckpt.save(out / sub, step, [roles[0].model], roles[0].optimizer, roles[0].scheduler,
                          extra=stage.checkpoint_extra(step), meta={**meta, **extra_meta}, layout=layout)
                wrote = True
            signum = stop.requested()  # SIGTERM on any rank: all stop after this iteration (saved first, by default)
            if (t.save_interval and step % t.save_interval == 0) or step == plan.iters or (signum and
                                                                                           t.save_on_signal):
                saved, wrote = _save(out, roles, step, meta, stage.checkpoint_extra(step), t.keep_last, layout), True
            if measured or wrote:
                tick = time.perf_counter()  # keep validation, probe and checkpoint time out of the next step_s
            if signum and step < plan.iters:
                status = "KILLED"
                raise stop_line(rt, signum, step, saved or resumed_from, t.save_on_signal)
        status = "FINISHED"
    finally:
        if bar is not None:
            bar.close()
        writer.close(status)
    return history, saved
