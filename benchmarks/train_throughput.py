"""Training throughput: our megatron-core step vs a plain PyTorch HF LlamaForCausalLM step of identical shape.

Both take the same random token batch, AdamW (0.9, 0.95, wd 0.1) and grad clipping at 1.0, fp32 on CPU (bf16 on GPU).
Rounds are interleaved (ours, HF, ours, HF, ...) so machine noise hits both; the median tokens/s of each and their
ratio are printed. Goal on CPU: ratio >= 0.9.

    .venv/bin/python benchmarks/train_throughput.py                      # ~20M-parameter shape, CPU
    .venv/bin/python benchmarks/train_throughput.py --preset evolm_1b --seq 2048 --batch 4   # on a GPU
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from _args import Parser, main, positive


def _shape_overrides(args) -> list[str]:
    if args.preset:
        return [f"model={args.preset}", f"model.seq_length={args.seq}"]
    return [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.ffn_hidden_size={args.ffn}",
            f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.groups}",
            f"model.vocab_size={args.vocab}", f"model.seq_length={args.seq}"]


def add_shape_args(ap) -> None:
    """The model-shape options both throughput scripts take (``_shape_overrides`` turns them into overrides)."""
    ap.add_argument("--preset", default=None, help="model preset instead of the explicit shape (e.g. evolm_1b)")
    ap.add_argument("--layers", type=positive, default=8)
    ap.add_argument("--hidden", type=positive, default=512)
    ap.add_argument("--ffn", type=positive, default=1376)
    ap.add_argument("--heads", type=positive, default=8)
    ap.add_argument("--groups", type=positive, default=4)
    ap.add_argument("--vocab", type=positive, default=8000)


def hf_twin(m, rt):
    """A transformers LlamaForCausalLM of the same shape as model config ``m`` (random init), on ``rt``'s device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)).to(rt.device, rt.dtype)


def interleave(fns: dict, tokens_per_step: int, steps: int, rounds: int, device, unit: str = "tok/s") -> dict:
    """Warm each of ``fns`` (name -> callable) up, then time ``rounds`` interleaved rounds of ``steps`` calls of each;
    returns the medians of tokens/s by name and prints each round."""
    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens_per_step * steps / (time.perf_counter() - t0)

    for fn in fns.values():
        fn()
    results = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            results[name].append(timed(fn))
        print(f"round {r + 1}: " + " | ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items()) + f" {unit}",
              flush=True)
    return {name: statistics.median(v) for name, v in results.items()}


def interleaved(ours, theirs, tokens_per_step: int, steps: int, rounds: int, device, unit: str = "tok/s"):
    """``interleave`` of ours and HF: the medians ``(ours, theirs)``."""
    tps = interleave({"ours": ours, "HF": theirs}, tokens_per_step, steps, rounds, device, unit)
    return tps["ours"], tps["HF"]


def run() -> None:
    ap = Parser(__doc__)
    add_shape_args(ap)
    ap.add_argument("--seq", type=positive, default=256)
    ap.add_argument("--batch", type=positive, default=8)
    ap.add_argument("--steps", type=positive, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=positive, default=4)
    args = ap.parse_args()

    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.model.build import flops_per_token, param_count
    from evolm_nemo.runtime.distributed import setup, teardown
    from evolm_nemo.stages import plan_run
    from evolm_nemo.stages.base import lm_forward_step
    from evolm_nemo.train.engine import build_training_model, train_step
    from evolm_nemo.train.metrics import peak_flops

    cfg = compose("config", _shape_overrides(args) + [f"parallel.micro_batch_size={args.batch}",
                                                      f"parallel.global_batch_size={args.batch}"], RootConfig)
    plan_run(cfg)
    m = cfg.model
    rt = setup(1, 1, seed=0, precision="auto")
    model, optimizer, make_scheduler = build_training_model(cfg, rt)
    make_scheduler(1000)
    tokens = torch.randint(0, m.vocab_size, (args.batch, m.seq_length + 1))
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
             "loss_mask": torch.ones(args.batch, m.seq_length),
             "position_ids": torch.arange(m.seq_length).unsqueeze(0).expand(args.batch, -1).contiguous()}

    hf = hf_twin(m, rt)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    hf_tokens = tokens.to(rt.device)

    def ours() -> None:
        train_step(model, optimizer, [batch], lm_forward_step, m.seq_length, args.batch, rt)

    def theirs() -> None:
        hf_opt.zero_grad(set_to_none=True)
        out = hf(input_ids=hf_tokens[:, :-1], labels=hf_tokens[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    ours_tps, hf_tps = interleaved(ours, theirs, args.batch * m.seq_length, args.steps, args.rounds, rt.device)
    print(f"shape: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
          f"{m.num_attention_heads}/{m.num_query_groups}, vocab {m.vocab_size}, seq {m.seq_length}, batch {args.batch} "
          f"({param_count(m) / 1e6:.1f}M params), {rt.dtype} on {rt.device}")
    print(f"ours {ours_tps:,.0f} tok/s | HF LlamaForCausalLM {hf_tps:,.0f} tok/s | ratio {ours_tps / hf_tps:.3f}")
    peak = peak_flops(None, rt.device)
    if peak:
        print(f"MFU ours {flops_per_token(m) * ours_tps / peak:.3f} | HF {flops_per_token(m) * hf_tps / peak:.3f}")
    teardown()


if __name__ == "__main__":
    sys.exit(main(run))
