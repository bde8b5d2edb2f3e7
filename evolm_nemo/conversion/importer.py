"""``evolm import-hf``: an HF Llama-family directory -> our megatron checkpoint, a parent for cpt/sft/ppo.

Design: one process builds the model at TP=1 / PP=1 and copies the HF tensors in one by one (peak memory: the fp32
model plus a few tensors). A dist-checkpoint is reshardable, so this checkpoint loads at any TP/PP;
``parallel.tp``/``parallel.pp`` are checked against the shapes up front (they must divide heads, KV groups, FFN
size, vocabulary and layers) and recorded as the intended layout. Before saving, the model's logits on a probe batch
are compared with transformers' on the source (fp32, tolerance 1e-4). Output is written to a temporary directory
next to ``dst`` and renamed at the end; the HF tokenizer files are copied into ``<dst>/iter_0000000/tokenizer/``.

Resulting layout::

    <dst>/iter_0000000/       dist-checkpoint + evolm.json (meta: model, config, tokenizer, lineage, stage, head)
    <dst>/iter_0000000/tokenizer/
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from evolm_nemo.checkpoint import io
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import ParallelConfig
from evolm_nemo.conversion import hf, hfdir
from evolm_nemo.conversion.config import check_probe
from evolm_nemo.conversion.export import (TOKENIZER_FILES, hf_logits, megatron_logits, parse_dtype, probe_ids,
                                          release_memory, single_process)
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.fileio import check_dst, check_writable, commit_dir, resolved, temp_dir
from evolm_nemo.model.build import build_model
from evolm_nemo.model.heads import build_value_model
from evolm_nemo.runtime import distributed
from evolm_nemo.runtime.distributed import owned_group


def _tied(cfg: dict, weights: hf.HFWeights, head: str) -> bool:
    """Tied when config.json says so (default False, like Llama) or when a causal LM stores no lm_head."""
    if head != "lm":
        return False
    return bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in weights.names()


def _check_layout(m, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ConfigError("parallel.tp" if tp < 1 else "parallel.pp", "must be >= 1")
    if m.num_attention_heads % tp or m.num_query_groups % tp:
        raise ConfigError("parallel.tp", f"{tp} must divide num_attention_heads={m.num_attention_heads} and "
                                         f"num_key_value_heads={m.num_query_groups}")
    if m.ffn_hidden_size % tp or m.vocab_size % tp:
        raise ConfigError("parallel.tp", f"{tp} must divide intermediate_size={m.ffn_hidden_size} and "
                                         f"vocab_size={m.vocab_size} (vocabulary padding is not supported)")
    if m.num_layers % pp:
        raise ConfigError("parallel.pp", f"{pp} must divide num_hidden_layers={m.num_layers}")


def import_hf(cfg) -> Path:
    """Run the command described by ``cfg`` (conversion.config.ImportHFConfig). Returns the checkpoint directory.
    The one-rank process group it creates is gone when it returns."""
    with owned_group():
        return _import_hf(cfg)


def _import_hf(cfg) -> Path:
    """Run an import described by ``cfg`` (conversion.config.ImportHFConfig). Returns the checkpoint directory."""
    from tqdm import tqdm

    if not cfg.src:
        raise ConfigError("src", "must be set: src=<HF model directory>")
    if not cfg.dst:
        raise ConfigError("dst", "must be set: dst=<checkpoint directory to create>")
    src = resolved(cfg.src, "src")
    check_probe(cfg)
    raw = hfdir.read_config(src)
    hf.check_config(raw)
    head = hf.head_kind(raw)
    role = hfdir.export_role(src)  # an `evolm export-hf` output: what it was (a PPO critic stays one)
    if role == "critic" and head != "value":
        raise ConfigError("src", f"{src / hfdir.EXPORT_RECORD} records a PPO critic, but {src / 'config.json'} "
                                 "describes a language model: the files do not belong together")
    if cfg.verify and "model_type" not in raw:
        raise ConfigError("model_type", f"{src / 'config.json'} names no model_type, so transformers cannot load the "
                                        "source to verify the import; add \"model_type\": \"llama\" (or verify=false)")
    m = hf.model_config(raw, cfg.name or src.name)
    _check_layout(m, cfg.parallel.tp, cfg.parallel.pp)
    weights = hf.HFWeights(src)
    tied = _tied(raw, weights, head)
    weights.check(m, head, tied)
    tok_files = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    tok_src = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else src
    if cfg.tokenizer:
        if not tok_src.is_dir():
            raise ConfigError("tokenizer", f"{cfg.tokenizer} is not a directory")
        tok_files = [n for n in TOKENIZER_FILES if (tok_src / n).is_file()]
    if not tok_files:
        raise ConfigError("tokenizer", f"no tokenizer files in {tok_src}; pass tokenizer=<HF tokenizer dir>")
    # the files are copied verbatim: they must load now, not at the first use of the checkpoint
    tok_key = "tokenizer" if cfg.tokenizer else "src"
    tok = load_tokenizer(tok_src, key=tok_key)
    if len(tok) > m.vocab_size:
        raise ConfigError(tok_key, f"the tokenizer in {tok_src} has {len(tok)} tokens, more than the model's "
                                   f"vocab_size={m.vocab_size}: ids from {m.vocab_size} on have no embedding")
    dst = resolved(cfg.dst, "dst")
    check_writable(dst, "dst", directory=True)
    check_dst(dst, cfg.overwrite, sources=(src, tok_src), kind="hf-import")
    dtype = parse_dtype(cfg.dtype) or weights.dtype()
    single_process("import-hf")

    t0 = time.time()
    distributed.setup(1, 1, seed=cfg.seed, precision="fp32")
    local = dataclasses.replace(m, layer_spec="local")
    builder = build_value_model if head == "value" else build_model
    model = builder(local, ParallelConfig(tp=1, pp=1), torch.float32)
    params = {k: v for k, v in hf.iter_megatron(model.state_dict())}
    bar = tqdm(total=sum(v.numel() for v in params.values()), unit="param", unit_scale=True, desc="import-hf",
               disable=not cfg.progress)
    with torch.no_grad():
        for name, param in params.items():
            value = hf.from_hf(name, weights.get, m, head, tied)
            param.copy_(value)  # fp32 holds fp32/bf16/fp16 values exactly
            del value
            bar.update(param.numel())
    bar.close()
    del params
    ids = probe_ids(m.vocab_size, cfg.probe_batch, min(cfg.probe_len, m.seq_length))
    reference = megatron_logits(model, ids) if cfg.verify else None
    model.to(dtype)  # store in the source's dtype: a bf16 source stays bf16 (and exports back bitwise)

    tmp = temp_dir(dst, owned=True)
    try:
        tok_dir = dst / "iter_0000000" / "tokenizer"  # where it will be after the final rename
        meta = {
            "model": dataclasses.asdict(m),
            "config": {"import_hf": dataclasses.asdict(cfg), "parallel": dataclasses.asdict(cfg.parallel)},
            "tokenizer": str(tok_dir),
            "lineage": {"parents": [{"hf": str(src), "architecture": (raw.get("architectures") or ["?"])[0],
                                     **({"role": role} if role else {})}],
                        "stages": [{"stage": "import-hf", "source": str(src)}]},
            "stage": "import",
            "head": head,
            **({"role": "critic"} if role == "critic" else {}),  # as the critic's own checkpoints (reward.check)
            "dtype": hf.SHORT.get(dtype, "fp32"),
            "hf_config": raw,
        }
        layout = {"tp": 1, "pp": 1, "intended": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp}}
        saved = io.save(tmp, 0, [model], meta=meta, layout=layout)
        del model
        release_memory()
        (saved / "tokenizer").mkdir()
        for name in tok_files:
            shutil.copy2(tok_src / name, saved / "tokenizer" / name)
        check = None
        if cfg.verify:
            got = hf_logits(src, head, ids)
            diff = (got - reference).abs().max().item()
            if not diff <= cfg.verify_tol:
                raise ConfigError("verify", f"megatron logits differ from transformers' by {diff:.3g} > "
                                            f"verify_tol={cfg.verify_tol:g}; nothing written")
            check = {"max_diff": diff, "tol": cfg.verify_tol, "probe": f"{ids.shape[0]}x{ids.shape[1]}"}
        (saved / "evolm_import.json").write_text(json.dumps(
            {"source": str(src), "verify": check, "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    msg = f"imported {src} -> {dst}/iter_0000000 ({head}{', a PPO critic' if role == 'critic' else ''}, " \
          f"{hf.SHORT.get(dtype, dtype)}"
    msg += f", verified: max |logit diff| {check['max_diff']:.2e})" if check else ")"
    print(msg)
    return dst / "iter_0000000"
