"""Reward-model / preference data: `evolm prepare-rm` and the on-disk dataset the RM and DPO stages read.

A dataset is an SFT-format directory (``evolm_nemo.data.sft``: tokens.bin, index.npy, manifest.json written last)
with format ``evolm-rm-1`` and three more arrays:

    labels.npy   float32 [sequences]: 1 = correct / chosen, 0 = incorrect / rejected
    groups.npy   int64 [sequences]: the problem (prompt) each sequence answers; validation splits by problem
    pairs.npy    int64 [pairs, 2]: (chosen, rejected) sequence indices (kind=pairs; empty for kind=outcome)

A sequence is ``prompt_ids + response_ids``: the prompt encoded exactly as evaluation and SFT encode it (the
tokenizer's special tokens, e.g. ``<s>``), the response encoded after it without special tokens and without EOS
(a sampled completion as `evolm score` holds it). The RM's score is read at the last response token, as HF
``LlamaForSequenceClassification`` reads it at the last non-padding token.

Inputs (JSONL, one object per line; the kind of row is recognised per line):

- scored completions (`evolm score` output): ``{"problem", "completions": [..], "correct": [..]}``;
- preference pairs: ``{"prompt", "chosen", "rejected"}``;
- labelled responses: ``{"prompt", "response", "label"}`` (label 0/1 or true/false).

``kind=outcome`` makes one example per distinct (problem, response), balanced between the classes by default
(the larger class is subsampled, seeded); ``kind=pairs`` makes up to ``max_pairs_per_problem`` (correct, incorrect)
pairs per problem, deduplicated. Prompts go through ``prompt_template`` (``{question}``); pass
``prompt_template="{question}"`` for prompts that are already templated.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from evolm_nemo.config.compose import compose
from evolm_nemo.config.errors import ConfigError, check_seed
from evolm_nemo.data.sft import SFTDataset, SFTWriter, Template, tokenizer_fingerprint
from evolm_nemo.data.sft_prepare import _tokenizer_ref
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.fileio import check_dst, check_writable, iter_jsonl
from evolm_nemo.tasks import QUESTION_TEMPLATE

FORMAT = "evolm-rm-1"
KINDS = ("outcome", "pairs")


@dataclass
class PrepareRMConfig:
    input: Optional[str] = None  # JSONL: `evolm score` output, {prompt, chosen, rejected} or {prompt, response, label}
    output: Optional[str] = None  # the RM dataset directory to create (refused if it exists, unless overwrite=true)
    tokenizer: Optional[str] = None  # the model's HF tokenizer dir or hub name (training refuses another)
    kind: str = "outcome"  # outcome: labelled responses (BCE) | pairs: (correct, incorrect) pairs (Bradley-Terry, DPO)
    prompt_template: str = QUESTION_TEMPLATE  # EvoLM's; = the prompt the completions were sampled after
    balance: bool = True  # outcome: as many incorrect as correct examples (the larger class subsampled, seeded)
    max_pairs_per_problem: int = 4  # pairs: at most this many (correct, incorrect) pairs of one problem
    cutoff: int = 2048  # sequences longer than this many tokens are dropped (a pair with either side)
    seed: int = 1234  # balancing and pair sampling
    limit: Optional[int] = None  # read only the first N rows
    overwrite: bool = False  # replace an existing output directory
    progress: bool = True  # progress bars on stderr
    trust_remote_code: bool = False  # for the tokenizer


@dataclass
class Problem:
    prompt: str
    responses: "OrderedDict[str, float]"  # response -> label (kept once; a pair row's labels are by position)
    pairs: list  # explicit (chosen, rejected) pairs from {prompt, chosen, rejected} rows


class RMDataset(SFTDataset):
    """A prepared RM dataset, memory-mapped: sequences (``ids(i)``, ``prompt_len``, ``length``) plus labels,
    problem groups and pairs."""

    FORMAT, MAKER = FORMAT, "evolm prepare-rm"
    ARRAYS = ("labels", "groups", "pairs")  # prepare_rm's commit order (the content hash)

    def __init__(self, path: str | Path, key: str = "data.paths", vocab_size: int | None = None,
                 cache_dir: str | None = None):
        super().__init__(path, key)
        try:
            self.labels = np.load(self.path / "labels.npy", allow_pickle=False)
            self.groups = np.load(self.path / "groups.npy", allow_pickle=False)
            self.pairs = np.load(self.path / "pairs.npy", allow_pickle=False).reshape(-1, 2)
        except (OSError, ValueError) as exc:
            raise ConfigError(key, f"{self.path} is incomplete ({exc}); prepare it again") from None
        if self.labels.ndim != 1 or self.groups.ndim != 1 or len(self.labels) != len(self) \
                or len(self.groups) != len(self):
            raise ConfigError(key, f"{self.path}: labels/groups do not match its {len(self)} sequences")
        if self.pairs.size and (self.pairs.dtype.kind not in "iu" or self.pairs.min() < 0
                                or self.pairs.max() >= len(self)):
            raise ConfigError(key, f"{self.path / 'pairs.npy'}: not pairs of sequence numbers below {len(self)} "
                                   "(altered); prepare it again")
        self.kind = self.manifest.get("kind")
        if vocab_size is not None:
            self.check(vocab_size, cache_dir)


def _label(value, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    raise ConfigError(where, f"label must be 0/1 or true/false, got {value!r}")


def _text(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise ConfigError(where, f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _short(text: str, width: int = 40) -> str:
    return json.dumps(text if len(text) <= width else text[:width] + "...", ensure_ascii=False)


def read_problems(path: str, limit: Optional[int] = None) -> tuple[list[Problem], dict]:
    """Group the input's rows by prompt (in first-seen order). Counts: rows, responses, duplicates.

    A response of a prompt repeated with the same verdict is a duplicate (kept once); with the other verdict (a
    scored or labelled row saying correct where an earlier one said incorrect), or a preference pair given both ways,
    is a one-line error naming both lines: either kept silently, the first verdict won and the RM learned half the
    labels the data meant (a reversed pair cancels its pair's gradient and marks the chosen response incorrect)."""
    problems: "OrderedDict[str, Problem]" = OrderedDict()
    counts = {"rows": 0, "responses": 0, "duplicates": 0}
    # per prompt, while reading: response -> the line of its first scored / labelled verdict, negated when that said
    # incorrect (the labels a pair row puts in ``responses`` are relative, no verdict: a response chosen in one pair
    # may be rejected in another); (chosen, rejected) -> the line of its first row
    verdicts: dict[str, dict[str, int]] = {}
    pair_lines: dict[str, dict[tuple[str, str], int]] = {}
    for where, row in iter_jsonl(path, "input"):
        if limit is not None and counts["rows"] >= limit:
            break
        counts["rows"] += 1
        if "completions" in row or "correct" in row:  # `evolm score` output
            prompt = _text(row, "problem", where)
            comps, correct = row.get("completions"), row.get("correct")
            if not isinstance(comps, list) or not isinstance(correct, list) or len(comps) != len(correct):
                raise ConfigError(where, "a scored row needs lists 'completions' and 'correct' of one length "
                                         "(run `evolm score` on the completions first)")
            items = []
            for k, (c, y) in enumerate(zip(comps, correct)):
                if not isinstance(c, str):
                    raise ConfigError(where, f"completions[{k}] must be a string")
                items.append((c, _label(y, where)))
            pair = None
        elif "chosen" in row or "rejected" in row:
            prompt = _text(row, "prompt", where)
            chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
            if chosen == rejected:
                raise ConfigError(where, "chosen and rejected are the same text")
            items, pair = [(chosen, 1.0), (rejected, 0.0)], (chosen, rejected)
        elif "response" in row:
            prompt = _text(row, "prompt", where)
            items, pair = [(_text(row, "response", where), _label(row.get("label"), where))], None
        else:
            raise ConfigError(where, "unrecognised row: expected `evolm score` output {problem, completions, correct},"
                                     " {prompt, chosen, rejected} or {prompt, response, label}")
        line = int(where.rsplit(":", 1)[1])  # where: f"{path}:{line}"
        if pair is None:
            seen = verdicts.setdefault(prompt, {})
            for text, label in items:
                first = seen.setdefault(text, line if label else -line)
                if (first > 0) != bool(label):
                    now, then = ("correct", "incorrect") if label else ("incorrect", "correct")
                    raise ConfigError(where, f"response {_short(text)} is labelled {now} here and {then} at "
                                             f"{path}:{abs(first)} for the same prompt; give each response one "
                                             "verdict (drop or fix a row)")
        else:
            given = pair_lines.setdefault(prompt, {})
            first = given.get((pair[1], pair[0]))
            if first is not None:
                raise ConfigError(where, f"chosen and rejected are the pair at {path}:{first} reversed (the same "
                                         "prompt and responses, preferred both ways); keep one of the two rows")
        p = problems.setdefault(prompt, Problem(prompt, OrderedDict(), []))
        for text, label in items:
            counts["responses"] += 1
            if text in p.responses:
                counts["duplicates"] += 1
                continue
            p.responses[text] = label
        if pair is not None and pair not in given:
            given[pair] = line
            p.pairs.append(pair)
    return list(problems.values()), counts


def _check(cfg: PrepareRMConfig) -> Template:
    check_seed("seed", cfg.seed)
    for key, hint in (("input", "a JSONL of scored completions or preference rows"),
                      ("output", "the RM dataset directory to create"),
                      ("tokenizer", "the model's HF tokenizer dir or hub name")):
        if not getattr(cfg, key):
            raise ConfigError(key, f"must be set: {hint}")
    if cfg.kind not in KINDS:
        raise ConfigError("kind", f"must be one of {', '.join(KINDS)}; got {cfg.kind!r}")
    if cfg.max_pairs_per_problem < 1:
        raise ConfigError("max_pairs_per_problem", f"must be >= 1, got {cfg.max_pairs_per_problem}")
    if cfg.cutoff < 2:
        raise ConfigError("cutoff", f"must be at least 2 tokens, got {cfg.cutoff}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError("limit", f"must be a positive number of rows or null, got {cfg.limit}")
    template = Template(cfg.prompt_template, "{answer}")
    template.check("prompt_template")
    local = tuple(p for p in (Path(cfg.input).expanduser(), Path(str(cfg.tokenizer)).expanduser()) if p.exists())
    check_dst(Path(cfg.output).expanduser().resolve(), cfg.overwrite, key="output", sources=local,
              kind="rm-dataset")
    check_writable(cfg.output, "output", directory=True)  # probed for real: read-only mounts, root too
    return template


def encode(tok, template: Template, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of one RM sequence (no EOS: the score is read at the response's last token)."""
    p = tok(template.render_prompt(prompt), add_special_tokens=True, split_special_tokens=True)["input_ids"]
    r = tok(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return list(p), list(r)


def prepare_rm(cfg: PrepareRMConfig, tokenizer=None) -> dict:
    """Read, group, balance or pair, tokenize and write; returns the manifest."""
    from tqdm import tqdm

    template = _check(cfg)
    problems, counts = read_problems(cfg.input, cfg.limit)
    if not problems:
        raise ConfigError("input", f"{cfg.input} has no rows")
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, cfg.trust_remote_code, key="tokenizer")
    rng = np.random.default_rng(cfg.seed)
    counts.update(problems=len(problems), dropped=0, subsampled=0, no_pair=0)

    # (problem index, response, label) for outcome; (problem, chosen, rejected) for pairs
    examples: list[tuple[int, str, float]] = []
    pairs: list[tuple[int, str, str]] = []
    if cfg.kind == "outcome":
        for g, p in enumerate(problems):
            examples += [(g, text, label) for text, label in p.responses.items()]
        if cfg.balance:
            pos = [i for i, e in enumerate(examples) if e[2] == 1.0]
            neg = [i for i, e in enumerate(examples) if e[2] == 0.0]
            if not pos or not neg:
                raise ConfigError("input", f"{cfg.input}: every response is {'correct' if pos else 'incorrect'}; an "
                                           "outcome RM needs both (or balance=false)")
            small, large = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
            keep = set(small) | set(rng.choice(large, size=len(small), replace=False).tolist())
            counts["subsampled"] = len(examples) - len(keep)
            examples = [e for i, e in enumerate(examples) if i in keep]
    else:
        for g, p in enumerate(problems):
            chosen = [t for t, y in p.responses.items() if y == 1.0]
            rejected = [t for t, y in p.responses.items() if y == 0.0]
            candidates = list(p.pairs) or [(c, r) for c in chosen for r in rejected]
            if not candidates:
                counts["no_pair"] += 1
                continue
            if len(candidates) > cfg.max_pairs_per_problem:
                pick = rng.choice(len(candidates), size=cfg.max_pairs_per_problem, replace=False)
                counts["subsampled"] += len(candidates) - cfg.max_pairs_per_problem
                candidates = [candidates[i] for i in sorted(pick.tolist())]
            pairs += [(g, c, r) for c, r in candidates]
        if not pairs:
            raise ConfigError("input", f"{cfg.input}: no problem has both a correct and an incorrect response")

    writer = SFTWriter(cfg.output, len(tok), fmt=FORMAT)
    labels, groups, pair_index = [], [], []
    cache: dict[tuple[int, str], int] = {}  # a response used by several pairs is stored once

    def add(g: int, text: str, label: float) -> Optional[int]:
        if (g, text) in cache:
            return cache[(g, text)]
        prompt_ids, response_ids = encode(tok, template, problems[g].prompt, text)
        if len(prompt_ids) + len(response_ids) > cfg.cutoff or not response_ids:
            return None
        writer.add(prompt_ids, response_ids)
        labels.append(label)
        groups.append(g)
        cache[(g, text)] = len(labels) - 1
        return cache[(g, text)]

    try:
        bar_items = examples if cfg.kind == "outcome" else pairs
        for item in tqdm(bar_items, unit="ex", desc="tokenize", disable=not cfg.progress, file=sys.stderr,
                         dynamic_ncols=True):
            if cfg.kind == "outcome":
                if add(*item) is None:
                    counts["dropped"] += 1
            else:
                g, c, r = item
                i, j = add(g, c, 1.0), add(g, r, 0.0)
                if i is None or j is None:
                    counts["dropped"] += 1
                else:
                    pair_index.append((i, j))
        if not labels or (cfg.kind == "pairs" and not pair_index):
            raise ConfigError("cutoff", f"every sequence is longer than cutoff={cfg.cutoff} tokens (or empty)")
        y = np.asarray(labels, dtype=np.float32)
        manifest = {"kind": cfg.kind, "source": str(cfg.input),
                    "tokenizer": {"ref": _tokenizer_ref(cfg.tokenizer, tok), **tokenizer_fingerprint(tok)},
                    "template": {"prompt": template.prompt},
                    "steps": {"balance": cfg.balance, "max_pairs_per_problem": cfg.max_pairs_per_problem,
                              "cutoff": cfg.cutoff, "seed": cfg.seed},
                    "counts": {**counts, "sequences": len(y), "positive": int(y.sum()),
                               "negative": int(len(y) - y.sum()), "pairs": len(pair_index),
                               "problems_used": len(set(groups))},
                    "input_sha256": hashlib.sha256(Path(cfg.input).read_bytes()).hexdigest()}
        writer.commit(manifest, {"labels": y, "groups": np.asarray(groups, dtype=np.int64),
                                 "pairs": np.asarray(pair_index, dtype=np.int64).reshape(-1, 2)},
                      replace=cfg.overwrite)  # the old dataset stays until the new one is whole
    except BaseException:
        writer.abort()
        raise
    return RMDataset(cfg.output, "output").manifest


def summary(manifest: dict) -> str:
    c = manifest["counts"]
    line = (f"{manifest['kind']}: {c['rows']:,} rows, {c['problems']:,} problems, {c['responses']:,} responses "
            f"({c['duplicates']:,} duplicates) | subsampled {c['subsampled']:,} | dropped {c['dropped']:,}")
    if manifest["kind"] == "pairs":
        line += f" | no pair {c['no_pair']:,} -> {c['pairs']:,} pairs over {c['sequences']:,} sequences"
    else:
        line += f" -> {c['sequences']:,} examples ({c['positive']:,} correct, {c['negative']:,} incorrect)"
    return line + f", {manifest['tokens']:,} tokens"


def main(overrides) -> int:
    """`evolm prepare-rm input=<scored.jsonl> output=<dir> tokenizer=<tok> kind=outcome|pairs`."""
    cfg = compose("prepare_rm", overrides, PrepareRMConfig)
    manifest = prepare_rm(cfg)
    print(f"prepared RM dataset {cfg.output}: {summary(manifest)}")
    print(json.dumps({"output": cfg.output, **manifest["counts"]}))
    return 0
