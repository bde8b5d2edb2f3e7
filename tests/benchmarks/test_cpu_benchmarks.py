"""The CPU benchmark scripts (BENCHMARKS.md) refuse bad arguments in one line (exit 2) before any measuring, never
overwrite what is already there, and a child command's failure is one line with the child's own message."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

BENCH = REPO / "benchmarks"


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("script,args,words", [
    ("probe_overhead.py", ["--max-fraction", "abc"], ["--max-fraction", "null"]),  # was found after two trainings
    ("probe_overhead.py", ["--iters", "0"], ["--iters"]),
    ("rl_throughput.py", ["--shapes", "bogus"], ["--shapes", "tiny, 25m"]),
    ("rl_throughput.py", ["--checkpoint", "/nonexistent/run"], ["--checkpoint", "no complete checkpoint"]),
    ("prepare_throughput.py", ["--mb", "0"], ["--mb"]),
    ("score_throughput.py", ["--workers", "0"], ["--workers"]),
    ("sft_throughput.py", ["--micro", "3", "--rounds", "1"], ["parallel.global_batch_size"]),  # a refused recipe
])
def test_bad_argument_is_one_line(script, args, words):
    proc = bench(script, *args)
    one_line(proc, *words)
    assert proc.stdout == ""


def test_nothing_there_is_overwritten(tmp_path):
    """checksum.py's path is a scratch file it writes 1 GiB into and removes: an existing file was overwritten and
    deleted. score_throughput.py --keep into a directory with an earlier run's files overwrote its input first."""
    mine = tmp_path / "mine.bin"
    mine.write_bytes(b"someone's data")
    one_line(bench("checksum.py", str(mine)), str(mine), "File exists")
    assert mine.read_bytes() == b"someone's data"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "completions.jsonl").write_text("earlier\n")
    one_line(bench("score_throughput.py", "--problems", "2", "--keep", str(keep)), "--keep", "completions.jsonl")
    assert (keep / "completions.jsonl").read_text() == "earlier\n"
    one_line(bench("score_throughput.py", "--problems", "2", "--keep", str(mine)), "--keep", "is a file")


def test_a_failed_child_command_is_one_line_with_its_message(capsys):
    """probe_overhead.py's trainings, rl_throughput.py's exports and PPO runs: a failed one was a CalledProcessError
    traceback that hid the child's stderr."""
    spec = importlib.util.spec_from_file_location("bench_args", BENCH / "_args.py")
    args = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(args)

    def run():
        cmd = [sys.executable, "-c", "import sys; print('[evolm] plan ...', file=sys.stderr); "
                                     "sys.exit('error: train.iters: must be > 0, got 0')"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    assert args.main(run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed (exit 1): error: train.iters: must be > 0, got 0" in err, err
    # a `python -m evolm_nemo.cli train ...` child is named as the command it is, not as the interpreter
    failed = subprocess.CalledProcessError(2, [sys.executable, "-m", "evolm_nemo.cli", "train", "x=1"], stderr="e")
    assert args.child_failed(failed) == "evolm train failed (exit 2): e"
