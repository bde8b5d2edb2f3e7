"""The embedded default's data: a seeded, generated English corpus small enough for a tiny model to learn.

Documents come from templates over a few dozen words: fixed facts (a tiny model can memorise them), arithmetic word
problems worked out in EvoLM's style ("... The answer is \\boxed{19}."), counting and lists. Three kinds:

- ``text``: mixed documents for pretraining, rows ``{"text"}``;
- ``math``: worked word problems and equations only, for CPT, rows ``{"text"}``;
- ``qa``: one problem per row ``{"problem", "solution", "answer"}``, for SFT and RL.

Document ``i`` depends only on (kind, seed, i), so a larger corpus extends a smaller one.
``ensure_synthetic`` turns a corpus into what training reads: JSONL, an HF tokenizer, and a .bin/.idx prefix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data.prepare import prepare
from evolm_nemo.data.tokenizer import MegatronHFTokenizer, load_tokenizer, train_tokenizer
from evolm_nemo.fileio import replace_dir, staged_dir

KINDS = ("text", "math", "qa")

NAMES = {"Tom": "He", "Sam": "He", "Ben": "He", "Max": "He", "Ann": "She", "Mia": "She", "Lily": "She", "Eva": "She"}
ITEMS = ["apples", "pears", "eggs", "books", "pens", "cards", "toys", "coins", "cups", "balls"]
PLACES = ["farm", "park", "house", "river", "garden", "forest", "school", "shop"]
COLORS = ["red", "blue", "green", "yellow", "white", "black"]
# animal -> (sound, what it can do, where it lives): fixed, so they are facts to learn
ANIMALS = {
    "dog": ("woof", "run", "house"),
    "cat": ("meow", "climb", "house"),
    "cow": ("moo", "walk", "farm"),
    "duck": ("quack", "swim", "river"),
    "bird": ("tweet", "fly", "forest"),
    "frog": ("croak", "jump", "river"),
    "fox": ("yip", "hide", "forest"),
    "sheep": ("baa", "eat grass", "farm"),
}
FACTS = [
    "The sky is blue.",
    "Grass is green.",
    "Snow is white.",
    "The sun is hot.",
    "Ice is cold.",
    "A week has 7 days.",
    "A day has 24 hours.",
    "An hour has 60 minutes.",
    "A year has 12 months.",
    "A dozen is 12.",
    "Two and two make four.",
    "Ten is more than five.",
]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass
class Problem:
    problem: str
    solution: str  # worked answer ending "The answer is \boxed{N}."
    answer: str


def _boxed(n) -> str:
    return f"The answer is \\boxed{{{n}}}."


def _two(r: random.Random):
    a, b = r.sample(list(NAMES), 2)
    return a, NAMES[a], b


def _add(r):
    name, he, _ = _two(r)
    item, a, b = r.choice(ITEMS), r.randint(2, 30), r.randint(2, 20)
    return Problem(
        f"{name} has {a} {item}. {he} gets {b} more {item}. How many {item} does {name} have now?",
        f"{name} has {a} + {b} = {a + b} {item}. {_boxed(a + b)}",
        str(a + b),
    )


def _sub(r):
    name, he, other = _two(r)
    item, b = r.choice(ITEMS), r.randint(1, 15)
    a = b + r.randint(1, 25)
    return Problem(
        f"{name} has {a} {item}. {he} gives {b} {item} to {other}. How many {item} does {name} have left?",
        f"{name} has {a} - {b} = {a - b} {item} left. {_boxed(a - b)}",
        str(a - b),
    )


def _mul(r):
    name, he, _ = _two(r)
    item, a, b = r.choice(ITEMS), r.randint(2, 9), r.randint(2, 9)
    return Problem(
        f"{name} has {a} bags. Each bag has {b} {item}. How many {item} does {name} have?",
        f"{name} has {a} * {b} = {a * b} {item}. {_boxed(a * b)}",
        str(a * b),
    )


def _div(r):
    name, he, _ = _two(r)
    item, b, q = r.choice(ITEMS), r.randint(2, 6), r.randint(2, 9)
    return Problem(
        f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?",
        f"Each friend gets {b * q} / {b} = {q} {item}. {_boxed(q)}",
        str(q),
    )


def _two_step(r):
    name, he, other = _two(r)
    item, a, b = r.choice(ITEMS), r.randint(5, 30), r.randint(2, 20)
    c = r.randint(1, a + b - 1)
    return Problem(
        f"{name} has {a} {item}. {he} buys {b} more and then gives {c} to {other}. How many {item} does {name} have?",
        f"After buying, {name} has {a} + {b} = {a + b} {item}. After giving, {name} has {a + b} - {c} = {a + b - c} "
        f"{item}. {_boxed(a + b - c)}",
        str(a + b - c),
    )


def _equation(r):
    a, x, b = r.randint(2, 9), r.randint(1, 12), r.randint(1, 20)
    c = a * x + b
    return Problem(
        f"Solve for x: {a}x + {b} = {c}.",
        f"Subtract {b} from both sides: {a}x = {c - b}. Divide both sides by {a}: x = {x}. {_boxed(x)}",
        str(x),
    )


WORD_PROBLEMS: List[Callable[[random.Random], Problem]] = [_add, _sub, _mul, _div, _two_step]
MATH_PROBLEMS: List[Callable[[random.Random], Problem]] = WORD_PROBLEMS + [_equation]


def _fact(r):
    animal = r.choice(list(ANIMALS))
    sound, can, home = ANIMALS[animal]
    return r.choice(
        [
            f"The {animal} says {sound}.",
            f"A {animal} can {can}.",
            f"The {animal} lives near the {home}.",
            r.choice(FACTS),
            f"{r.choice(list(NAMES))} has a {r.choice(COLORS)} {animal}.",
        ]
    )


def _count(r):
    if r.random() < 0.5:
        s = r.randint(1, 20)
        e = s + r.randint(3, 8)
        return f"Count from {s} to {e}: {', '.join(str(i) for i in range(s, e + 1))}."
    n = r.randint(2, 10)
    item = r.choice(ITEMS)
    return f"Count the {item}: {', '.join(WORDS[1:n + 1])}. There are {n} {item}."


def _list(r):
    name, he, _ = _two(r)
    if r.random() < 0.5:
        things = r.sample(ITEMS, 3)
        place = r.choice(PLACES)
        return f"{name} went to the {place} and got {things[0]}, {things[1]} and {things[2]}."
    nums = r.sample(range(1, 50), r.randint(3, 5))
    return f"Sort the numbers {', '.join(map(str, nums))}: {', '.join(map(str, sorted(nums)))}."


def _problem_text(p: Problem) -> str:
    return f"{p.problem} {p.solution}"


def _doc(kind: str, r: random.Random) -> Dict[str, str]:
    if kind == "qa":
        p = r.choice(MATH_PROBLEMS)(r)
        return {"problem": p.problem, "solution": p.solution, "answer": p.answer}
    if kind == "math":
        return {"text": "\n".join(_problem_text(r.choice(MATH_PROBLEMS)(r)) for _ in range(r.randint(2, 4)))}
    parts = []
    for _ in range(r.randint(3, 6)):
        pick = r.random()
        if pick < 0.35:
            parts.append(_fact(r))
        elif pick < 0.5:
            parts.append(_problem_text(r.choice(WORD_PROBLEMS)(r)))
        elif pick < 0.65:  # Q&A transcripts, as web text has them: the shape the evaluation template asks for
            p = r.choice(MATH_PROBLEMS)(r)
            parts.append(f"\nHuman: {p.problem}\nAssistant: {p.solution}\n")
        elif pick < 0.85:
            parts.append(_count(r))
        else:
            parts.append(_list(r))
    return {"text": " ".join(parts)}


def generate(kind: str = "text", num_docs: int = 1000, seed: int = 0) -> List[Dict[str, str]]:
    """``num_docs`` rows of ``kind`` (text | math | qa); row ``i`` depends only on (kind, seed, i)."""
    if kind not in KINDS:
        raise ConfigError("kind", f"unknown synthetic kind {kind!r}; choose one of {', '.join(KINDS)}")
    if num_docs < 1:
        raise ConfigError("synthetic_docs", f"must be positive, got {num_docs}")
    return [_doc(kind, random.Random(f"{kind}:{seed}:{i}")) for i in range(num_docs)]


def tokenizer_texts(corpus: List[Dict[str, str]], seed: int) -> List[str]:
    """What the generated tokenizer learns from: the corpus plus samples of the later stages' text (math, and QA in
    the SFT template), so one tokenizer serves pretraining, CPT, SFT and RL."""
    texts = [row["text"] for row in corpus]
    texts += [row["text"] for row in generate("math", 200, seed + 1)]
    texts += [f"Human: {q['problem']}\nAssistant: {q['solution']}" for q in generate("qa", 200, seed + 2)]
    return texts


@dataclass
class SyntheticData:
    prefix: str  # megatron indexed-dataset prefix (<prefix>.bin / .idx)
    tokenizer_dir: str  # HF tokenizer (AutoTokenizer.from_pretrained)
    jsonl: str  # the corpus, one {"text"} row per line


MANIFEST = "manifest.json"


def _complete(root: Path) -> Optional[SyntheticData]:
    """The data under ``root`` if its build finished (the manifest is written last), else None."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    data = SyntheticData(str(root / "corpus"), str(root / "tokenizer"), str(root / "corpus.jsonl"))
    needed = [data.prefix + ".bin", data.prefix + ".idx", data.jsonl, f"{data.tokenizer_dir}/tokenizer.json"]
    return data if manifest.get("complete") and all(os.path.exists(p) for p in needed) else None


def ensure_synthetic(
    cache_dir,
    num_docs: int,
    seed: int,
    vocab_size: int = 512,
    kind: str = "text",
    tokenizer_dir: Optional[str] = None,
    progress: bool = False,
) -> SyntheticData:
    """Generate (once) the corpus, its tokenizer and its indexed dataset under ``cache_dir``; reuse them if complete.

    Built in a temporary directory and renamed into place, so a half-built directory is never used. Pass
    ``tokenizer_dir`` to tokenize with an existing tokenizer instead of training one (the CPT ``math`` corpus uses
    the pretraining tokenizer). Call on one rank only; other ranks wait at a barrier.
    """
    if kind not in ("text", "math"):
        raise ConfigError("kind", f"ensure_synthetic builds pretraining corpora (text | math), not {kind!r}")
    name = f"synthetic-{kind}-n{num_docs}-s{seed}-v{vocab_size}"
    if tokenizer_dir is not None:  # named after the tokenizer's vocabulary, so a different one never collides
        tok = load_tokenizer(tokenizer_dir)
        digest = MegatronHFTokenizer(tok).unique_identifiers["vocab_sha256"][:8]
        name = f"synthetic-{kind}-n{num_docs}-s{seed}-tok{digest}"
    root = Path(cache_dir) / name
    done = _complete(root)
    if done is not None:
        return done
    with staged_dir(root, mode=0o755) as tmp:  # mkdtemp makes it private
        corpus = generate(kind, num_docs, seed)
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
            for row in corpus:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if tokenizer_dir is None:
            tok = train_tokenizer(tokenizer_texts(corpus, seed), tmp / "tokenizer", vocab_size)
        else:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        stats = prepare(tmp / "corpus.jsonl", tmp / "corpus", tok, workers=1, progress=progress)
        manifest = {"complete": True, "kind": kind, "num_docs": num_docs, "seed": seed, "vocab_size": len(tok),
                    "documents": stats.documents, "tokens": stats.tokens}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if _complete(root) is not None:  # another writer finished first; else an incomplete leftover is replaced
            return _complete(root)
        replace_dir(tmp, root)
    done = _complete(root)
    assert done is not None, root
    return done
