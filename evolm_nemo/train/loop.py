"""The one training loop, knowing no stage: megatron DDP + megatron optimizer, pipeline schedules, resume, budget,
metrics, progress, checkpoints and lineage.

A stage (``evolm_nemo.stages``) supplies what differs: its batches and its objective (forward step + loss). Every loss
follows one convention: a microbatch's loss function returns ``(loss_sum, n_tokens, logs)`` and megatron-core's
``calculate_per_token_loss`` mode adds the sums and counts over all microbatches and data-parallel ranks and divides
once (``finalize_model_grads`` scales the gradients by ``1 / tokens in the global batch``). So the loss and the
gradients are the per-token mean over the whole global batch, however it is split into microbatches and ranks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.compose import to_dict
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.validate import Plan, shape_difference
from evolm_nemo.model.build import build_model, param_count
from evolm_nemo.runtime.distributed import Runtime, setup
from evolm_nemo.runtime.signals import StopSignal, Stopped, children_die_with_parent
from evolm_nemo.train.metrics import MetricsWriter, peak_flops

# ------------------------------------------------------------------------------------------------------------ model


def build_training_model(cfg: RootConfig, rt: Runtime, model_builder: Callable | None = None):
    """Model stage for this rank wrapped in megatron DDP, plus the megatron optimizer and a scheduler factory
    (``make_scheduler(iters)``). ``model_builder(m, p, dtype, pre_process, post_process)`` defaults to the LM."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    model = (model_builder or build_model)(cfg.model, cfg.parallel, rt.dtype,
                                           pre_process=parallel_state.is_pipeline_first_stage(),
                                           post_process=parallel_state.is_pipeline_last_stage())
    model.config.calculate_per_token_loss = True  # one division by the global batch's token count (module doc)
    if rt.dtype != torch.float32:  # megatron's mixed precision: every param (norms too) in bf16, fp32 main params
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=o.distributed)
    model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
                        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=rt.dtype == torch.bfloat16,
                        params_dtype=rt.dtype, use_distributed_optimizer=o.distributed),
        [model])
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    return model, optimizer, partial(_scheduler, OptimizerParamScheduler, optimizer, o)


def _scheduler(cls, optimizer, o, iters: int, warmup: int | None = None):
    """Warmup then ``o.decay_style`` (cosine | linear | constant | wsd: ``evolm_nemo.train.wsd``) over ``iters``;
    ``warmup`` overrides the warmup length (a WSD branch keeps its stable run's)."""
    from evolm_nemo.train.wsd import scheduler_kwargs

    return cls(optimizer, **scheduler_kwargs(o, iters, warmup), start_wd=o.weight_decay, end_wd=o.weight_decay,
               wd_incr_steps=iters, wd_incr_style="constant")


# ------------------------------------------------------------------------------------------------------------- step


@dataclass(frozen=True)
class StepResult:
    loss: float  # per-token mean over the global batch
    tokens: int  # tokens that counted in the loss, over the global batch
    grad_norm: float
    sums: dict = field(default_factory=dict)  # every requested log key, summed over microbatches and dp replicas


def _to_device(batches, device):
    return [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]


def train_step(model, optimizer, batches: list[dict], forward_step: Callable, seq_length: int, micro_batch_size: int,
               rt: Runtime, forward_only: bool = False, sum_keys: tuple[str, ...] = ()) -> StepResult:
    """One optimizer step (or, with ``forward_only``, one evaluation) over this rank's microbatches.

    ``forward_step(data_iterator, model) -> (output, loss_fn)`` with ``loss_fn(output) -> (loss_sum, n_tokens, logs)``
    (megatron's contract; ``logs`` holds at least ``loss_sum`` and ``tokens``, and every key of ``sum_keys``, which
    are summed over the global batch too); ``seq_length`` is the padded length of every microbatch of this step
    (pipeline stages exchange activations of that shape)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        model.zero_grad_buffer()
        optimizer.zero_grad()
    logs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(_to_device(batches, rt.device)), model=[model],
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length, forward_only=forward_only)
    grad_norm = None
    if not forward_only:
        _, grad_norm, _ = optimizer.step()
    # Loss sums and token counts live on the last pipeline stage (identical on its TP ranks): add over dp replicas.
    keys = ("loss_sum", "tokens", *sum_keys)
    report = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    total = torch.zeros(len(keys), dtype=torch.float64, device=rt.device)
    if report:
        for i, key in enumerate(keys):
            total[i] = sum(float(x[key]) for x in logs)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    tokens = int(total[1])
    return StepResult(float(total[0] / max(tokens, 1)), tokens, float(grad_norm if grad_norm is not None else "nan"),
                      {k: float(v) for k, v in zip(keys, total.tolist())})


# -------------------------------------------------------------------------------------------------------------- fit


@dataclass
class TrainResult:
    """What a finished (or already complete) run hands back, on every rank."""

    iterations: int
    start: int  # the iteration this invocation started at (resumed runs: > 0)
    losses: list[float]
    checkpoint: str  # the committed checkpoint at the end ("" when none)
    tokenizer: str  # tokenizer reference (dir or hub name) the run used
    out_dir: str
    runtime: Runtime = field(repr=False)
    model: Any = field(repr=False, default=None)  # the live DDP-wrapped model (for in-process generation)


def _lineage(cfg: RootConfig, parent_meta: dict | None, record: dict) -> dict:
    previous = list((parent_meta or {}).get("lineage", {}).get("stages", []))
    return {"stages": previous + [{"stage": cfg.stage, "model": cfg.model.name, **record}],
            "parent": cfg.train.init_from,
            **{k: v for k, v in (cfg.lineage or {}).items() if k not in ("stages", "parent")}}


def _progress_bar(cfg: RootConfig, rt: Runtime, iters: int, start: int):
    if not (rt.is_main and cfg.train.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=iters, initial=start, desc=cfg.stage, unit="it", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 15.0)


def resume_check(cfg: RootConfig, plan_iters: int) -> Callable[[Path, dict], None]:
    """What a checkpoint must agree on for this recipe to resume it: the model shape, and the iteration budget --
    changing ``train.iters`` / ``train.tokens`` on resume is refused (the schedule and the data order were laid out
    for the old one), naming the two ways forward."""

    def check(path: Path, meta: dict) -> None:
        theirs = meta.get("model") or {}
        key = shape_difference(cfg.model, theirs)
        if key is not None:
            raise ConfigError(f"model.{key}", f"{getattr(cfg.model, key)} differs from {theirs[key]} in {path} "
                                              f"(model {theirs.get('name')}), the checkpoint this run would "
                                              "resume; use the model it was trained with, or a new run.out_dir")
        planned, done = meta.get("planned_iters"), int(meta.get("iteration", 0))
        if (planned is not None and planned != plan_iters) or done > plan_iters:
            key = "train.tokens" if cfg.train.tokens else "train.iters"
            was = f"was planned for {planned} iterations" if planned is not None else f"is at iteration {done}"
            raise ConfigError(key, f"{path} {was} and this recipe plans {plan_iters}; resume with "
                                   f"train.iters={planned if planned is not None else done} train.tokens=null, or "
                                   f"branch off with train.init_from={path} and a new run.out_dir")

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


def fit(cfg: RootConfig, plan: Plan, make_stage: Callable) -> TrainResult:
    """Train ``cfg`` for ``plan.iters`` iterations (resuming if possible) with the stage ``make_stage(cfg, plan, rt)``
    builds (see ``evolm_nemo.stages.base.Stage``). SIGTERM ends it after the current iteration (saved first with
    ``train.save_on_signal``) by raising ``Stopped`` (exit code 143)."""
    children_die_with_parent()
    with StopSignal() as stop:
        return _fit(cfg, plan, make_stage, stop)


def _fit(cfg: RootConfig, plan: Plan, make_stage: Callable, stop: StopSignal) -> TrainResult:
    p, t = cfg.parallel, cfg.train
    rt = setup(p.tp, p.pp, t.seed, t.precision)
    stop.device = rt.device
    out = Path(cfg.run.out_dir)
    root = out / "checkpoints"
    starting = dict(resume=t.resume, overwrite=t.overwrite, check=resume_check(cfg, plan.iters))
    ckpt.start_run(out, [root], dry=True, **starting)  # the cheap refusals first: names, sizes, shape, budget
    stage = make_stage(cfg, plan, rt)  # data and tokenizer checks happen here, before the run directory exists
    ckpt.lock_run_dir(out)
    begin = ckpt.start_run(out, [root], **starting)  # checksums, fall-back, overwrite: under the lock

    model, optimizer, make_scheduler = build_training_model(cfg, rt, stage.model_builder)
    scheduler = make_scheduler(plan.iters)
    layout = {"tp": p.tp, "pp": p.pp, "dp": plan.dp}
    start, parent_meta, state = 0, None, {}
    resume_from, branch = begin.checkpoint, None
    if resume_from is not None:
        state = ckpt.load(resume_from, [model], optimizer, scheduler, layout=layout, verified=True)
        start, parent_meta = state["iteration"], state["meta"]
    elif t.branch_from:  # a WSD cooldown branch: the stable run's weights, optimizer state and step count
        from evolm_nemo.train import wsd

        branch = wsd.resolve_branch(cfg, plan.iters)
        scheduler = make_scheduler(plan.iters, warmup=branch.warmup)
        state = ckpt.load(branch.path, [model], optimizer, None, layout=layout)
        start, parent_meta = state["iteration"], state["meta"]
        scheduler.step(increment=start)
    elif t.init_from:
        parent_meta = stage.load_init(t.init_from, model)
        optimizer.reload_model_params()
    stage.restore(start, state)
    stage.prepare(model, rt, start, out)  # e.g. DPO's reference log-probs, once, before the first step

    m = cfg.model
    if rt.is_main:
        print(f"[evolm] {cfg.stage} {m.name}: {param_count(m) / 1e6:.2f}M params | tp={p.tp} pp={p.pp} dp={plan.dp} "
              f"sp={p.sp} | {rt.dtype} on {rt.device.type} | {plan.iters} iters | {stage.describe()}"
              + (f" | resuming at iteration {start}" if start and branch is None else "")
              + (f" | branching off {branch.path} at iteration {start}, cooldown to {plan.iters}" if branch else ""),
              flush=True)
    lineage = parent_meta.get("lineage") if resume_from is not None else _lineage(cfg, parent_meta, stage.lineage())
    if branch is not None:
        lineage = wsd.branch_lineage(cfg, branch, stage.lineage())
    tokenizer_ref = os.path.abspath(stage.tokenizer) if os.path.isdir(stage.tokenizer) else stage.tokenizer
    meta = {"model": dataclasses.asdict(m), "config": to_dict(cfg), "tokenizer": tokenizer_ref, "stage": cfg.stage,
            "lineage": lineage, "head": stage.head, "run_id": begin.run_id, "planned_iters": plan.iters}
    if start >= plan.iters and rt.is_main:
        print(f"[evolm] {out} is complete: {resume_from} is at iteration {start} of {plan.iters}; nothing to train",
              flush=True)
    if signum := stop.requested():
        raise stop_line(rt, signum, start, resume_from, t.save_on_signal)
    writer = MetricsWriter(out, enabled=rt.is_main, tensorboard=t.tensorboard, truncate_after=start)
    peak = peak_flops(t.peak_tflops, rt.device)
    bar = _progress_bar(cfg, rt, plan.iters, start)
    history, saved = [], None
    branch_saves = {}
    if t.branch_budgets:  # a WSD stable run keeps a checkpoint where each budget's cooldown starts
        from evolm_nemo.train.wsd import BRANCHES, branch_saves as _branch_saves

        branch_saves = _branch_saves(cfg, plan.iters)
    tick = time.perf_counter()
    for it in range(start, plan.iters):
        batches = stage.microbatches(it)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        result = train_step(model, optimizer, batches, stage.forward_step, stage.seq_length(batches),
                            stage.rows_per_microbatch(p.micro_batch_size), rt, sum_keys=stage.sum_keys)
        scheduler.step(increment=1)
        step = it + 1
        now = time.perf_counter()
        dt, tick = now - tick, now
        if not math.isfinite(result.loss):
            raise RuntimeError(f"loss is {result.loss} at iteration {step}; lower optim.lr or check the data")
        record = {"iteration": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  **stage.metrics(it, result, dt, peak, rt.world_size), "step_s": dt}
        history.append(result.loss)
        measured = stage.evaluate(model, rt, step, last=step == plan.iters)  # validation: every rank takes part
        record.update(measured)
        if measured:
            tick = time.perf_counter()  # keep validation and probe time out of the next step's throughput
        if measured or step % t.log_interval == 0 or step == plan.iters:
            writer.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{result.loss:.4f}", **stage.postfix(record))
            bar.update(1)
        if step in branch_saves:  # never pruned by keep_last: branches start here
            ckpt.save(out / BRANCHES, step, [model], optimizer, scheduler, extra=stage.checkpoint_extra(step),
                      meta={**meta, "branch_budget": branch_saves[step]}, layout=layout)
            tick = time.perf_counter()
        signum = stop.requested()  # SIGTERM on any rank: all stop after this iteration (saved first, by default)
        if (t.save_interval and step % t.save_interval == 0) or step == plan.iters or (signum and t.save_on_signal):
            saved = ckpt.save(root, step, [model], optimizer, scheduler, extra=stage.checkpoint_extra(step),
                              meta=meta, keep_last=t.keep_last, layout=layout)
            tick = time.perf_counter()  # keep checkpoint time out of throughput
        if signum and step < plan.iters:
            if bar is not None:
                bar.close()
            writer.close()
            raise stop_line(rt, signum, step, saved or resume_from, t.save_on_signal)
    if bar is not None:
        bar.close()
    writer.close()
    return TrainResult(iterations=plan.iters, start=start, losses=history, checkpoint=str(saved or resume_from or ""),
                       tokenizer=stage.tokenizer, out_dir=str(out), runtime=rt, model=model)


def run(cfg: RootConfig, plan: Plan) -> TrainResult:
    """Train the stage ``cfg.stage`` names (the registry in ``evolm_nemo.stages``)."""
    from evolm_nemo.stages import stage_module

    module = stage_module(cfg.stage)
    if hasattr(module, "run"):  # a stage with its own outer loop (RL), reusing this module's pieces
        return module.run(cfg, plan)
    return fit(cfg, plan, module.build)
