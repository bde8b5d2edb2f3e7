"""Megatron GPTModel <-> HuggingFace Llama: config and weight mapping, both directions, one tensor at a time.

The mapping (measured exact, ../shared/STACK.md): megatron's ``linear_qkv`` rows are grouped per KV group as
``[q_0 .. q_{hpg-1}, k, v]`` (``hpg`` = query heads per group), with no RoPE permutation (megatron's non-interleaved
RoPE is HF's rotate-half); ``linear_fc1`` is ``[gate; up]``; the rest is renaming. Only the TP=1 / PP=1 view is mapped
here: other layouts go through dist-checkpointing, which reshards on load.

Supported HF sources: ``LlamaForCausalLM`` (and ``MistralForCausalLM`` without a sliding window, the same
architecture) and ``LlamaForSequenceClassification`` with one label (value / reward models), GQA or MHA, tied or
untied embeddings. Anything that computes something else is refused, naming the config field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import torch

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import ModelConfig
from evolm_nemo.config.validate import MAX_SEQ_LENGTH
from evolm_nemo.conversion import hfdir

CAUSAL = ("LlamaForCausalLM", "MistralForCausalLM")
VALUE = ("LlamaForSequenceClassification",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
SHORT = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------------------------------------- config

def _rope_raw(cfg: dict) -> tuple[object, object]:
    """(theta, scaling) as transformers reads them: a non-empty 4.x ``rope_scaling`` replaces the 5.x
    ``rope_parameters``; theta is that mapping's ``rope_theta``, else the top-level ``rope_theta``, else 10000;
    scaling is None for plain RoPE (``rope_type``, else ``type``, missing or "default"), else the mapping (or a
    ``rope_scaling`` that is not one)."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        return cfg.get("rope_theta", 10000.0), params
    kind = params.get("rope_type", params.get("type", "default"))
    return params.get("rope_theta", cfg.get("rope_theta", 10000.0)), (None if kind == "default" else params)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) of a checked config (``_rope_raw``)."""
    theta, scaling = _rope_raw(cfg)
    return float(theta), scaling


def head_kind(cfg: dict) -> str:
    """'lm' or 'value' from ``architectures``: every class it names is supported and they all give that head (a list
    naming classes of both heads, or one we do not support, is refused: which head the weights are for would be a
    guess)."""
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
        raise ConfigError("architectures", f"expected a list of class names in config.json, got {arch!r}")
    for name in arch:
        if name not in CAUSAL + VALUE:
            raise ConfigError("architectures", f"{name} is not supported; supported: {', '.join(CAUSAL + VALUE)}")
    heads = {"lm" if name in CAUSAL else "value" for name in arch}
    if len(heads) > 1:
        raise ConfigError("architectures", f"names classes of two heads in config.json ({', '.join(arch)}): a "
                                           f"language model ({', '.join(CAUSAL)}) and a value model "
                                           f"({', '.join(VALUE)}); a model has one")
    return heads.pop()


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _positive_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_config(cfg: dict) -> None:
    """Refuse HF configs whose computation our LLaMA-2 GPTModel does not reproduce; name the field."""
    kind = head_kind(cfg)
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ConfigError("model_type", f"{model_type!r} is not supported; supported: llama, mistral")
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    for field in need:
        if not _positive_int(cfg.get(field)):
            raise ConfigError(field, f"missing or not a positive integer in config.json (got {cfg.get(field)!r})")
    for field in ("num_key_value_heads", "max_position_embeddings", "head_dim"):
        if cfg.get(field) is not None and not _positive_int(cfg[field]):
            raise ConfigError(field, f"not a positive integer in config.json (got {cfg[field]!r})")
    if (cfg.get("max_position_embeddings") or 0) > MAX_SEQ_LENGTH:  # what model.seq_length it would import as
        raise ConfigError("max_position_embeddings", f"{cfg['max_position_embeddings']:,} is more than the "
                                                     f"{MAX_SEQ_LENGTH:,} (2^24) positions RoPE can tell apart in "
                                                     "float32 (model.seq_length's limit)")
    for field in ("rms_norm_eps", "initializer_range"):
        if field in cfg and not _positive_number(cfg[field]):
            raise ConfigError(field, f"not a positive number in config.json (got {cfg[field]!r})")
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError("rope_parameters", f"expected a mapping in config.json, got {params!r}")
    theta, scaling = _rope_raw(cfg)
    if not _positive_number(theta):
        raise ConfigError("rope_theta", f"not a positive number in config.json (got {theta!r})")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError("hidden_act", f"{act!r} is not supported; only silu (SwiGLU)")
    for field in ("tie_word_embeddings", "attention_bias", "mlp_bias"):  # "yes" / "false": truthy text, no bool
        if cfg.get(field) is not None and not isinstance(cfg[field], bool):
            raise ConfigError(field, f"not true or false in config.json (got {cfg[field]!r})")
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise ConfigError(field, "biases are not supported (LLaMA-2 has none)")
    if scaling:
        raise ConfigError("rope_scaling", f"RoPE scaling {scaling} is not supported; only default RoPE")
    if cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True):
        raise ConfigError("sliding_window", f"sliding-window attention ({cfg['sliding_window']}) is not supported")
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    if heads % groups:
        raise ConfigError("num_key_value_heads", f"{groups} does not divide num_attention_heads={heads}")
    if cfg["hidden_size"] % heads:
        raise ConfigError("num_attention_heads", f"{heads} does not divide hidden_size={cfg['hidden_size']}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // heads:
        raise ConfigError("head_dim", f"{head_dim} != hidden_size / num_attention_heads; not supported")
    if cfg.get("pretraining_tp", 1) not in (None, 1):
        raise ConfigError("pretraining_tp", "must be 1 (sliced-matmul Llama variants are not supported)")
    labels = cfg.get("num_labels") or len(cfg.get("id2label") or {"0": "LABEL_0"})
    if kind == "value" and labels != 1:
        raise ConfigError("num_labels", "a value/reward model has exactly one label")


def model_config(cfg: dict, name: str) -> ModelConfig:
    """Our ModelConfig for a checked HF config."""
    theta, _ = _rope(cfg)
    return ModelConfig(
        name=name,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        seq_length=int(cfg.get("max_position_embeddings") or 2048),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=theta,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        layer_spec="auto",
    )


def hf_config(m: ModelConfig, head: str, dtype: torch.dtype, tied: bool, tokens: dict):
    """A transformers LlamaConfig for ``m``; ``tokens`` holds bos/eos/pad ids. Also writes ``rope_theta`` and
    ``torch_dtype`` at top level so transformers 4.x readers (TensorRT-LLM, older vLLM) see the same model."""
    from transformers import LlamaConfig

    extra = {"num_labels": 1} if head == "value" else {}
    cfg = LlamaConfig(
        architectures=["LlamaForSequenceClassification" if head == "value" else "LlamaForCausalLM"],
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.hidden_size // m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.seq_length,
        initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_base)},
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
        dtype=HF_DTYPE[dtype],
        bos_token_id=tokens.get("bos"),
        eos_token_id=tokens.get("eos"),
        pad_token_id=tokens.get("pad"),
        **extra,
    )
    return cfg


def legacy_fields(m: ModelConfig, dtype: torch.dtype) -> dict:
    return {"rope_theta": float(m.rope_base), "torch_dtype": HF_DTYPE[dtype]}


# ---------------------------------------------------------------------------------------------------------- weights

def hf_shapes(m: ModelConfig, head: str, tied: bool) -> dict[str, tuple]:
    """Every HF tensor name -> shape, for checks before any heavy work."""
    h, kv = m.hidden_size, m.num_query_groups * (m.hidden_size // m.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": (m.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": (h, m.ffn_hidden_size),
        })
    if head == "value":
        shapes["score.weight"] = (1, h)
    elif not tied:
        shapes["lm_head.weight"] = (m.vocab_size, h)
    return shapes


# megatron (TP=1) suffix -> HF suffix, for the one-to-one tensors of a layer
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE spec: norm fused into qkv
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TE spec: norm fused into fc1
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _groups(m: ModelConfig) -> tuple[int, int, int]:
    head_dim = m.hidden_size // m.num_attention_heads
    return m.num_query_groups, m.num_attention_heads // m.num_query_groups, head_dim


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hpg, head_dim = _groups(m)
    x = qkv.view(groups, hpg + 2, head_dim, -1)
    h = x.shape[-1]
    return x[:, :hpg].reshape(-1, h), x[:, hpg].reshape(-1, h), x[:, hpg + 1].reshape(-1, h)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    groups, hpg, head_dim = _groups(m)
    h = q.shape[-1]
    parts = [q.view(groups, hpg, head_dim, h), k.view(groups, 1, head_dim, h), v.view(groups, 1, head_dim, h)]
    return torch.cat(parts, dim=1).reshape(-1, h)


def to_hf(name: str, tensor: torch.Tensor, m: ModelConfig, head: str = "lm") -> list[tuple[str, torch.Tensor]]:
    """One megatron (TP=1) tensor -> its HF tensors (views; copy before saving). ``_extra_state`` -> []."""
    if name.endswith("_extra_state"):
        return []
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", tensor)]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", tensor)]
    if name == "output_layer.weight":
        return [("score.weight" if head == "value" else "lm_head.weight", tensor)]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"]:
        prefix, rest = f"model.layers.{parts[2]}.", parts[3]
        if rest in _LAYER:
            return [(prefix + _LAYER[rest], tensor)]
        if rest == "self_attention.linear_qkv.weight":
            q, k, v = split_qkv(tensor, m)
            return [(prefix + "self_attn.q_proj.weight", q), (prefix + "self_attn.k_proj.weight", k),
                    (prefix + "self_attn.v_proj.weight", v)]
        if rest == "mlp.linear_fc1.weight":
            gate, up = torch.chunk(tensor, 2, dim=0)
            return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
    raise ValueError(f"no HF name for megatron tensor {name}")


def from_hf(name: str, get: Callable[[str], torch.Tensor], m: ModelConfig, head: str = "lm",
            tied: bool = False) -> torch.Tensor:
    """The megatron (TP=1, local spec) tensor ``name`` built from HF tensors fetched by ``get``."""
    if name == "embedding.word_embeddings.weight":
        return get("model.embed_tokens.weight")
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    if name == "output_layer.weight":
        if head == "value":
            return get("score.weight")
        return get("model.embed_tokens.weight" if tied else "lm_head.weight")
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"]:
        prefix, rest = f"model.layers.{parts[2]}.", parts[3]
        if rest in _LAYER:
            return get(prefix + _LAYER[rest])
        if rest == "self_attention.linear_qkv.weight":
            attn = prefix + "self_attn."
            return merge_qkv(get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"),
                             m)
        if rest == "mlp.linear_fc1.weight":
            return torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")], dim=0)
    raise ValueError(f"no HF source for megatron tensor {name}")


# ------------------------------------------------------------------------------------------------- reading HF files

class HFWeights:
    """The tensors of an HF model directory: ``model.safetensors``, sharded safetensors with an index, or (loaded
    with ``torch.load(weights_only=True)``) ``pytorch_model*.bin``. Opening reads every file's header (``hfdir``:
    every listed shard exists, is whole and holds its tensors); tensors are read one at a time (safetensors are
    memory-mapped)."""

    def __init__(self, src: Path, key: str = "src"):
        self.src, self.key = Path(src), key
        self._bins: dict[Path, dict] = {}  # the .bin files, loaded once
        self.files = hfdir.weight_files(self.src, key, self._bins)  # tensor name -> file
        specs = hfdir.tensor_specs(self.files, key, self._bins)
        self._shapes = {name: shape for name, (_, shape) in specs.items()}
        self._dtypes = {name: dtype if isinstance(dtype, torch.dtype) else _st_dtype(dtype)
                        for name, (dtype, _) in specs.items()}

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple:
        return self._shapes[name]

    def dtype(self) -> torch.dtype:
        """The weights' dtype (the widest when mixed)."""
        found = set(self._dtypes.values())
        return torch.float32 if len(found) != 1 else found.pop()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        return self._bins[path][name]

    def check(self, m: ModelConfig, head: str, tied: bool) -> None:
        """Every tensor the model needs is present with the right shape and a floating-point dtype; nothing
        unexpected is left over."""
        want = hf_shapes(m, head, tied)
        for name in want:
            dtype = self._dtypes.get(name, torch.float32)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype not in (
                    torch.float32, torch.bfloat16, torch.float16, torch.float64):
                shown = str(dtype).replace("torch.", "")
                raise ConfigError(self.key, f"tensor {name} in {self.files[name].name} is {shown}: only fp32 / bf16 "
                                            "/ fp16 weights can be imported (a quantized checkpoint? dequantize it "
                                            "first)")
        have = {n for n in self.names() if not n.endswith("rotary_emb.inv_freq")}
        if head == "lm" and tied:
            have.discard("lm_head.weight")  # some tied checkpoints still store the shared tensor
        missing = [n for n in want if n not in have]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(self.key, f"tensor {missing[0]} missing from {self.src}{more}")
        extra = sorted(have - set(want))
        if extra:
            raise ConfigError(self.key, f"unexpected tensor {extra[0]} in {self.src.name} (not part of a "
                                        f"{'value' if head == 'value' else 'Llama causal LM'} model)")
        for name, shape in want.items():
            if tuple(self.shape(name)) != shape:
                raise ConfigError(self.key, f"tensor {name} in {self.files[name].name} has shape "
                                            f"{list(self.shape(name))}, config.json implies {list(shape)}")


def _st_dtype(name: str):
    """torch dtype of a safetensors dtype name (the name itself when torch has none: refused by check())."""
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
             "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", "F8_E4M3"),
             "F8_E5M2": getattr(torch, "float8_e5m2", "F8_E5M2")}
    return table.get(name, name)


def parse_size(text: str | int, key: str = "max_shard_size") -> int:
    """'2GB', '500MB', '1GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(key, f"cannot parse size {text!r}; write e.g. 2GB, 500MB or a byte count") from None
    if value <= 0 or not math.isfinite(value):
        raise ConfigError(key, f"must be positive, got {text!r}")
    return int(value)


def iter_megatron(state: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
            yield name, value
