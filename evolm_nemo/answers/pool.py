"""Bounded slow checks. Anything that needs sympy runs in a helper process (one per concurrent caller, started on
first use, parse results memoised there) under a per-direction wall-clock alarm (``TIMEOUT_S``) and a backstop after
which the helper is killed and replaced (code stuck in C, e.g. a huge integer power, cannot be interrupted by a
signal); a timeout counts as "not equivalent". So checks never hang, work from any thread (no signals in the caller)
and never crash on odd model output."""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from evolm_nemo.answers import verifier
from evolm_nemo.answers.common import MODES, TIMEOUT_S
from evolm_nemo.answers.math_evolm import _evolm_math_direction
from evolm_nemo.answers.math_strict import _strict_math_direction

_SLOW_DIRECTIONS: dict[str, Callable[[str, str], bool]] = {
    "evolm": _evolm_math_direction,
    "strict": _strict_math_direction,
}


class _CheckTimeout(BaseException):
    """Raised by our alarm inside a bounded check; a BaseException so that `except Exception` does not eat it."""


def _bounded(fn: Callable[[], bool], seconds: float, wall_clock: bool = False) -> Optional[bool]:
    """Run fn (main thread only) under a time limit; None on timeout. The alarm re-fires every 50 ms after the
    limit in case library code swallows the exception. `wall_clock` uses ITIMER_REAL (only in the helper process,
    where math-verify's own signal.alarm calls are neutralised); otherwise ITIMER_PROF (CPU time), which
    math-verify's alarm(0) calls cannot cancel."""
    import signal

    which, signum = (signal.ITIMER_REAL, signal.SIGALRM) if wall_clock else (signal.ITIMER_PROF, signal.SIGPROF)
    state = {"armed": True}

    def on_alarm(sig, frame):
        if state["armed"]:
            raise _CheckTimeout()

    previous = signal.signal(signum, on_alarm)
    verifier.set_deadline(time.monotonic() + seconds if wall_clock else None)
    signal.setitimer(which, seconds, 0.05)
    try:
        return fn()
    except _CheckTimeout:
        return None
    finally:
        while True:  # disarm; an alarm landing right here must not escape
            try:
                state["armed"] = False
                break
            except _CheckTimeout:
                continue
        signal.setitimer(which, 0, 0)
        signal.signal(signum, previous)
        verifier.set_deadline(None)


def slow_direction_inprocess(mode: str, a: str, b: str, timeout: Optional[float] = TIMEOUT_S) -> bool:
    """One direction of the sympy path in the calling process, bounded by `timeout` seconds of CPU time when called
    from the main thread (unbounded elsewhere or with timeout=None). A timeout is False."""
    direction = _SLOW_DIRECTIONS[mode]
    if timeout is None or threading.current_thread() is not threading.main_thread():
        return direction(a, b)
    return bool(_bounded(lambda: direction(a, b), timeout))


def slow_equiv_inprocess(mode: str, a: str, b: str, timeout: Optional[float] = TIMEOUT_S) -> bool:
    """The sympy path of math equivalence in the calling process: both directions OR-ed, each bounded as in
    :func:`slow_direction_inprocess`. Used by the benchmark's naive scorer and the differential tests; normal calls
    go through :func:`is_equiv`, which runs this in a helper process."""
    return slow_direction_inprocess(mode, a, b, timeout) or slow_direction_inprocess(mode, b, a, timeout)


def _worker_main() -> None:
    """Helper process: read JSON requests [id, mode, a, b, timeout] on stdin, answer [id, verdict] on stdout: the
    two directions OR-ed, each bounded by a wall-clock alarm of `timeout` seconds."""
    import signal

    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints from libraries must not corrupt the protocol
    sys.stdout = open(os.devnull, "w")
    # math-verify arms its own SIGALRM timers (5 s / 10 s, longer than ours) and cancels them with alarm(0), which
    # would also cancel ours; in this process only, its alarm calls do nothing and our wall-clock alarm bounds each
    # direction (math-verify's SIGALRM handler still turns our alarm into its TimeoutError inside its wrappers).
    signal.alarm = lambda seconds: 0
    verifier.enable_parse_cache()
    verifier._math_verify()
    for mode in MODES:  # warm up (antlr, sympy caches) before announcing readiness
        _SLOW_DIRECTIONS[mode]("\\frac{1}{2}", "0.5")
    out.write('"ready"\n')
    for line in sys.stdin:
        try:
            rid, mode, a, b, timeout = json.loads(line)
        except ValueError:
            continue
        timed_out = False
        try:
            direction = _SLOW_DIRECTIONS[mode]
            verdict = _bounded(lambda: direction(a, b), float(timeout), wall_clock=True)
            if not verdict:
                timed_out = verdict is None
                verdict = _bounded(lambda: direction(b, a), float(timeout), wall_clock=True)
                timed_out = timed_out or verdict is None
            verdict = bool(verdict)
        except BaseException:  # noqa: BLE001 - any failure of a check is "not equivalent"
            verdict = False
        out.write(json.dumps([rid, verdict, timed_out]) + "\n")


class _Helper:
    """One helper process and its pipes; used by one thread at a time. The answer checker's by default; other bounded
    work (the RL stage's user reward functions, ``evolm_nemo.rl.reward_fn``) starts its own ``main`` with ``args``
    and reads the first line the helper writes (``hello``)."""

    START_TIMEOUT_S = 180.0
    GRACE_S = 1.5  # past the helper's own alarm, code stuck in C (huge integer powers) gets the helper killed
    MAIN = "from evolm_nemo.answers.pool import _worker_main; _worker_main()"
    START_ERROR = "the math-verify helper process did not start (is math-verify installed?)"

    def __init__(self, args: tuple[str, ...] = ()):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above evolm_nemo/
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.MAIN, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self._next_id = 0
        self.hello = self._readline(self.START_TIMEOUT_S)
        if self.hello is None:
            self.close()
            raise RuntimeError(self.START_ERROR)

    def _readline(self, timeout: float) -> Optional[bytes]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None  # the helper died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def request(self, fields: list, backstop: float) -> Optional[list]:
        """Send ``[id, *fields]`` as one JSON line and return the fields of the helper's answer to that id (lines
        for other ids or unreadable lines are skipped); None if the helper died or said nothing for ``backstop``
        seconds (then it must be dropped)."""
        self._next_id += 1
        rid = self._next_id
        try:
            self.proc.stdin.write((json.dumps([rid, *fields]) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return None
        while True:
            line = self._readline(backstop)
            if line is None:
                return None
            try:
                got = json.loads(line)
            except ValueError:
                continue
            if isinstance(got, list) and got and got[0] == rid:
                return got[1:]

    def check(self, mode: str, a: str, b: str, timeout: float) -> Optional[tuple[bool, bool]]:
        """(verdict, timed out): both directions OR-ed, each under the helper's alarm; None if the helper died or ran
        past the backstop (then it must be dropped)."""
        reply = self.request([mode, a, b, timeout], 2 * timeout + self.GRACE_S)
        if reply is None or len(reply) != 2:
            return None
        verdict, timed_out = reply
        return bool(verdict), bool(timed_out)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        except Exception:
            pass
        for stream in (self.proc.stdout, self.proc.stdin):
            try:
                stream.close()
            except Exception:
                pass


class _HelperPool:
    """Idle helper processes for any number of threads: ``acquire`` one (started by ``start`` when none is idle),
    then ``release`` it, or ``drop`` it (killed) when it died or overran. After a fork the parent's helpers are
    forgotten, not shared."""

    def __init__(self, start: Callable[[], _Helper] = _Helper):
        self._start = start
        self._idle: list[_Helper] = []
        self._all: list[_Helper] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def acquire(self) -> _Helper:
        with self._lock:
            if self._pid != os.getpid():  # forked: the helpers belong to the parent process
                self._idle, self._all, self._pid = [], [], os.getpid()
            if self._idle:
                return self._idle.pop()
        helper = self._start()
        with self._lock:
            self._all.append(helper)
        return helper

    def release(self, helper: _Helper) -> None:
        with self._lock:
            self._idle.append(helper)

    def drop(self, helper: _Helper) -> None:
        helper.proc.kill()
        helper.close()
        with self._lock:
            if helper in self._all:
                self._all.remove(helper)

    def check(self, mode: str, a: str, b: str, timeout: float) -> tuple[bool, bool]:
        """(verdict, timed out) of one pair in a helper process; a helper that dies or overruns is killed and the pair
        is (False, True)."""
        helper = self.acquire()
        verdict = helper.check(mode, a, b, timeout)
        if verdict is None:  # timed out past the backstop or died: kill it, the pair counts as not equivalent
            self.drop(helper)
            return False, True
        self.release(helper)
        return verdict

    def close(self) -> None:
        with self._lock:
            helpers, self._all, self._idle = self._all, [], []
        for helper in helpers:
            helper.close()


_POOL = _HelperPool()
atexit.register(_POOL.close)


if __name__ == "__main__":  # pragma: no cover - the helper is started with -c, this is for manual debugging
    _worker_main()
