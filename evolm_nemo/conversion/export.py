"""``evolm export-hf``: a megatron checkpoint (any TP/PP) -> a verified HF ``LlamaForCausalLM`` directory.

One process. dist-checkpointing reshards any saved layout into a TP=1 / PP=1 model on load; its tensors are then
streamed into safetensors shards (one HF tensor copied at a time, so peak memory is the fp32 model plus one shard).
Then the megatron model is freed, the written directory is loaded with transformers, and both models' logits on a
fixed probe batch are compared. Both sides compute in fp32 (a bf16 export is upcast exactly; megatron's side
computes with the weights rounded to the export's dtype first, as transformers will read them), so the tolerance is
1e-4 whatever the stored dtype. Everything is written into a temporary directory next to ``dst`` and renamed at the
end: a failed check or any error leaves no ``dst``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from evolm_nemo.checkpoint import io
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import ModelConfig, ParallelConfig
from evolm_nemo.conversion import hf
from evolm_nemo.conversion.config import check_probe
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.fileio import check_dst, check_writable, commit_dir, disk_full, resolved, temp_dir, write_error, \
    writing
from evolm_nemo.model.build import build_model, param_count
from evolm_nemo.model.heads import build_value_model
from evolm_nemo.runtime import distributed
from evolm_nemo.runtime.distributed import owned_group
from evolm_nemo.tasks import STOP

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt")


# ------------------------------------------------------------------------------------------------------ small parts

def model_from_meta(meta: dict, where: str, key: str = "src") -> ModelConfig:
    """The model shape a checkpoint's evolm.json records, each value of its field's type (an edited or damaged
    record is a ConfigError naming ``key``, not a TypeError deep in the model build)."""
    raw = meta.get("model")
    if not isinstance(raw, dict):
        raise ConfigError(key, f"{where}: evolm.json has no 'model' config; cannot rebuild the model")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for name, value in raw.items():
        if name not in fields:
            continue
        default = fields[name].default
        want = (int, float) if isinstance(default, float) else type(default)
        if default is not None and value is not None and (
                not isinstance(value, want) or (isinstance(value, bool) and not isinstance(default, bool))):
            raise ConfigError(key, f"{where}: evolm.json's model.{name} is {value!r}, expected {type(default).__name__}; "
                                   "the record is damaged or edited")
    return ModelConfig(**{k: v for k, v in raw.items() if k in fields})


def parse_dtype(text: str, key: str = "dtype") -> torch.dtype | None:
    if text == "auto":
        return None
    if text not in hf.DTYPES:
        raise ConfigError(key, f"{text!r} is not one of auto, {', '.join(hf.DTYPES)}")
    return hf.DTYPES[text]


def find_tokenizer(ckpt: Path, meta: dict, override: str | None) -> str:
    """The tokenizer source: ``override``, the checkpoint's own ``tokenizer/`` copy, or meta['tokenizer'] (a dir,
    relative to the checkpoint or absolute, or a hub name)."""
    if override:
        return override
    local = ckpt / "tokenizer"
    if local.is_dir():
        return str(local)
    recorded = meta.get("tokenizer")
    if not recorded:
        raise ConfigError("tokenizer", f"{ckpt} records no tokenizer; pass tokenizer=<dir or hub name>")
    rel = ckpt / str(recorded)
    return str(rel) if rel.is_dir() else str(recorded)


def write_tokenizer(tok, source: str, out: Path) -> None:
    """Copy the tokenizer's files verbatim from a local dir (else save_pretrained, e.g. for a hub name)."""
    src = Path(source).expanduser()
    copied = False
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
                copied = True
    if not copied:
        tok.save_pretrained(str(out))


def special_ids(tok) -> dict:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": pad}


def probe_ids(vocab: int, batch: int, length: int, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, V]`` (values ``[b, s, 1]`` for a value model) of a TP=1 / PP=1 model, in fp32 on CPU."""
    model.eval()
    device = next(model.parameters()).device
    ids = ids.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    return model(ids, pos, None).float().cpu()


@torch.no_grad()
def hf_logits(model_dir: Path, head: str, ids: torch.Tensor) -> torch.Tensor:
    """The same probe through transformers loading ``model_dir`` (fp32)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar covers the export; keep stderr for errors
    cls = AutoModelForSequenceClassification if head == "value" else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    model.eval()
    if head == "value":  # per-token scores (the classifier itself pools the last token)
        out = model.score(model.model(input_ids=ids).last_hidden_state)
    else:
        out = model(input_ids=ids).logits
    del model
    return out.float()


class ShardWriter:
    """Streams named tensors into safetensors shards of at most ``max_bytes`` (a larger tensor gets its own)."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buf[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        path = self.out / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buf, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buf)))
        self.buf, self.size = {}, 0

    def close(self) -> list[str]:
        """Final HF names (``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + index)."""
        self.flush()
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, tensors), name in zip(self.parts, names):
            os.replace(path, self.out / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def release_memory() -> None:
    """Collect, then hand freed heap memory back to the OS (glibc keeps freed blocks under its mmap threshold; on a
    1B model that was ~2 GB held while the verification model loads)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def tensors_metadata(ckpt: Path) -> dict:
    """The checkpoint's tensor metadata (``.metadata``); a damaged one is a one-line ConfigError naming it."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_tensors_metadata(str(ckpt))
    except Exception as exc:  # noqa: BLE001 - pickle / dist-checkpointing errors come in many types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError("src", f"{ckpt / '.metadata'}: unreadable checkpoint metadata ({type(exc).__name__}: "
                                 f"{first}); the checkpoint is damaged: use an earlier one") from None


def check_shapes(ckpt: Path, model) -> None:
    """Every tensor of the model the checkpoint's config describes exists in the checkpoint with its shape."""
    from megatron.core.dist_checkpointing import ShardedTensor

    stored = tensors_metadata(ckpt)
    for item in model.sharded_state_dict().values():
        if not isinstance(item, ShardedTensor):
            continue
        have = stored.get(item.key)
        if have is None:
            raise ConfigError("src", f"{ckpt}: tensor {item.key} is missing from the checkpoint")
        if tuple(have.global_shape) != tuple(item.global_shape):
            raise ConfigError("src", f"{ckpt}: tensor {item.key} has shape {list(have.global_shape)}, the model "
                                     f"config in evolm.json implies {list(item.global_shape)}")


def stored_dtype(ckpt: Path) -> torch.dtype:
    """The dtype of the model's tensors in ``ckpt`` (the optimizer's fp32 main params and moments left out); fp32
    when they are mixed."""
    stored = tensors_metadata(ckpt)
    found = {t.dtype for k, t in stored.items()
             if not str(k).startswith("optimizer.") and getattr(t, "dtype", None) in hf.SHORT}
    return found.pop() if len(found) == 1 else torch.float32


def single_process(command: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("launch", f"{command} runs in one process (dist-checkpoints reshard on load); "
                                    "run it without torchrun")


# ------------------------------------------------------------------------------------------------------- model card

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "-"
    return str(value)


def _flat(value: Any) -> bool:
    if isinstance(value, dict):
        return all(not isinstance(v, (dict, list)) for v in value.values())
    if isinstance(value, list):
        return all(not isinstance(v, (dict, list)) for v in value)
    return True


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    return _fmt(value)


def _bullets(obj: Any, depth: int = 0) -> list[str]:
    """Nested dicts/lists (free-form lineage, metrics) as a Markdown list; flat parts stay on one line."""
    pad = "  " * depth
    lines = []
    items = obj.items() if isinstance(obj, dict) else ((None, v) for v in obj) if isinstance(obj, list) else [(None,
                                                                                                              obj)]
    for key, value in items:
        label = f"**{key}**: " if key is not None else ""
        if _flat(value):
            lines.append(f"{pad}- {label}{_inline(value)}")
        else:
            lines.append(f"{pad}- {label}".rstrip() if key is not None else f"{pad}-")
            lines += _bullets(value, depth + 1)
    return lines


def model_card(name: str, m: ModelConfig, head: str, meta: dict, dtype: torch.dtype, params: int,
               check: dict | None) -> str:
    arch = "LlamaForSequenceClassification (num_labels=1)" if head == "value" else "LlamaForCausalLM"
    what = ("PPO critic (a value model: it predicts returns, not rewards; no reward model)"
            if meta.get("role") == "critic" else "value/reward model" if head == "value" else "language model")
    cfg = meta.get("config") or {}
    train, data = cfg.get("train") or {}, cfg.get("data") or {}
    lines = [
        f"# {name}", "",
        f"An EvoLM-style LLaMA-2 {what} trained with evolm-nemo (megatron-core) and exported by `evolm export-hf`.",
        "",
        "## Model", "",
        "| field | value |", "|---|---|",
        f"| architecture | {arch} |",
        f"| parameters | {params:,} |",
        f"| layers / hidden / FFN | {m.num_layers} / {m.hidden_size} / {m.ffn_hidden_size} |",
        f"| heads / KV groups | {m.num_attention_heads} / {m.num_query_groups} |",
        f"| vocab / context | {m.vocab_size} / {m.seq_length} |",
        f"| RMSNorm eps / RoPE theta | {m.norm_eps:g} / {m.rope_base:g} |",
        f"| dtype | {hf.HF_DTYPE[dtype]} |", "",
        "## Lineage", "",
        f"- **stage**: {meta.get('stage', 'unknown')}",
        f"- **iteration**: {meta.get('iteration', '-')}",
    ]
    seen = (meta.get("extra") or {}).get("tokens")
    if seen:
        lines.append(f"- **tokens seen**: {seen:,}")
    if train.get("tokens"):
        lines.append(f"- **token budget**: {train['tokens']}")
    elif train.get("iters"):
        lines.append(f"- **iterations planned**: {train['iters']}")
    if data:
        mix = data.get("paths") or []
        weights = data.get("weights")
        lines.append(f"- **data**: {data.get('name', '-')}" + (f" ({data['hf_dataset']})" if data.get("hf_dataset")
                                                               else ""))
        if mix:
            lines.append("- **data mix**: " + ", ".join(
                f"{p}" + (f" x{w:g}" if weights else "") for p, w in zip(mix, weights or [None] * len(mix))))
    lineage = meta.get("lineage")
    if lineage:
        lines += _bullets(lineage)
    lines.append("")
    metrics = meta.get("metrics")
    if metrics:
        lines += ["## Metrics", ""]
        lines += _bullets(metrics)
        lines.append("")
    lines += ["## Export check", ""]
    if check:
        lines.append(f"transformers logits vs the megatron model on a {check['probe']} random-token probe, fp32: "
                     f"max |diff| = {check['max_diff']:.3g} (tolerance {check['tol']:g}).")
    else:
        lines.append("Not verified (exported with verify=false).")
    lines += [
        "", "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer" if head == "lm" else
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)" if head == "lm" else
        "model = AutoModelForSequenceClassification.from_pretrained(path)  # logits[:, 0] is the score",
    ]
    if head == "lm":
        lines += [
            'ids = tok("Human: What is 2+3?\\nAssistant:", return_tensors="pt").input_ids',
            "# generation_config.json carries EvoLM's stop strings, so generate() needs the tokenizer:",
            "out = model.generate(ids, max_new_tokens=64, tokenizer=tok)",
        ]
    lines += ["```", ""]
    if head == "lm":
        lines += ["vLLM: `vllm.LLM(model=path)`; TensorRT-LLM LLM API: `tensorrt_llm.LLM(model=path)`; EvoLM's stop "
                  "strings: " + ", ".join(f"`{s}`" for s in STOP) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- export

def export(cfg) -> Path:
    """Run the command described by ``cfg`` (conversion.config.ExportHFConfig). Returns the written directory.
    The one-rank process group it creates is gone when it returns."""
    with owned_group():
        return _export(cfg)


def _source(cfg) -> tuple[Path, dict, ModelConfig, str, Path]:
    """The export's checked inputs: (checkpoint dir, its evolm.json, model config, head, resolved dst)."""
    if not cfg.src:
        raise ConfigError("src", "must be set: src=<megatron checkpoint dir, checkpoint root or run dir>")
    if not cfg.dst:
        raise ConfigError("dst", "must be set: dst=<output HF directory>")
    try:
        ckpt = io.resolve(cfg.src)
        meta = io.read_meta(ckpt)
        io.verify(ckpt)  # every file against its recorded checksum: a damaged file is named before anything reads it
    except io.CheckpointError as exc:
        raise ConfigError("src", str(exc)) from None
    m = model_from_meta(meta, str(ckpt))
    head = meta.get("head", "lm")
    if head not in ("lm", "value"):
        raise ConfigError("src", f"{ckpt}: unknown head {head!r} in evolm.json")
    dst = resolved(cfg.dst, "dst")
    check_dst(dst, cfg.overwrite, sources=(cfg.src, ckpt, cfg.tokenizer if cfg.tokenizer and
                                           Path(cfg.tokenizer).expanduser().exists() else None), kind="hf-export")
    check_writable(dst, "dst", directory=True)  # probed for real: read-only mounts, root too
    return ckpt, meta, m, head, dst


def _build_model(ckpt: Path, m: ModelConfig, head: str, seed: int):
    """A single-process fp32 megatron model (local layer spec) of the checkpoint's shapes, weights not loaded yet."""
    distributed.setup(1, 1, seed=seed, precision="fp32")
    local = dataclasses.replace(m, layer_spec="local")  # TE-spec checkpoints load too: the sharded keys agree
    builder = build_value_model if head == "value" else build_model
    model = builder(local, ParallelConfig(tp=1, pp=1), torch.float32)
    check_shapes(ckpt, model)
    return model


def _write_weights(tmp: Path, state: dict, m: ModelConfig, head: str, tied: bool, out_dtype: torch.dtype,
                   max_bytes: int, progress: bool) -> None:
    """The megatron state as HF safetensors shards in ``tmp`` (``output_layer`` left out when tied)."""
    from tqdm import tqdm

    writer = ShardWriter(tmp, max_bytes)
    bar = tqdm(total=sum(v.numel() for v in state.values()), unit="param", unit_scale=True, desc="export-hf",
               disable=not progress)
    for name, tensor in state.items():
        if tied and name == "output_layer.weight":
            bar.update(tensor.numel())
            continue
        for hf_name, part in hf.to_hf(name, tensor, m, head):
            writer.add(hf_name, part.detach().to(device="cpu", dtype=out_dtype, copy=True).contiguous())
        bar.update(tensor.numel())
    bar.close()
    writer.close()


def _verify(tmp: Path, head: str, ids: torch.Tensor, reference: torch.Tensor, tol: float) -> dict:
    """transformers' logits of the written directory against megatron's ``reference``: the check's record."""
    got = hf_logits(tmp, head, ids)
    diff = (got - reference).abs().max().item()
    if not diff <= tol:  # also catches NaN
        raise ConfigError("verify", f"transformers logits differ from megatron's by {diff:.3g} > "
                                    f"verify_tol={tol:g}; nothing written")
    return {"max_diff": diff, "tol": tol, "probe": f"{ids.shape[0]}x{ids.shape[1]}"}


def _export(cfg) -> Path:
    """Run an export described by ``cfg`` (conversion.config.ExportHFConfig). Returns the written directory."""
    ckpt, meta, m, head, dst = _source(cfg)
    out_dtype = parse_dtype(cfg.dtype)
    max_bytes = hf.parse_size(cfg.max_shard_size)
    check_probe(cfg)
    tok_source = find_tokenizer(ckpt, meta, cfg.tokenizer)
    tok = load_tokenizer(tok_source, key="tokenizer")
    if len(tok) > m.vocab_size:
        raise ConfigError("tokenizer", f"{tok_source} has {len(tok)} tokens but the model only {m.vocab_size} rows")
    single_process("export-hf")

    model = _build_model(ckpt, m, head, cfg.seed)
    out_dtype = out_dtype or stored_dtype(ckpt)
    t0 = time.time()
    try:
        io.load_weights(ckpt, [model])  # _source verified every file: not read again (io.verify)
    except io.CheckpointError as exc:  # says what and where itself
        raise ConfigError("src", str(exc)) from None
    except Exception as exc:  # a damaged checkpoint: one line, not a dist-checkpointing traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError("src", f"{ckpt}: cannot load weights: {first}") from None

    state = {k: v for k, v in hf.iter_megatron(model.state_dict())}
    tied = False
    if head == "lm":
        same = torch.equal(state["embedding.word_embeddings.weight"], state["output_layer.weight"])
        tied = same if cfg.tie is None else bool(cfg.tie)
        if tied and not same:
            raise ConfigError("tie", "tie=true but the checkpoint's input and output embeddings differ")
    ids = probe_ids(m.vocab_size, cfg.probe_batch, min(cfg.probe_len, m.seq_length))
    if cfg.verify and out_dtype != torch.float32:  # the reference reads the weights the export will hold
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(out_dtype).to(p.dtype)
    reference = megatron_logits(model, ids) if cfg.verify else None

    with writing(dst, "dst"):
        tmp = temp_dir(dst, owned=True)
    try:
        _write_weights(tmp, state, m, head, tied, out_dtype, max_bytes, cfg.progress)
        params = param_count(m) if head == "lm" else param_count(m) - (m.vocab_size - 1) * m.hidden_size
        if tied:
            params -= m.vocab_size * m.hidden_size
        del state, model
        release_memory()

        config = hf.hf_config(m, head, out_dtype, tied, special_ids(tok))
        config.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        data = json.loads(cfg_path.read_text())
        data.update(hf.legacy_fields(m, out_dtype))
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        write_tokenizer(tok, tok_source, tmp)
        if head == "lm":
            from transformers import GenerationConfig

            ids_ = special_ids(tok)
            GenerationConfig(bos_token_id=ids_["bos"], eos_token_id=ids_["eos"], pad_token_id=ids_["pad"],
                             stop_strings=list(STOP)).save_pretrained(str(tmp))

        check = _verify(tmp, head, ids, reference, cfg.verify_tol) if cfg.verify else None
        card = model_card(dst.name, m, head, meta, out_dtype, params, check)
        (tmp / "README.md").write_text(card)
        # every file as written (the card aside: a release rewrites it), so a later reader can tell a staged export
        # is whole and unedited before reusing it
        written = {p.relative_to(tmp).as_posix(): [p.stat().st_size, io.file_checksum(p)]
                   for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != "README.md"
                   and not p.name.startswith(".")}  # the temporary directory's owner marker is not the export's
        # the role travels with the files: `evolm import-hf` gives it back to the checkpoint it makes, so a PPO
        # critic's export is refused as rl.reward_model (or eval rm=) as the critic itself is
        role = meta.get("role") or ("reward_model" if head == "value" else None)
        record = {"source": str(ckpt), "iteration": meta.get("iteration"), "head": head, "role": role,
                  "dtype": hf.SHORT[out_dtype],
                  "tied": tied, "verify": check, "seconds": round(time.time() - t0, 1),
                  "run_id": meta.get("run_id"), "checksum": io.CHECKSUM, "files": written}
        (tmp / "evolm_export.json").write_text(json.dumps(record, indent=1) + "\n")
        commit_dir(tmp, dst)
    except BaseException as exc:
        full = disk_full(tmp)  # before the cleanup frees the space: some writers lose ENOSPC's errno
        shutil.rmtree(tmp, ignore_errors=True)
        if (error := write_error(exc, dst, "dst", reason=full)) is not None:  # one line, nothing left behind
            raise error from None
        raise
    msg = f"exported {ckpt} -> {dst}"
    if check:
        msg += f" (verified: max |logit diff| {check['max_diff']:.2e} <= {check['tol']:g})"
    print(msg)
    return dst
