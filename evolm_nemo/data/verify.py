"""Prepared data checked against the content hash its preparation recorded -- once: the first reader hashes the files
(and measures their largest token id on the way) and leaves ``.verified`` next to them, keyed by each file's size and
modification time and by the expected hash, so later runs read a few bytes instead of the data. A record that no
longer fits (a file rewritten, touched, grown or cut) is redone. Data that cannot be written beside (a read-only
corpus) is recorded under ``<data.cache_dir>/verified/`` instead. A mismatch is a one-line ConfigError naming the
files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from evolm_nemo.config.errors import ConfigError

VERIFIED = ".verified"


def _stamp(files: list[Path]) -> dict:
    out = {}
    for f in files:
        st = f.stat()
        out[f.name] = [st.st_size, st.st_mtime_ns]
    return out


def verified(record: Path, files: list[Path], expected: str | None, measure: Callable[[], dict], key: str,
             what: str, cache_dir=None) -> dict:
    """``measure()`` of ``files`` (a dict with ``sha256``, plus whatever else it measures, e.g. ``max_token_id``),
    from ``record`` (or its stand-in under ``cache_dir``) when it was taken of these very files for this
    ``expected`` hash, else measured now and recorded. ``expected`` None (data from before content hashes):
    measured, never refused. A hash other than ``expected`` raises ConfigError(``key``) saying that ``what`` was
    damaged or altered."""
    record, files = Path(record), [Path(f) for f in files]
    records = [record]
    if cache_dir is not None:
        name = hashlib.sha256(str(record.resolve()).encode()).hexdigest()[:32]
        records.append(Path(cache_dir) / "verified" / f"{name}.json")
    stamp = _stamp(files)
    for path in records:
        try:
            held = json.loads(path.read_text())
            if (held.get("expected") == expected and held.get("files") == stamp
                    and isinstance(held.get("measured"), dict)):
                return held["measured"]
        except (OSError, ValueError, AttributeError):
            pass
    measured = measure()
    if expected is not None and measured.get("sha256") != expected:
        names = ", ".join(f.name for f in files)
        raise ConfigError(key, f"{what}: its content ({names}) does not match the content_sha256 its preparation "
                               f"recorded ({expected[:16]}..., now {str(measured.get('sha256'))[:16]}...): damaged or "
                               "altered since; prepare it again")
    if _stamp(files) == stamp:  # unchanged while it was read: worth keeping
        text = json.dumps({"expected": expected, "files": stamp, "measured": measured}) + "\n"
        for path in records:  # beside the data, else (read-only data) under cache_dir
            if _write(path, text, make_parent=path is not record):
                break
    return measured


def _write(path: Path, text: str, make_parent: bool) -> bool:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        if make_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
