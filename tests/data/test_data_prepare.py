"""`evolm prepare`: JSONL / Parquet / HF dataset -> megatron .bin/.idx, read back with megatron's IndexedDataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from evolm_nemo.cli import main as cli_main
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data.prepare import prepare
from evolm_nemo.data.tokenizer import load_tokenizer

# Edge cases: unicode, emoji, runs of spaces, tabs, newlines, an empty document, a literal special-token string.
TEXTS = [
    "Tom has 3 apples. He gets 4 more. The answer is \\boxed{7}.",
    "  leading and trailing spaces  ",
    "naïve café — 東京 😀\n\ttabbed\r\nwindows line",
    "",
    "a literal </s> and <s> stay text",
    "x" * 500,
] + [f"Document number {i}: count {', '.join(map(str, range(i % 7 + 1)))}." for i in range(40)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_docs(prefix) -> list:
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def files(directory: Path) -> set:
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])


def test_jsonl_round_trip(tmp_path, corpus, tok):
    stats = prepare(corpus, tmp_path / "out" / "docs", tok, workers=1, chunk_size=7, progress=False)
    docs = read_docs(tmp_path / "out" / "docs")
    assert len(docs) == stats.documents == len(TEXTS)
    assert stats.tokens == sum(len(d) for d in docs)
    for text, ids in zip(TEXTS, docs):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]  # the literal "</s>" stays text
        assert tok.decode(ids) == text + "</s>"
    assert files(tmp_path / "out") == {"docs.bin", "docs.idx"}  # no temporaries left


def test_parquet_and_hf_dataset_give_the_same_bytes(tmp_path, corpus, tok):
    prepare(corpus, tmp_path / "j", tok, workers=1, progress=False)
    pq.write_table(pa.table({"body": TEXTS, "n": list(range(len(TEXTS)))}), tmp_path / "docs.parquet", row_group_size=9)
    prepare(tmp_path / "docs.parquet", tmp_path / "p", tok, text_key="body", workers=1, progress=False)
    # A directory is read through datasets.load_dataset (the path a hub name takes), streamed, offline.
    (tmp_path / "hfds").mkdir()
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "hfds" / "train-00000.parquet")
    prepare(tmp_path / "hfds", tmp_path / "h", tok, text_key="body", split="train", workers=1, progress=False)
    for ext in (".bin", ".idx"):
        ref = (tmp_path / f"j{ext}").read_bytes()
        assert (tmp_path / f"p{ext}").read_bytes() == ref
        assert (tmp_path / f"h{ext}").read_bytes() == ref


def test_two_workers_write_identical_bytes(tmp_path, corpus, tok):
    prepare(corpus, tmp_path / "w1", tok, workers=1, chunk_size=4, progress=False)
    prepare(corpus, tmp_path / "w2", tok, workers=2, chunk_size=4, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_limit_and_no_eos(tmp_path, corpus, tok):
    stats = prepare(corpus, tmp_path / "l", tok, workers=1, limit=3, append_eos=False, progress=False)
    docs = read_docs(tmp_path / "l")
    assert stats.documents == len(docs) == 3
    assert [tok.decode(d) for d in docs] == TEXTS[:3]


def test_missing_file_writes_nothing(tmp_path, tok):
    with pytest.raises(ConfigError) as err:
        prepare(tmp_path / "nope.jsonl", tmp_path / "out" / "x", tok, progress=False)
    assert err.value.key == "input" and "nope.jsonl" in err.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_text_field_names_field_and_line(tmp_path, tok, workers):
    rows = [{"text": f"doc {i}"} for i in range(30)]
    rows[20] = {"body": "no text here", "id": 20}
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as err:  # line 21 is found after workers have encoded earlier chunks
        prepare(src, tmp_path / "bad", tok, workers=workers, chunk_size=2, progress=False)
    assert err.value.key == "text_key"
    assert "'text'" in err.value.message and "line 21" in err.value.message and "body" in err.value.message
    assert files(tmp_path) == {"bad.jsonl"}


def test_bad_rows_and_columns(tmp_path, tok):
    src = write_jsonl(tmp_path / "null.jsonl", [{"text": "ok"}, {"text": None}])
    with pytest.raises(ConfigError, match="line 2 is NoneType"):
        prepare(src, tmp_path / "o", tok, progress=False)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ConfigError, match="line 2: invalid JSON"):
        prepare(tmp_path / "broken.jsonl", tmp_path / "o", tok, progress=False)
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "c.parquet")
    with pytest.raises(ConfigError, match="no column 'text'.*content"):
        prepare(tmp_path / "c.parquet", tmp_path / "o", tok, progress=False)
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())


def test_a_json_array_file_is_named_as_such(tmp_path, tok):
    """A .json holding one JSON array (Alpaca / LLaMA-Factory SFT files) was "line 1: invalid JSON (Expecting
    value)" -- of a valid JSON file. prepare-sft and prepare-rm read rows through the same open_rows."""
    from evolm_nemo.data.prepare import open_rows

    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"text": "a", "question": "q", "answer": "a"}], indent=2))
    with pytest.raises(ConfigError, match=r"alpaca.json line 1: starts a JSON array; this command reads JSON lines"):
        prepare(src, tmp_path / "o", tok, progress=False)
    with pytest.raises(ConfigError, match=r"jq -c '\.\[\]' alpaca.json > rows.jsonl"):
        list(open_rows(src)[0])
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())


def test_unreadable_tokenizer(tmp_path, corpus):
    (tmp_path / "emptytok").mkdir()
    for bad in (tmp_path / "no_such_tok", tmp_path / "emptytok"):
        with pytest.raises(ConfigError) as err:
            prepare(corpus, tmp_path / "o", str(bad), progress=False)
        assert err.value.key == "tokenizer" and str(bad) in err.value.message
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())


def test_failed_run_keeps_previous_output(tmp_path, corpus, tok):
    prepare(corpus, tmp_path / "d", tok, progress=False)
    before = {ext: (tmp_path / f"d{ext}").read_bytes() for ext in (".bin", ".idx")}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 5 + [{"txt": "oops"}])
    with pytest.raises(ConfigError):
        prepare(bad, tmp_path / "d", tok, chunk_size=2, progress=False)
    assert {ext: (tmp_path / f"d{ext}").read_bytes() for ext in (".bin", ".idx")} == before
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_cli_in_process(tmp_path, corpus, synth, capsys):
    out = tmp_path / "cli" / "docs"
    rc = cli_main(["prepare", f"input={corpus}", f"output={out}", f"tokenizer={synth.tokenizer_dir}", "workers=1",
                   "progress=false"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"prepared {len(TEXTS)} documents, ") and " tokens -> " in last
    assert len(read_docs(out)) == len(TEXTS)
    # missing text field: exit 2, one line naming the key and the field, nothing written
    rc = cli_main(["prepare", f"input={corpus}", f"output={tmp_path / 'x' / 'y'}",
                   f"tokenizer={synth.tokenizer_dir}", "text_key=body"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: text_key: no field 'body'")
    assert not (tmp_path / "x").exists()
    rc = cli_main(["prepare", f"output={tmp_path / 'x' / 'y'}", f"tokenizer={synth.tokenizer_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [err[0]] and err[0].startswith("error: input: must be set")


def test_cli_never_replaces_an_output_without_overwrite_nor_mixes_layouts(tmp_path, corpus, synth, capsys):
    """A second `evolm prepare` into the same prefix is refused (overwrite=true replaces it); a sharded preparation
    is never written beside an unsharded one of the same prefix, nor the other way round (training would read one
    and silently ignore the other)."""
    out = tmp_path / "p" / "docs"
    base = [f"input={corpus}", f"tokenizer={synth.tokenizer_dir}", "workers=1", "progress=false"]
    assert cli_main(["prepare", *base, f"output={out}"]) == 0
    before = (tmp_path / "p" / "docs.bin").read_bytes()
    capsys.readouterr()
    for extra, key, says in (([], "output", "exists"), (["shards=2"], "output", "unsharded preparation")):
        assert cli_main(["prepare", *base, f"output={out}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {key}: ") and says in err[0], err
    assert (tmp_path / "p" / "docs.bin").read_bytes() == before
    assert cli_main(["prepare", *base, f"output={out}", "overwrite=true", "limit=2"]) == 0
    assert len(read_docs(out)) == 2
    sharded = tmp_path / "s" / "docs"
    assert cli_main(["prepare", *base, f"output={sharded}", "shards=2"]) == 0
    capsys.readouterr()
    assert cli_main(["prepare", *base, f"output={sharded}", "overwrite=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a sharded preparation" in err[0]
    assert not (tmp_path / "s" / "docs.bin").exists()
    # both layouts under one prefix anyway (the library does not ask): training refuses it in one line
    prepare(corpus, out, synth.tokenizer_dir, workers=1, shards=2, progress=False)
    assert cli_main(["train", "data.source=indexed", f"data.paths=[{out}]", f"data.tokenizer={synth.tokenizer_dir}",
                     f"run.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.iters=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.paths: ") and "both an unsharded" in err[0], err


def test_an_output_naming_a_directory_or_an_existing_idx_is_refused(tmp_path, corpus, synth, capsys):
    """``output=out/`` (or ``out/.bin``) names no file prefix: it wrote the hidden ``out/.bin``/``.idx``, and with
    ``shards=`` died in a FileNotFoundError traceback. An existing ``<output>.idx`` without its ``.bin`` was replaced
    without ``overwrite=true``."""
    base = [f"input={corpus}", f"tokenizer={synth.tokenizer_dir}", "workers=1", "progress=false"]
    for output, extra in ((f"{tmp_path / 'd'}/", []), (f"{tmp_path / 'd'}/", ["shards=2"]),
                          (f"{tmp_path / 'd'}/.bin", [])):
        assert cli_main(["prepare", *base, f"output={output}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: output: ") and "names a directory" in err[0], err
        assert not (tmp_path / "d").exists()
    idx = tmp_path / "p" / "docs.idx"
    idx.parent.mkdir()
    idx.write_text("not ours")
    assert cli_main(["prepare", *base, f"output={tmp_path / 'p' / 'docs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output: ") and "docs.idx exists" in err[0], err
    assert idx.read_text() == "not ours" and files(idx.parent) == {"docs.idx"}
    assert cli_main(["prepare", *base, f"output={tmp_path / 'p' / 'docs'}", "overwrite=true"]) == 0
    assert len(read_docs(tmp_path / "p" / "docs")) == len(TEXTS)


def test_a_sharded_output_inside_another_commands_output_is_refused(tmp_path, corpus, synth, capsys):
    """``shards=``/``shard=`` skipped the output checks of an unsharded prepare: its shards, records and manifest
    were written into an HF export or an SFT dataset (directories no other command writes)."""
    export, sft = tmp_path / "export", tmp_path / "sft"
    export.mkdir()
    (export / "evolm_export.json").write_text("{}")
    sft.mkdir()
    (sft / "manifest.json").write_text(json.dumps({"format": "evolm-sft-1"}))
    base = [f"input={corpus}", f"tokenizer={synth.tokenizer_dir}", "workers=1", "progress=false"]
    for where, extra in ((export, "shards=2"), (sft, "shard=0/2")):
        before = files(where)
        assert cli_main(["prepare", *base, f"output={where / 'corpus'}", extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: output: ") and "lies inside" in err[0], err
        assert files(where) == before


def test_a_damaged_parquet_data_page_is_one_line_and_writes_nothing(tmp_path, synth, capsys):
    """The footer is sound (the file opens) but a data page in the middle is damaged: reading it is one line
    naming the file and the row it failed at, not pyarrow's traceback; no output is left."""
    texts = [f"document number {i} " * 20 for i in range(4000)]
    good = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), good, row_group_size=1000, compression="snappy")
    data = bytearray(good.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 400):
        data[k] ^= 0x5A
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out" / "docs"
    assert cli_main(["prepare", f"input={bad}", f"output={out}", f"tokenizer={synth.tokenizer_dir}", "workers=1",
                     "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: input: {bad}: cannot read the rows from ") and \
        "damaged" in err[0], err
    assert not list(tmp_path.glob("out/*docs*"))  # no output, no temporaries


def test_a_killed_attempts_temporaries_are_removed_and_another_hosts_kept(tmp_path, corpus, synth):
    """`<prefix>.tmp-<host>-<pid>.*` of a dead process on this host is what a killed prepare left: the next prepare
    of that prefix removes it; another host's (a live writer on a shared filesystem, maybe) is left alone."""
    import socket

    out = tmp_path / "docs"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = [tmp_path / f"docs.tmp-{socket.gethostname()}-{dead}.{ext}" for ext in ("bin", "idx")]
    theirs = tmp_path / "docs.tmp-some-other-node-1.bin"
    for p in (*mine, theirs):
        p.write_bytes(b"partial")
    prepare(corpus, out, synth.tokenizer_dir, workers=1, progress=False)
    assert not any(p.exists() for p in mine) and theirs.read_bytes() == b"partial"
    assert len(read_docs(out)) == len(TEXTS)


def test_cli_process_exits_2_with_one_line(tmp_path, synth):
    """The real process: exit code 2, exactly one stderr line, no output files."""
    cmd = [sys.executable, "-m", "evolm_nemo.cli", "prepare", f"input={tmp_path / 'missing.jsonl'}",
           f"output={tmp_path / 'o' / 'x'}", f"tokenizer={synth.tokenizer_dir}", "workers=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: input: no such file {tmp_path / 'missing.jsonl'}"]
    assert files(tmp_path) == set()


def test_llama_class_tokenizer_keeps_its_bos(tmp_path):
    """A Llama-2-style tokenizer (BOS template, byte fallback) is used as at inference: [<s>] + text + [</s>]."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in ["▁", "T", "h", "▁T", "▁h", "o", "m", "a", "s"]:
        vocab.setdefault(piece, len(vocab))
    llama = LlamaTokenizer(vocab=vocab, merges=[("▁", "T"), ("▁", "h")], add_bos_token=True)
    llama.save_pretrained(tmp_path / "llama")
    texts = ["Tom has 3 apples.", "naïve 😀 </s>"]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    prepare(src, tmp_path / "l", str(tmp_path / "llama"), workers=2, chunk_size=1, progress=False)
    llama = load_tokenizer(tmp_path / "llama")
    for text, ids in zip(texts, read_docs(tmp_path / "l")):
        assert ids[0] == 1 and ids[-1] == 2 and 2 not in ids[1:-1]
        assert llama.decode(ids, skip_special_tokens=True) == text  # the literal "</s>" stayed text
        assert ids == llama(text, split_special_tokens=True).input_ids + [2]


# Issue 10 item 10: undecodable input is one line naming the file and line, and leaves nothing behind.
@pytest.mark.parametrize("workers", [1, 2])
def test_non_utf8_truncated_gzip_and_lone_surrogates(tmp_path, tok, workers):
    import gzip

    good = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)).encode()
    cases = {
        "latin1.jsonl": (good + '{"text": "caf\xe9"}\n'.encode("latin-1"),
                         "line 51: not UTF-8 text (byte 0xe9 at column 14); re-encode"),
        "surrogate.jsonl": (good + b'{"text": "half a pair \\ud83d here"}\n',
                            "line 51: contains a lone surrogate (\\ud83d)"),
        "deep.jsonl": (good + b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                       "line 51: JSON nested too deeply"),
        "cut.jsonl.gz": (gzip.compress(good * 20)[:-200], "truncated or corrupt gzip data after line"),
    }
    for name, (data, message) in cases.items():
        src = tmp_path / name
        src.write_bytes(data)
        out = tmp_path / f"out_{name.split('.')[0]}" / "docs"
        with pytest.raises(ConfigError) as err:
            prepare(src, out, tok, workers=workers, chunk_size=8, progress=False)
        assert err.value.key == "input" and str(src) in err.value.message and message in err.value.message, (
            name, err.value.message)
        assert not out.parent.exists() or not list(out.parent.iterdir())  # nothing half-written
    # a surrogate *pair* written as escapes is one valid character
    src = tmp_path / "pair.jsonl"
    src.write_bytes(good + b'{"text": "emoji \\ud83d\\ude00"}\n')
    assert prepare(src, tmp_path / "pair", tok, workers=workers, progress=False).documents == 51


def test_bad_encoding_via_the_cli_is_one_line(tmp_path, synth):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    proc = subprocess.run([str(Path(sys.executable).parent / "evolm"), "prepare", f"input={src}",
                           f"output={tmp_path / 'o'}", f"tokenizer={synth.tokenizer_dir}"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: input: {src} line 1: not UTF-8 text (byte 0xe9 at column 14); " \
                                  "re-encode the file as UTF-8"


def test_ctrl_c_is_the_parents_to_handle_not_the_workers(tok):
    """Ctrl-C reaches the whole process group: a tokenizing worker printed its own KeyboardInterrupt traceback above
    the command's one-line `interrupted` (seen 1 in 6 tries with workers=2). Workers now ignore SIGINT: one sent to
    each leaves the same workers alive and encoding, and the parent stops the pool."""
    import signal
    import time

    from evolm_nemo.data.prepare import _encode, _start_pool, _stop_pool

    pool, _ = _start_pool(tok, True, 2)
    try:
        before = [p.pid for p in pool._pool]
        for pid in before:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        assert [p.pid for p in pool._pool] == before and all(p.is_alive() for p in pool._pool)
        assert pool.apply(_encode, (["hello world"],))
    finally:
        _stop_pool(pool)
