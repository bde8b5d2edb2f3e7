"""lm-eval 0-shot on the local task copies (eval/upstream) against a tiny model, offline, checked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evolm_nemo import cli
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation import upstream
from evolm_nemo.tasks import UPSTREAM
from tests.conftest import REPO, run_evolm
from tests.evaluation._tiny import DAMAGES, damaged_copy, make_lm, one_thread

threads = pytest.fixture(scope="module", autouse=True)(one_thread)
TASKS_DIR = REPO / "eval" / "upstream"
SAMPLE = TASKS_DIR / "sample"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("myllama-1B-20BT")
    model, tok = make_lm(path)
    return path, model, tok


def _loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context), split the way lm-eval does (encode the whole, cut at the context)."""
    import torch

    whole = tok(context + continuation).input_ids
    n_ctx = len(tok(context).input_ids)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def _expected(model, tok, task: str) -> tuple[float, float | None]:
    """acc / acc_norm computed directly with transformers from the sample rows."""
    rows = [json.loads(x) for x in (SAMPLE / f"{task}.jsonl").read_text().splitlines()]
    acc = norm = 0
    for r in rows:
        if task == "piqa":
            ctx, choices, gold = f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"]
        elif task == "openbookqa":
            ctx, choices = r["question_stem"], r["choices"]["text"]
            gold = r["choices"]["label"].index(r["answerKey"])
        elif task == "arc_easy":
            ctx, choices = f"Question: {r['question']}\nAnswer:", r["choices"]["text"]
            gold = r["choices"]["label"].index(r["answerKey"])
        if task == "winogrande":  # the option fills the blank in the context; the rest is the shared continuation
            cut = r["sentence"].index("_")
            rest = " " + r["sentence"][cut + 1:].strip()
            lls = [_loglik(model, tok, r["sentence"][:cut] + o, rest) for o in (r["option1"], r["option2"])]
            acc += int(max(range(2), key=lls.__getitem__) == int(r["answer"]) - 1)
            continue
        lls = [_loglik(model, tok, ctx, " " + c) for c in choices]
        per_char = [ll / len(c) for ll, c in zip(lls, choices)]  # lm-eval's acc_norm: per character of the choice
        acc += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        norm += int(max(range(len(lls)), key=per_char.__getitem__) == gold)
    n = len(rows)
    return round(100 * acc / n, 2), (None if task == "winogrande" else round(100 * norm / n, 2))


def test_local_tasks_offline_match_direct_computation(lm, tmp_path, capsys, monkeypatch):
    import os

    path, model, tok = lm
    out = tmp_path / "out"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # data_dir alone reads eval/upstream's task YAMLs (the probes' rule; it went to the hub for lm-eval's own)
    assert cli.main(["eval", "upstream", f"model={path}", f"data_dir={SAMPLE}", "batch_size=4", f"out={out}"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ  # offline only while lm-eval ran
    stdout = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert (result["model"], result["size"], result["pretrain_tokens"], result["stage"]) == \
        (path.name, "1B", 20 * 10**9, "pretrain")  # parsed from the dir name
    up = result["upstream"]
    assert set(up["tasks"]) == set(UPSTREAM) and up["source"] == "local"
    assert up["export"] is None  # no evolm_export.json beside the model: not an evolm export
    assert all(up["tasks"][t]["n"] == 3 for t in UPSTREAM)
    for task in ("piqa", "openbookqa", "arc_easy", "winogrande"):
        acc, norm = _expected(model, tok, task)
        assert (up["tasks"][task]["acc"], up["tasks"][task]["acc_norm"]) == (acc, norm), task
        assert up["tasks"][task]["score"] == (acc if norm is None else norm)
    assert math.isclose(up["avg"], sum(up["tasks"][t]["score"] for t in UPSTREAM) / 6, abs_tol=0.01)
    assert "evolm_hellaswag" in json.loads((out / "upstream.json").read_text())["results"]
    assert "avg" in stdout and "arc_challenge" in stdout


BUILTIN = {"hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
           "winogrande": ("winogrande/default.yaml", "validation"),
           "piqa": ("piqa/piqa.yaml", "validation"), "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
           "arc_easy": ("arc/arc_easy.yaml", "test"), "arc_challenge": ("arc/arc_challenge.yaml", "test")}


def test_local_tasks_render_like_lm_eval_builtins(tmp_path, monkeypatch):
    """Our YAMLs give the same prompt, choices and gold as lm-eval's own tasks pointed at the same local rows."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    builtin_dir = Path(lm_eval.__file__).parent / "tasks"
    upstream.render(str(TASKS_DIR), str(SAMPLE), str(tmp_path))
    for task, (yaml, split) in BUILTIN.items():
        (tmp_path / f"ref_{task}.yaml").write_text(
            f"include: {builtin_dir / yaml}\ntask: ref_{task}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {SAMPLE / task}.jsonl\ntraining_split: null\n"
            f"validation_split: {split if split == 'validation' else 'null'}\n"
            f"test_split: {split if split == 'test' else 'null'}\n")
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(
        [f"{p}_{t}" for t in BUILTIN for p in ("evolm", "ref")])["tasks"]
    for task in BUILTIN:
        ours, ref = loaded[f"evolm_{task}"], loaded[f"ref_{task}"]
        assert ours.OUTPUT_TYPE == ref.OUTPUT_TYPE == "multiple_choice"
        docs = list(zip(ours.eval_docs, ref.eval_docs))
        assert len(docs) == 3
        for a, b in docs:
            assert (ours.doc_to_text(a), ours.doc_to_choice(a), ours.doc_to_target(a)) == \
                (ref.doc_to_text(b), ref.doc_to_choice(b), ref.doc_to_target(b)), task


def test_missing_local_data_fails_before_loading(lm, tmp_path):
    path = str(lm[0])
    (tmp_path / "piqa.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError) as e:
        upstream.run(path, ["piqa", "arc_easy"], tasks_dir=str(TASKS_DIR), data_dir=str(tmp_path))
    assert e.value.key == "data_dir" and "arc_easy.jsonl" in e.value.message
    with pytest.raises(ConfigError) as e:
        upstream.run(path, ["piqa"], tasks_dir=str(TASKS_DIR))
    assert e.value.key == "data_dir"
    with pytest.raises(ConfigError) as e:
        upstream.run(path, ["mmlu"], tasks_dir=str(TASKS_DIR), data_dir=str(SAMPLE))
    assert e.value.key == "tasks"
    with pytest.raises(ConfigError) as e:
        upstream.run(str(tmp_path), ["piqa"])
    assert e.value.key == "model"


def test_cli_errors_are_one_line(lm, tmp_path):
    proc = run_evolm("eval", ["upstream", f"model={lm[0]}", "tasks=[piqa,mmlu]"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: tasks: unknown task 'mmlu'; choose from hellaswag, winogrande, piqa, openbookqa, arc_easy, "
        "arc_challenge"]
    proc = run_evolm("eval", ["sideways", f"model={lm[0]}"], check=False)
    assert proc.returncode == 2 and "unknown mode 'sideways'" in proc.stderr


def test_builtin_tasks_without_hub_access_say_how_to_run_offline(lm, tmp_path):
    """lm-eval's built-in tasks fetch their data from the hub: with no hub (offline, empty cache) the command ends
    in one line naming the offline way (tasks_dir= / data_dir=), not a ConnectionError traceback; nothing written."""
    import subprocess

    from tests.conftest import evolm_cmd, subprocess_env

    env = dict(subprocess_env(), HF_HOME=str(tmp_path / "empty_hf_home"))
    out = tmp_path / "up"
    proc = subprocess.run(evolm_cmd("eval", ["upstream", f"model={lm[0]}", "tasks=[hellaswag]", "limit=2",
                                             f"out={out}"]), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error", "Traceback"))]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("error: tasks: cannot fetch lm-eval's task data from the HF hub")
    assert "tasks_dir=" in errors[0] and "data_dir=" in errors[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("override,key", [
    ("limit=0", "limit"), ("limit=-1", "limit"), ("dtype=fp33", "dtype"), ("device=foo", "device"),
    ("device=cpu:0", "device"), ("device=cuda:99", "device"),
    pytest.param("device=cuda", "device", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="refused only where there is no CUDA")),
])
def test_bad_settings_are_one_line_before_lm_eval(lm, tmp_path, capsys, override, key):
    """limit / dtype / device that lm-eval would fail on after loading the data and the model (limit=0: "did not
    find any docs", dtype=fp33: AttributeError, device=cuda without CUDA: AssertionError) or silently ignore
    (device=foo) are refused up front; nothing written."""
    from tests.conftest import refused_in_process

    out = tmp_path / "up"
    refused_in_process(capsys, "eval", ["upstream", f"model={lm[0]}", f"tasks_dir={TASKS_DIR}", f"data_dir={SAMPLE}",
                                        "tasks=[piqa]", f"out={out}", override], key)
    assert not out.exists()


@pytest.mark.parametrize("damage,line,message", [
    ("truncated", 2, "not valid JSON"),
    ("empty", None, "has no rows"),
    ("blank", None, "has no rows"),
    ("missing_field", 2, "field 'sol2': missing"),
    ("null_field", 1, "field 'label': missing"),
    ("not_an_object", 1, "expected a JSON object, got list"),
    ("label_out_of_range", 2, "field 'label': 5, expected 0 (sol1) or 1 (sol2)"),
])
def test_damaged_local_data_is_one_line_naming_the_file(lm, tmp_path, capsys, damage, line, message):
    """A <task>.jsonl that is cut short, empty, not JSON objects or whose rows lack a field the task's YAML reads (was:
    DatasetGenerationError / StopIteration / a jinja error out of lm-eval) or whose gold label is none of the choices
    (was: lm-eval scored the row wrong with a warning) is refused naming the file (and line)."""
    from tests.conftest import refused_in_process

    good = (SAMPLE / "piqa.jsonl").read_text().splitlines()
    rows = {"truncated": good[0] + "\n" + good[1][:20], "empty": "", "blank": "\n\n",
            "missing_field": good[0] + "\n" + json.dumps({"goal": "g", "sol1": "a", "label": 0}) + "\n",
            "null_field": json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": None}) + "\n",
            "not_an_object": "[1, 2]\n",
            "label_out_of_range": good[0] + "\n" + json.dumps({"goal": "g", "sol1": "a", "sol2": "b",
                                                                "label": 5})}[damage]
    data = tmp_path / "data"
    data.mkdir()
    (data / "piqa.jsonl").write_text(rows)
    (data / "arc_easy.jsonl").write_text((SAMPLE / "arc_easy.jsonl").read_text())
    out = tmp_path / "up"
    key = f"{data / 'piqa.jsonl'}:{line}" if line else "data_dir"
    err = refused_in_process(capsys, "eval", ["upstream", f"model={lm[0]}", f"tasks_dir={TASKS_DIR}",
                                              f"data_dir={data}", "tasks=[arc_easy,piqa]", f"out={out}"], key)
    assert message in err and "piqa.jsonl" in err and not out.exists()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_model_directory_is_one_line_before_lm_eval(lm, tmp_path, capsys, damage):
    """The damages `eval downstream` refuses (tests/evaluation/test_sampling.py) were tracebacks out of lm-eval's
    model load here too: one line naming the file or field, before the harness runs; nothing written."""
    from tests.conftest import refused_in_process

    model = damaged_copy(lm[0], tmp_path / "model", damage)
    out = tmp_path / "up"
    err = refused_in_process(capsys, "eval", ["upstream", f"model={model}", f"tasks_dir={TASKS_DIR}",
                                              f"data_dir={SAMPLE}", "tasks=[piqa]", "limit=4", f"out={out}"], "model")
    assert DAMAGES[damage] in err and "weights_only` set to False" not in err, err
    assert not out.exists() and not (tmp_path / "model.unsafe").exists()


BAD_GOLD = {  # task: (how a sample row is damaged, what the one line says)
    "hellaswag": (lambda r: r.update(label="4"), "field 'label': \"4\", expected the index of one of its 4 endings"),
    "winogrande": (lambda r: r.update(sentence=r["sentence"].replace("_", "it")), "field 'sentence': has no blank"),
    "winogrande:answer": (lambda r: r.update(answer="3"), "field 'answer': \"3\", expected \"1\""),
    "winogrande:superscript": (lambda r: r.update(answer="\u00b2"), "field 'answer': \"\\u00b2\", expected"),
    "piqa": (lambda r: r.update(label=True), "field 'label': true, expected 0 (sol1) or 1 (sol2)"),
    "openbookqa": (lambda r: r.update(answerKey="E"), "field 'answerKey': \"E\" is none of the choices' labels"),
    "arc_easy": (lambda r: r.update(answerKey="Z"), "field 'answerKey': \"Z\" is none of the choices' labels"),
    # arc_*.yaml look the key up as it is (openbookqa.yaml strips it): " A" fails inside lm-eval
    "arc_easy:leading_space": (lambda r: r.update(answerKey=" " + r["answerKey"]), "is none of the choices' labels"),
    "hellaswag:superscript": (lambda r: r.update(label="\u00b2"), "field 'label': \"\\u00b2\", expected the index"),
    "arc_challenge": (lambda r: r["choices"]["text"].pop(), "field 'choices': expected {text: [...], label: [...]}"),
}


@pytest.mark.parametrize("case", list(BAD_GOLD))
def test_a_gold_label_outside_the_choices_is_one_line(tmp_path, case):
    """A row whose gold answer the task's YAML cannot place among its choices: an ARC answerKey that is no label or a
    Winogrande sentence without its blank was a traceback out of lm-eval's template after the model loaded, a PIQA
    or HellaSwag label past the choices a row lm-eval scored wrong with only a warning. Refused naming file:line."""
    task = case.split(":")[0]
    damage, message = BAD_GOLD[case]
    rows = [json.loads(x) for x in (SAMPLE / f"{task}.jsonl").read_text().splitlines()]
    damage(rows[1])
    (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as err:
        upstream.check_tasks([task], None, str(tmp_path))
    assert err.value.key == f"{tmp_path / f'{task}.jsonl'}:2" and message in str(err.value), str(err.value)


def test_openbookqa_alone_strips_the_answer_key(tmp_path):
    """openbookqa.yaml reads ``answerKey.lstrip()``: a key with a leading space is its label there, and only there."""
    rows = [json.loads(x) for x in (SAMPLE / "openbookqa.jsonl").read_text().splitlines()]
    rows[1]["answerKey"] = " " + rows[1]["answerKey"]
    (tmp_path / "openbookqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    upstream.check_tasks(["openbookqa"], None, str(tmp_path))


@pytest.mark.parametrize("text, message", [
    ("task: evolm_piqa\ndataset_path: json\n  bad: [\n", "not valid YAML (mapping values are not allowed here)"),
    ("task: piqa_local\ndataset_path: json\n", 'task: "piqa_local"; the local task for piqa must be named evolm_piqa'),
    ("- task: evolm_piqa\n", "not an lm-eval task: expected a mapping with task: evolm_piqa"),
])
def test_a_local_task_yaml_lm_eval_cannot_run_is_one_line(lm, tmp_path, capsys, text, message):
    """A tasks_dir YAML that is not YAML or names another task was lm-eval's KeyError traceback ("Spec 'evolm_piqa'
    is not a registered task") after the model had loaded; now one line naming the file, before anything runs.
    Our own YAMLs (their !function hooks included) and one taking its name from an include pass."""
    from tests.conftest import refused_in_process

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa.yaml").write_text(text)
    out = tmp_path / "up"
    line = refused_in_process(capsys, "eval", ["upstream", f"model={lm[0]}", f"tasks_dir={tasks}",
                                               f"data_dir={SAMPLE}", "tasks=[piqa]", f"out={out}"],
                              str(tasks / "piqa.yaml"))
    assert message in line and not out.exists()
    upstream.check_tasks(list(UPSTREAM), str(TASKS_DIR), str(SAMPLE))
    (tasks / "piqa.yaml").write_text(f"include: {TASKS_DIR / 'piqa.yaml'}\n")
    upstream.check_tasks(["piqa"], str(tasks), str(SAMPLE))


def test_row_fields_are_the_task_yamls_and_the_samples(tmp_path):
    """The fields checked per task are those its YAML's header names and every sample row has; a copy of our YAML
    elsewhere is checked the same way, another YAML only for readable, non-empty JSONL."""
    for task in UPSTREAM:
        head = (TASKS_DIR / f"{task}.yaml").read_text().split("\ntask:")[0]
        assert all(f in head for f in upstream.ROW_FIELDS[task]), task
        upstream.check_rows(SAMPLE / f"{task}.jsonl", upstream.ROW_FIELDS[task], "data_dir")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tmp_path / "piqa.jsonl").write_text('{"question": "q"}\n')
    (tasks / "piqa.yaml").write_text((TASKS_DIR / "piqa.yaml").read_text())
    with pytest.raises(ConfigError, match="field 'goal': missing"):
        upstream.check_tasks(["piqa"], str(tasks), str(tmp_path))
    (tasks / "piqa.yaml").write_text((TASKS_DIR / "piqa.yaml").read_text().replace("{{goal}}", "{{question}}"))
    upstream.check_tasks(["piqa"], str(tasks), str(tmp_path))


def test_no_git_noise_outside_a_git_checkout(lm, tmp_path, capfd, monkeypatch):
    """lm-eval records the working directory's git commit (`git describe --always` in a subprocess): run outside a
    git checkout that printed git's `fatal: not a git repository ...` on our stderr. Not any more; lm-eval's own
    output still reaches it (its results table is printed to stdout as before)."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git here: lm-eval's lookup cannot print git's complaint")
    cwd = tmp_path / "not_a_checkout"
    cwd.mkdir()
    outside = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=cwd, capture_output=True, text=True)
    assert outside.returncode != 0 and "not a git repository" in outside.stderr  # the case this test is about
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    assert cli.main(["eval", "upstream", f"model={lm[0]}", f"tasks_dir={TASKS_DIR}", f"data_dir={SAMPLE}",
                     "tasks=[piqa]", "limit=1", "batch_size=1", f"out={out}"]) == 0
    captured = capfd.readouterr()
    assert "not a git repository" not in captured.err, captured.err[-2000:]
    assert (out / "result.json").is_file() and "piqa" in captured.out
