"""The one error type for bad user input: it names the key (or file) and the fix, printed as one line."""

import re
from typing import Iterator


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def first_line(exc: BaseException) -> str:
    """The line of another library's exception that says what went wrong, for a one-line ConfigError: its first
    non-blank line, or the next one when the first only introduces it ("... error for validator 'x':")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling (``__cause__``, ``__context__``, and the
    per-rank ``failures`` a torch dist-checkpoint ``CheckpointException`` carries), each once, nearest first: the one
    walk of an exception chain for the checks that look for a known failure inside another library's wrapper."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        more = [f for f in failures.values() if isinstance(f, BaseException)] if isinstance(failures, dict) else []
        stack += reversed([e.__cause__, e.__context__, *more])


_ALLOCATE = re.compile(r"tried to allocate (\d+) bytes|tried to allocate ([\d.]+ ?[KMGT]i?B)", re.IGNORECASE)


def out_of_memory(exc: BaseException) -> str | None:
    """What an allocation that failed asked for ("tried to allocate 1.91 GiB"; "out of memory" when it does not say)
    when ``exc`` is one -- torch's CPU allocator ("can't allocate memory"), CUDA's ``OutOfMemoryError``, Python's
    ``MemoryError`` -- itself or an exception it was raised from; None for anything else."""
    for e in causes(exc):
        text = str(e)
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
                isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())):
            match = _ALLOCATE.search(text)
            if match is None:
                return "out of memory"
            if match.group(1):
                return f"tried to allocate {int(match.group(1)) / 2 ** 30:.2f} GiB"
            return f"tried to allocate {match.group(2)}"
    return None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused_pickle(exc: BaseException) -> str | None:
    """Why ``torch.load(weights_only=True)`` refused a file, when ``exc`` is that refusal (itself or an exception it
    was raised from): "it holds more than tensors: a reference to posix.system", or that it is no plain file of
    tensors; None for anything else. torch's own message advises loading the file again with ``weights_only=False``
    (arbitrary code execution), which no error of ours repeats."""
    import pickle

    for e in causes(exc):
        if isinstance(e, pickle.UnpicklingError):
            found = _GLOBAL.search(str(e))
            return f"it holds more than tensors: a reference to {found[1]}" if found else \
                "it is not a plain file of tensors: damaged, or pickled by other means"
    return None


def check_seed(key: str, value) -> None:
    """A seed that numpy, torch and megatron all take: an integer in [0, 2**32 - 1] (numpy refuses a negative one
    deep inside a run)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 32:
        raise ConfigError(key, f"must be an integer in [0, {2 ** 32 - 1}], got {value!r}")


def print_error(key: str, message: str) -> None:
    """Write ``error: <key>: <message>`` as ONE write: under PYTHONUNBUFFERED, print() writes the text and the newline
    separately, so two ranks failing at once interleave into one garbled line."""
    import os
    import sys

    sys.stderr.flush()
    line = f"error: {key}: {message}\n".encode(sys.stderr.encoding or "utf-8", "backslashreplace")
    try:
        os.write(sys.stderr.fileno(), line)
    except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest capture, StringIO) has no fd
        sys.stderr.write(line.decode(sys.stderr.encoding or "utf-8"))
        sys.stderr.flush()
