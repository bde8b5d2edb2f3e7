"""The reward role: the verifiable reward (the shared answer checker, ``rollout.verifiable_rewards``), a reward model,
a user reward function (``rl.reward_fn``, run by ``rl/reward_fn.py``), or a weighted sum (``rl.reward``):

* ``verifiable`` / ``rm`` / ``custom``: that reward alone (unweighted);
* ``sum``: ``rl.verifiable_weight`` x verifiable + ``rl.reward_model_weight`` x the RM's score when ``rl.reward_model``
  is set + ``rl.reward_fn_weight`` x the function's score when ``rl.reward_fn`` is set (at least one of the two).

The reward model is a frozen value-head megatron model (a ``stage=rm`` run, or ``evolm import-hf`` of an HF
``LlamaForSequenceClassification``) at the actor's tensor-parallel layout. It scores ``prompt_ids + response_ids``
of each rollout at the last response token, with a final EOS left out -- exactly the sequences `evolm prepare-rm`
trains on and the HF export reads (its last non-padding token). The actor's and the RM's tokenizers must agree.
"""

from __future__ import annotations

import dataclasses
import math

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.data.packing import round_up, row_multiple
from evolm_nemo.data.tokenizer import load_tokenizer

REWARDS = ("verifiable", "rm", "custom", "sum")


def check(cfg: RootConfig, actor_tokenizer_ref: str | None) -> None:
    """``rl.reward`` / ``rl.reward_model`` before anything heavy: the RM is a committed value-head checkpoint whose
    tokenizer is the actor's."""
    from evolm_nemo.checkpoint import io as ckpt

    r = cfg.rl
    if r.reward not in REWARDS:
        raise ConfigError("rl.reward", f"must be one of {', '.join(REWARDS)}; got {r.reward!r}")
    check_reward_model_used(cfg)
    check_reward_fn(cfg)
    if r.reward in ("verifiable", "custom") or (r.reward == "sum" and r.reward_fn and not r.reward_model):
        return
    if not r.reward_model:
        also = " (or rl.reward_fn, a reward function, for rl.reward=sum)" if r.reward == "sum" else ""
        raise ConfigError("rl.reward_model", f"rl.reward={r.reward} needs a reward-model checkpoint (a stage=rm run, "
                                             f"or `evolm import-hf` of an HF LlamaForSequenceClassification){also}")
    try:
        meta = ckpt.read_meta(ckpt.resolve(r.reward_model))
    except ckpt.CheckpointError as exc:
        raise ConfigError("rl.reward_model", str(exc)) from None
    if meta.get("head") != "value":
        raise ConfigError("rl.reward_model", f"{r.reward_model} is a language model (head={meta.get('head', 'lm')}), "
                                             "not a reward model with a scalar head")
    if meta.get("role") == "critic":
        raise ConfigError("rl.reward_model", f"{r.reward_model} is a PPO critic (it predicts returns, not rewards); "
                                             "use a stage=rm run or an imported HF reward model")
    m, tp = meta.get("model") or {}, cfg.parallel.tp
    for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if key in m and m[key] % tp:
            raise ConfigError("rl.reward_model", f"{r.reward_model}: its {key}={m[key]} does not split over "
                                                 f"parallel.tp={tp} (the RM runs at the actor's TP layout)")
    longest = min(cfg.model.seq_length, r.max_prompt_tokens + r.max_response_tokens)
    if "seq_length" in m and m["seq_length"] < longest:  # it would read only the end of a long prompt + response
        raise ConfigError("rl.reward_model", f"{r.reward_model} reads at most {m['seq_length']} tokens, but a prompt + "
                                             f"response may hold {longest} (model.seq_length, rl.max_prompt_tokens + "
                                             "rl.max_response_tokens): lower those, or use an RM with a longer "
                                             "context")
    ref = meta.get("tokenizer")
    if ref and actor_tokenizer_ref and ref != actor_tokenizer_ref:
        from evolm_nemo.data.sft import tokenizer_fingerprint

        a = tokenizer_fingerprint(load_tokenizer(actor_tokenizer_ref, key="train.init_from"))["vocab_sha256"]
        b = tokenizer_fingerprint(load_tokenizer(ref, key="rl.reward_model"))["vocab_sha256"]
        if a != b:
            raise ConfigError("rl.reward_model", f"{r.reward_model} uses tokenizer {ref}, the actor {actor_tokenizer_ref}"
                                                 "; the RM reads the actor's token ids, so they must agree")


def check_reward_model_used(cfg: RootConfig) -> None:
    """``rl.reward_model`` set while ``rl.reward`` does not read it (verifiable, custom) is refused: it would be
    silently ignored (the run would train on another reward than the one asked for). From the recipe alone: the
    trainer and `evolm suite plan` refuse it alike (``stages.rl.check_ranges``)."""
    r = cfg.rl
    if r.reward_model and r.reward in ("verifiable", "custom"):
        raise ConfigError("rl.reward_model", f"rl.reward={r.reward} does not use it; set rl.reward=rm (the reward "
                                             "model alone) or rl.reward=sum (weighted with the verifiable reward), or "
                                             "leave rl.reward_model null")


def check_reward_fn(cfg: RootConfig) -> None:
    """``rl.reward_fn`` and its options: the function is imported and its signature checked here, before any model is
    built; one set while ``rl.reward`` does not use it is refused (it would be silently ignored)."""
    from evolm_nemo.rl.reward_fn import ERRORS, resolve

    r = cfg.rl
    if r.reward == "custom" and not r.reward_fn:
        raise ConfigError("rl.reward_fn", "rl.reward=custom needs a reward function: rl.reward_fn=package.module:"
                                          "function (called fn(prompt, response, row) -> float or {'score': float, "
                                          "...})")
    if not r.reward_fn:
        return
    if r.reward not in ("custom", "sum"):
        raise ConfigError("rl.reward_fn", f"rl.reward={r.reward} does not use it; set rl.reward=custom (the function "
                                          "alone) or rl.reward=sum (weighted with the verifiable reward)")
    if r.reward_fn_errors not in ERRORS:
        raise ConfigError("rl.reward_fn_errors", f"must be one of {', '.join(ERRORS)}; got {r.reward_fn_errors!r}")
    if not r.reward_fn_timeout > 0:
        raise ConfigError("rl.reward_fn_timeout", f"must be > 0 seconds, got {r.reward_fn_timeout}")
    if r.reward_fn_workers < 1:
        raise ConfigError("rl.reward_fn_workers", f"must be >= 1, got {r.reward_fn_workers}")
    for key in ("verifiable_weight", "reward_model_weight", "reward_fn_weight"):
        if not math.isfinite(getattr(r, key)):
            raise ConfigError(f"rl.{key}", f"must be a finite number, got {getattr(r, key)}")
    resolve(r.reward_fn)


class RewardModelScorer:
    """A frozen RM at the run's TP layout; ``score(prompt_ids, response_ids, eos)`` -> one float per sequence."""

    def __init__(self, cfg: RootConfig, rt):
        from evolm_nemo.checkpoint import io as ckpt
        from evolm_nemo.conversion.export import model_from_meta
        from evolm_nemo.model.build import with_precision
        from evolm_nemo.model.heads import build_value_model

        self.path = ckpt.resolve(cfg.rl.reward_model)  # its latest checkpoint now (a resumed run loads its own)
        m = model_from_meta(ckpt.read_meta(self.path), str(self.path), key="rl.reward_model")
        m = dataclasses.replace(m, layer_spec=cfg.model.layer_spec)
        self.cfg, self.rt = cfg, rt
        self.model = with_precision(build_value_model(m, cfg.parallel, rt.dtype), rt.dtype)  # as it was trained
        self.max_len = m.seq_length

    def load(self, path) -> None:
        """The weights of checkpoint ``path`` (the one this run started with: ``RLStage.prepare``)."""
        from evolm_nemo.checkpoint import io as ckpt

        ckpt.load_weights(path, [self.model])
        self.model.eval()

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], eos: int) -> list[float]:
        from evolm_nemo.data.collate import collate_sequences
        from evolm_nemo.model.heads import scores_at_last
        from evolm_nemo.train.forward import forward_collect, value_forward_step

        seqs = []
        for p, r in zip(prompt_ids, response_ids):
            r = r[:-1] if r and r[-1] == eos else r
            seqs.append((p + r)[-self.max_len:])
        p = self.cfg.parallel
        mbs, multiple = p.micro_batch_size, row_multiple(p)
        batches = []
        for i in range(0, len(seqs), mbs):
            chunk = seqs[i:i + mbs]
            length = round_up(max(len(s) for s in chunk), multiple)
            batches.append(collate_sequences(chunk, [1] * len(chunk), length, eos))
        outs = forward_collect(self.model, batches, value_forward_step, mbs, self.rt)
        scores = [float(v) for out, b in zip(outs, batches) for v in scores_at_last(out, b["last"])]
        if not all(math.isfinite(s) for s in scores):
            raise ConfigError("rl.reward_model", f"{self.cfg.rl.reward_model} returned a non-finite score (NaN or "
                                                 "inf) for a response; the reward model is damaged or diverged")
        return scores


def combine(verifiable: list[float], rm_scores: list[float] | None, cfg: RootConfig,
            fn_scores: list[float] | None = None) -> list[float]:
    r = cfg.rl
    if r.reward == "verifiable":
        return list(verifiable)
    if r.reward == "rm":
        return list(rm_scores)
    if r.reward == "custom":
        return list(fn_scores)
    out = [r.verifiable_weight * v for v in verifiable]
    if rm_scores is not None:
        out = [x + r.reward_model_weight * s for x, s in zip(out, rm_scores)]
    if fn_scores is not None:
        out = [x + r.reward_fn_weight * s for x, s in zip(out, fn_scores)]
    return out
