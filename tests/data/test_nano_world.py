"""EvoLM-nano's generated world: deterministic for a seed, ID/OOD disjoint by construction, answers right by the
project's own checker, and a general corpus measurably unlike the math domain corpus."""

import json
import re

import pytest

from evolm_nemo.answers import gold_answer, judge
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data import nano_world as nw
from evolm_nemo.tasks import SUITE_GROUP

SMALL = dict(general_docs=120, math_docs=80, sft_examples=150, rl_prompts=40, eval_id=30, eval_ood=40,
             vocab_size=600, val_docs=20, sft_subsets="[50]")


def test_corpora_and_problems_are_deterministic_and_prefix_stable():
    for name in nw.CORPORA:
        a = nw.corpus(name, 40, seed=3)
        assert a == nw.corpus(name, 40, seed=3)
        assert a[:10] == nw.corpus(name, 10, seed=3)  # row i depends only on (name, seed, i)
        assert a != nw.corpus(name, 40, seed=4)
        assert len({r["text"] for r in a}) == 40
    for split in ("id", "ood"):
        p = nw.problems(split, 50, seed=3)
        assert p == nw.problems(split, 50, seed=3)
        assert p[:7] == nw.problems(split, 7, seed=3)
        assert p != nw.problems(split, 50, seed=4)
    cfg = nw.WorldConfig(seed=5, **SMALL)
    assert nw.split_sets(cfg) == nw.split_sets(nw.WorldConfig(seed=5, **SMALL))
    with pytest.raises(ConfigError):
        nw.corpus("code", 3)
    with pytest.raises(ConfigError):
        nw.problems("both", 3)


def test_split_is_disjoint_by_construction():
    fams = nw.FAMILIES.values()
    id_sigs = {f.signature for f in fams if f.split == "id"}
    ood = [f for f in fams if f.split == "ood"]
    assert id_sigs and ood and all(f.signature not in id_sigs for f in ood)
    assert {f.axis for f in ood} == {"operation", "composition", "format"}
    # the held-out operation (division) and formats never occur in ID problems, their solutions or the math corpus
    id_text = [p.problem + " " + p.solution for p in nw.problems("id", 400, seed=0)]
    id_text += [r["text"] for r in nw.corpus("math", 200, seed=0)]
    for marker in nw.OOD_MARKERS:
        assert not any(marker in t for t in id_text), marker
    # every OOD problem carries the marker of what makes it OOD
    for p in nw.problems("ood", 200, seed=0):
        assert p.split == "ood" and any(m in p.problem + " " + p.solution for m in nw.OOD_MARKERS), p
    # and the sets written to disk share no question
    sets = nw.split_sets(nw.WorldConfig(seed=0, **SMALL))
    assert {k: len(v) for k, v in sets.items()} == {"sft": 150, "rl": 40, "eval_id": 30, "eval_ood": 40}
    keys = {k: {q["problem"].lower() for q in v} for k, v in sets.items()}
    for a in keys:
        assert len(keys[a]) == len(sets[a])  # unique within a set
        for b in keys:
            assert a == b or not keys[a] & keys[b], (a, b)
    assert {q["split"] for k in ("sft", "rl", "eval_id") for q in sets[k]} == {"id"}
    assert {q["split"] for q in sets["eval_ood"]} == {"ood"}
    assert {q["family"] for q in sets["eval_ood"]} == set(nw.OOD_FAMILIES)  # every OOD family is evaluated


def test_answers_are_right_by_the_project_checker():
    assert SUITE_GROUP[nw.SUITE_FOR_SPLIT["id"]] == "id" and SUITE_GROUP[nw.SUITE_FOR_SPLIT["ood"]] == "ood"
    for split in ("id", "ood"):
        suite = nw.SUITE_FOR_SPLIT[split]
        for p in nw.problems(split, 40, seed=1):
            assert judge(suite, p.solution, p.answer), p
            assert judge(suite, p.solution, p.answer, mode="strict"), p
            assert not judge(suite, p.solution, str(int(p.answer) + 1)), p  # the checker is not vacuous
            # the answer is the arithmetic the worked solution states last
            assert re.findall(r"= (-?\d+)", p.solution)[-1] == p.answer


def test_corpora_differ_measurably():
    general = [r["text"] for r in nw.corpus("general", 300, seed=0)]
    math = [r["text"] for r in nw.corpus("math", 300, seed=0)]

    def digit_share(texts):
        s = "".join(texts)
        return sum(c.isdigit() for c in s) / len(s)

    assert digit_share(general) == 0.0 and digit_share(math) > 0.05
    js = nw.js_divergence(nw.unigram(general), nw.unigram(math))
    js_self = nw.js_divergence(nw.unigram(general[:150]), nw.unigram(general[150:]))
    assert js > 0.5 and js_self < 0.1, (js, js_self)


def test_the_math_corpus_never_states_an_evaluation_or_rl_question():
    """At the default world's sizes, 2,000 math documents drawn freely state 33 of the 700 held-out ID evaluation
    and RL questions verbatim, with their worked answers; with those questions excluded (as the world is built),
    none -- the rest of the stream unchanged."""
    from evolm_nemo.data.sft_prepare import question_key

    sets = nw.split_sets(nw.WorldConfig())
    held = [q["problem"] for part in ("eval_id", "rl") for q in sets[part]]
    keys = {question_key(p) for p in held}

    def stated(rows):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        return sum(json.dumps(p)[1:-1] in text for p in held)

    free, kept = nw.corpus("math", 2000, 0), nw.corpus("math", 2000, 0, exclude=keys)
    assert stated(free) == 33 and stated(kept) == 0
    changed = sum(a != b for a, b in zip(free, kept))
    assert 0 < changed < 100  # only the documents that held such a question were drawn again


def test_stats_of_no_world_is_one_line(tmp_path):
    """`python -m evolm_nemo.data.nano_world stats=<dir>` (README) on a directory that is no world: a ConfigError naming
    stats= (was a FileNotFoundError traceback on general.jsonl)."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "general.jsonl").write_text('{"text": "a"}\n')
    for where in (tmp_path / "missing", tmp_path / "other", ""):
        with pytest.raises(ConfigError, match="not a nano world") as e:
            nw.main([f"stats={where}"])
        assert e.value.key == "stats"


def test_build_world_writes_the_sets(tmp_path):
    out = tmp_path / "world"
    manifest = nw.main([f"out={out}", "seed=2"] + [f"{k}={v}" for k, v in SMALL.items()])
    assert manifest == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["sets"] == {"sft": 150, "rl": 40, "eval_id": 30, "eval_ood": 40}
    assert m["tokens"]["general"] > 0 and m["tokens"]["math"] > 0
    for name in ("general", "math"):
        assert (out / f"{name}.bin").stat().st_size > 0 and (out / f"{name}.idx").is_file()
    from evolm_nemo.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(out / "tokenizer"))
    assert len(tok) == 600
    # per-token distributions differ too (the tokenizer's view of the two corpora)
    gen = nw.unigram((json.loads(line)["text"] for line in open(out / "general.jsonl")), tok.tokenize)
    mth = nw.unigram((json.loads(line)["text"] for line in open(out / "math.jsonl")), tok.tokenize)
    assert nw.js_divergence(gen, mth) > 0.3
    stats = nw.corpus_stats(out)
    assert stats["digit_share"]["general"] == 0.0 and stats["js_tokens"] > 0.3
    assert stats["js_words"] > 10 * stats["js_words_general_halves"]
    rl = [json.loads(line) for line in open(out / "rl.jsonl")]
    assert all(r["prompt"].startswith("Human: ") and r["prompt"].endswith("\nAssistant:") for r in rl)
    for suite, split in (("gsm8k_platinum", "id"), ("tabmwp", "ood")):
        rows = [json.loads(line) for line in open(out / "eval" / f"{suite}.jsonl")]
        assert rows and all(r["id"].startswith(f"nano-{split}-") for r in rows)
        for r in rows:  # the evaluator's gold is the problem's answer, and its worked solution is judged right
            assert gold_answer(suite, r) == r["gt_answer"]
            assert judge(suite, r["gt_solution"].split("\n#### ")[0], gold_answer(suite, r))
    sft = [json.loads(line) for line in open(out / "sft.jsonl")]
    assert set(sft[0]) == {"id", "question", "answer", "gold"}
    # the evaluation and RL questions are held out of the corpora too: no math document states one
    from evolm_nemo.data.sft_prepare import question_key

    sets = nw.split_sets(nw.WorldConfig(seed=2, **SMALL))
    secret = {question_key(q["problem"]) for part in ("eval_id", "rl") for q in sets[part]}
    math_text = (out / "math.jsonl").read_text() + (out / "math_val.jsonl").read_text()
    stated = {question_key(q["problem"]) for part in ("eval_id", "rl") for q in sets[part]
              if json.dumps(q["problem"])[1:-1] in math_text}
    assert secret and not stated and m["corpus_excludes"] == ["eval_id", "rl"]
    # held-out documents: the next ones of each corpus's stream, never trained on; the SFT rows as datasets
    for name in ("general", "math"):
        train_rows = (out / f"{name}.jsonl").read_text().splitlines()
        held = (out / f"{name}_val.jsonl").read_text().splitlines()
        assert len(held) == SMALL["val_docs"] and not set(held) & set(train_rows)
        stream = nw.corpus(name, len(train_rows) + len(held), 2, exclude=secret if name == "math" else ())
        assert [json.loads(r) for r in held] == stream[len(train_rows):]
        assert (out / f"{name}_val.bin").stat().st_size > 0
    from evolm_nemo.data.sft import read_manifest

    assert m["sft"] == {"cutoff": 257, "sft": 150, "sft_50": 50}
    assert read_manifest(out / "sft_50")["counts"]["written"] == 50
    assert not list(tmp_path.glob(".*"))  # no lock or temporary directory left beside the world
    # out= is a world only: an existing one needs overwrite, anything else is refused before any work
    with pytest.raises(ConfigError, match="already holds a nano world; overwrite=true"):
        nw.build_world(nw.WorldConfig(out=str(out)))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds a training run's directory"):
        nw.build_world(nw.WorldConfig(out=str(run_dir), overwrite=True))
    with pytest.raises(ConfigError) as e:
        nw.build_world(nw.WorldConfig(out=str(tmp_path / "w3"), sft_subsets=[0]))
    assert e.value.key == "sft_subsets" and not (tmp_path / "w3").exists()
    # the same seed writes the same bytes
    out2 = tmp_path / "world2"
    nw.main([f"out={out2}", "seed=2"] + [f"{k}={v}" for k, v in SMALL.items()])
    for name in ("general.jsonl", "math.jsonl", "sft.jsonl", "rl.jsonl", "eval/tabmwp.jsonl", "general.bin"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name
