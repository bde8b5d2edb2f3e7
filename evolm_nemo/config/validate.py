"""Checks a composed training recipe before any process group, model or file is created: the recipe's own rules (keys,
shapes, parallel layout, optimizer, schedule). What a run reads and writes (outputs, the parent checkpoint, the
stage's data) is checked by ``evolm_nemo.stages.plan_run``, which calls these first.

Each rule raises ConfigError naming the key and the fix; the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from evolm_nemo.config.errors import ConfigError, check_seed
from evolm_nemo.config.schedule import branch_iteration, warmup_iters
from evolm_nemo.config.schema import RootConfig

PRECISIONS = ("auto", "bf16", "fp32")
LAYER_SPECS = ("auto", "te", "local")
DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
SOURCES = ("synthetic", "indexed")


@dataclass(frozen=True)
class Layout:
    """What the recipe alone decides: data-parallel size, tokens per iteration, microbatches per iteration (None
    when microbatches are formed by packing or a token budget: then each batch's examples decide their count)."""

    world_size: int
    dp: int
    tokens_per_iter: int
    num_microbatches: int | None


@dataclass(frozen=True)
class Plan:
    """What planning derives (``stages.plan_run``): data-parallel size, iterations, tokens per iteration,
    microbatches per iteration (None under packing or a token budget, as in ``Layout``)."""

    world_size: int
    dp: int
    iters: int
    tokens_per_iter: int
    num_microbatches: int | None


def positive(key: str, value, allow_zero: bool = False) -> None:
    # ``not value >= 0`` rather than ``value < 0``: every comparison with NaN is False, so NaN must fail the test
    if value is None or not value >= 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def once(key: str, names: list, why: str = "") -> None:
    """Each name listed once in ``names`` (the setting ``key``), or a ConfigError naming the first listed twice and,
    with ``why``, what that would do (a task run twice, and weighed twice in an average)."""
    twice = next((t for k, t in enumerate(names) if t in names[:k]), None)
    if twice is not None:
        raise ConfigError(key, f"{twice!r} is listed twice{f' ({why})' if why else ''}; list each task once")


def choice(key: str, value, options) -> None:
    """``value`` is one of ``options``, or a ConfigError naming ``key``."""
    if value not in options:
        raise ConfigError(key, f"must be one of {', '.join(options)}; got {value!r}")


# RoPE positions are float32 in megatron-core (RotaryEmbedding: torch.arange(seq, dtype=float32)) and in the HF export
# (LlamaRotaryEmbedding: position_ids.float()); float32 holds every integer only up to 2**24, so past it neighbouring
# positions round to one angle (2**24 + 1 -> 2**24): a longer context cannot tell its tokens' positions apart
MAX_SEQ_LENGTH = 2**24
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: weights, rates and losses are float32 tensors
FREE_FORM = ("lineage",)  # provenance carried into checkpoints as given, not a setting the run computes with


def recipe_floats(value, key: str, at: str = ""):
    """``(key, at, float)`` for every float in a composed recipe (a dataclass tree), floats in lists and dicts
    included: a list's items under the list's own key (``data.weights``: the key an override sets) with their place
    in ``at`` (``[0]``), a dict's under ``<key>.<name>`` (``optim.stage_lr.sft``)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            if f.name not in FREE_FORM:
                yield from recipe_floats(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from recipe_floats(item, key, f"{at}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from recipe_floats(item, f"{key}.{name}", at)
    elif isinstance(value, float):
        yield key, at, value


def check_finite(cfg: RootConfig) -> None:
    """Every float of the recipe is finite and fits float32. NaN passes any range rule written as a comparison
    (``x < 0`` is False for NaN) and then poisons the run after the model is built; inf, and a value past float32's
    range (optim.lr=1e300 becomes inf in the optimizer's tensors), train NaN weights or write ``Infinity`` into
    metrics.jsonl (not JSON). One generic rule covers the keys a range rule forgets."""
    for key, at, value in recipe_floats(cfg, ""):
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise ConfigError(key, f"must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.4g}), "
                                   f"got {value!r}{' at ' + at if at else ''}")


def validate(cfg: RootConfig, world_size: int | None = None, global_batches: bool = True) -> Layout:
    """The recipe's own rules, in order; no file is read. Returns the layout at ``world_size`` (default: the
    WORLD_SIZE environment variable, else 1). ``global_batches``: the stage's batches are
    ``parallel.global_batch_size`` sequences (RL's are ``rl.*`` sizes, checked by its stage). Which stage may take
    which keys is the stage registry's to say (``stages.plan_run``)."""
    if not world_size:
        text = os.environ.get("WORLD_SIZE", "1")
        if not text.strip().isdecimal() or int(text) < 1:  # torchrun sets it; by hand it may be anything
            raise ConfigError("WORLD_SIZE", f"must be a positive integer (the number of processes), got {text!r}")
        world_size = int(text)
    m, p, o, t, d = cfg.model, cfg.parallel, cfg.optim, cfg.train, cfg.data
    check_finite(cfg)  # first: the range rules below assume numbers that compare
    choice("train.precision", t.precision, PRECISIONS)
    choice("model.layer_spec", m.layer_spec, LAYER_SPECS)
    choice("model.core_attention", m.core_attention, ("sdpa", "megatron"))
    choice("optim.decay_style", o.decay_style, DECAY_STYLES)
    choice("data.source", d.source, SOURCES)
    if d.source == "synthetic" and d.paths:  # it was ignored without a word: the run trained on generated data
        raise ConfigError("data.paths", f"{list(d.paths)} is set, but data.source=synthetic generates its data and "
                                        "reads no files; add data.source=indexed to train on them, or "
                                        "data.paths=[] to train on generated data")

    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "seq_length"):
        positive(f"model.{key}", getattr(m, key))
    if m.seq_length > MAX_SEQ_LENGTH:
        raise ConfigError("model.seq_length", f"{m.seq_length:,} is more than the {MAX_SEQ_LENGTH:,} (2^24) positions "
                                              "RoPE can tell apart: megatron-core and HF compute positions in float32, "
                                              "which past 2^24 rounds neighbouring positions to one angle")
    # RMSNorm divides by sqrt(mean(x^2) + eps); RoPE raises theta to fractional powers; every fresh weight is drawn
    # from N(0, std), and a std of 0 makes them all 0 (a model from scratch then never breaks symmetry)
    for key in ("norm_eps", "rope_base", "init_method_std"):
        positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError("model.hidden_size", f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError("model.num_query_groups",
                          f"{m.num_query_groups} does not divide num_attention_heads={m.num_attention_heads}")

    for key in ("tp", "pp", "micro_batch_size", "global_batch_size"):
        positive(f"parallel.{key}", getattr(p, key))
    if m.num_attention_heads % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.num_attention_heads={m.num_attention_heads}; pick a divisor")
    if m.num_query_groups % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.num_query_groups={m.num_query_groups}; pick a divisor")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.vocab_size % p.tp:
        raise ConfigError("parallel.tp", f"tp={p.tp} must divide model.vocab_size={m.vocab_size} (megatron splits the "
                                         "embedding rows evenly; vocabulary padding is not supported)")
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
    by_count = not (cfg.train.packing or p.max_tokens_per_microbatch is not None)  # else micro_batch_size is unused
    if global_batches and by_count and p.global_batch_size % (p.micro_batch_size * dp):
        raise ConfigError("parallel.global_batch_size",
                          f"{p.global_batch_size} is not divisible by micro_batch_size*dp = {p.micro_batch_size}*{dp}; "
                          f"use a multiple of {p.micro_batch_size * dp}")
    if global_batches and not by_count and p.global_batch_size % dp:
        raise ConfigError("parallel.global_batch_size", f"{p.global_batch_size} does not split over {dp} data-parallel "
                                                        f"ranks; use a multiple of {dp}")

    for key in ("lr", "weight_decay", "clip_grad", "eps"):
        positive(f"optim.{key}", getattr(o, key), allow_zero=True)
    if o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError("optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if not 0.0 <= o.warmup_fraction < 1.0:
        raise ConfigError("optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}")
    choice("optim.wsd_decay_shape", o.wsd_decay_shape, WSD_SHAPES)
    if not 0.0 < o.wsd_decay_fraction < 1.0:
        raise ConfigError("optim.wsd_decay_fraction", f"must be in (0, 1), got {o.wsd_decay_fraction}")
    if o.warmup_iters is not None:
        positive("optim.warmup_iters", o.warmup_iters, allow_zero=True)

    for key, value in (("train.seed", t.seed), ("data.synthetic_seed", d.synthetic_seed),
                       ("sft.synthetic_seed", cfg.sft.synthetic_seed)):
        check_seed(key, value)

    for key in ("iters", "epochs"):  # counts of any stage (which of them a stage takes is its plan's to say)
        if getattr(t, key) is not None:
            positive(f"train.{key}", getattr(t, key))
    positive("data.max_epochs", d.max_epochs)
    positive("data.synthetic_val_docs", d.synthetic_val_docs, allow_zero=True)
    if t.peak_tflops is not None:  # a per-device peak; null is how to ask for the known GPUs' own
        positive("train.peak_tflops", t.peak_tflops)
    positive("train.log_interval", t.log_interval)
    positive("train.save_interval", t.save_interval, allow_zero=True)
    positive("train.keep_last", t.keep_last)

    return Layout(world_size=world_size, dp=dp, tokens_per_iter=p.global_batch_size * m.seq_length,
                  num_microbatches=p.global_batch_size // (p.micro_batch_size * dp) if by_count else None)


def check_schedule(cfg: RootConfig, iters: int) -> None:
    """The rules that need the stage's iteration count: a warmup as long as the run, a WSD warmup that ends after the
    cooldown starts, and a WSD branch that is not a stable run too. Over the steps the scheduler counts: an
    iteration each, except RL's ``rl.ppo_epochs x rl.mini_batches`` optimizer steps per rollout iteration (its
    schedulers run over those, ``stages.rl.RLStage.build``: ``optim.warmup_iters`` counts them), said so."""
    o, t = cfg.optim, cfg.train
    per = cfg.rl.ppo_epochs * cfg.rl.mini_batches if cfg.stage in ("ppo", "grpo") else 1
    steps = iters * per
    key = "optim.warmup_iters" if o.warmup_iters is not None else "optim.warmup_fraction"
    unit = "iteration" if per == 1 else "step"
    # RL: what a step is, and where the steps fall in the rollout iterations
    counted = "" if per == 1 else (f" (RL schedules count optimizer steps: rl.ppo_epochs x rl.mini_batches = {per} "
                                   f"per iteration, {steps:,} over train.iters={iters:,})")
    warm = warmup_iters(o, steps)
    if o.decay_style != "wsd" and not t.branch_from and steps > 0 and warm >= steps:
        raise ConfigError(key, f"the {warm:,}-{unit} warmup is as long as the whole run ({steps:,} {unit}s){counted}: "
                               f"the learning rate would never reach optim.lr nor decay ({o.decay_style}); shorten it")
    if o.decay_style == "wsd":
        start = branch_iteration(o, steps)
        if warm > start and not t.branch_from:
            raise ConfigError(key, f"the {warm:,}-{unit} warmup runs into the cooldown, which starts at {unit} "
                                   f"{start:,} of {steps:,}{counted}; shorten the warmup or optim.wsd_decay_fraction")
    if t.branch_budgets and t.branch_from:
        raise ConfigError("train.branch_budgets", "a branch decays; it cannot be a stable run too (set "
                                                  "train.branch_budgets=[])")


SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size")


def shape_difference(model, theirs: dict) -> str | None:
    """The first of ``SHAPE_KEYS`` where ``model`` (a ModelConfig) differs from a checkpoint's recorded model dict."""
    return next((k for k in SHAPE_KEYS if k in theirs and theirs[k] != getattr(model, k)), None)


def check_shape(model, meta: dict, says) -> None:
    """A checkpoint (its evolm.json ``meta``) holds a model of ``model``'s shape, or a ConfigError naming the first
    ``model.<key>`` that differs, with ``says(ours, theirs, their preset's name)`` as its message."""
    theirs = meta.get("model") or {}
    key = shape_difference(model, theirs)
    if key is not None:
        raise ConfigError(f"model.{key}", says(getattr(model, key), theirs[key], theirs.get("name")))
