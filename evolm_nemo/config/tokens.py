"""Token budgets written the way people say them: ``160B``, ``1.6B``, ``500M``, ``20_000_000_000``."""

from __future__ import annotations

import math
import re

from evolm_nemo.config.errors import ConfigError

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_PATTERN = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9_]+)?(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


def parse_tokens(value, key: str = "train.tokens") -> int:
    """Parse a token budget into an integer number of tokens; raise ConfigError naming ``key`` if it is not one."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a token count such as 160B, 1.6B or 20_000_000_000, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value)
        if text.strip().startswith("-"):
            raise ConfigError(key, f"token budget must be positive, got {value!r}")
        match = _PATTERN.match(text)
        if not match:
            raise ConfigError(key, f"cannot parse token budget {value!r}; write it like 160B, 1.6B, 500M or 20_000_000_000")
        number = float(match.group(1).replace("_", "")) * _SUFFIX[match.group(2).upper()]
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(key, f"token budget must be positive, got {value!r}")
    return int(round(number))


def iterations_for(tokens: int, global_batch_size: int, seq_length: int) -> int:
    """Iterations that cover ``tokens`` with global batches of ``global_batch_size`` sequences (rounded up)."""
    per_iter = global_batch_size * seq_length
    return max(1, -(-tokens // per_iter))


def format_tokens(tokens: int) -> str:
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if tokens >= scale:
            return f"{tokens / scale:.4g}{suffix}"
    return str(tokens)
