"""`evolm report`: hand-made result JSONs -> CSV, Markdown tables in the paper's shape, PNG plots."""

from __future__ import annotations

import csv
import json
import os

import pytest

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation import report
from evolm_nemo.evaluation.cli import report as report_cli


def _down(pass1, maj, pass16, ood=(0.25, 0.24, 0.55), rm=None):
    def m(p1, mj, p16):
        return {"n": 10, "pass1": p1, "maj16": mj, "rm16": rm, "pass16": p16, "correct_ratio": 0.5}

    suites = {**{s: m(pass1, maj, pass16) for s in report.ID_SUITES}, **{s: m(*ood) for s in report.OOD_SUITES}}
    return {"scoring": "evolm", "suites": suites, "id_avg": m(pass1, maj, pass16), "ood_avg": m(*ood),
            "sampling": {"backend": "hf", "n": 16}}


def _up(avg):
    tasks = {t: {"acc": avg - 1, "acc_norm": avg, "score": avg, "n": 100} for t in report.UPSTREAM}
    return {"tasks": tasks, "avg": avg}


RESULTS = {
    "a": {"model": "1B-20BT", "size": "1B", "pretrain_tokens": 20 * 10**9, "stage": "pretrain", "upstream": _up(46.44)},
    "b": {"model": "1B-80BT", "size": "1B", "pretrain_tokens": 80 * 10**9, "stage": "pretrain", "upstream": _up(51.88)},
    "c": {"model": "4B-80BT", "size": "4B", "pretrain_tokens": 80 * 10**9, "stage": "pretrain", "upstream": _up(50.22)},
    "d": {"model": "1B-80BT-sft", "size": "1B", "pretrain_tokens": 80 * 10**9, "stage": "sft", "group": "1B-80BT",
          "downstream": _down(0.121, 0.141, 0.351, (0.254, 0.246, 0.557))},
    "e": {"model": "1B-80BT-rl", "size": "1B", "pretrain_tokens": 80 * 10**9, "stage": "rl", "group": "1B-80BT",
          "downstream": _down(0.180, 0.214, 0.454, (0.275, 0.310, 0.653), rm=0.2)},
}


def _write(tmp_path, names):
    for n in names:
        d = tmp_path / "runs" / n
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"schema": report.SCHEMA, **RESULTS[n]}))
    return str(tmp_path / "runs" / "*" / "result.json")


def _is_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_report_builds_csv_markdown_and_plots(tmp_path):
    out = tmp_path / "report"
    assert report_cli([f"runs={_write(tmp_path, RESULTS)}", f"out={out}"]) == 0

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["model"] for r in rows] == ["1B-20BT", "1B-80BT", "1B-80BT-sft", "1B-80BT-rl", "4B-80BT"]
    sft = next(r for r in rows if r["model"] == "1B-80BT-sft")
    assert float(sft["id_avg_maj16"]) == pytest.approx(14.1) and float(sft["ood_avg_pass16"]) == pytest.approx(55.7)
    assert float(sft["gsm8k_platinum_pass1"]) == pytest.approx(12.1)
    assert float(rows[0]["up_avg"]) == pytest.approx(46.44) and rows[0]["id_avg_pass1"] == ""

    md = (out / "report.md").read_text()
    assert "Downstream scoring mode: evolm" in md
    assert "| 1B-20BT | 1B | 20B | 46.44 | 46.44 | 46.44 | 46.44 | 46.44 | 46.44 | 46.44 |" in md
    # The paper's SFT / SFT+RL cell shape: Greedy ID, Maj@16 ID, Pass@16 ID, then OOD.
    assert "| 1B-80BT | 12.1/18.0 | 14.1/21.4 | 35.1/45.4 | 25.4/27.5 | 24.6/31.0 | 55.7/65.3 |" in md
    assert "| 1B-80BT-rl | rl | 18.0 | 21.4 | 20.0 | 45.4 |" in md  # RM@16 present only for the RL model
    for name in ("tokens", "id_vs_ood", "sft_vs_rl", "maj_vs_pass"):
        assert f"![{name}]({name}.png)" in md
        _is_png(out / f"{name}.png")
    assert [p.name for p in out.glob(".*")] == [report.MANIFEST]  # no temp files left behind: the manifest only


def test_averages_over_part_of_the_suites_are_marked(tmp_path):
    """A model evaluated on part of the suites (or upstream tasks) has averages over those only: its rows carry a
    mark and a footnote saying which it has and which it lacks, the CSV lists them, and an SFT/SFT+RL pair whose
    models were averaged over different suites is marked; complete rows are not."""
    data = json.loads(json.dumps(RESULTS))
    for suite in ("math", "tabmwp", "strategyqa"):
        del data["e"]["downstream"]["suites"][suite]
    del data["b"]["upstream"]["tasks"]["piqa"]
    for n in RESULTS:
        d = tmp_path / "runs" / n
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"schema": report.SCHEMA, **data[n]}))
    out = tmp_path / "report"
    assert report_cli([f"runs={tmp_path / 'runs' / '*' / 'result.json'}", f"out={out}"]) == 0
    md = (out / "report.md").read_text()
    assert "| 1B-80BT-rl † | rl |" in md and "| 1B-80BT-sft | sft |" in md
    assert ("- † 1B-80BT-rl: ID over gsm8k_platinum (without math); OOD over cruxeval, boardgameqa (without tabmwp, "
            "strategyqa)") in md
    assert "| 1B-80BT † | 1B | 80B |" in md and "| 1B-20BT | 1B | 20B |" in md
    assert "- † 1B-80BT: Avg over hellaswag, winogrande, openbookqa, arc_easy, arc_challenge (without piqa)" in md
    assert "| 1B-80BT † | 12.1/18.0 |" in md  # the SFT/SFT+RL pair
    rows = {r["model"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["1B-80BT-rl"]["id_suites"] == "gsm8k_platinum"
    assert rows["1B-80BT-sft"]["ood_suites"] == ";".join(report.OOD_SUITES)
    assert rows["1B-80BT"]["up_tasks"] == "hellaswag;winogrande;openbookqa;arc_easy;arc_challenge"


def test_plots_without_data_are_skipped(tmp_path):
    out = tmp_path / "report"
    written = report.build(_write(tmp_path, ["a", "b"]), str(out))
    assert written["tokens"] and written["sft_vs_rl"] is None and written["maj_vs_pass"] is None
    assert not (out / "sft_vs_rl.png").exists()
    assert "- sft_vs_rl: skipped (no data to draw)" in (out / "report.md").read_text()


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        report.build(str(tmp_path / "nothing" / "*.json"), str(tmp_path / "out"))
    assert e.value.key == "runs"
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x", ')
    with pytest.raises(ConfigError) as e:
        report.build(str(bad), str(tmp_path / "out"))
    assert e.value.key == str(bad) and "not valid JSON" in e.value.message
    bad.write_text('{"size": "1B"}')
    with pytest.raises(ConfigError, match="needs a string field 'model'"):
        report.build(str(bad), str(tmp_path / "out"))
    bad.write_text('{"model": "x", "pretrain_tokens": ' + "9" * 5000 + "}")  # json.loads: a plain ValueError
    with pytest.raises(ConfigError) as e:
        report.build(str(bad), str(tmp_path / "out"))
    assert e.value.key == str(bad) and e.value.message.startswith("not valid JSON (Exceeds the limit (4300 digits)")
    assert "\n" not in str(e.value)
    if os.geteuid() != 0:  # root reads the file whatever its mode
        bad.write_text('{"model": "x"}')
        bad.chmod(0)
        try:
            with pytest.raises(ConfigError) as e:
                report.build(str(bad), str(tmp_path / "out"))
        finally:
            bad.chmod(0o644)
        assert e.value.key == str(bad) and e.value.message == "cannot be read (Permission denied)"
    with pytest.raises(ConfigError) as e:
        report_cli([])
    assert e.value.key == "runs"


def test_infer_meta_from_evolm_names():
    sft = report.infer_meta("/m/myllama-1B-160BT-cpt-MixedFW8FM42-sftep1")
    rl = report.infer_meta("/m/myllama-1B-160BT-cpt-MixedFW8FM42-sftep1-rlep8/")
    base = report.infer_meta("myllama-4B-320BT")
    assert (sft["size"], sft["pretrain_tokens"], sft["stage"]) == ("1B", 160 * 10**9, "sft")
    assert (rl["stage"], base["stage"], base["size"], base["pretrain_tokens"]) == ("rl", "pretrain", "4B", 320 * 10**9)
    assert sft["group"] == rl["group"] == "myllama-1B-160BT-cpt-MixedFW8FM42"
    assert report.infer_meta("my-model")["size"] is None


def test_update_result_merges_parts(tmp_path):
    path = tmp_path / "r" / "result.json"
    report.update_result(path, {"model": "m", "size": "1B"}, downstream={"scoring": "strict"})
    data = report.update_result(path, {"model": "m", "size": None}, upstream={"avg": 50.0})
    assert data == json.loads(path.read_text())
    assert data["size"] == "1B" and data["downstream"]["scoring"] == "strict" and data["upstream"]["avg"] == 50.0


def test_a_later_evaluation_keeps_the_labels_given_earlier(tmp_path):
    """name=/stage=/group= given to one evaluation stay when another evaluation of the same out only guesses them
    from the directory name (the report pairs SFT with SFT+RL by them); an explicit value still replaces a guess."""
    from evolm_nemo.evaluation.evaluate import _meta
    from evolm_nemo.evaluation.evaluate import DownstreamConfig

    path = tmp_path / "result.json"
    model = tmp_path / "myllama-1B-160BT-sftep1"
    explicit = _meta(DownstreamConfig(model=str(model), name="Custom", stage="rl", group="G1"))
    guessed = _meta(DownstreamConfig(model=str(model)))
    assert guessed["inferred"] == ["group", "model", "pretrain_tokens", "size", "stage"]
    report.update_result(path, explicit, downstream={"scoring": "strict"})
    data = report.update_result(path, guessed, upstream={"avg": 50.0})
    assert (data["model"], data["stage"], data["group"]) == ("Custom", "rl", "G1")
    assert data["size"] == "1B" and data["downstream"] == {"scoring": "strict"} and data["upstream"] == {"avg": 50.0}
    path.unlink()
    report.update_result(path, guessed, upstream={"avg": 50.0})
    data = report.update_result(path, explicit, downstream={"scoring": "strict"})
    assert (data["model"], data["stage"], data["group"]) == ("Custom", "rl", "G1") and data["inferred"] == [
        "pretrain_tokens", "size"]
    assert not list(tmp_path.glob(".result.json.lock"))


def test_two_evaluations_finishing_together_both_land(tmp_path):
    """Upstream and downstream into one out at the same moment: the file's lock keeps both parts."""
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    path = tmp_path / "result.json"
    code = ("import sys, time\nfrom evolm_nemo.evaluation import report\n"
            "for i in range(40):\n    report.update_result(sys.argv[1], {'model': 'm'}, **{sys.argv[2] + str(i): i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), part], cwd=REPO, env=subprocess_env())
             for part in ("up", "down")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    data = json.loads(path.read_text())
    assert all(f"{part}{i}" in data for part in ("up", "down") for i in range(40))


def test_orm_score_against_accuracy_per_suite_with_pearson_r(tmp_path):
    """EvoLM's Takeaway 12: one point per model per suite (mean ORM score of its samples, correct ratio), r drawn
    and tabled; a suite with fewer than 3 models gets n/a."""
    import numpy as np

    xs, ys = [0.1, 0.5, 0.9, 1.4], [0.20, 0.25, 0.41, 0.38]
    for i, (x, y) in enumerate(zip(xs, ys)):
        m = {"n": 10, "pass1": y, "maj16": y, "rm16": y, "pass16": y, "correct_ratio": y, "rm_score_mean": x}
        few = dict(m, rm_score_mean=x if i < 2 else None)
        d = tmp_path / "runs" / f"m{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({
            "schema": report.SCHEMA, "model": f"m{i}", "size": "1B", "stage": "sft",
            "downstream": {"scoring": "evolm", "suites": {"gsm8k_platinum": m, "math": few}, "id_avg": m,
                           "ood_avg": m}}))
    out = tmp_path / "report"
    written = report.build(str(tmp_path / "runs" / "*" / "result.json"), str(out))
    _is_png(written["rm_vs_accuracy"])
    md = (out / "report.md").read_text()
    r = float(np.corrcoef(xs, ys)[0, 1])
    assert f"| gsm8k_platinum | 4 | {r:.2f} |" in md and "| math | 2 | n/a |" in md
    assert report.pearson(xs, ys) == pytest.approx(r) and report.pearson([1, 2], [3, 4]) is None


def test_suite_summary_has_the_mean_orm_score():
    from evolm_nemo.evaluation.metrics import suite_summary

    rows = [{"pass1": True, "maj16": True, "pass16": True, "rm16": True, "correct": [True, False],
             "rm_scores": [1.0, 3.0]},
            {"pass1": False, "maj16": False, "pass16": True, "rm16": False, "correct": [False, True]}]
    s = suite_summary(rows)
    assert s["rm_score_mean"] == 2.0 and suite_summary(rows[1:])["rm_score_mean"] is None


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(pretrain_tokens="80B"), "pretrain_tokens"),
    (lambda d: d.update(size=1), "size"),
    (lambda d: d["downstream"].update(suites=[1, 2]), "downstream.suites"),
    (lambda d: d["downstream"]["id_avg"].update(pass1="12%"), "downstream.id_avg.pass1"),
    (lambda d: d["downstream"]["suites"]["cruxeval"].update(n=[10]), "downstream.suites.cruxeval.n"),
    (lambda d: d.update(upstream={"tasks": {"hellaswag": {"score": "high"}}, "avg": 50}),
     "upstream.tasks.hellaswag.score"),
    (lambda d: d.update(upstream={"tasks": {}, "avg": [50]}), "upstream.avg"),
])
def test_wrong_types_in_a_result_json_are_one_line(tmp_path, edit, field):
    from tests.conftest import one_line_error, run_evolm

    data = json.loads(json.dumps({"schema": report.SCHEMA, **RESULTS["e"]}))
    edit(data)
    path = tmp_path / "result.json"
    path.write_text(json.dumps(data))
    proc = run_evolm("report", [f"runs={path}", f"out={tmp_path / 'out'}"], check=False)
    line = one_line_error(proc, str(path))
    assert f"field '{field}' must be" in line, line
    assert not (tmp_path / "out").exists()


def test_out_an_existing_file_is_one_line(tmp_path):
    from tests.conftest import one_line_error, run_evolm

    runs = _write(tmp_path, ["a"])
    out = tmp_path / "report.md"
    out.write_text("mine")
    proc = run_evolm("report", [f"runs={runs}", f"out={out}"], check=False)
    assert "it is a file, not a directory" in one_line_error(proc, "out")
    assert out.read_text() == "mine"


def test_every_rl_seed_of_a_group_is_paired_with_its_sft():
    """Three RL seeds of one group: three SFT / SFT+RL rows (one pair kept the last seed and dropped the others),
    each named by its RL model."""
    rls = [{**RESULTS["e"], "model": f"1B-80BT-rl-s{i}"} for i in (1, 2, 3)]
    pairs = report.sft_rl_pairs([RESULTS["d"], *rls])
    assert [(s["model"], r["model"]) for s, r in pairs] == [("1B-80BT-sft", f"1B-80BT-rl-s{i}") for i in (1, 2, 3)]
    md = report.markdown([RESULTS["d"], *rls], {})
    assert all(f"| 1B-80BT (1B-80BT-rl-s{i}) | 12.1/18.0 |" in md for i in (1, 2, 3)), md
    assert report.sft_rl_pairs([RESULTS["d"], RESULTS["e"]]) == [(RESULTS["d"], RESULTS["e"])]


@pytest.mark.parametrize("edit, field, shown", [
    (lambda d: d["downstream"]["suites"]["math"].update(pass1=float("nan")), "downstream.suites.math.pass1", "NaN"),
    (lambda d: d.update(pretrain_tokens=float("inf")), "pretrain_tokens", "Infinity"),
    (lambda d: d.update(pretrain_tokens=10**400), "pretrain_tokens", "(past a float)"),
    (lambda d: d["downstream"]["sampling"].update(top_p=float("-inf")), "downstream.sampling.top_p", "-Infinity"),
])
def test_non_finite_numbers_in_a_result_json_are_refused(tmp_path, edit, field, shown):
    """Python's JSON reads NaN / Infinity (and integers past a float): they reached results.csv and report.md as
    nan / inf, or stopped the tokens plot with an OverflowError traceback."""
    data = json.loads(json.dumps({"schema": report.SCHEMA, **RESULTS["e"]}))
    edit(data)
    path = tmp_path / "result.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        report.build(str(path), str(tmp_path / "out"))
    assert e.value.key == str(path) and f"field '{field}' holds" in e.value.message and shown in e.value.message
    assert not (tmp_path / "out" / "results.csv").exists()


def test_negative_tokens_and_odd_size_labels(tmp_path):
    """A size label with two dots ("1.2.3B") stopped the report with a ValueError traceback (sorting); negative
    pretraining tokens are refused in one line (a log-scale tokens axis)."""
    data = {"schema": report.SCHEMA, **RESULTS["d"], "size": "1.2.3B"}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(data))
    assert (report.build(str(path), str(tmp_path / "out"))["csv"])
    assert "1.2.3B" in (tmp_path / "out" / "results.csv").read_text()
    path.write_text(json.dumps({**data, "schema": "evolm-result/2"}))  # a newer evolm's: was read as this one
    with pytest.raises(ConfigError, match='schema "evolm-result/2" is not evolm-result/1'):
        report.build(str(path), str(tmp_path / "out2"))
    path.write_text(json.dumps({**data, "pretrain_tokens": -5}))
    with pytest.raises(ConfigError, match="field 'pretrain_tokens' must be a number of tokens >= 0"):
        report.build(str(path), str(tmp_path / "out2"))


def test_a_new_report_leaves_no_plot_of_the_previous_one(tmp_path):
    """A report into the ``out`` of an earlier one: a plot the new results have no data for was left there from the
    earlier results (report.md saying 'skipped' beside it), and results.csv too after a dynamics-only report."""
    out = tmp_path / "report"
    report.build(_write(tmp_path, RESULTS), str(out))
    assert (out / "sft_vs_rl.png").exists() and (out / "maj_vs_pass.png").exists()
    only_upstream = tmp_path / "up" / "result.json"
    only_upstream.parent.mkdir()
    only_upstream.write_text(json.dumps({"schema": report.SCHEMA, **RESULTS["a"]}))
    mine = out / "notes.txt"  # not a report's file: stays
    mine.write_text("mine")
    written = report.build(str(only_upstream), str(out))
    assert written["sft_vs_rl"] is None and written["maj_vs_pass"] is None
    assert not (out / "sft_vs_rl.png").exists() and not (out / "maj_vs_pass.png").exists()
    assert not (out / "rm_vs_accuracy.png").exists() and not (out / "id_vs_ood.png").exists()
    assert (out / "tokens.png").exists() and mine.read_text() == "mine"
    assert "1B-80BT-rl" not in (out / "results.csv").read_text()


def test_a_report_removes_only_what_an_earlier_report_wrote(tmp_path):
    """Any file a report writes, found in ``out`` and not written by the new report, was deleted -- the user's own
    results.csv in docs/ went with a dynamics-only report. Only the files the previous report listed in its manifest
    (.evolm_report.json) are removed now; the manifest lists what this report wrote."""
    out = tmp_path / "docs"
    out.mkdir()
    (out / "results.csv").write_text("mine\n")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "tokens": 1024 * i, "val_loss_text": 9 - i})
                                               + "\n" for i in (5, 10)))
    written = report.build(None, str(out), dynamics=str(run))
    assert (out / "results.csv").read_text() == "mine\n" and written.get("csv") is None
    listed = json.loads((out / report.MANIFEST).read_text())["files"]
    assert listed == sorted(p.name for p in out.iterdir() if p.name not in ("results.csv", report.MANIFEST))
    assert {"report.md", "dynamics.png", "dynamics.csv"} <= set(listed)
    report.build(_write(tmp_path, ["a"]), str(out))  # a report's own results.csv: listed, then removed when not made
    assert "results.csv" in json.loads((out / report.MANIFEST).read_text())["files"]
    assert not (out / "dynamics.png").exists() and not (out / "dynamics.csv").exists()
    report.build(None, str(out), dynamics=str(run))
    assert not (out / "results.csv").exists() and (out / "dynamics.png").exists()
    # a manifest naming paths outside out, or out's own temporaries, removes none of them
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    (out / report.MANIFEST).write_text(json.dumps({"files": ["../keep.txt", str(outside), "..", report.OWNER]}))
    report.build(None, str(out), dynamics=str(run))
    assert outside.read_text() == "x" and out.is_dir()


def test_a_result_may_name_the_export_it_evaluated(tmp_path):
    """result.json's optional ``<mode>.export`` (the export an evaluation loaded) is read, and checked like the rest."""
    made = {"run_id": "20260101-000000-000000", "iteration": 500, "sha256": "ab" * 32}
    data = {"schema": report.SCHEMA, **RESULTS["d"]}
    data["downstream"] = {**data["downstream"], "export": made}
    report.check_result(data, "r.json")
    report.check_result({**data, "upstream": {"avg": 1.0, "export": None}}, "r.json")
    for field, value in (("sha256", 5), ("iteration", "500"), ("run_id", [])):
        bad = {**data, "downstream": {**data["downstream"], "export": {**made, field: value}}}
        with pytest.raises(ConfigError, match=f"field 'downstream.export.{field}' must be"):
            report.check_result(bad, "r.json")
