"""`evolm pipeline` exactly as `make demo` runs it: pretrain -> CPT on a replay mix -> SFT (greedy accuracy before
and after) -> samples -> an outcome RM on its own samples -> GRPO on the RL set (reward and greedy accuracy before and
after) -> verified HF exports -> eval of the SFT model and the RL actor (RM@16 from our RM) + report."""

import json
import re
import signal
import subprocess

from tests.conftest import REPO, evolm_cmd, run_evolm, subprocess_env, tree_bytes


def test_pipeline_end_to_end(tmp_path):
    """The demo exactly as `make demo` runs it (only its output and cache directories moved)."""
    out = tmp_path / "demo"
    proc = run_evolm("pipeline", [f"run.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false"],
                     fresh=True)  # the installed script in a new interpreter, as `make demo` starts it
    text = proc.stdout
    # SFT (2 epochs) must clearly teach the held-out word problems: from about 0 to at least 20% greedy accuracy
    m = re.search(r"before SFT ([0-9.]+)% -> after SFT ([0-9.]+)%", text)
    assert m and float(m.group(1)) <= 10.0 and float(m.group(2)) >= 20.0, m and m.groups()
    # the RL stage (GRPO on the RL set): mean reward and held-out greedy accuracy both rise (measured on the demo's
    # seed and RL-stage train.seed=1, 2, rollouts keyed by the sequence's place in the global batch: reward
    # 0.098->0.132, 0.086->0.127, 0.120->0.130; greedy 26.6% -> 34.4/34.4/31.2%)
    m = re.search(r"\[rl\] grpo: mean reward .* first 10 steps ([0-9.]+) -> last 10 steps ([0-9.]+)", text)
    assert m and float(m.group(2)) > float(m.group(1)), text[-3000:]
    m = re.search(r"\[rl\] greedy accuracy on 64 held-out word problems .*: before RL ([0-9.]+)% -> after RL ([0-9.]+)%",
                  text)
    assert m and float(m.group(2)) > float(m.group(1)), text[-3000:]
    rl = json.loads(next((out / "rl" / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert [s["stage"] for s in rl["lineage"]["stages"]] == ["pretrain", "cpt", "sft", "grpo"]
    assert "RL actor export (verified)" in text and "evolm-tiny-demo-rl" in text
    assert json.loads((out / "eval_rl" / "result.json").read_text())["stage"] == "grpo"
    assert "[pretrain] loss curve" in text and "[cpt] loss curve" in text and "[sft] loss curve" in text
    assert "(falling)" in text and "before SFT" in text and "after SFT" in text
    cpt = json.loads(next((out / "cpt" / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert [s["stage"] for s in cpt["lineage"]["stages"]] == ["pretrain", "cpt"]
    assert cpt["config"]["data"]["weights"] == [8.0, 42.0] and cpt["config"]["data"]["synthetic_kinds"] == ["text", "math"]
    sft = json.loads(next((out / "sft" / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert [s["stage"] for s in sft["lineage"]["stages"]] == ["pretrain", "cpt", "sft"]
    assert sft["lineage"]["parent"].startswith(str(out / "cpt"))
    assert text.count("sample> ") == 4
    assert "HF export (verified)" in text and (out / "hf" / "config.json").is_file()
    assert "gsm8k_platinum" in text and "Maj@16" in text and "plot: " in text
    result = json.loads((out / "eval" / "result.json").read_text())
    assert result["downstream"]["suites"]["gsm8k_platinum"]["n"] == 8 and result["stage"] == "sft"
    rows = [json.loads(line) for line in (out / "eval" / "scored.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["completions"]) == 16 and len(r["correct"]) == 16 for r in rows)
    # the fifth stage: an outcome RM on the SFT model's own samples, its validation AUC, RM@16 from it
    m = re.search(r"\[rm\] validation on held-out problems: AUC ([0-9.]+), accuracy [0-9.]+ over (\d+) samples", text)
    assert m and 0.0 <= float(m.group(1)) <= 1.0 and int(m.group(2)) > 20, text[-3000:]
    rm_meta = json.loads(next((out / "rm" / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert rm_meta["head"] == "value" and [s["stage"] for s in rm_meta["lineage"]["stages"]][-2:] == ["sft", "rm"]
    assert "RM export (verified, LlamaForSequenceClassification)" in text and "RM@16" in text
    assert all(len(r["rm_scores"]) == 16 for r in rows)
    assert result["downstream"]["suites"]["gsm8k_platinum"]["rm16"] is not None
    # checkpoint dynamics (issue 13 item 5): pretraining and CPT record held-out loss per source and the probes; the
    # report draws them, with CPT on the axis after pretraining
    m = re.search(r"held-out loss per source, iteration 0 -> 300: text ([\d.]+) -> ([\d.]+)", text)
    assert m and float(m.group(2)) < float(m.group(1)) - 1.0, text[-3000:]
    m = re.search(r"held-out loss per source, iteration 0 -> 100: text [\d.]+ -> [\d.]+ \([+-][\d.]+\), "
                  r"math ([\d.]+) -> ([\d.]+)", text)
    assert m and float(m.group(2)) < float(m.group(1)), text[-3000:]
    assert "probes (percent), iteration 0 -> 300:" in text and "down_gsm8k_platinum" in text
    pre_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["iteration"] for r in pre_rows if "probe_up_avg" in r] == [100, 200, 300]
    assert all("val_loss_text" in r for r in pre_rows if "probe_up_avg" in r)
    report = (out / "dynamics" / "report.md").read_text()
    assert "| demo | tiny | pretrain |" in report and "| cpt | tiny | cpt |" in report
    assert (out / "dynamics" / "dynamics.png").stat().st_size > 10_000
    csv_rows = (out / "dynamics" / "dynamics.csv").read_text().splitlines()
    assert any(x.startswith("cpt,tiny,cpt,,val_loss_math,307200,") for x in csv_rows)  # CPT starts after 307.2K
    assert "[dynamics] pretraining and CPT" in text
    # run again into the same directory: every stage resumes as complete (nothing retrained); SIGTERM between its
    # trainings (here while it samples the SFT model for the RM) unwinds like Ctrl-C: one line, exit 143 (it was
    # killed on the spot without a word), and the first run's checkpoints are untouched
    ckpts = {k: v for k, v in tree_bytes(out).items() if "checkpoints/" in k}
    with open(tmp_path / "rerun.err", "w+") as errors:  # a file: a pipe nobody reads while stdout is read could fill
        proc = subprocess.Popen(evolm_cmd("pipeline", [f"run.out_dir={out}", f"data.cache_dir={tmp_path / 'cache'}",
                                                       "train.progress=false"]),
                                cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=errors, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[sft] greedy accuracy"):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=300)
        errors.seek(0)
        err = errors.read()
    rerun = "".join(seen) + rest
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "stopped by SIGTERM", (rerun[-2000:], err[-3000:])
    assert rerun.count("; nothing to train") == 3 and "loss curve" not in rerun, rerun[-3000:]
    assert {k: v for k, v in tree_bytes(out).items() if "checkpoints/" in k} == ckpts


def test_a_refused_pipeline_writes_nothing(tmp_path, a_run):
    """A bad key, and an output directory that is another run's: one line, and nothing written there (the probe's
    problems go to the data cache, not into the run directory before its checks)."""
    import shutil

    from tests.conftest import one_line_error, tree_bytes

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    fresh = tmp_path / "fresh"
    one_line_error(run_evolm("pipeline", [f"run.out_dir={fresh}", cache, "train.iters=-5"], check=False),
                   "train.iters")
    assert not fresh.exists()
    other = tmp_path / "other"
    shutil.copytree(a_run, other)
    before = tree_bytes(other)
    proc = run_evolm("pipeline", [f"run.out_dir={other}", cache], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert tree_bytes(other) == before
