"""No evaluation command writes into another command's output: `evolm score output=`, `evolm eval downstream|upstream
out=` and `evolm report out=` refuse a checkpoint, a training run's own files, an export or model directory, and
another model's evaluation (that one only without overwrite=true). Each refusal is one line, before any model is
loaded, and leaves every byte as it was."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from evolm_nemo import cli
from tests.conftest import REPO, tree_bytes

DATA = REPO / "tests" / "fixtures" / "eval"


def _row(**extra) -> dict:
    return {"suite": "gsm8k_platinum", "id": 1, "problem": "2+2?", "gt_solution": "#### 4", "gt_answer": "4",
            "completions": ["so \\boxed{4}"] * 16, **extra}


def _refused(capsys, args: list[str], key: str, *fragments: str) -> str:
    capsys.readouterr()
    assert cli.main(args) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def world(tmp_path, a_run):
    """A copy of a training run, completions to score, and an HF model directory (no weights in it to load)."""
    run = tmp_path / "run"
    shutil.copytree(a_run, run)
    comp = tmp_path / "completions.jsonl"
    comp.write_text(json.dumps(_row()) + "\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (model / "model.safetensors").write_bytes(b"")
    (model / "tokenizer.json").write_text("{}")
    return {"run": run, "comp": comp, "model": model, "ckpt": next((run / "checkpoints").glob("iter_*"))}


def test_score_writes_no_other_commands_file(capsys, tmp_path, world):
    """`score output=<a checkpoint's evolm.json>` replaced the checkpoint's commit record (the run could no longer
    resume or export); `output=<run>/metrics.jsonl` the run's metrics. An existing output needs overwrite=true, and
    then is replaced only if it is a scored JSONL."""
    before = tree_bytes(tmp_path)
    score = ["score", f"input={world['comp']}", "progress=false", "workers=1"]
    _refused(capsys, [*score, f"output={world['ckpt'] / 'evolm.json'}", "overwrite=true"], "output",
             "lies inside an evolm checkpoint")
    _refused(capsys, [*score, f"output={world['run'] / 'metrics.jsonl'}", "overwrite=true"], "output",
             "the training run", "own metrics.jsonl")
    _refused(capsys, [*score, f"output={world['model'] / 'scored.jsonl'}"], "output", "lies inside an HF model")
    _refused(capsys, [*score, f"output={world['model'] / 'config.json'}", "overwrite=true"], "output",
             "lies inside an HF model")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "x"}) + "\n")
    before = tree_bytes(tmp_path)
    _refused(capsys, [*score, f"output={other}"], "output", "exists; pick a new file or pass overwrite=true")
    _refused(capsys, [*score, f"output={other}", "overwrite=true"], "output", "is not a scored JSONL")
    assert tree_bytes(tmp_path) == before
    # its own output: refused without overwrite, replaced with it
    out = tmp_path / "scored.jsonl"
    assert cli.main([*score, f"output={out}"]) == 0
    _refused(capsys, [*score, f"output={out}"], "output", "pass overwrite=true")
    assert cli.main([*score, f"output={out}", "overwrite=true"]) == 0
    assert json.loads(out.read_text().splitlines()[0])["correct"] == [True] * 16


def test_eval_out_is_never_another_commands_output(capsys, tmp_path, world):
    """`eval downstream out=` took the model directory itself, a training run's directory or a checkpoint; `evolm
    report out=` the same. Refused before the model is loaded (this model directory has no weights to load)."""
    before = tree_bytes(tmp_path)
    down = ["eval", "downstream", f"model={world['model']}", f"data_dir={DATA}", "tasks=[gsm8k_platinum]", "limit=1",
            "backend=hf"]
    up = ["eval", "upstream", f"model={world['model']}", f"tasks_dir={REPO / 'eval' / 'upstream'}", "tasks=[piqa]"]
    for args in (down, up):
        _refused(capsys, [*args, f"out={world['model']}"], "out", "is an HF model directory")
        _refused(capsys, [*args, f"out={world['run']}"], "out", "is a training run's directory")
        _refused(capsys, [*args, f"out={world['ckpt']}"], "out", "is an evolm checkpoint")
        _refused(capsys, [*args, f"out={world['run'] / 'checkpoints' / 'eval'}"], "out", "lies inside")
    for out in (world["model"], world["run"], world["model"] / "report"):
        _refused(capsys, ["report", f"runs={tmp_path / 'none' / '*.json'}", f"out={out}"], "out")
    assert tree_bytes(tmp_path) == before


def test_another_models_evaluation_is_replaced_only_with_overwrite(capsys, tmp_path, world):
    """An out dir holding model A's result.json (upstream and downstream of one model share it): model B's
    evaluation there is refused without overwrite=true; with it, A's result files are removed first."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"model_dir": "/models/a", "upstream": {"avg": 50.0}}))
    (out / "upstream.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = tree_bytes(out)
    down = ["eval", "downstream", f"model={world['model']}", f"data_dir={DATA}", "tasks=[gsm8k_platinum]", "limit=1",
            "backend=hf", f"out={out}"]
    _refused(capsys, down, "out", "holds the evaluation of /models/a", "overwrite=true")
    assert tree_bytes(out) == before
    # with overwrite, A's result files go (before the model is loaded), B's evaluation takes their place
    from tests.evaluation._tiny import make_lm

    model_b = tmp_path / "b"
    make_lm(model_b)
    # as `evolm export-hf` leaves it: the result names the export it evaluated (`evolm suite launch` compares it
    # with the export there later, rather than file times)
    (model_b / "evolm_export.json").write_text(json.dumps({"run_id": "20260101-000000-000000", "iteration": 7}))
    down = [a if not a.startswith("model=") else f"model={model_b}" for a in down]
    assert cli.main([*down, "overwrite=true", "n=2", "max_new_tokens=4", "workers=1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["completions.jsonl", "notes.txt", "result.json", "scored.jsonl"]
    result = json.loads((out / "result.json").read_text())
    assert result["model_dir"] == str(model_b.resolve()) and "upstream" not in result
    digest = hashlib.sha256((model_b / "evolm_export.json").read_bytes()).hexdigest()
    assert result["downstream"]["export"] == {"run_id": "20260101-000000-000000", "iteration": 7, "sha256": digest}
    from evolm_nemo.evaluation import report

    assert report.read_result(out / "result.json") == result  # the schema's check takes it


def test_an_output_another_command_is_writing_is_refused(capsys, tmp_path, world):
    """Two `evolm score` into one output, two evaluations (any models, any modes) or two reports into one out, both
    ran to the end and the later one's files replaced or mixed with the earlier one's. Now the output is locked while
    a command writes it: a second one is refused in one line naming the holder's pid, before any model or data
    loads; once the holder ends, the same command runs."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    out, scored = tmp_path / "eval", tmp_path / "scored.jsonl"
    hold = ("import sys, time\nfrom evolm_nemo.fileio import lock_output\nfor p in sys.argv[1:]: lock_output(p, 'x')\n"
            "print('held', flush=True)\ntime.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out), str(scored)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        pid = f"pid {holder.pid}"
        score = ["score", f"input={world['comp']}", f"output={scored}", "progress=false", "workers=1"]
        _refused(capsys, score, "output", "is being written by another command", pid)
        _refused(capsys, ["eval", "downstream", f"model={world['model']}", f"data_dir={DATA}",
                          "tasks=[gsm8k_platinum]", "limit=1", "backend=hf", f"out={out}"], "out",
                 "is being written by another command", pid)
        _refused(capsys, ["eval", "upstream", f"model={world['model']}", f"tasks_dir={REPO / 'eval' / 'upstream'}",
                          "tasks=[piqa]", f"out={out}"], "out", "is being written by another command", pid)
        _refused(capsys, ["report", f"runs={tmp_path / 'none' / '*.json'}", f"out={out}"], "out",
                 "is being written by another command", pid)
        _refused(capsys, ["report", "suite=tiny", f"root={tmp_path / 'suite'}", f"out={out}"], "out",
                 "is being written by another command", pid)
        assert not scored.exists() and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(score) == 0 and scored.is_file()


def test_a_model_directory_without_a_tokenizer_is_one_line(capsys, tmp_path, world):
    """It was a transformers traceback after the tasks were read."""
    (world["model"] / "tokenizer.json").unlink()
    _refused(capsys, ["eval", "downstream", f"model={world['model']}", f"data_dir={DATA}", "tasks=[gsm8k_platinum]",
                      f"out={tmp_path / 'eval'}"], "model", "has no tokenizer")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("mode", ["downstream", "upstream"])
def test_a_training_run_or_checkpoint_as_the_model_names_the_export(capsys, tmp_path, world, mode):
    """A run directory or a megatron checkpoint given as model= (the weights a user has after `evolm train`) was "is
    not an HF model directory (no config.json)", saying neither what it is nor how to evaluate it."""
    for model in (world["run"], world["ckpt"]):
        _refused(capsys, ["eval", mode, f"model={model}", f"data_dir={DATA}", f"out={tmp_path / 'eval'}"], "model",
                 "not an HF model directory", f"export it first: evolm export-hf src={model} dst=<dir>")
    _refused(capsys, ["eval", mode, f"model={tmp_path / 'nope'}", f"out={tmp_path / 'eval'}"], "model",
             "is not an HF model directory (no such directory)")
    assert not (tmp_path / "eval").exists()


def test_a_refused_upstream_overwrite_keeps_the_other_models_results(capsys, tmp_path, world):
    """overwrite=true removes another model's results only once every setting and the data passed their checks: a
    bad limit (checked by the harness's own check) used to come after the removal."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"model_dir": "/models/a", "downstream": {"id_avg": 1.0}}))
    (out / "scored.jsonl").write_text("{}\n")
    before = tree_bytes(out)
    _refused(capsys, ["eval", "upstream", f"model={world['model']}", f"tasks_dir={REPO / 'eval' / 'upstream'}",
                      f"data_dir={REPO / 'eval' / 'upstream' / 'sample'}", "tasks=[piqa]", "limit=0", f"out={out}",
                      "overwrite=true"], "limit")
    assert tree_bytes(out) == before


def test_the_run_files_the_rule_knows_are_the_ones_runs_write():
    """fileio.RUN_OWNED names what a training run writes into its directory (fileio sits below the modules that
    write them): each of their constants must be among its names."""
    from evolm_nemo.checkpoint.io import META
    from evolm_nemo.fileio import META_FILE, RUN_OWNED
    from evolm_nemo.stages.dpo import REFERENCE_FILE
    from evolm_nemo.stages.rl import CRITIC, MAIN
    from evolm_nemo.stages.rm import VAL_SCORES
    from evolm_nemo.train.tracking import TRACKING_FILE

    assert META == META_FILE
    for name in (REFERENCE_FILE, VAL_SCORES, TRACKING_FILE, MAIN, CRITIC, "metrics.jsonl", "run.json", "tensorboard",
                 "rollouts.jsonl", "rollouts.dp1.jsonl"):
        assert RUN_OWNED.fullmatch(name), name
