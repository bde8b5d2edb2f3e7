"""Run as a script (its own process: megatron state and the CPU layer are process-wide)."""

import torch


def main() -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from evolm_nemo.config.schema import ModelConfig, ParallelConfig
    from evolm_nemo.model.attention import SDPAttention
    from evolm_nemo.model.build import transformer_config
    from evolm_nemo.runtime.distributed import setup, teardown

    setup(1, 1, seed=0, precision="fp32")
    m = ModelConfig(hidden_size=64, num_attention_heads=8, num_query_groups=2)
    cfg = transformer_config(m, ParallelConfig(), torch.float32)
    ref = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, b, d = 37, 3, 8
    torch.manual_seed(0)
    base = [torch.randn(s, b, h, d, dtype=torch.float64).float() for h in (8, 2, 2)]
    outs, grads = [], []
    for module in (ref, ours):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        out = module(q, k, v, None)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    assert outs[0].shape == outs[1].shape == (s, b, 64), outs[1].shape
    err = (outs[0] - outs[1]).abs().max().item()
    gerr = max((a - c).abs().max().item() for a, c in zip(grads[0], grads[1]))
    assert err < 1e-5 and gerr < 1e-5, (err, gerr)
    # an explicit padding mask (True = masked, megatron's convention) takes the same path as megatron's
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[:, :, :, -5:] = True
    a = ref(*base, mask, attn_mask_type=AttnMaskType.padding)
    c = ours(*base, mask, attn_mask_type=AttnMaskType.padding)
    assert (a - c).abs().max().item() < 1e-5
    print(f"ok {err:.2e} {gerr:.2e}")
    teardown()


if __name__ == "__main__":
    main()
