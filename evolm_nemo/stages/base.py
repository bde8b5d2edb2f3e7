"""The seam between the one loop and a stage."""

from __future__ import annotations

from functools import partial

import torch

from evolm_nemo.losses import masked_token_sum


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """megatron's 3-tuple loss contract: (loss sum, token count, logs to reduce)."""
    total, count = masked_token_sum(output_tensor, loss_mask)
    return total, count, {"loss_sum": total.detach().clone(), "tokens": count.detach().clone()}


def lm_forward_step(data_iterator, model):
    """Next-token objective: megatron's GPTModel returns per-token cross-entropy when given labels. Microbatches are
    right-padded, so under the causal mask no real token ever attends to padding."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss, batch["loss_mask"])


class Stage:
    """What a stage supplies to ``train.loop.fit``. Subclasses set ``tokenizer`` and implement ``microbatches``;
    the defaults are the language-model objective."""

    tokenizer: str = ""  # tokenizer reference (dir or hub name) recorded in checkpoints
    model_builder = None  # callable(m, p, dtype, pre_process, post_process); None: the LM (model.build.build_model)
    forward_step = staticmethod(lm_forward_step)

    def microbatches(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's microbatches of ``iteration`` (a pure function of it: exact resume)."""
        raise NotImplementedError

    def seq_length(self, batches) -> int:
        return max(b["tokens"].shape[1] for b in batches)

    def load_init(self, path: str, model) -> dict:
        """Weights from the parent ``train.init_from``; returns its evolm.json."""
        from evolm_nemo.checkpoint import io as ckpt

        return ckpt.load_weights(path, [model])

    def restore(self, start: int, state: dict) -> None:
        """Counters after resuming at iteration ``start`` (``state``: the checkpoint's common state, or {})."""

    def describe(self) -> str:
        return ""

    def lineage(self) -> dict:
        return {}

    def metrics(self, iteration: int, result, step_s: float, peak_flops: float | None, world_size: int) -> dict:
        return {}

    def postfix(self, record: dict) -> dict:
        return {}

    def checkpoint_extra(self, step: int) -> dict:
        return {}
