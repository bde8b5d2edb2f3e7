"""`evolm <command> key=value ...`: one console script; each command composes its Hydra recipe and dispatches.

Bad input never gets past this point as a traceback: a ConfigError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

from evolm_nemo.config.errors import ConfigError, out_of_memory, print_error
from evolm_nemo.fileio import STOP_SIGNAL_NAMES, release_outputs

# command -> (module:function, one-line help). Each function takes the list of key=value overrides.
COMMANDS = {
    "train": ("evolm_nemo.stages.cli:main", "train a stage (pretrain | cpt | sft | ppo | grpo | rm | dpo): "
                                             "torchrun for >1 process"),
    "prepare": ("evolm_nemo.data.prepare:main", "tokenize JSONL / Parquet / an HF dataset into megatron .bin/.idx"),
    "prepare-sft": ("evolm_nemo.data.sft_prepare:main", "question/response rows -> filtered, tokenized SFT dataset "
                                                        "(+ disjoint RL set)"),
    "prepare-rm": ("evolm_nemo.data.rm:main", "scored completions / preference rows -> reward-model or DPO dataset "
                                              "(outcome examples or pairs)"),
    "pipeline": ("evolm_nemo.pipeline:main", "the embedded default: the tiny pipeline end to end on CPU"),
    "export-hf": ("evolm_nemo.conversion.cli:export_hf", "megatron checkpoint -> verified HF LlamaForCausalLM"),
    "import-hf": ("evolm_nemo.conversion.cli:import_hf", "HF Llama-family checkpoint -> megatron checkpoint"),
    "release": ("evolm_nemo.release:main", "publish finished models on the HF Hub (src=<run> repo=<org/name> | "
                                                      "suite=<name> org=<org>; dry_run=true)"),
    "export-trtllm": ("evolm_nemo.conversion.cli:export_trtllm", "HF dir -> TensorRT-LLM engine (GPU container)"),
    "score": ("evolm_nemo.evaluation.score:main", "score a completions JSONL (Pass@1, Maj@16, RM@16, Pass@16)"),
    "eval": ("evolm_nemo.evaluation.cli:main", "evaluate an HF model: `evolm eval downstream|upstream model=<dir>`"),
    "report": ("evolm_nemo.evaluation.cli:report", "aggregate result JSONs into CSV, Markdown and plots (suite=<name>: "
                                                   "a suite's tables)"),
    "suite": ("evolm_nemo.suite.cli:main", "a suite recipe as one plan and one launch: `evolm suite plan|status|"
                                           "launch suite=<name>`"),
}

# command -> (recipe, module:schema) for `--help` / `--cfg job` (eval: per subcommand)
RECIPES = {
    "train": ("config", "evolm_nemo.config.schema:RootConfig"),
    "prepare": ("prepare", "evolm_nemo.data.prepare:PrepareConfig"),
    "prepare-sft": ("prepare_sft", "evolm_nemo.data.sft_prepare:PrepareSFTConfig"),
    "prepare-rm": ("prepare_rm", "evolm_nemo.data.rm:PrepareRMConfig"),
    "export-hf": ("export_hf", "evolm_nemo.conversion.config:ExportHFConfig"),
    "import-hf": ("import_hf", "evolm_nemo.conversion.config:ImportHFConfig"),
    "export-trtllm": ("export_trtllm", "evolm_nemo.conversion.cli:ExportTRTLLMConfig"),
    "score": ("score", "evolm_nemo.evaluation.score:ScoreConfig"),
    "report": ("report", "evolm_nemo.evaluation.report:ReportConfig"),
    "eval downstream": ("eval_downstream", "evolm_nemo.evaluation.evaluate:DownstreamConfig"),
    "eval upstream": ("eval_upstream", "evolm_nemo.evaluation.evaluate:UpstreamConfig"),
    # its own key=value parser (patterns such as {org}/x are no Hydra values): shown as it parses
    "release": ("release", "evolm_nemo.conversion.config:ReleaseConfig", "evolm_nemo.release:settings"),
}

# (command, key=) -> module:function: the command with that key goes to another room's function.
ROUTES = {("report", "suite="): "evolm_nemo.suite.cli:report"}  # a suite's tables (suite/report.py)


def _usage() -> str:
    lines = ["usage: evolm <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Overrides follow Hydra: `evolm train experiment=pretrain_1b_160b parallel.tp=2 train.tokens=1.6B`."]
    return "\n".join(lines)


def quiet_known_notices() -> None:
    """megatron-core's import-time notices that Apex / Transformer Engine are absent (expected on CPU and with the
    local layer spec) and torch's dist-checkpoint deprecations say nothing actionable: keep stderr for progress and
    errors. Other warnings stay visible."""
    import warnings

    for text in (r"(Transformer Engine and )?Apex (is|are) not installed", r"Transformer Engine and Apex are not",
                 r"full scope is deprecated", r"Please use DTensor instead", r"`load_state_dict` is deprecated"):
        warnings.filterwarnings("ignore", message=text)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")


# Hydra's flags and what each does here: evolm composes with Hydra's API and has no Hydra runtime (no run dir,
# .hydra/, logging or sweeper), so `--cfg all` is `--cfg job` and `--cfg job` is always resolved
CFG_FLAGS, HELP_FLAGS, SWEEP_FLAGS = ("--cfg", "-c"), ("--help", "-h"), ("--multirun", "-m")


def _flags(overrides: list[str]) -> tuple[str | None, list[str]]:
    """Hydra's command-line flags among ``overrides`` -> (``"job"`` for ``--cfg job|all`` (also ``-c job``,
    ``--cfg=job``), ``"help"`` for ``--help`` / ``-h``, else None; the overrides without the flags). ``--resolve`` is
    taken (what is shown is resolved); any other flag -- ``-m`` / ``--multirun`` (evolm runs no sweeps),
    ``--cfg hydra``, ``--info``, ... -- is a ConfigError naming it: as a key=value override it was one, unexplained."""
    shown, rest, i = None, [], 0
    while i < len(overrides):
        item = overrides[i]
        flag, eq, value = item.partition("=")
        if item in HELP_FLAGS:
            shown = shown or "help"
        elif flag in CFG_FLAGS:
            if not eq:
                value, i = (overrides[i + 1] if i + 1 < len(overrides) else ""), i + 1
            if value == "hydra":
                raise ConfigError(flag, "evolm has no Hydra runtime config to show (it changes no directory and "
                                        "writes no .hydra/); --cfg job prints the composed recipe")
            if value not in ("job", "all"):
                raise ConfigError(flag, "takes job (the composed recipe as YAML), got "
                                        f"{repr(value) if value else 'nothing'}; e.g. evolm train --cfg job")
            shown = "job"
        elif item == "--resolve":
            pass
        elif flag in SWEEP_FLAGS:
            raise ConfigError(flag, "evolm runs one configuration per command (no Hydra sweeps): run one command "
                                    "per value, or a grid as a suite (recipes/suite/, `evolm suite launch`)")
        elif item.startswith("-"):
            raise ConfigError(flag, "not a flag evolm takes: it takes key=value overrides, --help and --cfg job")
        else:
            rest.append(item)
        i += 1
    return shown, rest


def _show(command: str, shown: str, rest: list[str]) -> int:
    """``shown`` (``_flags``): ``"help"`` prints the command's keys, ``"job"`` its composed recipe, with the overrides
    ``rest``; returns 0 without running it."""
    job = shown == "job"
    name = command
    if command == "eval" and rest and "=" not in rest[0]:
        name, rest = f"eval {rest[0]}", rest[1:]
    target = _target(command, rest)
    if name not in RECIPES or target != COMMANDS[command][0]:
        print(f"usage: evolm {command} key=value ...  -- {COMMANDS[command][1]}")
        if command == "eval":
            print("  subcommands: downstream, upstream (`evolm eval downstream --help` lists that one's keys)")
        else:  # no single recipe (or routed to another's): that code's own text says what it takes (read, not run)
            print("\n" + _module_doc(target.split(":")[0]))
        return 0
    from evolm_nemo.config import show

    recipe, schema_path, *parser = RECIPES[name]

    def load(path: str):
        module_name, attr = path.split(":")
        return getattr(importlib.import_module(module_name), attr)

    schema, settings = load(schema_path), (load(parser[0]) if parser else None)
    print(show.render_job(recipe, rest, schema, settings) if job else
          show.render_help(name, recipe, rest, schema, settings))
    return 0


def _target(command: str, overrides: list[str]) -> str:
    """The module:function that runs ``command`` with ``overrides`` (``ROUTES``)."""
    for (routed, key), other in ROUTES.items():
        if command == routed and any(o.startswith(key) for o in overrides):
            return other
    return COMMANDS[command][0]


def _module_doc(module: str) -> str:
    """The docstring of ``module``, read from its file without running it (its imports may be heavy)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec(module).origin
    with open(origin, encoding="utf-8") as f:
        return (ast.get_docstring(ast.parse(f.read())) or "").strip()


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP: the terminal or ssh session went away; or SIGUSR1) in a command that has no handler of its
    own: raised in the main thread so that the command unwinds as on Ctrl-C -- its temporaries removed, its worker
    pools stopped, its output locks released; whatever lets Ctrl-C through lets this through -- and ends with one
    line and exit code 128 + the signal (the default action killed it on the spot, leaving those behind).
    ``args[0]``: the signal."""


# commands that take SIGTERM / SIGHUP themselves: a training saves and stops after its iteration (train.loop,
# runtime.signals.STOP_SIGNALS), the suite launcher passes SIGTERM on to its node (suite.launch). (`evolm pipeline`
# is not one: its trainings take them the same way while they run -- train.loop's StopSignal stands in for this
# handler and puts it back -- and its sampling, exports, evaluations and reports between them unwind as here; it was
# killed there on the spot, without a word.)
OWN_SIGTERM = ("train", "suite")


def _terminate_on_sigterm():
    """Install the handler for the stop signals (fileio.STOP_SIGNAL_NAMES, each unless handled already); returns
    {signal: what to restore} for when the command ends."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers (a command called from a thread keeps the default)
    previous = {sig: signal.getsignal(sig) for sig in (getattr(signal, name) for name in STOP_SIGNAL_NAMES)}
    previous = {sig: was for sig, was in previous.items() if was is signal.SIG_DFL}  # others are someone's (a test's)
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked worker inherited this: it dies as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(signum)

    for sig in previous:
        signal.signal(sig, handler)
    return previous


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `evolm ... --help | head`: the reader left; no traceback, the shell's SIGPIPE status
        import os
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(event & select.POLLERR for _, event in poll.poll(0)):
            raise  # another pipe's error is the command's own
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        return 141


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_known_notices()
    try:
        shown, overrides = _flags(overrides)
        if shown is not None:
            return _show(command, shown, overrides)
    except ConfigError as exc:
        print_error(exc.key, exc.message)
        return 2
    module_name, func_name = _target(command, overrides).split(":")
    restore = _terminate_on_sigterm() if command not in OWN_SIGTERM else None
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(overrides)
    except ConfigError as exc:
        print_error(exc.key, exc.message)
        return 2
    except Terminated as stop:
        import signal

        signum = stop.args[0] if stop.args else signal.SIGTERM
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed allocation (training's own say which keys shrink a step: train.loop)
        what = out_of_memory(exc)
        if what is None:
            raise
        print_error(command, f"out of memory ({what}): it needs more memory than this machine has; lower its "
                             f"batch or length keys (evolm {command} --help), or run it on a larger machine")
        return 2
    finally:
        release_outputs()  # the outputs it locked (fileio.lock_output) are free for the next command
        if restore:
            import signal

            for sig, handler in restore.items():
                signal.signal(sig, handler)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
