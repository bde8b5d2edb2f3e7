"""SFT throughput: our SFT step (megatron-core engine, prompt-masked loss) with microbatches padded to their longest
and with the same examples packed into rows (``train.packing``: best-fit, THD, attention within each example), vs
transformers' LlamaForCausalLM + torch AdamW on the same batch and loss (labels -100 on prompt and padding).

One global batch of examples, the same for all three; ``--mix uniform``: total lengths from seq/8 to seq with the
prompt 1/4 of each; ``--mix evolm``: shaped like EvoLM's SFT data (answers of very different lengths, log-normal,
the prompt ~1/4 of the tokens). AdamW (0.9, 0.95, wd 0), clip 1.0, fp32 on CPU. Rounds are interleaved (padded,
packed, HF, ...) so machine noise hits all; medians of answer tokens/s and their ratios are printed, with the padding
fraction of each layout. Goals on CPU: padded / HF >= 0.9; packed / padded >= 1.4.

    .venv/bin/python benchmarks/sft_throughput.py --rounds 5 --mix evolm    # ~30M-parameter shape, CPU
    .venv/bin/python benchmarks/sft_throughput.py --preset evolm_1b --seq 2048 --batch 8 --micro 8   # on a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import Parser, main, positive  # noqa: E402
from train_throughput import _shape_overrides, add_shape_args, hf_twin, interleave  # noqa: E402


def length_mix(rng, n: int, seq: int, vocab: int, mix: str = "uniform") -> list[tuple[np.ndarray, int]]:
    examples = []
    for _ in range(n):
        if mix == "evolm":  # answers of very different lengths (log-normal), the prompt ~1/4 of the tokens
            answer = int(np.clip(rng.lognormal(np.log(seq / 5), 0.8), 4, seq * 3 // 4))
            prompt = int(np.clip(answer / 3 * rng.uniform(0.6, 1.4), 4, seq + 1 - answer))
            total = prompt + answer
        else:
            total = int(rng.integers(max(seq // 8, 4), seq + 2))
            prompt = max(1, total // 4)
        examples.append((rng.integers(4, min(1000, vocab), size=total), prompt))
    return examples


def run() -> None:
    ap = Parser(__doc__)
    add_shape_args(ap)
    ap.add_argument("--seq", type=positive, default=256, help="max example length (the model's seq_length)")
    ap.add_argument("--batch", type=positive, default=8, help="examples per optimizer step (the global batch)")
    ap.add_argument("--micro", type=positive, default=8, help="our micro-batch size (HF takes the batch at once)")
    ap.add_argument("--steps", type=positive, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=positive, default=4)
    ap.add_argument("--mix", choices=("uniform", "evolm"), default="evolm", help="the batch's length mix")
    r = measure(ap.parse_args())
    print(f"shape: {r['shape']}; batch {r['batch']} examples, mix {r['mix']} ({r['answer_tokens']:,} answer tokens, "
          f"prompt {r['prompt_share']:.0%} of the tokens); padding: ours micro {r['micro']} {r['padding']['padded']:.1%}, "
          f"packed {r['packed_rows']} rows {r['padding']['packed']:.1%}, HF one padded batch "
          f"{r['padding']['HF']:.1%}; {r['dtype']} on {r['device']}")
    tps = r["answer_tokens_per_s"]
    print(f"answer tok/s: padded {tps['padded']:,.0f} | packed {tps['packed']:,.0f} | HF LlamaForCausalLM + AdamW "
          f"{tps['HF']:,.0f}; padded/HF {tps['padded'] / tps['HF']:.3f}, packed/padded "
          f"{tps['packed'] / tps['padded']:.3f}, packed/HF {tps['packed'] / tps['HF']:.3f}")


def measure(args) -> dict:
    """The three layouts on one batch (``args``: main's options); medians of answer tokens/s and the paddings."""
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.data.packing import best_fit, collate_packed
    from evolm_nemo.data.sft import collate
    from evolm_nemo.runtime.distributed import setup, teardown
    from evolm_nemo.stages import plan_run
    from evolm_nemo.stages.base import lm_forward_step
    from evolm_nemo.train.engine import build_training_model, train_step

    cfg = compose("config", _shape_overrides(args) + [f"parallel.micro_batch_size={args.micro}",
                                                      f"parallel.global_batch_size={args.batch}",
                                                      "optim.weight_decay=0"], RootConfig)
    plan_run(cfg)
    m = cfg.model
    rt = setup(1, 1, seed=0, precision="auto")
    model, optimizer, make_scheduler = build_training_model(cfg, rt)
    make_scheduler(1000)
    examples = length_mix(np.random.default_rng(0), args.batch, m.seq_length, m.vocab_size, args.mix)
    groups = [examples[i:i + args.micro] for i in range(0, args.batch, args.micro)]
    ours_batches = [collate(g, max(len(ids) for ids, _ in g) - 1, pad_id=0) for g in groups]
    seq_len = max(b["tokens"].shape[1] for b in ours_batches)
    bins = best_fit([len(ids) - 1 for ids, _ in examples], m.seq_length)
    packed = [collate_packed([examples[i] for i in b], sum(len(examples[i][0]) - 1 for i in b), pad_id=0)
              for b in bins]
    packed_len = max(b["tokens"].shape[1] for b in packed)
    answer_tokens = int(sum(len(ids) - p for ids, p in examples))
    real = sum(len(ids) - 1 for ids, _ in examples)
    padding = 1.0 - real / sum(b["tokens"].numel() for b in ours_batches)
    packed_padding = 1.0 - real / sum(b["tokens"].numel() for b in packed)

    # HF: the whole batch padded to its longest, labels -100 off the answer, attention mask on the real tokens
    full = collate(examples, max(len(ids) for ids, _ in examples) - 1, pad_id=0)
    hf_ids = full["tokens"].to(rt.device)
    hf_labels = torch.where(full["loss_mask"].bool(), full["labels"], torch.full_like(full["labels"], -100))
    hf_attn = torch.zeros_like(full["tokens"])
    for row, (ids, _) in enumerate(examples):
        hf_attn[row, :len(ids) - 1] = 1
    hf_labels, hf_attn = hf_labels.to(rt.device), hf_attn.to(rt.device)
    hf = hf_twin(m, rt)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def ours() -> None:
        train_step(model, optimizer, ours_batches, lm_forward_step, seq_len, args.micro, rt)

    def ours_packed() -> None:
        train_step(model, optimizer, packed, lm_forward_step, packed_len, 1, rt)

    def theirs() -> None:
        hf_opt.zero_grad(set_to_none=True)
        logits = hf(input_ids=hf_ids, attention_mask=hf_attn).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), hf_labels.view(-1),
                                                 ignore_index=-100)  # the per-token mean over the batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    tps = interleave({"padded": ours, "packed": ours_packed, "HF": theirs}, answer_tokens, args.steps, args.rounds,
                     rt.device, "answer tok/s")
    prompt_share = sum(p for _, p in examples) / sum(len(ids) for ids, _ in examples)
    teardown()
    return {"shape": f"{m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, heads "
                     f"{m.num_attention_heads}/{m.num_query_groups}, vocab {m.vocab_size}, max length {m.seq_length}",
            "batch": args.batch, "micro": args.micro, "mix": args.mix, "answer_tokens": answer_tokens,
            "prompt_share": prompt_share, "packed_rows": len(packed), "dtype": str(rt.dtype), "device": str(rt.device),
            "padding": {"padded": padding, "packed": packed_padding, "HF": 1.0 - real / full["tokens"].numel()},
            "answer_tokens_per_s": tps}


if __name__ == "__main__":
    sys.exit(main(run))
