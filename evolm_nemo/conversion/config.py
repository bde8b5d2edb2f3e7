"""Typed settings of the conversion commands (`evolm export-hf`, `evolm import-hf`; documented in
recipes/export_hf.yaml and recipes/import_hf.yaml): conversion/cli.py composes them from the recipes,
``conversion.export.export`` and ``conversion.importer.import_hf`` take them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from evolm_nemo.config.errors import ConfigError, check_seed


def check_probe(cfg) -> None:
    """The verification settings of an export or import (``verify_tol``, ``probe_batch``, ``probe_len``), before any
    work; and the process seed."""
    check_seed("seed", cfg.seed)
    if not cfg.verify:
        return
    if not (cfg.verify_tol > 0 and math.isfinite(cfg.verify_tol)):  # (NaN and inf would pass any export)
        raise ConfigError("verify_tol", f"must be a finite number > 0, got {cfg.verify_tol}")
    for key in ("probe_batch", "probe_len"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, f"must be an integer >= 1 (the verification probe's size), got {value!r}")


@dataclass
class ExportHFConfig:
    src: Optional[str] = None  # megatron checkpoint dir (iter_*), checkpoint root or run dir (latest complete)
    dst: Optional[str] = None  # output HF directory (must not exist unless overwrite)
    dtype: str = "auto"  # auto (the checkpoint's stored dtype) | fp32 | bf16 | fp16
    max_shard_size: str = "2GB"  # safetensors shard size limit (2GB, 500MB, bytes)
    tokenizer: Optional[str] = None  # tokenizer dir or hub name (default: the one recorded in the checkpoint)
    tie: Optional[bool] = None  # tie lm_head to embed_tokens: null = only if the two tensors are bitwise equal
    verify: bool = True  # reload with transformers and compare logits with the megatron model
    verify_tol: float = 1.0e-4  # max |logit diff| allowed (both sides fp32)
    probe_batch: int = 2  # verification probe: sequences
    probe_len: int = 32  # verification probe: tokens per sequence
    overwrite: bool = False  # replace an existing dst (only after the new export succeeded)
    seed: int = 0  # seed for the process (the probe has its own fixed seed)
    progress: bool = True  # progress bar


@dataclass
class ImportParallel:
    tp: int = 1  # tensor-parallel size the checkpoint is meant for (checked; the checkpoint reshards on load)
    pp: int = 1  # pipeline-parallel size the checkpoint is meant for


@dataclass
class ImportHFConfig:
    src: Optional[str] = None  # HF model directory (config.json + safetensors or pytorch_model.bin)
    dst: Optional[str] = None  # checkpoint root to create; the checkpoint is <dst>/iter_0000000
    name: Optional[str] = None  # model name recorded in the checkpoint (default: the source dir's name)
    parallel: ImportParallel = field(default_factory=ImportParallel)
    dtype: str = "auto"  # auto (the source's dtype) | fp32 | bf16 | fp16: dtype stored in the checkpoint
    tokenizer: Optional[str] = None  # tokenizer dir when src has none
    verify: bool = True  # compare our logits with transformers' on the source before writing
    verify_tol: float = 1.0e-4  # max |logit diff| allowed (fp32)
    probe_batch: int = 2  # verification probe: sequences
    probe_len: int = 32  # verification probe: tokens per sequence
    overwrite: bool = False  # replace an existing dst
    seed: int = 0  # process seed
    progress: bool = True  # progress bar


@dataclass
class ReleaseConfig:
    src: Optional[str] = None  # one run: its run directory (<run>/checkpoints)
    suite: Optional[str] = None  # or a suite (recipes/suite/<name>.yaml or a YAML path): its finished train nodes
    root: Optional[str] = None  # the suite's root (default: the suite recipe's)
    only: Optional[List[str]] = None  # suite nodes to release (default: every finished train node)
    repo: Optional[str] = None  # repo id or pattern: {org} {suite} {node} {stage} {size} {model}
    org: Optional[str] = None  # user or organization for {org}
    index_repo: str = "{org}/evolm-{suite}"  # suite: the index card's repo (pattern; {org} {suite})
    revisions: bool = True  # every kept intermediate checkpoint as branch step-<iteration>
    private: bool = False  # create the repos private
    dry_run: bool = False  # print every repo, branch and file; no network, nothing written
    overwrite: bool = False  # replace a branch holding another run's release (or files no release made)
    out: Optional[str] = None  # staging root for the verified exports (default: <run dir>/release)
    dtype: str = "auto"  # export dtype: auto | fp32 | bf16 | fp16
    max_shard_size: str = "2GB"  # safetensors shard size limit
    verify_tol: float = 1.0e-4  # export check: max |logit diff|
    message: str = "evolm release"  # commit message
