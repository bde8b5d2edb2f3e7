"""`evolm prepare-sft`: the consistency filter on a labelled set (right answers in other surface forms, wrong,
missing) through the shared checker, dedup, cutoff, the manifest, the disjoint SFT/RL split (every EvoLM allocation
preset; same seed => same split), the on-disk format and the microbatch collation; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data.sft import SFTDataset, collate
from evolm_nemo.data.sft_prepare import ALLOCATIONS, PrepareSFTConfig, parse_allocation, prepare_sft, question_key, \
    split_pool
from tests.conftest import one_line_error, run_evolm, tree_bytes, unwritable_dir
from tests.conversion._sources import make_tokenizer

# (id, question, response, reference, kept by the strict consistency filter?)
LABELLED = [
    ("same", "What is 6 * 7?", "6 * 7 = 42. The answer is \\boxed{42}.", "42", True),
    ("thousands", "What is 1000 + 200?", "The total is \\boxed{1,200}.", "1200", True),
    ("fraction", "Half of one?", "It is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("decimal", "Three quarters?", "So the answer is \\boxed{0.75}.", "\\frac{3}{4}", True),
    ("dollars", "How much money?", "He has $18 left. The answer is $18.", "18", True),
    ("clause", "How many apples?", "The answer is 56, as we know from the given information.", "56", True),
    ("gsm8k_ref", "How many pens?", "He buys 3 more. The answer is \\boxed{9}.", "6 + 3 = 9\n#### 9", True),
    ("wrong", "What is 3 + 4?", "3 + 4 = 8. The answer is \\boxed{8}.", "7", False),
    ("wrong_tuple", "Point?", "The answer is \\boxed{(2, 3)}.", "(3, 2)", False),
    ("no_answer", "What is big?", "I think it is quite big.", "5", False),
    ("empty_box", "What is 1 + 1?", "The answer is \\boxed{}.", "2", False),
    ("sqrt_quirk", "Simplify it.", "The answer is \\boxed{6\\sqrt{8}}.", "6\\sqrt{7}", False),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, tok_dir, inp, **kw) -> PrepareSFTConfig:
    return PrepareSFTConfig(input=str(inp), output=str(tmp_path / kw.pop("name", "out")), tokenizer=str(tok_dir),
                            progress=False, **kw)


def test_consistency_filter_on_a_labelled_set(tmp_path, tok_dir):
    rows = [{"id": i, "question": q, "answer": a, "gold": ref} for i, q, a, ref, _ in LABELLED]
    rows += [{"id": "missing", "question": "No response?", "gold": "1"}, {"id": "blank", "question": " ",
                                                                            "answer": "x", "gold": "1"}]
    inp = _write(tmp_path / "in.jsonl", rows)
    manifest = prepare_sft(_cfg(tmp_path, tok_dir, inp, reference_key="gold", id_key="id", allocation="5/2",
                                rl_output=str(tmp_path / "rl.jsonl"), seed=3))
    keep = [i for i, *_, ok in LABELLED if ok]
    c = manifest["counts"]
    assert c["read"] == len(rows) and c["missing"] == 2
    assert c["filtered"] == len(LABELLED) - len(keep)
    assert manifest["split"]["sft"] + manifest["split"]["rl"] + c["not_allocated"] == len(keep)
    rl = [json.loads(line) for line in (tmp_path / "rl.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rl} <= set(keep) and len(rl) == 2
    assert all(r["prompt"].startswith("Human: ") and r["prompt"].endswith("\nAssistant:") for r in rl)
    gsm = [r for r in rl if r["id"] == "gsm8k_ref"]
    assert not gsm or gsm[0]["gold_answer"] == "9"  # a worked reference is reduced to its final answer
    assert manifest["examples"] == 5 and SFTDataset(tmp_path / "out").manifest["content_sha256"]

    # scoring=evolm is the reference evaluator, quirks included: it takes 6\sqrt{8} for 6\sqrt{7}
    loose = prepare_sft(_cfg(tmp_path, tok_dir, inp, name="evolm", reference_key="gold", scoring="evolm"))
    assert loose["counts"]["filtered"] == c["filtered"] - 1


def test_dedup_agreement_and_cutoff(tmp_path, tok_dir):
    rows = [
        {"question": "What is 2 + 2?", "answer": "\\boxed{4}"},
        {"question": "what is  2 + 2?", "answer": "It is \\boxed{4}."},  # same question after normalisation
        {"question": "What is 2 + 2?", "answer": "\\boxed{5}"},
        {"question": "What is 9 - 1?", "answer": "\\boxed{8}"},
        {"question": "What is 9 - 1?", "answer": "\\boxed{7}"},
        {"question": "Long one?", "answer": "word " * 400 + "\\boxed{1}"},
    ]
    inp = _write(tmp_path / "in.jsonl", rows)
    # no reference: responses are compared with each other; agree_k=2 keeps questions whose largest group has 2
    m = prepare_sft(_cfg(tmp_path, tok_dir, inp, agree_k=2, cutoff=64, overlength="drop"))
    assert m["counts"]["disagreement"] == 2  # "9 - 1": 1 agreeing response each; "Long one?": 1
    assert m["counts"]["duplicates"] == 1 and m["examples"] == 1
    m2 = prepare_sft(_cfg(tmp_path, tok_dir, inp, name="t", filter=False, cutoff=64))
    assert m2["counts"]["duplicates"] == 3 and m2["counts"]["truncated"] == 1
    ds = SFTDataset(tmp_path / "t")
    assert int(ds.length.max()) == 64 and len(ds) == 3


def test_split_is_disjoint_and_deterministic_for_every_preset():
    keys = [f"question {i}" for i in range(100_000)]
    for name, (n_sft, n_rl) in ALLOCATIONS.items():
        sft, rl = split_pool(keys, n_sft, n_rl, seed=7)
        assert len(sft) == n_sft and len(rl) == n_rl and not set(sft) & set(rl), name
        assert (sft, rl) == split_pool(keys, n_sft, n_rl, seed=7)
        assert parse_allocation(name) == (n_sft, n_rl) and parse_allocation(name.lower()) == (n_sft, n_rl)
    other, _ = split_pool(keys, 10_000, 90_000, seed=8)
    assert other != split_pool(keys, 10_000, 90_000, seed=7)[0]
    assert parse_allocation("3000/7000") == (3000, 7000) and parse_allocation("1.5K/0") == (1500, 0)
    for bad in ("30K", "a/b", "0/10", "1.5/2"):
        with pytest.raises(ConfigError):
            parse_allocation(bad)
    with pytest.raises(ConfigError, match="the pool has 10"):
        split_pool(keys[:10], 8, 8, seed=0)


def test_split_through_the_command(tmp_path, tok_dir):
    rows = [{"q": f"Q{i}: what is {i} + 1?", "r": f"\\boxed{{{i + 1}}}", "gold": str(i + 1)} for i in range(40)]
    rows += [{"q": "q0: what is 0 + 1?", "r": "\\boxed{1}", "gold": "1"}]  # a duplicate of Q0
    inp = _write(tmp_path / "in.jsonl", rows)
    common = [f"input={inp}", f"tokenizer={tok_dir}", "question_key=q", "answer_key=r", "reference_key=gold",
              "allocation=10/25", "progress=false"]
    first = run_evolm("prepare-sft", [*common, f"output={tmp_path / 'a'}", f"rl_output={tmp_path / 'a.jsonl'}"])
    assert "duplicates 1" in first.stdout and "RL 25" in first.stdout
    run_evolm("prepare-sft", [*common, f"output={tmp_path / 'b'}", f"rl_output={tmp_path / 'b.jsonl'}"])
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert a["split"]["sft_questions_sha256"] == b["split"]["sft_questions_sha256"]
    assert a["content_sha256"] == b["content_sha256"]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rl_keys = {question_key(r["prompt"][len("Human: "):-len("\nAssistant:")])
               for r in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())}
    ds = SFTDataset(tmp_path / "a")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    sft_keys = set()
    for i in range(len(ds)):
        prompt = tok.decode(ds.ids(i)[: ds.prompt_len[i]].tolist())
        sft_keys.add(question_key(prompt[len("Human: "):-len("\nAssistant:")]))
    assert len(sft_keys) == 10 and len(rl_keys) == 25 and not sft_keys & rl_keys


def test_rl_side_takes_only_questions_with_a_gold_answer(tmp_path, tok_dir, capsys):
    """filter=false keeps rows without a reference; allocated to RL they would be prompts with a null gold_answer,
    which the RL stage refuses: they are left out (and counted); the RL set is what `stage=ppo|grpo` reads."""
    from evolm_nemo.rl.data import read_prompts

    rows = [{"q": f"Q{i}: what is {i} + 1?", "r": f"\\boxed{{{i + 1}}}", "gold": str(i + 1) if i % 2 else None}
            for i in range(40)]
    inp = _write(tmp_path / "in.jsonl", rows)
    proc = run_evolm("prepare-sft", [f"input={inp}", f"tokenizer={tok_dir}", "question_key=q", "answer_key=r",
                                     "reference_key=gold", "filter=false", "allocation=10/30", "progress=false",
                                     f"output={tmp_path / 'a'}", f"rl_output={tmp_path / 'a.jsonl'}"])
    rl = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    left_out = 30 - len(rl)
    assert rl and left_out > 0 and all(r["gold_answer"] for r in rl)
    assert f"RL {len(rl)}" in proc.stdout and f"RL without a reference (left out) {left_out}" in proc.stdout
    assert len(read_prompts([str(tmp_path / "a.jsonl")], "data.paths")) == len(rl)
    # ids from id_key that repeat on different questions would make a set the RL stage refuses: refused here
    from tests.conftest import refused_in_process

    shared = _write(tmp_path / "ids.jsonl", [{**row, "id": i // 4} for i, row in enumerate(rows)])
    err = refused_in_process(capsys, "prepare-sft", [
        f"input={shared}", f"tokenizer={tok_dir}", "question_key=q", "answer_key=r", "reference_key=gold", "id_key=id",
        "filter=false", "allocation=10/30", "progress=false", f"output={tmp_path / 'b'}",
        f"rl_output={tmp_path / 'b.jsonl'}"], "id_key")
    assert err.startswith("error: id_key: id=") and "names two questions allocated to RL" in err, err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.jsonl").exists()


@pytest.mark.parametrize("extra,key", [
    ([], "reference_key"),  # filter=true needs a reference (or agree_k)
    (["filter=false", "allocation=10/10", "dedup=false", "rl_output=x.jsonl", "reference_key=answer"], "dedup"),
    (["filter=false", "question_key=prompt"], "question_key"),
    (["filter=false", "scoring=loose"], "scoring"),
    (["filter=false", "allocation=10/10"], "rl_output"),
    (["filter=false", "prompt_template=Q:"], "prompt_template"),
    (["filter=false", "cutoff=1"], "cutoff"),
])
def test_bad_input_is_one_line(tmp_path, tok_dir, capsys, extra, key):
    from tests.conftest import refused_in_process

    inp = _write(tmp_path / "in.jsonl", [{"question": "q?", "answer": "a"}])
    refused_in_process(capsys, "prepare-sft", [f"input={inp}", f"output={tmp_path / 'out'}", f"tokenizer={tok_dir}",
                                               "progress=false", *extra], key)
    assert not (tmp_path / "out").exists()


def test_an_rl_output_naming_a_directory_is_one_line(tmp_path, tok_dir, capsys):
    """``rl_output=rl/`` (a directory, not there yet) wrote the RL rows to a file called ``rl``
    (fileio.check_dst_file: a path ending in "/" is no file)."""
    from tests.conftest import refused_in_process

    rows = [{"question": f"What is {i} + 1?", "answer": f"\\boxed{{{i + 1}}}", "gold": str(i + 1)} for i in range(4)]
    inp = _write(tmp_path / "in.jsonl", rows)
    err = refused_in_process(capsys, "prepare-sft", [
        f"input={inp}", f"output={tmp_path / 'out'}", f"tokenizer={tok_dir}", "reference_key=gold", "allocation=2/2",
        f"rl_output={tmp_path / 'rl'}/", "progress=false"], "rl_output")
    assert "names a directory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_existing_output_is_never_replaced_without_overwrite(tmp_path, tok_dir):
    inp = _write(tmp_path / "in.jsonl", [{"question": "q?", "answer": "a"}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="already exists; pass overwrite=true"):
        prepare_sft(_cfg(tmp_path, tok_dir, inp, name="empty", filter=False))
    with pytest.raises(ConfigError, match="is a directory of other files"):
        prepare_sft(_cfg(tmp_path, tok_dir, inp, filter=False))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep"
    with pytest.raises(ConfigError, match="overlaps the source"):
        prepare_sft(_cfg(tmp_path, tok_dir, inp, name=".", filter=False, overwrite=True))
    # overwrite replaces only what prepare-sft made (issue 19 item 4): not a directory of other files
    with pytest.raises(ConfigError, match="is a directory of other files, not an SFT dataset"):
        prepare_sft(_cfg(tmp_path, tok_dir, inp, filter=False, overwrite=True))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep"
    prepare_sft(_cfg(tmp_path, tok_dir, inp, name="ds", filter=False))
    _write(inp, [{"question": "q?", "answer": "a"}, {"question": "r?", "answer": "b"}])
    prepare_sft(_cfg(tmp_path, tok_dir, inp, name="ds", filter=False, overwrite=True))  # a dataset by a dataset
    assert SFTDataset(tmp_path / "ds").manifest["examples"] == 2
    assert not list(tmp_path.glob(".out.tmp-*")) and not list(tmp_path.glob(".ds.tmp-*"))


def test_an_overwrite_that_fails_at_its_commit_keeps_the_old_dataset_and_rl_set(tmp_path, tok_dir, monkeypatch):
    """overwrite=true swaps the new dataset in only once it is whole: when putting it in place fails (here the
    rename itself refuses), the old dataset and its RL set are still there, unchanged (the old one was removed
    first, so both were lost)."""
    import errno

    from evolm_nemo.data import sft

    rows = [{"q": f"Q{i}: what is {i} + 1?", "r": f"\\boxed{{{i + 1}}}", "gold": str(i + 1)} for i in range(20)]
    inp = _write(tmp_path / "in.jsonl", rows)
    kw = dict(question_key="q", answer_key="r", reference_key="gold", allocation="5/10",
              rl_output=str(tmp_path / "rl.jsonl"))
    prepare_sft(_cfg(tmp_path, tok_dir, inp, name="ds", **kw))
    before = tree_bytes(tmp_path / "ds"), (tmp_path / "rl.jsonl").read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(sft, "replace_dir", refuse)
    _write(inp, rows[:15])
    with pytest.raises(ConfigError):
        prepare_sft(_cfg(tmp_path, tok_dir, inp, name="ds", overwrite=True, **{**kw, "allocation": "5/5"}))
    assert (tree_bytes(tmp_path / "ds"), (tmp_path / "rl.jsonl").read_bytes()) == before
    assert not list(tmp_path.glob(".ds.tmp-*"))


def test_a_damaged_dataset_is_refused(tmp_path, tok_dir):
    inp = _write(tmp_path / "in.jsonl", [{"question": "q?", "answer": "a b c"}])
    prepare_sft(_cfg(tmp_path, tok_dir, inp, filter=False))
    tokens = tmp_path / "out" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="does not match its manifest"):
        SFTDataset(tmp_path / "out")
    with pytest.raises(ConfigError, match="not an SFT dataset"):
        SFTDataset(tmp_path)


@pytest.mark.parametrize("damage", ["1d", "float", "past_end", "prompt_too_long", "no_answer"])
def test_a_damaged_index_is_one_line(tmp_path, tok_dir, damage):
    """index.npy of another shape was an IndexError traceback (before the content hash could say anything); entries
    reaching outside tokens.bin are refused too, also in a dataset without a content hash, and an example with no
    answer token (all prompt: it trained on nothing, and a global batch of such was logged as loss 0.0)."""
    inp = _write(tmp_path / "in.jsonl", [{"question": f"q{i}?", "answer": "a b c"} for i in range(3)])
    prepare_sft(_cfg(tmp_path, tok_dir, inp, filter=False))
    path = tmp_path / "out" / "index.npy"
    index = np.load(path)
    if damage == "1d":
        index = index[:, 2].copy()
    elif damage == "float":
        index = index.astype(np.float64)
    elif damage == "past_end":
        index[-1, 0] += 1
    elif damage == "no_answer":
        index[0, 1] = index[0, 2]
    else:
        index[0, 1] = index[0, 2] + 1
    np.save(path, index)
    with pytest.raises(ConfigError) as err:
        SFTDataset(tmp_path / "out")
    assert err.value.key == "data.paths" and str(path) in err.value.message


@pytest.mark.parametrize("field,value", [("dtype", "float99"), ("dtype", "float32"), ("dtype", None),
                                         ("tokenizer", None), ("tokenizer", {"size": 400}), ("tokens", "12"),
                                         ("examples", -1), ("content_sha256", 7)])
def test_a_damaged_manifest_field_is_one_line_naming_the_file_and_field(tmp_path, tok_dir, capsys, field, value):
    """A manifest.json whose field a reader uses has the wrong type (was: a TypeError traceback for dtype "float99"
    or tokenizer null) is refused naming the manifest file and the field, for SFT and RM datasets alike."""
    inp = _write(tmp_path / "in.jsonl", [{"question": "q?", "answer": "a b c"}])
    prepare_sft(_cfg(tmp_path, tok_dir, inp, filter=False))
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as err:
        SFTDataset(tmp_path / "out", key="data.paths")
    assert err.value.key == "data.paths" and err.value.message.startswith(f"{path}: field '{field}': expected ")


def test_a_dataset_is_verified_once_beside_it_or_in_the_cache(tmp_path, tok_dir):
    """At first use a dataset is hashed against its manifest's content_sha256 and the verification recorded beside
    it (``.verified``); where that cannot be written (here: ``.verified`` is a directory), under the cache dir. Later
    uses read the record instead of hashing; a same-size bit flip (a new mtime) is hashed again and refused."""
    inp = _write(tmp_path / "in.jsonl", [{"question": f"q{i}?", "answer": "a b c"} for i in range(4)])
    prepare_sft(_cfg(tmp_path, tok_dir, inp, filter=False))
    out, cache = tmp_path / "out", tmp_path / "cache"
    SFTDataset(out, vocab_size=512, cache_dir=cache)
    record = json.loads((out / ".verified").read_text())
    assert record["expected"] == record["measured"]["sha256"] == SFTDataset(out).manifest["content_sha256"]
    assert not cache.exists()
    (out / ".verified").unlink()
    (out / ".verified").mkdir()  # cannot be replaced: the record goes to the cache
    SFTDataset(out, vocab_size=512, cache_dir=cache)
    [held] = list((cache / "verified").glob("*.json"))
    stamp = held.stat().st_mtime_ns
    SFTDataset(out, vocab_size=512, cache_dir=cache)
    assert held.stat().st_mtime_ns == stamp and not list(out.glob(".verified.tmp-*"))
    with pytest.raises(ConfigError, match="token id .* >= model.vocab_size=5;"):
        SFTDataset(out, vocab_size=5, cache_dir=cache)
    tokens = out / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[0] ^= 0x01
    tokens.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"its content \(tokens.bin, index.npy\) does not match"):
        SFTDataset(out, vocab_size=512, cache_dir=cache)


def test_collate_masks_prompt_and_padding():
    a, b = (np.array([5, 6, 7, 8, 9]), 2), (np.array([10, 11, 12]), 1)
    batch = collate([a, b], seq=6, pad_id=0)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 0, 0], [10, 11, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8, 9, 0, 0], [11, 12, 0, 0, 0, 0]]
    # position t predicts labels[t]; the answer of `a` is ids[2:] = 7, 8, 9 -> positions 1, 2, 3
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(6))] * 2
    with pytest.raises(ValueError):
        collate([a], seq=3, pad_id=0)


def test_parquet_and_a_local_hf_dataset_dir(tmp_path, tok_dir):
    """The same rows from a Parquet file and from a local dataset directory (the hub path: datasets.load_dataset)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"What is {i} + {i}?", "solution": f"It is \\boxed{{{2 * i}}}.", "gold": str(2 * i)}
            for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    hub = tmp_path / "hub_dataset"
    hub.mkdir()
    _write(hub / "train.jsonl", rows)
    got = []
    for name, inp in (("pq", tmp_path / "rows.parquet"), ("hub", hub)):
        m = prepare_sft(_cfg(tmp_path, tok_dir, inp, name=name, question_key="problem", answer_key="solution",
                             reference_key="gold"))
        assert m["examples"] == 6 and m["counts"]["filtered"] == 0
        got.append(m["content_sha256"])
    assert got[0] == got[1]
    with pytest.raises(ConfigError, match="no column 'question'"):
        prepare_sft(_cfg(tmp_path, tok_dir, tmp_path / "rows.parquet", name="bad", reference_key="gold"))


def test_filter_verdicts_do_not_depend_on_workers(tmp_path, tok_dir, monkeypatch):
    from evolm_nemo.data import sft_prepare

    monkeypatch.setattr(sft_prepare, "PARALLEL_MIN_ROWS", 1)
    rows = [{"id": i, "question": f"{q} ({k})", "answer": a, "gold": ref}
            for k in range(3) for i, q, a, ref, _ in LABELLED]
    inp = _write(tmp_path / "in.jsonl", rows)
    one = prepare_sft(_cfg(tmp_path, tok_dir, inp, name="w1", reference_key="gold", workers=1))
    two = prepare_sft(_cfg(tmp_path, tok_dir, inp, name="w2", reference_key="gold", workers=2))
    assert one["content_sha256"] == two["content_sha256"] and one["counts"] == two["counts"]
    assert one["examples"] == 3 * sum(ok for *_, ok in LABELLED)


# -------------------------------------------------------------------------------------- issue 19 items 3-5


def _one_line(proc, key: str, *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("how", ["same_name", "symlink", "hard_link"])
def test_rl_output_is_never_the_input(tmp_path, tok_dir, how):
    """`prepare-sft ... rl_output=<the input> overwrite=true` used to replace the input with the RL rows: no output
    of a command may be one of its inputs (also under another name). One line; the input's bytes unchanged, nothing
    written."""
    import os

    rows = [{"q": f"What is {i} + 1?", "r": f"\\\\boxed{{{i + 1}}}", "gold": str(i + 1)} for i in range(12)]
    inp = _write(tmp_path / "in.jsonl", rows)
    rl = {"same_name": inp, "symlink": tmp_path / "link.jsonl", "hard_link": tmp_path / "hard.jsonl"}[how]
    if how == "symlink":
        os.symlink(inp, rl)
    elif how == "hard_link":
        os.link(inp, rl)
    before = tree_bytes(inp)
    proc = run_evolm("prepare-sft", [f"input={inp}", f"output={tmp_path / 'out'}", f"tokenizer={tok_dir}",
                                     "question_key=q", "answer_key=r", "reference_key=gold", "allocation=4/4",
                                     f"rl_output={rl}", "overwrite=true", "progress=false"], check=False)
    _one_line(proc, "rl_output", "the input", "which this command reads")
    assert tree_bytes(inp) == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))


def _rm_input(tmp_path):
    return _write(tmp_path / "labelled.jsonl", [{"prompt": f"What is {i}?", "response": r, "label": label}
                                                for i in range(4) for r, label in (("yes", 1), ("no", 0))])


def test_dataset_commands_never_overwrite_a_training_run(a_run, tmp_path, tok_dir):
    """`prepare-sft` / `prepare-rm` with output=<a run directory> overwrite=true used to delete its checkpoints and
    metrics: overwrite replaces only what the same command made. One line naming `output`; the run's every byte
    unchanged. And a dataset of one kind is not replaced by the other command either."""
    before = tree_bytes(a_run)
    inp = _write(tmp_path / "in.jsonl", [{"question": "q?", "answer": "a"}])
    sft = ["prepare-sft", [f"input={inp}", f"tokenizer={tok_dir}", "filter=false", "progress=false"]]
    rm = ["prepare-rm", [f"input={_rm_input(tmp_path)}", f"tokenizer={tok_dir}", "progress=false"]]
    for command, args in (sft, rm):
        proc = run_evolm(command, [*args, f"output={a_run}", "overwrite=true"], check=False)
        _one_line(proc, "output", f"{a_run} is a training run's directory", "replaces only an output of the same")
        assert tree_bytes(a_run) == before
        assert not list(a_run.parent.glob(".run.*"))  # no temp dir, no lock file left
    # an SFT dataset is not an RM dataset's overwrite target, nor the other way round
    run_evolm(sft[0], [*sft[1], f"output={tmp_path / 'sft'}"])
    run_evolm(rm[0], [*rm[1], f"output={tmp_path / 'rm'}"])
    sums = tree_bytes(tmp_path / "sft"), tree_bytes(tmp_path / "rm")
    _one_line(run_evolm(sft[0], [*sft[1], f"output={tmp_path / 'rm'}", "overwrite=true"], check=False), "output",
              "is an RM dataset (made by evolm prepare-rm), not an SFT dataset")
    _one_line(run_evolm(rm[0], [*rm[1], f"output={tmp_path / 'sft'}", "overwrite=true"], check=False), "output",
              "is an SFT dataset (made by evolm prepare-sft), not an RM dataset")
    assert (tree_bytes(tmp_path / "sft"), tree_bytes(tmp_path / "rm")) == sums
    # ... while each replaces its own kind
    run_evolm(rm[0], [*rm[1], f"output={tmp_path / 'rm'}", "overwrite=true", "seed=7"])


@pytest.mark.parametrize("command", ["prepare-sft", "prepare-rm"])
def test_two_writers_of_one_output_the_second_is_refused(tmp_path, tok_dir, command):
    """Two concurrent `prepare-sft` into one output used to both exit 0, one's work silently lost (the second even
    printed the first one's summary): the output is locked like a run directory. The first is stopped (SIGSTOP) as
    soon as it holds the lock; the second refuses in one line naming `output` and the first's pid; the first then
    finishes with its own dataset, and leaves no lock file or temporary directory."""
    import signal
    import subprocess
    import time

    from tests.conftest import evolm_cmd, subprocess_env
    from evolm_nemo.fileio import lock_path

    out = tmp_path / "out"
    if command == "prepare-sft":
        inp = _write(tmp_path / "in.jsonl", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(50)])
        args = [f"input={inp}", f"tokenizer={tok_dir}", "filter=false", "progress=false"]
    else:
        args = [f"input={_rm_input(tmp_path)}", f"tokenizer={tok_dir}", "progress=false"]
    first = subprocess.Popen(evolm_cmd(command, [*args, f"output={out}"]), env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = lock_path(out)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (
                lock.is_file() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first writer ended before it could be stopped"
        second = run_evolm(command, [*args, f"output={out}", "overwrite=true"], check=False)
        _one_line(second, "output", f"{out} is being written by another command (pid {first.pid})")
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert str(out) in stdout and out.joinpath("manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # once the first is done, the same command replaces it as usual (overwrite) or refuses (without)
    _one_line(run_evolm(command, [*args, f"output={out}"], check=False), "output", "already exists")


# ---------------------------------------------------------------------------------------- faults (issue 19)


@pytest.mark.parametrize("command", ["prepare-sft", "prepare-rm"])
def test_a_read_only_output_is_one_line_before_any_work(tmp_path, tok_dir, command):
    rows = [{"question": "q?", "answer": "a", "prompt": "q?", "response": " a", "label": 1}]
    inp = _write(tmp_path / "in.jsonl", rows)
    out = unwritable_dir(tmp_path) / "sub" / "out"
    extra = ["filter=false"] if command == "prepare-sft" else []
    proc = run_evolm(command, [f"input={inp}", f"output={out}", f"tokenizer={tok_dir}", "progress=false", *extra],
                     check=False)
    line = one_line_error(proc, "output")
    assert f"cannot write {out}" in line and "not writable" in line


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tok_dir, small_disk):
    """ENOSPC for real (a 64 KiB tmpfs) while tokens.bin is written: the first error is the one said (closing the
    file again in abort used to raise a second ENOSPC over it), and no `.out.tmp-*` is left filling the disk."""
    rows = [{"question": f"question {i}?", "answer": " ".join(["word"] * 60) + f" {i}"} for i in range(2000)]
    inp = _write(tmp_path / "in.jsonl", rows)
    before = inp.read_bytes()
    disk = small_disk.mount("64k")
    proc = run_evolm("prepare-sft", [f"input={inp}", f"output={disk / 'sft'}", f"tokenizer={tok_dir}",
                                     "filter=false", "progress=false"], check=False)
    line = one_line_error(proc, "output")
    assert f"cannot write {disk / 'sft'}: No space left on device" in line, line
    assert list(disk.iterdir()) == [] and inp.read_bytes() == before


def test_a_directory_input_that_is_not_one_table_is_one_line(tmp_path, tok_dir):
    src = tmp_path / "mixed"
    src.mkdir()
    _write(src / "a.jsonl", [{"question": "q?", "answer": "a"}])
    _write(src / "b.jsonl", [{"x": 1}])
    proc = run_evolm("prepare-sft", [f"input={src}", f"output={tmp_path / 'out'}", f"tokenizer={tok_dir}",
                                     "filter=false", "progress=false"], check=False)
    line = one_line_error(proc, "input")
    assert "do not share one set of columns" in line and "point input= at one file" in line, line
    assert not (tmp_path / "out").exists()


def test_a_killed_prepare_leaves_its_temp_dir_to_the_next_run(tmp_path, tok_dir):
    """SIGKILL while the dataset is written: its owned `.out.tmp-*` stays; the next prepare-sft into the same
    output removes it (its owner is dead), says so, and succeeds; a live writer's temp dir is left alone."""
    import os
    import signal
    import socket
    import subprocess
    import time

    from evolm_nemo.fileio import OWNER
    from tests.conftest import REPO, evolm_cmd, subprocess_env

    rows = [{"question": f"question {i}?", "answer": " ".join(["word"] * 40) + f" {i}"} for i in range(30000)]
    inp = _write(tmp_path / "in.jsonl", rows)
    args = [f"input={inp}", f"output={tmp_path / 'out'}", f"tokenizer={tok_dir}", "filter=false", "progress=false"]
    proc = subprocess.Popen(evolm_cmd("prepare-sft", args), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((p / OWNER).is_file() for p in tmp_path.glob(".out.tmp-*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare-sft finished before it could be killed"
    stale = list(tmp_path.glob(".out.tmp-*"))
    assert len(stale) == 1 and not (tmp_path / "out").exists()
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    (live / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n")

    small = _write(tmp_path / "small.jsonl", rows[:50])
    again = run_evolm("prepare-sft", [f"input={small}", *args[1:]])
    assert f"removed {stale[0]}, left by an earlier run that was killed" in again.stderr
    assert not stale[0].exists() and live.is_dir()
    assert SFTDataset(tmp_path / "out").manifest["examples"] == 50 and not (tmp_path / "out" / OWNER).exists()


def test_rl_output_never_replaces_another_commands_file(tmp_path, tok_dir, a_run):
    """`rl_output=<any file> overwrite=true` replaced it whatever it was -- a checkpoint's commit record, a run's
    metrics: overwrite replaces only an RL prompt JSONL, and nothing inside a run's own files or a checkpoint is
    ever written. One line each; the files' bytes unchanged, no dataset made."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(a_run, run)
    rows = [{"q": f"What is {i} + 1?", "r": f"\\\\boxed{{{i + 1}}}", "gold": str(i + 1)} for i in range(12)]
    inp = _write(tmp_path / "in.jsonl", rows)
    other = _write(tmp_path / "completions.jsonl", [{"suite": "gsm8k_platinum", "id": 1, "completions": ["x"]}])
    before = tree_bytes(tmp_path)
    common = [f"input={inp}", f"tokenizer={tok_dir}", "question_key=q", "answer_key=r", "reference_key=gold",
              "allocation=4/4", "overwrite=true", "progress=false"]
    meta = next((run / "checkpoints").glob("iter_*")) / "evolm.json"
    for target, fragment in ((meta, "lies inside an evolm checkpoint"), (run / "metrics.jsonl", "own metrics.jsonl"),
                             (other, "is not an RL prompt JSONL")):
        proc = run_evolm("prepare-sft", [*common, f"output={tmp_path / 'out'}", f"rl_output={target}"], check=False)
        _one_line(proc, "rl_output", fragment)
    assert tree_bytes(tmp_path) == before
    # an RL prompt JSONL it made before is replaced, and a new file beside the run's own is fine
    first = run_evolm("prepare-sft", [*common, f"output={tmp_path / 'a'}", f"rl_output={run / 'rl.jsonl'}"])
    assert first.returncode == 0 and len((run / "rl.jsonl").read_text().splitlines()) == 4
    run_evolm("prepare-sft", [*common, f"output={tmp_path / 'a'}", f"rl_output={run / 'rl.jsonl'}"])
