"""EvoLM's LLaMA-2 architecture on megatron-core's GPTModel.

RMSNorm (eps 1e-5), SwiGLU, RoPE (base 10000, non-interleaved = HF rotate-half), no biases, untied input/output
embeddings, GQA. The layer spec is Transformer Engine's when it imports on a GPU, else megatron's local spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import ModelConfig, ParallelConfig


def param_count(m: ModelConfig) -> int:
    """Parameters of the full (unsharded) model, embeddings and output layer included."""
    head_dim = m.hidden_size // m.num_attention_heads
    kv = m.num_query_groups * head_dim
    attn = m.hidden_size * (m.hidden_size + 2 * kv) + m.hidden_size * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    norms = 2 * m.hidden_size
    return m.num_layers * (attn + mlp + norms) + m.hidden_size + 2 * m.vocab_size * m.hidden_size


def flops_per_token(m: ModelConfig) -> float:
    """Training FLOPs per token: 6 * non-embedding-input params + attention scores (PaLM appendix B)."""
    n = param_count(m) - m.vocab_size * m.hidden_size
    return 6.0 * n + 12.0 * m.num_layers * m.hidden_size * m.seq_length


def _te_spec():
    try:  # a bare transformer-engine package raises RuntimeError, not ImportError
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    except Exception:
        return None


def layer_spec(m: ModelConfig):
    """(spec, name): TE on GPU when importable (layer_spec=auto|te), megatron local otherwise."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if m.layer_spec in ("auto", "te") and torch.cuda.is_available():
        spec = _te_spec()
        if spec is not None:
            return spec, "te"
    if m.layer_spec == "te":
        raise ConfigError("model.layer_spec", "te needs a GPU with transformer-engine installed (NGC PyTorch "
                                              "container); use model.layer_spec=local or auto")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    from evolm_nemo.model.attention import CachedRopeSelfAttention

    spec.submodules.self_attention.module = CachedRopeSelfAttention  # RoPE once per key in the inference KV cache
    if m.core_attention == "sdpa":
        from evolm_nemo.model.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec, f"local+{m.core_attention}"


def transformer_config(m: ModelConfig, p: ParallelConfig, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        layernorm_epsilon=m.norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        sequence_parallel=p.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # CPU init builds each full weight from the seeded generator and then splits it, so every TP/PP layout
        # starts from the same weights; on GPU it is much slower, so GPUs initialise their shards in place.
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def build_model(m: ModelConfig, p: ParallelConfig, dtype: torch.dtype = torch.float32, pre_process: bool = True,
                post_process: bool = True):
    """One pipeline stage of the model (the whole model when pp=1). Parallel state must be initialised."""
    from megatron.core.models.gpt import GPTModel

    spec, _ = layer_spec(m)
    config = transformer_config(m, p, dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(m.rope_base) if float(m.rope_base).is_integer() else float(m.rope_base),  # HF's theta as is
        rotary_percent=1.0,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def with_precision(model, dtype: torch.dtype):
    """The model as megatron's mixed precision runs it: in bf16/fp16, wrapped in ``Float16Module`` (every parameter,
    norms too, in that dtype; inputs cast on the first pipeline stage, outputs in fp32 on the last). The trained roles
    and the frozen ones (RL reference, reward model) go through here, so a frozen copy computes what the trained one
    would with the same weights. fp32: the model as is."""
    if dtype == torch.float32:
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)
