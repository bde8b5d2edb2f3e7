"""Upstream 0-shot evaluation with lm-eval: hellaswag, winogrande, piqa, openbookqa, arc_easy, arc_challenge.

Two sources of task definitions:

* ``tasks_dir=None`` and ``data_dir=None``: lm-eval's built-in tasks (data from the HF hub or its local cache).
* ``data_dir=<dir>`` (with ``tasks_dir=<dir>``, or alone: ``eval/upstream/``, ``tasks_dir_for``): our YAML tasks
  (named ``evolm_<task>``) over local JSONL files ``<data_dir>/<task>.jsonl`` in the row schema of each task's HF
  dataset, with the same prompts as the built-ins. This runs fully offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
  are set).

Each task's score is acc_norm where lm-eval reports it and acc otherwise (winogrande); ``avg`` is their mean, in
percent, the shape of EvoLM's upstream table. lm_eval is imported only inside :func:`run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from evolm_nemo.config.errors import ConfigError, causes
from evolm_nemo.config.validate import once
from evolm_nemo.tasks import UPSTREAM

LOCAL_PREFIX = "evolm_"
PLACEHOLDER = "__DATA_DIR__"


def default_tasks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "eval" / "upstream"


def tasks_dir_for(tasks_dir: str | None, data_dir: str | None) -> str | None:
    """Our local YAMLs (eval/upstream) when only data_dir is given; None: lm-eval's built-in tasks. The one rule of
    `evolm eval upstream` and the training probes (``probe.tasks_dir`` / ``probe.data_dir``)."""
    if tasks_dir is None and data_dir is not None:
        return str(default_tasks_dir())
    return tasks_dir


# the row fields our task YAMLs (eval/upstream/<task>.yaml, their header comments) read: a data file for one of them
# is checked for these before lm-eval loads it (a missing one was a DatasetGenerationError / jinja error mid-run)
ROW_FIELDS = {
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "openbookqa": ("question_stem", "choices", "answerKey"),
    "arc_easy": ("question", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
}


def _index(value) -> int | None:
    """``int(value)`` as the hooks read a label (an int, or a string int() takes), else None ("²" is a digit to
    str.isdigit, but int() refuses it)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _lettered(row: dict, key: str, strip: bool = False) -> str | None:
    """ARC / OpenBookQA: ``choices`` holds lists ``text`` and ``label`` of one length, and the answer key is one of
    the labels -- with ``strip``, its leading spaces stripped first, as openbookqa.yaml reads it
    (``answerKey.lstrip()``); the ARC YAMLs look the key up as it is."""
    choices = row["choices"]
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or \
            not isinstance(choices.get("label"), list) or len(choices["text"]) != len(choices["label"]) or \
            not choices["text"]:
        return "field 'choices': expected {text: [...], label: [...]}, two lists of one length"
    answer = row[key].lstrip() if strip and isinstance(row[key], str) else row[key]
    if answer not in choices["label"]:
        return f"field '{key}': {json.dumps(row[key])} is none of the choices' labels {json.dumps(choices['label'])}"
    return None


def _piqa(row: dict) -> str | None:
    if isinstance(row["label"], bool) or row["label"] not in (0, 1):
        return f"field 'label': {json.dumps(row['label'])}, expected 0 (sol1) or 1 (sol2)"
    return None


def _hellaswag(row: dict) -> str | None:
    endings = row["endings"]
    if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings):
        return "field 'endings': expected a list of strings"
    if _index(row["label"]) not in range(len(endings)):
        return f"field 'label': {json.dumps(row['label'])}, expected the index of one of its {len(endings)} endings"
    return None


def _winogrande(row: dict) -> str | None:
    if not isinstance(row["sentence"], str) or "_" not in row["sentence"]:
        return "field 'sentence': has no blank '_' for the options to fill"
    if _index(row["answer"]) not in (1, 2):
        return f"field 'answer': {json.dumps(row['answer'])}, expected \"1\" (option1) or \"2\" (option2)"
    return None


# the gold each task YAML reads from a row, checked like ROW_FIELDS: lm-eval counts a label outside the choices as a
# wrong answer with only a warning (a silently lower score), and an ARC answerKey that is no label or a Winogrande
# sentence without its blank was a traceback out of the task's template after the model had loaded
ROW_GOLD = {
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "piqa": _piqa,
    "openbookqa": lambda row: _lettered(row, "answerKey", strip=True),
    "arc_easy": lambda row: _lettered(row, "answerKey"),
    "arc_challenge": lambda row: _lettered(row, "answerKey"),
}
# model dtypes lm-eval's hf model takes (it calls getattr(torch, dtype)); "auto": the checkpoint's own
DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float", "float64", "double")


def check_settings(tasks: list[str], limit: int | None = None, dtype: str = "auto") -> None:
    """The settings that need neither the model, the data nor this machine (the one place of these rules:
    ``evaluate.upstream_settings`` -- the evaluation's and `evolm suite plan`'s check -- and :func:`run` call it)."""
    if not tasks:
        raise ConfigError("tasks", f"empty; choose from {', '.join(UPSTREAM)}")
    unknown = [t for t in tasks if t not in UPSTREAM]
    if unknown:
        raise ConfigError("tasks", f"unknown task {unknown[0]!r}; choose from {', '.join(UPSTREAM)}")
    once("tasks", list(tasks), "it would count twice in the average")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError("limit", f"must be >= 1 (or null for every document), got {limit!r}")
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")


def check(model: str, tasks: list[str], tasks_dir: str | None, data_dir: str | None,
          device: str | None = None) -> None:
    """Fail fast, with one line, on anything of this machine and its files that would break after the model is
    loaded: the model directory, the device, the local tasks and their data (the settings: :func:`check_settings`)."""
    tasks_dir = tasks_dir_for(tasks_dir, data_dir)
    if not (Path(model) / "config.json").is_file():
        raise ConfigError("model", f"{model} is not an HF model directory (no config.json)")
    check_device(device)
    check_tasks(tasks, tasks_dir, data_dir)


def check_device(device: str | None, key: str = "device") -> None:
    """A device lm-eval's hf model uses as given (it silently falls back to cuda-or-cpu for any other string) and
    that this machine has (``cuda`` without CUDA was an AssertionError after the data was loaded)."""
    if device is None:
        return
    import re

    import torch

    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", str(device))
    if m is None or (m[1] == "cpu" and m[2] is not None) or (m[1] == "mps" and m[2] not in (None, "0")):
        raise ConfigError(key, f"expected cpu, cuda, cuda:<index> or mps (null: cuda if available, else cpu), "
                               f"got {device!r}")
    if m[1] == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(key, f"{device}: CUDA is not available here (torch.cuda.is_available() is false); use "
                                   "device=cpu or leave it null")
        if m[2] is not None and int(m[2]) >= torch.cuda.device_count():
            raise ConfigError(key, f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if m[1] == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(key, f"{device}: MPS is not available here; use device=cpu or leave it null")


def check_tasks(tasks: list[str], tasks_dir: str | None, data_dir: str | None, prefix: str = "") -> None:
    """Local tasks: each ``<task>.yaml`` in ``tasks_dir`` and its ``<task>.jsonl`` in ``data_dir`` exist (keys
    named ``<prefix>tasks`` / ``<prefix>data_dir``; the probe's are ``probe.upstream`` / ``probe.data_dir``)."""
    tasks_dir = tasks_dir_for(tasks_dir, data_dir)
    if tasks_dir is None:
        return
    key_tasks = f"{prefix}upstream" if prefix else "tasks"
    for task in tasks:
        if not (Path(tasks_dir) / f"{task}.yaml").is_file():
            known = sorted(p.stem for p in Path(tasks_dir).glob("*.yaml"))
            raise ConfigError(key_tasks, f"no {task}.yaml in {tasks_dir}; available: {', '.join(known) or 'none'}")
    for task in tasks:
        check_task_yaml(Path(tasks_dir) / f"{task}.yaml", task)
    if data_dir is None:
        raise ConfigError(f"{prefix}data_dir", f"local tasks ({prefix}tasks_dir={tasks_dir}) need "
                                               f"{prefix}data_dir=<dir with <task>.jsonl files>")
    for task in tasks:
        if not (Path(data_dir) / f"{task}.jsonl").is_file():
            raise ConfigError(f"{prefix}data_dir", f"missing {Path(data_dir) / f'{task}.jsonl'}")
    for task in tasks:
        ours = (default_tasks_dir() / f"{task}.yaml").resolve()
        mine = (Path(tasks_dir) / f"{task}.yaml").resolve()
        same = mine == ours or (ours.is_file() and mine.read_bytes() == ours.read_bytes())
        check_rows(Path(data_dir) / f"{task}.jsonl", ROW_FIELDS.get(task, ()) if same else (), f"{prefix}data_dir",
                   ROW_GOLD.get(task) if same else None)


def check_task_yaml(path: Path, task: str) -> None:
    """A local task's YAML is YAML and defines the task ``evolm_<task>``, the name it is run under: lm-eval's own
    failure for either was a KeyError traceback ("Spec 'evolm_piqa' is not a registered task") after the model had
    loaded. lm-eval's ``!function`` tags are read as placeholders; a YAML that takes its name from an ``include`` is
    left to lm-eval."""
    import yaml

    from evolm_nemo.config.errors import first_line

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"not valid YAML ({first_line(exc)})") from None
    if not isinstance(spec, dict):
        raise ConfigError(str(path), "not an lm-eval task: expected a mapping with task: "
                                     f"{LOCAL_PREFIX}{task}")
    if spec.get("task") != LOCAL_PREFIX + task and not ("task" not in spec and "include" in spec):
        raise ConfigError(str(path), f"task: {json.dumps(spec.get('task'))}; the local task for {task} must be named "
                                     f"{LOCAL_PREFIX}{task}, the name evolm eval upstream runs it under")


def check_rows(path: Path, fields: tuple[str, ...], key: str, gold=None) -> None:
    """``path`` is UTF-8 JSONL of objects (one per non-blank line), has rows and each has ``fields`` (not null) and,
    with ``gold`` (a ``ROW_GOLD`` check), a gold answer among its choices: a one-line ConfigError naming
    ``file:line`` (or ``key`` for a file with no rows)."""
    from evolm_nemo.fileio import iter_jsonl

    n = 0
    for where, row in iter_jsonl(path, key):
        missing = [f for f in fields if row.get(f) is None]
        if missing:
            raise ConfigError(where, f"field '{missing[0]}': missing (rows of {path.name} need "
                                     f"{', '.join(fields)}; see the header of its task YAML)")
        problem = gold(row) if gold is not None else None
        if problem:
            raise ConfigError(where, f"{problem} (see the header of its task YAML)")
        n += 1
    if n == 0:
        raise ConfigError(key, f"{path} has no rows")


def render(tasks_dir: str, data_dir: str, into: str) -> None:
    """Copy the task YAMLs (and their hook modules) into ``into`` with ``__DATA_DIR__`` made absolute."""
    data = str(Path(data_dir).resolve())
    for src in Path(tasks_dir).iterdir():
        if src.suffix in (".yaml", ".py"):
            (Path(into) / src.name).write_text(src.read_text().replace(PLACEHOLDER, data))


@contextlib.contextmanager
def _offline():
    """HF hub and datasets offline for the duration (their flags are also read at import time: set both)."""
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in env})
    mods = [(sys.modules.get("huggingface_hub.constants"), "HF_HUB_OFFLINE"),
            (sys.modules.get("datasets.config"), "HF_DATASETS_OFFLINE")]
    old = [(m, a, getattr(m, a)) for m, a in mods if m is not None and hasattr(m, a)]
    for m, a, _ in old:
        setattr(m, a, True)
    try:
        yield
    finally:
        for m, a, v in old:
            setattr(m, a, v)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def summarize(results: dict, tasks: list[str], local: bool) -> dict:
    """lm-eval results -> {"tasks": {task: {"acc", "acc_norm", "score", "n"}}, "avg": mean score}, in percent."""
    out = {}
    for task in tasks:
        name = LOCAL_PREFIX + task if local else task
        row = results["results"][name]
        acc = row.get("acc,none")
        norm = row.get("acc_norm,none")
        score = norm if norm is not None else acc
        out[task] = {"acc": _pct(acc), "acc_norm": _pct(norm), "score": _pct(score),
                     "n": int(results.get("n-samples", {}).get(name, {}).get("effective", 0))}
    return {"tasks": out, "avg": round(sum(out[t]["score"] for t in tasks) / len(tasks), 2)}


def _pct(x):
    return None if x is None else round(100.0 * float(x), 2)


HUB_ERRORS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectTimeout", "ReadTimeout", "Timeout",
              "HfHubHTTPError", "MaxRetryError", "NameResolutionError")


def _hub_unreachable(exc: BaseException) -> str | None:
    """``"<Type>: <first line>"`` when ``exc`` (or what caused it) says the hub could not be reached, else None."""
    for e in causes(exc):
        if isinstance(e, ConnectionError) or type(e).__name__ in HUB_ERRORS:
            first = (str(e).strip().splitlines() or [""])[0]
            return f"{type(e).__name__}: {first}"[:300]
    return None


def run(model: str, tasks: list[str] = UPSTREAM, tasks_dir: str | None = None, data_dir: str | None = None,
        batch_size: int | str = 16, limit: int | None = None, device: str | None = None, dtype: str = "auto",
        trust_remote_code: bool = False, checked: bool = False) -> tuple[dict, dict]:
    """Run lm-eval 0-shot on an HF model directory; returns (our summary, lm-eval's raw ``results`` dict without
    per-sample logs). ``checked``: the caller ran ``check_settings`` and ``check`` on these settings (the data files
    are read once)."""
    tasks, tasks_dir = list(tasks), tasks_dir_for(tasks_dir, data_dir)
    if not checked:
        check_settings(tasks, limit=limit, dtype=dtype)
        check(model, tasks, tasks_dir, data_dir, device=device)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = {"pretrained": str(model), "dtype": dtype, "trust_remote_code": trust_remote_code}
    return evaluate("hf", tasks, tasks_dir, data_dir, limit=limit, model_args=args, batch_size=batch_size,
                    device=device)


def evaluate(lm, tasks: list[str], tasks_dir: str | None, data_dir: str | None, limit: int | None = None,
             model_args: dict | None = None, batch_size: int | str = 16, device: str | None = None,
             quiet: bool = False) -> tuple[dict, dict]:
    """lm-eval's ``simple_evaluate`` 0-shot over ``tasks`` for ``lm``: a registered model name (``"hf"`` with
    ``model_args``) or an lm-eval ``LM`` instance (the training probe's live model). The one place our local tasks
    are rendered and the hub is switched off for them."""
    local = tasks_dir is not None
    with tempfile.TemporaryDirectory(prefix="evolm_upstream_") as tmp, \
            (_offline() if local else contextlib.nullcontext()), (_quiet() if quiet else contextlib.nullcontext()):
        if local:
            render(tasks_dir, data_dir, tmp)
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ConfigError("upstream", "lm-eval is not installed: pip install -c constraints.txt 'lm-eval[hf]'")

        manager = TaskManager(include_path=tmp, include_defaults=False) if local else TaskManager()
        names = [LOCAL_PREFIX + t if local else t for t in tasks]
        try:
            with _quiet_git():
                results = lm_eval.simple_evaluate(
                    model=lm, model_args=model_args, tasks=names, num_fewshot=0, batch_size=batch_size,
                    device=device, limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=0)
        except Exception as exc:
            hub = _hub_unreachable(exc)
            if hub is None or local:
                raise
            raise ConfigError("tasks", f"cannot fetch lm-eval's task data from the HF hub ({hub}); without hub "
                                       f"access run our local tasks: tasks_dir={default_tasks_dir()} "
                                       "data_dir=<dir with <task>.jsonl rows> (README: Evaluation)") from None
    raw = {k: results[k] for k in ("results", "versions", "n-shot", "n-samples", "configs") if k in results}
    return summarize(results, tasks, local), raw


@contextlib.contextmanager
def _quiet_git():
    """lm-eval records the working directory's git commit in its results (``lm_eval.evaluator.get_git_commit_hash``:
    ``git describe --always`` in a subprocess that inherits our stderr), so run outside a git checkout it printed
    git's ``fatal: not a git repository (or any of the parent directories): .git``. For the duration, the same lookup
    (the same command, the same fallback to reading .git) with git's stderr discarded -- its failure is the expected
    answer "no commit", and nothing else goes to that stream. Nothing else of lm-eval's output changes."""
    import subprocess

    from lm_eval import evaluator

    try:
        from lm_eval.loggers.utils import get_commit_from_path
    except ImportError:
        get_commit_from_path = None
    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None or get_commit_from_path is None:  # another lm-eval's layout: left as it is
        yield
        return

    def git_commit_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def _quiet():
    """lm-eval's and datasets' log lines and progress bars off (a probe inside a training run prints one line of its
    own); exceptions still propagate."""
    import io
    import logging

    names = ("lm-eval", "lm_eval", "datasets")
    levels = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in levels:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in levels:
            logger.setLevel(level)
