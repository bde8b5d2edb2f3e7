"""The CUDA -> CPU compatibility layer that lets megatron-core 0.16 run on a CPU-only machine over gloo.

megatron-core assumes CUDA everywhere. This module is the ONE place that redirects those assumptions, and
``activate()`` applies it only when ``torch.cuda.is_available()`` is False: on a GPU nothing here is touched, so
production runs execute megatron-core exactly as NVIDIA ships it.

Redirections (each measured as necessary on megatron-core 0.16.1, torch 2.13 CPU):

1. ``torch.cuda.current_device()`` (~100 call sites: RoPE buffers, TP mappings, p2p shapes, layers) returns
   ``"cpu"``, so ``device=torch.cuda.current_device()`` works as is, also inside autograd backward functions
   (e.g. the sequence-parallel all-gather in ``LinearWithGradAccumulationAndAsyncCommunication.backward``),
   where the torch-function mode (7) does not apply.
2. The CUDA RNG: ``torch.cuda.manual_seed/get_rng_state/set_rng_state`` and megatron's private
   ``_get_cuda_rng_state``/``_set_cuda_rng_state`` use the CPU default generator. ``DotProductAttention`` always
   enters ``get_cuda_rng_tracker().fork()`` (even at dropout 0), so the tracker must work; unpatched,
   ``_set_cuda_rng_state`` silently does nothing on CPU. The CPU generator is seeded directly (not through
   ``torch.manual_seed``, which calls ``torch.cuda.manual_seed_all`` and would recurse).
3. ``torch.cuda.synchronize``/``empty_cache``/``Event``/``Stream``/``current_stream``/``stream``: no-ops or
   host-clock stand-ins (training timers, inference timing, DDP/optimizer stream plumbing).
4. ``get_default_causal_mask`` builds its mask with ``device="cuda"``: covered by the device-mapping mode (7).
5. ``WrappedTorchNorm`` (the non-TE RMSNorm) asserts ``not sequence_parallel``: with SP the assertion is lifted and
   its weights are tagged ``sequence_parallel=True`` so megatron all-reduces their grads over the TP group (the
   same contract TE's norms have).
6. ``Tensor.cuda()`` / ``Module.cuda()`` return the object unchanged (optimizer grad-scaler and state loading).
7. A process-wide ``TorchFunctionMode`` maps every ``device="cuda"``/``cuda:N``/int device argument to CPU, drops
   ``pin_memory=True``, and answers ``Tensor.type()`` with the ``torch.cuda.*Tensor`` names megatron's optimizer and
   clip_grads compare against (~40 literal sites in DDP buffers, the megatron optimizer, p2p, dist-checkpointing).
   It adds Python dispatch to every torch call; BENCHMARKS.md has the end-to-end step throughput with it active.
8. While a ``megatron.core`` module's body runs (``evolm_nemo/__init__.py`` installs the import hook),
   ``torch.compile`` is an identity: megatron decorates ~40 fused kernels with it at import, which loads dynamo and
   inductor (~2 s of every process's start); every fusion is switched off in ``model/build.py``, so none runs.
9. ``torch.optim``'s optimizers import ``torch._dynamo`` (~1 s of every training process's start) only for
   torch.compile's sake: their methods (``add_param_group``, ``zero_grad``, ``state_dict``, ...) are wrapped in
   ``torch._disable_dynamo``, and ``step`` in ``_use_grad_for_differentiable``, which sets grad mode around the
   update and inserts graph breaks. Nothing is compiled on this path, so each ``_disable_dynamo`` wrapper's cache is
   filled with the plain method (what the wrapper stores after that import), and each ``step`` runs its update
   under the same grad mode without the graph breaks (no-ops outside torch.compile).

Inference (``megatron.core.inference``: ``StaticInferenceEngine(legacy=True)`` + ``TextGenerationController`` +
``GPTInferenceWrapper``, used by ``generation.engine``) needs no redirection of its own: its sampling generator
``torch.Generator(device=current_device())``, KV-cache buffers and token tensors go through (1), its per-token
timing through ``torch.cuda.Event`` (3), and its length counter's ``.cuda()`` through (6). TP=1 and TP=2 over gloo
are tested (tests/generation). The dynamic engine is not used: on CPU, ``StaticInferenceEngine(legacy=False)``
fails to build it and falls back to the legacy engine (megatron-core 0.16.1).
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_MODE: "_CudaToCpuMode | None" = None


def should_activate(cuda_available: bool | None = None) -> bool:
    """The single activation condition: only on machines without CUDA."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return not cuda_available


def is_active() -> bool:
    return _ACTIVE


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirection 7: every CUDA device argument becomes CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda(device):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_mode_paused():
    """Run a block without redirection 7 (the torch-function mode), for hot loops that pass no CUDA device argument
    (the continuous generation loop: ~15% of a tiny model's decode step is the mode's Python dispatch). A no-op on
    GPU machines and when the mode is not the innermost one."""
    from torch.overrides import _get_current_function_mode_stack

    mode, stack = _MODE, _get_current_function_mode_stack()
    if mode is None or not _ACTIVE or not stack or stack[-1] is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


class _Event:
    """Host-clock stand-in for torch.cuda.Event (elapsed_time in milliseconds, like CUDA's)."""

    def __init__(self, enable_timing: bool = False, **_):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._t - self._t) * 1000.0


class _Stream:
    def __init__(self, *_, **__):
        pass

    def synchronize(self):
        return None

    def wait_stream(self, other):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event


def _seed_cpu(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _uncompiled(model=None, **_kwargs):
    """``torch.compile`` as an identity: ``torch.compile(fn)``, ``@torch.compile`` and ``@torch.compile(...)``."""
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def megatron_import():
    """Redirection 8, for the import of a megatron-core module only (``evolm_nemo/__init__.py`` wraps each one in
    it): ``torch.compile`` is an identity while the module body runs. megatron-core decorates ~40 fused kernels with
    ``torch.compile`` at import (``megatron.core.jit.jit_fuser``), which loads dynamo and inductor: ~2 s of every
    process's start on CPU. None of them runs here (build.py switches every fusion off), so nothing else changes;
    torch.compile outside megatron's imports is untouched, and with CUDA this is a no-op."""
    if not should_activate():
        yield
        return
    real = torch.compile
    torch.compile = _uncompiled
    try:
        yield
    finally:
        torch.compile = real


def _eager_step(update):
    """An optimizer's ``step`` as ``_use_grad_for_differentiable`` runs it eagerly: the update under grad mode
    ``defaults["differentiable"]``, the caller's mode restored after."""

    @functools.wraps(update)
    def step(self, *args, **kwargs):
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return update(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(prev)

    return step


def _eager_optimizer_guards() -> None:
    """Redirection 9, on every optimizer class of ``torch.optim`` before any is instantiated."""
    import torch._compile
    import torch.optim
    from torch.optim import optimizer as torch_optimizer

    disabled = torch._compile._disable_dynamo(lambda: None).__code__
    use_grad = torch_optimizer._use_grad_for_differentiable(lambda self: None).__code__
    classes = [torch.optim.Optimizer] + [c for c in vars(torch.optim).values()
                                         if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)]
    for cls in classes:
        for name, fn in list(vars(cls).items()):
            plain = getattr(fn, "__wrapped__", None)
            code = getattr(fn, "__code__", None)
            if plain is None:
                continue
            if code is disabled:
                setattr(plain, "__dynamo_disable", plain)
            elif code is use_grad:
                setattr(cls, name, _eager_step(plain))


def activate() -> bool:
    """Apply every redirection when CUDA is absent. Idempotent. Returns whether the layer is active."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if not should_activate():
        return False

    # 1. current device
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.set_device = lambda *_a, **_k: None
    torch.cuda.device_count = lambda: 0

    # 2. RNG
    torch.cuda.manual_seed = _seed_cpu
    torch.cuda.manual_seed_all = _seed_cpu
    torch.cuda.get_rng_state = lambda device="cuda": torch.default_generator.get_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.default_generator.set_state(state)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.default_generator.get_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.default_generator.set_state(new_state)

    # 3. synchronisation, events and streams
    torch.cuda.synchronize = lambda *_a, **_k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Event = _Event
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda *_a, **_k: _Stream()
    torch.cuda.default_stream = lambda *_a, **_k: _Stream()
    torch.cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    torch.cuda.memory_allocated = lambda *_a, **_k: 0
    torch.cuda.max_memory_allocated = lambda *_a, **_k: 0

    # 4. the causal mask's device="cuda" is handled by the mode (7)

    # 5. RMSNorm under sequence parallel
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def wrapped_norm_new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                         normalization="LayerNorm"):
        sp = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = sp
        if sp:
            for param in norm.parameters():
                setattr(param, "sequence_parallel", True)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(wrapped_norm_new)

    # 6. .cuda()
    torch.Tensor.cuda = lambda self, *_a, **_k: self
    torch.nn.Module.cuda = lambda self, *_a, **_k: self

    # 9. torch.optim without dynamo
    _eager_optimizer_guards()

    # 7. device arguments
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ACTIVE = True
    return True
