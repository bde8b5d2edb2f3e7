"""`evolm prepare`: JSONL / Parquet / an HF dataset -> megatron-core indexed dataset (``<output>.bin`` + ``.idx``).

One document per row, encoded as the tokenizer encodes at inference (Llama-2's adds ``<s>`` first; ours adds
nothing), then EOS appended. Special-token strings inside the text (a literal "</s>") stay text. Tokenization runs
in worker processes over ordered chunks, so the output is byte-identical for any ``workers``. Both files are written
under temporary names and renamed at the end (``.idx`` last: it is the commit mark), so a failed or interrupted run
leaves no output. Training reads the prefix through megatron-core's GPTDataset.

Input: a ``.jsonl`` / ``.json`` (JSON lines) / ``.jsonl.gz`` / ``.parquet`` file; anything else is handed to
``datasets.load_dataset(input, hf_config, split=split, streaming=True)``: a hub name or a local dataset directory.

EvoLM's data with the Llama-2 tokenizer (gated on the hub: accept its licence and `huggingface-cli login` first):

    # pretraining: FineWeb-Edu sample-350BT, streamed from the hub (limit=N documents for a smaller run)
    evolm prepare input=HuggingFaceFW/fineweb-edu hf_config=sample-350BT \
        output=data/fineweb_edu/fineweb_edu tokenizer=meta-llama/Llama-2-7b-hf workers=32
    # CPT: FineMath's two subsets, each its own prefix (mixed by token ratio in the data recipe)
    evolm prepare input=HuggingFaceTB/finemath hf_config=finemath-3plus \
        output=data/finemath/finemath_3plus tokenizer=meta-llama/Llama-2-7b-hf workers=32
    evolm prepare input=HuggingFaceTB/finemath hf_config=infiwebmath-3plus \
        output=data/finemath/infiwebmath_3plus tokenizer=meta-llama/Llama-2-7b-hf workers=32

One process reads and writes while the workers tokenize, so for the full 350BT download the parquet shards first
(``huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type dataset --include "sample/350BT/*"``) and run one
prepare per shard in parallel (``input=.../sample/350BT/000_00000.parquet output=data/fineweb_edu/000_00000``), then
list every prefix in the data recipe's ``paths``. The text field of both datasets is ``text``.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import re
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from evolm_nemo.config.errors import ConfigError

FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


@dataclass
class PrepareConfig:
    input: Optional[str] = None  # .jsonl/.json/.jsonl.gz/.parquet file, or an HF dataset name/local dataset dir
    output: Optional[str] = None  # output prefix: writes <output>.bin and <output>.idx
    tokenizer: Optional[str] = None  # HF tokenizer dir or hub name (meta-llama/Llama-2-7b-hf for real runs)
    text_key: str = "text"  # field holding each document's text
    workers: Optional[int] = None  # tokenizer processes (None: all CPU cores); output is identical for any value
    hf_config: Optional[str] = None  # HF dataset config (e.g. sample-350BT); HF datasets only
    split: str = "train"  # HF dataset split; HF datasets only
    append_eos: bool = True  # append EOS to every document (GPTDataset packs documents separated by it)
    limit: Optional[int] = None  # stop after this many documents (None: all)
    chunk_size: int = 512  # documents per worker task
    trust_remote_code: bool = False  # allow tokenizer code from the hub (only if you trust it)
    progress: bool = True  # progress bar with ETA on stderr


@dataclass
class PrepareStats:
    documents: int  # documents written
    tokens: int  # tokens written (EOS included)
    skipped: int  # rows that encoded to no tokens (empty text without EOS)
    bin_path: str
    idx_path: str
    seconds: float


# ---------------------------------------------------------------------------------------------------------- input


def _is_file_input(name: str) -> bool:
    return name.lower().endswith(FILE_SUFFIXES)


def _text(row, text_key: str, where: str) -> str:
    if not isinstance(row, dict):
        raise ConfigError("input", f"{where}: expected a JSON object, got {type(row).__name__}")
    if text_key not in row:
        fields = ", ".join(list(row)[:12]) or "none"
        raise ConfigError("text_key", f"no field {text_key!r} at {where} (fields there: {fields}); set text_key=")
    value = row[text_key]
    if not isinstance(value, str):
        raise ConfigError("text_key", f"field {text_key!r} at {where} is {type(value).__name__}, not a string")
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _raw_lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    """(line number, bytes) of a plain or gzip file; a truncated or corrupt .gz is a ConfigError naming the line."""
    gz = path.suffix == ".gz"
    lineno = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw
    except (EOFError, OSError, zlib.error) as exc:
        if not gz:
            raise
        raise ConfigError("input", f"{path}: truncated or corrupt gzip data after line {lineno} ({exc}); "
                                   "download or compress it again") from None


def _jsonl_rows(path: Path) -> Iterator[Tuple[str, object]]:
    for lineno, raw in _raw_lines(path):
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("input", f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                       f"{exc.start + 1}); re-encode the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError("input", f"{where}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise ConfigError("input", f"{where}: JSON nested too deeply to read") from None
        if _SURROGATE_ESCAPE.search(raw):
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = exc.object[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("ascii")
                raise ConfigError("input", f"{where}: contains a lone surrogate ({bad}), which is not valid "
                                           "Unicode and cannot be tokenized; fix the text that produced it") from None
        yield where, row


def _parquet_rows(path: Path, columns: Optional[List[str]]) -> Iterator[Tuple[str, object]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for key in columns or []:
        if key not in names:
            cols, option = ", ".join(names[:12]), _COLUMN_KEYS.get(key, "input")
            raise ConfigError(option, f"no column {key!r} in {path} (columns: {cols}); set {option}=")
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        for item in batch.to_pylist():
            yield f"{path} row {row}", item
            row += 1


def _hf_rows(ds, name: str) -> Iterator[Tuple[str, object]]:
    for row, item in enumerate(ds):
        yield f"{name} row {row}", item


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n


_COLUMN_KEYS: dict = {}  # column name -> the option that named it (for error messages); set by open_rows callers


def open_rows(input, columns: Optional[List[str]] = None, hf_config=None, split="train",
              column_keys: Optional[dict] = None) -> Tuple[Iterator[Tuple[str, object]], Optional[int]]:
    """(``(where, row)`` pairs, number of rows if known) of a JSONL / JSON-lines.gz / Parquet file or an HF dataset
    (hub name or local dataset directory, streamed). ``columns``: the Parquet columns to read (all if None);
    ``column_keys`` maps a column to the option naming it, for the error when it is missing. Raises ConfigError for
    a missing file or an unloadable dataset."""
    _COLUMN_KEYS.clear()
    _COLUMN_KEYS.update(column_keys or {})
    name = str(input)
    path = Path(name).expanduser()
    if _is_file_input(name):
        if not path.is_file():
            raise ConfigError("input", f"no such file {name}")
        if name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                total = pq.ParquetFile(path).metadata.num_rows
            except Exception as exc:
                raise ConfigError("input", f"{name}: not a readable parquet file ({exc})") from None
            return _parquet_rows(path, columns), total
        total = None if path.suffix == ".gz" else _count_lines(path)
        return _jsonl_rows(path), total
    if name.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError("input", f"no such file or directory {name}")
    import datasets

    try:
        ds = datasets.load_dataset(str(path) if path.exists() else name, hf_config, split=split, streaming=True)
    except Exception as exc:  # hub / builder errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f"{name!r} (hf_config={hf_config}, split={split})"
        raise ConfigError("input", f"cannot load dataset {where}: {first}") from None
    total = None
    try:
        total = ds.info.splits[split].num_examples or None
    except Exception:
        pass
    return _hf_rows(ds, name), total


def open_input(input, text_key="text", hf_config=None, split="train") -> Tuple[Iterator[str], Optional[int]]:
    """(texts, number of documents if known). Raises ConfigError for a missing file or an unloadable dataset."""
    rows, total = open_rows(input, [text_key], hf_config, split, column_keys={text_key: "text_key"})
    return (_text(row, text_key, where) for where, row in rows), total


# -------------------------------------------------------------------------------------------------------- workers

_TOK = None  # the worker's tokenizer
_EOS: Optional[int] = None
_DTYPE = None


def _init_worker(tokenizer, append_eos: bool, dtype, single_thread: bool = False) -> None:
    global _TOK, _EOS, _DTYPE
    if single_thread:  # one Rust thread per worker process: N workers on N cores, not N x N threads
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK, _EOS, _DTYPE = tokenizer, (tokenizer.eos_token_id if append_eos else None), dtype


def _encode(texts: List[str]) -> List[np.ndarray]:
    ids = _TOK(texts, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    if _EOS is not None:
        ids = [x + [_EOS] for x in ids]
    return [np.asarray(x, dtype=_DTYPE) for x in ids]


def _chunks(texts: Iterator[str], size: int, limit: Optional[int]) -> Iterator[List[str]]:
    chunk, n = [], 0
    for text in texts:
        chunk.append(text)
        n += 1
        if len(chunk) == size:
            yield chunk
            chunk = []
        if n == limit:  # stop before reading (and checking) rows past the limit
            break
    if chunk:
        yield chunk


def _ordered(chunks: Iterator[List[str]], pool, workers: int) -> Iterator[List[np.ndarray]]:
    """Encode chunks in order: in this process without a pool, else through a bounded window of pool tasks (unlike
    ``Pool.imap``, which reads its whole input ahead, this keeps memory flat on a 350B-token stream, and input
    errors surface here, in order)."""
    if pool is None:
        for chunk in chunks:
            yield _encode(chunk)
        return
    window = deque()
    for chunk in chunks:
        window.append(pool.apply_async(_encode, (chunk,)))
        if len(window) >= 2 * workers:
            yield window.popleft().get()
    while window:
        yield window.popleft().get()


# --------------------------------------------------------------------------------------------------------- output


def _strip_suffix(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def prepare(
    input,
    output_prefix,
    tokenizer,
    text_key: str = "text",
    workers: Optional[int] = None,
    hf_config: Optional[str] = None,
    split: str = "train",
    append_eos: bool = True,
    limit: Optional[int] = None,
    chunk_size: int = 512,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> PrepareStats:
    """Tokenize ``input`` into ``<output_prefix>.bin/.idx``; ``tokenizer`` is an HF tokenizer or its dir/hub name."""
    from evolm_nemo.data.tokenizer import load_tokenizer

    start = time.perf_counter()
    if limit is not None and limit < 1:
        raise ConfigError("limit", f"must be a positive number of documents or null, got {limit}")
    if chunk_size < 1:
        raise ConfigError("chunk_size", f"must be positive, got {chunk_size}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {workers}")
    texts, total = open_input(input, text_key, hf_config, split)
    tok = load_tokenizer(tokenizer, trust_remote_code) if isinstance(tokenizer, (str, Path)) else tokenizer
    if tok.eos_token_id is None and append_eos:
        raise ConfigError("tokenizer", "has no EOS token to append")
    if limit is not None:
        total = min(total, limit) if total else limit
    chunks = _chunks(texts, chunk_size, limit)
    first = next(chunks, None)  # reads (and checks) the first rows before anything is written
    if first is None:
        raise ConfigError("input", f"{input} has no documents")
    prefix = _strip_suffix(str(output_prefix))
    out_dir = Path(prefix).parent
    from evolm_nemo.config.validate import check_writable

    check_writable(out_dir, "output", directory=True)  # probed for real: read-only mounts, root too
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("output", f"cannot create {out_dir}: {exc.strerror}") from None

    def all_chunks():
        yield first
        yield from chunks

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
    from tqdm import tqdm

    dtype = DType.optimal_dtype(len(tok))
    tmp = f"{prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = get_bin_path(tmp), get_idx_path(tmp)
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    init_args = (tok, append_eos, dtype)
    pool = None
    if workers > 1:  # forked before the progress bar's thread exists; workers inherit the tokenizer
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(*init_args, True))
    else:
        _init_worker(*init_args)
    docs = tokens = skipped = 0
    bar = tqdm(total=total, unit="doc", desc=f"prepare {Path(prefix).name}", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.05)
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        try:
            for encoded in _ordered(all_chunks(), pool, workers):
                for arr in encoded:
                    if arr.size == 0:
                        skipped += 1
                        continue
                    builder.add_document(arr, [arr.size])
                    docs += 1
                    tokens += arr.size
                bar.update(len(encoded))
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
            builder.finalize(tmp_idx)
        finally:
            builder.data_file.close()
        if docs == 0:
            raise ConfigError("input", f"{input}: every document encoded to zero tokens")
        # Commit: drop the old .idx first so a crash in between never pairs a new .bin with an old .idx.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    stats = PrepareStats(docs, tokens, skipped, bin_path, idx_path, time.perf_counter() - start)
    if progress:
        print(f"prepared {docs:,} documents, {tokens:,} tokens in {stats.seconds:.1f}s -> {bin_path}, {idx_path}")
    return stats


def main(overrides) -> int:
    """`evolm prepare input=... output=... tokenizer=... [text_key=text workers=N ...]`."""
    from evolm_nemo.config.compose import compose

    cfg = compose("prepare", overrides, PrepareConfig)
    hints = {
        "input": "a .jsonl/.parquet file or an HF dataset name, e.g. input=HuggingFaceFW/fineweb-edu",
        "output": "the output prefix, e.g. output=data/fineweb_edu/fineweb_edu",
        "tokenizer": "an HF tokenizer dir or hub name, e.g. tokenizer=meta-llama/Llama-2-7b-hf",
    }
    for key, hint in hints.items():
        if not getattr(cfg, key):
            raise ConfigError(key, f"must be set: {hint}")
    stats = prepare(
        cfg.input, cfg.output, cfg.tokenizer, text_key=cfg.text_key, workers=cfg.workers, hf_config=cfg.hf_config,
        split=cfg.split, append_eos=cfg.append_eos, limit=cfg.limit, chunk_size=cfg.chunk_size,
        trust_remote_code=cfg.trust_remote_code, progress=cfg.progress,
    )
    if not cfg.progress:
        print(f"prepared {stats.documents:,} documents, {stats.tokens:,} tokens -> {stats.bin_path}, {stats.idx_path}")
    return 0
