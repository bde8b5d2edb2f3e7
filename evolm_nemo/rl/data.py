"""The RL prompt set: JSONL rows ``{"id", "prompt", "gold_answer"}`` (prompt already templated), as `evolm
prepare-sft allocation=... rl_output=...` writes them, and its per-iteration order (a pure function of the iteration,
so a resumed run rolls out the same prompts)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.data.sft_synthetic import ensure_synthetic_sft
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.evaluation.tasks import check_unique
from evolm_nemo.fileio import iter_jsonl

FIELDS = ("id", "prompt", "gold_answer")


@dataclass
class RLPrompts:
    ids: list[str]
    prompts: list[str]
    gold: list[str]
    rows: list[dict] = field(default_factory=list)  # each prompt's whole JSONL row (a reward function reads it)
    # how many prompts leave less than rl.max_response_tokens of model.seq_length for their response (fit_prompts)
    short_budget: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, keep: list[int]) -> "RLPrompts":
        return RLPrompts([self.ids[i] for i in keep], [self.prompts[i] for i in keep], [self.gold[i] for i in keep],
                         [self.rows[i] for i in keep] if self.rows else [])


def read_prompts(paths: list[str], key: str = "data.paths") -> RLPrompts:
    """The prompt rows of ``paths`` (one set: an id, and a prompt, appears once across all of them -- a problem twice
    would be rolled out and trained on twice as often, and named twice in the rollout logs; the same prompt under two
    ids may also carry two gold answers, rewarding one response both ways); each bad row, repeated id or repeated
    prompt is one line naming its file and line."""
    ids, prompts, gold, rows, seen, seen_prompts = [], [], [], [], {}, {}
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(key, f"no RL prompt file {path} (JSONL rows {{id, prompt, gold_answer}}; `evolm "
                                   "prepare-sft allocation=... rl_output=...` writes one)")
        for where, row in iter_jsonl(path, key):
            for f in FIELDS:
                if not isinstance(row.get(f), str) or not row[f]:
                    raise ConfigError(where, f"field {f!r} must be a non-empty string (rows: {{id, prompt, "
                                             "gold_answer}})")
            check_unique(row, where, seen, f"the RL prompt set ({key})")
            first = seen_prompts.setdefault(row["prompt"], where)
            if first is not where:
                raise ConfigError(where, f"field 'prompt': the prompt of {first} again (id {json.dumps(row['id'])}); "
                                         f"each problem is one row of the RL prompt set ({key})")
            ids.append(row["id"])
            prompts.append(row["prompt"])
            gold.append(row["gold_answer"])
            rows.append(row)
    if not prompts:
        raise ConfigError(key, f"{', '.join(paths)}: no prompts")
    return RLPrompts(ids, prompts, gold, rows)


def prompt_files(cfg: RootConfig) -> list[str]:
    """``data.paths`` (indexed) or the demo's generated RL set (synthetic, disjoint from its SFT and eval sets)."""
    if cfg.data.source == "synthetic":
        return [str(ensure_synthetic_sft(cfg).rl_path)]
    if not cfg.data.paths:
        raise ConfigError("data.paths", f"stage={cfg.stage} needs RL prompt files: data.paths=[rl.jsonl]")
    return list(cfg.data.paths)


class PromptSchedule:
    """Global prompt index ``g = iteration * P + j`` -> epoch ``g // N``, position ``g % N`` of that epoch's seeded
    permutation; data-parallel rank ``r`` takes the ``r``-th contiguous slice of the ``P`` prompts."""

    def __init__(self, n: int, per_step: int, seed: int, dp_rank: int, dp: int):
        self.n, self.per_step, self.seed, self.dp_rank, self.dp = n, per_step, seed, dp_rank, dp
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n),
                           **{e: p for e, p in self._perms.items() if e == epoch - 1}}
        return self._perms[epoch]

    def indices(self, iteration: int) -> list[int]:
        per_rank = self.per_step // self.dp
        start = iteration * self.per_step + self.dp_rank * per_rank
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(start, start + per_rank)]


def usable_prompts(cfg: RootConfig):
    """The RL prompts whose encoded length fits ``rl.max_prompt_tokens`` (and leaves room for a response), and how
    many were skipped."""
    return fit_prompts(cfg, read_prompts(prompt_files(cfg)))


def fit_prompts(cfg: RootConfig, prompts):
    """The prompts of ``prompts`` whose encoded length fits ``rl.max_prompt_tokens`` (and leaves room for a
    response), and how many did not. A prompt longer than ``model.seq_length - rl.max_response_tokens`` is kept
    with the response budget the context leaves (counted in ``short_budget``)."""
    from evolm_nemo.checkpoint import io as ckpt

    ref = ckpt.parent_tokenizer(cfg.train.init_from) or cfg.data.tokenizer
    tok = load_tokenizer(ref, key="train.init_from")
    limit = min(cfg.rl.max_prompt_tokens, cfg.model.seq_length - 1)
    lengths = [len(x) for x in tok(prompts.prompts)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    fitted = prompts.subset(keep)
    fitted.short_budget = sum(lengths[i] + cfg.rl.max_response_tokens > cfg.model.seq_length for i in keep)
    return fitted, len(prompts) - len(keep)
