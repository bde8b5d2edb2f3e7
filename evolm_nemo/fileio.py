"""Small file helpers shared by every command: atomic writes (temp file next to the target, then rename, so a crash
never leaves a half-written file) and JSONL reading with one-line errors that name the file and line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from evolm_nemo.config.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_dir(tmp: str | Path, dst: str | Path) -> None:
    """Put the finished directory ``tmp`` in place of ``dst``: an existing ``dst`` is moved aside first and removed
    only after the new one is in place, so ``dst`` is at every moment either the old or the new complete directory."""
    import shutil

    tmp, dst = Path(tmp), Path(dst)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | Path, key: str = "input") -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each non-blank line (``where`` is ``file:line``). A missing file is a ConfigError naming
    ``key``; a line that is not a JSON object is a ConfigError naming the file and line."""
    if not Path(path).is_file():
        raise ConfigError(key, f"no such file: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(where, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                                         "re-encode the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                raise ConfigError(where, f"not valid JSON ({exc})") from None
            except RecursionError:
                raise ConfigError(where, "JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise ConfigError(where, f"expected a JSON object, got {type(row).__name__}")
            if _SURROGATE_ESCAPE.search(text):
                _check_unicode(row, where)
            yield where, row


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(row: dict, where: str) -> None:
    """A "\\udXXX" escape that is not half of a surrogate pair gives a string Python cannot write as UTF-8."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end].encode("utf-8", "backslashreplace").decode("ascii")
        raise ConfigError(where, f"contains a lone surrogate ({bad}), which is not valid Unicode; fix the text "
                                 "that produced it") from None
    except RecursionError:
        raise ConfigError(where, "JSON nested too deeply to read") from None


def read_jsonl(path: str | Path, key: str = "input") -> list[dict]:
    return [row for _, row in iter_jsonl(path, key)]


def drop_rows_after(path: str | Path, iteration: int) -> None:
    """Rewrite a per-iteration JSONL log (atomically) without the rows of iterations after ``iteration``: what an
    interrupted run wrote past the checkpoint it resumes from. A line that is not a JSON object (the torn last line
    of a killed run, or damage) is dropped too, and said on stderr."""
    path = Path(path)
    if not path.exists():
        return
    kept, torn = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict):
            torn.append(lineno)
            continue
        if row.get("iteration", 0) <= iteration:
            kept.append(line)
    if torn:
        import sys

        where = f"line {torn[0]}" if len(torn) == 1 else f"lines {', '.join(map(str, torn[:5]))}"
        print(f"[evolm] {path}: dropped {len(torn)} unreadable {where} (a record torn by an interrupted write)",
              file=sys.stderr, flush=True)
    write_text(path, "".join(line + "\n" for line in kept))
