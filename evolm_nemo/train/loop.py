"""The one training loop: megatron DDP + megatron optimizer, pipeline schedules, checkpoints, metrics.

Stages differ only in data and loss; pretraining and CPT use this loop as is (CPT starts from ``train.init_from``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.compose import to_dict
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import format_tokens
from evolm_nemo.config.validate import Plan
from evolm_nemo.model.build import build_model, flops_per_token, param_count
from evolm_nemo.runtime.distributed import Runtime, setup
from evolm_nemo.train.metrics import MetricsWriter, peak_flops

# ------------------------------------------------------------------------------------------------------------ model


def build_training_model(cfg: RootConfig, rt: Runtime):
    """Model stage for this rank wrapped in megatron DDP, plus the megatron optimizer and LR scheduler."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    model = build_model(cfg.model, cfg.parallel, rt.dtype, pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())
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


def _scheduler(cls, optimizer, o, iters: int):
    warmup = int(round(o.warmup_fraction * iters))
    return cls(optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
               lr_decay_steps=max(iters, warmup + 1), lr_decay_style=o.decay_style, start_wd=o.weight_decay,
               end_wd=o.weight_decay, wd_incr_steps=iters, wd_incr_style="constant")


# ------------------------------------------------------------------------------------------------------------- step


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * mask) / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _to_device(batches, device):
    return [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]


def train_step(model, optimizer, batches, cfg: RootConfig, rt: Runtime) -> tuple[float, float]:
    """One optimizer step over this rank's microbatches. Returns (mean loss over the global batch, grad norm)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(_to_device(batches, rt.device)), model=[model],
        num_microbatches=len(batches), seq_length=cfg.model.seq_length, micro_batch_size=cfg.parallel.micro_batch_size,
        decoder_seq_length=cfg.model.seq_length, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    # Mean loss: summed on the last pipeline stage's tensor-parallel rank 0 of each dp replica, then over the world.
    report = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    if report:
        total[0] = sum(float(x["lm loss"]) for x in losses) / len(losses)
        total[1] = 1.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1]), float(grad_norm if grad_norm is not None else float("nan"))


# -------------------------------------------------------------------------------------------------------------- run


def _lineage(cfg: RootConfig, parent_meta: dict | None, tokens: int) -> dict:
    record = {"stage": cfg.stage, "data": cfg.data.hf_dataset or cfg.data.name, "tokens": tokens,
              "model": cfg.model.name}
    previous = list((parent_meta or {}).get("lineage", {}).get("stages", []))
    return {"stages": previous + [record], "parent": cfg.train.init_from, **{k: v for k, v in (
        cfg.lineage or {}).items() if k != "stages"}}


def run(cfg: RootConfig, plan: Plan) -> dict:
    """Train ``cfg`` for ``plan.iters`` iterations (resuming if possible). Returns a summary on every rank."""
    from megatron.core import parallel_state

    from evolm_nemo.data.gpt import BatchSchedule, build_dataset, resolve_source
    from evolm_nemo.data.tokenizer import load_tokenizer

    p, m, t = cfg.parallel, cfg.model, cfg.train
    rt = setup(p.tp, p.pp, t.seed, t.precision)
    out = Path(cfg.run.out_dir)
    root = out / "checkpoints"
    source = resolve_source(cfg)
    tokenizer = load_tokenizer(source.tokenizer, key="data.tokenizer")
    if len(tokenizer) > m.vocab_size:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    dataset = build_dataset(cfg, source, tokenizer, plan.iters * p.global_batch_size)
    schedule = BatchSchedule(dataset, p.global_batch_size, p.micro_batch_size,
                             parallel_state.get_data_parallel_rank(), plan.dp)

    model, optimizer, make_scheduler = build_training_model(cfg, rt)
    scheduler = make_scheduler(plan.iters)
    layout = {"tp": p.tp, "pp": p.pp, "dp": plan.dp}
    start, parent_meta = 0, None
    resume_from = ckpt.latest(root) if t.resume else None
    if resume_from is not None:
        state = ckpt.load(resume_from, [model], optimizer, scheduler, layout=layout)
        start = state["iteration"]
        parent_meta = state["meta"]
    elif t.init_from:
        parent_meta = ckpt.load_weights(t.init_from, [model])
        optimizer.reload_model_params()

    n_params = param_count(m)
    tokens_total = plan.iters * plan.tokens_per_iter
    if rt.is_main:
        print(f"[evolm] {cfg.stage} {m.name}: {n_params / 1e6:.2f}M params | tp={p.tp} pp={p.pp} dp={plan.dp} "
              f"sp={p.sp} | {rt.dtype} on {rt.device.type} | {plan.iters} iters x {plan.tokens_per_iter:,} tokens "
              f"= {format_tokens(tokens_total)} tokens"
              + (f" (budget train.tokens={t.tokens})" if t.tokens else "")
              + (f" | resuming at iteration {start}" if start else ""), flush=True)
    lineage = (parent_meta or {}).get("lineage") if resume_from is not None else _lineage(cfg, parent_meta, tokens_total)
    tokenizer_ref = os.path.abspath(source.tokenizer) if os.path.isdir(source.tokenizer) else source.tokenizer
    meta = {"model": dataclasses.asdict(m), "config": to_dict(cfg), "tokenizer": tokenizer_ref, "stage": cfg.stage,
            "lineage": lineage}
    writer = MetricsWriter(out, enabled=rt.is_main, tensorboard=t.tensorboard, truncate_after=start)
    peak = peak_flops(t.peak_tflops, rt.device)
    fpt = flops_per_token(m)
    bar = None
    if rt.is_main and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.iters, initial=start, desc=f"{cfg.stage}", unit="it", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 15.0)
    history = []
    saved = None
    tick = time.perf_counter()
    for it in range(start, plan.iters):
        loss, grad_norm = train_step(model, optimizer, schedule.microbatches(it), cfg, rt)
        scheduler.step(increment=1)
        step = it + 1
        now = time.perf_counter()
        dt, tick = now - tick, now
        tps = plan.tokens_per_iter / dt
        record = {"iteration": step, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                  "tokens": step * plan.tokens_per_iter, "tokens_per_s": tps, "step_s": dt,
                  "mfu": (fpt * tps / (peak * rt.world_size)) if peak else None}
        history.append(loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at iteration {step}; lower optim.lr or check the data")
        if step % t.log_interval == 0 or step == plan.iters:
            writer.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
        if (t.save_interval and step % t.save_interval == 0) or step == plan.iters:
            saved = ckpt.save(root, step, [model], optimizer, scheduler,
                              extra={"consumed_samples": step * p.global_batch_size,
                                     "tokens": step * plan.tokens_per_iter},
                              meta=meta, keep_last=t.keep_last, layout=layout)
            tick = time.perf_counter()  # keep checkpoint time out of throughput
    if bar is not None:
        bar.close()
    writer.close()
    return {"iterations": plan.iters, "start": start, "losses": history, "checkpoint": str(saved or resume_from or ""),
            "tokenizer": source.tokenizer, "model": model, "runtime": rt, "out_dir": str(out)}

