"""Preemption and child processes.

* ``StopSignal``: SIGTERM -- what Slurm (and torchrun, passing it on) sends before it kills a job -- only sets a flag
  (SIGHUP and SIGUSR1 too: ``STOP_SIGNALS``).
  The training loops ask ``requested()`` between iterations, on every rank at once (one tiny all-reduce, so all ranks
  stop after the same iteration and can save together), save if ``train.save_on_signal``, and exit with 143.
* ``children_die_with_parent()``: every child this process forks from its main thread (megatron-core's checkpoint
  writers, data workers) asks the kernel for SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a SIGKILLed
  trainer leaves no process behind; children also get SIGTERM's default action back. (megatron's long-lived results
  server, a spawned ``Manager``, is not started at all: ``evolm_nemo.checkpoint.io._writer_in_process``.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from evolm_nemo.fileio import STOP_SIGNAL_NAMES

EXIT_CODE = 128 + signal.SIGTERM  # 143, the conventional code for "terminated"
# what stops a training after its iteration (saved first): fileio.STOP_SIGNAL_NAMES -- the default action of each
# killed it with everything since the last checkpoint
STOP_SIGNALS = tuple(getattr(signal, name) for name in STOP_SIGNAL_NAMES)
_PR_SET_PDEATHSIG = 1
_hooked = False
_forking_parent = None  # pid of the process that forked us (set just before a fork, inherited by the child)


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid() if threading.current_thread() is threading.main_thread() else None


def _after_fork_in_child() -> None:
    parent = _forking_parent
    if parent is None:  # forked from a helper thread: its end would kill us; leave it
        return
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def children_die_with_parent() -> None:
    """Idempotent, process-wide (Linux; a no-op elsewhere)."""
    global _hooked
    if _hooked or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _hooked = True


_INFERENCE_COORDINATOR = "megatron.core.inference.data_parallel_inference_coordinator"


def import_megatron_inference() -> None:
    """Import ``megatron.core.inference`` without its import-time ``faulthandler.register(SIGTERM / SIGINT)`` (in
    its data-parallel coordinator, which we do not use): that dumps every thread's stack on stderr for each stop
    signal before our handler (``StopSignal``) runs, so a clean save-and-exit would look like a crash. Call before
    any other import of it (``generation.engine`` does); a no-op once imported."""
    if _INFERENCE_COORDINATOR in sys.modules:
        return
    import faulthandler
    import importlib

    importlib.import_module(_INFERENCE_COORDINATOR)
    for sig in (signal.SIGTERM, signal.SIGINT):
        faulthandler.unregister(sig)  # puts back the handler that was there before (ours, or the default)


class StopSignal:
    """SIGTERM -> a flag; ``requested()`` (collective) says whether any rank got it. A context manager: the previous
    handler comes back on exit. Only the main thread can install it (elsewhere it stays inert)."""

    def __init__(self, device: torch.device | None = None, signals=STOP_SIGNALS):
        self.device = device or torch.device("cpu")
        self.signals = tuple(signals)
        self.received = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        previous = dict(self._previous)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if exc_type is None and self.received and callable(previous.get(self.received)):
            # received where the loop no longer stops (its last iteration, final save or measurements): the handler
            # of whoever called the training gets it now -- `evolm pipeline` stops before its next stage, not later
            signal.raise_signal(self.received)

    def requested(self) -> int:
        """Collective: the signal number any rank received so far, or 0."""
        flag = self.received
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    @staticmethod
    def name(signum: int) -> str:
        try:
            return signal.Signals(signum).name
        except ValueError:
            return f"signal {signum}"


class Stopped(SystemExit):
    """Raised by a training loop after a stop signal (after the save, if any); exits the process with 143."""

    def __init__(self, message: str):
        super().__init__(EXIT_CODE)
        self.message = message
