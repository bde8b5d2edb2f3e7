"""Outcome-reward-model scores for RM@16: any HF ``AutoModelForSequenceClassification`` with one output.

EvoLM scores each (problem, completion) pair with Skywork-Reward-Llama-3.1-8B-v0.2 through its chat template
(user = problem, assistant = completion). A tokenizer without a chat template (e.g. our own RM export) gets the
training template instead: ``Human: {problem}\\nAssistant:`` encoded with the tokenizer's special tokens, then the
completion's tokens (no special tokens), exactly as it was sampled and as `evolm prepare-rm` trains our own RMs.
:func:`add_scores` adds ``rm_scores`` (one float per completion) to a completions JSONL, rewriting it atomically.
"""

from __future__ import annotations

import math

import sys
from itertools import chain
from pathlib import Path
from typing import Sequence

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.fileio import read_jsonl, write_jsonl
from evolm_nemo.tasks import QUESTION_TEMPLATE


class RewardModel:
    """Batched scalar rewards; sequences are sorted by length and right-padded."""

    def __init__(self, model_dir: str, batch_size: int = 8, device: str | None = None, max_length: int = 4096,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        labels = self.model.config.num_labels
        if labels != 1:
            raise ConfigError("rm", f"{model_dir} has {labels} outputs; a reward model has exactly one (num_labels=1)")
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat = bool(getattr(self.tok, "chat_template", None))
        from evolm_nemo.data.sft import Template

        self.template = Template(QUESTION_TEMPLATE)  # the sampling prompt, as prepare-rm

    def encode(self, problem: str, response: str) -> list[int]:
        """Token ids of one (problem, response) pair; over-long pairs keep their last ``max_length`` tokens."""
        if self.chat:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": problem}, {"role": "assistant", "content": response}], tokenize=False)
            ids = self.tok(text, add_special_tokens=False).input_ids  # the template writes its own BOS
        else:  # as the completion was sampled and as `evolm prepare-rm` trains our RMs: the prompt encoded with
            # the tokenizer's special tokens, the response after it without (evolm_nemo.data.rm.encode)
            from evolm_nemo.data.rm import encode

            prompt_ids, response_ids = encode(self.tok, self.template, problem, response)
            ids = prompt_ids + response_ids
        return ids[-self.max_length:]

    def score(self, pairs: Sequence[tuple[str, str]], desc: str = "rm scoring") -> list[float]:
        import torch
        from tqdm import tqdm

        ids = [self.encode(p, r) for p, r in pairs]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [0.0] * len(ids)
        text_cfg = self.model.config.get_text_config()
        with tqdm(total=len(ids), desc=desc, unit="pair", file=sys.stderr, dynamic_ncols=True) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                # The head reads the rightmost token that is not the pad id: pad with an id no sequence ends with.
                last = {ids[i][-1] for i in chunk}
                cands = chain((self.tok.pad_token_id, self.tok.eos_token_id), range(len(self.tok)))
                pad = next(t for t in cands if t is not None and t not in last)
                text_cfg.pad_token_id = pad
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                    mask[row, :len(ids[i])] = 1
                with torch.inference_mode():
                    logits = self.model(input_ids=input_ids.to(self.device),
                                        attention_mask=mask.to(self.device)).logits
                for row, i in enumerate(chunk):
                    scores[i] = float(logits[row, 0].float())
                bar.update(len(chunk))
        return scores

    def close(self) -> None:
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_rows(rows: list[dict], path: str) -> None:
    """Each row needs a string ``problem`` and a list of string ``completions`` (one-line error otherwise)."""
    for line, row in enumerate(rows, 1):
        if not isinstance(row.get("problem"), str):
            raise ConfigError(f"{path}:{line}", "field 'problem' must be a string")
        comps = row.get("completions")
        if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
            raise ConfigError(f"{path}:{line}", "field 'completions' must be a list of strings")


def add_scores(path: str, rm_dir: str, out: str | None = None, batch_size: int = 8, max_length: int = 4096,
               trust_remote_code: bool = False) -> list[dict]:
    """Read a completions JSONL, add ``rm_scores`` to every row, write it (default: in place, atomically)."""
    if not (Path(rm_dir) / "config.json").is_file():
        raise ConfigError("rm", f"{rm_dir} is not an HF model directory (no config.json)")
    rows = read_jsonl(path)
    check_rows(rows, path)
    model = RewardModel(rm_dir, batch_size=batch_size, max_length=max_length, trust_remote_code=trust_remote_code)
    pairs = [(row["problem"], c) for row in rows for c in row["completions"]]
    flat = model.score(pairs)
    model.close()
    k = 0
    for row in rows:
        row["rm_scores"] = flat[k:k + len(row["completions"])]
        for i, score in enumerate(row["rm_scores"]):
            if not math.isfinite(float(score)):  # scoring refuses it; say so now, with the file as it was
                raise ConfigError("rm", f"{rm_dir} scored completion {i} of problem {row.get('id')!r} as {score}, "
                                        f"not a finite number (a diverged reward model?); {out or path} is unchanged")
        k += len(row["completions"])
    write_jsonl(out or path, rows)
    return rows
