"""evolm-nemo: EvoLM's four training stages on one megatron-core engine, plus HF export and evaluation."""

import importlib.util as _util
import sys as _sys

__version__ = "0.1.0"


def _defer(name: str) -> None:
    """Load ``name`` on its first attribute access instead of at ``import``. megatron-core imports W&B at import time
    (``inference.contexts.dynamic_context``) whether or not anything logs to it: 0.7 s of every process's start when
    the ``[tracking]`` extra is installed. ``logger.wandb=true`` (train/tracking.py) loads it for real when used."""
    if name in _sys.modules:
        return
    try:
        spec = _util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None or spec.loader is None:
        return
    spec.loader = _util.LazyLoader(spec.loader)
    module = _util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_defer("wandb")
