"""EvoLM-nano's generated world (issue 21, part 1): a general-text corpus, a "math" domain corpus, and problem
families with a verifiable answer split in-domain (ID) vs out-of-domain (OOD) by construction.

Everything is offline and deterministic for a seed: row ``i`` of a corpus or a family depends only on
(what, seed, i), so a larger set extends a smaller one.

- ``general``: documents about a small world (people, animals, places, weather, trades, daily routines), numbers
  written as words and rare, no arithmetic -- the "FineWeb" of the world. Forgetting is measured on it.
- ``math``: worked problems of the ID families only (EvoLM's "FineMath"): the domain CPT adds.
- problem families, each a (operations, format) signature:

  ====================  ==================  =========  =============================================
  family                operations          format     split
  ====================  ==================  =========  =============================================
  add                   add                 word       id
  sub                   sub                 word       id
  mul                   mul                 word       id
  add_sub               add, sub            word       id   (a + b - c)
  div                   div                 word       ood  (held-out operation: no division in ID)
  add_mul               add, mul            word       ood  (held-out composition: (a + b) * c)
  table_sum             add                 table      ood  (held-out format: a text table)
  bare                  add | sub           bare       ood  (held-out format: "Compute 17 + 5.")
  ====================  ==================  =========  =============================================

  No OOD signature is an ID signature, the word "shares"/"/" (division), the table's "|" and the bare "Compute"
  prompt never occur in ID problems or in the math corpus: the split is disjoint by construction, not by sampling.
  Solutions end in EvoLM's ``The answer is \\boxed{N}.``, so the project's own checker (``evolm_nemo.answers``)
  scores them: ID problems under ``gsm8k_platinum`` (an ID suite), OOD problems under ``tabmwp`` (an OOD suite);
  both compare numbers with the math rule.

``build_world(out, seed)`` writes the corpora (JSONL, an HF tokenizer trained on them, .bin/.idx prefixes), the SFT
rows (``{"id", "question", "answer", "gold"}``, as `evolm prepare-sft` reads them), the RL prompts
(``{"id", "prompt", "gold_answer"}``), and held-out evaluation problems in EvoLM's cooked schema
(``eval/gsm8k_platinum.jsonl`` = ID, ``eval/tabmwp.jsonl`` = OOD), with no question in two of the sets.

With ``index`` (the default) it also trains the tokenizer, tokenizes both corpora into ``<out>/general`` and
``<out>/math`` and prepares the SFT rows as a training dataset ``<out>/sft``. The world is built beside ``out`` and
renamed into place when complete (a killed build leaves nothing); ``overwrite=true`` replaces only a world.

``python -m evolm_nemo.data.nano_world out=<dir> [seed=0] [general_docs=...] ...`` runs it (a suite's
``kind: data, make: nano_world`` node does the same);
``python -m evolm_nemo.data.nano_world stats=<dir>`` prints how its two corpora differ.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from evolm_nemo import fileio
from evolm_nemo.config.errors import ConfigError, print_error
from evolm_nemo.tasks import TEMPLATE

# --- the world's lexicon -----------------------------------------------------------------------------------------

PEOPLE = {"Tom": "He", "Sam": "He", "Ben": "He", "Max": "He", "Leo": "He", "Owen": "He",
          "Ann": "She", "Mia": "She", "Lily": "She", "Eva": "She", "Zoe": "She", "Ruth": "She"}
ITEMS = ["apples", "pears", "eggs", "books", "pens", "cards", "toys", "coins", "cups", "balls", "shells", "stamps"]
PLACES = ["farm", "park", "village", "river", "garden", "forest", "market", "harbour", "hill", "library"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey"]
ANIMALS = {  # animal -> (sound, what it does, where it lives): fixed facts of the world
    "dog": ("barks", "runs after sticks", "village"), "cat": ("purrs", "sleeps in the sun", "village"),
    "cow": ("moos", "eats grass", "farm"), "duck": ("quacks", "swims in ponds", "river"),
    "owl": ("hoots", "hunts at night", "forest"), "frog": ("croaks", "jumps on leaves", "river"),
    "fox": ("yelps", "hides in holes", "forest"), "goat": ("bleats", "climbs rocks", "hill"),
    "horse": ("neighs", "pulls carts", "farm"), "gull": ("cries", "steals fish", "harbour"),
}
TRADES = {"baker": "bakes bread", "smith": "mends tools", "fisher": "catches fish", "weaver": "weaves cloth",
          "teacher": "teaches children", "farmer": "grows wheat", "potter": "makes bowls", "sailor": "sails boats"}
WEATHER = ["rainy", "sunny", "windy", "foggy", "cold", "warm", "stormy", "quiet"]
SEASONS = {"spring": "flowers open", "summer": "days are long", "autumn": "leaves fall", "winter": "snow comes"}
FEELINGS = ["happy", "tired", "calm", "curious", "proud", "sleepy", "glad", "busy"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# --- problem families --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NanoProblem:
    family: str
    split: str  # "id" | "ood"
    problem: str
    solution: str  # worked, ending "The answer is \boxed{N}."
    answer: str


@dataclass(frozen=True)
class Family:
    name: str
    split: str  # "id" | "ood"
    ops: Tuple[str, ...]  # the operations, in the order the solution applies them
    format: str  # "word" | "table" | "bare"
    axis: str  # what makes an OOD family OOD: "operation" | "composition" | "format" ("" for ID)
    make: Callable[[random.Random], Tuple[str, str, int]]  # -> (problem, worked steps, answer)

    @property
    def signature(self) -> Tuple[Tuple[str, ...], str]:
        return self.ops, self.format


def _boxed(n) -> str:
    return f"The answer is \\boxed{{{n}}}."


def _person(r: random.Random) -> Tuple[str, str, str]:
    a, b = r.sample(list(PEOPLE), 2)
    return a, PEOPLE[a], b


def _add(r):
    name, he, _ = _person(r)
    item, a, b = r.choice(ITEMS), r.randint(2, 40), r.randint(2, 30)
    return (f"{name} has {a} {item}. {he} finds {b} more {item}. How many {item} does {name} have now?",
            f"{name} has {a} + {b} = {a + b} {item}.", a + b)


def _sub(r):
    name, he, other = _person(r)
    item, b = r.choice(ITEMS), r.randint(1, 25)
    a = b + r.randint(1, 30)
    return (f"{name} has {a} {item}. {he} gives {b} {item} to {other}. How many {item} does {name} have left?",
            f"{name} has {a} - {b} = {a - b} {item} left.", a - b)


def _mul(r):
    name, _, _ = _person(r)
    item, a, b = r.choice(ITEMS), r.randint(2, 12), r.randint(2, 9)
    return (f"{name} has {a} boxes. Each box holds {b} {item}. How many {item} does {name} have?",
            f"{name} has {a} * {b} = {a * b} {item}.", a * b)


def _add_sub(r):
    name, he, other = _person(r)
    item, a, b = r.choice(ITEMS), r.randint(5, 30), r.randint(2, 20)
    c = r.randint(1, a + b - 1)
    return (f"{name} has {a} {item}. {he} finds {b} more and then gives {c} to {other}. "
            f"How many {item} does {name} have?",
            f"After finding, {name} has {a} + {b} = {a + b} {item}. After giving, {name} has {a + b} - {c} = "
            f"{a + b - c} {item}.", a + b - c)


def _div(r):  # held-out operation
    name, _, _ = _person(r)
    item, b, q = r.choice(ITEMS), r.randint(2, 9), r.randint(2, 12)
    return (f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?",
            f"Each friend gets {b * q} / {b} = {q} {item}.", q)


def _add_mul(r):  # held-out composition of two ID operations
    name, he, _ = _person(r)
    item, a, b, c = r.choice(ITEMS), r.randint(1, 9), r.randint(1, 9), r.randint(2, 6)
    return (f"{name} has {a} {item} in a box. {he} puts {b} more {item} in it. {name} has {c} boxes like that. "
            f"How many {item} does {name} have in all?",
            f"One box has {a} + {b} = {a + b} {item}. {c} boxes have {a + b} * {c} = {(a + b) * c} {item}.",
            (a + b) * c)


def _table_sum(r):  # held-out format: an ID operation over a text table
    people = r.sample(list(PEOPLE), r.randint(2, 4))
    item = r.choice(ITEMS)
    counts = [r.randint(1, 30) for _ in people]
    table = "\n".join([f"name | {item}"] + [f"{p} | {c}" for p, c in zip(people, counts)])
    total = sum(counts)
    return (f"{table}\nHow many {item} do they have in total?",
            f"Add the column: {' + '.join(map(str, counts))} = {total}.", total)


def _bare(r):  # held-out format: a bare expression
    a, b = r.randint(2, 60), r.randint(2, 40)
    if r.random() < 0.5:
        return f"Compute {a} + {b}.", f"{a} + {b} = {a + b}.", a + b
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}.", f"{a} - {b} = {a - b}.", a - b


FAMILIES: Dict[str, Family] = {f.name: f for f in [
    Family("add", "id", ("add",), "word", "", _add),
    Family("sub", "id", ("sub",), "word", "", _sub),
    Family("mul", "id", ("mul",), "word", "", _mul),
    Family("add_sub", "id", ("add", "sub"), "word", "", _add_sub),
    Family("div", "ood", ("div",), "word", "operation", _div),
    Family("add_mul", "ood", ("add", "mul"), "word", "composition", _add_mul),
    Family("table_sum", "ood", ("add",), "table", "format", _table_sum),
    Family("bare", "ood", ("add|sub",), "bare", "format", _bare),
]}
ID_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.split == "id")
OOD_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.split == "ood")
# markers of the held-out operations and formats: never in an ID problem or the math corpus
OOD_MARKERS = ("shares", " / ", "|", "Compute ", "boxes like that")
# the answer checker's suite for each split: an ID and an OOD suite of EvoLM's registry, both compared as math
SUITE_FOR_SPLIT = {"id": "gsm8k_platinum", "ood": "tabmwp"}


def make_problem(family: str, r: random.Random) -> NanoProblem:
    fam = FAMILIES[family]
    problem, steps, answer = fam.make(r)
    return NanoProblem(fam.name, fam.split, problem, f"{steps} {_boxed(answer)}", str(answer))


def problems(split: str, num: int, seed: int = 0) -> List[NanoProblem]:
    """``num`` problems of ``split`` (id | ood), families taking turns; problem ``i`` depends only on (split, seed, i)."""
    if split not in ("id", "ood"):
        raise ConfigError("split", f"must be id or ood, got {split!r}")
    fams = ID_FAMILIES if split == "id" else OOD_FAMILIES
    return [make_problem(fams[i % len(fams)], random.Random(f"nano:{split}:{seed}:{i}")) for i in range(num)]


# --- corpora ------------------------------------------------------------------------------------------------------

CORPORA = ("general", "math")


def _sentence(r: random.Random) -> str:
    pick = r.randrange(9)
    name, he, other = _person(r)
    if pick == 0:
        animal = r.choice(list(ANIMALS))
        sound, does, home = ANIMALS[animal]
        return r.choice([f"The {animal} {sound}.", f"The {animal} {does}.", f"The {animal} lives near the {home}."])
    if pick == 1:
        trade = r.choice(list(TRADES))
        return f"{name} is a {trade}. Every day {he.lower()} {TRADES[trade]}."
    if pick == 2:
        season = r.choice(list(SEASONS))
        return f"In {season} the {SEASONS[season]}."
    if pick == 3:
        return f"It was {r.choice(WEATHER)} at the {r.choice(PLACES)}, so {name} stayed with {other}."
    if pick == 4:
        return f"{name} walked to the {r.choice(PLACES)} and felt {r.choice(FEELINGS)}."
    if pick == 5:
        return f"{name} has a {r.choice(COLORS)} {r.choice(list(ANIMALS))} and {other} has a {r.choice(COLORS)} one."
    if pick == 6:
        return f"{name} saw {r.choice(WORDS[2:])} {r.choice(list(ANIMALS))}s by the {r.choice(PLACES)}."
    if pick == 7:
        return f"{name} asked {other} about the {r.choice(PLACES)}, and {other} told a long story."
    return f"{name} and {other} met at the {r.choice(PLACES)} on a {r.choice(WEATHER)} morning."


def _doc(corpus: str, r: random.Random, exclude: frozenset = frozenset()) -> Dict[str, str]:
    if corpus == "general":
        return {"text": " ".join(_sentence(r) for _ in range(r.randint(4, 8)))}
    from evolm_nemo.data.sft_prepare import question_key

    parts = []
    for _ in range(r.randint(2, 4)):
        p = make_problem(r.choice(ID_FAMILIES), r)
        while exclude and question_key(p.problem) in exclude:  # an evaluation or RL question: never in the corpus
            p = make_problem(r.choice(ID_FAMILIES), r)
        parts.append(f"{p.problem} {p.solution}" if r.random() < 0.7 else f"Human: {p.problem}\nAssistant: "
                                                                           f"{p.solution}")
    return {"text": "\n".join(parts)}


def corpus(name: str, num_docs: int, seed: int = 0, exclude: Iterable[str] = ()) -> List[Dict[str, str]]:
    """``num_docs`` ``{"text"}`` rows of corpus ``name`` (general | math); row ``i`` depends only on (name, seed, i)
    and ``exclude`` (question keys, ``sft_prepare.question_key``, the math corpus never states: the held-out
    evaluation and RL questions)."""
    if name not in CORPORA:
        raise ConfigError("corpus", f"unknown nano corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if num_docs < 1:
        raise ConfigError("num_docs", f"must be positive, got {num_docs}")
    exclude = frozenset(exclude)
    return [_doc(name, random.Random(f"nano:{name}:{seed}:{i}"), exclude) for i in range(num_docs)]


def unigram(texts: Iterable[str], tokenize: Optional[Callable[[str], List]] = None) -> Counter:
    """Token counts (whitespace words when no ``tokenize``)."""
    counts: Counter = Counter()
    for t in texts:
        counts.update(tokenize(t) if tokenize else t.split())
    return counts


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) between two count distributions."""
    np_, nq = sum(p.values()), sum(q.values())
    out = 0.0
    for k in set(p) | set(q):
        a, b = p.get(k, 0) / np_, q.get(k, 0) / nq
        m = (a + b) / 2
        out += (a * math.log2(a / m) if a else 0.0) + (b * math.log2(b / m) if b else 0.0)
    return out / 2


# --- the world on disk -------------------------------------------------------------------------------------------

WORLD_FORMAT = "evolm-nano-world-1"  # manifest.json's format: what fileio.output_kind knows a world by


@dataclass
class WorldConfig:
    out: Optional[str] = None  # output directory
    seed: int = 0
    general_docs: int = 20000  # general-text documents (~1.2M tokens)
    math_docs: int = 8000  # math-domain documents (~1M tokens)
    sft_examples: int = 2000  # ID problems with worked solutions
    rl_prompts: int = 500  # ID RL prompts
    eval_id: int = 200  # held-out ID problems
    eval_ood: int = 200  # OOD problems (evaluation only)
    vocab_size: int = 1024  # the generated tokenizer's vocabulary (the nano presets' model.vocab_size)
    index: bool = True  # also tokenize the corpora into .bin/.idx prefixes (needs the training stack)
    val_docs: int = 200  # held-out documents per corpus (<corpus>_val: the next documents of the same stream, never
    #                      trained on) for the held-out loss per source (data.val_paths)
    sft_subsets: List[int] = field(default_factory=list)  # with sft_cutoff: also <out>/sft_<N>, the first N SFT rows
    sft_cutoff: int = 257  # with index: the SFT rows prepared as <out>/sft (`evolm prepare-sft`), at most this many
    #                        tokens per example (the nano presets' model.seq_length + 1); 0: not prepared
    overwrite: bool = False  # replace an existing world at out (never another command's output)


def split_sets(cfg: WorldConfig) -> Dict[str, List[dict]]:
    """The ID problems split into sft / rl / eval_id (unique questions, no question in two sets) and the OOD eval set.
    A pure function of ``cfg`` (no tokenizer)."""
    from evolm_nemo.data.sft_prepare import question_key

    want = cfg.sft_examples + cfg.rl_prompts + cfg.eval_id
    pool, seen, i = [], set(), 0
    while len(pool) < want:  # problems repeat now and then: skip repeats, draw on
        batch = problems("id", max(want, 64) + i, cfg.seed)[i:]
        for j, p in enumerate(batch, i):
            key = question_key(p.problem)
            if key not in seen and len(pool) < want:
                seen.add(key)
                pool.append({"id": f"nano-id-{j:06d}", **asdict(p)})
        i += len(batch)
    random.Random(f"nano:split:{cfg.seed}").shuffle(pool)
    ood, ood_seen = [], set()
    for j, p in enumerate(problems("ood", cfg.eval_ood * 2 + 16, cfg.seed)):
        key = question_key(p.problem)
        if key not in ood_seen and len(ood) < cfg.eval_ood:
            ood_seen.add(key)
            ood.append({"id": f"nano-ood-{j:06d}", **asdict(p)})
    a, b = cfg.sft_examples, cfg.sft_examples + cfg.rl_prompts
    return {"sft": pool[:a], "rl": pool[a:b], "eval_id": pool[b:], "eval_ood": ood}


def _cooked(rows: List[dict]) -> List[dict]:
    return [{"id": q["id"], "problem": q["problem"], "gt_solution": f"{q['solution']}\n#### {q['answer']}",
             "gt_answer": q["answer"]} for q in rows]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_world(cfg: WorldConfig) -> dict:
    """Write the world under ``cfg.out`` (see the module docstring); return its manifest (also ``manifest.json``)."""
    if not cfg.out:
        raise ConfigError("out", "required (out=<dir>)")
    for n in cfg.sft_subsets:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= cfg.sft_examples:
            raise ConfigError("sft_subsets", f"each subset is a row count in 1..sft_examples ({cfg.sft_examples}), "
                                             f"got {n!r}")
    if isinstance(cfg.sft_cutoff, bool) or not isinstance(cfg.sft_cutoff, int) or cfg.sft_cutoff < 0:
        raise ConfigError("sft_cutoff", f"expected an integer >= 0 (0: no SFT dataset), got {cfg.sft_cutoff!r}")
    final = Path(cfg.out)
    taken = fileio.lock_output(final, "out")  # a second build of the same world is refused while this one runs
    try:
        _check_out(final, cfg.overwrite)
        tmp = fileio.temp_dir(final, owned=True)  # built aside, renamed into place when complete: never half a world
        try:
            manifest = _build(cfg, tmp, final)
            fileio.commit_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if taken:
            fileio.release_output(final)
    return manifest


def _check_out(out: Path, overwrite: bool) -> None:
    """``out`` is new, empty, or (with ``overwrite``) a world this command wrote; never anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError("out", f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    kind = fileio.output_kind(out)
    if kind != "nano-world":
        raise ConfigError("out", f"{out} holds {fileio.KINDS[kind or 'other']}, not a nano world; choose another out=")
    if not overwrite:
        raise ConfigError("out", f"{out} already holds a nano world; overwrite=true replaces it")


def _build(cfg: WorldConfig, out: Path, final: Path) -> dict:
    """Write the world into ``out`` (a temporary directory that becomes ``final``); paths recorded name ``final``."""
    from evolm_nemo.data.sft_prepare import question_key

    sets = split_sets(cfg)
    held = {question_key(q["problem"]) for part in ("eval_id", "rl") for q in sets[part]}  # never in a corpus
    corpora = {"general": corpus("general", cfg.general_docs + cfg.val_docs, cfg.seed),
               "math": corpus("math", cfg.math_docs + cfg.val_docs, cfg.seed, exclude=held)}
    held_out = {}
    for name, rows in list(corpora.items()):
        cut = len(rows) - cfg.val_docs
        corpora[name] = rows[:cut]
        if cfg.val_docs:
            held_out[f"{name}_val"] = rows[cut:]
    for name, rows in {**corpora, **held_out}.items():
        _write_jsonl(out / f"{name}.jsonl", rows)
    _write_jsonl(out / "sft.jsonl", ({"id": q["id"], "question": q["problem"], "answer": q["solution"],
                                      "gold": q["answer"]} for q in sets["sft"]))
    _write_jsonl(out / "rl.jsonl", ({"id": q["id"], "prompt": TEMPLATE.replace("{problem}", q["problem"]),
                                     "gold_answer": q["answer"]} for q in sets["rl"]))
    (out / "eval").mkdir(exist_ok=True)
    _write_jsonl(out / "eval" / f"{SUITE_FOR_SPLIT['id']}.jsonl", _cooked(sets["eval_id"]))
    _write_jsonl(out / "eval" / f"{SUITE_FOR_SPLIT['ood']}.jsonl", _cooked(sets["eval_ood"]))
    families = {n: {"split": f.split, "ops": list(f.ops), "format": f.format, "axis": f.axis}
                for n, f in FAMILIES.items()}
    manifest = {"format": WORLD_FORMAT, "config": asdict(cfg), "families": families,
                "sets": {k: len(v) for k, v in sets.items()},
                "corpus_excludes": ["eval_id", "rl"]}  # questions the math corpus never states
    if cfg.index:
        from evolm_nemo.data.prepare import prepare
        from evolm_nemo.data.tokenizer import train_tokenizer

        # the tokenizer learns the corpora and the SFT template's text (ID problems only: OOD text stays unseen,
        # still encodable byte by byte)
        texts = [r["text"] for rows in corpora.values() for r in rows]
        texts += [f"Human: {q['problem']}\nAssistant: {q['solution']}" for q in sets["sft"][:500]]
        tok = train_tokenizer(texts, out / "tokenizer", cfg.vocab_size)
        tokenizer = str(final.resolve() / "tokenizer")  # where it will be once the world is in place
        manifest["tokenizer"] = tokenizer
        manifest["tokens"] = {}
        for name in [*corpora, *held_out]:
            stats = prepare(out / f"{name}.jsonl", out / name, tok, workers=1, progress=False)
            manifest["tokens"][name] = stats.tokens
        if cfg.sft_cutoff:  # the SFT rows as a training dataset: every worked solution passes the checker
            from evolm_nemo.data.sft_prepare import PrepareSFTConfig, prepare_sft

            manifest["sft"] = {"cutoff": cfg.sft_cutoff}
            for n in [None, *cfg.sft_subsets]:
                name = "sft" if n is None else f"sft_{n}"
                sft = prepare_sft(PrepareSFTConfig(
                    input=str(out / "sft.jsonl"), output=str(out / name), limit=n, reference_key="gold", id_key="id",
                    tokenizer=tokenizer, cutoff=cfg.sft_cutoff, workers=1, progress=False),
                    tokenizer=tok)
                fileio.release_output(out / name)  # its lock file would otherwise be renamed into the world
                manifest["sft"][name] = sft["counts"]["written"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def corpus_stats(world) -> dict:
    """How the world's two corpora differ: digit share, and the Jensen-Shannon divergence (bits) of their word
    distributions, of the two halves of the general corpus (a floor), and of the tokenizer's token distributions
    (first 4,000 documents of each)."""
    from evolm_nemo.data.tokenizer import load_tokenizer

    world = Path(world)
    g = [json.loads(line)["text"] for line in open(world / "general.jsonl", encoding="utf-8")]
    m = [json.loads(line)["text"] for line in open(world / "math.jsonl", encoding="utf-8")]

    def digits(texts):
        return sum(c.isdigit() for t in texts for c in t) / max(1, sum(map(len, texts)))

    tok = load_tokenizer(str(world / "tokenizer"))
    half = len(g) // 2
    return {"digit_share": {"general": round(digits(g), 4), "math": round(digits(m), 4)},
            "js_words": round(js_divergence(unigram(g), unigram(m)), 4),
            "js_words_general_halves": round(js_divergence(unigram(g[:half]), unigram(g[half:])), 4),
            "js_tokens": round(js_divergence(unigram(g[:4000], tok.tokenize), unigram(m[:4000], tok.tokenize)), 4)}


def _overrides(argv: List[str]) -> dict:
    """``key=value`` items -> WorldConfig keyword arguments (values read as YAML scalars)."""
    import yaml

    names = {f.name for f in fields(WorldConfig)}
    opts = {}
    for item in argv:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(item, "overrides are key=value (e.g. out=runs/nano/world seed=1)")
        if key not in names:
            raise ConfigError(key, f"unknown key; valid keys: {', '.join(sorted(names))}")
        opts[key] = yaml.safe_load(value) if value else None
    return opts


def main(argv: List[str]) -> int:
    if len(argv) == 1 and argv[0].startswith("stats="):  # python -m evolm_nemo.data.nano_world stats=<world dir>
        world = argv[0].partition("=")[2]
        kind = fileio.output_kind(world) if world and Path(world).is_dir() else None
        if kind != "nano-world":  # (a missing corpus file was a FileNotFoundError traceback)
            what = ("no directory" if not world or not Path(world).is_dir() else
                    f"{fileio.KINDS[kind]}" if kind else "an empty directory")
            raise ConfigError("stats", f"{world or '(empty)'} is {what}, not a nano world; stats= takes the out= "
                                       "directory of a built world")
        print(json.dumps(corpus_stats(world)))
        return 0
    cfg = WorldConfig(**_overrides(argv))
    manifest = build_world(cfg)
    print(json.dumps({"out": cfg.out, "sets": manifest["sets"], "tokens": manifest.get("tokens")}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as exc:
        print_error(exc.key, exc.message)
        sys.exit(2)
