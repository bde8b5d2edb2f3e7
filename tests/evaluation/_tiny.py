"""Tiny real HF models for evaluation tests: a byte-level BPE tokenizer trained here and random Llama weights."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Human: What is 2 + 3?\nAssistant: 2 + 3 = 5. The answer is \\boxed{5}.",
    "Human: Is the sky green?\nAssistant: No. The answer is False.",
    "Human: Natalia sold 48 clips in April and half as many in May.\nAssistant: 48 / 2 = 24, 48 + 24 = 72.",
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof. He starts pulling up roofing.",
    "Question: How do you boil water?\nAnswer: Put it in a pot on the stove. Heat it until it bubbles.",
    "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
]


def make_tokenizer(path: Path):
    """Train a ~400-token byte-level BPE (with Llama-style <s> prefix) and save it as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def _config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )


def make_lm(path: Path, seed: int = 0):
    """A random 2-layer LlamaForCausalLM + tokenizer saved in ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer(path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tokenizer)).eval()
    model.save_pretrained(path)
    return model, tokenizer


def make_rm(path: Path, seed: int = 0, chat_template: str | None = None):
    """A random LlamaForSequenceClassification (1 label) + tokenizer in ``path``."""
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = make_tokenizer(path)
    if chat_template:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(tokenizer, num_labels=1)).eval()
    model.save_pretrained(path)
    return model, tokenizer


def one_thread():
    """Generator for a fixture: tiny models run far faster on 1 thread on a shared CPU; restores the old count."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# damages of a model directory that transformers finds only while loading it (or later): name -> what the one-line
# refusal names. `damaged_copy` makes them on a copy of a tiny model directory.
DAMAGES = {
    "truncated_safetensors": "model.safetensors: not a readable safetensors file",
    "heads_not_dividing": "not a multiple of the number of attention heads",
    "vocab_size_edited": "model.embed_tokens.weight in model.safetensors has shape",
    "hidden_size_missing": "it sets no hidden_size",
    "tokenizer_cut_short": "tokenizer.json: invalid JSON",
    "config_not_json": "config.json: invalid JSON",
    "pickled_code_bin": "pytorch_model.bin: cannot load with weights_only=True (it holds more than tensors",
    # transformers only warns "lm_head.weight MISSING ... newly initialized" and samples junk from a random head
    "lm_head_removed": "has no tensor lm_head.weight in its weight files, yet the LlamaForCausalLM its config.json "
                       "describes needs it (its embeddings are not tied",
    # a reward model / PPO critic export (`evolm export-hf` of a critic): a score head, no LM head
    "sequence_classifier": "describes a LlamaForSequenceClassification (a reward model or PPO critic",
}


class Payload:
    """Pickled code (a call of ``open(marker, "w")``): what weights_only=True refuses. Run only by an unsafe load,
    which the marker file would show."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_payload(checkpoint: Path, marker: Path) -> None:
    """A ``Payload`` in the evolm checkpoint ``checkpoint``'s common.pt, with its evolm.json checksum and size updated
    to match: the integrity check passes, and only a weights_only=False load would run it."""
    import json

    import torch

    from evolm_nemo.checkpoint.io import file_checksum

    common = torch.load(checkpoint / "common.pt", weights_only=True)
    torch.save({**common, "payload": Payload(marker)}, checkpoint / "common.pt")
    meta = json.loads((checkpoint / "evolm.json").read_text())
    meta["checksums"]["common.pt"] = file_checksum(checkpoint / "common.pt", meta["checksum"])
    meta["manifest"]["common.pt"] = (checkpoint / "common.pt").stat().st_size
    (checkpoint / "evolm.json").write_text(json.dumps(meta))


def damaged_copy(model_dir: Path, dst: Path, damage: str) -> Path:
    """A copy of the HF directory ``model_dir`` at ``dst`` with one of ``DAMAGES`` (``pickled_code_bin``: its payload
    would create ``<dst>.unsafe``)."""
    import json
    import shutil

    shutil.copytree(model_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    weights = dst / "model.safetensors"
    if damage == "truncated_safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "heads_not_dividing":
        config.update(num_attention_heads=5, num_key_value_heads=5)
        config.pop("head_dim", None)
    elif damage == "vocab_size_edited":
        config["vocab_size"] -= 7
    elif damage == "hidden_size_missing":
        del config["hidden_size"]
    elif damage == "tokenizer_cut_short":
        tok = dst / "tokenizer.json"
        tok.write_bytes(tok.read_bytes()[: tok.stat().st_size // 2])
    elif damage == "config_not_json":
        (dst / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n')
        return dst
    elif damage == "pickled_code_bin":
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
        weights.unlink()
        torch.save({**tensors, "payload": Payload(dst.with_name(dst.name + ".unsafe"))}, dst / "pytorch_model.bin")
    elif damage in ("lm_head_removed", "sequence_classifier"):
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        head = tensors.pop("lm_head.weight")
        if damage == "sequence_classifier":
            tensors["score.weight"] = torch.zeros(1, head.shape[1])
            config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                          label2id={"LABEL_0": 0})
        save_file(tensors, str(weights), metadata={"format": "pt"})
    else:
        raise ValueError(damage)
    (dst / "config.json").write_text(json.dumps(config))
    return dst
