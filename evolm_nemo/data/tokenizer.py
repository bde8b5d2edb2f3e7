"""Tokenizers: one AutoTokenizer path for Llama-2's and our generated one, a small byte-level BPE trainer, and the
adapter megatron-core's datasets and inference engine expect.

    tok = load_tokenizer("meta-llama/Llama-2-7b-hf")   # or the directory written by train_tokenizer
    mtok = MegatronHFTokenizer(tok)                     # GPTDatasetConfig(tokenizer=mtok, ...)
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, List, Sequence

from evolm_nemo.config.errors import ConfigError, first_line
from evolm_nemo.fileio import replace_dir, staged_dir

# Special tokens of the generated tokenizer, in id order (Llama-2 uses the same strings: unk 0, bos 1, eos 2).
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
MIN_VOCAB = 256 + len(SPECIALS)  # the smallest byte-level BPE: its 256-byte alphabet and the specials, no merges


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (hub ids are `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _plain_fast(path: Path) -> bool:
    """A local directory holding a ``tokenizer.json`` whose config names ``PreTrainedTokenizerFast`` (and no
    ``auto_map``: remote code decides its own class)."""
    try:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and cfg.get("tokenizer_class") == "PreTrainedTokenizerFast"
            and "auto_map" not in cfg and (path / "tokenizer.json").is_file())


# the JSON files a tokenizer directory may hold: the first that does not parse is named when loading fails
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")


def _damaged_json(path: Path) -> str | None:
    """``"<file>: invalid JSON (...)"`` for the first of ``path``'s tokenizer JSON files that does not parse."""
    for name in TOKENIZER_JSON:
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except OSError:
            continue  # absent (or unreadable: the loader's own message says so)
        except (ValueError, RecursionError) as exc:
            return f"{path / name}: invalid JSON ({first_line(exc)}); the file is damaged or cut short"
    return None


def load_tokenizer(name_or_dir, trust_remote_code: bool = False, key: str = "tokenizer", require_eos: bool = True):
    """An HF tokenizer from a local directory or a hub name, through ``AutoTokenizer``; with ``require_eos`` it must
    have an EOS id.

    Failures become one-line ConfigErrors naming ``key`` (and, for a local directory, the damaged JSON file when one
    is why). A local directory whose ``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` (ours, from
    :func:`train_tokenizer`, and any plain ``tokenizer.json`` tokenizer) is loaded by that class directly: the class
    ``AutoTokenizer`` would pick, without importing its registry of every model family (about 0.3 s of each
    process's start).
    """
    name = str(name_or_dir)
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise ConfigError(key, f"no tokenizer directory {name}")
    if path.is_dir() and not has_tokenizer(path):
        raise ConfigError(key, f"{name} has no tokenizer files (tokenizer.json, tokenizer_config.json, a vocabulary "
                               "...)")
    if _plain_fast(path):
        from transformers import PreTrainedTokenizerFast as Loader
    else:
        from transformers import AutoTokenizer as Loader
    try:
        tok = Loader.from_pretrained(str(path) if path.exists() else name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers/hub raise many types; report the first line only
        damaged = _damaged_json(path) if path.is_dir() else None
        raise ConfigError(key, damaged or f"cannot load tokenizer {name!r}: {first_line(exc)}") from None
    if require_eos and tok.eos_token_id is None:
        raise ConfigError(key, f"tokenizer {name!r} has no EOS token; documents could not be delimited")
    return tok


def has_tokenizer(path) -> bool:
    """Files a tokenizer is built from, in the directory ``path``: ``tokenizer.json`` / ``.model``, a vocabulary
    (``vocab.*``, ``merges.txt``), a ``*.tiktoken`` or ``*.model`` file or a ``tokenizer_config.json`` (a model's own
    tokenizer code names its files there) -- what a directory of weights alone lacks."""
    return any(f.is_file() and (f.name.startswith(("tokenizer", "vocab")) or f.name == "merges.txt"
                                or f.suffix in (".tiktoken", ".model"))
               for f in Path(path).iterdir())


def train_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 512):
    """Train a byte-level BPE on ``texts`` and save it in HF format to ``out_dir`` (atomically); return it loaded.

    Byte-level means every string encodes and decodes back exactly. Ids 0-3 are ``<unk> <s> </s> <pad>``; like
    Llama-2's tokenizer, no template is applied, so ``tok(text)`` gives plain text ids and EOS is appended by callers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < MIN_VOCAB:
        raise ConfigError("vocab_size", f"must be at least {MIN_VOCAB} for a byte-level BPE")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no prefix space: exact round trip
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # any cleanup would break exact decoding
    )
    out = Path(out_dir)
    with staged_dir(out, mode=0o755) as tmp:  # mkdtemp makes it private
        fast.save_pretrained(str(tmp))
        # Name the portable class (transformers 5 writes its internal backend name, unknown to 4.x-based tools).
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        replace_dir(tmp, out)
    return load_tokenizer(out)


class MegatronHFTokenizer:
    """An HF tokenizer seen through megatron-core's tokenizer interface (``MegatronTokenizerBase``'s methods;
    duck-typed, as megatron-core 0.16.1 never checks the class, so importing this module stays free of megatron).

    GPTDataset needs ``vocab_size`` (index dtype), ``eod`` (masks), ``pad`` (loss masking; -1, megatron's "none",
    when the tokenizer has no distinct pad) and ``unique_identifiers`` (its index-cache hash). The inference
    engine also uses ``tokenize``, ``detokenize``, ``bos``, ``eos_id`` and ``offsets``.
    """

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.path = str(getattr(hf_tokenizer, "name_or_path", "") or "")
        vocab = hf_tokenizer.get_vocab()
        digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", self.path), ("vocab_sha256", digest),
             ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def tokenize(self, text: str) -> List[int]:
        """Plain text ids (no BOS/EOS; special-token strings in the text stay text)."""
        return self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def offsets(self, ids: Sequence[int], text: str) -> List[int]:
        """Character offset in ``text`` where each token's text starts."""
        return [len(self.detokenize(ids[:i])) for i in range(len(ids))]

    def apply_chat_template(self, conversation, **kwargs):
        return self.hf.apply_chat_template(conversation, **kwargs)

    @property
    def vocab(self) -> dict:
        return self.hf.get_vocab()

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.hf.get_vocab().items()}

    @property
    def vocab_size(self) -> int:
        """All ids, added/special tokens included (HF's ``vocab_size`` leaves added tokens out)."""
        return len(self.hf)

    @property
    def eod(self) -> int:
        return self.hf.eos_token_id

    @property
    def eos(self) -> int:
        return self.hf.eos_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def bos(self):
        return self.hf.bos_token_id

    @property
    def pad(self) -> int:
        pad = self.hf.pad_token_id
        return -1 if pad is None or pad == self.eod else pad
