"""Issue 10 item 10: a run killed in the middle of writing a metrics record leaves a torn last line in metrics.jsonl;
the resume used to die on it with a JSONDecodeError traceback. Now the torn line is dropped and said, and the run
continues."""

from __future__ import annotations

import json

from evolm_nemo.train.metrics import MetricsWriter
from tests.conftest import losses, run_evolm, tiny, train_then_sigkill


def test_metrics_writer_drops_a_torn_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"iteration": i, "loss": 1.0 / i}) for i in (1, 2, 3)]
    path.write_text("\n".join(rows) + '\n{"iteration": 4, "loss": 0.2', encoding="utf-8")  # torn, no newline
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, truncate_after=2)
    writer.write({"iteration": 3, "loss": 0.3})
    writer.file.close()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"[evolm] {path}: dropped 1 unreadable line 4 (a record torn by an interrupted write)"]


def test_metrics_writer_writes_undefined_values_as_null(tmp_path):
    """A value that is not a finite number (a one-class AUC) was written as a bare NaN (not JSON): now null."""
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.write({"iteration": 1, "loss": 0.5, "val_auc": float("nan"), "up": float("inf"),
                  "deep": {"x": [-float("inf"), 1.0]}})
    writer.close()

    def refuse(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"iteration": 1, "loss": 0.5, "val_auc": None, "up": None, "deep": {"x": [None, 1.0]}}]


def test_resume_over_a_torn_metrics_line(tmp_path, data_cache):
    out = tmp_path / "run"
    args = tiny(out, data_cache, "train.iters=6", "train.save_interval=2")
    killed_at = train_then_sigkill(args, out, at_least=2)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"iteration": 99, "loss": 0.12')  # what a kill in the middle of a write leaves
    proc = run_evolm("train", args)
    assert "Traceback" not in proc.stderr
    assert "metrics.jsonl: dropped 1 unreadable line" in proc.stderr
    assert f"resuming at iteration {killed_at}" in proc.stdout
    assert sorted(losses(out)) == list(range(1, 7))
