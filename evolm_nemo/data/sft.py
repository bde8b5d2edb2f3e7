"""The on-disk SFT dataset `evolm prepare-sft` writes and the SFT stage memory-maps.

A dataset is a directory::

    manifest.json   format, tokenizer fingerprint, template, counts per preparation step, content hash (written last)
    tokens.bin      every example's token ids, concatenated (uint16 when the vocabulary fits, else int32)
    index.npy       int64 [examples, 3]: offset into tokens.bin, prompt length, total length

An example's ids are ``prompt_ids + answer_ids`` with ``prompt_ids = encode(template.prompt)`` exactly as evaluation
encodes a prompt (the tokenizer's own special tokens: Llama-2 adds ``<s>``) and ``answer_ids =
encode(template.answer, no special tokens) + [EOS]``: LLaMA-Factory's way (prompt and answer encoded separately and
concatenated). The loss covers the answer ids, EOS included.

The directory is written under a temporary name and renamed when complete, so a reader never sees a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data.tokenizer import MegatronHFTokenizer
from evolm_nemo.fileio import OWNER, commit_first, replace_dir, temp_dir, writing
from evolm_nemo.tasks import QUESTION_TEMPLATE

if TYPE_CHECKING:
    import torch

FORMAT = "evolm-sft-1"
MANIFEST, TOKENS, INDEX = "manifest.json", "tokens.bin", "index.npy"
DEFAULT_PROMPT = QUESTION_TEMPLATE  # EvoLM (LLaMA-Factory "default"), = eval/tasks/*.yaml templates
DEFAULT_ANSWER = "{answer}"


@dataclass(frozen=True)
class Template:
    prompt: str = DEFAULT_PROMPT  # "{question}" is replaced verbatim
    answer: str = DEFAULT_ANSWER  # "{answer}" is replaced verbatim; EOS is appended as a token

    def check(self, prompt_key: str = "prompt_template", answer_key: str = "answer_template") -> None:
        if "{question}" not in self.prompt:
            raise ConfigError(prompt_key, f"must contain {{question}}, got {self.prompt!r}")
        if "{answer}" not in self.answer:
            raise ConfigError(answer_key, f"must contain {{answer}}, got {self.answer!r}")

    def render_prompt(self, question: str) -> str:
        return self.prompt.replace("{question}", question)

    def render_answer(self, answer: str) -> str:
        return self.answer.replace("{answer}", answer)


def tokenizer_fingerprint(tok) -> dict:
    """What identifies a tokenizer for data compatibility: its vocabulary hash, size and special ids."""
    return {"vocab_sha256": MegatronHFTokenizer(tok).unique_identifiers["vocab_sha256"], "size": len(tok),
            "bos": tok.bos_token_id, "eos": tok.eos_token_id}


def encode_example(tok, template: Template, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)``; answer_ids end with EOS."""
    prompt = tok(template.render_prompt(question), add_special_tokens=True, split_special_tokens=True)["input_ids"]
    answer_ids = tok(template.render_answer(answer), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return list(prompt), list(answer_ids) + [tok.eos_token_id]


def _dtype(vocab: int):
    return np.uint16 if vocab < 65500 else np.int32


class SFTWriter:
    """Appends examples to a temporary directory next to ``out``; ``commit(manifest)`` renames it into place. The
    temporary directory is owned (``fileio.temp_dir``): one a killed writer left is removed by the next writer of
    the same ``out``. A refused write (full disk, read-only) is one line naming ``key`` and ``out``; ``abort``
    removes what was written."""

    def __init__(self, out: str | Path, vocab_size: int, fmt: str = FORMAT, key: str = "output"):
        self.out = Path(out)
        self.format = fmt
        self.key = key
        self.tmp = None
        self.file = None
        try:
            with self._writing():
                self.tmp = temp_dir(self.out, owned=True)
                self.file = open(self.tmp / TOKENS, "wb")
        except BaseException:
            self.abort()
            raise
        self.dtype = _dtype(vocab_size)
        self.rows: list[tuple[int, int, int]] = []
        self.offset = 0
        self.hash = hashlib.sha256()
        self.answer_tokens = 0

    def _writing(self):
        return writing(self.out, self.key)

    def add(self, prompt_ids: list[int], answer_ids: list[int]) -> None:
        ids = np.asarray(prompt_ids + answer_ids, dtype=self.dtype)
        data = ids.tobytes()
        with self._writing():
            self.file.write(data)
        self.hash.update(data)
        self.rows.append((self.offset, len(prompt_ids), len(ids)))
        self.offset += len(ids)
        self.answer_tokens += len(answer_ids)

    def commit(self, manifest: dict, arrays: dict[str, np.ndarray] | None = None, replace: bool = False) -> Path:
        """Write the index, any ``arrays`` (``<name>.npy``, e.g. the RM dataset's labels), then the manifest last;
        rename into place. ``replace`` (overwrite=true): an existing dataset is swapped for the new one only once
        the new one is whole (``fileio.replace_dir``), never removed first."""
        with self._writing():
            self.file.close()
            index = np.asarray(self.rows, dtype=np.int64).reshape(-1, 3)
            np.save(self.tmp / INDEX, index, allow_pickle=False)
            self.hash.update(index.tobytes())
            for name, array in (arrays or {}).items():
                np.save(self.tmp / f"{name}.npy", array, allow_pickle=False)
                self.hash.update(np.ascontiguousarray(array).tobytes())
            record = {"format": self.format, "examples": len(self.rows), "tokens": self.offset,
                      "answer_tokens": self.answer_tokens, "dtype": np.dtype(self.dtype).name,
                      "content_sha256": self.hash.hexdigest(), **manifest}
            (self.tmp / MANIFEST).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
            (self.tmp / OWNER).unlink(missing_ok=True)
            os.chmod(self.tmp, 0o755)
            if replace and self.out.exists():
                replace_dir(self.tmp, self.out)
            else:
                commit_first(self.tmp, self.out, MANIFEST)
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory. Closing the file may fail again (its buffer still cannot be written:
        the disk is full); that must not hide the error that got us here."""
        if self.file is not None and not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def read_manifest(path: str | Path, key: str = "data.paths", fmt: str = FORMAT,
                  maker: str = "evolm prepare-sft") -> dict:
    path = Path(path)
    what = "an SFT dataset" if fmt == FORMAT else f"a {fmt} dataset"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ConfigError(key, f"{path} is not {what} (no {MANIFEST}); make one with `{maker}`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"{path / MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ConfigError(key, f"{path} has format {found!r}, expected {fmt} (made by `{maker}`)")
    return manifest


def check_manifest_fields(manifest: dict, where: Path, key: str) -> None:
    """The fields a dataset's readers use (dtype, tokens, examples, tokenizer, content_sha256) have the types
    ``SFTWriter`` writes: a damaged manifest is one line naming the file and the field, not a TypeError later."""

    def bad(field: str, expected: str):
        got = json.dumps(manifest.get(field)) if field in manifest else "missing"
        raise ConfigError(key, f"{where}: field '{field}': expected {expected}, got {got[:80]}; prepare the dataset "
                               "again")

    try:
        integer = np.dtype(manifest.get("dtype")).kind in "iu" and isinstance(manifest.get("dtype"), str)
    except (TypeError, ValueError):
        integer = False
    if not integer:
        bad("dtype", "an integer dtype name (uint16 or int32)")
    for field in ("tokens", "examples"):
        value = manifest.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            bad(field, "a non-negative integer")
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab_sha256"), str) or \
            not all(isinstance(tok.get(k), int) and not isinstance(tok.get(k), bool) for k in ("size", "eos")):
        bad("tokenizer", "the tokenizer's fingerprint {vocab_sha256, size, bos, eos}")
    if not isinstance(manifest.get("content_sha256", ""), (str, type(None))):
        bad("content_sha256", "a sha256 hex string")


class SFTDataset:
    """A prepared SFT dataset, memory-mapped. ``ids(i)`` is example i's token ids, ``prompt_len[i]`` its prompt length."""

    FORMAT, MAKER = FORMAT, "evolm prepare-sft"
    ARRAYS: tuple[str, ...] = ()  # more ``<name>.npy`` files in the content hash, in the writer's order

    def __init__(self, path: str | Path, key: str = "data.paths", vocab_size: int | None = None,
                 cache_dir: str | None = None):
        self.path = Path(path)
        self.key = key
        self.manifest = read_manifest(self.path, key, self.FORMAT, self.MAKER)
        check_manifest_fields(self.manifest, self.path / MANIFEST, key)
        try:
            self.index = np.load(self.path / INDEX, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(key, f"{self.path / INDEX} is unreadable ({exc})") from None
        dtype = np.dtype(self.manifest["dtype"])
        size = (self.path / TOKENS).stat().st_size if (self.path / TOKENS).is_file() else -1
        if self.index.ndim != 2 or self.index.shape[1:] != (3,) or self.index.dtype.kind not in "iu":
            raise ConfigError(key, f"{self.path / INDEX}: {self.index.dtype} {list(self.index.shape)}, not the "
                                   "[examples, 3] integers (offset, prompt length, length) a prepared dataset has; "
                                   "prepare it again")
        if size != self.manifest["tokens"] * dtype.itemsize or len(self.index) != self.manifest["examples"]:
            raise ConfigError(key, f"{self.path} does not match its manifest (truncated or altered); prepare it again")
        offset, prompt, length = (self.index[:, i].astype(np.int64) for i in range(3))
        if len(self.index) and ((offset < 0).any() or (offset + length > self.manifest["tokens"]).any()
                                or (prompt < 0).any() or (prompt >= length).any()):
            # (no token after the prompt: nothing to learn -- an SFT loss over no tokens, an RM score of no response;
            # `prepare-sft` ends every answer with EOS, `prepare-rm` drops empty responses)
            raise ConfigError(key, f"{self.path / INDEX}: an example reaches outside tokens.bin or has no token after "
                                   "its prompt (altered); prepare it again")
        self.tokens = np.memmap(self.path / TOKENS, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        self.prompt_len = self.index[:, 1]
        self.length = self.index[:, 2]
        if vocab_size is not None:
            self.check(vocab_size, cache_dir)

    def check(self, vocab_size: int, cache_dir: str | None = None) -> None:
        """The files hold what the manifest's ``content_sha256`` says (hashed at first use, recorded in
        ``.verified``, or under ``cache_dir`` for a read-only dataset: ``data.verify``), and every token id fits
        ``model.vocab_size`` (a larger id would index past the embedding); one-line ConfigErrors naming the
        dataset."""
        from evolm_nemo.data.verify import VERIFIED, verified

        files = [self.path / TOKENS, self.path / INDEX] + [self.path / f"{a}.npy" for a in self.ARRAYS]
        top = verified(self.path / VERIFIED, files, self.manifest.get("content_sha256"), self._measure, self.key,
                       str(self.path), cache_dir)["max_token_id"]
        if top is not None and top >= vocab_size:
            raise ConfigError(self.key, f"{self.path / TOKENS}: token id {top} >= model.vocab_size={vocab_size}; it "
                                        "was tokenized with a larger vocabulary than the model's (check the "
                                        "tokenizer and model.vocab_size)")

    def _measure(self) -> dict:
        """The content hash as ``SFTWriter`` computed it (token bytes, index, arrays) and the largest token id."""
        h, top = hashlib.sha256(), None
        dtype = np.dtype(self.manifest["dtype"])
        with open(self.path / TOKENS, "rb") as f:
            while block := f.read(dtype.itemsize << 22):
                h.update(block)
                ids = np.frombuffer(block[:len(block) - len(block) % dtype.itemsize], dtype=dtype)
                if len(ids):
                    top = max(top if top is not None else -1, int(ids.max()))
        h.update(self.index.tobytes())
        for name in self.ARRAYS:
            try:
                h.update(np.ascontiguousarray(np.load(self.path / f"{name}.npy", allow_pickle=False)).tobytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(self.key, f"{self.path / f'{name}.npy'} is unreadable ({exc}); prepare it "
                                            "again") from None
        return {"sha256": h.hexdigest(), "max_token_id": top}

    def __len__(self) -> int:
        return len(self.index)

    def ids(self, i: int) -> np.ndarray:
        offset, _, length = self.index[i]
        return np.asarray(self.tokens[offset:offset + length], dtype=np.int64)


def collate(examples, seq: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded microbatch from ``(ids, prompt_len)`` pairs: ``tokens = ids[:-1]``, ``labels = ids[1:]``,
    ``loss_mask`` 1 exactly on the positions whose label is an answer token (EOS included), 0 on the prompt and on
    padding; padded positions hold ``pad_id`` (never attended to under the causal mask, never in the loss)."""
    import torch  # here, not at the top: `evolm prepare-sft` / `prepare-rm` check their recipe without torch

    b = len(examples)
    tokens = torch.full((b, seq), pad_id, dtype=torch.long)
    labels = torch.full((b, seq), pad_id, dtype=torch.long)
    mask = torch.zeros((b, seq), dtype=torch.float32)
    for row, (ids, prompt_len) in enumerate(examples):
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        n = len(ids) - 1
        if n > seq:
            raise ValueError(f"example of {n + 1} ids does not fit a microbatch of length {seq}")
        tokens[row, :n] = ids[:-1]
        labels[row, :n] = ids[1:]
        mask[row, max(int(prompt_len) - 1, 0):n] = 1.0
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(b, -1).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": position_ids}
