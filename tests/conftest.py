"""Shared test helpers: run `evolm` commands as real processes (one, or two under torchrun/gloo)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on the 2-core box: the tests spend most of their time in one
    single-threaded process at a time) each worker's in-process torch work takes one thread: two workers of two
    threads each would oversubscribe the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# The longest test files (their tests and module fixtures; per-file sums of one full run's junit times, BENCHMARKS.md),
# started first under `make test`'s two workers: `--dist loadfile` keeps a file's tests (and module fixtures) on one
# worker and `--no-loadscope-reorder` hands the files out in collection order, so the short files fill both workers
# to the end instead of one long file running alone after the rest. test_sft comes second so that the two workers do
# not both wait on the shared SFT parent (`sft_parent`, which test_rl and test_rm start with).
LONGEST_FIRST = ("rl/test_rl.py", "train/test_sft.py", "rm/test_rm.py", "test_pipeline.py", "suite/test_nano_quick.py",
                 "train/test_dynamics.py", "suite/test_launch.py", "test_release.py", "suite/test_tiny_suite.py",
                 "rl/test_reward_fn.py", "train/test_resume.py", "train/test_parallel.py",
                 "checkpoint/test_integrity.py", "train/test_tracking.py", "data/test_sft_prepare.py")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the files in their own order

    def rank(item):
        path = Path(str(item.fspath)).relative_to(REPO / "tests").as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """A directory for a session fixture's read-only product, built once for the whole test session: under
    pytest-xdist the workers share it (the first to come builds it under an flock while the others wait; a
    ``.done`` marker says it is whole). Yields (directory, whether this caller must build it)."""
    import fcntl

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    base = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    root = base / name
    with open(base / f".{name}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            done = (root / ".done").exists()
            if not done:
                if root.exists():
                    shutil.rmtree(root)  # a builder that failed part way
                root.mkdir(parents=True)
            yield root, not done
            (root / ".done").touch()
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evolm_cmd(command: str, overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [str(BIN / "evolm"), command, *overrides]
    module = {"train": "evolm_nemo.train.entry"}[command]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", module, *overrides]


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("PYTEST_CURRENT_TEST", None)  # pytest's, set anew for each test: nothing of evolm reads it
    return env


class ForkServer:
    """This pytest worker's warm start for one-process `evolm` commands (tests/forkserver.py says what it saves and
    when a command gets a fresh process instead): started at the first command, ended with the session."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.state: dict | None = None  # what the server inherited (inherited())
        self.off = os.environ.get("EVOLM_TEST_FORK", "1") == "0"  # EVOLM_TEST_FORK=0: fresh processes only
        self.lock = threading.Lock()
        self.other: tuple[dict, int] | None = None  # another state than the server's, and how often in a row

    def _start(self, state: dict) -> bool:
        self.state, self.other = state, None
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.forkserver"], cwd=REPO, env=subprocess_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     bufsize=0)  # unbuffered: select() sees every answer not yet read
        ready = json.loads(self.proc.stdout.readline() or b'{"ready": false, "why": "it died"}')
        if not ready["ready"]:
            self.stop()
            self.off = True
            print(f"[tests] fresh processes for every evolm command: the fork server is not safe here "
                  f"({ready['why']})", file=sys.stderr)
        return not self.off

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess | None:
        """``argv`` (the installed script's) run in a forked process, or None: start a fresh one instead."""
        if self.off:
            return None
        state = inherited()
        if self.proc is not None and self.proc.poll() is not None:
            self.stop()
        if self.proc is not None and state != self.state:
            # a test changed what a new process inherits (os.environ, which modules read at import; the umask, ...):
            # fresh processes, and a server of its own for a state that stays (a third command in a row with it)
            self.other = (state, self.other[1] + 1) if self.other and self.other[0] == state else (state, 1)
            if self.other[1] < 3:
                return None
            self.stop()
        self.other = None
        if not self.lock.acquire(blocking=False):  # another thread's command is in the server: a fresh process
            return None
        try:
            if self.proc is None and not self._start(state):
                return None
            try:
                return self._run(argv, timeout)
            except subprocess.TimeoutExpired:
                raise
            except BaseException:  # an answer may be left unread: the next command would read it as its own
                self.stop()
                self.off = True
                raise
        finally:
            self.lock.release()

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        import select
        import signal
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            request = memoryview((json.dumps({"argv": argv, "stdout": str(out), "stderr": str(err)}) + "\n").encode())
            while request:
                request = request[self.proc.stdin.write(request):]
            pid = json.loads(self.proc.stdout.readline())["pid"]
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)  # as subprocess.run's timeout does
            status = json.loads(self.proc.stdout.readline())["status"]
            stdout, stderr = (p.read_text() if p.exists() else "" for p in (out, err))  # text=True's decoding
        if not ready:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), stdout, stderr)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


FORKS = ForkServer()


def inherited() -> dict:
    """What a process started now inherits from this one besides its arguments: the environment it is given, the
    umask, resource limits, signals ignored or blocked, the CPUs it may run on and its nice value."""
    import resource
    import signal

    status = Path("/proc/self/status").read_text()
    umask = next((line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), None)
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")}
    reset = {signal.SIGPIPE, signal.SIGXFSZ}  # subprocess restores these two to the default (restore_signals)
    ignored = sorted(int(s) for s in signal.valid_signals() - reset
                     if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) is signal.SIG_IGN)
    return {"env": subprocess_env(), "umask": umask, "limits": limits, "ignored": ignored,
            "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            "cpus": sorted(os.sched_getaffinity(0)), "nice": os.nice(0)}


def pytest_unconfigure(config):
    FORKS.stop()


def run_evolm(command: str, overrides: list[str], nproc: int = 1, check: bool = True, timeout: int = 600,
              fresh: bool = False):
    """``evolm <command> <overrides>`` as a process of its own (``nproc`` > 1: under torchrun); one process starts
    warm from this worker's fork server unless ``fresh`` (a new interpreter through the installed script)."""
    argv = evolm_cmd(command, overrides, nproc)
    proc = None if fresh or nproc != 1 else FORKS.run(argv, timeout)
    if proc is None:
        proc = subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"evolm {command} {' '.join(overrides)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_then_sigkill(overrides: list[str], out_dir, at_least: int, timeout: float = 300) -> int:
    """Start `evolm train` in its own process group, SIGKILL the group as soon as a committed checkpoint at iteration
    >= ``at_least`` exists under ``out_dir``/checkpoints; returns that iteration (asserting the kill happened)."""
    from evolm_nemo.checkpoint import io as ckpt

    def ready():
        done = ckpt.latest(Path(out_dir) / "checkpoints")
        return int(done.name.split("_")[1]) if done is not None and int(done.name.split("_")[1]) >= at_least else None

    return train_then_sigkill_when(overrides, ready, timeout)


def train_then_sigkill_when(overrides: list[str], ready, timeout: float = 300):
    """Start `evolm train` in its own process group and SIGKILL the group as soon as ``ready()`` returns something
    (polled every few milliseconds); returns that (asserting the kill happened)."""
    import signal
    import time

    proc = subprocess.Popen(evolm_cmd("train", overrides), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    found, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = ready()
        if found is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert found is not None and proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return found


def train_then_sigterm(overrides: list[str], out_dir, after_rows: int, timeout: float = 300,
                       output: dict | None = None, sig: str = "SIGTERM") -> tuple[int, str, int]:
    """Start `evolm train` in its own process group, send SIGTERM (or ``sig``) once ``metrics.jsonl`` under
    ``out_dir`` has ``after_rows`` rows; returns (exit code, stderr, the iteration the run's last line says it stopped
    after), asserting that nothing of its process group is left running. ``output["stdout"]``: its standard output."""
    import signal
    import time

    from tests.checkpoint.test_signals import _wait_gone

    proc = subprocess.Popen(evolm_cmd("train", overrides), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = Path(out_dir) / "metrics.jsonl"
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and (
                not metrics.exists() or len(metrics.read_text().splitlines()) < after_rows):
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=timeout)
        if output is not None:
            output["stdout"] = out
        assert not _wait_gone(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith(f"[evolm] stopped by {sig} after iteration ") and "committed" in last, err[-2000:]
    assert "most recent call first" not in err, err[-4000:]  # no faulthandler stack dump: a clean stop, not a crash
    return proc.returncode, err, int(last.split("after iteration ")[1].split(":")[0])


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> its bytes; a file: its name -> its bytes): to show that a refused
    command touched nothing."""
    root = Path(root)
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def a_run(tmp_path_factory, data_cache):
    """A real (one-iteration) tiny training run: checkpoints, run.json, metrics.jsonl. Shared by the whole session:
    its users copy it or show that a refused command left it byte for byte (never write into it)."""
    out = tmp_path_factory.mktemp("a_run") / "run"
    run_evolm("train", tiny(out, data_cache, "train.iters=1"))
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").is_file()
    return out


def losses(out_dir) -> dict[int, float]:
    path = Path(out_dir) / "metrics.jsonl"
    return {r["iteration"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One generated corpus + tokenizer for the whole session (built by the first run that needs it)."""
    return str(tmp_path_factory.mktemp("data_cache"))


def tiny(out_dir, cache: str, *extra: str) -> list[str]:
    """Overrides for a small, fast tiny-model run."""
    return [f"run.out_dir={out_dir}", f"data.cache_dir={cache}", "data.synthetic_docs=400", "train.progress=false",
            "train.tensorboard=false", "train.log_interval=1", *extra]


@pytest.fixture(scope="session")
def sft_parent(tmp_path_factory):
    """One SFT parent for the RL, RM and DPO tests: the demo's pretraining, then SFT on the demo's generated word
    problems (a model that solves some of them, so rewards carry signal). Also the demo's RL set and a fixed
    8-prompt subset of it (a task the tiny model can learn in a few steps)."""
    with built_once(tmp_path_factory, "sft_parent") as (root, build):
        cache = root / "cache"
        if build:
            common = [f"data.cache_dir={cache}", "train.progress=false", "train.tensorboard=false"]
            run_evolm("train", ["experiment=demo", f"run.out_dir={root / 'pre'}", *common])
            run_evolm("train", ["experiment=demo_sft", f"run.out_dir={root / 'sft'}",
                                f"train.init_from={root / 'pre'}", "train.epochs=3", *common])
        rl = next(Path(cache).glob("synthetic-sft-*/rl.jsonl"))
        small = root / "rl8.jsonl"
        if build:
            small.write_text("".join(rl.read_text().splitlines(keepends=True)[:8]))
    return {"sft": root / "sft", "rl": rl, "rl8": small, "cache": cache,
            "eval": next(Path(cache).glob("synthetic-sft-*/eval.jsonl"))}


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory nobody may create files in: mode 0500 for a normal user; for root (who ignores modes) sysfs."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        return d
    return Path("/sys/evolm-unwritable")


class SmallDisk:
    """Real filesystems that run out of space: tmpfs mounts of a given size, so a write past it fails with the
    kernel's own ENOSPC (what a full disk gives; RLIMIT_FSIZE would give EFBIG instead, and a mocked write proves
    nothing about the libraries underneath). Mounting needs root (CAP_SYS_ADMIN): without it the test is skipped."""

    def __init__(self, root: Path):
        self.root = root
        self.mounted: list[Path] = []

    def mount(self, size: str, name: str = "disk") -> Path:
        point = self.root / name
        point.mkdir(parents=True)
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(point)],
                                  capture_output=True, text=True, timeout=30)
        except OSError as exc:
            pytest.skip(f"no mount(8) here ({exc})")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
        self.mounted.append(point)
        return point

    def grow(self, point: Path, size: str) -> None:
        """Make room (as freeing disk space would), keeping what is there."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True, capture_output=True,
                       timeout=30)

    def unmount_all(self) -> None:
        for point in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "mnt")
    yield disk
    disk.unmount_all()


def refused_in_process(capsys, command: str, overrides: list[str], key: str) -> str:
    """``evolm <command> <overrides>`` called in this process (the real CLI entry, without a new interpreter's
    imports: for the many one-line refusals that come before anything is built) must exit 2 with exactly one line,
    ``error: <key>: ...``, and leave no process group behind. Returns that line."""
    import torch.distributed as dist

    from evolm_nemo.cli import main

    capsys.readouterr()
    code = main([command, *overrides])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}:"), (code, lines)
    assert not dist.is_initialized(), "refused after the process group was set up: test it in a process"
    return lines[0]


def one_line_error(proc, key: str) -> str:
    """A command that failed the project's way: exit 2 and exactly one line on stderr, ``error: <key>: ...``,
    no traceback. Returns that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}:"), \
        (proc.returncode, proc.stderr[-4000:])
    return lines[0]
