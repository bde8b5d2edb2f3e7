"""HF source models for the conversion tests, made by transformers itself (random init) with a tokenizer trained
here by the tokenizers library. No megatron in this module: it runs in the pytest process."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = [
    "Human: What is 2 + 3?\nAssistant: 2 + 3 = 5. The answer is 5.",
    "Human: Is the sky green?\nAssistant: No, the sky is blue.",
    "The quick brown fox jumps over the lazy dog.",
]
VOCAB_FLOOR = 263  # the smallest model vocabulary below; the tokenizer must fit in it

# name -> (LlamaConfig fields, extra): "perturb" randomises every tensor (norms too, so a swapped norm mapping
# would show); without it the weights are transformers' own init.
SHAPES = {
    "tiny_gqa": (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128), {"perturb": True}),
    "tiny4_gqa": (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=128), {"perturb": True}),
    "tiny_mha": (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=128), {"perturb": True}),
    # scaled-down 1B shape (EvoLM 1B: hidden 2048, 32 heads / 4 KV groups, head dim 64)
    "b1_gqa": (dict(hidden_size=256, intermediate_size=608, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256), {"perturb": True}),
    "b1_mha": (dict(hidden_size=256, intermediate_size=608, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=1024, max_position_embeddings=256), {"perturb": True}),
    # odd sizes, transformers' own init, tied embeddings
    "odd_tied": (dict(hidden_size=60, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=3, vocab_size=301, max_position_embeddings=64, tie_word_embeddings=True),
                 {}),
    # odd sizes stored in bf16 (must come back bf16, bitwise)
    "odd_bf16": (dict(hidden_size=40, intermediate_size=72, num_hidden_layers=1, num_attention_heads=5,
                      num_key_value_heads=1, vocab_size=263, max_position_embeddings=64),
                 {"perturb": True, "dtype": torch.bfloat16}),
    # value / reward model: LlamaForSequenceClassification, one label
    "value": (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, num_labels=1),
              {"perturb": True, "value": True}),
}


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_FLOOR - 1, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TEXT * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(out))
    assert len(tok) <= VOCAB_FLOOR
    return tok


def make_source(name: str, out: Path, tokenizer_dir: Path, seed: int = 0, **save_kwargs) -> Path:
    """Create and save the HF model ``name`` (and copy the tokenizer next to it)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    fields, extra = SHAPES[name]
    torch.manual_seed(seed)
    config = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3, **fields)
    cls = LlamaForSequenceClassification if extra.get("value") else LlamaForCausalLM
    model = cls(config)
    if extra.get("perturb"):
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.ndim == 1:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.05)
    if "dtype" in extra:
        model = model.to(extra["dtype"])
    model.save_pretrained(str(out), **save_kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (single or sharded safetensors)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@torch.no_grad()
def hf_outputs(directory: Path, ids: torch.Tensor, value: bool = False) -> torch.Tensor:
    """transformers' fp32 logits (per-token scores for a value model) on ``ids``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if value:
        model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=torch.float32).eval()
        return model.score(model.model(input_ids=ids).last_hidden_state)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return model(input_ids=ids).logits
