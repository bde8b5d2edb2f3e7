"""Checkpoint IO through megatron-core dist-checkpointing: reshardable (load at any TP/PP), atomic, keep-last-N.

Layout of a run's checkpoint root::

    checkpoints/
      iter_0000100/            committed: dist-checkpoint files + evolm.json (written last, with a file manifest)
      iter_0000200.tmp-<id>/   being written (never read)

A checkpoint counts only when its directory has the final name AND every file listed in ``evolm.json``'s manifest is
present with the recorded size. All ranks write into a temporary directory; after a barrier rank 0 writes
``evolm.json`` and renames the directory (an atomic rename on POSIX), so a crash at any moment leaves either the
previous checkpoint as the latest or a complete new one.

``evolm.json`` also carries what other tools need without megatron: the model config, the iteration, consumed
samples, lineage. Per-rank RNG states are stored as safetensors (restored only when the layout is unchanged).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

META = "evolm.json"
_ITER = re.compile(r"^iter_(\d{7})$")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _manifest(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != META}


_LOCKS: dict[str, object] = {}  # run dir -> open lock file, held for the life of the process


def lock_run_dir(out: str | Path) -> None:
    """Collective. Rank 0 takes an exclusive lock on ``<out>/.lock`` (held until the process ends), so a second
    training into the same run directory refuses in one line instead of clashing with the first."""
    import fcntl

    from evolm_nemo.config.errors import ConfigError

    out = Path(out)
    holder = None
    if _rank() == 0 and str(out.resolve()) not in _LOCKS:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _LOCKS[str(out.resolve())] = f
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
    holder = _broadcast(holder)
    if holder is not None:
        raise ConfigError("run.out_dir", f"{out} is in use by another training (pid {holder}); wait for it to end or "
                                         "pick another run.out_dir")


def is_complete(directory: Path) -> bool:
    """True when ``directory`` is a committed checkpoint whose files all match its manifest."""
    meta_path = Path(directory) / META
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["manifest"]
    except (OSError, ValueError, KeyError):
        return False
    for name, size in files.items():
        path = Path(directory) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def read_meta(directory: str | Path) -> dict:
    directory = Path(directory)
    if not is_complete(directory):
        raise CheckpointError(f"{directory}: not a complete evolm checkpoint (missing or inconsistent {META})")
    return json.loads((directory / META).read_text())


def committed(root: str | Path) -> list[Path]:
    """Committed, complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ITER.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest(root: str | Path) -> Path | None:
    done = committed(root)
    return done[-1] if done else None


def resolve(path: str | Path) -> Path:
    """A checkpoint dir, or a run's checkpoint root / run dir -> its latest complete checkpoint."""
    path = Path(path)
    if (path / META).exists():
        if not is_complete(path):
            raise CheckpointError(f"{path}: checkpoint is incomplete (files missing or cut short)")
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no complete checkpoint found")


# ---------------------------------------------------------------------------------------------------------------- RNG

def _rng_state() -> dict[str, torch.Tensor]:
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


def save(root: str | Path, iteration: int, chunks, optimizer=None, scheduler=None, extra: dict | None = None,
         meta: dict | None = None, keep_last: int | None = None, layout: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the committed directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"iter_{iteration:07d}"
    token = _broadcast(os.urandom(4).hex() if _rank() == 0 else None)
    tmp = root / f"{final.name}.tmp-{token}"
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
    dist_checkpointing.save(state, str(tmp), content_metadata=_OPTIM_METADATA if optimizer is not None else None)

    (tmp / "rng").mkdir(exist_ok=True)
    _save_rng(tmp / "rng" / f"rank_{_rank():05d}.safetensors")
    _barrier()
    if _rank() == 0:
        record = dict(meta or {})
        record.update(iteration=iteration, layout=layout or {}, has_optimizer=optimizer is not None,
                      extra=extra or {}, format="evolm-dist-ckpt-1", manifest=_manifest(tmp))
        part = tmp / (META + ".part")
        part.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(part, tmp / META)
        if final.exists():  # an older incomplete attempt at the same iteration
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in committed(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("iter_*.tmp-*"):  # leftovers of crashed saves
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path, chunks, optimizer=None, scheduler=None, restore_rng: bool = True,
         layout: dict | None = None) -> dict:
    """Collective. Loads model (+ optimizer, scheduler, RNG when given) resharding to the current TP/PP.
    Returns the checkpoint's common state (iteration, consumed samples, ...)."""
    from megatron.core import dist_checkpointing

    path = resolve(path)
    meta = read_meta(path)
    state = _model_sharded(chunks)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"{path}: has no optimizer state; use train.init_from to start from its weights")
        _prepare_optimizer_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
    state["evolm"] = {}
    loaded = dist_checkpointing.load(state, str(path))
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
    for opt in _inner_optimizers(optimizer):
        seen = set()
        for group in opt.param_groups:
            for param in group["params"]:
                step = opt.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    if id(step) in seen:
                        opt.state[param]["step"] = step.clone()
                    seen.add(id(step))


def describe(path: str | Path) -> dict[str, Any]:
    meta = read_meta(resolve(path))
    return {k: meta[k] for k in ("iteration", "layout", "has_optimizer") if k in meta}
