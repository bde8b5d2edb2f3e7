"""Odd input to the suite tools is one line, never a traceback or lost work: suite YAML of the wrong types, Slurm
times YAML reads as numbers, odd result.json / metrics.jsonl contents, a dry run aimed at another output, two
launchers of one root, a failing squeue, a signal to a node before its command has started; and the file helpers
under them (directory swap, refused writes, torn metric rows)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evolm_nemo import fileio
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.suite import launch, report, spec
from evolm_nemo.suite.plan import build as build_plan
from tests.conftest import REPO, subprocess_env

BASE = """name: s
gpus_per_node: 1
nodes:
  a: {experiment: demo}
  x: {kind: export, parent: a}
  e: {kind: eval, parent: x}
  e2: {kind: eval, parent: x}
"""


def _load(tmp_path, text: str, options=None):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return spec.load(str(path), options)


@pytest.mark.parametrize("extra, key", [
    ("  d: {kind: data, make: [demo_eval], parent: a}\n", "nodes.d.make"),
    ("  report: {experiment: demo}\n", "nodes.report"),
    ("  logs: {experiment: demo}\n", "nodes.logs"),
    ("  t: {experiment: demo, time: 1:00:00}\n", "nodes.t.time"),
])
def test_bad_nodes_are_named(tmp_path, extra, key):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, BASE + extra)
    assert err.value.key == key, err.value.message


@pytest.mark.parametrize("head, key", [
    ("slurm: [a]\n", "slurm"),
    ("local: 5\n", "local"),
    ("slurm: {time: 1:00:00}\n", "slurm.time"),       # YAML 1.1 reads it as 3600 (seconds): Slurm would say minutes
    ("slurm: {time: 60}\n", "slurm.time"),
    ("slurm: {master_port: x}\n", "slurm.master_port"),
    ("slurm: {signal_seconds: abc}\n", "slurm.signal_seconds"),
    ("slurm: {exclusive: maybe}\n", "slurm.exclusive"),
    ("slurm: {container_workdir: 5}\n", "slurm.container_workdir"),
    ("slurm: {account: [a]}\n", "slurm.account"),
    ("report: {upstream: [{row: r, eval: [e]}]}\n", "report.upstream[0].eval"),
    ("report: {upstream: [{row: r, eval: e, published: abc}]}\n", "report.upstream[0].published"),
    ("report: {downstream: [{row: r, sft: e, rl: e2, published: [1, 2]}]}\n", "report.downstream[0].published"),
    ("report: {downstream: [{row: r, sft: e, rl: e2, published: {greedy_id: 5}}]}\n",
     "report.downstream[0].published"),
    ("report: {upstream_tasks: [{row: r, eval: e, published: [1]}]}\n", "report.upstream_tasks[0].published"),
    ("report: {takeaways: [{claim: cpt_bridge, with_cpt: {a: 1}, without_cpt: e}]}\n",
     "report.takeaways[0].with_cpt"),
    ("report: {takeaways: [{claim: sft_scaling, steps: [[[e]], e2]}]}\n", "report.takeaways[0].steps"),
])
def test_bad_suite_sections_are_named(tmp_path, head, key):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, head + BASE)
    assert err.value.key == key, err.value.message


def test_slurm_times_stay_text(tmp_path):
    suite = _load(tmp_path, 'slurm: {time: "1:00:00"}\n' + BASE.replace("{experiment: demo}",
                                                                         '{experiment: demo, time: "2-00:00:00"}'))
    assert suite.slurm["time"] == "1:00:00" and suite.nodes["a"].time == "2-00:00:00"
    opts = spec.parse_overrides(["slurm.time=1:00:00", "mfu=0.5"], {"slurm": "section", "mfu": None})
    assert opts == {"slurm.time": "1:00:00", "mfu": 0.5}  # the command line's H:MM:SS is text too
    assert _load(tmp_path, BASE, opts).slurm["time"] == "1:00:00"


def test_a_suite_file_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: s\nnodes: \xff\xfe\n")
    with pytest.raises(ConfigError) as err:
        spec.load(str(path))
    assert err.value.key == str(path) and "not UTF-8" in err.value.message


def test_odd_results_read_as_missing(tmp_path):
    """A result.json whose values are text, lists or NaN: the eval node is not done, the report's cells read "-",
    a claim over them is "not measured"; nothing crashes."""
    text = ("report:\n  upstream: [{row: r, eval: e, published: 50.0}]\n"
            "  downstream: [{row: r, sft: e, rl: e2}]\n"
            "  takeaways: [{claim: cpt_bridge, with_cpt: e, without_cpt: e2}]\n" + BASE)
    root = tmp_path / "runs"
    suite = _load(tmp_path, text, {"root": str(root)})
    plan = build_plan(suite, suite.order)
    row = plan.row("e")
    for content in ('"see the log"', '["downstream"]', "5", '{"downstream": "x"}'):
        (root / "e").mkdir(parents=True, exist_ok=True)
        (root / "e" / "result.json").write_text(content)
        assert launch.node_state(suite, row)[0] == "new", content
    (root / "e" / "result.json").write_text(json.dumps({
        "upstream": {"avg": "n/a"}, "downstream": {"scoring": ["x"], "id_avg": {"pass1": float("nan")},
                                                   "ood_avg": "x"}}))
    (root / "e2").mkdir(parents=True)
    (root / "e2" / "result.json").write_text(json.dumps({"downstream": {"id_avg": {"pass1": "abc"}}}))
    t = report.build(suite)
    md = "\n".join(t.md)
    assert "| r | - | 50.00 | - |" in md
    assert t.claims[0].verdict == "not measured"
    out = report.write(suite, tmp_path / "report")
    assert not (out / "takeaways.png").exists()  # no numbers, no figure (and none left from before)


def test_a_dry_run_never_replaces_another_output(tmp_path):
    """The sbatch scripts replace their `out=` as a whole: only an earlier dry run's scripts, never a run."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    before = fileio.output_kind(run)
    proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", "launch", "suite=tiny", "executor=slurm",
                           "dry_run=true", f"root={tmp_path / 'root'}", f"out={run}"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: out: ") and "training run" in proc.stderr
    assert "Traceback" not in proc.stderr and fileio.output_kind(run) == before == "run"
    assert (run / "run.json").read_text() == "{}"


def test_one_launcher_per_root_and_squeue_failures_are_one_line(tmp_path):
    root = tmp_path / "root"
    held = root / ".launch.lock"
    assert fileio.lock_file(held) is None  # this process plays the first launcher
    try:
        proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", "launch", "suite=tiny",
                               "executor=local", f"root={root}"], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
    finally:
        fileio.unlock(held)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: root: {root.resolve()} is being launched by another `evolm suite launch` "
                                   f"(pid {os.getpid()}); wait for it to end, or stop it (it passes SIGTERM on to its "
                                   "node)")
    assert not (root / "logs").exists()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text("#!/bin/bash\necho 1\n")
    (bindir / "squeue").write_text("#!/bin/bash\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    for p in bindir.iterdir():
        p.chmod(0o755)
    env = dict(subprocess_env(), PATH=f"{bindir}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", "launch", "suite=tiny", "executor=slurm",
                           f"root={root}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: executor: slurm: squeue failed (slurm_load_jobs error: Socket timed out); cannot tell which nodes "
        "are already queued, so nothing was submitted; retry when squeue answers"), proc.stderr


def test_a_signal_before_the_node_starts_is_passed_on(tmp_path):
    """The wrapper writes its pid file (whole) before it starts the node's command, and a SIGTERM sent as soon as
    the file appears reaches the command. (The window between the file and the command's start, where the signal is
    held and sent once the command runs, is too short to hit on purpose: this checks the signal is never lost.)"""
    log, rc = tmp_path / "n.log", tmp_path / "n.rc"
    child = "import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-m", "evolm_nemo.suite.node", str(log), str(rc), "--", sys.executable,
                             "-c", child], cwd=REPO, env=subprocess_env())
    pid_file = Path(f"{rc}.pid")
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.002)
    assert int(pid_file.read_text()) == proc.pid
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) != 0  # the command was terminated, not left to sleep for a minute
    assert int(rc.read_text()) == -signal.SIGTERM and not pid_file.exists()


def test_replace_dir_swaps_whole_directories(tmp_path, monkeypatch):
    for exchange in (True, False):  # renameat2's swap, and the move-aside fallback
        if not exchange:
            monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
        dst = tmp_path / f"dst{exchange}"
        dst.mkdir()
        (dst / "old").write_text("old")
        (tmp_path / f".{dst.name}.old-{os.getpid()}").mkdir()  # a leftover of an earlier scheme: not in the way
        new = tmp_path / f"new{exchange}"
        new.mkdir()
        (new / "new").write_text("new")
        fileio.replace_dir(new, dst)
        assert sorted(os.listdir(dst)) == ["new"] and not new.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}.old-") and
                    p.name != f".{dst.name}.old-{os.getpid()}"]


def test_refused_writes_and_torn_rows(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for target in (tmp_path / "afile" / "plan.md", tmp_path / "adir"):
        with pytest.raises(ConfigError) as err:
            fileio.write_text(target, "text")
        assert err.value.key == str(target) and "cannot write" in err.value.message
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 1}\n{"iteration": null}\n{"iteration": "2"}\n{"iteration": 3}\n')
    fileio.drop_rows_after(metrics, 2)
    assert metrics.read_text() == '{"iteration": 1}\n'
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text('{"format": ["x"]}')
    assert fileio.output_kind(tmp_path / "m") == "other"
