"""Core attention for megatron's local layer spec through ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's own ``DotProductAttention`` materialises the [b*heads, s, s] score matrix (baddbmm, mask, softmax,
bmm) and repeats K/V for GQA. PyTorch's SDPA computes the same attention with fused kernels (flash attention on CPU
and GPU) and native GQA, so the local spec — CPU runs, and GPUs without Transformer Engine — uses it by default
(``model.core_attention=sdpa``). Packed sequences (megatron's THD layout: ``packed_seq_params`` with ``cu_seqlens``,
tokens ``[t, heads, head_dim]``) run as one row under a block-diagonal causal mask, so no token attends across an
example; megatron's own implementation has no THD path. Cases SDPA does not cover here (attention bias, softmax
offsets, sliding windows) fall back to megatron's implementation.

With a KV cache (megatron's inference engine) the query can be shorter than the key: a single query (decode) sees
every cached key, and sq > 1 queries get a causal mask aligned bottom-right (SDPA's ``is_causal`` is top-left).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """Drop-in for megatron's DotProductAttention: inputs [s, b, heads, head_dim], output [s, b, heads*head_dim]."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd" and attention_bias is None:
            return self._packed(query, key, value, packed_seq_params)
        unsupported = (packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None
                       or self.scale_mask_softmax.window_size is not None or self.config.apply_query_key_layer_scaling
                       or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding))
        if unsupported:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, head_dim]
        sk = key.shape[0]
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
        causal = mask_type == AttnMaskType.causal and attention_mask is None and sq > 1
        if causal and sq != sk:
            # Queries are the last sq of sk positions (KV-cache decode). SDPA's is_causal aligns its mask top-left,
            # which is wrong here: query i sees keys up to sk - sq + i (bottom-right alignment).
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
            causal = False
        dropout = self.attention_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, params):
        """THD: ``[t, heads, head_dim]`` holding whole sequences back to back (``cu_seqlens``); each attends causally
        within itself only. Output ``[t, heads*head_dim]`` (megatron reshapes it to ``[t, 1, hidden]``)."""
        t = query.shape[0]
        bounds = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        seq_id = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=query.device),
                                         (bounds[1:] - bounds[:-1]).to(query.device).long())
        if seq_id.numel() != t:
            raise ValueError(f"cu_seqlens cover {seq_id.numel()} tokens, the packed row has {t}")
        pos = torch.arange(t, device=query.device)
        mask = (seq_id[:, None] == seq_id[None, :]) & (pos[:, None] >= pos[None, :])
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, head_dim]
        dropout = self.attention_dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        return context.squeeze(0).permute(1, 0, 2).reshape(t, -1)


def _cached_rope_attention_class():
    """megatron's SelfAttention with RoPE applied to each key once, before it enters the static KV cache.

    megatron-core 0.16's static inference path caches keys *before* RoPE and re-applies RoPE to the whole cache
    ``[:sequence_end]`` in every layer at every decode step (its flash-decode path, CUDA-only, avoids it). RoPE is
    position-wise, so rotating each key once at its own position gives the same values the re-application gives;
    this subclass does that (as megatron's dynamic engine does): the new keys are rotated, cached, and only the
    query's rotation is left to ``forward``. Training and prefill-free paths are megatron's own."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.attention import SelfAttention

    class CachedRopeSelfAttention(SelfAttention):
        def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                            rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                            sequence_len_offset=None, *, inference_params=None):
            if (inference_context is None or rotary_pos_emb is None or self.config.flash_decode
                    or not inference_context.is_static_batching()):
                return super()._adjust_key_value_for_inference(
                    inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                    rotary_pos_cos_sin, sequence_len_offset, inference_params=inference_params)
            q_pos_emb, k_pos_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            start = inference_context.sequence_len_offset
            end = start + key.size(0)
            if k_pos_emb is not None:
                key = apply_rotary_pos_emb(key, k_pos_emb[start:end], config=self.config,
                                           cp_group=self.pg_collection.cp)
            query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
                inference_context, query, key, value, None, rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
                sequence_len_offset, inference_params=inference_params)
            q = None if q_pos_emb is None else q_pos_emb[start:end]
            return query, key, value, (q, None), mask_type, block_table

    return CachedRopeSelfAttention


CachedRopeSelfAttention = _cached_rope_attention_class()
