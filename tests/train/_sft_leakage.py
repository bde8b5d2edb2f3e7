"""Worker for test_sft.py: a real megatron GPTModel (tiny, random init) on a right-padded SFT microbatch, and on the
same examples packed into one row (THD), vs each example alone. Writes the facts as JSON to argv[1]."""

import json
import sys

import numpy as np
import torch


def main(path: str) -> None:
    from evolm_nemo.config.schema import ModelConfig, ParallelConfig
    from evolm_nemo.data.packing import collate_packed, packed_seq_params
    from evolm_nemo.data.sft import collate
    from evolm_nemo.model.build import build_model
    from evolm_nemo.runtime.distributed import setup, teardown

    setup(1, 1, seed=7, precision="fp32")
    model = build_model(ModelConfig(), ParallelConfig(tp=1, pp=1)).eval()
    rng = np.random.default_rng(0)
    examples = [(rng.integers(4, 500, size=n), p) for n, p in ((9, 4), (40, 12), (17, 3), (64, 30))]
    seq = max(len(ids) for ids, _ in examples) - 1
    batch = collate(examples, seq, pad_id=2)
    with torch.no_grad():
        padded = model(batch["tokens"], batch["position_ids"], None)  # [b, s, vocab]
        row = collate_packed(examples, sum(len(ids) - 1 for ids, _ in examples) + 6, pad_id=2)
        packed = model(row["tokens"], row["position_ids"], None, packed_seq_params=packed_seq_params(row))[0]
        worst = worst_packed = 0.0
        at = 0
        for r, (ids, p) in enumerate(examples):
            alone = collate([(ids, p)], len(ids) - 1, pad_id=2)
            logits = model(alone["tokens"], alone["position_ids"], None)[0]
            n = len(ids) - 1
            worst = max(worst, float((padded[r, :n] - logits[:n]).abs().max()))
            worst_packed = max(worst_packed, float((packed[at:at + n] - logits[:n]).abs().max()))
            at += n
    pad_positions = sum(seq - (len(ids) - 1) for ids, _ in examples)
    mask = batch["loss_mask"]
    facts = {"max_diff": worst, "max_diff_packed": worst_packed, "lengths": [len(ids) for ids, _ in examples], "pad_positions": pad_positions,
             "padded_loss_positions": int(sum(mask[r, len(ids) - 1:].sum() for r, (ids, _) in enumerate(examples))),
             "answer_positions": int(mask.sum())}
    assert facts["answer_positions"] == sum(len(ids) - p for ids, p in examples)
    with open(path, "w") as f:
        json.dump(facts, f)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
