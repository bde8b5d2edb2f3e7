"""The engine room: a stage's model wrapped in megatron DDP with the megatron optimizer and scheduler, and one
optimizer step (or one forward-only pass) over a list of microbatches through megatron's pipeline schedules.

Every loss follows one convention: a microbatch's loss function returns ``(loss_sum, n_tokens, logs)`` and
megatron-core's ``calculate_per_token_loss`` mode adds the sums and counts over all microbatches and data-parallel
ranks and divides once (``finalize_model_grads`` scales the gradients by ``1 / tokens in the global batch``). So the
loss and the gradients are the per-token mean over the whole global batch, however it is split into microbatches and
ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from evolm_nemo.config.schema import RootConfig
from evolm_nemo.model.build import build_model, with_precision
from evolm_nemo.runtime.distributed import Runtime
from evolm_nemo.train.wsd import scheduler_kwargs

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
    model = with_precision(model, rt.dtype)  # megatron's mixed precision: every param in bf16, fp32 main params
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
