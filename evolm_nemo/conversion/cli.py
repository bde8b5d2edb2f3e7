"""CLI entry points of the conversion commands (registered in evolm_nemo/cli.py): schema + recipe + dispatch.

    evolm export-hf src=runs/tiny_pretrain dst=out/tiny-hf
    evolm import-hf src=hf/myllama-1B dst=ckpt/myllama-1B parallel.tp=2
    evolm export-trtllm src=out/tiny-hf dst=out/tiny-trt
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from evolm_nemo.config.compose import compose
from evolm_nemo.tasks import STOP


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
class ExportTRTLLMConfig:
    src: Optional[str] = None  # HF directory (e.g. the output of export-hf)
    dst: Optional[str] = None  # engine directory to create
    max_batch: int = 256  # max concurrent sequences (n=16 sampling of 16 prompts = 256)
    max_seq: int = 2048  # max prompt + generated tokens (EvoLM: 2048)
    max_num_tokens: int = 8192  # max tokens per engine step (prefill chunk)
    n: int = 16  # samples per prompt the engine must serve (max_batch must hold at least one prompt's n)
    dtype: str = "auto"  # auto (from config.json) | bf16 | fp16 | fp32
    tp: int = 1  # tensor-parallel GPUs for the engine
    kv_cache_fraction: float = 0.9  # fraction of free GPU memory for the paged KV cache
    overwrite: bool = False  # replace an existing dst
    stop_strings: List[str] = field(default_factory=lambda: list(STOP))


def export_hf(overrides: list[str]) -> int:
    from evolm_nemo.conversion.export import export

    export(compose("export_hf", overrides, ExportHFConfig))
    return 0


def import_hf(overrides: list[str]) -> int:
    from evolm_nemo.conversion.importer import import_hf as run

    run(compose("import_hf", overrides, ImportHFConfig))
    return 0


def export_trtllm(overrides: list[str]) -> int:
    from evolm_nemo.conversion.trtllm import build

    build(compose("export_trtllm", overrides, ExportTRTLLMConfig))
    return 0
