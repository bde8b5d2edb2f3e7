"""A warm start for the tests' `evolm` processes: one interpreter per pytest worker imports what every `evolm` command
imports (torch, megatron-core, transformers, Hydra/OmegaConf, the CLI) once, then forks a new process for each
command, which runs the real console-script entry (``sys.exit(evolm_nemo.cli.main())``) with its own pid, its own
standard output and error (files the test reads, as ``subprocess.run(capture_output=True)`` would give), the
command's arguments in ``sys.argv`` and the interpreter's exit (threads joined, atexit handlers, unreachable objects
finalized; not the teardown of the server's modules).

What it saves is each process's interpreter start and imports (a tiny one-iteration training run: 1.0 s forked,
~8 s fresh on the 2-core box; the suite runs a few hundred such processes). What it must not change is what a
command does, so it is used only where a fresh process would start exactly as the server did:
- what a process started now inherits (``conftest.inherited()``: the environment ``conftest.subprocess_env()`` gives,
  umask, resource limits, ignored and blocked signals, CPUs, nice value) equals what the server inherited (else a
  fresh process; a state that stays three commands in a row gets a server of its own: modules read variables at
  import);
- one process (``nproc=1``): torchrun's ranks start as torchrun starts them;
- the server started no thread while importing (a fork copies only the calling thread).
Runs that signal or kill a process group (``train_then_sigkill``, ``train_then_sigterm``, the signal tests), every
torchrun run and `make demo`'s pipeline start fresh processes through the installed ``evolm`` script, as a user's do
(``run_evolm(..., fresh=True)``; ``EVOLM_TEST_FORK=0`` makes every command fresh).

Protocol, one JSON line each way per command: the test sends ``{"argv": [...], "stdout": path, "stderr": path}``;
the server answers ``{"pid": N}`` once the child runs and ``{"status": waitpid status}`` when it has ended.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import sys
import types


# What the commands import before they do anything (the stages' training, rollouts, checkpoints and conversion; the
# answer checker): modules, not calls -- nothing here runs, so nothing of a run is in the server to be inherited.
PRELOAD = (
    "evolm_nemo.cli",  # first: installs megatron-core's import hook (evolm_nemo/__init__.py), as every command does
    "hydra", "hydra.compose", "omegaconf", "evolm_nemo.config.compose",
    "torch", "torch.distributed", "numpy", "safetensors.torch", "tokenizers",
    "transformers", "transformers.models.llama", "transformers.tokenization_utils_fast",
    "megatron.core", "megatron.core.parallel_state", "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.optimizer", "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.datasets.blended_megatron_dataset_builder",
    "evolm_nemo.runtime.distributed", "evolm_nemo.train.loop", "evolm_nemo.checkpoint.io", "evolm_nemo.data.gpt",
    "evolm_nemo.stages.pretrain", "evolm_nemo.stages.sft", "evolm_nemo.stages.rl", "evolm_nemo.stages.rm",
    "evolm_nemo.stages.dpo", "evolm_nemo.answers",
)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def _preloaded() -> str:
    """Imports what a command imports, as `evolm` does (its notice filters first); returns why forking after them
    would not start a command as a fresh process does, or "" when it would."""
    import tempfile
    import threading

    from evolm_nemo.cli import quiet_known_notices

    quiet_known_notices()
    with tempfile.TemporaryFile() as said:  # what the imports print would be every fresh process's, not a child's
        saved = os.dup(1), os.dup(2)
        os.dup2(said.fileno(), 1)
        os.dup2(said.fileno(), 2)
        try:
            _preload()
        except Exception as exc:
            return f"the imports failed: {type(exc).__name__}: {exc}"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        said.seek(0)
        printed = said.read().decode(errors="replace")
    if printed.strip():
        return f"the imports print: {printed.strip()[:2000]}"
    if threading.active_count() != 1:
        return f"the imports started threads: {[t.name for t in threading.enumerate()]}"
    return ""


def _serve() -> dict:
    """The server's loop; returns (in a forked child only) the request the child is to run."""
    control_in = os.fdopen(os.dup(0), "rb", buffering=0)
    control_out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # nothing the server imports or runs may read or write the control pipes
    os.close(null)
    os.dup2(2, 1)
    why = _preloaded()
    safe = not why
    control_out.write((json.dumps({"ready": safe, "why": why}) + "\n").encode())
    if not safe:
        sys.exit(0)
    import gc

    gc.collect()
    gc.freeze()  # the server's objects: never traversed (so never copied) by the commands' collections
    for line in control_in:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            control_in.close()
            control_out.close()
            return request
        control_out.write((json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        control_out.write((json.dumps({"status": status}) + "\n").encode())
    sys.exit(0)


def _become(request: dict) -> None:
    """In the forked child: the command's standard streams and arguments, nothing of the server's left open."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.argv = list(request["argv"])
    # the console script's interpreter: its directory first on sys.path (not the server's working directory), and a
    # __main__ that is the script (multiprocessing's spawned workers run it, as they would the script's)
    sys.path[0] = os.path.dirname(sys.argv[0])
    script = types.ModuleType("__main__")
    script.__file__, script.__builtins__ = sys.argv[0], builtins
    sys.modules["__main__"] = script
    random.seed()  # a fresh interpreter seeds it from the OS; a forked one would repeat the server's sequence
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def _exit_as_the_interpreter_would(run) -> None:
    """``sys.exit(run())`` -- the console script's line -- and the interpreter's exit after it: an uncaught exception
    through ``sys.excepthook`` and status 1 (KeyboardInterrupt: killed by SIGINT), ``SystemExit``'s code as Python
    maps it, non-daemon threads joined, atexit handlers, unreachable objects finalized, the standard streams flushed.
    Then ``os._exit``: tearing down the modules the server imported would copy its memory page by page (every
    reference count it touches) for ~1.5 s, and frees nothing the command wrote."""
    import atexit
    import gc
    import signal
    import threading
    import traceback

    interrupted = False
    try:
        sys.exit(run())
    except SystemExit as stop:
        code = stop.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code
        else:
            print(code, file=sys.stderr)
            status = 1
    except BaseException as exc:  # noqa: BLE001 -- what the interpreter does with it
        interrupted = isinstance(exc, KeyboardInterrupt)
        try:
            sys.excepthook(type(exc), exc, exc.__traceback__)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        status = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


if __name__ == "__main__":
    _become(_serve())
    from evolm_nemo.cli import main

    _exit_as_the_interpreter_would(main)  # the console script: `evolm = "evolm_nemo.cli:main"`
