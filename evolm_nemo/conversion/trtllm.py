"""``evolm export-trtllm``: an HF Llama directory -> a TensorRT-LLM engine for EvoLM sampling (n=16, context 2048).

``tensorrt_llm`` only runs on NVIDIA GPUs and is installed in NVIDIA's container; it is imported lazily, and its
absence is a one-line error naming that container. The engine is built through the LLM API's TensorRT backend
(``tensorrt_llm._tensorrt_engine.LLM`` + ``BuildConfig``): paged KV cache, no beam search, ``max_batch`` sequences in
flight (n=16 samples of one prompt occupy 16 slots). Note that the exported HF directory itself also loads directly
in the LLM API's default PyTorch backend (``tensorrt_llm.LLM(model=hf_dir)``) without any build step.

This path is written against TensorRT-LLM 1.x's documented API and has not run in this repository's CI (no GPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.conversion import hf, hfdir
from evolm_nemo.conversion.export import TOKENIZER_FILES
from evolm_nemo.fileio import check_dst, commit_dir, resolved, temp_dir

CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release"
_TRT_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _check(cfg) -> tuple[Path, Path, dict]:
    if not cfg.src:
        raise ConfigError("src", "must be set: src=<HF directory, e.g. the output of export-hf>")
    if not cfg.dst:
        raise ConfigError("dst", "must be set: dst=<engine directory to create>")
    src = resolved(cfg.src, "src")
    raw = hfdir.read_config(src)
    hf.check_config(raw)
    if hf.head_kind(raw) != "lm":
        raise ConfigError("architectures", "TensorRT-LLM engines are built for LlamaForCausalLM only")
    dst = resolved(cfg.dst, "dst")
    check_dst(dst, cfg.overwrite, sources=(src,), kind="trtllm-engine")
    for key in ("max_batch", "max_seq", "max_num_tokens", "n", "tp"):
        if getattr(cfg, key) < 1:
            raise ConfigError(key, "must be >= 1")
    if cfg.max_batch < cfg.n:
        raise ConfigError("max_batch", f"{cfg.max_batch} cannot hold the n={cfg.n} samples of one prompt")
    if not 0 < cfg.kv_cache_fraction <= 1:
        raise ConfigError("kv_cache_fraction", "must be in (0, 1]")
    if cfg.dtype != "auto" and cfg.dtype not in _TRT_DTYPE:
        raise ConfigError("dtype", f"{cfg.dtype!r} is not one of auto, {', '.join(_TRT_DTYPE)}")
    if cfg.max_seq > (raw.get("max_position_embeddings") or cfg.max_seq):
        raise ConfigError("max_seq", f"{cfg.max_seq} exceeds the model's max_position_embeddings "
                                     f"{raw['max_position_embeddings']}")
    return src, dst, raw


def build(cfg) -> Path:
    src, dst, raw = _check(cfg)
    try:
        import tensorrt_llm  # noqa: F401
        from tensorrt_llm import BuildConfig
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
    except Exception as exc:  # ImportError, or a broken CUDA stack raising at import time
        raise ConfigError("tensorrt_llm", f"not usable here ({type(exc).__name__}); run export-trtllm on a GPU in "
                                          f"NVIDIA's TensorRT-LLM container {CONTAINER}") from None

    dtype = _TRT_DTYPE[cfg.dtype] if cfg.dtype != "auto" else (raw.get("dtype") or raw.get("torch_dtype") or "auto")
    build_config = BuildConfig(max_batch_size=cfg.max_batch, max_seq_len=cfg.max_seq,
                               max_num_tokens=cfg.max_num_tokens, max_beam_width=1)
    plugin = getattr(build_config, "plugin_config", None)
    if plugin is not None and hasattr(plugin, "paged_kv_cache"):
        plugin.paged_kv_cache = True
    tmp = temp_dir(dst, owned=True)
    try:
        llm = LLM(model=str(src), dtype=dtype, tensor_parallel_size=cfg.tp, build_config=build_config,
                  kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=cfg.kv_cache_fraction))
        llm.save(str(tmp))
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
        record = {"source": str(src), "max_batch": cfg.max_batch, "max_seq": cfg.max_seq, "n": cfg.n,
                  "max_num_tokens": cfg.max_num_tokens, "dtype": dtype, "tp": cfg.tp, "paged_kv_cache": True,
                  "kv_cache_fraction": cfg.kv_cache_fraction, "stop_strings": list(cfg.stop_strings),
                  "tensorrt_llm": getattr(tensorrt_llm, "__version__", "?")}
        (tmp / "evolm_trtllm.json").write_text(json.dumps(record, indent=1) + "\n")
        shutdown = getattr(llm, "shutdown", None)
        if shutdown:
            shutdown()
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"built TensorRT-LLM engine {src} -> {dst}")
    return dst
