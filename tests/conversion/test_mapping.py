"""The state-dict mapping and config translation on their own (no megatron process needed): exact inverses for
GQA and MHA, a real Llama-2 config.json, pytorch_model.bin sources, shard-size parsing."""

from __future__ import annotations

import json

import pytest
import torch

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import ModelConfig
from evolm_nemo.conversion import hf

# meta-llama/Llama-2-7b-hf config.json as published (transformers 4.31 era)
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_llama2_config_accepted():
    hf.check_config(LLAMA2_7B)
    m = hf.model_config(LLAMA2_7B, "llama2-7b")
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == \
        (32, 4096, 11008, 32, 32)
    assert (m.vocab_size, m.seq_length, m.norm_eps, m.rope_base) == (32000, 4096, 1e-5, 10000.0)


def test_config_roundtrip_through_transformers():
    m = ModelConfig(num_layers=3, hidden_size=96, ffn_hidden_size=200, num_attention_heads=6, num_query_groups=3,
                    vocab_size=777, seq_length=333, norm_eps=1e-6, rope_base=500000.0)
    cfg = hf.hf_config(m, "lm", torch.bfloat16, tied=False, tokens={"bos": 1, "eos": 2, "pad": 3}).to_dict()
    cfg = json.loads(json.dumps(cfg))
    hf.check_config(cfg)
    back = hf.model_config(cfg, m.name)
    assert back == m


@pytest.mark.parametrize("heads,groups", [(8, 2), (8, 8), (6, 1), (6, 3)])
def test_mapping_is_an_exact_inverse(heads, groups):
    m = ModelConfig(num_layers=2, hidden_size=heads * 8, ffn_hidden_size=40, num_attention_heads=heads,
                    num_query_groups=groups, vocab_size=50)
    gen = torch.Generator().manual_seed(0)
    src = {name: torch.randn(shape, generator=gen) for name, shape in hf.hf_shapes(m, "lm", tied=False).items()}
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for i in range(m.num_layers):
        names += [f"decoder.layers.{i}.{s}" for s in (
            "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
    ours = {n: hf.from_hf(n, src.__getitem__, m) for n in names}
    # megatron's qkv rows: per KV group, its query heads then its k then its v
    head_dim, hpg = m.hidden_size // heads, heads // groups
    qkv = ours["decoder.layers.0.self_attention.linear_qkv.weight"].view(groups, hpg + 2, head_dim, -1)
    q = src["model.layers.0.self_attn.q_proj.weight"].view(heads, head_dim, -1)
    assert torch.equal(qkv[-1, 0], q[(groups - 1) * hpg])
    assert torch.equal(qkv[-1, hpg], src["model.layers.0.self_attn.k_proj.weight"].view(groups, head_dim, -1)[-1])
    back = {}
    for n, t in ours.items():
        back.update(hf.to_hf(n, t, m))
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_te_spec_names_map_to_the_norms():
    m = ModelConfig()
    t = torch.ones(64)
    assert hf.to_hf("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", t, m)[0][0] == \
        "model.layers.1.input_layernorm.weight"
    assert hf.to_hf("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", t, m)[0][0] == \
        "model.layers.1.post_attention_layernorm.weight"
    assert hf.to_hf("decoder.layers.0.mlp.linear_fc1._extra_state", t, m) == []


def test_bin_weights_are_read_with_weights_only(tmp_path):
    m = ModelConfig(num_layers=1, hidden_size=16, ffn_hidden_size=24, num_attention_heads=2, num_query_groups=1,
                    vocab_size=30)
    shapes = hf.hf_shapes(m, "lm", tied=True)
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    w = hf.HFWeights(tmp_path)
    w.check(m, "lm", tied=True)
    assert all(torch.equal(w.get(n), t) for n, t in tensors.items())
    # weights_only=True refuses pickled code
    torch.save({"x": torch.ones(1), "evil": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="weights_only"):
        hf.HFWeights(tmp_path)


def test_parse_size():
    assert hf.parse_size("2GB") == 2 * 10**9 and hf.parse_size("500MB") == 5 * 10**8
    assert hf.parse_size("1GiB") == 2**30 and hf.parse_size("1234") == 1234
    for bad in ("two GB", "-1GB", "5XB"):
        with pytest.raises(ConfigError):
            hf.parse_size(bad)


LINEAR = {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("rope,theta", [
    ({"rope_scaling": {"rope_type": "default"}, "rope_theta": 5e5}, 5e5),
    ({"rope_scaling": {"type": "default"}}, 1e4),
    ({"rope_parameters": {"rope_type": "default"}, "rope_theta": 2e4}, 2e4),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 3e4}, "rope_theta": 2e4}, 3e4),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 3e4}, "rope_scaling": {"rope_type": "default"},
      "rope_theta": 2e4}, 2e4),  # a non-empty rope_scaling replaces rope_parameters in transformers
])
def test_plain_rope_is_read_as_transformers_reads_it(rope, theta):
    from transformers import LlamaConfig

    cfg = {**LLAMA2_7B, "rope_scaling": None, **rope}
    hf.check_config(cfg)
    assert hf.model_config(cfg, "x").rope_base == theta
    seen = LlamaConfig(**json.loads(json.dumps(cfg))).rope_parameters
    assert seen["rope_type"] == "default" and seen["rope_theta"] == theta


@pytest.mark.parametrize("rope", [
    {"rope_parameters": LINEAR, "rope_theta": 1e4},  # no rope_theta inside rope_parameters
    {"rope_parameters": {"type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": LINEAR},
    {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e4},
    {"rope_scaling": "linear"},
])
def test_rope_scaling_is_refused_wherever_it_is_written(rope):
    from transformers import LlamaConfig

    cfg = {**LLAMA2_7B, "rope_scaling": None, **rope}
    if isinstance(cfg["rope_scaling"], (dict, type(None))):
        assert LlamaConfig(**json.loads(json.dumps(cfg))).rope_parameters["rope_type"] != "default"
    with pytest.raises(ConfigError) as err:
        hf.check_config(cfg)
    assert err.value.key == "rope_scaling", str(err.value)
