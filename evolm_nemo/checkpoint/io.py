"""Checkpoint IO through megatron-core dist-checkpointing: reshardable (load at any TP/PP), atomic, keep-last-N.

Layout of a run's checkpoint root::

    checkpoints/
      iter_0000100/            committed: dist-checkpoint files + evolm.json (written last, with a file manifest)
      iter_0000200.tmp-<id>/   being written (never read)

A checkpoint counts only when its directory has the final name AND every file listed in ``evolm.json``'s manifest is
present with the recorded size. All ranks write into a temporary directory; after a barrier the ranks checksum the
files they share out (xxh3-64, streamed) and rank 0 writes ``evolm.json`` with sizes and checksums and renames the
directory (an atomic rename on POSIX), so a crash at any moment leaves either the previous checkpoint as the latest or
a complete new one. Loading verifies the checksums first (the ranks share the files out again): a damaged file is
named, and a resume falls back to the previous committed checkpoint (``start_run``).

A run owns its directory: ``<run>/run.json`` records the run id, every checkpoint's ``evolm.json`` carries it, a
fresh run refuses a directory holding checkpoints unless ``train.overwrite=true`` (which removes them first), and
keep-last only ever prunes the current run's checkpoints.

``evolm.json`` also carries what other tools need without megatron: the model config, the iteration, consumed
samples, lineage. Per-rank RNG states are stored as safetensors (restored only when the layout is unchanged).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evolm_nemo.config.errors import ConfigError, refused_pickle
from evolm_nemo.fileio import META_FILE, disk_full, lock_file, replace_dir, write_error

if TYPE_CHECKING:
    import torch
# torch is imported where tensors are made: reading, verifying and listing checkpoints (`evolm suite status`,
# `release`, a recipe's init_from check) needs none of it

META = META_FILE
# evolm.json: the parent checkpoint a run started from (train.init_from), as {"run_id", "iteration"} -- kept by its
# resumes; `evolm suite launch` redoes a child whose parent's checkpoint is another run's now
PARENT_RUN = "parent_run"
RUN_FILE = "run.json"  # in the run directory: the id of the run that owns it
_CHUNK = 4 << 20  # checksum read size
_ITER = re.compile(r"^iter_(\d{7})$")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def _group():
    """torch.distributed while a process group is up, else None (without torch imported, none can be)."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def _barrier() -> None:
    dist = _group()
    if dist:
        dist.barrier()


def _broadcast(obj):
    dist = _group()
    if not dist:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _manifest(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != META}


# ------------------------------------------------------------------------------------------------------- checksums

try:
    import xxhash

    CHECKSUM = "xxh3_64"
except ImportError:  # xxhash comes with `datasets`; zlib's CRC32 is the fallback
    xxhash = None
    CHECKSUM = "crc32"


def file_checksum(path: str | Path, algorithm: str = CHECKSUM) -> str:
    """Hex digest of a file, read in 4 MiB chunks (xxh3_64, or crc32)."""
    with open(path, "rb", buffering=0) as f:
        if algorithm == "xxh3_64":
            h = xxhash.xxh3_64()
            while chunk := f.read(_CHUNK):
                h.update(chunk)
            return h.hexdigest()
        if algorithm == "crc32":
            crc = 0
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
            return f"{crc:08x}"
    raise CheckpointError(f"{path}: unknown checksum algorithm {algorithm!r}")


def _world() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def _shared_checksums(directory: Path, names: list[str], algorithm: str) -> dict[str, str | None]:
    """Collective: the ranks checksum ``names`` (relative to ``directory``) round-robin; every rank gets all digests
    (None for a file that cannot be read)."""
    mine = {}
    for name in names[_rank()::_world()]:
        try:
            mine[name] = file_checksum(directory / name, algorithm)
        except OSError:
            mine[name] = None
    if _world() == 1:
        return mine
    parts = [None] * _world()
    _group().all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def lock_run_dir(out: str | Path) -> None:
    """Collective. Rank 0 takes an exclusive lock on ``<out>/.lock`` (held until the process ends; ``fileio.lock_file``,
    the lock of every command's output), so a second training into the same run directory refuses in one line
    instead of clashing with the first."""
    out = Path(out)
    holder = None
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        holder = lock_file(out / ".lock")
    holder = _broadcast(holder)
    if holder is not None:
        raise ConfigError("run.out_dir", f"{out} is in use by another training (pid {holder}); wait for it to end or "
                                         "pick another run.out_dir")


def problem(directory: str | Path) -> str | None:
    """Why ``directory`` is not a committed checkpoint whose files all match its manifest (names and sizes; cheap,
    no data read), or None."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
        files = meta["manifest"]
    except OSError:
        return f"no {META} (never committed)"
    except (ValueError, KeyError, TypeError):
        return f"{META} is unreadable"
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in files.items()):
        return f"{META} has no manifest of its files (name: size)"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (cut short or replaced)"
    return None


def is_complete(directory: Path) -> bool:
    """True when ``directory`` is a committed checkpoint whose files all match its manifest."""
    return problem(directory) is None


def damage(directory: str | Path) -> str | None:
    """Collective. Why ``directory`` cannot be loaded -- a ``problem`` or a file whose checksum differs from the one
    recorded when it was written -- or None. Checkpoints written before checksums existed get the size check only."""
    directory = Path(directory)
    found = _broadcast(problem(directory) if _rank() == 0 else None)
    if found is not None:
        return found
    meta = json.loads((directory / META).read_text())
    if "checksums" not in meta:
        return None  # written before checksums existed
    want = meta["checksums"]
    if not isinstance(want, dict) or set(want) != set(meta["manifest"]):
        # every save records one per file of its manifest: anything else is an edited or damaged record
        return f"{META}'s checksums do not cover its files (a mapping of each manifest file to its checksum)"
    got = _shared_checksums(directory, sorted(want), meta.get("checksum", "xxh3_64"))
    for name in sorted(want):
        if got.get(name) != want[name]:
            return f"{name} is damaged (checksum {got.get(name)} != {want[name]} recorded when it was written)"
    return None


_VERIFIED: set[tuple] = set()  # checkpoints this process has verified whole, as (path, its evolm.json's identity)


def _verified_key(directory: Path) -> tuple | None:
    try:
        st = (directory / META).stat()
    except OSError:
        return None
    return str(directory.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def verify(directory: str | Path) -> None:
    """Collective: raise CheckpointError naming the damaged file (see ``damage``). A checkpoint this process already
    verified (the same committed ``evolm.json``: RL's actor, reference and critic start from one parent) is not
    read again; rank 0 decides, so every rank takes the same path through the collectives."""
    directory = Path(directory)
    key = _verified_key(directory) if _rank() == 0 else None
    if _broadcast(key is not None and key in _VERIFIED):
        return
    found = damage(directory)
    if found is not None:
        raise CheckpointError(f"{directory}: {found}")
    if key is not None:
        _VERIFIED.add(key)


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    if not is_complete(directory):
        raise CheckpointError(f"{directory}: not a complete evolm checkpoint (missing or inconsistent {META})")
    return json.loads((directory / META).read_text())


def parent_tokenizer(path: str | Path, key: str | None = None) -> str | None:
    """The tokenizer reference (a dir or hub name) recorded in the checkpoint at ``path`` (a checkpoint dir, or a
    run's checkpoint root / run dir: its latest complete checkpoint); None when it records none. A missing or
    incomplete checkpoint raises CheckpointError, or with ``key`` a ConfigError naming that key."""
    try:
        return read_meta(resolve(path)).get("tokenizer")
    except CheckpointError as exc:
        if key is None:
            raise
        raise ConfigError(key, str(exc)) from None


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Every ``iter_NNNNNNN`` directory under ``root`` (committed or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ITER.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def run_id_of(directory: str | Path) -> str | None:
    try:
        return json.loads((Path(directory) / META).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def owner(root: str | Path) -> str | None:
    """The run id recorded in the run directory holding checkpoint root ``root`` (``<run>/checkpoints``)."""
    try:
        return json.loads((Path(root).parent / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _ours(directory: Path, run_id: str | None) -> bool:
    """Checkpoints written before run ids existed count as anyone's."""
    theirs = run_id_of(directory)
    return run_id is None or theirs is None or theirs == run_id


def committed(root: str | Path) -> list[Path]:
    """Committed, complete checkpoints under ``root`` (of the run owning the directory, when it records one), oldest
    first."""
    run = owner(root)
    return [p for p in checkpoint_dirs(root) if is_complete(p) and _ours(p, run)]


def latest(root: str | Path) -> Path | None:
    done = committed(root)
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """A checkpoint dir, or a run's checkpoint root / run dir -> its latest complete checkpoint. Newer checkpoints of
    the run that were committed but are damaged now (a file missing or cut short) are passed over, each said once
    per process on stderr, so that an export or a child run never starts from an older one without a word."""
    path = Path(path)
    if (path / META).exists():
        why = problem(path)
        if why is not None:
            raise CheckpointError(f"{path}: checkpoint is incomplete ({why})")
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root)
        if found is not None:
            _say_passed_over(root, found)
            return found
    raise CheckpointError(f"{path}: no complete checkpoint found")


_PASSED_OVER: set[str] = set()  # damaged checkpoints ``resolve`` has said it passed over (once each per process)


def _say_passed_over(root: Path, found: Path) -> None:
    run = owner(root)
    for newer in checkpoint_dirs(root):
        if int(newer.name.split("_")[1]) <= int(found.name.split("_")[1]) or str(newer) in _PASSED_OVER:
            continue
        why = problem(newer)
        if why is not None and (newer / META).is_file() and _ours(newer, run):  # committed once, damaged since
            _PASSED_OVER.add(str(newer))
            if _rank() == 0 and os.environ.get("RANK", "0") == "0":  # torchrun's ranks plan before the group exists
                print(f"[evolm] note: passing over checkpoint {newer} ({why}); using {found.name}", file=sys.stderr,
                      flush=True)


# ---------------------------------------------------------------------------------------------------------------- RNG

def _rng_state() -> dict[str, torch.Tensor]:
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, value in get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return state


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().cpu() for k, v in _rng_state().items()}
    save_file(tensors, str(path), metadata={
        "python": json.dumps(random.getstate()[1]),
        "numpy": json.dumps(np.random.get_state()[1].tolist()),
        "numpy_pos": str(np.random.get_state()[2]),
    })


def _load_rng(path: Path) -> None:
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    tracker = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
    random.setstate((3, tuple(json.loads(meta["python"])), None))
    np.random.set_state(("MT19937", np.array(json.loads(meta["numpy"]), dtype=np.uint32), int(meta["numpy_pos"])))


# ------------------------------------------------------------------------------------------------------- state dicts

def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_sharded(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(chunks, loaded: dict) -> None:
    if len(chunks) == 1:
        _unwrap(chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            _unwrap(c).load_state_dict(loaded[f"model{i}"], strict=True)


def _in_the_way(final: Path, run_id: str | None) -> str | None:
    """Why a save must not replace what sits at ``final``: a complete checkpoint of another run (an incomplete
    attempt, or this run's own checkpoint, is replaced), or None."""
    if not final.exists() or problem(final) is not None or _ours(final, run_id):
        return None
    return (f"{final} holds a complete checkpoint of run {run_id_of(final)}, not of this run ({run_id}); it is "
            "not replaced: move it away or pick another run.out_dir")


def save(root: str | Path, iteration: int, chunks, optimizer=None, scheduler=None, extra: dict | None = None,
         meta: dict | None = None, layout: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the committed directory. Another run's complete checkpoint at the same
    iteration is refused (ConfigError) before anything is written."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"iter_{iteration:07d}"
    run_id = (meta or {}).get("run_id")
    if (refused := _broadcast(_in_the_way(final, run_id) if _rank() == 0 else None)) is not None:
        raise ConfigError("run.out_dir", refused)
    token = _broadcast(os.urandom(4).hex() if _rank() == 0 else None)
    tmp = root / f"{final.name}.tmp-{token}"
    try:
        if _rank() == 0:
            tmp.mkdir(parents=True, exist_ok=False)
        _barrier()

        state = _model_sharded(chunks)
        if optimizer is not None:
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=_OPTIM_METADATA)
        common = {"iteration": iteration}
        if scheduler is not None:
            common["scheduler"] = scheduler.state_dict()
        common.update(extra or {})
        state["evolm"] = common
        with _writer_in_process():
            dist_checkpointing.save(state, str(tmp),
                                    content_metadata=_OPTIM_METADATA if optimizer is not None else None)

        (tmp / "rng").mkdir(exist_ok=True)
        _save_rng(tmp / "rng" / f"rank_{_rank():05d}.safetensors")
        _barrier()
        sizes = _broadcast(_manifest(tmp) if _rank() == 0 else None)
        sums = _shared_checksums(tmp, sorted(sizes), CHECKSUM)
        if _rank() == 0:
            record = dict(meta or {})
            record.update(iteration=iteration, layout=layout or {}, has_optimizer=optimizer is not None,
                          extra=extra or {}, format="evolm-dist-ckpt-1", manifest=sizes, checksum=CHECKSUM,
                          checksums=sums)
            part = tmp / (META + ".part")
            part.write_text(json.dumps(record, indent=1, sort_keys=True))
            os.replace(part, tmp / META)
            if (refused := _in_the_way(final, run_id)) is not None:
                raise ConfigError("run.out_dir", refused)
            replace_dir(tmp, final)  # over an older incomplete attempt at the same iteration, or this run's own
            for stale in root.glob("iter_*.tmp-*"):  # leftovers of crashed saves
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException as exc:
        # a full disk (or any failure mid-save): nothing half-written stays behind; the committed checkpoints
        # before this one are untouched, so the run resumes from the newest of them
        full = disk_full(tmp)  # before the cleanup frees the space: some writers lose ENOSPC's errno
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if (error := write_error(exc, final, "run.out_dir", f"checkpoint {final}", full)) is not None:
            raise ConfigError(error.key, error.message + "; the run resumes from its last committed checkpoint") \
                from None
        raise
    _barrier()
    return final


def _prune(root: Path, run: str | None, keep: set[str]) -> None:
    """Rank 0: remove this run's complete checkpoints under ``root`` whose names are not in ``keep``; another run's
    are never touched."""
    for old in checkpoint_dirs(root):
        if old.name not in keep and is_complete(old) and _ours(old, run):
            shutil.rmtree(old, ignore_errors=True)


def prune(roots: list, run: str | None, keep_last: int, newest: str) -> None:
    """Collective, once a run's newest checkpoint ``newest`` is committed under every root (``roots[0]``'s commit is
    the commit of the set): ``roots[0]`` keeps its newest ``keep_last`` complete checkpoints of this run up to
    ``newest`` (and ``newest``), every other root exactly their namesakes -- so a crash while a set is written never
    leaves a resumable checkpoint without its partners. Checkpoints past ``newest`` are ones the resume passed over
    (damaged, or without partners): kept, but not counted, until this run's save at their iteration replaces them."""
    if _rank() == 0:
        ours = [c.name for c in checkpoint_dirs(roots[0]) if is_complete(c) and _ours(c, run)]
        upto = ours.index(newest) + 1 if newest in ours else len(ours)
        keep = set(ours[:upto][-keep_last:]) | set(ours[upto:]) | {newest}
        for root in roots:
            _prune(Path(root), run, keep)
    _barrier()


@contextmanager
def _writer_in_process():
    """megatron-core's synchronous dist-checkpoint save collects its forked writers' results through a queue it
    creates once per process with ``multiprocessing.get_context("spawn").Manager()``: a server process (and the
    resource tracker it starts) that outlives a killed trainer. A save that is not asynchronous needs no such
    process -- the results are put and read by this same process -- so hand it a plain queue for the call.
    Its writers also log their failure on stderr before it is raised here: quiet, the raised error says it once."""
    import logging

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = getattr(filesystem_async, "_results_queue", None)
    filesystem_async._results_queue = queue.Queue()
    log = logging.getLogger(filesystem_async.__name__)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        filesystem_async._results_queue = previous
        log.setLevel(level)


def load(path: str | Path, chunks, optimizer=None, scheduler=None, restore_rng: bool = True,
         layout: dict | None = None, verified: bool = False) -> dict:
    """Collective. Loads model (+ optimizer, scheduler, RNG when given) resharding to the current TP/PP, after
    checking every file's checksum (unless ``verified``: the caller just did). Returns the checkpoint's common state
    (iteration, consumed samples, ...)."""
    from megatron.core import dist_checkpointing

    path = resolve(path)
    meta = read_meta(path)
    if not verified:
        verify(path)
    state = _model_sharded(chunks)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"{path}: has no optimizer state; use train.init_from to start from its weights")
        _prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
    state["evolm"] = {}
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:  # common.pt / .distcp are read with weights_only=True: pickled code is refused there
        why = refused_pickle(exc)
        if why is None:
            raise
        raise CheckpointError(f"{path}: its files cannot be loaded with weights_only=True ({why}); they were "
                              "altered or not written by evolm") from None
    _load_model_state(chunks, loaded)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_step(optimizer)
    common = loaded.get("evolm", {}) or {}
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    rng = path / "rng" / f"rank_{_rank():05d}.safetensors"
    if restore_rng and rng.is_file() and (layout is None or meta.get("layout") == layout):
        _load_rng(rng)
    return {"iteration": meta["iteration"], **meta.get("extra", {}), "meta": meta}


def load_weights(path: str | Path, chunks) -> dict:
    """Model weights only (a parent checkpoint for CPT/SFT/PPO, or export): any TP/PP."""
    return load(path, chunks, optimizer=None, scheduler=None, restore_rng=False)["meta"]


# ------------------------------------------------------------------------------- optimizer-state reshard workarounds

def _inner_optimizers(optimizer) -> list:
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", None) for o in inner if getattr(o, "optimizer", None) is not None]


def _prepare_optimizer_for_load(optimizer) -> None:
    """Two megatron-core 0.16 reshard bugs, on any device: the distributed optimizer asserts Adam state (with
    `step`) exists before loading (so create it empty), and its fully-reshardable loader then copies every state key,
    `step` included, from checkpoint tensors that have no `step` (KeyError): skip `step` there; it is restored from
    the param groups."""
    import torch

    for wrapper in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if hasattr(wrapper, "_set_main_param_and_optimizer_states") and not getattr(wrapper, "_evolm_tolerant", False):
            wrapper._set_main_param_and_optimizer_states = partial(_set_states_without_step, wrapper,
                                                                   wrapper._set_main_param_and_optimizer_states)
            wrapper._evolm_tolerant = True
    for opt in _inner_optimizers(optimizer):
        for group in opt.param_groups:
            for param in group["params"]:
                state = opt.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)


def _set_states_without_step(wrapper, original, model_param, tensors) -> None:
    if "step" in tensors or getattr(wrapper.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
        return original(model_param, tensors)
    group_index, group_order = wrapper.model_param_group_index_map[model_param]
    state = wrapper.optimizer.state[wrapper.optimizer.param_groups[group_index]["params"][group_order]]
    step = state.pop("step", None)
    try:
        original(model_param, tensors)
    finally:
        if step is not None:
            state["step"] = step


def _unshare_step(optimizer) -> None:
    """After a reshard load one `step` tensor can be shared by all params, so torch Adam would bump it once per
    param per step: give each param its own copy."""
    import torch

    for opt in _inner_optimizers(optimizer):
        seen = set()
        for group in opt.param_groups:
            for param in group["params"]:
                step = opt.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    if id(step) in seen:
                        opt.state[param]["step"] = step.clone()
                    seen.add(id(step))


# ------------------------------------------------------------------------------------------- run ownership, resume

@dataclass
class RunStart:
    """How a training starts (``start_run``), identical on every rank."""

    run_id: str
    checkpoint: Path | None = None  # the verified checkpoint to resume from; None: a fresh start
    meta: dict | None = None  # its evolm.json
    skipped: list = field(default_factory=list)  # (checkpoint, why) for each newer one passed over


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


def _why_not(roots: list[Path], name: str, run: str | None) -> str | None:
    for root in roots:
        found = problem(root / name)
        if found is not None:
            return found if root == roots[0] else f"{root.name}/{name}: {found}"
    theirs = run_id_of(roots[0] / name)
    if run and theirs and theirs != run:
        return f"written by run {theirs}, but this directory belongs to run {run}"
    return None


def _claim(out: Path, run_id: str) -> None:
    if _rank() == 0:
        path = out / RUN_FILE
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        if not isinstance(current, dict) or current.get("run_id") != run_id:
            out.mkdir(parents=True, exist_ok=True)
            part = path.with_name(RUN_FILE + ".part")
            part.write_text(json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            os.replace(part, path)
    _barrier()


def start_run(out: str | Path, roots: list, *, resume: bool, overwrite: bool, check=None, dry: bool = False,
              say=None, kept: list = ()) -> RunStart:
    """Collective. How a training into run directory ``out`` starts, before it builds anything.

    ``roots`` are the checkpoint roots the run writes (``<out>/checkpoints`` first; RL adds ``<out>/critic``): a
    checkpoint counts only when its namesake under every root is usable too.

    * ``resume``: the newest checkpoint that is committed, complete, of this directory's run and whose checksums match
      (newest first; each one passed over is said in one line with the reason), then ``check(path, meta)`` (which
      raises ConfigError when the recipe does not fit it). No usable checkpoint while some exist: refused, unless
      ``overwrite`` -- a run never restarts from iteration 0 over its own checkpoints unasked.
    * otherwise (a fresh run): a directory holding checkpoints is refused, unless ``overwrite``, which removes them
      (and says so) before anything is trained. ``kept`` are the roots of the checkpoints a run keeps beside its
      regular ones (a WSD stable run's ``<out>/branches``): its own like the others -- a fresh run refuses them as
      another run's (it could not replace them when it reached their iterations) and ``overwrite`` removes them
      too. With one root, the directory's own kept checkpoints are resumed like the others (newest first; at the
      same iteration the regular one).
    * either way, a partner's checkpoint of this directory's run without its ``roots[0]`` namesake (a stop between
      the saves of one set) is no checkpoint: it never refuses the directory, a fresh start removes it (said in one
      line) and a resume leaves it for the run's save at that iteration to replace.

    The run id (the resumed checkpoint's, or a new one) is written to ``<out>/run.json``. ``dry``: read only (no
    checksums, nothing removed, written or said) -- the cheap checks to run before heavy work.
    """
    out, roots, kept = Path(out), [Path(r) for r in roots], [Path(r) for r in kept]
    say = say or (lambda line: print(line, flush=True))

    def note(line: str) -> None:
        if not dry and _rank() == 0:
            say(line)

    run = owner(roots[0])
    existing = _broadcast({str(r): [p.name for p in checkpoint_dirs(r)] for r in roots + kept} if _rank() == 0
                          else None)
    names = existing[str(roots[0])]
    # a partner's checkpoint whose namesake under roots[0] was never committed, written by this directory's own run:
    # the half of a set a kill cut between its saves (the partners are written first, roots[0] commits the set). It
    # is never resumed and is no other run's work: a start removes it rather than refusing the directory
    orphans = _broadcast([str(r / n) for r in roots[1:] for n in existing[str(r)]
                          if n not in names and run is not None and run_id_of(r / n) == run] if _rank() == 0 else None)
    # this directory's own kept checkpoints (a WSD stable run's branch points: whole checkpoints, optimizer state
    # included) resume too when a stage writes one root -- a stable run killed after a branch point and before its
    # next regular save resumes there (it was refused as "another run", train.overwrite=true the only way out)
    own = _broadcast([str(r / n) for r in kept for n in existing[str(r)] if len(roots) == 1 and run is not None
                      and run_id_of(r / n) == run] if _rank() == 0 else None)
    skipped: list = []
    if resume:
        candidates = sorted([(n, roots[0] / n) for n in names] + [(Path(k).name, Path(k)) for k in own],
                            key=lambda c: (c[0], c[1].parent == roots[0]), reverse=True)  # a tie: the regular one
        for name, path in candidates:
            why = _broadcast((_why_not(roots, name, run) if path.parent == roots[0] else problem(path))
                             if _rank() == 0 else None)
            if why is None and not dry:
                for part in ([root / name for root in roots] if path.parent == roots[0] else [path]):
                    why = damage(part)
                    if why is not None:
                        why = why if part == path else f"{part.parent.name}/{name}: {why}"
                        break
            if why is not None:
                skipped.append((path, why))
                note(f"[evolm] skipping checkpoint {path}: {why}")
                continue
            meta = json.loads((path / META).read_text())
            if check is not None:
                check(path, meta)
            run_id = meta.get("run_id") or run or _broadcast(new_run_id() if _rank() == 0 else None)
            if not dry:
                _claim(out, run_id)
            if path.parent != roots[0]:
                note(f"[evolm] resuming from {path}, kept by this run (its newest usable checkpoint)")
            return RunStart(run_id, path, meta, skipped)
        if candidates and not overwrite:
            newest, why = skipped[0]
            raise ConfigError("train.resume", f"{newest.parent}: none of its {len(candidates)} checkpoint(s) can be "
                                              f"resumed (newest, {newest.name}: {why}); restore them, start over with "
                                              "train.overwrite=true (removes them), or pick a new run.out_dir")
    held = [r / n for r in roots + kept for n in existing[str(r)] if str(r / n) not in orphans]
    if held and not overwrite:
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}" if names else \
            str(held[0].relative_to(out))
        again = "resume that run (train.resume=true), " if names else ""  # another run's kept ones never resume
        raise ConfigError("run.out_dir", f"{out} holds the checkpoints of another run ({len(held)}: {span}); pick a "
                                         f"new run.out_dir, {again}or start over with train.overwrite=true (removes "
                                         "them first)")
    if held and not dry:
        if _rank() == 0:
            for path in held + [p for r in roots + kept for p in r.glob("iter_*.tmp-*")]:
                shutil.rmtree(path, ignore_errors=True)
        _barrier()
        note(f"[evolm] train.overwrite=true: removed {len(held)} checkpoint(s) of the previous run from {out} "
             "before training; metrics.jsonl starts over")
    if orphans and not dry:
        if _rank() == 0:
            for path in orphans:
                shutil.rmtree(path, ignore_errors=True)
        _barrier()
        note(f"[evolm] removed {len(orphans)} uncommitted checkpoint(s) of this run ({', '.join(orphans)}): written "
             f"before a stop, their set's {roots[0].name}/ half never was")
    run_id = _broadcast(new_run_id() if _rank() == 0 else None)
    if not dry:
        _claim(out, run_id)
    return RunStart(run_id, None, None, skipped)


def describe(path: str | Path) -> dict[str, Any]:
    meta = read_meta(resolve(path))
    return {k: meta[k] for k in ("iteration", "layout", "has_optimizer") if k in meta}
