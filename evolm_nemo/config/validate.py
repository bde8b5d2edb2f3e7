"""Checks a composed training recipe before any process group, model or file is created.

Each rule raises ConfigError naming the key and the fix; the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig

PRECISIONS = ("auto", "bf16", "fp32")
LAYER_SPECS = ("auto", "te", "local")
DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
SOURCES = ("synthetic", "indexed")


@dataclass(frozen=True)
class Plan:
    """What validation derives: data-parallel size, iterations, tokens per iteration."""

    world_size: int
    dp: int
    iters: int
    tokens_per_iter: int
    num_microbatches: int


def check_writable(path: str | os.PathLike, key: str, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be created: one line naming `key`. `path` is a file to be
    written (its directory must be creatable and writable) or, with `directory`, a directory to be created or
    written into. Probed for real (a temporary file in the nearest existing directory, removed at once), so
    read-only mounts and permissions (also for root) are caught, not only mode bits."""
    import tempfile

    target = Path(path).absolute()
    if directory and target.exists() and not target.is_dir():
        raise ConfigError(key, f"cannot write into {path}: it is a file, not a directory")
    if not directory and target.is_dir():
        raise ConfigError(key, f"{path} is a directory; name a file")
    probe = target if directory else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"cannot write {path}: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".evolm-write-probe-")
    except OSError as exc:
        raise ConfigError(key, f"cannot write {path}: {probe} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _choice(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(key, f"must be one of {', '.join(options)}; got {value!r}")


def validate(cfg: RootConfig, world_size: int | None = None) -> Plan:
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    m, p, o, t, d = cfg.model, cfg.parallel, cfg.optim, cfg.train, cfg.data
    from evolm_nemo.stages import STAGES, stage_module

    _choice("stage", cfg.stage, tuple(STAGES))
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("model.layer_spec", m.layer_spec, LAYER_SPECS)
    _choice("model.core_attention", m.core_attention, ("sdpa", "megatron"))
    _choice("optim.decay_style", o.decay_style, DECAY_STYLES)
    _choice("data.source", d.source, SOURCES)
    if cfg.probe.tokens_interval is not None and cfg.stage not in ("pretrain", "cpt"):
        raise ConfigError("probe.tokens_interval", f"is for stage=pretrain|cpt, not {cfg.stage}")

    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "seq_length"):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError("model.num_query_groups",
                          f"{m.num_query_groups} does not divide num_attention_heads={m.num_attention_heads}")

    for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
        _positive(f"parallel.{key}", getattr(p, key))
    if m.num_attention_heads % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.num_attention_heads={m.num_attention_heads}; pick a divisor")
    if m.num_query_groups % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.num_query_groups={m.num_query_groups}; pick a divisor")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.num_layers % p.pp:
        raise ConfigError("parallel.pp", f"pp={p.pp} must divide model.num_layers={m.num_layers}; pick a divisor")
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp", "sequence parallel needs parallel.tp > 1; set parallel.sp=false or raise tp")
    if p.sp and m.seq_length % p.tp:
        raise ConfigError("parallel.sp", f"model.seq_length={m.seq_length} must be divisible by tp={p.tp} with sp")
    if world_size % (p.tp * p.pp):
        raise ConfigError("parallel.tp", f"world size {world_size} is not divisible by tp*pp={p.tp * p.pp}; "
                                         f"launch a multiple of {p.tp * p.pp} processes")
    dp = world_size // (p.tp * p.pp)
    if cfg.stage not in ("ppo", "grpo") and p.global_batch_size % (p.micro_batch_size * dp):  # RL: rl.* sizes
        raise ConfigError("parallel.global_batch_size",
                          f"{p.global_batch_size} is not divisible by micro_batch_size*dp = {p.micro_batch_size}*{dp}; "
                          f"use a multiple of {p.micro_batch_size * dp}")

    for key in ("lr", "weight_decay", "clip_grad", "eps"):
        _positive(f"optim.{key}", getattr(o, key), allow_zero=True)
    if o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError("optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if not 0.0 <= o.warmup_fraction < 1.0:
        raise ConfigError("optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}")
    _choice("optim.wsd_decay_shape", o.wsd_decay_shape, WSD_SHAPES)
    if not 0.0 < o.wsd_decay_fraction < 1.0:
        raise ConfigError("optim.wsd_decay_fraction", f"must be in (0, 1), got {o.wsd_decay_fraction}")
    if o.warmup_iters is not None:
        _positive("optim.warmup_iters", o.warmup_iters, allow_zero=True)

    _positive("data.max_epochs", d.max_epochs)
    _positive("train.log_interval", t.log_interval)
    _positive("train.save_interval", t.save_interval, allow_zero=True)
    _positive("train.keep_last", t.keep_last)

    check_writable(cfg.run.out_dir, "run.out_dir", directory=True)
    if d.source == "synthetic" or cfg.stage in ("pretrain", "cpt"):  # generated corpora / sample-index caches
        check_writable(d.cache_dir, "data.cache_dir", directory=True)
    if t.init_from is not None:
        _check_parent(cfg)
    dataset_tokens = None
    if cfg.stage in ("pretrain", "cpt"):
        _check_gpt_data(d)
        _check_split(d.split)
        if d.source == "indexed":
            source_tokens = _check_sources(cfg)
            dataset_tokens = sum(source_tokens)
    iters = stage_module(cfg.stage).plan_iters(cfg, dp)
    if cfg.stage in ("pretrain", "cpt"):
        _check_budget(cfg, iters, dataset_tokens)
        if d.source == "indexed":
            _check_mix_sizes(cfg, iters, source_tokens)
    _check_wsd(cfg, iters)
    if t.val_tokens_interval is not None:
        _check_validation(cfg)
    if cfg.probe.tokens_interval is not None:
        _check_probe(cfg)
    return Plan(world_size=world_size, dp=dp, iters=iters, tokens_per_iter=p.global_batch_size * m.seq_length,
                num_microbatches=p.global_batch_size // (p.micro_batch_size * dp))


def _check_validation(cfg: RootConfig) -> None:
    """Held-out loss per source during pretraining / CPT: a token interval, and held-out documents (a validation part
    in data.split, data.val_paths or data.synthetic_val_docs)."""
    from evolm_nemo.config.tokens import parse_tokens

    t = cfg.train
    if cfg.stage not in ("pretrain", "cpt"):
        raise ConfigError("train.val_tokens_interval", f"is for stage=pretrain|cpt; {cfg.stage} has its own "
                                                       "validation settings")
    parse_tokens(t.val_tokens_interval, "train.val_tokens_interval")
    _positive("train.val_batches", t.val_batches)
    d = cfg.data
    _positive("data.synthetic_val_docs", d.synthetic_val_docs, allow_zero=True)
    if d.val_paths:
        sources = len(d.paths) if d.source == "indexed" else len(d.synthetic_kinds)
        if len(d.val_paths) != sources:
            raise ConfigError("data.val_paths", f"gives {len(d.val_paths)} held-out prefixes for {sources} sources; "
                                                "one per source, in data.paths order")
        if d.source != "indexed":
            raise ConfigError("data.val_paths", "is for data.source=indexed; the synthetic source takes "
                                                "data.synthetic_val_docs")
        for prefix in d.val_paths:
            if not any(Path(f"{prefix}{ext}").is_file() for ext in (".idx", ".manifest.json")):
                raise ConfigError("data.val_paths", f"no {prefix}.idx/.bin (nor {prefix}.manifest.json)")
        return
    if d.source != "indexed" and d.synthetic_val_docs > 0:
        return
    parts = _check_split(d.split)
    if len(parts) < 2 or parts[1] <= 0:
        raise ConfigError("train.val_tokens_interval", f"needs held-out documents, but data.split={d.split!r} "
                                                       "has no validation part; e.g. data.split=98,2,0, "
                                                       "data.val_paths=[...] or data.synthetic_val_docs=200")


def _check_probe(cfg: RootConfig) -> None:
    """Capability probes during pretraining / CPT: every file and task they read exists, before any heavy work."""
    from evolm_nemo.config.tokens import parse_tokens

    pr = cfg.probe
    parse_tokens(pr.tokens_interval, "probe.tokens_interval")
    if not pr.upstream and not pr.downstream:
        raise ConfigError("probe.tokens_interval", "is set but probe.upstream and probe.downstream are both empty; "
                                                   "e.g. probe.upstream=[piqa,arc_easy] "
                                                   "probe.downstream=[gsm8k_platinum]")
    if cfg.parallel.pp != 1:
        raise ConfigError("probe.tokens_interval",
                          f"probes run the live model with parallel.pp=1 (got pp={cfg.parallel.pp})")
    if pr.max_fraction is not None and not 0.0 < pr.max_fraction <= 1.0:
        raise ConfigError("probe.max_fraction", f"must be in (0, 1] or null, got {pr.max_fraction}")
    _positive("probe.batch_size", pr.batch_size)
    if pr.upstream:
        from evolm_nemo.evaluation.probe import tasks_dir_for
        from evolm_nemo.evaluation.upstream import check_tasks

        if pr.upstream_limit is not None:
            _positive("probe.upstream_limit", pr.upstream_limit)
        check_tasks(list(pr.upstream), tasks_dir_for(pr.tasks_dir, pr.data_dir), pr.data_dir, prefix="probe.")
    if pr.downstream:
        from evolm_nemo.answers import SUITES

        _positive("probe.downstream_limit", pr.downstream_limit)
        _positive("probe.max_new_tokens", pr.max_new_tokens)
        if pr.scoring not in ("evolm", "strict"):
            raise ConfigError("probe.scoring", f"must be evolm or strict, got {pr.scoring!r}")
        for suite in pr.downstream:
            if suite not in SUITES:
                raise ConfigError("probe.downstream", f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
            if pr.downstream_dir is not None and not (Path(pr.downstream_dir) / f"{suite}.jsonl").is_file():
                raise ConfigError("probe.downstream_dir", f"missing {Path(pr.downstream_dir) / f'{suite}.jsonl'}")


def _check_wsd(cfg: RootConfig, iters: int) -> None:
    """WSD schedule, stable-run branch budgets and cooldown branches (evolm_nemo.train.wsd), from evolm.json only."""
    from evolm_nemo.train import wsd

    o, t = cfg.optim, cfg.train
    if o.decay_style == "wsd":
        warm, start = wsd.warmup_iters(o, iters), wsd.branch_iteration(o, iters)
        if warm > start and not t.branch_from:
            raise ConfigError("optim.warmup_iters" if o.warmup_iters is not None else "optim.warmup_fraction",
                              f"the {warm:,}-iteration warmup runs into the cooldown, which starts at iteration "
                              f"{start:,} of {iters:,}; shorten the warmup or optim.wsd_decay_fraction")
    if (t.branch_budgets or t.branch_from) and cfg.stage not in ("pretrain", "cpt"):
        raise ConfigError("train.branch_from" if t.branch_from else "train.branch_budgets",
                          f"WSD branches are for stage=pretrain|cpt, not {cfg.stage}")
    if t.branch_budgets and t.branch_from:
        raise ConfigError("train.branch_budgets", "a branch decays; it cannot be a stable run too (set "
                                                  "train.branch_budgets=[])")
    wsd.check_stable(cfg, iters)
    if t.branch_from:
        wsd.resolve_branch(cfg, iters)


SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size")


def shape_difference(model, theirs: dict) -> str | None:
    """The first of ``SHAPE_KEYS`` where ``model`` (a ModelConfig) differs from a checkpoint's recorded model dict."""
    return next((k for k in SHAPE_KEYS if k in theirs and theirs[k] != getattr(model, k)), None)


def is_hf_model_dir(path) -> bool:
    """A directory with an HF ``config.json`` and weights (safetensors or PyTorch bin), and no evolm checkpoint."""
    p = Path(path)
    if not (p / "config.json").is_file() or (p / "evolm.json").exists() or (p / "checkpoints").is_dir():
        return False
    return any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")) or (
        p / "model.safetensors.index.json").is_file()


def _check_parent(cfg: RootConfig) -> None:
    """``train.init_from`` is a complete checkpoint of the same model shape (its evolm.json, no tensors read)."""
    from evolm_nemo.checkpoint import io as ckpt

    path = cfg.train.init_from
    if not Path(path).exists():
        raise ConfigError("train.init_from", f"no checkpoint at {path}")
    if is_hf_model_dir(path):
        name = Path(path).resolve().name or "model"
        raise ConfigError("train.init_from", f"{path} is a HuggingFace model directory, not an evolm checkpoint; "
                                             f"import it first with evolm import-hf src={path} "
                                             f"dst=runs/{name}_imported, then set train.init_from to that")
    try:
        meta = ckpt.read_meta(ckpt.resolve(path))
    except ckpt.CheckpointError as exc:
        raise ConfigError("train.init_from", str(exc)) from None
    theirs = meta.get("model") or {}
    key = shape_difference(cfg.model, theirs)
    if key is not None:
        raise ConfigError(f"model.{key}", f"{getattr(cfg.model, key)} differs from the parent checkpoint's "
                                          f"{theirs[key]} (train.init_from={path}, model {theirs.get('name')}); "
                                          "pick the model preset it was trained with")


def _check_gpt_data(d) -> None:
    """Pretraining / CPT data: the generated corpora, or megatron indexed files from `evolm prepare`."""
    if d.source == "synthetic":
        if not d.synthetic_kinds or d.synthetic_kinds[0] != "text" or any(
                k not in ("text", "math") for k in d.synthetic_kinds):
            raise ConfigError("data.synthetic_kinds", f"must start with text and name text/math corpora, got "
                                                      f"{d.synthetic_kinds}")
        if d.weights is not None and len(d.weights) != len(d.synthetic_kinds):
            raise ConfigError("data.weights", f"{len(d.weights)} weights for {len(d.synthetic_kinds)} synthetic kinds")
    if d.source == "indexed":
        if not d.paths:
            raise ConfigError("data.paths", "indexed data needs at least one prefix (run `evolm prepare` first)")
        from evolm_nemo.data.prepare import MANIFEST_SUFFIX, expand_prefixes

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
        if d.weights is not None and any(w < 0 for w in d.weights):
            raise ConfigError("data.weights", "weights must be >= 0")
    if d.weights is not None and not sum(d.weights) > 0:
        raise ConfigError("data.weights", f"all weights are zero ({list(d.weights)}); give at least one path a "
                                          "positive weight (or null: proportional to size)")
        if not d.tokenizer:
            raise ConfigError("data.tokenizer", "indexed data needs the tokenizer it was prepared with")


def _check_split(split) -> list[float]:
    """``data.split`` is megatron's "train,valid,test" ratios: up to three non-negative numbers with a train part > 0
    (training reads only the train split)."""
    import re

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


TOKEN_SAMPLE_BYTES = 64 << 20  # token ids read per .bin file for the vocabulary check (the whole file if smaller)


MAX_SAMPLES = 10**10  # megatron's sample / shuffle indices take ~16 bytes per sample: 1e10 samples ~ 160 GB
MAX_EPOCHS = 1000  # passes over an indexed dataset that a budget may ask for


def _check_sources(cfg: RootConfig) -> list[int]:
    """Tokens of each data.paths source. A sharded preparation (``<prefix>.manifest.json``) is read from its manifest:
    its tokenizer must be the one training uses (data.tokenizer, and the parent's when continuing one), compared
    by vocabulary hash, and its size must fit model.vocab_size; other prefixes get the token-id scan."""
    from evolm_nemo.data.prepare import MANIFEST_SUFFIX, read_manifest

    d, m = cfg.data, cfg.model
    tokens, ours = [], None
    for prefix in d.paths:
        manifest = None if Path(prefix + ".bin").exists() else read_manifest(prefix)
        if manifest is None:
            tokens.append(check_token_ids([prefix], m.vocab_size))
            continue
        theirs = manifest.get("tokenizer") or {}
        if ours is None:
            ours = _training_tokenizers(cfg)
        for key, ref, fp in ours:
            if theirs.get("vocab_sha256") != fp["vocab_sha256"]:
                raise ConfigError(key, f"{prefix}{MANIFEST_SUFFIX} was prepared with tokenizer {theirs.get('name')} "
                                       f"(vocabulary {theirs.get('vocab_sha256')}, {theirs.get('size')} tokens), "
                                       f"not {ref} (vocabulary {fp['vocab_sha256']}, {fp['size']} tokens); prepare "
                                       "the data with the model's tokenizer")
        if int(theirs.get("size") or 0) > m.vocab_size:
            raise ConfigError("data.paths", f"{prefix}: its tokenizer has {theirs.get('size')} tokens, more than "
                                            f"model.vocab_size={m.vocab_size}")
        tokens.append(int(manifest["tokens"]))
    return tokens


def _training_tokenizers(cfg: RootConfig) -> list:
    """(key, reference, fingerprint) of the tokenizers a run's data must match: data.tokenizer, and the tokenizer
    recorded by the parent checkpoint (train.init_from / train.branch_from) when it can be loaded here."""
    from evolm_nemo.data.sft import tokenizer_fingerprint
    from evolm_nemo.data.tokenizer import load_tokenizer

    out = []
    if cfg.data.tokenizer:
        out.append(("data.tokenizer", cfg.data.tokenizer,
                    tokenizer_fingerprint(load_tokenizer(cfg.data.tokenizer, key="data.tokenizer"))))
    parent = cfg.train.init_from or cfg.train.branch_from
    if parent:
        from evolm_nemo.checkpoint import io as ckpt

        try:
            ref = ckpt.parent_tokenizer(parent)
            if ref and ref != cfg.data.tokenizer:
                out.append(("train.init_from" if cfg.train.init_from else "train.branch_from", f"{ref} (the parent's)",
                            tokenizer_fingerprint(load_tokenizer(ref))))
        except (ckpt.CheckpointError, ConfigError):
            pass  # the parent is checked elsewhere; its tokenizer may live on another machine
    return out


def _check_mix_sizes(cfg: RootConfig, iters: int, source_tokens: list[int]) -> None:
    """A mix (two or more data.paths) may not ask a source for more tokens than it has -- megatron would silently
    repeat it -- unless data.max_epochs allows that many passes."""
    from evolm_nemo.config.tokens import format_tokens

    d = cfg.data
    if len(source_tokens) < 2:
        return
    weights = list(d.weights) if d.weights is not None else [float(t) for t in source_tokens]
    total_w = float(sum(weights))
    budget = iters * cfg.parallel.global_batch_size * cfg.model.seq_length
    for prefix, w, have in zip(d.paths, weights, source_tokens):
        asked = budget * float(w) / total_w
        if have and asked > d.max_epochs * have:
            raise ConfigError("data.paths", f"{prefix} has {format_tokens(have)} tokens ({have:,}) but the mix asks it "
                                            f"for {format_tokens(int(asked))} ({float(w) / total_w:.1%} of "
                                            f"{format_tokens(budget)}) = {asked / have:.2f} passes; prepare more, "
                                            f"lower its weight or the budget, or allow repeats with "
                                            f"data.max_epochs={math.ceil(asked / have * 100) / 100}")


def _check_budget(cfg: RootConfig, iters: int, dataset_tokens: int | None) -> None:
    """Refuse, before megatron builds its sample indices (minutes to hours, memory ~ samples), budgets that cannot be
    meant: more samples than an index can hold, or more than MAX_EPOCHS passes over the prepared data."""
    from evolm_nemo.config.tokens import format_tokens

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


def check_token_ids(prefixes, vocab_size: int, sample_bytes: int = TOKEN_SAMPLE_BYTES) -> int:
    """Token ids of each prepared ``<prefix>.bin`` must fit ``model.vocab_size`` (data tokenized with a larger
    vocabulary would index past the embedding). Reads the ``.idx`` header for the dtype, then the maximum id over the
    whole ``.bin`` when it is at most `sample_bytes`, else over evenly spaced chunks totalling about that much.
    Returns the number of tokens in all files."""
    import struct

    import numpy as np

    total = 0
    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
              8: np.uint16}
    for prefix in prefixes:
        idx, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
        try:
            with open(idx, "rb") as f:
                header = f.read(9 + 8 + 1)
            if header[:9] != b"MMIDIDX\x00\x00":
                raise ValueError("not a megatron index file")
            code = struct.unpack("<B", header[17:18])[0]
            dtype = np.dtype(dtypes[code])
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise ConfigError("data.paths", f"{idx}: unreadable index ({exc}); re-run evolm prepare") from None
        size = bin_path.stat().st_size
        count = size // dtype.itemsize
        total += count
        if count == 0:
            continue
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))
        per_read = max(1, sample_bytes // dtype.itemsize)
        if count <= per_read:
            top = int(tokens.max())
            where = "its largest token id"
        else:
            chunks = 64
            step = per_read // chunks
            starts = np.linspace(0, count - step, chunks).astype(np.int64)
            top = max(int(tokens[s0:s0 + step].max()) for s0 in starts)
            where = f"a sample of {per_read:,} of its {count:,} tokens has id"
        del tokens
        if top >= vocab_size:
            raise ConfigError("data.paths", f"{bin_path}: {where} {top} >= model.vocab_size={vocab_size}; it was "
                                            "tokenized with a larger vocabulary than the model's (check "
                                            "data.tokenizer and model.vocab_size)")
    return total
