"""Reading prepared megatron indexed data (``<prefix>.bin`` + ``.idx`` from `evolm prepare`), and the manifest of a
sharded preparation (``<prefix>.manifest.json``): what training and its checks read. The writing side is
``data.prepare``."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from evolm_nemo.config.errors import ConfigError

MANIFEST_SUFFIX = ".manifest.json"
SHARD_FORMAT = "evolm-shards-1"
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
              8: np.uint16}  # megatron-core's DType codes


def idx_dtype(prefix: str) -> np.dtype:
    """The token dtype recorded in the header of ``<prefix>.idx`` (magic, version, dtype code), without megatron.
    Raises OSError, ValueError (not an index file), KeyError (unknown dtype code) or struct.error."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(9 + 8 + 1)
    if header[:9] != IDX_MAGIC:
        raise ValueError("not a megatron index file")
    code = struct.unpack("<B", header[17:18])[0]
    return np.dtype(IDX_DTYPES[code])


def index_extent(prefix: str) -> Tuple[np.dtype, int]:
    """The token dtype and the number of tokens ``<prefix>.idx`` says ``<prefix>.bin`` holds (the end of its last
    sequence), read from the header and two entries -- constant time, whatever the corpus' size. Raises ValueError
    (naming what is wrong: not an index, cut short, entries past each other), OSError, KeyError (an unknown dtype
    code) or struct.error."""
    dtype = idx_dtype(prefix)
    path = prefix + ".idx"
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        f.seek(18)
        head = f.read(16)
        if len(head) < 16:
            raise ValueError(f"cut short ({size} bytes, no sequence and document counts)")
        sequences, documents = struct.unpack("<QQ", head)
        need = 34 + 12 * sequences + 8 * documents
        if size not in (need, need + sequences):  # (+ one mode byte per sequence: megatron's multimodal layout)
            raise ValueError(f"{size:,} bytes for {sequences:,} sequences and {documents:,} documents, which need "
                             f"{need:,}: cut short or not one index")
        if sequences == 0:
            return dtype, 0
        f.seek(34 + 4 * (sequences - 1))
        (length,) = struct.unpack("<i", f.read(4))
        f.seek(34 + 4 * sequences + 8 * (sequences - 1))
        (pointer,) = struct.unpack("<q", f.read(8))
    if length < 0 or pointer < 0 or pointer % dtype.itemsize:
        raise ValueError(f"its last sequence (length {length}, byte offset {pointer}) is not a valid entry")
    return dtype, pointer // dtype.itemsize + length


def read_manifest(prefix: str) -> Optional[dict]:
    """``<prefix>.manifest.json`` of a sharded preparation, or None when there is none."""
    path = Path(prefix + MANIFEST_SUFFIX)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"][0]["prefix"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise ConfigError("data.paths", f"{path} is not a readable manifest; re-run evolm prepare") from None
    return manifest


def prefix_tokens(prefix: str) -> int:
    """Tokens in a prepared ``<prefix>.bin`` (from its index: ``index_extent``, constant time)."""
    try:
        return index_extent(prefix)[1]
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ConfigError("data.paths", f"{prefix}.idx: unreadable index ({exc}); re-run evolm prepare") from None


def expand_prefixes(paths, weights) -> Tuple[List[str], Optional[List[float]], List[int]]:
    """data.paths entries that name a sharded preparation (``<prefix>.manifest.json``, no ``<prefix>.bin``) become
    their shards; a weight is shared out over a source's shards by their tokens. Returns (prefixes, weights, the
    source index of each prefix)."""
    for p in paths:
        if Path(p + ".bin").exists() and Path(p + MANIFEST_SUFFIX).is_file():
            raise ConfigError("data.paths", f"{p} is both an unsharded preparation ({p}.bin) and a sharded one "
                                            f"({p}{MANIFEST_SUFFIX}): keep one (move the other to another prefix)")
    sharded = [not Path(p + ".bin").exists() and Path(p + MANIFEST_SUFFIX).is_file() for p in paths]
    if weights is None and any(sharded):  # as for one prefix: every source in proportion to its tokens
        weights = [read_manifest(p)["tokens"] if sh else prefix_tokens(p) for p, sh in zip(paths, sharded)]
    out, out_w, group = [], ([] if weights is not None else None), []
    for s, prefix in enumerate(paths):
        manifest = None if Path(prefix + ".bin").exists() else read_manifest(prefix)
        if manifest is None:
            out.append(prefix)
            group.append(s)
            if out_w is not None:
                out_w.append(float(weights[s]))
            continue
        total = max(1, int(manifest["tokens"]))
        for entry in manifest["shards"]:
            out.append(str(Path(prefix).parent / entry["prefix"]))
            group.append(s)
            if out_w is not None:
                out_w.append(float(weights[s]) * int(entry["tokens"]) / total)
    return out, out_w, group
