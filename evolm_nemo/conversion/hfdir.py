"""An HF model directory read without building its model: ``config.json``, which file holds each tensor (a shard
index, ``model.safetensors`` or ``pytorch_model.bin``) and each tensor's dtype and shape (safetensors headers; a
``.bin`` only through ``torch.load(weights_only=True)``). A damaged file is a one-line ConfigError naming ``key`` and
the file. Shared by `evolm import-hf` (``conversion.hf.HFWeights``) and `evolm eval` (the model and the reward model,
checked before any sampling); nothing here imports torch unless a ``.bin`` is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from evolm_nemo.config.errors import ConfigError, first_line, refused_pickle

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(src: Path, key: str = "src") -> dict:
    """``<src>/config.json`` as a dict (a missing, unparsable or non-object file is one line naming ``key``)."""
    path = Path(src) / "config.json"
    if not Path(src).is_dir():
        raise ConfigError(key, f"{src} is not a directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(key, f"{path} not found (an HF model directory has a config.json)") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(key, f"{path}: invalid JSON ({first_line(exc) if str(exc) else 'too deep'})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(key, f"{path}: expected a JSON object of model settings, got a {type(cfg).__name__}")
    return cfg


EXPORT_RECORD = "evolm_export.json"  # `evolm export-hf`'s record beside the HF files (conversion/export.py)
ROLES = ("actor", "critic", "reward_model")  # what a recorded export was: an RL actor, a PPO critic, a reward model


def export_record(src: Path, key: str = "src") -> dict | None:
    """The record `evolm export-hf` wrote beside the HF files of ``src`` (``evolm_export.json``), or None where there
    is none (a model made elsewhere). An unreadable record, or one that is no JSON object, is one line naming ``key``:
    the one reader of the record, so that every command judges a damaged one alike."""
    path = Path(src) / EXPORT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(key, f"{path}: unreadable export record ({first_line(exc) or type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise ConfigError(key, f"{path}: expected a JSON object (the export's record), got a {type(record).__name__}")
    return record


def export_identity(src: Path) -> dict | None:
    """Which export the HF directory ``src`` holds, for an evaluation to record beside its results: the checkpoint it
    was made from (``run_id``, ``iteration``, None where the record does not say) and the sha256 of its
    ``evolm_export.json`` (which lists every exported file's checksum, so another export, even of the same
    checkpoint, has another digest). None without a record. Never an error: an evaluation of a model whose record is
    damaged is still recorded by its digest. `evolm suite launch` compares it with the export there now -- file
    times would not do: a copy without -p, or clock skew on a shared filesystem, makes a result look older."""
    path = Path(src) / EXPORT_RECORD
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        record = None
    record = record if isinstance(record, dict) else {}
    run_id, iteration = record.get("run_id"), record.get("iteration")
    return {"run_id": run_id if isinstance(run_id, str) else None,
            "iteration": iteration if isinstance(iteration, int) and not isinstance(iteration, bool) else None,
            "sha256": hashlib.sha256(raw).hexdigest()}


def export_role(src: Path, key: str = "src") -> str | None:
    """The role `evolm export-hf` recorded for the HF directory ``src`` (``evolm_export.json``): "critic" (a PPO
    critic: it predicts returns, not rewards), "reward_model", "actor", or None (no record: a model made elsewhere;
    no role recorded: a language model). An export made before the role was recorded names its source checkpoint:
    a value head under a run's ``critic/`` is the critic. An unreadable record is one line naming ``key``."""
    record = export_record(src, key)
    if record is None:
        return None
    path = Path(src) / EXPORT_RECORD
    if "role" in record:
        role = record["role"]
        if role is not None and role not in ROLES:
            raise ConfigError(key, f"{path}: unknown role {role!r} (one of {', '.join(ROLES)}, or null)")
        return role
    source = record.get("source")
    if record.get("head") == "value" and isinstance(source, str):
        return "critic" if Path(source).parent.name == "critic" else "reward_model"
    return None


def weight_files(src: Path, key: str = "src", bins: dict | None = None) -> dict[str, Path]:
    """Tensor name -> the file holding it: the shard index's map (every shard it lists must exist), else the names in
    the one ``model.safetensors`` or ``pytorch_model.bin``. ``bins`` caches the ``.bin`` dicts loaded on the way."""
    src = Path(src)
    index = next((src / n for n in INDEXES if (src / n).is_file()), None)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(key, f"{index}: unreadable index ({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ConfigError(key, f"{index}: weight_map must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            if not (src / shard).is_file():
                raise ConfigError(key, f"missing shard {shard} listed in {index.name}")
        return {name: src / shard for name, shard in weight_map.items()}
    if (src / "model.safetensors").is_file():
        return dict.fromkeys(safetensors_specs(src / "model.safetensors", key), src / "model.safetensors")
    if (src / "pytorch_model.bin").is_file():
        return dict.fromkeys(_cached_bin(src / "pytorch_model.bin", key, bins), src / "pytorch_model.bin")
    raise ConfigError(key, f"{src} has no model.safetensors, safetensors index or pytorch_model.bin")


def safetensors_specs(path: Path, key: str = "src") -> dict[str, tuple[str, tuple]]:
    """Tensor name -> (dtype name as the header writes it: ``F32``, ``BF16`` ..., shape) of a safetensors file, from
    its header; the library checks the header describes exactly the bytes the file holds (a cut-short file fails)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # headers only: no tensor is read, torch not needed
            specs = {}
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            return specs
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(key, f"{path.name}: not a readable safetensors file ({first_line(exc)})") from None


def load_bin(path: Path, key: str = "src") -> dict:
    """A ``pytorch_model*.bin`` loaded with ``torch.load(weights_only=True)`` (memory-mapped when it is torch's zip
    format), never unsafely. A file holding more than tensors (pickled code) is refused in one line, without
    torch's advice to load it unsafely or to allow-list what it names."""
    import pickle
    import warnings
    import zipfile

    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": a second line on stderr
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:  # what weights_only refuses: code or classes beyond tensors, or garbage
        raise ConfigError(key, f"{path.name}: cannot load with weights_only=True ({refused_pickle(exc)}); convert it "
                               "to safetensors with a tool you trust") from None
    except Exception as exc:  # a truncated or foreign file
        first = first_line(exc).split(". ")[0]  # torch adds sentences of advice
        raise ConfigError(key, f"{path.name}: not a readable PyTorch weights file ({type(exc).__name__}: "
                               f"{first[:200]})") from None
    if not isinstance(state, dict):
        raise ConfigError(key, f"{path.name}: expected a dict of tensors, got a {type(state).__name__}")
    return state


def _cached_bin(path: Path, key: str, bins: dict | None) -> dict:
    if bins is None:
        return load_bin(path, key)
    if path not in bins:
        bins[path] = load_bin(path, key)
    return bins[path]


def tensor_specs(files: dict[str, Path], key: str = "src", bins: dict | None = None) -> dict[str, tuple]:
    """Tensor name -> (dtype, shape) for ``files`` (:func:`weight_files`): every file readable and holding the tensors
    listed for it. A safetensors tensor's dtype is its header's name (``F32`` ...), a ``.bin``'s the torch dtype."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    specs = {}
    for path, names in by_file.items():
        if path.suffix == ".safetensors":
            held = safetensors_specs(path, key)
        else:  # a tensor's (dtype, shape); None for another value (weights_only also loads ints, lists ...)
            held = {name: (value.dtype, tuple(value.shape)) if hasattr(value, "shape") and hasattr(value, "dtype")
                    else None for name, value in _cached_bin(path, key, bins).items()}
        for name in names:
            if name not in held:
                raise ConfigError(key, f"{path.name} lacks tensor {name} listed in the index")
            if held[name] is None:
                raise ConfigError(key, f"{path.name}: {name} is not a tensor")
            specs[name] = held[name]
    return specs
