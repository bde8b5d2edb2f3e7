"""Issue 10 items 10/11 for `evolm score`: undecodable or hostile input and an unwritable output are one line before
any scoring; rows with other than 16 completions are scored with one line saying what n is."""

from __future__ import annotations

import json

import pytest

from evolm_nemo import cli
from tests.conftest import one_line_error, run_evolm, unwritable_dir


def _row(n: int = 16, **extra) -> dict:
    return {"suite": "gsm8k_platinum", "id": 1, "problem": "2+2?", "gt_solution": "#### 4", "gt_answer": None,
            "completions": ["so \\boxed{4}"] * n, **extra}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_non_utf8_input(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(json.dumps(_row()).encode() + b"\n" + json.dumps(_row()).replace("2+2", "\xe9").encode("latin-1")
                    + b"\n")
    assert cli.main(["score", f"input={inp}", f"output={tmp_path / 'out.jsonl'}"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {inp}:2: not UTF-8 text (byte 0xe9") and "re-encode" in line
    assert not (tmp_path / "out.jsonl").exists()


def test_deeply_nested_json(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"suite": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    assert cli.main(["score", f"input={inp}"]) == 2
    assert _one_line(capsys) == f"error: {inp}:1: JSON nested too deeply to read"


def test_lone_surrogate(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = _row(completions=["\\boxed{4} \U0001F600"] * 16)  # a surrogate pair as escapes is fine
    bad = _row()
    bad["completions"] = ["\\boxed{4} \ud800"] * 16
    inp.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    assert "\\ud83d\\ude00" in inp.read_text() and "\\ud800" in inp.read_text()
    assert cli.main(["score", f"input={inp}", f"output={out}"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {inp}:2: contains a lone surrogate (\\ud800)"), line
    assert not out.exists()


def test_unwritable_output_is_refused_before_scoring(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(_row()) + "\n", encoding="utf-8")
    out = unwritable_dir(tmp_path) / "sub" / "scored.jsonl"
    assert cli.main(["score", f"input={inp}", f"output={out}"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: output: cannot write {out}: ") and "not writable" in line, line
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["score", f"input={inp}", f"output={a_file / 'scored.jsonl'}"]) == 2
    assert "is a file, not a directory" in _one_line(capsys)


@pytest.mark.parametrize("counts, note", [
    ([16, 16], None),
    ([8, 8], "note: n=8 completions per row (not 16): maj16 / rm16 / pass16 are Maj@8 / RM@8 / Pass@8 here"),
    ([16, 4], "note: completions per row vary from n=4 to n=16 (1 of 2 rows have other than 16)"),
])
def test_completions_per_row_other_than_16_are_named(tmp_path, counts, note):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(_row(n, id=i)) + "\n" for i, n in enumerate(counts)), encoding="utf-8")
    proc = run_evolm("score", [f"input={inp}", f"output={out}"])
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(note), proc.stderr
    assert len(out.read_text().splitlines()) == len(counts)


def test_output_is_never_the_input(tmp_path, capsys):
    """Issue 19 item 3: no output of a command may be one of its inputs -- `score output=<its input>` would replace
    the completions with the scored rows. One line; the input's bytes unchanged."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(_row()) + "\n", encoding="utf-8")
    before = inp.read_bytes()
    assert cli.main(["score", f"input={inp}", f"output={inp}"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: output: {inp} is the input {inp}, which this command reads"), line
    assert inp.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_non_finite_scores_are_one_line_and_nothing_is_written(tmp_path):
    """Python's JSON reads NaN / Infinity; `evolm score` used to write them into its output and then fail on its
    summary. They are refused with the row and field, before anything is written."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [_row(4, id=0, rm_scores=[0.1, 0.2, 0.3, 0.4]), _row(4, id=1, rm_scores=[float("nan"), 1.0, 2.0, 3.0])]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert "NaN" in inp.read_text()
    proc = run_evolm("score", [f"input={inp}", f"output={out}", "progress=false"], check=False)
    line = one_line_error(proc, f"{inp}:2")
    assert "field 'rm_scores': holds NaN, not a finite number" in line, line
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))
    inp.write_text(json.dumps(_row(4, id=0, rm_scores=[0.1, float("inf"), 0.3, 0.4])) + "\n", encoding="utf-8")
    assert "holds Infinity" in one_line_error(run_evolm("score", [f"input={inp}", f"output={out}"], check=False),
                                              f"{inp}:1")


def test_the_scored_file_gets_the_umask_mode(tmp_path):
    """Every atomic write (fileio.atomic_path: write_jsonl, write_json, write_text) publishes the mode a plain
    open() would give, not mkstemp's 0600."""
    import os
    import stat

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(_row()) + "\n", encoding="utf-8")
    old = os.umask(0o027)
    try:
        run_evolm("score", [f"input={inp}", f"output={out}", "progress=false"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    out.chmod(0o604)  # an existing file keeps its own mode when it is replaced, as with open(path, "w")
    run_evolm("score", [f"input={inp}", f"output={out}", "progress=false", "overwrite=true"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o604


def test_a_directory_as_input_is_named(tmp_path, capsys):
    """It said the output 'lies inside the input'."""
    (tmp_path / "d").mkdir()
    assert cli.main(["score", f"input={tmp_path / 'd'}", f"output={tmp_path / 'd' / 'x.jsonl'}"]) == 2
    assert _one_line(capsys).startswith(f"error: input: {tmp_path / 'd'} is a directory")
    assert list((tmp_path / "d").iterdir()) == []


def test_a_problem_twice_is_refused(tmp_path, capsys):
    """Two completions files concatenated (or a problem twice in them) were scored as two problems: every metric
    counted it twice. Now the second row is refused, naming both lines; the same id in two suites is two problems."""
    rows = [_row(id=7), {**_row(id=7), "suite": "math", "gt_solution": "\\boxed{4}"}, _row(id=8), _row(id=7)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["score", f"input={path}", "progress=false", "workers=1"]) == 2
    line = _one_line(capsys)
    assert line == f"error: {path}:4: field 'id': 7 again (first at {path}:1); each problem is one row of a suite"
    assert not (tmp_path / "c.scored.jsonl").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGUSR1"])
def test_sigterm_mid_scoring_is_one_line_and_leaves_nothing(tmp_path, sig):
    """SIGTERM's default action killed a command on the spot: its output lock and temporaries stayed behind (a killed
    `evolm report` left a `.dynamics.png.*` no later run removed; a killed `prepare-sft` its pool's semaphores, with
    a two-line warning). Commands without a SIGTERM rule of their own now unwind as on Ctrl-C: one line, exit 143,
    nothing left."""
    import signal
    import subprocess
    import time

    from tests.conftest import evolm_cmd, subprocess_env

    rows = [{**_row(), "id": i, "completions": [f"so \\boxed{{{i % 7 + j}}}" for j in range(16)]} for i in range(4000)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out" / "scored.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.Popen(evolm_cmd("score", [f"input={inp}", f"output={out}", "workers=1", "progress=false"]),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out.parent / f".{out.name}.lock"
    deadline = time.time() + 60
    while not lock.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # reading and scoring (about 6 s in all)
    assert proc.poll() is None, "scoring ended before the signal"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    code = 128 + getattr(signal, sig)
    assert proc.returncode == code and err.strip().splitlines() == [f"stopped by {sig}"], (proc.returncode, err)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no lock, no temporary, no half file


def test_sigterm_passes_wherever_ctrl_c_does():
    """The SIGTERM exception is a KeyboardInterrupt: code that lets Ctrl-C through lets it through (a write cut by it
    is no 'disk full' error; the CRUXEval checker's catch-all re-raises it)."""
    from evolm_nemo.cli import Terminated
    from evolm_nemo.fileio import write_error

    assert isinstance(Terminated(), KeyboardInterrupt)
    assert write_error(Terminated(), "/x/y", reason="No space left on device") is None
    assert write_error(OSError(28, "No space left on device"), "/x/y") is not None
