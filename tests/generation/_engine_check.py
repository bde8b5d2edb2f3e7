"""The megatron side of the generation tests, run in its own process (megatron state and the CPU layer are
process-wide): ``python _engine_check.py single WORKDIR`` or, under torchrun with 2 gloo ranks,
``... tp WORKDIR``. Writes facts to WORKDIR/<mode>.json (token ids, texts); the tests judge them."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

PROMPTS = ["Ben has 2 bags. Each bag has 7 cups.", "Count from 3 to 9:", "A", "The cat sat on the mat and then it"]
NEW = 24
MAX_SEQ = 64


def model_config(groups: int):
    from evolm_nemo.config.schema import ModelConfig

    # A larger init std than training's 0.02 gives peaked logits, so argmax is never a near-tie.
    return ModelConfig(num_attention_heads=4, num_query_groups=groups, init_method_std=0.1, seq_length=MAX_SEQ)


def tokenizer(work: Path):
    from evolm_nemo.data.synthetic import generate
    from evolm_nemo.data.tokenizer import load_tokenizer, train_tokenizer

    path = work / "tok"
    if path.is_dir():
        return load_tokenizer(path)
    return train_tokenizer([d["text"] for d in generate("text", 200, 0)], path, 512)


def reference(model, tok, prompt: str, max_new: int, max_length: int) -> list[int]:
    from evolm_nemo.generation.greedy import greedy_ids

    ids = greedy_ids(model, tok(prompt, add_special_tokens=False)["input_ids"], max_new, tok.eos_token_id, max_length)
    return ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids  # the engine leaves EOS out


def attention_decode() -> dict:
    """SDPAttention with fewer queries than keys (KV-cache decode) equals the last rows of full causal attention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from evolm_nemo.config.schema import ParallelConfig
    from evolm_nemo.model.attention import SDPAttention
    from evolm_nemo.model.build import transformer_config

    cfg = transformer_config(model_config(2), ParallelConfig(), torch.float32)
    ours = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ref = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, b, d = 9, 2, 16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(s, b, h, d, generator=gen) for h in (4, 2, 2))
    full = ours(q, k, v, None)
    out = {"full_vs_megatron": (full - ref(q, k, v, None)).abs().max().item()}
    for sq in (1, 3):
        for kind in (AttnMaskType.causal, AttnMaskType.no_mask):
            part = ours(q[-sq:], k, v, None, attn_mask_type=kind)
            if kind == AttnMaskType.no_mask and sq > 1:
                continue  # no_mask with several queries is genuinely unmasked
            out[f"sq{sq}_{kind.name}"] = (part - full[-sq:]).abs().max().item()
    # megatron's own implementation for the single-query decode step (what its inference path passes: no_mask)
    out["sq1_megatron"] = (ref(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask) - full[-1:]).abs().max().item()
    return out


ENGINES = ("static", "continuous")


def engine_class(name: str):
    from evolm_nemo.generation.continuous import ContinuousGenerator
    from evolm_nemo.generation.engine import Generator

    return {"static": Generator, "continuous": ContinuousGenerator}[name]


def single(work: Path) -> dict:
    from evolm_nemo.checkpoint import io
    from evolm_nemo.config.schema import ParallelConfig
    from evolm_nemo.model.build import build_model
    from evolm_nemo.runtime.distributed import setup

    setup(1, 1, seed=0, precision="fp32")
    tok = tokenizer(work)
    facts: dict = {"attention": attention_decode(), "eos": tok.eos_token_id}
    for name, groups in (("gqa", 2), ("mha", 4)):
        m = model_config(groups)
        model = build_model(m, ParallelConfig())
        ref = [reference(model, tok, p, NEW, MAX_SEQ) for p in PROMPTS]
        facts[name] = {"ref": ref, "ref_texts": [tok.decode(r, skip_special_tokens=True) for r in ref]}
        if name == "gqa":
            long_prompt = " ".join(["apples and pears"] * 12)
            facts["window_ref"] = [reference(model, tok, p, NEW, 48) for p in (long_prompt, PROMPTS[1])]
            facts["prompt_len"] = len(tok(long_prompt, add_special_tokens=False)["input_ids"])
            # EOS: make a token the first greedy completion produces mid-way the tokenizer's EOS
            eos_tok = copy.deepcopy(tok)
            eos_id = ref[0][len(ref[0]) // 2]
            eos_tok.eos_token = eos_tok.convert_ids_to_tokens(eos_id)
            facts["eos_ref"] = {"eos": eos_id, "ref": [reference(model, eos_tok, p, NEW, MAX_SEQ) for p in PROMPTS]}
        for engine in ENGINES:
            facts[name][engine] = engine_facts(engine_class(engine), model, tok, ref, name == "gqa",
                                               (long_prompt, eos_tok))
        if name == "gqa":
            io.save(work / "ckpt", 0, [model], meta={"model": dataclasses.asdict(m)}, layout={"tp": 1, "pp": 1})
    return facts


def engine_facts(Engine, model, tok, ref, more: bool, extra) -> dict:
    """What one engine does on one model: greedy in one batch and in small ones; with ``more``, the max_seq window,
    EOS, seeded sampling, stop strings and the state it leaves behind."""
    gen = Engine(model, tok, max_seq=MAX_SEQ, max_batch=8)
    batched = gen.complete(PROMPTS, NEW)  # one batch, prompts of different lengths
    small = Engine(model, tok, max_seq=MAX_SEQ, max_batch=3).complete(PROMPTS, NEW)  # 3 at a time
    facts = {"batched": [c.ids for c in batched], "small_batches": [c.ids for c in small],
             "finish": [c.finish for c in batched], "texts": [c.text for c in batched]}
    if not more:
        return facts
    long_prompt, eos_tok = extra
    # the window: prompt + completion never exceeds max_seq, as greedy_ids' max_length
    short = Engine(model, tok, max_seq=48, max_batch=2).complete([long_prompt, PROMPTS[1]], NEW)
    facts["window"] = {"engine": [c.ids for c in short], "finish": [c.finish for c in short]}
    ended = Engine(model, eos_tok, max_seq=MAX_SEQ, max_batch=2).complete(PROMPTS, NEW)
    facts["eos_run"] = {"engine": [c.ids for c in ended], "finish": [c.finish for c in ended]}
    runs = {key: gen.generate(PROMPTS, NEW, temperature=1.0, seed=seed, **kw)
            for key, seed, kw in (("a", 7, {}), ("a2", 7, {}), ("b", 8, {}), ("topk", 7, {"top_k": 5}),
                                  ("topk2", 7, {"top_k": 5}), ("topp", 7, {"top_p": 0.9}))}
    facts["sampling"] = runs
    # top_k=1 at T=0.7: a one-token distribution, so log p of every sampled token is 0 (the raw model's is not);
    # top_k=5: log p under the tempered top-5 distribution, at most that of the untruncated one
    facts["topk_logp"] = {k: [c.log_probs for c in gen.complete(PROMPTS, 8, temperature=0.7, top_k=k, seed=3,
                                                                return_log_probs=True)] for k in (1, 5)}
    facts["tempered_logp"] = [c.log_probs for c in gen.complete(PROMPTS, 8, temperature=0.7, seed=3,
                                                                return_log_probs=True)]
    facts["global_rng_untouched"] = _global_rng_untouched(gen)
    # stop strings: a piece of the first greedy completion's text, strictly inside it
    text = batched[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = gen.complete(PROMPTS[:2], NEW, stop_strings=[stop, "\x00never"])
    facts["stop"] = {"stop": stop, "full_text": text, "full_ids": batched[0].ids, "text": stopped[0].text,
                     "ids": stopped[0].ids, "finish": stopped[0].finish, "other": stopped[1].ids}
    # a stop string that the short prompt "A" would only reach past its budget (the static batch runs on while the
    # longer prompts beside it finish): the completion ends by length, with its budget's tokens
    longer = reference(model, tok, PROMPTS[2], MAX_SEQ, MAX_SEQ)
    inside, past = tok.decode(longer[:NEW]), tok.decode(longer[NEW:NEW + 12])
    late = next((past[k:k + 3] for k in range(len(past) - 2) if past[k:k + 3].strip() and past[k:k + 3] not in
                 tok.decode(longer[:NEW + 1])), None)
    if late is not None and inside:
        out = gen.complete([PROMPTS[2], PROMPTS[0], PROMPTS[3]], NEW, stop_strings=[late])[0]
        facts["late_stop"] = {"stop": late, "ids": out.ids, "finish": out.finish, "want": longer[:NEW]}
    model.train()
    gen.generate(PROMPTS[:1], 2)
    facts["training_restored"] = model.training
    model.eval()
    if Engine.__name__ == "ContinuousGenerator":
        facts["continuous"] = continuous_facts(Engine, model, eos_tok)
    return facts


def continuous_facts(Engine, model, tok) -> dict:
    """Samples and log-probs of 3 x 4 prompts at T=0.7, top_p=0.9 with 1, 3 and 16 slots, and of request 5 among
    other prompts; the decode rows against the tokens they produced (no idle slot); the samples' ids and log-probs."""
    prompts = PROMPTS * 3
    runs, stats = {}, {}
    for slots in (16, 3, 1):
        gen = Engine(model, tok, max_seq=MAX_SEQ, max_batch=slots)
        out = gen.complete(prompts, NEW, temperature=0.7, top_p=0.9, seed=11, return_log_probs=True)
        runs[slots] = [(c.ids, c.log_probs, c.finish) for c in out]
        stats[slots] = dict(gen.stats)
    others = [f"{p} and then" for p in prompts]  # other prompts around request 5, itself unchanged
    others[5] = prompts[5]
    alone = Engine(model, tok, max_seq=MAX_SEQ, max_batch=4).complete(
        others[:6], NEW, temperature=0.7, top_p=0.9, seed=11, return_log_probs=True)[5]
    # the batch split over two calls (as over two data-parallel ranks), the second numbered from where the first ends
    gen = Engine(model, tok, max_seq=MAX_SEQ, max_batch=4)
    halves = [c for lo, hi in ((0, 7), (7, len(prompts))) for c in gen.complete(
        prompts[lo:hi], NEW, temperature=0.7, top_p=0.9, seed=11, return_log_probs=True, first_request=lo)]
    unnumbered = gen.complete(prompts[7:], NEW, temperature=0.7, top_p=0.9, seed=11, return_log_probs=True)
    return {"runs": runs, "stats": stats, "alone": [alone.ids, alone.log_probs], "eos": tok.eos_token_id,
            "halves": [[c.ids, c.log_probs] for c in halves], "unnumbered": [c.ids for c in unnumbered]}


def _global_rng_untouched(gen) -> bool:
    """Generation draws from the controller's generator only: torch's global RNG stream is not reseeded."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    gen.generate(PROMPTS[:1], 3, temperature=1.0, seed=1)
    return bool(torch.equal(torch.rand(4), expected))


def tp(work: Path) -> dict:
    import torch.distributed as dist

    from evolm_nemo.checkpoint import io
    from evolm_nemo.config.schema import ParallelConfig
    from evolm_nemo.model.build import build_model
    from evolm_nemo.runtime.distributed import setup

    setup(2, 1, seed=0, precision="fp32")
    tok = tokenizer(work)
    model = build_model(model_config(2), ParallelConfig(tp=2))
    io.load_weights(work / "ckpt", [model])
    # sequence parallel: the engines switch it off while generating and back on afterwards
    sp_model = build_model(model_config(2), ParallelConfig(tp=2, sp=True))
    io.load_weights(work / "ckpt", [sp_model])
    facts = {}
    for engine in ENGINES:
        gen = engine_class(engine)(model, tok, max_seq=MAX_SEQ)
        greedy = [c.ids for c in gen.complete(PROMPTS, NEW)]
        sampled = gen.generate(PROMPTS, NEW, temperature=1.0, seed=7)
        sp_greedy = [c.ids for c in engine_class(engine)(sp_model, tok, max_seq=MAX_SEQ).complete(PROMPTS, NEW)]
        sp_restored = (sp_model.config.sequence_parallel
                       and sp_model.decoder.layers[0].mlp.linear_fc1.sequence_parallel)
        ranks = [None, None]
        dist.all_gather_object(ranks, {"greedy": greedy, "sampled": sampled, "sp_greedy": sp_greedy,
                                       "sp_restored": bool(sp_restored)})
        facts[engine] = ranks
    return facts


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    from evolm_nemo.runtime.distributed import teardown

    facts = {"single": single, "tp": tp}[mode](work)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (work / f"{mode}.json").write_text(json.dumps(facts))
    teardown()


if __name__ == "__main__":
    main()
