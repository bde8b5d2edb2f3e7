"""User reward functions (``rl.reward=custom|sum`` with ``rl.reward_fn=package.module:function``; verl's
``custom_reward_function``).

The function is called once per response as ``fn(prompt, response, row)``: the prompt text, the response text (what
the answer checker reads) and the prompt's JSONL row as a dict (``id``, ``prompt``, ``gold_answer`` and any other
field the row holds; ``suite`` is ``rl.reward_suite`` unless the row names its own). It returns a finite number, or a
dict with a finite ``score`` and other finite numbers: those are logged as ``reward_fn/<name>`` (means over the global
batch).

It runs in helper processes of the answer checker's kind (``answers/pool.py``): a rollout batch is spread over
``rl.reward_fn_workers`` of them, each call under a wall-clock alarm of ``rl.reward_fn_timeout`` seconds, and a helper
that overruns it (code stuck in C, or one that swallows the alarm) is killed and replaced. A timeout scores 0 and is
counted (``reward_fn_timeouts``). An exception, a non-number or a non-finite return stops the run with one line that
names the function and the row (``rl.reward_fn_errors=zero``: it scores 0 instead, counted as ``reward_fn_errors``).
The function is imported and its signature checked when the recipe is validated, before any model is built.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json
import math
import numbers
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from evolm_nemo.answers.pool import _bounded, _Helper, _HelperPool
from evolm_nemo.config.errors import ConfigError

KEY = "rl.reward_fn"
ERRORS = ("raise", "zero")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def resolve(spec: str):
    """``package.module:function`` -> the callable, or a ConfigError saying what is wrong with it."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(KEY, f"must be package.module:function (a module on PYTHONPATH and a function in it); got "
                               f"{spec!r}")
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(KEY, f"{spec}: cannot import module {module_name!r} ({_one_line(exc)}); put its directory "
                               "on PYTHONPATH or install it") from None
    except BaseException as exc:  # noqa: BLE001 - the user's module failed while importing: say so in one line
        raise ConfigError(KEY, f"{spec}: importing {module_name!r} raised {type(exc).__name__}: "
                               f"{_one_line(exc)}") from None
    fn = module
    for part in name.split("."):
        if not hasattr(fn, part):
            raise ConfigError(KEY, f"{spec}: module {module_name!r} ({getattr(module, '__file__', None)}) has no "
                                   f"{name!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(KEY, f"{spec}: {name!r} is not callable (it is {_one_line(repr(fn), 60)}, of type "
                               f"{type(fn).__name__}); name a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # a builtin without a signature: called as is
    try:
        sig.bind("prompt", "response", {})
    except TypeError:
        raise ConfigError(KEY, f"{spec}{sig} cannot be called as fn(prompt, response, row)") from None
    return fn


def normalise(value) -> tuple[str, object]:
    """A return value -> ("ok", {"score": float, "metrics": {name: float}}) or ("error", what is wrong with it)."""
    def number(v) -> bool:  # int, float, bool, numpy scalars
        return isinstance(v, numbers.Real)

    if isinstance(value, dict):
        if "score" not in value:
            return "error", f"returned a dict without 'score' (keys: {', '.join(map(str, value))})"
        metrics = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                return "error", f"returned a dict with key {k!r} (metric names are non-empty strings)"
            if not number(v):
                return "error", f"returned {k}={_one_line(repr(v), 80)} (a {type(v).__name__}), not a number"
            if not math.isfinite(float(v)):
                return "error", f"returned {k}={float(v)} (not finite)"
            if k != "score":
                metrics[k] = float(v)
        return "ok", {"score": float(value["score"]), "metrics": metrics}
    if not number(value):
        return "error", (f"returned {_one_line(repr(value), 80)} (a {type(value).__name__}), not a float or a dict "
                         "with 'score'")
    if not math.isfinite(float(value)):
        return "error", f"returned {float(value)} (not finite)"
    return "ok", {"score": float(value), "metrics": {}}


def _worker_main() -> None:
    """Helper process: ``argv[1]`` the function, ``argv[2]`` the trainer's ``sys.path`` (JSON); say "ready" (or
    {"error": ...}), then answer requests [id, prompt, response, row, timeout] with [id, status, payload]: status ok
    (payload {"score", "metrics"}), timeout, or error (payload: what went wrong, one line)."""
    spec, path = sys.argv[1], json.loads(sys.argv[2])
    sys.path[:] = path + [p for p in sys.path if p not in path]
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # prints of the user's code must not corrupt the protocol
    sys.stdout = open(os.devnull, "w")
    try:
        fn = resolve(spec)
    except ConfigError as exc:
        out.write(json.dumps({"error": exc.message}) + "\n")
        return
    out.write('"ready"\n')
    for line in sys.stdin:
        try:
            rid, prompt, response, row, timeout = json.loads(line)
        except ValueError:
            continue
        box = {}

        def call():
            box["value"] = fn(prompt, response, row)
            return True

        try:
            done = _bounded(call, float(timeout), wall_clock=True)
            reply = [rid, "timeout", None] if done is None else [rid, *normalise(box["value"])]
        except BaseException as exc:  # noqa: BLE001 - the user's code raised: report it, keep serving
            reply = [rid, "error", f"raised {type(exc).__name__}: {_one_line(exc)}"]
        try:
            text = json.dumps(reply, allow_nan=False)
        except (TypeError, ValueError) as exc:
            text = json.dumps([rid, "error", f"returned something that cannot be read back ({_one_line(exc)})"])
        out.write(text + "\n")


class _FnHelper(_Helper):
    MAIN = "from evolm_nemo.rl.reward_fn import _worker_main; _worker_main()"
    START_ERROR = "the reward function's helper process did not start"

    def call(self, prompt: str, response: str, row: dict, timeout: float):
        """[status, payload]; None if the helper died or ran past the backstop (then it must be dropped)."""
        reply = self.request([prompt, response, row, timeout], timeout + 2 * self.GRACE_S)
        return reply if reply is None or len(reply) == 2 else None


class RewardFunction:
    """``rl.reward_fn`` run in ``rl.reward_fn_workers`` helper processes; ``score(prompts, responses, rows)`` -> one
    (status, payload) per response, status ok / timeout / error."""

    def __init__(self, spec: str, timeout: float, workers: int):
        self.spec, self.timeout, self.workers = spec, float(timeout), max(int(workers), 1)
        self._pool = _HelperPool(self._start)
        atexit.register(self.close)

    def _start(self) -> _FnHelper:
        helper = _FnHelper((self.spec, json.dumps([p for p in sys.path if isinstance(p, str)])))
        hello = json.loads(helper.hello)
        if hello != "ready":
            helper.close()
            raise ConfigError(KEY, (hello or {}).get("error", f"{self.spec}: its helper process did not start"))
        return helper

    def call(self, prompt: str, response: str, row: dict):
        helper = self._pool.acquire()
        reply = helper.call(prompt, response, row, self.timeout)
        if reply is None:  # past the backstop (stuck in C, or the alarm swallowed) or the helper died
            try:  # a helper that died closed its output first: give the exit a moment to be reaped
                died = helper.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                died = None  # still running: it overran the backstop
            self._pool.drop(helper)
            if died is not None:
                return "error", f"killed its helper process (exit code {died})"
            return "timeout", None
        self._pool.release(helper)
        return tuple(reply)

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> list[tuple[str, object]]:
        if not prompts:
            return []
        with ThreadPoolExecutor(min(self.workers, len(prompts))) as ex:
            return list(ex.map(self.call, prompts, responses, rows))

    def close(self) -> None:
        self._pool.close()


def _dp_gather(obj) -> list:
    """``obj`` of every data-parallel replica (rank order); ``[obj]`` without data parallelism."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return [obj]
    out = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(out, obj, group=parallel_state.get_data_parallel_group())
    return out


def rewards(fn: RewardFunction, errors: str, prompts: list[str], responses: list[str], rows: list[dict],
            iteration: int) -> tuple[list[float], list[dict], dict]:
    """This rank's scores (a timeout, or an error under ``errors=zero``: 0), the per-response results (for
    rollouts.jsonl) and the step's record over the global batch: ``reward_fn/score`` and ``reward_fn/<name>`` (means
    over the responses that gave them), ``reward_fn_timeouts`` and ``reward_fn_errors`` (counts). Under
    ``errors=raise`` the first error of any replica is raised on every one (a ConfigError naming the row)."""
    results = fn.score(prompts, responses, rows)
    scores, per_row, sums, counts = [], [], {}, {}
    timeouts = errors_n = 0
    first_error = None
    for (status, payload), row in zip(results, rows):
        if status == "ok":
            scores.append(payload["score"])
            per_row.append({"score": payload["score"], **payload["metrics"]})
            for k, v in (("score", payload["score"]), *payload["metrics"].items()):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            continue
        scores.append(0.0)
        if status == "timeout":
            timeouts += 1
            per_row.append({"score": 0.0, "timeout": True})
        else:
            errors_n += 1
            per_row.append({"score": 0.0, "error": str(payload)})
            if first_error is None:
                first_error = f"{fn.spec} {payload} on the row id={row.get('id')!r} (iteration {iteration + 1})"
        sums["score"] = sums.get("score", 0.0)  # a failed call still counts in the mean reward_fn/score (as 0)
        counts["score"] = counts.get("score", 0) + 1
    gathered = _dp_gather({"sums": sums, "counts": counts, "timeouts": timeouts, "errors": errors_n,
                           "first_error": first_error if errors == "raise" else None})
    failed = next((g["first_error"] for g in gathered if g["first_error"]), None)
    if failed:
        raise ConfigError(KEY, f"{failed}; fix the function, or rl.reward_fn_errors=zero scores such responses 0 "
                               "(counted as reward_fn_errors)")
    total_s, total_n = {}, {}
    for g in gathered:
        for k, v in g["sums"].items():
            total_s[k] = total_s.get(k, 0.0) + v
            total_n[k] = total_n.get(k, 0) + g["counts"][k]
    record = {f"reward_fn/{k}": total_s[k] / total_n[k] for k in sorted(total_s) if total_n[k]}
    record["reward_fn_timeouts"] = sum(g["timeouts"] for g in gathered)
    record["reward_fn_errors"] = sum(g["errors"] for g in gathered)
    return scores, per_row, record
