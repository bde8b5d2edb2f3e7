"""The generated corpus and its tokenizer: deterministic, idempotent, atomic, exact round trip, offline load."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from .conftest import SYNTH_DOCS, SYNTH_SEED
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data.synthetic import ensure_synthetic, generate
from evolm_nemo.data.tokenizer import load_tokenizer, train_tokenizer

TRICKY = ["", " ", "  two  spaces ", "naïve café — 東京 😀", "tab\tnew\nline\r\n", "The answer is \\boxed{42}.",
          "Human: hi\nAssistant: hello", "\x00\x7f binary-ish", "</s> <s> <pad> <unk> as text?"]


def test_generate_is_deterministic_and_prefix_stable():
    for kind in ("text", "math", "qa"):
        a = generate(kind, 30, seed=3)
        assert a == generate(kind, 30, seed=3)
        assert a[:10] == generate(kind, 10, seed=3)  # row i depends only on (kind, seed, i)
        assert a != generate(kind, 30, seed=4)
        assert len({json.dumps(r) for r in a}) > 25  # varied


def test_kinds_have_their_shapes():
    for row in generate("qa", 50, seed=1):
        assert set(row) == {"problem", "solution", "answer"}
        assert row["solution"].endswith(f"The answer is \\boxed{{{row['answer']}}}.")
        assert row["problem"].endswith(("?", "."))
    math = generate("math", 50, seed=1)
    assert all(r["text"].count("\\boxed{") >= 2 for r in math)
    text = generate("text", 200, seed=1)
    assert sum("\\boxed{" in r["text"] for r in text) > 50  # worked problems inside the pretraining mix
    assert any(r["text"].startswith("Count ") or " Count " in r["text"] for r in text)
    with pytest.raises(ConfigError):
        generate("poems", 3, 0)


def test_vocabulary_is_small(synth, tok):
    """Few distinct words, so a 512-entry BPE keeps most words whole (what lets a tiny model learn it)."""
    rows = [json.loads(line) for line in open(synth.jsonl)]
    words = {w for r in rows for w in re.findall(r"[A-Za-z]+", r["text"])}
    assert len(words) < 160, len(words)  # measured: 136 distinct words
    chars = sum(len(r["text"]) for r in rows)
    tokens = sum(len(tok(r["text"]).input_ids) for r in rows)
    assert chars / tokens > 2.5  # measured: 2.95 characters per token (3.1 on the 2000-document default)


def test_ensure_synthetic_builds_once_and_reads_back(synth, tok):
    root = Path(synth.prefix).parent
    assert root.name == f"synthetic-text-n{SYNTH_DOCS}-s{SYNTH_SEED}-v512"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and manifest["documents"] == SYNTH_DOCS
    rows = [json.loads(line) for line in open(synth.jsonl)]
    assert rows == generate("text", SYNTH_DOCS, SYNTH_SEED)
    ds = IndexedDataset(synth.prefix)
    assert len(ds) == SYNTH_DOCS and manifest["tokens"] == int(ds.sequence_lengths.sum())
    for i in (0, 57, SYNTH_DOCS - 1):
        assert tok.decode(ds[i].tolist()) == rows[i]["text"] + "</s>"
    assert len(tok) <= 512 and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    # Idempotent: the second call reuses the directory without touching it.
    stamp = os.stat(synth.prefix + ".bin").st_mtime_ns
    again = ensure_synthetic(root.parent, SYNTH_DOCS, SYNTH_SEED, vocab_size=512)
    assert again == synth and os.stat(synth.prefix + ".bin").st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]


def test_same_seed_same_bytes_and_half_built_dir_is_not_used(tmp_path, synth):
    # A directory left by an interrupted build (no manifest) must be rebuilt, not used.
    root = tmp_path / Path(synth.prefix).parent.name
    root.mkdir()
    (root / "corpus.bin").write_bytes(b"garbage")
    (root / "corpus.idx").write_bytes(b"garbage")
    fresh = ensure_synthetic(tmp_path, SYNTH_DOCS, SYNTH_SEED, vocab_size=512)
    assert Path(fresh.prefix).parent == root and (root / "manifest.json").exists()
    for name in ("corpus.bin", "corpus.idx", "corpus.jsonl", "tokenizer/tokenizer.json"):
        assert (root / name).read_bytes() == (Path(synth.prefix).parent / name).read_bytes(), name


def test_math_corpus_reuses_the_pretraining_tokenizer(tmp_path, synth, tok):
    math = ensure_synthetic(tmp_path, 20, 1, kind="math", tokenizer_dir=synth.tokenizer_dir)
    shared = [Path(d, "tokenizer.json").read_bytes() for d in (math.tokenizer_dir, synth.tokenizer_dir)]
    assert shared[0] == shared[1]
    ds = IndexedDataset(math.prefix)
    assert tok.decode(ds[0].tolist()) == generate("math", 20, 1)[0]["text"] + "</s>"


def test_tokenizer_round_trip_is_exact(tok):
    for text in TRICKY + [r["text"] for r in generate("math", 5, 0)]:
        assert tok.decode(tok(text).input_ids) == text
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok("hello").input_ids[0] != tok.bos_token_id  # no template: plain text ids, as prepare expects


def test_train_tokenizer_checks_vocab_size(tmp_path):
    with pytest.raises(ConfigError) as err:
        train_tokenizer(["abc"], tmp_path / "t", vocab_size=100)
    assert err.value.key == "vocab_size"
    assert not (tmp_path / "t").exists()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_autotokenizer_loads_offline_in_a_fresh_process(synth, tok):
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps([t.eos_token_id, t.bos_token_id, t.pad_token_id, len(t), t(sys.argv[2]).input_ids,\n"
        "                  type(t).__name__, sorted(t.get_vocab().items()), t.special_tokens_map,\n"
        "                  t.decode(t(sys.argv[2]).input_ids + [2], skip_special_tokens=True)]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    text = "Mia has 8 cups. The answer is \\boxed{8}."
    res = subprocess.run([sys.executable, "-c", code, synth.tokenizer_dir, text], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    eos, bos, pad, n, ids, cls, vocab, specials, decoded = json.loads(res.stdout.strip().splitlines()[-1])
    assert (eos, bos, pad, n) == (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, len(tok)) == (2, 1, 3, len(tok))
    assert ids == tok(text).input_ids
    # load_tokenizer reads our tokenizer with the class AutoTokenizer picks, without AutoTokenizer: the same tokenizer
    assert cls == type(tok).__name__ and vocab == [list(kv) for kv in sorted(tok.get_vocab().items())]
    assert specials == tok.special_tokens_map and decoded == tok.decode(ids + [2], skip_special_tokens=True) == text
    cfg = json.loads(Path(synth.tokenizer_dir, "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["clean_up_tokenization_spaces"] is False
