"""CLI entry points of the conversion commands (registered in evolm_nemo/cli.py): compose the recipe into its typed
settings (conversion/config.py; export-trtllm's below) and call the library function.

    evolm export-hf src=runs/tiny_pretrain dst=out/tiny-hf
    evolm import-hf src=hf/myllama-1B dst=ckpt/myllama-1B parallel.tp=2
    evolm export-trtllm src=out/tiny-hf dst=out/tiny-trt
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from evolm_nemo.config.compose import compose
from evolm_nemo.conversion.config import ExportHFConfig, ImportHFConfig
from evolm_nemo.tasks import STOP


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
    cfg = compose("export_hf", overrides, ExportHFConfig)  # a recipe error is one line, before torch is imported
    from evolm_nemo.conversion.export import export

    export(cfg)
    return 0


def import_hf(overrides: list[str]) -> int:
    cfg = compose("import_hf", overrides, ImportHFConfig)  # a recipe error is one line, before torch is imported
    from evolm_nemo.conversion.importer import import_hf as run

    run(cfg)
    return 0


def export_trtllm(overrides: list[str]) -> int:
    cfg = compose("export_trtllm", overrides, ExportTRTLLMConfig)  # a recipe error is one line, before torch is imported
    from evolm_nemo.conversion.trtllm import build

    build(cfg)
    return 0
