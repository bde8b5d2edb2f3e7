"""Small file helpers shared by every command: atomic writes (temp file next to the target, then rename, so a crash
never leaves a half-written file), output directories (built in a temporary directory next to the destination, then
renamed into place), output checks before any work, and JSONL reading with one-line errors that name the file and
line."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from evolm_nemo.config.errors import ConfigError, causes


# ------------------------------------------------------------------------------------------- failed writes

# What the OS says when an output cannot be written where it was asked to go -- a full disk or quota, a file over
# the size limit, a read-only filesystem, no permission, a file where a directory must be (or the reverse): the
# user's to fix, so one line, not a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.ENOTDIR, errno.EISDIR, errno.EEXIST})
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)")  # Python's / Rust's (safetensors) wording


def write_failure(exc: BaseException) -> str | None:
    """The OS's reason (e.g. "No space left on device") when ``exc`` is a refused write (``WRITE_ERRNOS``) -- itself,
    an exception it was raised from, or one a library wrapped (torch dist-checkpoint's per-rank failures carry only
    the text "[Errno 28] ...", safetensors "(os error 28)"); None for anything else."""
    for e in causes(exc):  # with dist-checkpoint's per-rank failures
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e.strerror or os.strerror(e.errno)
    for match in _ERRNO_TEXT.finditer(str(exc)):
        number = int(match.group(1) or match.group(2))
        if number in WRITE_ERRNOS:
            return os.strerror(number)
    return None


FULL_BELOW = 16 << 20  # bytes: a filesystem with less free space than this counts as full (see disk_full)


def disk_full(path: str | Path) -> str | None:
    """"No space left on device" when the filesystem that holds ``path`` (or its nearest existing parent) has less
    than ``FULL_BELOW`` bytes or no inodes left, else None. For writers that lose the errno: torch's zip writer
    under dist-checkpoint reports a full disk as "unexpected pos 704 vs 598"."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < FULL_BELOW or (st.f_files and st.f_favail == 0):
        return os.strerror(errno.ENOSPC)
    return None


def write_error(exc: BaseException, path: str | Path, key: str | None = None, what: str | None = None,
                reason: str | None = None) -> ConfigError | None:
    """The one line for ``exc`` if it is a refused write of ``path`` (``write_failure``, or the given ``reason``,
    e.g. ``disk_full``'s): a ConfigError naming ``key`` (default: the path) and the path; None for anything else
    (a ConfigError already is one line)."""
    if isinstance(exc, (ConfigError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None  # (torch's CheckpointException is a BaseException: not excluded)
    reason = write_failure(exc) or reason
    if reason is None:
        return None
    return ConfigError(key or str(path), f"cannot write {what or path}: {reason}; nothing of it was kept (free "
                                         "space or pick another place, then rerun)")


@contextlib.contextmanager
def writing(path: str | Path, key: str | None = None, what: str | None = None) -> Iterator[None]:
    """Run the body that writes ``path``; a refused write in it becomes one line (``write_error``). The body
    cleans up after itself (its own ``finally``); this only says what happened."""
    try:
        yield
    except BaseException as exc:
        error = write_error(exc, path, key, what)
        if error is None:
            raise
        raise error from None


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would leave: an existing file's own, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (with the mode a plain write would
    give, not mkstemp's 0600), on error it is removed. A refused write (full disk, read-only, ...) is one line
    naming ``path`` (``writing``)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, _new_file_mode(path))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


# the signals that stop a command, by name (this module imports no torch: the CLI reads it): a scheduler's SIGTERM,
# the hangup of the terminal or ssh session, and SIGUSR1 (`sbatch --signal=USR1@<s>`, the Lightning/NeMo 1 habit). A
# training saves and stops after its iteration (runtime.signals.STOP_SIGNALS); other commands unwind as on Ctrl-C
STOP_SIGNAL_NAMES = ("SIGTERM", "SIGHUP", "SIGUSR1")


@contextlib.contextmanager
def signals_held(signals: tuple = ("SIGINT", *STOP_SIGNAL_NAMES)) -> Iterator[None]:
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP, SIGUSR1) that arrives inside waits for its end, where it is sent again
    to the handler that was there before: for steps that must not be split, e.g. committing a dataset and the file
    that belongs with it. When the steps fail, the failure goes on and the held signal is dropped (sent again it would
    replace the error with "stopped by ..."; the command ends anyway). Only the main thread can hold them
    (elsewhere nothing is held)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {}
    for name in signals:
        sig = getattr(signal, name)
        previous[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
    failed = True
    try:
        yield
        failed = False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if got and not failed:
            os.kill(os.getpid(), got[0])


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, the C library or the filesystem cannot."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0


def replace_dir(tmp: str | Path, dst: str | Path) -> None:
    """Put the finished directory ``tmp`` in place of ``dst``, so that ``dst`` is at every moment either the old or
    the new complete directory: the two are swapped in one step where Linux can (then the old one is removed), else
    the old one is moved aside under a name of its own and removed only after the new one is in place (put back if
    that fails)."""
    tmp, dst = Path(tmp), Path(dst)
    if dst.is_dir() and not dst.is_symlink() and _exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        os.replace(dst, old)  # onto the empty directory just made
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- output directories

OWNER = ".evolm-owner"  # in a temporary output directory: "<pid> <host>" of the process writing it


def _owner_alive(text: str) -> bool:
    """Whether the process named by an OWNER record may still be running (another host: assume it is)."""
    try:
        pid_text, host = text.split()
        pid = int(pid_text)
    except ValueError:
        return True  # not our format: leave it alone
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(dst: Path) -> list[Path]:
    """Remove what killed earlier runs left next to ``dst``: ``.<name>.tmp-*`` directories whose OWNER record names a
    dead process on this host, and ``.<name>.old-<pid>`` directories of dead pids. Anything else is left alone.
    Returns what was removed (each also said on stderr)."""
    removed = []
    if not dst.parent.is_dir():
        return removed
    for path in dst.parent.glob(f".{dst.name}.tmp-*"):
        owner = path / OWNER
        try:
            record = owner.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # not provably ours
        if path.is_dir() and not path.is_symlink() and not _owner_alive(record):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in dst.parent.glob(f".{dst.name}.old-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and path.is_dir() and not path.is_symlink() and not _owner_alive(
                f"{pid} {socket.gethostname()}"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in removed:
        print(f"removed {path}, left by an earlier run that was killed (pid no longer running)", file=sys.stderr)
    return removed


def temp_dir(dst: str | Path, mode: int | None = None, owned: bool = False) -> Path:
    """A fresh directory ``.<name>.tmp-*`` next to ``dst`` (same filesystem, so the final rename is atomic), its
    parent created. ``mode``: its permissions (mkdtemp makes it 0700). ``owned``: with an OWNER record, so that a
    later run can tell it from a live one's if this process is killed; stale ones of dead runs go first."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if owned:
        clean_stale_temps(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    if mode is not None:
        os.chmod(tmp, mode)
    if owned:
        (tmp / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
    return tmp


@contextlib.contextmanager
def staged_dir(dst: str | Path, mode: int | None = None) -> Iterator[Path]:
    """``temp_dir(dst, mode)`` for the body to fill and commit (``replace_dir`` / ``commit_first``); whatever is
    left of it is removed on the way out, also on error."""
    tmp = temp_dir(dst, mode)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(root: Path) -> None:
    """Give a finished output the modes a plain ``mkdir`` / ``open`` would (0777 / 0666 less the umask): mkdtemp and
    mkstemp create 0700 / 0600, which a cluster group could not read."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask, follow_symlinks=False)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def commit_dir(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` (from ``temp_dir(dst, owned=True)``) to ``dst`` (replacing an old ``dst`` only after
    the new one is complete), with the OWNER record removed and umask-respecting modes."""
    (tmp / OWNER).unlink(missing_ok=True)
    publish_modes(tmp)
    replace_dir(tmp, dst)


def commit_first(tmp: Path, dst: Path, marker: str) -> None:
    """Rename the finished ``tmp`` to ``dst``, unless another writer committed ``dst`` first (it holds ``marker``):
    then ``tmp`` is dropped. A ``dst`` in the way without ``marker`` raises the OSError."""
    try:
        os.replace(tmp, dst)  # fails if another writer committed first (a non-empty directory)
    except OSError:
        if not (dst / marker).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# What each command leaves in the directory it writes (its "output kind"), so that ``overwrite`` replaces only what
# the same command made: a dataset by a dataset, an export by an export; a training run's directory is never the
# overwrite target of another command.
KINDS = {
    "run": "a training run's directory (checkpoints, metrics)",
    "sft-dataset": "an SFT dataset (made by evolm prepare-sft)",
    "rm-dataset": "an RM dataset (made by evolm prepare-rm)",
    "hf-export": "an HF export (made by evolm export-hf)",
    "hf-import": "an imported checkpoint (made by evolm import-hf)",
    "trtllm-engine": "a TensorRT-LLM engine (made by evolm export-trtllm)",
    "nano-world": "a nano world (made by python -m evolm_nemo.data.nano_world)",
    "suite-slurm": "a suite's sbatch scripts (made by evolm suite launch executor=slurm dry_run=true)",
    "checkpoint": "an evolm checkpoint",
    "hf-model": "an HF model directory not made by evolm export-hf",
    "other": "a directory of other files",
}


def output_kind(path: str | Path) -> str | None:
    """What made the existing directory ``path`` (a key of ``KINDS``), or None when it is empty. A run directory
    (``checkpoints/``, ``critic/`` or the run record ``run.json``) counts as a run whatever else it holds."""
    p = Path(path)
    try:
        names = {c.name for c in p.iterdir()}
    except OSError:
        return "other"  # cannot be read: not provably the command's own
    if not names:
        return None
    if {"checkpoints", "critic", "run.json"} & names:
        return "run"
    if "manifest.json" in names:
        try:
            fmt = json.loads((p / "manifest.json").read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        fmt = fmt if isinstance(fmt, str) else None
        found = {"evolm-sft-1": "sft-dataset", "evolm-rm-1": "rm-dataset", "evolm-nano-world-1": "nano-world"}.get(fmt)
        if found:
            return found
    if "evolm_suite_slurm.json" in names:
        return "suite-slurm"
    if "evolm_export.json" in names:
        return "hf-export"
    if "evolm_trtllm.json" in names:
        return "trtllm-engine"
    if (p / "iter_0000000" / "evolm_import.json").is_file():
        return "hf-import"
    if "evolm.json" in names or any(re.fullmatch(r"iter_\d{7}", n) for n in names):
        return "checkpoint"
    if "config.json" in names and is_hf_model_dir(p):
        return "hf-model"
    return "other"


# What a training run writes into its directory (train/metrics.py, train/tracking.py, stages/dpo.py, stages/rm.py,
# rl/rollout.py, checkpoint/io.py): no other command writes there. Other files beside them (the demo's eval/ and
# rm_samples.jsonl under its pretraining run, say) are not the run's.
RUN_OWNED = re.compile(r"checkpoints|critic|tensorboard|run\.json|metrics\.jsonl|\.lock|tracking\.json|"
                       r"dpo_reference\.safetensors|rm_val_scores\.jsonl|rollouts(\.dp\d+)?\.jsonl")
# kinds of output no other command writes into, at any depth
SEALED = frozenset(KINDS) - {"run", "other"}
META_FILE = "evolm.json"  # a checkpoint's commit record (checkpoint/io.py META is this one)


def _holder_kind(parent: Path) -> str | None:
    """``output_kind`` of a directory above an output, on proof only: a training run by its run record (``run.json``:
    a folder that merely holds a ``checkpoints/`` is no run), a checkpoint by an ``evolm.json`` in it or in one of
    its ``iter_*`` directories (a ``~/checkpoints/`` of other things is none)."""
    if not parent.is_dir():
        return None
    kind = output_kind(parent)
    if kind == "run" and not (parent / "run.json").is_file():
        return None
    if kind == "checkpoint" and not ((parent / META_FILE).is_file()
                                     or any((c / META_FILE).is_file() for c in parent.glob("iter_[0-9]*"))):
        return None
    return kind


def owned_elsewhere(path: str | Path, itself: bool = True) -> str | None:
    """Why writing ``path`` (a file or a directory, existing or not) would write into another command's output -- it
    is, or lies inside, a checkpoint, a dataset, an export or a model directory, or it is one of a training run's own
    files or directories -- or None when it would not. With ``itself``, an existing directory ``path`` is judged
    too (a training run's directory included); without, only what holds it."""
    path = Path(path).expanduser().resolve()
    if itself and path.is_dir() and output_kind(path) in SEALED | {"run"}:
        return f"{path} is {KINDS[output_kind(path)]}"
    child = path
    for parent in path.parents:
        kind = _holder_kind(parent)
        if kind == "run" and RUN_OWNED.fullmatch(child.name):
            return f"{path} is {'' if child == path else 'inside '}the training run {parent}'s own {child.name}"
        if kind in SEALED:
            return f"{path} lies inside {KINDS[kind]}, {parent}"
        child = parent
    return None


def same_path(a: Path, b: Path) -> bool:
    """``a`` and ``b`` (resolved) name the same file: equal paths, or one file under two names (a hard link)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _sources(sources: tuple) -> list[Path]:
    return [Path(src).expanduser().resolve() for src in sources if src is not None]


def check_dst(dst: Path, overwrite: bool, key: str = "dst", sources: tuple = (), kind: str | None = None,
              lock: bool = True) -> None:
    """``dst`` may be created (or, with ``overwrite``, replaced) without touching any of ``sources``: it must not be
    one of them, lie inside one, or contain one (replacing it would delete what this command reads). With ``kind``
    (a key of ``KINDS``: what this command writes), an existing non-empty ``dst`` must be of that kind: ``overwrite``
    replaces only what the same command made, never a training run or anything else. With ``lock``, ``dst`` is
    locked until the command ends (``lock_output``) before it is looked at, so that a second command writing the
    same ``dst`` at the same time refuses instead of losing one's work; a refusal here releases it."""
    dst = Path(dst).expanduser().resolve()
    for src in _sources(sources):
        if same_path(dst, src) or dst.is_relative_to(src) or src.is_relative_to(dst):
            raise ConfigError(key, f"{dst} overlaps the source {src}; write the output elsewhere")
    foreign = owned_elsewhere(dst, itself=False)  # what dst itself is: ``kind`` below
    if foreign is not None:
        raise ConfigError(key, f"{foreign}, which no other command writes; write {key} elsewhere")
    taken = lock and lock_output(dst, key)
    try:
        if dst.exists() and not dst.is_dir():
            raise ConfigError(key, f"{dst} exists and is not a directory")
        if kind is not None and dst.is_dir():
            found = output_kind(dst)
            if found is not None and found != kind:
                raise ConfigError(key, f"{dst} is {KINDS[found]}, not {KINDS[kind].split(' (')[0]}; overwrite=true "
                                       "replaces only an output of the same command: pick another " + key)
        if dst.exists() and not overwrite:
            raise ConfigError(key, f"{dst} already exists; pass overwrite=true to replace it")
    except ConfigError:
        if taken:
            release_output(dst)
        raise


def check_dst_file(path: str | Path, overwrite: bool, key: str, sources: tuple = (), lock: bool = True,
                   ours: Callable[[Path], bool] | None = None, what: str = "") -> None:
    """A file output ``path`` may be written (or, with ``overwrite``, replaced) without touching any of ``sources``
    (files or directories this command reads): it must not be one of them (also under another name) nor lie inside
    one, nor inside another command's output (``owned_elsewhere``); it is locked like a directory output
    (``lock_output``); an existing one needs ``overwrite``, and with ``ours`` (does an existing file look like this
    command's output, ``what``?) ``overwrite`` replaces only such a file. A path ending in "/" names a directory,
    existing or not (``rl_output=rl/`` wrote a file called ``rl``)."""
    if str(path).endswith(("/", os.sep)):
        raise ConfigError(key, f"{path} names a directory; name the file to write (e.g. {path}{key}.jsonl)")
    dst = Path(path).expanduser().resolve()
    for src in _sources(sources):
        if same_path(dst, src) or dst.is_relative_to(src):
            what_ = "is" if same_path(dst, src) else "lies inside"
            raise ConfigError(key, f"{dst} {what_} the input {src}, which this command reads; write it elsewhere")
    foreign = owned_elsewhere(dst)
    if foreign is not None:
        raise ConfigError(key, f"{foreign}, which no other command writes; write {key} elsewhere")
    taken = lock and lock_output(dst, key)
    try:
        if dst.is_dir():
            raise ConfigError(key, f"{dst} is a directory; name a file")
        if dst.exists() and not overwrite:
            raise ConfigError(key, f"{dst} exists; pick a new file or pass overwrite=true")
        if dst.exists() and ours is not None and not ours(dst):
            raise ConfigError(key, f"{dst} is not {what}; overwrite=true replaces only an output of the same "
                                   f"command: pick another {key}")
    except ConfigError:
        if taken:
            release_output(dst)
        raise


# ------------------------------------------------------------------------------------------------------- locks

_HELD: dict[str, object] = {}  # lock file -> its open file, locked until the process ends or unlock()
_OUTPUT_LOCKS: dict[str, Path | None] = {}  # those of command outputs (-> the first directory made for it), removed
#                                             when the command ends


def lock_file(path: str | Path) -> str | None:
    """Take an exclusive, non-blocking ``flock`` on the file ``path`` (created if missing) for the rest of this process
    (the kernel drops it when the process ends, however it ends); taking it again in the same process is a no-op.
    Returns None when taken, else what the holder wrote there (its pid). The one locking mechanism of run
    directories (``checkpoint.io.lock_run_dir``) and command outputs (``lock_output``). A holder may remove its lock
    file (``unlock``); a process that opened it just before notices (another inode) and opens it again."""
    import fcntl

    path = Path(path).absolute()
    if str(path) in _HELD:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            return holder
        try:
            current = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        f.close()  # its holder removed it between our open and our lock
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[str(path)] = f
    return None


def unlock(path: str | Path, remove: bool = False) -> None:
    """Release a lock ``lock_file`` took in this process (removing the lock file first, under the lock, with
    ``remove``)."""
    path = Path(path).absolute()
    f = _HELD.pop(str(path), None)
    if f is None:
        return
    if remove:
        with contextlib.suppress(OSError):
            os.unlink(path)
    f.close()


def lock_path(dst: str | Path) -> Path:
    """The lock file of a command's output ``dst``: ``.<name>.lock`` beside it (``dst`` is put in place by a rename,
    so a lock inside it would not survive)."""
    dst = Path(dst).expanduser().resolve()
    return dst.parent / f".{dst.name}.lock"


def lock_output(dst: str | Path, key: str) -> bool:
    """Lock the output ``dst`` of a command (a directory or a file) until the command ends (``release_outputs``: the
    dispatcher calls it, and the process's exit), or refuse in one line naming ``key`` while another process holds
    it. Returns whether this call took it (False: already held here, or no lock file can be made beside ``dst``).
    A lock file left by a killed process is not locked: the next command takes it."""
    path = lock_path(dst)
    if str(path) in _HELD:
        return False
    made = None  # the outermost directory the lock file needs that does not exist yet
    for parent in path.parents:
        if parent.exists():
            break
        made = parent
    try:
        holder = lock_file(path)
    except OSError:  # an unwritable or missing parent: the command's own checks say so in one line
        return False
    if holder is not None:
        raise ConfigError(key, f"{Path(dst).expanduser().resolve()} is being written by another command (pid "
                               f"{holder}); wait for it to end or pick another {key}")
    _OUTPUT_LOCKS[str(path)] = made
    return True


def _drop_output_lock(path: str) -> None:
    """Release and remove one output lock, and the directories made for it that are still empty (a refused
    command leaves nothing behind)."""
    made = _OUTPUT_LOCKS.pop(path)
    unlock(path, remove=True)
    if made is not None:
        for parent in Path(path).parents:
            try:
                parent.rmdir()
            except OSError:
                break
            if parent == made:
                break


def release_output(dst: str | Path) -> None:
    """Release (and remove) the lock ``lock_output`` took on ``dst``."""
    path = lock_path(dst)
    if str(path) in _OUTPUT_LOCKS:
        _drop_output_lock(str(path))


@atexit.register
def release_outputs() -> None:
    """Release (and remove) every output lock this process holds: a command's outputs are unlocked when it ends."""
    for name in sorted(_OUTPUT_LOCKS, reverse=True):
        _drop_output_lock(name)


def resolved(path: str | os.PathLike, key: str) -> Path:
    """``path`` with ``~`` expanded and every symlink resolved; a symlink loop (or a path the OS refuses to resolve)
    is one line naming ``key``."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11: RuntimeError("Symlink loop from ...")
        raise ConfigError(key, f"cannot resolve {path}: {exc}") from None


def check_writable(path: str | os.PathLike, key: str, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be created: one line naming `key`. `path` is a file to be
    written (its directory must be creatable and writable) or, with `directory`, a directory to be created or
    written into. Probed for real (a temporary file in the nearest existing directory, removed at once), so
    read-only mounts and permissions (also for root) are caught, not only mode bits."""
    target = Path(path).absolute()
    if directory and target.exists() and not target.is_dir():
        raise ConfigError(key, f"cannot write into {path}: it is a file, not a directory")
    if not directory and target.is_dir():
        raise ConfigError(key, f"{path} is a directory; name a file")
    probe = target if directory else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"cannot write {path}: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".evolm-write-probe-")
    except OSError as exc:
        raise ConfigError(key, f"cannot write {path}: {probe} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def is_hf_model_dir(path) -> bool:
    """A directory with an HF ``config.json`` and weights (safetensors or PyTorch bin), and no evolm checkpoint."""
    p = Path(path)
    if not (p / "config.json").is_file() or (p / "evolm.json").exists() or (p / "checkpoints").is_dir():
        return False
    return any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")) or (
        p / "model.safetensors.index.json").is_file()


# ------------------------------------------------------------------------------------------------------ files


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def jsonl_with(*fields: str) -> Callable[[Path], bool]:
    """A test of an existing file for ``check_dst_file(ours=...)``: empty, or its first line is a JSON object with
    all of ``fields`` (what a command's JSONL output holds)."""

    def test(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), None)
            row = json.loads(first) if first is not None else None
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return row is None or (isinstance(row, dict) and all(k in row for k in fields))

    return test


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
        it = row.get("iteration", 0) if isinstance(row, dict) else None
        if isinstance(it, bool) or not isinstance(it, int):
            torn.append(lineno)
            continue
        if it <= iteration:
            kept.append(line)
    if torn:
        where = f"line {torn[0]}" if len(torn) == 1 else f"lines {', '.join(map(str, torn[:5]))}"
        print(f"[evolm] {path}: dropped {len(torn)} unreadable {where} (a record torn by an interrupted write)",
              file=sys.stderr, flush=True)
    write_text(path, "".join(line + "\n" for line in kept))
