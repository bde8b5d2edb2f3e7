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
import signal
import socket
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from evolm_nemo.config.compose import compose
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data.indexed import MANIFEST_SUFFIX, SHARD_FORMAT
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.fileio import check_dst_file, check_writable, write_json

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
    shard: Optional[str] = None  # "i/n": write shard i (0-based) of n, e.g. one per node (resumable layout)
    shards: Optional[int] = None  # n: write all n shards in turn, skipping finished ones (a killed run continues)
    overwrite: bool = False  # replace an existing unsharded <output>.bin/.idx (never a sharded preparation)


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


def _jsonl_rows(path: Path, start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[str, object]]:
    """Rows of lines ``start <= line index < stop`` (0-based physical lines; lines before ``start`` are skipped
    unread, so a shard reads only its own rows as JSON). A ``.json`` holding one JSON array (LLaMA-Factory's and
    Alpaca's SFT files) is named as such: it was "invalid JSON (Expecting value)" at line 1 of a valid file."""
    first = True  # the first non-blank line read
    for lineno, raw in _raw_lines(path):
        if lineno <= start:
            continue
        if stop is not None and lineno > stop:
            break
        where = f"{path} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("input", f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                       f"{exc.start + 1}); re-encode the file as UTF-8") from None
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            raise ConfigError("input", f"{where}: starts a JSON array; this command reads JSON lines (one object per "
                                       f"line): convert it, e.g. jq -c '.[]' {path.name} > rows.jsonl")
        first = False
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


def _parquet_rows(path: Path, columns: Optional[List[str]], start: int = 0,
                  stop: Optional[int] = None) -> Iterator[Tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for key in columns or []:
        if key not in names:
            cols, option = ", ".join(names[:12]), _COLUMN_KEYS.get(key, "input")
            raise ConfigError(option, f"no column {key!r} in {path} (columns: {cols}); set {option}=")
    groups, first, row = [], 0, 0  # the row groups overlapping [start, stop): the others are never read
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and (stop is None or row < stop):
            first = row if not groups else first
            groups.append(g)
        row += n
    if not groups:
        return
    row = first
    batches = pf.iter_batches(columns=columns, batch_size=1024, row_groups=groups)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged data page
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError("input", f"{path}: cannot read the rows from {row} on ({first_line}); the file is "
                                       "damaged: download or write it again") from None
        for item in batch.to_pylist():
            if row >= start and (stop is None or row < stop):
                yield f"{path} row {row}", item
            row += 1


def _hf_rows(ds, name: str, start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[str, object]]:
    if start:
        ds = ds.skip(start)
    if stop is not None:
        ds = ds.take(stop - start)
    rows = enumerate(ds, start)
    while True:
        try:
            row, item = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # the files of a directory that do not make one table (datasets' CastError), ...
            raise ConfigError("input", f"{name}: cannot read it as one dataset: {_dataset_error(exc)}") from None
        yield f"{name} row {row}", item


def _dataset_error(exc: Exception) -> str:
    """One line for a datasets error met while reading: a CastError names the columns that do not match."""
    try:
        from datasets.table import CastError
    except ImportError:  # pragma: no cover - datasets is a dependency
        CastError = ()
    if isinstance(exc, CastError):
        return (f"its files do not share one set of columns (found {', '.join(exc.table_column_names)}; "
                f"expected {', '.join(exc.requested_column_names)}); point input= at one file")
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n


_COLUMN_KEYS: dict = {}  # column name -> the option that named it (for error messages); set by open_rows callers


def open_rows(input, columns: Optional[List[str]] = None, hf_config=None, split="train",
              column_keys: Optional[dict] = None, start: int = 0,
              stop: Optional[int] = None) -> Tuple[Iterator[Tuple[str, object]], Optional[int]]:
    """(``(where, row)`` pairs, number of rows if known) of a JSONL / JSON-lines.gz / Parquet file or an HF dataset
    (hub name or local dataset directory, streamed). ``columns``: the Parquet columns to read (all if None);
    ``column_keys`` maps a column to the option naming it, for the error when it is missing. ``start``/``stop``:
    only rows at positions in that range (JSONL: physical line index; Parquet / HF: row index); the total stays the
    whole input's. Raises ConfigError for a missing file or an unloadable dataset."""
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
            return _parquet_rows(path, columns, start, stop), total
        total = None if path.suffix == ".gz" else _count_lines(path)
        return _jsonl_rows(path, start, stop), total
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
    return _hf_rows(ds, name, start, stop), total


def open_input(input, text_key="text", hf_config=None, split="train", start: int = 0,
               stop: Optional[int] = None) -> Tuple[Iterator[str], Optional[int]]:
    """(texts, number of documents if known). Raises ConfigError for a missing file or an unloadable dataset."""
    rows, total = open_rows(input, [text_key], hf_config, split, column_keys={text_key: "text_key"}, start=start,
                            stop=stop)
    return (_text(row, text_key, where) for where, row in rows), total


# -------------------------------------------------------------------------------------------------------- workers

_TOK = None  # the worker's tokenizer
_EOS: Optional[int] = None
_DTYPE = None


_FAST: Optional[bool] = None  # the Rust backend's encode_batch gives this process's tokenizer's ids (None: unchecked)


def _init_worker(tokenizer, append_eos: bool, dtype, pool_worker: bool = False) -> None:
    global _TOK, _EOS, _DTYPE, _FAST
    if pool_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker: N workers on N cores, not N x N
        ignore_interrupts()
    _TOK, _EOS, _DTYPE, _FAST = tokenizer, (tokenizer.eos_token_id if append_eos else None), dtype, None


def ignore_interrupts() -> None:
    """In a pool's worker process: Ctrl-C (SIGINT to the terminal's process group) is the parent's to handle -- it
    stops the pool and says `interrupted` in one line -- so a worker never prints its own KeyboardInterrupt
    traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_pool(method: str, workers: int, initializer, initargs=()):
    """A ``multiprocessing`` pool of ``workers`` (``method``: fork | spawn) whose workers ignore SIGINT from their
    first instruction: the parent ignores it while it starts them (a forked child inherits that, and an ignored
    signal stays ignored across exec, where Python then installs no handler of its own), so a Ctrl-C in a worker's
    start-up -- before ``initializer`` runs -- prints no traceback either. (A Ctrl-C in those milliseconds is
    dropped.) Workers the pool starts later to replace dead ones get it from ``initializer``."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context(method).Pool(workers, initializer=initializer, initargs=initargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def _backend_encodes_alike(tok) -> bool:
    """A fast tokenizer whose call is transformers' own (no subclass override): its ids are the Rust backend's
    ``encode_batch`` (special-token strings split, no truncation or padding), without the per-call conversion to
    BatchEncoding (about half the tokenization time on the generated corpus)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as Base
    except ImportError:  # transformers < 5
        try:
            from transformers import PreTrainedTokenizerFast as Base
        except ImportError:
            return False
    methods = ("__call__", "_encode_plus", "_batch_encode_plus", "encode", "prepare_for_tokenization")
    return isinstance(tok, Base) and hasattr(getattr(tok, "_tokenizer", None), "encode_batch") and all(
        getattr(type(tok), m, None) is getattr(Base, m, None) for m in methods)


def _token_ids(texts: List[str]) -> List[List[int]]:
    """``tok(texts, add_special_tokens=True, split_special_tokens=True)["input_ids"]``; after the first chunk of a
    process has shown the backend gives the same ids, straight from the backend."""
    global _FAST
    if _FAST:
        _TOK._tokenizer.encode_special_tokens = True
        return [e.ids for e in _TOK._tokenizer.encode_batch(texts, add_special_tokens=True)]
    ids = _TOK(texts, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    if _FAST is None:  # the call above left the backend set as it needs (special tokens split, no truncation)
        _FAST = _backend_encodes_alike(_TOK) and [
            e.ids for e in _TOK._tokenizer.encode_batch(texts, add_special_tokens=True)] == ids
    return ids


def _encode(texts: List[str]) -> List[np.ndarray]:
    ids = _token_ids(texts)
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


def _start_pool(tok, append_eos: bool, workers: int):
    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(len(tok))
    init_args = (tok, append_eos, dtype)
    if workers > 1:  # forked before the progress bar's thread exists; workers inherit the tokenizer
        return worker_pool("fork", workers, _init_worker, (*init_args, True)), dtype
    _init_worker(*init_args)
    return None, dtype


def _stop_pool(pool) -> None:
    """Stop the workers without waiting on multiprocessing's handler threads: ``Pool.terminate`` can wait forever on
    its task-handler thread, blocked on the task pipe's lock, when the input failed mid-stream with tasks in flight
    (seen once: a file with a bad encoding, workers=2, the test process hung in ``_terminate_pool``). It runs in a
    daemon thread for at most 10 s; workers still alive then are killed."""
    workers = list(getattr(pool, "_pool", None) or [])
    stopper = threading.Thread(target=pool.terminate, name="prepare-pool-stop", daemon=True)
    stopper.start()
    stopper.join(timeout=10)
    for p in workers:
        if p.exitcode is None:
            p.kill()
        p.join(timeout=5)


def _write_prefix(prefix: str, chunks: Iterator[List[str]], pool, workers: int, dtype, bar, where: str):
    """Encode ``chunks`` into ``<prefix>.bin/.idx``: written under temporary names and renamed at the end (``.idx``
    last: it is the commit mark), so a failure leaves the previous output (or none). Returns (docs, tokens,
    skipped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    tmp = f"{prefix}.tmp-{socket.gethostname()}-{os.getpid()}"  # whose: a later run removes it only if it is dead
    tmp_bin, tmp_idx = get_bin_path(tmp), get_idx_path(tmp)
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    docs = tokens = skipped = 0
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        try:
            for encoded in _ordered(chunks, pool, workers):
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
            raise ConfigError("input", f"{where}: every document encoded to zero tokens")
        # Commit: drop the old .idx first so a crash in between never pairs a new .bin with an old .idx.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return docs, tokens, skipped


def _check_common(limit, chunk_size, workers) -> int:
    if limit is not None and limit < 1:
        raise ConfigError("limit", f"must be a positive number of documents or null, got {limit}")
    if chunk_size < 1:
        raise ConfigError("chunk_size", f"must be positive, got {chunk_size}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {workers}")
    return workers


def _output_dir(prefix: str) -> None:
    out_dir = Path(prefix).parent
    check_writable(out_dir, "output", directory=True)  # probed for real: read-only mounts, root too
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("output", f"cannot create {out_dir}: {exc.strerror}") from None


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
    shard: Optional[str] = None,
    shards: Optional[int] = None,
):
    """Tokenize ``input`` into ``<output_prefix>.bin/.idx``; ``tokenizer`` is an HF tokenizer or its dir/hub name.
    With ``shard="i/n"`` or ``shards=n``: the sharded, resumable layout (``prepare_shards``)."""
    if shard is not None or shards is not None:
        return prepare_shards(input, output_prefix, tokenizer, text_key=text_key, workers=workers,
                              hf_config=hf_config, split=split, append_eos=append_eos, limit=limit,
                              chunk_size=chunk_size, trust_remote_code=trust_remote_code, progress=progress,
                              shard=shard, shards=shards)
    start = time.perf_counter()
    workers = _check_common(limit, chunk_size, workers)
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
    _output_dir(prefix)
    _remove_stale(prefix)  # what a killed earlier attempt left

    def all_chunks():
        yield first
        yield from chunks

    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path
    from tqdm import tqdm

    pool, dtype = _start_pool(tok, append_eos, workers)
    bar = tqdm(total=total, unit="doc", desc=f"prepare {Path(prefix).name}", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.05)
    try:
        docs, tokens, skipped = _write_prefix(prefix, all_chunks(), pool, workers, dtype, bar, str(input))
    finally:
        bar.close()
        if pool is not None:
            _stop_pool(pool)
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    stats = PrepareStats(docs, tokens, skipped, bin_path, idx_path, time.perf_counter() - start)
    if progress:
        print(f"prepared {docs:,} documents, {tokens:,} tokens in {stats.seconds:.1f}s -> {bin_path}, {idx_path}")
    return stats


# -------------------------------------------------------------------------------------------- sharded, resumable

def shard_prefix(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}"


def parse_shard(value, key: str = "shard") -> Tuple[int, int]:
    """``"i/n"`` -> (i, n), 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(key, f"expected i/n with 0 <= i < n (e.g. shard=0/8), got {value!r}")
    return int(m.group(1)), int(m.group(2))


def _line_total(path: Path) -> int:
    """Physical lines of a plain or gzip JSONL file (a last line without newline counts)."""
    opener = gzip.open if path.suffix == ".gz" else open
    n, last = 0, b"\n"
    try:
        with opener(path, "rb") as f:
            while block := f.read(1 << 24):
                n += block.count(b"\n")
                last = block[-1:]
    except (EOFError, OSError, zlib.error) as exc:
        raise ConfigError("input", f"{path}: truncated or corrupt gzip data ({exc}); download or compress it "
                                   "again") from None
    return n + (last != b"\n")


def _row_total(input, hf_config, split) -> int:
    """Rows (positions) of the input, which shards split into contiguous ranges."""
    name = str(input)
    path = Path(name).expanduser()
    if _is_file_input(name) and not name.lower().endswith(".parquet"):
        if not path.is_file():
            raise ConfigError("input", f"no such file {name}")
        return _line_total(path)
    _, total = open_rows(input, [], hf_config, split)
    if not total:
        raise ConfigError("shard", f"{name} does not say how many rows it has, which shards need to split it; "
                                   "download its files and prepare them (or each of them) instead")
    return int(total)


def content_digest(prefix: str) -> str:
    """sha256 of a prepared prefix's token bytes and document lengths (what training reads)."""
    return content_measure(prefix)["sha256"]


def content_measure(prefix: str) -> dict:
    """``content_digest`` of a prepared prefix (``sha256``) and its largest token id (``max_token_id``, None when
    empty), in one pass over its ``.bin``."""
    import hashlib

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from evolm_nemo.data.indexed import idx_dtype

    dtype = idx_dtype(prefix)
    h, top = hashlib.sha256(), None
    with open(prefix + ".bin", "rb") as f:
        while block := f.read(dtype.itemsize << 23):
            h.update(block)
            ids = np.frombuffer(block[:len(block) - len(block) % dtype.itemsize], dtype=dtype)
            if len(ids):
                top = max(-1 if top is None else top, int(ids.max()))
    ds = IndexedDataset(prefix)  # its index is memory-mapped: copy the lengths while it lives
    lengths = np.array(ds.sequence_lengths, dtype=np.int64, copy=True)
    del ds
    h.update(b"lengths")
    h.update(lengths.tobytes())
    return {"sha256": h.hexdigest(), "max_token_id": top}


def _record_ok(prefix: str, plan: dict) -> Optional[dict]:
    """The commit record of a finished shard whose files are intact (sizes) and whose plan matches, else None; a
    finished shard of another plan is refused (it would mix two preparations)."""
    path = Path(prefix + ".json")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    theirs = record.get("plan") or {}

    def same(key):  # a tokenizer is its fingerprint, wherever it was loaded from
        a, b = plan.get(key), theirs.get(key)
        if key == "tokenizer" and isinstance(a, dict) and isinstance(b, dict):
            return {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
        return a == b

    if not all(same(k) for k in set(plan) | set(theirs)):
        diff = sorted(k for k in set(plan) | set(theirs) if not same(k))
        raise ConfigError("output", f"{path} is a finished shard of another preparation ({', '.join(diff)} differ: "
                                    f"{', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}); use the same settings to "
                                    "resume, or a new output")
    for ext in (".bin", ".idx"):
        f = Path(prefix + ext)
        if not f.is_file() or f.stat().st_size != record.get(f"{ext[1:]}_bytes"):
            return None
    return record


def _remove_stale(prefix: str) -> None:
    """Temporaries of a killed attempt at this output (``<prefix>.tmp-<host>-<pid>.*`` of a dead pid on this host;
    another host's are left alone: on a shared filesystem its writer may be alive)."""
    here = socket.gethostname()
    for tmp in Path(prefix).parent.glob(Path(prefix).name + ".tmp-*"):
        m = re.fullmatch(re.escape(Path(prefix).name) + r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)\.(?:bin|idx)", tmp.name)
        if not m or (m.group("host") is not None and m.group("host") != here):
            continue
        try:
            os.kill(int(m.group("pid")), 0)
            alive = int(m.group("pid")) != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            tmp.unlink(missing_ok=True)


def write_manifest(prefix: str, n: int, plan: dict) -> Optional[dict]:
    """When every shard of ``prefix`` is finished: ``<prefix>.manifest.json`` (shards, documents, tokens, tokenizer
    hash, content hash), written atomically (concurrent finishers write the same content). Returns it, or None
    while shards are missing."""
    import hashlib

    records = []
    for i in range(n):
        record = _record_ok(shard_prefix(prefix, i, n), plan)
        if record is None:
            return None
        records.append(record)
    digest = hashlib.sha256("".join(r["sha256"] for r in records).encode()).hexdigest()
    manifest = {"format": SHARD_FORMAT, "plan": plan, "tokenizer": plan["tokenizer"],
                "documents": sum(r["documents"] for r in records), "tokens": sum(r["tokens"] for r in records),
                "skipped": sum(r["skipped"] for r in records), "content_sha256": digest,
                "shards": [{"prefix": Path(shard_prefix(prefix, i, n)).name, **{k: r[k] for k in (
                    "rows", "documents", "tokens", "skipped", "bin_bytes", "idx_bytes", "sha256")}}
                           for i, r in enumerate(records)]}
    write_json(prefix + MANIFEST_SUFFIX, manifest)
    return manifest


def prepare_shards(input, output_prefix, tokenizer, text_key: str = "text", workers: Optional[int] = None,
                   hf_config: Optional[str] = None, split: str = "train", append_eos: bool = True,
                   limit: Optional[int] = None, chunk_size: int = 512, trust_remote_code: bool = False,
                   progress: bool = True, shard: Optional[str] = None, shards: Optional[int] = None) -> PrepareStats:
    """The input's rows (JSONL: physical lines; Parquet / HF: rows; the first ``limit`` of them) are split into ``n``
    contiguous ranges; shard ``i`` is ``<output>-<i>-of-<n>.bin/.idx`` plus its commit record ``.json`` (documents,
    tokens, sizes, sha256, the plan it belongs to), written last. ``shard="i/n"`` writes shard i (several nodes run
    different i); ``shards=n`` writes all of them in turn. A finished shard is never rewritten (rerunning skips it:
    a killed prepare continues with the first unfinished shard); a shard of other settings (input, rows, tokenizer,
    ...) is refused. Once all are finished, ``<output>.manifest.json`` lists them; training reads ``<output>`` as
    one source."""
    from tqdm import tqdm

    from evolm_nemo.data.sft import tokenizer_fingerprint

    t0 = time.perf_counter()
    workers = _check_common(limit, chunk_size, workers)
    if shard is not None:
        i, n = parse_shard(shard)
        if shards is not None and shards != n:
            raise ConfigError("shards", f"{shards} differs from the n of shard={shard}; set one of them")
        todo = [i]
    else:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ConfigError("shards", f"must be a positive number of shards, got {shards!r}")
        n, todo = shards, list(range(shards))
    tok = load_tokenizer(tokenizer, trust_remote_code) if isinstance(tokenizer, (str, Path)) else tokenizer
    if tok.eos_token_id is None and append_eos:
        raise ConfigError("tokenizer", "has no EOS token to append")
    rows = _row_total(input, hf_config, split)
    if limit is not None:
        rows = min(rows, limit)
    if n > rows:
        raise ConfigError("shards", f"{n} shards for the {rows:,} rows of {input}; use at most {rows}")
    prefix = _strip_suffix(str(output_prefix))
    _output_dir(prefix)
    fp = tokenizer_fingerprint(tok)
    name = getattr(tok, "name_or_path", None) or str(tokenizer)
    where = Path(str(input)).expanduser()
    plan = {"input": str(where.resolve()) if where.exists() else str(input), "hf_config": hf_config, "split": split,
            "text_key": text_key, "append_eos": append_eos, "rows": rows, "shards": n,
            "tokenizer": {"name": str(name), **fp}}
    pool, dtype = None, None
    docs = tokens = skipped = 0
    written = []
    try:
        for i in todo:
            sp = shard_prefix(prefix, i, n)
            lo, hi = i * rows // n, (i + 1) * rows // n
            done = _record_ok(sp, plan)
            if done is not None:
                if progress:
                    print(f"shard {i}/{n}: finished earlier ({done['documents']:,} documents), skipped")
                continue
            _remove_stale(sp)
            Path(sp + ".json").unlink(missing_ok=True)  # a record whose files were damaged: redo the shard
            texts, _ = open_input(input, text_key, hf_config, split, start=lo, stop=hi)
            if pool is None and dtype is None:
                pool, dtype = _start_pool(tok, append_eos, workers)
            bar = tqdm(total=hi - lo, unit="row", desc=f"prepare {Path(sp).name}", disable=not progress,
                       file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
            try:
                d, t, k = _write_prefix(sp, _chunks(texts, chunk_size, None), pool, workers, dtype, bar,
                                        f"{input} rows {lo}..{hi}")
            finally:
                bar.close()
            record = {"plan": plan, "shard": i, "rows": [lo, hi], "documents": d, "tokens": t, "skipped": k,
                      "bin_bytes": Path(sp + ".bin").stat().st_size, "idx_bytes": Path(sp + ".idx").stat().st_size,
                      "sha256": content_digest(sp)}
            write_json(sp + ".json", record)  # the shard's commit mark
            docs, tokens, skipped = docs + d, tokens + t, skipped + k
            written.append(i)
            if progress:
                print(f"shard {i}/{n}: {d:,} documents, {t:,} tokens -> {sp}.bin, {sp}.idx")
    finally:
        if pool is not None:
            _stop_pool(pool)
    manifest = write_manifest(prefix, n, plan)
    stats = PrepareStats(docs, tokens, skipped, prefix + MANIFEST_SUFFIX if manifest else "", "",
                         time.perf_counter() - t0)
    if progress:
        state = (f"all {n} shards finished: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens -> "
                 f"{prefix}{MANIFEST_SUFFIX}") if manifest else \
            f"{sum(_record_ok(shard_prefix(prefix, j, n), plan) is not None for j in range(n))} of {n} shards finished"
        print(f"prepared {len(written)} shard(s) in {stats.seconds:.1f}s; {state}")
    return stats


def check_prefix(cfg: PrepareConfig) -> None:
    """The output prefix holds one layout: an unsharded ``<output>.bin/.idx`` or a sharded preparation
    (``<output>.manifest.json`` + shards), never both -- training would read the unsharded one and silently ignore
    the other. An unsharded output is replaced only with ``overwrite=true`` (either of its two files: an ``.idx``
    alone is somebody's file too) and is locked against a second writer. A prefix is a file name: ``out/`` (or
    ``out/.bin``) named no file, and wrote the hidden ``out/.bin`` / ``out/.idx`` (sharded: a traceback). A sharded
    prefix, like an unsharded one, lies neither inside the input (a dataset directory would read the shards' records
    as rows) nor inside another command's output (an HF export, a checkpoint, an SFT dataset)."""
    prefix = _strip_suffix(str(cfg.output))
    if prefix.endswith(("/", os.sep)) or Path(prefix).name in ("", ".", ".."):
        raise ConfigError("output", f"{cfg.output!r} names a directory, not a file prefix; name the files too, e.g. "
                                    f"output={os.path.join(prefix, 'corpus')} (writes corpus.bin and corpus.idx there)")
    plain = [p for p in (prefix + ".bin", prefix + ".idx") if os.path.exists(p)]
    sharded = cfg.shard is not None or cfg.shards is not None
    if sharded and plain:
        raise ConfigError("output", f"{plain[0]} exists: {prefix} is an unsharded preparation; a sharded one under "
                                    "the same prefix would be ignored by training -- pick another output")
    if sharded:  # resumable (its finished shards are kept), unlocked (nodes share it), but never in another's output
        check_dst_file(prefix + MANIFEST_SUFFIX, True, "output", sources=(cfg.input,), lock=False)
    if not sharded:
        if os.path.exists(prefix + MANIFEST_SUFFIX):
            raise ConfigError("output", f"{prefix}{MANIFEST_SUFFIX} exists: {prefix} is a sharded preparation; an "
                                        "unsharded one would hide it from training -- pick another output")
        if not isinstance(cfg.overwrite, bool):
            raise ConfigError("overwrite", f"must be true or false; got {cfg.overwrite!r}")
        check_dst_file(prefix + ".bin", cfg.overwrite, "output", sources=(cfg.input,))
        check_dst_file(prefix + ".idx", cfg.overwrite, "output", sources=(cfg.input,), lock=False)


def main(overrides) -> int:
    """`evolm prepare input=... output=... tokenizer=... [text_key=text workers=N ...]`."""
    cfg = compose("prepare", overrides, PrepareConfig)
    hints = {
        "input": "a .jsonl/.parquet file or an HF dataset name, e.g. input=HuggingFaceFW/fineweb-edu",
        "output": "the output prefix, e.g. output=data/fineweb_edu/fineweb_edu",
        "tokenizer": "an HF tokenizer dir or hub name, e.g. tokenizer=meta-llama/Llama-2-7b-hf",
    }
    for key, hint in hints.items():
        if not getattr(cfg, key):
            raise ConfigError(key, f"must be set: {hint}")
    check_prefix(cfg)
    stats = prepare(
        cfg.input, cfg.output, cfg.tokenizer, text_key=cfg.text_key, workers=cfg.workers, hf_config=cfg.hf_config,
        split=cfg.split, append_eos=cfg.append_eos, limit=cfg.limit, chunk_size=cfg.chunk_size,
        trust_remote_code=cfg.trust_remote_code, progress=cfg.progress, shard=cfg.shard, shards=cfg.shards,
    )
    if not cfg.progress and (cfg.shard is not None or cfg.shards is not None):
        print(f"prepared {stats.documents:,} documents, {stats.tokens:,} tokens in this run"
              + (f"; all shards finished -> {stats.bin_path}" if stats.bin_path else "; shards still missing"))
    elif not cfg.progress:
        print(f"prepared {stats.documents:,} documents, {stats.tokens:,} tokens -> {stats.bin_path}, {stats.idx_path}")
    return 0
