"""Losses as pure tensor functions (no megatron, no process groups), unit-tested on fixed tensors.

The convention every objective follows (megatron-core's ``calculate_per_token_loss``): a microbatch's loss function
returns the **sum** of its per-token losses and the **number** of tokens that count; the engine adds both over all
microbatches and data-parallel ranks and divides once, so the loss and the gradients are the per-token mean over the
whole global batch whatever the split into microbatches and ranks.
"""

from evolm_nemo.losses.rl import (
    constant_groups,
    entropy_from_logits,
    sampling_logits,
    gae,
    group_advantages,
    kl_estimate,
    masked_moments,
    mean_var_from_moments,
    policy_loss,
    sequence_mean_weights,
    truncated_importance_weights,
    value_loss,
    whiten,
    whiten_with,
)
from evolm_nemo.losses.token import masked_token_sum, token_mean

__all__ = [
    "masked_token_sum",
    "token_mean",
    "constant_groups",
    "entropy_from_logits",
    "sampling_logits",
    "gae",
    "group_advantages",
    "kl_estimate",
    "masked_moments",
    "mean_var_from_moments",
    "policy_loss",
    "sequence_mean_weights",
    "truncated_importance_weights",
    "value_loss",
    "whiten",
    "whiten_with",
]
