"""Value / reward model: our LLaMA-2 GPTModel whose output layer is a one-row linear head (a scalar per token).

The head replaces ``output_layer`` (so ``GPTModel.forward`` returns ``[batch, seq, 1]`` values and checkpoints keep
the key ``output_layer.weight``, shape ``[1, hidden]``). One row cannot be split over tensor-parallel ranks, so the
head is replicated: every TP rank holds the whole weight and computes the same values (with sequence parallelism it
first gathers the sequence). It maps to HF ``LlamaForSequenceClassification`` (num_labels=1): ``score.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evolm_nemo.checkpoint import io
from evolm_nemo.config.schema import ModelConfig, ParallelConfig
from evolm_nemo.model.build import build_model


class ValueHead(torch.nn.Module):
    """hidden ``[s, b, h]`` -> values ``[s, b, 1]``; called like megatron's output layer."""

    def __init__(self, config):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        # Same values on every TP rank by construction: a generator seeded from the (rank-independent) run seed.
        gen = torch.Generator().manual_seed(torch.initial_seed() + 1)
        weight = torch.empty(1, config.hidden_size, dtype=torch.float32)
        weight.normal_(0.0, config.init_method_std, generator=gen)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.weight = torch.nn.Parameter(weight.to(device=device, dtype=config.params_dtype))

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # every TP rank computes the whole (replicated) head: its gradient is split back, not summed over ranks
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight), None


def scores_at_last(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``[b, s, 1]`` (or ``[b, s]``) per-position values -> ``[b]`` scores at ``last`` (one per row); for one packed
    row ``[1, t]`` holding several sequences, ``last`` indexes the row and gives one score per sequence."""
    v = values.squeeze(-1) if values.dim() == 3 else values
    if v.shape[0] == 1 and last.numel() > 1:
        return v[0].float()[last]
    return v.float().gather(1, last.unsqueeze(1)).squeeze(1)


def build_value_model(m: ModelConfig, p: ParallelConfig, dtype: torch.dtype = torch.float32, pre_process: bool = True,
                      post_process: bool = True):
    """One pipeline stage of a value model (``post_process`` stages carry the head)."""
    model = build_model(m, p, dtype, pre_process=pre_process, post_process=post_process)
    if post_process:
        model.output_layer = ValueHead(model.config)
    return model


def load_backbone(path, chunks) -> dict:
    """Load a checkpoint's weights (LM or value model) except its output layer, at any TP/PP: how a reward model
    starts from an SFT checkpoint. Returns the checkpoint's evolm.json."""
    from megatron.core import dist_checkpointing

    path = io.resolve(path)
    meta = io.read_meta(path)
    io.verify(path)  # every file against its checksum, as any load (once per process)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    state = {}
    for key, chunk in zip(keys, chunks):
        module = getattr(chunk, "module", chunk)
        sharded = module.sharded_state_dict()
        state[key] = {k: v for k, v in sharded.items() if not k.startswith("output_layer.")}
    loaded = dist_checkpointing.load(state, str(path))
    for key, chunk in zip(keys, chunks):
        module = chunk
        while hasattr(module, "module"):  # DDP, then (bf16) Float16Module, whose load_state_dict returns nothing
            module = module.module
        result = module.load_state_dict(loaded[key], strict=False)
        unexpected = [k for k in result.unexpected_keys]
        missing = [k for k in result.missing_keys if not k.startswith("output_layer.")]
        if missing or unexpected:
            raise RuntimeError(f"{path}: backbone load left missing {missing[:3]} unexpected {unexpected[:3]}")
    return meta
