"""The megatron side of the probe test, in its own process: ``python _probe_check.py CKPT OUT.json``.

Loads a checkpoint into a megatron model (one process, fp32) and answers a fixed list of lm-eval loglikelihood
requests with the training probe's LiveLM; writes ``[[logprob, is_greedy], ...]``."""

from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")

REQUESTS = [
    ("Question: Which is a fruit?\nAnswer:", " an apple"),
    ("Question: Which is a fruit?\nAnswer: ", "a stone"),  # trailing space moves to the continuation
    ("", "The cat sat on the mat."),  # empty context: the prefix token conditions
    ("Count from 3 to 9: 3 4 5", " 6 7 8 9"),
    ("Ben has 2 bags. " * 30, "Each bag has 7 cups."),  # longer than the model: left-truncated
]


def main(ckpt: str, out: str) -> None:
    import torch
    from lm_eval.api.instance import Instance

    from evolm_nemo.checkpoint import io
    from evolm_nemo.config.schema import ParallelConfig
    from evolm_nemo.conversion.export import model_from_meta
    from evolm_nemo.data.tokenizer import load_tokenizer
    from evolm_nemo.evaluation.probe import live_lm
    from evolm_nemo.model.build import build_model
    from evolm_nemo.runtime import distributed

    meta = io.read_meta(io.resolve(ckpt))
    m = model_from_meta(meta, ckpt)
    distributed.setup(1, 1, seed=0, precision="fp32")
    model = build_model(m, ParallelConfig(tp=1, pp=1), torch.float32)
    io.load_weights(io.resolve(ckpt), [model])
    tok = load_tokenizer(meta["tokenizer"])
    lm = live_lm(model, tok, m.seq_length, batch_size=2)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(REQUESTS)]
    with open(out, "w") as f:
        json.dump([list(x) for x in lm.loglikelihood(reqs)], f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
