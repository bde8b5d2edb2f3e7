"""The pretraining / CPT stage's data checks, run by its ``plan_iters`` before anything heavy: the generated corpora
or the prepared indexed files (manifests, ``.idx`` headers, token ids against the model's vocabulary, the tokenizer),
``data.split``, budgets that a sample index cannot hold or that would repeat a source, and the held-out data of
``train.val_tokens_interval``."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import format_tokens, parse_tokens
from evolm_nemo.config.validate import positive
from evolm_nemo.data.indexed import MANIFEST_SUFFIX, expand_prefixes, index_extent, read_manifest
from evolm_nemo.data.sft import tokenizer_fingerprint
from evolm_nemo.data.tokenizer import MIN_VOCAB, load_tokenizer


def check_data(cfg: RootConfig) -> None:
    """Pretraining / CPT data: the generated corpora, or megatron indexed files from `evolm prepare`."""
    d = cfg.data
    if d.source == "synthetic":
        if not d.synthetic_kinds or d.synthetic_kinds[0] != "text" or any(
                k not in ("text", "math") for k in d.synthetic_kinds):
            raise ConfigError("data.synthetic_kinds", f"must start with text and name text/math corpora, got "
                                                      f"{d.synthetic_kinds}")
        if d.weights is not None and len(d.weights) != len(d.synthetic_kinds):
            raise ConfigError("data.weights", f"{len(d.weights)} weights for {len(d.synthetic_kinds)} synthetic kinds")
        # the corpora and their tokenizer are generated after the process group is up, where the generator's own
        # errors could only name its arguments (vocab_size, synthetic_docs): refuse here, by the recipe's keys
        positive("data.synthetic_docs", d.synthetic_docs)
        if cfg.model.vocab_size < MIN_VOCAB:
            raise ConfigError("model.vocab_size", f"must be at least {MIN_VOCAB} with data.source=synthetic: the "
                                                  "generated corpus's byte-level BPE tokenizer (256 bytes + "
                                                  f"{MIN_VOCAB - 256} special tokens) is trained to this size; "
                                                  f"got {cfg.model.vocab_size}")
    if d.source == "indexed":
        if not d.paths:
            raise ConfigError("data.paths", "indexed data needs at least one prefix (run `evolm prepare` first)")
        for prefix in d.paths:
            if not Path(prefix + ".bin").exists() and Path(prefix + MANIFEST_SUFFIX).is_file():
                continue  # a sharded preparation: its shards are checked below
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise ConfigError("data.paths", f"missing file {prefix + ext}; run `evolm prepare` or fix the path")
        for prefix in expand_prefixes(d.paths, None)[0]:
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise ConfigError("data.paths", f"missing shard file {prefix + ext} (listed in its manifest); "
                                                    "re-run that shard of `evolm prepare`")
        if d.weights is not None and len(d.weights) != len(d.paths):
            raise ConfigError("data.weights", f"{len(d.weights)} weights for {len(d.paths)} paths")
    # either source: megatron's blend asserts on a negative or non-finite weight after the model is built (and NaN
    # would read as "all weights are zero" below)
    if d.weights is not None and not all(0 <= w < math.inf for w in d.weights):
        raise ConfigError("data.weights", f"every weight must be a finite number >= 0, got {list(d.weights)}")
    if d.weights is not None and not sum(d.weights) > 0:
        raise ConfigError("data.weights", f"all weights are zero ({list(d.weights)}); give at least one path a "
                                          "positive weight (or null: proportional to size)")
    if d.source == "indexed" and not d.tokenizer:
        raise ConfigError("data.tokenizer", "indexed data needs the tokenizer it was prepared with")


def check_split(split) -> list[float]:
    """``data.split`` is megatron's "train,valid,test" ratios: up to three non-negative numbers with a train part > 0
    (training reads only the train split)."""
    text = str(split).strip()
    parts = [x.strip() for x in re.split(r"[,/]", text)] if text else []
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = None
    if not values or len(values) > 3 or any(not v >= 0 for v in values) or any(v == float("inf") for v in values):
        raise ConfigError("data.split", f"expected up to three non-negative train,valid,test ratios such as 100,0,0 "
                                        f"or 98,2,0; got {split!r}")
    if values[0] == 0:
        raise ConfigError("data.split", f"the train part of {split!r} is 0: training would have no data; e.g. "
                                        "100,0,0")
    return values


# a .bin up to TOKEN_SAMPLE_BYTES has its largest token id read at every check; one up to FULL_SCAN_BYTES is read
# whole once and the result recorded (``data.verify``: ``<prefix>.verified``, or under data.cache_dir for a read-only
# corpus); a larger one is sampled (evenly spaced chunks of TOKEN_SAMPLE_BYTES in all): reading hundreds of GB before
# the process group forms would outlast its timeout -- `evolm prepare shards=N` verifies every shard whole instead,
# and training checks every batch it reads (data.gpt.BatchSchedule)
TOKEN_SAMPLE_BYTES = 64 << 20
FULL_SCAN_BYTES = 8 << 30


MAX_SAMPLES = 10**10  # megatron's sample / shuffle indices take ~16 bytes per sample: 1e10 samples ~ 160 GB
MAX_EPOCHS = 1000  # passes over an indexed dataset that a budget may ask for


def check_sources(cfg: RootConfig) -> list[int]:
    """Tokens of each data.paths source. A sharded preparation (``<prefix>.manifest.json``) is read from its manifest:
    its tokenizer must be the one training uses (data.tokenizer, and the parent's when continuing one), compared
    by vocabulary hash, and its size must fit model.vocab_size; other prefixes get the token-id scan."""
    return [source_tokens(cfg, prefix) for prefix in cfg.data.paths]


def source_tokens(cfg: RootConfig, prefix: str, key: str = "data.paths") -> int:
    """One prepared prefix's tokens, after the checks that it can be read by this model (``key``: the recipe key
    that names it -- data.paths, or data.val_paths for held-out files)."""
    d, m = cfg.data, cfg.model
    manifest = None if Path(prefix + ".bin").exists() else read_manifest(prefix)
    if manifest is None:
        return check_token_ids([prefix], m.vocab_size, cache_dir=d.cache_dir)
    theirs = manifest.get("tokenizer") or {}
    for tok_key, ref, fp in training_tokenizers(cfg):
        if theirs.get("vocab_sha256") != fp["vocab_sha256"]:
            raise ConfigError(tok_key, f"{prefix}{MANIFEST_SUFFIX} was prepared with tokenizer {theirs.get('name')} "
                                       f"(vocabulary {theirs.get('vocab_sha256')}, {theirs.get('size')} tokens), "
                                       f"not {ref} (vocabulary {fp['vocab_sha256']}, {fp['size']} tokens); prepare "
                                       "the data with the model's tokenizer")
    if int(theirs.get("size") or 0) > m.vocab_size:
        raise ConfigError(key, f"{prefix}: its tokenizer has {theirs.get('size')} tokens, more than "
                               f"model.vocab_size={m.vocab_size}")
    check_shards(prefix, manifest, m.vocab_size, d.cache_dir)
    return int(manifest["tokens"])


def check_shards(prefix: str, manifest: dict, vocab_size: int, cache_dir: str | None = None) -> None:
    """Each shard of a sharded preparation holds what its manifest's ``sha256`` says, and its token ids fit
    ``model.vocab_size``: hashed at first use and recorded (``<shard>.verified``, or under ``cache_dir`` for a
    read-only corpus: ``data.verify``) by one process per node (``LOCAL_RANK`` 0: a damaged shard stops it, and
    torchrun the others); later runs read the record."""
    import os

    from evolm_nemo.data.prepare import content_measure
    from evolm_nemo.data.verify import verified

    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    for entry in manifest["shards"]:
        shard = str(Path(prefix).parent / entry["prefix"])
        top = verified(Path(shard + ".verified"), [Path(shard + ".bin"), Path(shard + ".idx")], entry.get("sha256"),
                       lambda: content_measure(shard), "data.paths", f"{shard} (a shard of {prefix})",
                       cache_dir)["max_token_id"]
        if top is not None and top >= vocab_size:
            raise ConfigError("data.paths", f"{shard}.bin: token id {top} >= model.vocab_size={vocab_size}; it was "
                                            "tokenized with a larger vocabulary than the model's (check "
                                            "data.tokenizer and model.vocab_size)")


def training_tokenizers(cfg: RootConfig) -> list:
    """(key, reference, fingerprint) of the tokenizers a run's data must match: data.tokenizer, and the tokenizer
    recorded by the parent checkpoint (train.init_from / train.branch_from) when it can be loaded here."""
    out = []
    if cfg.data.tokenizer:
        out.append(("data.tokenizer", cfg.data.tokenizer,
                    tokenizer_fingerprint(load_tokenizer(cfg.data.tokenizer, key="data.tokenizer"))))
    parent = cfg.train.init_from or cfg.train.branch_from
    if parent:
        try:
            ref = ckpt.parent_tokenizer(parent)
            if ref and ref != cfg.data.tokenizer:
                out.append(("train.init_from" if cfg.train.init_from else "train.branch_from", f"{ref} (the parent's)",
                            tokenizer_fingerprint(load_tokenizer(ref))))
        except (ckpt.CheckpointError, ConfigError):
            pass  # the parent is checked elsewhere; its tokenizer may live on another machine
    return out


def check_mix_sizes(cfg: RootConfig, iters: int, source_tokens: list[int]) -> None:
    """A mix (two or more data.paths) may not ask a source for more tokens than it has -- megatron would silently
    repeat it -- unless data.max_epochs allows that many passes."""
    d = cfg.data
    if len(source_tokens) < 2:
        return
    weights = list(d.weights) if d.weights is not None else [float(t) for t in source_tokens]
    total_w = float(sum(weights))
    budget = iters * cfg.parallel.global_batch_size * cfg.model.seq_length
    split = check_split(d.split)
    train_share = split[0] / sum(split)  # training reads the train split's documents only
    for prefix, w, whole in zip(d.paths, weights, source_tokens):
        have = int(whole * train_share)
        asked = budget * float(w) / total_w
        if have and asked > d.max_epochs * have:
            where = "" if train_share == 1 else f" in its train split (data.split={d.split})"
            raise ConfigError("data.paths", f"{prefix} has {format_tokens(have)} tokens ({have:,}){where} but the mix "
                                            f"asks it for {format_tokens(int(asked))} ({float(w) / total_w:.1%} of "
                                            f"{format_tokens(budget)}) = {asked / have:.2f} passes; prepare more, "
                                            f"lower its weight or the budget, or allow repeats with "
                                            f"data.max_epochs={math.ceil(asked / have * 100) / 100}")


def check_budget(cfg: RootConfig, iters: int, dataset_tokens: int | None) -> None:
    """Refuse, before megatron builds its sample indices (minutes to hours, memory ~ samples), budgets that cannot be
    meant: more samples than an index can hold, or more than MAX_EPOCHS passes over the prepared data."""
    p, m = cfg.parallel, cfg.model
    key = "train.tokens" if cfg.train.tokens is not None else "train.iters"
    value = cfg.train.tokens if cfg.train.tokens is not None else iters
    samples = iters * p.global_batch_size
    tokens = samples * m.seq_length
    if samples > MAX_SAMPLES:
        raise ConfigError(key, f"{value} means {iters:,} iterations = {samples:,} samples of {m.seq_length} tokens "
                               f"({format_tokens(tokens)} tokens): more than the {MAX_SAMPLES:,} samples a sample "
                               "index can hold; check the unit (EvoLM's budgets are 10B-320B)")
    if dataset_tokens:
        epochs = tokens / dataset_tokens
        if epochs > MAX_EPOCHS:
            raise ConfigError(key, f"{value} means {format_tokens(tokens)} tokens = {epochs:,.0f} passes over the "
                                   f"{format_tokens(dataset_tokens)} tokens in data.paths (more than {MAX_EPOCHS}); "
                                   "check the budget or the data")


def check_token_ids(prefixes, vocab_size: int, sample_bytes: int = TOKEN_SAMPLE_BYTES, cache_dir=None,
                    full_bytes: int = FULL_SCAN_BYTES) -> int:
    """Each prepared ``<prefix>.bin`` holds the tokens its ``.idx`` says (a cut or mismatched pair would have megatron
    read past the end, or train on wrong document boundaries), and its token ids fit ``model.vocab_size`` (data
    tokenized with a larger vocabulary would index past the embedding): the largest id over the whole ``.bin``, read
    at each check when it is at most ``sample_bytes``, else up to ``full_bytes`` read once by one process per node
    (``LOCAL_RANK`` 0, saying so) and recorded (``data.verify``; a rewritten file is read again); a larger file is
    sampled. Returns the number of tokens in all files."""
    import os

    from evolm_nemo.data.verify import verified

    total = 0
    for prefix in prefixes:
        idx, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
        try:
            dtype, described = index_extent(prefix)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise ConfigError("data.paths", f"{idx}: unreadable index ({exc}); re-run evolm prepare") from None
        size = bin_path.stat().st_size
        count = size // dtype.itemsize
        if size != described * dtype.itemsize:  # megatron would read past the end, or train on wrong boundaries
            raise ConfigError("data.paths", f"{idx} describes {described:,} tokens but {bin_path} holds "
                                            f"{size / dtype.itemsize:,.0f} ({size:,} bytes of {dtype.name}): the two "
                                            "files are not one preparation or one was cut short; re-run evolm "
                                            "prepare")
        total += count
        if count == 0:
            continue
        per_read = max(1, sample_bytes // dtype.itemsize)
        where = "its largest token id"
        if count <= per_read:
            top = _largest_id(bin_path, dtype, count, per_read)
        elif size > full_bytes:
            step = per_read // 64
            starts = np.linspace(0, count - step, 64).astype(np.int64)
            tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))
            top = max(int(tokens[s0:s0 + step].max()) for s0 in starts)
            del tokens
            where = f"a sample of {per_read:,} of its {count:,} tokens has id"
        elif int(os.environ.get("LOCAL_RANK", "0")) == 0:  # a damaged file stops this process, and torchrun the rest
            def measure():
                print(f"[evolm] reading {bin_path} ({size / 2**30:.1f} GiB) once for its largest token id",
                      flush=True)
                return {"max_token_id": _largest_id(bin_path, dtype, count, per_read)}

            top = verified(Path(prefix + ".verified"), [bin_path, idx], None, measure, "data.paths", prefix,
                           cache_dir)["max_token_id"]
        else:
            continue
        if top >= vocab_size:
            raise ConfigError("data.paths", f"{bin_path}: {where} {top} >= model.vocab_size={vocab_size}; it was "
                                            "tokenized with a larger vocabulary than the model's (check "
                                            "data.tokenizer and model.vocab_size)")
    return total


def _largest_id(bin_path: Path, dtype: np.dtype, count: int, per_read: int) -> int:
    """The largest token id in ``bin_path`` (``count`` tokens of ``dtype``), reading ``per_read`` tokens at a time."""
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))
    try:
        return max(int(tokens[s0:s0 + per_read].max()) for s0 in range(0, count, per_read))
    finally:
        del tokens


def check_validation(cfg: RootConfig) -> None:
    """Held-out loss per source during pretraining / CPT: a token interval, and held-out documents (a validation part
    in data.split, data.val_paths or data.synthetic_val_docs). Other stages are refused by
    ``config.validate.check_schedule``."""
    t = cfg.train
    parse_tokens(t.val_tokens_interval, "train.val_tokens_interval")
    positive("train.val_batches", t.val_batches)
    d = cfg.data
    positive("data.synthetic_val_docs", d.synthetic_val_docs, allow_zero=True)
    if d.val_paths:
        sources = len(d.paths) if d.source == "indexed" else len(d.synthetic_kinds)
        if len(d.val_paths) != sources:
            raise ConfigError("data.val_paths", f"gives {len(d.val_paths)} held-out prefixes for {sources} sources; "
                                                "one per source, in data.paths order")
        if d.source != "indexed":
            raise ConfigError("data.val_paths", "is for data.source=indexed; the synthetic source takes "
                                                "data.synthetic_val_docs")
        for prefix in d.val_paths:
            plain = [Path(f"{prefix}{ext}").is_file() for ext in (".bin", ".idx")]
            if not all(plain) and not Path(f"{prefix}{MANIFEST_SUFFIX}").is_file():
                raise ConfigError("data.val_paths", f"no {prefix}.bin + .idx (nor {prefix}{MANIFEST_SUFFIX})")
            try:  # read by this model as training data is: token ids, tokenizer, shards
                source_tokens(cfg, prefix, "data.val_paths")
            except ConfigError as exc:
                raise ConfigError("data.val_paths" if exc.key == "data.paths" else exc.key, exc.message) from None
        return
    if d.source != "indexed" and d.synthetic_val_docs > 0:
        return
    parts = check_split(d.split)
    if len(parts) < 2 or parts[1] <= 0:
        raise ConfigError("train.val_tokens_interval", f"needs held-out documents, but data.split={d.split!r} "
                                                       "has no validation part; e.g. data.split=98,2,0, "
                                                       "data.val_paths=[...] or data.synthetic_val_docs=200")
