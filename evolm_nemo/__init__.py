"""evolm-nemo: EvoLM's four training stages on one megatron-core engine, plus HF export and evaluation."""

import importlib.abc as _abc
import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
import types as _types

__version__ = "0.1.0"


class _Deferred(_types.ModuleType):
    """A module whose body runs on the first attribute it does not hold yet (its ``__file__``/``__spec__`` are
    answered without loading: ``inspect.getmodule`` reads every module's ``__file__``, which would defeat
    ``importlib.util.LazyLoader``)."""

    def __getattr__(self, attr):
        spec = self.__dict__["__spec__"]
        self.__class__ = _types.ModuleType  # from here on an ordinary module (also while its body runs)
        if spec.submodule_search_locations is not None:
            self.__path__ = spec.submodule_search_locations
        spec.loader.exec_module(self)
        return getattr(self, attr)


def _defer(name: str) -> None:
    """Load ``name`` on its first use instead of at ``import``. megatron-core imports W&B at import time
    (``inference.contexts.dynamic_context``) whether or not anything logs to it: 0.4-0.7 s of every process's start
    when the ``[tracking]`` extra is installed. ``logger.wandb=true`` (train/tracking.py) loads it when used."""
    if name in _sys.modules:
        return
    try:
        spec = _util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return
    module = _util.module_from_spec(spec)
    module.__dict__.pop("__path__", None)  # a submodule import asks for it: that loads the package first
    module.__class__ = _Deferred
    _sys.modules[name] = module


_defer("wandb")


class _MegatronImports(_abc.MetaPathFinder):
    """Runs the body of every ``megatron.core`` module inside ``runtime.cpu_compat.megatron_import()`` (on CPU:
    ``torch.compile`` as an identity while megatron decorates its unused fused kernels; ~2 s of each process's start).
    The spec comes from the other finders; only its loader's ``exec_module`` is wrapped."""

    def find_spec(self, name, path=None, target=None):
        if not name.startswith("megatron.core"):
            return None
        spec = _machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module, _run=run):
            from evolm_nemo.runtime.cpu_compat import megatron_import

            with megatron_import():
                _run(module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _MegatronImports) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _MegatronImports())
