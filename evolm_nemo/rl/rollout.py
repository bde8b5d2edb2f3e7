"""Rollouts from the live actor: megatron-core's inference engine over the actor's current weights (no export, no
copy), n samples per prompt, with the engine's per-token log-probs; rewards from the shared answer checker."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evolm_nemo.answers import judge
from evolm_nemo.fileio import drop_rows_after
from evolm_nemo.tasks import STOP, cut_at_stop


@dataclass
class Rollout:
    """One rank's rollout batch: sequence ``k`` is sample ``k % n`` of prompt ``k // n`` (groups are contiguous)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated ids, EOS appended when the response ended with it
    engine_logp: list[list[float]]  # the engine's log p per response id (nan for the appended EOS)
    texts: list[str]
    truncated: list[bool]  # hit max_response_tokens (or the context) without EOS / stop string
    gold: list[str]
    rewards: list[float] = field(default_factory=list)  # what the update optimises (rl.reward)
    correct: list[float] = field(default_factory=list)  # the verifiable reward: 1.0 when the answer checker agrees
    rm_scores: list[float] | None = None  # the reward model's scores (rl.reward=rm|sum)
    prompts: list[str] = field(default_factory=list)  # each sequence's prompt text
    rows: list[dict] = field(default_factory=list)  # each sequence's prompt row (its JSONL fields)
    fn_scores: list[float] | None = None  # the user reward function's scores (rl.reward=custom|sum with rl.reward_fn)
    fn_results: list[dict] | None = None  # its score and metrics per sequence (or the timeout / error), as logged

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def response_lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.response_ids])


def generate(generator, prompts: list[str], gold: list[str], n: int, rl, eos_id: int, seed: int,
             first_request: int | None = None) -> Rollout:
    """``n`` samples of every prompt (temperature/top_p from ``rl``), each prompt's samples adjacent.
    ``first_request`` (an engine that takes it: the continuous one): the first sequence's sampling key."""
    rep_prompts = [p for p in prompts for _ in range(n)]
    where = {} if first_request is None else {"first_request": first_request}
    completions = generator.complete(rep_prompts, rl.max_response_tokens, temperature=rl.temperature,
                                     top_p=rl.top_p, seed=seed, stop_strings=tuple(rl.stop_strings),
                                     return_log_probs=True, **where)
    out = Rollout([], [], [], [], [], [g for g in gold for _ in range(n)])
    for prompt, c in zip(rep_prompts, completions):
        ids, lps = list(c.ids), list(c.log_probs or [math.nan] * len(c.ids))
        if c.finish == "eos":
            ids.append(eos_id)
            lps.append(math.nan)  # the engines report no log p for the token that ended generation
        out.prompt_ids.append(generator.encode(prompt))
        out.response_ids.append(ids)
        out.engine_logp.append(lps)
        out.texts.append(c.text)
        out.truncated.append(c.finish == "length")
    return out


def judged_text(text: str, cut: bool) -> str:
    """What the checker reads of a response: with ``cut``, the text before the evaluation's stop strings (``Human``,
    ``Assistant``: what evaluation keeps of a sample), so a made-up next turn's answer is not the one judged."""
    return cut_at_stop(text, STOP) if cut else text


def verifiable_rewards(rollout: Rollout, suite: str, mode: str, cut: bool = True) -> list[float]:
    """1.0 when the response's final answer is equivalent to the gold answer under the evaluation's checker (on the
    text evaluation would keep, with ``cut``)."""
    return [1.0 if judge(suite, judged_text(text, cut), gold, mode) else 0.0
            for text, gold in zip(rollout.texts, rollout.gold)]


class RolloutLog:
    """``rollouts.jsonl``: one row per response (iteration, the prompt's id, prompt/response ids, the engine's
    log-probs, text, reward; with a reward function its score and metrics), written by tensor-parallel rank 0 of
    every data-parallel replica (``rollouts.dp<r>.jsonl`` beyond dp rank 0); rows past the resumed iteration are
    dropped first."""

    def __init__(self, path: Path, start: int, dp_rank: int):
        from megatron.core import parallel_state

        self.enabled = parallel_state.get_tensor_model_parallel_rank() == 0
        self.path = path if dp_rank == 0 else path.with_name(f"rollouts.dp{dp_rank}.jsonl")
        if self.enabled:
            drop_rows_after(self.path, start)

    def write(self, iteration: int, ro: Rollout) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for k in range(len(ro)):
                f.write(json.dumps({"iteration": iteration, **({"id": ro.rows[k].get("id")} if ro.rows else {}),
                                    "prompt_ids": ro.prompt_ids[k],
                                    "response_ids": ro.response_ids[k],
                                    "engine_logp": [None if math.isnan(x) else x for x in ro.engine_logp[k]],
                                    "text": ro.texts[k], "gold_answer": ro.gold[k], "reward": ro.rewards[k],
                                    "correct": ro.correct[k],
                                    **({"rm_score": ro.rm_scores[k]} if ro.rm_scores is not None else {}),
                                    **({"reward_fn": ro.fn_results[k]} if ro.fn_results is not None else {}),
                                    "truncated": ro.truncated[k]}) + "\n")
