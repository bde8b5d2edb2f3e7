"""`evolm prepare-sft`: JSONL / Parquet / an HF dataset -> a tokenized SFT dataset (``evolm_nemo.data.sft``), and
optionally the disjoint RL set.

Steps, in order, each counted in the printed summary and the manifest:

1. **read** rows; a row without a question or response (missing, not a string, empty) is skipped (``missing``);
2. **normalise** text: Unicode NFC, ``\\r\\n`` -> ``\\n``, outer whitespace stripped (``normalised`` counts changed rows);
3. **consistency filter** (``filter=true``): keep a response only if its final answer (last ``\\boxed{}``, else
   "answer is ...") is equivalent to the reference answer under the evaluation's checker -- the same code as
   ``evolm score`` (``evolm_nemo.answers.judge``), ``scoring=strict`` by default (``filtered``);
   ``agree_k=k``: a question with several responses is kept only if at least k of them pass (``disagreement``);
   without a reference answer, responses are compared with each other and the largest agreeing group is kept;
4. **dedup** by normalised question (lower case, whitespace collapsed): the first kept response wins (``duplicates``);
5. **split** (``allocation=30K/70K`` or a preset, see ``ALLOCATIONS``): SFT and RL questions drawn from the pool by a
   seeded permutation, never overlapping; the RL side is written to ``rl_output`` as JSONL
   ``{"id", "prompt", "gold_answer"}`` (prompt already templated) -- what the RL stage reads;
6. **cutoff**: examples longer than ``cutoff`` tokens are truncated (answer kept as far as it fits) or dropped
   (``overlength=drop``); one whose prompt alone fills the cutoff is always dropped (``truncated``, ``dropped``).

Nothing is written until the input has been read and checked; the dataset directory and the RL file appear
atomically, and an existing output is never replaced unless ``overwrite=true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from evolm_nemo.answers import MODES, extract_answer, is_equiv, judge, last_boxed, unbox
from evolm_nemo.config.compose import compose
from evolm_nemo.config.errors import ConfigError, check_seed
from evolm_nemo.data.prepare import ignore_interrupts, open_rows, worker_pool
from evolm_nemo.data.sft import SFTWriter, Template, encode_example, read_manifest, tokenizer_fingerprint
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.fileio import (atomic_path, check_dst, check_dst_file, check_writable, jsonl_with, release_output,
                               signals_held)
from evolm_nemo.tasks import QUESTION_TEMPLATE, SUITES

# EvoLM's SFT/RL allocation study: 100K questions split between SFT and RL (PAPER.md).
ALLOCATIONS = {"10K/90K": (10_000, 90_000), "30K/70K": (30_000, 70_000), "50K/50K": (50_000, 50_000),
               "70K/30K": (70_000, 30_000), "90K/10K": (90_000, 10_000)}
OVERLENGTH = ("truncate", "drop")


@dataclass
class PrepareSFTConfig:
    input: Optional[str] = None  # .jsonl/.json/.jsonl.gz/.parquet file, or an HF dataset name / local dataset dir
    output: Optional[str] = None  # the SFT dataset directory to create
    tokenizer: Optional[str] = None  # HF tokenizer dir or hub name: the model's (training refuses another)
    question_key: str = "question"  # field with the question
    answer_key: str = "answer"  # field with the response the model learns
    reference_key: Optional[str] = None  # field with the reference final answer (filtering, RL gold answers)
    id_key: Optional[str] = None  # field with a row id (RL rows); None: <input name>-<row number>
    prompt_template: str = QUESTION_TEMPLATE  # EvoLM's; must equal the evaluation prompt
    answer_template: str = "{answer}"  # the assistant turn; EOS is appended
    filter: bool = True  # consistency filter: keep responses whose final answer matches the reference
    scoring: str = "strict"  # strict | evolm: the checker's mode (as `evolm score scoring=`)
    suite: str = "math"  # the checker's equivalence rule (math suites: gsm8k_platinum, math)
    agree_k: Optional[int] = None  # keep a question only if >= k of its responses pass (None: off)
    dedup: bool = True  # drop repeated questions (normalised), first kept response wins
    cutoff: int = 2048  # max tokens per example (prompt + answer + EOS), as EvoLM's cutoff_len
    overlength: str = "truncate"  # truncate | drop
    allocation: Optional[str] = None  # SFT/RL split: "30K/70K", "3000/7000" (K/M suffixes); "100K/0": a seeded
    # 100K subset (EvoLM's sample-count sweep); None: everything to SFT
    rl_output: Optional[str] = None  # JSONL for the RL side of the split
    seed: int = 42  # split permutation seed
    limit: Optional[int] = None  # read at most this many rows
    workers: Optional[int] = None  # checker processes for the filter (None: all CPU cores); same output for any
    hf_config: Optional[str] = None  # HF dataset config (HF datasets only)
    split: str = "train"  # HF dataset split (HF datasets only)
    overwrite: bool = False  # replace an existing output directory / RL file
    trust_remote_code: bool = False  # run tokenizer code from the hub (only for sources you trust)
    progress: bool = True  # progress bar on stderr


@dataclass
class Counts:
    read: int = 0
    missing: int = 0
    normalised: int = 0
    filtered: int = 0
    disagreement: int = 0
    duplicates: int = 0
    rl: int = 0
    rl_no_reference: int = 0  # allocated to RL but without a reference answer: left out
    not_allocated: int = 0
    truncated: int = 0
    dropped: int = 0
    written: int = 0


@dataclass
class Row:
    id: str
    question: str
    answer: str
    reference: Optional[str]
    key: str = field(default="")  # normalised question


_WS = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    return unicodedata.normalize("NFC", s.replace("\r\n", "\n").replace("\r", "\n")).strip()


def question_key(question: str) -> str:
    """The identity of a question for dedup and the SFT/RL split: NFKC, lower case, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", question)).strip().lower()


def parse_allocation(spec: str) -> tuple[int, int]:
    """"30K/70K" -> (30000, 70000); a preset name or two counts with optional K/M suffixes."""
    if spec.upper() in ALLOCATIONS:
        return ALLOCATIONS[spec.upper()]
    parts = str(spec).replace(" ", "").split("/")

    def count(text: str) -> int:
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kKmM]?)", text)
        if not m:
            raise ValueError(text)
        value = float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
        if value != int(value):
            raise ValueError(text)
        return int(value)

    try:
        if len(parts) != 2:
            raise ValueError(spec)
        sft, rl = count(parts[0]), count(parts[1])
    except ValueError:
        raise ConfigError("allocation", f"expected SFT/RL counts such as 30K/70K or 3000/7000, got {spec!r}") from None
    if sft < 1 or rl < 0:
        raise ConfigError("allocation", f"needs at least one SFT question, got {spec!r}")
    return sft, rl


def _reference(value) -> Optional[str]:
    """A reference answer: the text after '####' or the last \\boxed{} when it is a worked solution, else as is."""
    if value is None:
        return None
    text = str(value).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    if "\\boxed" in text:
        return unbox(last_boxed(text)) or None
    return text or None


def read_rows(rows: Iterable[tuple[str, object]], cfg: PrepareSFTConfig, counts: Counts, name: str) -> Iterator[Row]:
    """Steps 1-2: rows with a question and a response, normalised."""
    for number, (where, row) in enumerate(rows):
        if cfg.limit is not None and number >= cfg.limit:
            break
        counts.read += 1
        if not isinstance(row, dict):
            raise ConfigError("input", f"{where}: expected an object, got {type(row).__name__}")
        if number == 0:
            for key in ("question_key", "answer_key") + (("reference_key",) if cfg.reference_key else ()):
                if getattr(cfg, key) not in row:
                    fields = ", ".join(list(row)[:12]) or "none"
                    raise ConfigError(key, f"no field {getattr(cfg, key)!r} at {where} (fields there: {fields}); "
                                           f"set {key}=")
        question, answer = row.get(cfg.question_key), row.get(cfg.answer_key)
        if not isinstance(question, str) or not isinstance(answer, str) or not question.strip() or not answer.strip():
            counts.missing += 1
            continue
        q, a = normalize_text(question), normalize_text(answer)
        counts.normalised += (q != question) or (a != answer)
        ref = _reference(row.get(cfg.reference_key)) if cfg.reference_key else None
        rid = str(row[cfg.id_key]) if cfg.id_key and row.get(cfg.id_key) is not None else f"{name}-{number:07d}"
        yield Row(rid, q, a, ref, question_key(q))


def _judge(args) -> bool:
    suite, response, reference, mode = args
    return reference is not None and judge(suite, response, reference, mode)


PARALLEL_MIN_ROWS = 2000  # below this, worker start-up costs more than it saves


def judge_rows(rows: list[Row], cfg: PrepareSFTConfig) -> list[bool]:
    """The checker's verdict for every row's response against its reference, in worker processes for large inputs
    (spawned: each starts its own bounded checker; the verdicts are the same for any ``workers``)."""
    from tqdm import tqdm

    jobs = [(cfg.suite, r.answer, r.reference, cfg.scoring) for r in rows]
    workers = (os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    bar = dict(total=len(jobs), unit="row", desc="filter", disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True)
    if workers <= 1 or len(jobs) < PARALLEL_MIN_ROWS:
        return [_judge(j) for j in tqdm(jobs, **bar)]
    with worker_pool("spawn", workers, ignore_interrupts) as pool:
        return list(tqdm(pool.imap(_judge, jobs, chunksize=256), **bar))


def consistency_filter(rows: list[Row], cfg: PrepareSFTConfig, counts: Counts) -> list[Row]:
    """Step 3 with the shared checker. Groups keep the input order."""
    if not cfg.filter:
        return rows
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.key, []).append(r)
    verdict = dict(zip(map(id, rows), judge_rows(rows, cfg))) if cfg.reference_key else {}
    keep: set[int] = set()
    for group in groups.values():
        if cfg.reference_key:
            good = [r for r in group if verdict[id(r)]]
        else:  # no reference: the largest group of mutually equivalent final answers
            answers = [extract_answer(r.answer, cfg.scoring) for r in group]
            best: list[Row] = []
            for i, a in enumerate(answers):
                if a is None:
                    continue
                agree = [group[j] for j, b in enumerate(answers) if b is not None and is_equiv(cfg.suite, a, b,
                                                                                                   cfg.scoring)]
                if len(agree) > len(best):
                    best = agree
            good = best
        if cfg.agree_k is not None and len(good) < cfg.agree_k:
            counts.disagreement += len(good)
            continue
        keep.update(id(r) for r in good)
    out = [r for r in rows if id(r) in keep]
    counts.filtered = len(rows) - len(out) - counts.disagreement
    return out


def _check_rl_ids(rows: list[Row], cfg: PrepareSFTConfig) -> None:
    """One id per RL question: ``id_key`` values the input repeats on different questions would give the RL set (and
    the RL stage refuses such a set) two prompts under one id. Ids made from row numbers are unique already."""
    seen: dict[str, Row] = {}
    for row in rows:
        first = seen.setdefault(row.id, row)
        if first is not row:
            raise ConfigError("id_key", f"{cfg.id_key}={row.id!r} names two questions allocated to RL "
                                        f"({first.question[:40]!r}..., {row.question[:40]!r}...): an RL prompt set "
                                        f"takes one id per question; fix the ids in {cfg.input}, or leave id_key unset "
                                        "(ids from the row numbers)")


def dedup(rows: list[Row], counts: Counts) -> list[Row]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r.key in seen:
            counts.duplicates += 1
            continue
        seen.add(r.key)
        out.append(r)
    return out


def split_pool(keys: list[str], sft: int, rl: int, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the SFT and RL questions among ``keys`` (unique): a seeded permutation, SFT first. Disjoint by
    construction; the same seed and pool give the same split."""
    if len(set(keys)) != len(keys):
        raise ValueError("split_pool needs unique question keys (dedup first)")
    if sft + rl > len(keys):
        raise ConfigError("allocation", f"asks for {sft:,} SFT + {rl:,} RL questions; the pool has {len(keys):,} "
                                        "after filtering and dedup")
    order = np.random.default_rng(seed).permutation(len(keys))
    return sorted(order[:sft].tolist()), sorted(order[sft:sft + rl].tolist())


def _sha(items: Iterable[str]) -> str:
    h = hashlib.sha256()
    for item in sorted(items):
        h.update(item.encode("utf-8") + b"\0")
    return h.hexdigest()


def _check_outputs(cfg: PrepareSFTConfig) -> None:
    """The dataset directory may be created or replaced without touching what this run reads, and replaces only an
    SFT dataset (the one output rule of every command: ``fileio.check_dst``); the RL file likewise is none of the
    inputs and lies outside the dataset. Both are locked against a second prepare-sft writing them at once."""
    out = Path(cfg.output).expanduser().resolve()
    local = tuple(p for p in (Path(str(cfg.input)).expanduser(), Path(str(cfg.tokenizer)).expanduser()) if p.exists())
    check_dst(out, cfg.overwrite, key="output", sources=local, kind="sft-dataset")  # (hub names are not paths)
    try:
        if cfg.rl_output and Path(cfg.rl_output).expanduser().resolve().is_relative_to(out):
            raise ConfigError("rl_output", "must be outside the SFT dataset directory")
        if cfg.rl_output:
            check_dst_file(cfg.rl_output, cfg.overwrite, "rl_output", sources=local,
                           ours=jsonl_with("id", "prompt", "gold_answer"),
                           what="an RL prompt JSONL (made by evolm prepare-sft)")
    except ConfigError:
        release_output(out)
        raise


def check_config(cfg: PrepareSFTConfig) -> Template:
    check_seed("seed", cfg.seed)
    for key, hint in (("input", "a .jsonl/.parquet file or an HF dataset name"),
                      ("output", "the SFT dataset directory to create"),
                      ("tokenizer", "the model's HF tokenizer dir or hub name")):
        if not getattr(cfg, key):
            raise ConfigError(key, f"must be set: {hint}")
    if cfg.scoring not in MODES:
        raise ConfigError("scoring", f"must be one of {', '.join(MODES)}; got {cfg.scoring!r}")
    if cfg.suite not in SUITES:
        raise ConfigError("suite", f"must be one of {', '.join(SUITES)}; got {cfg.suite!r}")
    if cfg.overlength not in OVERLENGTH:
        raise ConfigError("overlength", f"must be one of {', '.join(OVERLENGTH)}; got {cfg.overlength!r}")
    if cfg.cutoff < 2:
        raise ConfigError("cutoff", f"must be at least 2 tokens, got {cfg.cutoff}")
    if cfg.agree_k is not None and cfg.agree_k < 1:
        raise ConfigError("agree_k", f"must be >= 1 or null, got {cfg.agree_k}")
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError("workers", f"must be at least 1 or null, got {cfg.workers}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError("limit", f"must be a positive number of rows or null, got {cfg.limit}")
    if cfg.filter and cfg.agree_k is None and not cfg.reference_key:
        raise ConfigError("reference_key", "the consistency filter needs the reference answer's field "
                                           "(or agree_k=k to compare responses with each other, or filter=false)")
    n_rl = parse_allocation(cfg.allocation)[1] if cfg.allocation else 0
    if cfg.allocation and not cfg.dedup:  # before the rows are read and filtered (minutes of checker work)
        raise ConfigError("dedup", "the SFT/RL split needs dedup=true (a question must land on one side)")
    if n_rl and not cfg.rl_output:
        raise ConfigError("rl_output", f"allocation={cfg.allocation} puts {n_rl:,} questions on the RL side: name "
                                       "the JSONL they go to (rl_output=...)")
    if cfg.rl_output and not n_rl:
        raise ConfigError("allocation", "rl_output needs an allocation with RL questions, e.g. allocation=30K/70K")
    if n_rl and not cfg.reference_key:
        raise ConfigError("reference_key", "the RL split needs each question's reference answer (its gold_answer)")
    template = Template(cfg.prompt_template, cfg.answer_template)
    template.check()
    _check_outputs(cfg)
    check_writable(cfg.output, "output", directory=True)  # probed for real: read-only mounts, root too
    if cfg.rl_output:
        check_writable(cfg.rl_output, "rl_output")
    return template


def prepare_sft(cfg: PrepareSFTConfig, rows: Optional[Iterable[tuple[str, object]]] = None, tokenizer=None) -> dict:
    """Run the steps above; returns the manifest. ``rows``/``tokenizer`` may be passed in directly (the demo's
    generated problems); otherwise they come from ``cfg.input`` / ``cfg.tokenizer``."""
    from tqdm import tqdm

    template = check_config(cfg)
    counts = Counts()
    total = None
    if rows is None:
        columns = [k for k in (cfg.question_key, cfg.answer_key, cfg.reference_key, cfg.id_key) if k]
        rows, total = open_rows(cfg.input, None if not str(cfg.input).endswith(".parquet") else columns,
                                cfg.hf_config, cfg.split,
                                column_keys={cfg.question_key: "question_key", cfg.answer_key: "answer_key",
                                             **({cfg.reference_key: "reference_key"} if cfg.reference_key else {})})
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, cfg.trust_remote_code, key="tokenizer")
    if tok.eos_token_id is None:
        raise ConfigError("tokenizer", "has no EOS token (the answer's end)")
    name = Path(str(cfg.input)).name.split(".")[0] or "row"
    bar = tqdm(rows, total=cfg.limit or total, unit="row", desc="read", disable=not cfg.progress, file=sys.stderr,
               dynamic_ncols=True)
    pool = list(read_rows(bar, cfg, counts, name))
    bar.close()
    if not pool:
        raise ConfigError("input", f"{cfg.input}: no row has both {cfg.question_key!r} and {cfg.answer_key!r}")
    pool = consistency_filter(pool, cfg, counts)
    if cfg.dedup:
        pool = dedup(pool, counts)
    rl_rows: list[Row] = []
    split_info = None
    if cfg.allocation:
        n_sft, n_rl = parse_allocation(cfg.allocation)
        sft_pos, rl_pos = split_pool([r.key for r in pool], n_sft, n_rl, cfg.seed)
        counts.not_allocated = len(pool) - len(sft_pos) - len(rl_pos)
        rl_rows = [pool[i] for i in rl_pos]
        pool = [pool[i] for i in sft_pos]
        # an RL prompt is judged against its gold answer: one without a reference (filter=false keeps such rows)
        # cannot be one -- the RL stage refuses a null gold_answer
        counts.rl_no_reference = sum(r.reference is None for r in rl_rows)
        rl_rows = [r for r in rl_rows if r.reference is not None]
        if rl_pos and not rl_rows:
            raise ConfigError("reference_key", f"none of the {len(rl_pos):,} questions allocated to RL has a reference "
                                               f"answer ({cfg.reference_key!r}): RL needs gold answers")
        _check_rl_ids(rl_rows, cfg)
        counts.rl = len(rl_rows)
        split_info = {"allocation": cfg.allocation, "sft": len(pool), "rl": len(rl_rows), "seed": cfg.seed,
                      "sft_questions_sha256": _sha(r.key for r in pool),
                      "rl_questions_sha256": _sha(r.key for r in rl_rows),
                      # relative to the dataset directory, so the pair can move together
                      "rl_output": os.path.relpath(Path(cfg.rl_output).resolve(), Path(cfg.output).resolve())
                      if cfg.rl_output else None}
    if not pool:
        raise ConfigError("input", f"{cfg.input}: nothing left after filtering ({json.dumps(counts.__dict__)})")

    writer = SFTWriter(cfg.output, len(tok))
    try:
        for r in tqdm(pool, unit="ex", desc="tokenize", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True):
            prompt_ids, answer_ids = encode_example(tok, template, r.question, r.answer)
            if len(prompt_ids) + len(answer_ids) > cfg.cutoff:
                if cfg.overlength == "drop" or len(prompt_ids) >= cfg.cutoff:
                    counts.dropped += 1
                    continue
                answer_ids = answer_ids[:cfg.cutoff - len(prompt_ids)]
                counts.truncated += 1
            writer.add(prompt_ids, answer_ids)
            counts.written += 1
        if counts.written == 0:
            raise ConfigError("cutoff", f"every example is longer than cutoff={cfg.cutoff} tokens")
        rl_text = None
        if rl_rows:  # written once the dataset is committed: a failed commit leaves the old pair as it was
            rl_text = "".join(json.dumps({"id": r.id, "prompt": template.render_prompt(r.question),
                                          "gold_answer": r.reference}, ensure_ascii=False) + "\n" for r in rl_rows)
            split_info["rl_sha256"] = hashlib.sha256(rl_text.encode("utf-8")).hexdigest()
        manifest = {"source": str(cfg.input), "tokenizer": {"ref": _tokenizer_ref(cfg.tokenizer, tok),
                                                            **tokenizer_fingerprint(tok)},
                    "template": {"prompt": template.prompt, "answer": template.answer},
                    "steps": {"filter": cfg.filter, "scoring": cfg.scoring, "suite": cfg.suite,
                              "agree_k": cfg.agree_k, "dedup": cfg.dedup, "cutoff": cfg.cutoff,
                              "overlength": cfg.overlength},
                    "counts": dict(counts.__dict__), "split": split_info}
        # the pair lands together: the RL file is written aside first and renamed right after the dataset's
        # commit, with stop signals held in between (a failed commit leaves the old pair as it was; rl_output's
        # directory was checked writable before any work, so the rename after the commit has nothing left to fail)
        with signals_held(), (atomic_path(cfg.rl_output) if rl_text is not None else
                               contextlib.nullcontext()) as rl_tmp:
            if rl_tmp is not None:
                rl_tmp.write_text(rl_text, encoding="utf-8")
            writer.commit(manifest, replace=cfg.overwrite)
    except BaseException:
        writer.abort()
        raise
    return read_manifest(cfg.output, "output")


def _tokenizer_ref(ref, tok) -> str:
    ref = str(ref or getattr(tok, "name_or_path", ""))
    return str(Path(ref).resolve()) if Path(ref).is_dir() else ref


def summary(manifest: dict) -> str:
    c = manifest["counts"]
    line = (f"read {c['read']:,} | missing {c['missing']:,} | normalised {c['normalised']:,} | filtered "
            f"{c['filtered']:,} | disagreement {c['disagreement']:,} | duplicates {c['duplicates']:,}")
    if manifest.get("split"):
        line += f" | RL {c['rl']:,} | unallocated {c['not_allocated']:,}"
        if c.get("rl_no_reference"):
            line += f" | RL without a reference (left out) {c['rl_no_reference']:,}"
    line += (f" | truncated {c['truncated']:,} | dropped {c['dropped']:,} -> {manifest['examples']:,} examples, "
             f"{manifest['answer_tokens']:,} answer tokens of {manifest['tokens']:,}")
    return line


def main(overrides) -> int:
    """`evolm prepare-sft input=... output=... tokenizer=... [question_key= answer_key= reference_key= ...]`."""
    cfg = compose("prepare_sft", overrides, PrepareSFTConfig)
    manifest = prepare_sft(cfg)
    print(f"prepared SFT dataset {cfg.output}: {summary(manifest)}")
    if manifest.get("split"):
        print(f"RL set ({manifest['split']['rl']:,} questions, disjoint from SFT): {cfg.rl_output}")
    return 0
