"""Capability probes during pretraining (issue 13, item 2): lm-eval 0-shot through the live megatron model and a
greedy downstream probe judged by the shared checker, on a token schedule, deterministic, bounded in cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evolm_nemo import cli
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation import upstream
from tests.conftest import REPO, run_evolm, subprocess_env, tiny

SAMPLE = REPO / "eval" / "upstream" / "sample"
PROBLEMS = REPO / "tests" / "fixtures" / "probe"
TASKS = ["piqa", "arc_easy", "winogrande", "hellaswag", "openbookqa"]


def probe_overrides(interval: str = "5120", *extra: str) -> list[str]:
    return [f"probe.tokens_interval={interval}", f"probe.upstream=[{','.join(TASKS)}]", f"probe.data_dir={SAMPLE}",
            "probe.downstream=[gsm8k_platinum]", f"probe.downstream_dir={PROBLEMS}", "probe.max_new_tokens=24",
            *extra]


def rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]


@pytest.fixture(scope="module")
def probed(tmp_path_factory, data_cache):
    """Two identical 20-iteration runs with probes every 5 iterations (1,024 tokens per iteration), no cost bound."""
    root = tmp_path_factory.mktemp("probed")
    runs = []
    for name in ("a", "b"):
        out = root / name
        run_evolm("train", tiny(out, data_cache, "train.iters=20", "train.log_interval=10",
                                *probe_overrides("5120", "probe.max_fraction=null")))
        runs.append(out)
    return runs


def _probe_keys(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("probe_") and not k.startswith("probe_s")
            and k not in ("probe_fraction", "probes_skipped")}


def test_probes_on_schedule_with_cost(probed):
    a = rows(probed[0])
    with_probe = [r["iteration"] for r in a if "probe_up_avg" in r]
    assert with_probe == [5, 10, 15, 20]  # every 5,120 tokens and at the end
    first = next(r for r in a if "probe_up_avg" in r)
    assert {f"probe_up_{t}_at_0" for t in TASKS} | {"probe_down_gsm8k_platinum_at_0", "probe_s_at_0"} <= set(first)
    for r in a:
        if "probe_up_avg" in r:
            assert r["probe_s"] > 0 and 0 < r["probe_fraction"] < 1 and r["probes_skipped"] == 0
            assert r["probe_up_avg"] == pytest.approx(sum(r[f"probe_up_{t}"] for t in TASKS) / len(TASKS), abs=0.01)
            assert 0 <= r["probe_down_gsm8k_platinum"] <= 100
            assert r["step_s"] < r["probe_s"]  # the probe's time is kept out of the step time


def test_a_resumed_run_probes_where_the_uninterrupted_one_did(probed, tmp_path, data_cache):
    """SIGKILL once the probe record at iteration 5 is written but the last checkpoint is at 3, resume, SIGKILL after
    the checkpoint at 6, resume: the probes run at 5, 10, 15, 20 (multiples of the interval, not 3 + 5 ...), nothing
    is measured again at a resume point (no *_at_3 / *_at_6 keys), the measurements before the first step are in the
    records as in an uninterrupted run -- the probes' in the first, the held-out loss's in the first and the last
    (the record at 5 that carried them was dropped with the first resume: the rewritten one carries them again) --
    and every probe record equals the uninterrupted run's; the closing summary still starts from the measurements
    before the first step."""
    from tests.conftest import train_then_sigkill_when

    out = tmp_path / "run"
    args = tiny(out, data_cache, "train.iters=20", "train.log_interval=10", "train.save_interval=3",
                "train.keep_last=10", "train.val_tokens_interval=5120", "data.synthetic_val_docs=50",
                *probe_overrides("5120", "probe.max_fraction=null"))
    ckpts, metrics = out / "checkpoints", out / "metrics.jsonl"
    train_then_sigkill_when(args, lambda: 1 if metrics.is_file() and '{"iteration": 5,' in metrics.read_text()
                            else None)
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000003"]
    train_then_sigkill_when(args, lambda: 1 if (ckpts / "iter_0000006" / "evolm.json").exists() else None)
    resumed = run_evolm("train", args)
    assert "resuming at iteration 6" in resumed.stdout
    got, want = rows(out), rows(probed[0])
    assert [r["iteration"] for r in got if "probe_up_avg" in r] == [5, 10, 15, 20]
    assert [r["iteration"] for r in got if "probe_up_avg_at_0" in r] == [5]
    assert [r["iteration"] for r in got if "val_loss_text_at_0" in r] == [5, 20]  # held-out loss: first and last
    assert not [k for r in got for k in r if "_at_" in k and not k.endswith("_at_0")]
    assert [_probe_keys(r) for r in got if "probe_up_avg" in r] == [_probe_keys(r) for r in want
                                                                    if "probe_up_avg" in r]
    assert "probes (percent), iteration 0 -> 20" in resumed.stdout  # from the first run's measurements


def test_probes_deterministic_for_a_seed(probed):
    a, b = rows(probed[0]), rows(probed[1])
    pa = [_probe_keys(r) for r in a if "probe_up_avg" in r]
    pb = [_probe_keys(r) for r in b if "probe_up_avg" in r]
    assert pa == pb and len(pa) == 4


def test_probes_at_tp2_equal_one_process(probed, tmp_path, data_cache):
    """Under torchrun with tp=2 (each forward split over both ranks, logits gathered) the probes give the one-process
    scores, and both ranks keep one schedule."""
    out = tmp_path / "tp2"
    run_evolm("train", tiny(out, data_cache, "train.iters=20", "train.log_interval=10", "parallel.tp=2",
                            *probe_overrides("5120", "probe.max_fraction=null")), nproc=2)
    one = [_probe_keys(r) for r in rows(probed[0]) if "probe_up_avg" in r]
    two = [_probe_keys(r) for r in rows(out) if "probe_up_avg" in r]
    assert two == one


def test_probes_leave_training_unchanged(probed, tmp_path, data_cache):
    """The same run without probes has bitwise the same losses and gradient norms (probes run forward-only, keep the
    random state lm-eval reseeds, and leave no inference state behind)."""
    plain = tmp_path / "plain"
    run_evolm("train", tiny(plain, data_cache, "train.iters=20", "train.log_interval=10"))
    want = {r["iteration"]: (r["loss"], r["grad_norm"]) for r in rows(plain)}
    got = {r["iteration"]: (r["loss"], r["grad_norm"]) for r in rows(probed[0])}
    assert set(want) <= set(got) and {k: got[k] for k in want} == want


def test_upstream_probe_equals_lm_eval_on_the_export(probed, tmp_path):
    """The last probe's scores equal `evolm eval upstream` (lm-eval's hf model) on the exported final checkpoint, and
    the live model's log-likelihoods equal lm-eval's HFLM's request by request (context splitting, empty context,
    left truncation)."""
    out = probed[0]
    last = rows(out)[-1]
    hf = tmp_path / "hf"
    assert cli.main(["export-hf", f"src={out}", f"dst={hf}"]) == 0
    summary, _ = upstream.run(str(hf), TASKS, tasks_dir=str(upstream.default_tasks_dir()), data_dir=str(SAMPLE))
    assert {t: summary["tasks"][t]["score"] for t in TASKS} == {t: last[f"probe_up_{t}"] for t in TASKS}

    got = tmp_path / "live.json"
    subprocess.run([sys.executable, str(REPO / "tests" / "train" / "_probe_check.py"), str(out), str(got)],
                   check=True, env=subprocess_env(), cwd=REPO, timeout=300)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tests.train._probe_check import REQUESTS

    ref = HFLM(pretrained=str(hf), device="cpu", batch_size=2, dtype="float32")
    want = ref.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                              for i, r in enumerate(REQUESTS)])
    live = json.loads(got.read_text())
    assert [g for _, g in live] == [g for _, g in want]
    for (lp, _), (wp, _) in zip(live, want):
        assert lp == pytest.approx(wp, abs=1e-4)


def test_cost_bound_skips_probes(tmp_path, data_cache):
    """With probe.max_fraction far below the probes' real share the interval probes are skipped (one line), the last
    step still probes, and every probe record says what it cost and how many were skipped."""
    out = tmp_path / "bounded"
    r = run_evolm("train", tiny(out, data_cache, "train.iters=12", "train.log_interval=6",
                                *probe_overrides("1024", "probe.max_fraction=0.01", "probe.upstream_limit=2")))
    probed = [x for x in rows(out) if "probe_up_avg" in x]
    assert [x["iteration"] for x in probed][-1] == 12 and len(probed) < 12
    assert r.stdout.count("probe skipped at iteration") == 1 and "probe.max_fraction=0.01" in r.stdout
    assert all(x["probe_fraction"] > 0.01 for x in probed)
    assert probed[-1]["probes_skipped"] == 12 - len(probed)


@pytest.mark.parametrize("extra, key, words", [
    (["probe.upstream=[mmlu]"], "probe.upstream", "no mmlu.yaml"),
    (["probe.data_dir=/nonexistent"], "probe.data_dir", "missing /nonexistent/piqa.jsonl"),
    (["probe.downstream=[gsm8k]"], "probe.downstream", "unknown suite 'gsm8k'"),
    (["probe.downstream_dir=/nonexistent"], "probe.downstream_dir", "missing /nonexistent/gsm8k_platinum.jsonl"),
    (["probe.max_fraction=0"], "probe.max_fraction", "(0, 1]"),
    (["probe.upstream=[]", "probe.downstream=[]"], "probe.tokens_interval", "both empty"),
    (["stage=sft"], "probe.tokens_interval", "stage=pretrain|cpt"),
    # was accepted: every probe prompt the same text, no problem in it (a suite's own template must hold {problem})
    (["probe.downstream=[gsm8k_platinum]", "probe.template='Question: Answer:'"], "probe.template",
     "has no {problem}"),
    (["probe.upstream=[piqa,arc_easy,piqa]"], "probe.upstream", "'piqa' is listed twice"),  # weighed twice in the avg
    (["probe.downstream=[math,math]"], "probe.downstream", "'math' is listed twice"),
])
def test_bad_probe_settings_refused_in_one_line(extra, key, words):
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.stages import plan_run

    cfg = compose("config", [*probe_overrides(), *extra], RootConfig)
    with pytest.raises(ConfigError) as e:
        plan_run(cfg)
    assert e.value.key == key and words in e.value.message


def test_problems_without_room_refused_before_training(tmp_path, data_cache):
    """The suite fixtures' long problems do not fit the tiny model's 128 tokens: one line, before any step."""
    out = tmp_path / "long"
    r = run_evolm("train", tiny(out, data_cache, "train.iters=2", *probe_overrides(),
                                f"probe.downstream_dir={REPO / 'tests' / 'fixtures' / 'eval'}"), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "probe.downstream: no gsm8k_platinum problem leaves 16 tokens" in r.stderr + r.stdout
    assert not (out / "metrics.jsonl").exists()


def test_report_draws_dynamics_and_puts_decayed_beside_intermediate(tmp_path, data_cache):
    """A WSD stable run (20 iterations, a branch point for 10) and its 10-iteration cooldown branch, both probing
    every 5 iterations with held-out loss: `evolm report dynamics=` draws capability vs tokens and puts the branch's
    final probes beside the stable run's at the same 10,240 tokens."""
    wsd = ["optim.decay_style=wsd", "optim.wsd_decay_fraction=0.3", "optim.warmup_iters=2", "data.split='98,2,0'",
           "train.val_tokens_interval=5120", *probe_overrides("5120", "probe.max_fraction=null",
                                                              "probe.upstream_limit=2")]
    stable, branch = tmp_path / "runs" / "stable", tmp_path / "runs" / "branch10"
    run_evolm("train", tiny(stable, data_cache, "train.iters=20", "train.log_interval=10", *wsd,
                            "train.branch_budgets=[10240]"))
    run_evolm("train", tiny(branch, data_cache, "train.iters=10", "train.log_interval=10", *wsd,
                            f"train.branch_from={stable}"))
    out = tmp_path / "report"
    assert cli.main(["report", f"dynamics={tmp_path / 'runs' / '*'}", f"out={out}"]) == 0
    md = (out / "report.md").read_text()
    assert (out / "dynamics.png").stat().st_size > 10_000 and "![dynamics](dynamics.png)" in md
    assert "## Training dynamics" in md and "| stable | tiny | pretrain |" in md

    def cells(metric):
        line = next(x for x in md.splitlines() if x.startswith(f"| 10.24K | {metric} |"))
        return [c.strip() for c in line.strip("|").split("|")]

    s, b = rows(stable), rows(branch)
    mid = next(r for r in s if r["iteration"] == 10)
    for metric in ("probe_up_avg", "probe_down_gsm8k_platinum", "val_loss_text"):
        _, _, intermediate, decayed, delta = cells(metric)
        assert float(intermediate) == pytest.approx(mid[metric], abs=0.005)
        assert float(decayed) == pytest.approx(b[-1][metric], abs=0.005)
        assert float(delta) == pytest.approx(b[-1][metric] - mid[metric], abs=0.01)
    csv_rows = (out / "dynamics.csv").read_text().splitlines()
    assert csv_rows[0] == "run,model,stage,branch_of,metric,tokens,value"
    assert any(x.startswith(f"branch10,tiny,pretrain,{stable.resolve()},probe_up_avg,7168,") for x in csv_rows)


def test_report_dynamics_needs_runs_with_records(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", f"dynamics={tmp_path / 'empty'}", f"out={tmp_path / 'r'}"]) != 0
    err = capsys.readouterr().err
    assert "error: dynamics: none of the 1 runs" in err and "recorded validation loss or probes" in err


def test_held_out_documents_of_their_own_leave_training_whole(tmp_path, data_cache):
    """data.synthetic_val_docs: the held-out loss reads generated documents of another seed, so training keeps every
    document -- the losses equal a run without validation bitwise -- while the records carry val_loss_text."""
    plain, held = tmp_path / "plain", tmp_path / "held"
    run_evolm("train", tiny(plain, data_cache, "train.iters=10"))
    run_evolm("train", tiny(held, data_cache, "train.iters=10", "data.synthetic_val_docs=50",
                            "train.val_tokens_interval=5120"))
    a, b = rows(plain), rows(held)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["iteration"] for r in b if "val_loss_text" in r] == [5, 10] and "val_loss_text_at_0" in b[4]


@pytest.mark.parametrize("extra, key, words", [
    (["data.val_paths=[/nowhere/a]"], "data.val_paths", "data.source=indexed"),
    (["data.synthetic_val_docs=-1"], "data.synthetic_val_docs", ">= 0"),
    ([], "train.val_tokens_interval", "data.synthetic_val_docs=200"),
])
def test_bad_held_out_settings_refused_in_one_line(extra, key, words):
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.stages import plan_run

    cfg = compose("config", ["train.val_tokens_interval=5120", *extra], RootConfig)
    with pytest.raises(ConfigError) as e:
        plan_run(cfg)
    assert e.value.key == key and words in e.value.message


def test_table_3_compares_only_records_near_the_budget(tmp_path):
    """A branch whose stable run logged nothing within 10% below its budget gets no intermediate value (its nearest
    record may be the run's start); one with a record there is compared with it."""
    from evolm_nemo.evaluation import dynamics

    stable = dynamics.Curve(run=str(tmp_path / "stable"), name="stable",
                            points={"val_loss_text": [(0, 7.0), (1000, 1.5), (1960, 1.2)]})
    early = dynamics.Curve(run=str(tmp_path / "b500"), name="b500", branch_of=str((tmp_path / "stable").resolve()),
                           budget=500, points={"val_loss_text": [(500, 1.8)]})
    late = dynamics.Curve(run=str(tmp_path / "b2000"), name="b2000", branch_of=str((tmp_path / "stable").resolve()),
                          budget=2000, points={"val_loss_text": [(2000, 1.1)]})
    md = dynamics.markdown([stable, early, late])
    assert "| 500 | val_loss_text | - (last record at 0) | 1.80 | - |" in md
    assert "| 2K | val_loss_text | 1.20 (at 1.96K) | 1.10 | -0.10 |" in md


def test_a_measurement_carried_by_two_records_is_one_point(tmp_path):
    """The held-out loss before the first step is carried by the first record and the last (``*_at_0``): the curve,
    dynamics.csv and the plot have it once, not twice."""
    from evolm_nemo.evaluation import dynamics

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"iteration": 5, "tokens": 5120, "val_loss_text": 6.0, "val_loss_text_at_0": 7.0}\n'
        '{"iteration": 10, "tokens": 10240, "val_loss_text": 5.0, "val_loss_text_at_0": 7.0}\n')
    curve = dynamics.load_curve(run)
    assert curve.points == {"val_loss_text": [(0, 7.0), (5120, 6.0), (10240, 5.0)]}
    dynamics.write_csv([curve], tmp_path / "d.csv")
    assert (tmp_path / "d.csv").read_text().splitlines()[1:] == [
        "run,,,,val_loss_text,0,7.0", "run,,,,val_loss_text,5120,6.0", "run,,,,val_loss_text,10240,5.0"]
