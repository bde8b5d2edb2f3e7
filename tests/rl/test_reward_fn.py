"""User reward functions (``rl.reward=custom|sum``, ``rl.reward_fn=package.module:function``): a function written
here, in a module on PYTHONPATH, drives a real GRPO run on the demo RL set; its score is the reward (alone, or in the
weighted sum), its extra metrics are logged; a raising / NaN / hanging function and a bad ``rl.reward_fn`` are handled
as documented (one line naming the function and the row, or 0 and a count)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import pytest

from tests.conftest import one_line_error, run_evolm
from tests.rl.test_rl import metrics, rl_args

MODULE = '''
import os
import time


def length_penalised(prompt, response, row):
    """1 for the gold answer in the response, minus 0.002 per character; checks what it is given."""
    assert isinstance(prompt, str) and prompt == row["prompt"], (prompt, row)
    assert row["suite"] == "gsm8k_platinum" and row["id"].startswith("demo-") and 0 <= row["sample"] < 4, row
    hit = 1.0 if row["gold_answer"] in response else 0.0
    penalty = 0.002 * len(response)
    return {"score": hit - penalty, "penalty": penalty, "hit": hit}


def boom(prompt, response, row):
    raise ValueError("no reward for " + row["id"])


def not_finite(prompt, response, row):
    return float("nan")


def words(prompt, response, row):
    return "high"


def hang(prompt, response, row):
    time.sleep(3600)


def stubborn(prompt, response, row):  # swallows the alarm: only killing its process stops it
    while True:
        try:
            time.sleep(3600)
        except BaseException:
            pass


def dies(prompt, response, row):
    os._exit(3)


def two_args(prompt, response):
    return 1.0


constant = 0.5
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """``rewards_here`` in a directory on PYTHONPATH (for `evolm train`, its helpers) and on sys.path (for us)."""
    root = tmp_path / "user_code"
    root.mkdir()
    (root / "rewards_here.py").write_text(MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("rewards_here", None)
    return importlib.import_module("rewards_here")


def _run(tmp_path, rl_parent, fn, *extra, check=True):
    out = tmp_path / "run"
    proc = run_evolm("train", rl_args(out, rl_parent, "grpo", None, "train.iters=2", "rl.prompts_per_step=2",
                                      "rl.samples_per_prompt=4", "rl.save_rollouts=true",
                                      f"rl.reward_fn=rewards_here:{fn}", *extra), check=check)
    return out, proc


def _rollouts(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["custom", "sum"])
def test_a_grpo_run_trains_on_the_function_and_logs_its_metrics(tmp_path, rl_parent, reward_module, mode):
    """custom: the reward is the function's score; sum: 0.5 x verifiable + 2 x the function's score. Either way its
    extra metrics are logged as reward_fn/<name> (means over the batch) and every reward is what the function returns
    for that response and prompt row."""
    extra = ["rl.verifiable_weight=0.5", "rl.reward_fn_weight=2.0"] if mode == "sum" else []
    out, proc = _run(tmp_path, rl_parent, "length_penalised", f"rl.reward={mode}", *extra)
    rows = {r["id"]: r for r in map(json.loads, rl_parent["rl"].read_text().splitlines())}
    ro, logged = _rollouts(out), metrics(out)
    assert sorted(logged) == [1, 2] and len(ro) == 16
    for r in ro:
        row = rows[r["id"]]
        want = reward_module.length_penalised(row["prompt"], r["text"], {"suite": "gsm8k_platinum", "sample": 0, **row})
        assert r["reward_fn"] == want
        expected = want["score"] if mode == "custom" else 0.5 * r["correct"] + 2.0 * want["score"]
        assert r["reward"] == pytest.approx(expected, abs=1e-12)
    for it, rec in logged.items():
        mine = [r for r in ro if r["iteration"] == it]
        for name in ("score", "penalty", "hit"):
            assert rec[f"reward_fn/{name}"] == pytest.approx(sum(r["reward_fn"][name] for r in mine) / len(mine))
        assert rec["reward_mean"] == pytest.approx(sum(r["reward"] for r in mine) / len(mine))
        assert rec["reward_fn_timeouts"] == 0 and rec["reward_fn_errors"] == 0
        assert rec["actor_grad_norm"] > 0 or len({r["reward"] for r in mine}) == 1  # it trained on those rewards
    assert any(r["reward_fn"]["penalty"] > 0 for r in ro)


@pytest.mark.parametrize("fn,words", [("boom", "raised ValueError: no reward for demo-"),
                                      ("not_finite", "returned nan (not finite)"),
                                      ("words", "returned 'high' (a str), not a float or a dict with 'score'"),
                                      ("dies", "killed its helper process (exit code 3)")])
def test_a_bad_call_stops_the_run_in_one_line(tmp_path, rl_parent, reward_module, fn, words):
    """An exception, a NaN, a string, a dead helper: one line naming the function and the row, exit 2; never 0."""
    _, proc = _run(tmp_path, rl_parent, fn, "rl.reward=custom", check=False)
    line = one_line_error(proc, "rl.reward_fn")
    assert f"rewards_here:{fn} {words}" in line and "on the row id='demo-" in line and "(iteration 1)" in line, line
    assert "rl.reward_fn_errors=zero" in line


def test_errors_zero_scores_them_0_and_counts_them(tmp_path, rl_parent, reward_module):
    out, _ = _run(tmp_path, rl_parent, "boom", "rl.reward=custom", "rl.reward_fn_errors=zero")
    for rec in metrics(out).values():
        assert rec["reward_fn_errors"] == 8 and rec["reward_fn_timeouts"] == 0 and rec["reward_mean"] == 0.0
    ro = _rollouts(out)
    assert all(r["reward"] == 0.0 and r["reward_fn"]["error"].startswith("raised ValueError") for r in ro)


def test_a_hanging_function_times_out_to_0_and_is_counted(tmp_path, rl_parent, reward_module):
    """rl.reward_fn_timeout bounds each call: the run goes on, every response scores 0 and is counted."""
    t0 = time.time()
    out, _ = _run(tmp_path, rl_parent, "hang", "rl.reward=sum", "rl.reward_fn_timeout=0.3", "rl.verifiable_weight=1")
    assert time.time() - t0 < 120
    for rec in metrics(out).values():
        assert rec["reward_fn_timeouts"] == 8 and rec["reward_fn/score"] == 0.0
        assert rec["reward_mean"] == pytest.approx(rec["correct_ratio"])  # sum: the verifiable part alone is left
    assert all(r["reward_fn"] == {"score": 0.0, "timeout": True} for r in _rollouts(out))


def test_the_pool_bounds_a_function_that_swallows_its_alarm(reward_module):
    """Real helper processes: a function that catches the alarm is killed at the backstop (a timeout), its helper
    replaced; the next calls are answered."""
    from evolm_nemo.rl.reward_fn import RewardFunction

    row = {"id": "demo-x", "prompt": "p", "gold_answer": "4", "suite": "gsm8k_platinum", "sample": 0}
    slow = RewardFunction("rewards_here:stubborn", 0.2, 2)
    t0 = time.time()
    assert slow.score(["p"] * 2, ["r"] * 2, [row] * 2) == [("timeout", None)] * 2
    assert time.time() - t0 < 30
    slow.close()
    good = RewardFunction("rewards_here:length_penalised", 5.0, 2)
    got = good.score(["p", "p"], ["it is 4", "no"], [row, row])
    want = [reward_module.length_penalised("p", text, row) for text in ("it is 4", "no")]
    assert got == [("ok", {"score": w["score"], "metrics": {"penalty": w["penalty"], "hit": w["hit"]}}) for w in want]
    assert want[0]["hit"] == 1.0 and want[1]["hit"] == 0.0
    good.close()


@pytest.mark.parametrize("extra,words", [
    (["rl.reward=custom", "rl.reward_fn=no_such_module:score"], "cannot import module 'no_such_module'"),
    (["rl.reward=custom", "rl.reward_fn=rewards_here:missing"], "has no 'missing'"),
    (["rl.reward=custom", "rl.reward_fn=rewards_here:constant"], "'constant' is not callable"),
    (["rl.reward=custom", "rl.reward_fn=rewards_here:two_args"], "cannot be called as fn(prompt, response, row)"),
    (["rl.reward=custom", "rl.reward_fn=rewards_here"], "must be package.module:function"),
    (["rl.reward=custom"], "rl.reward=custom needs a reward function"),
    (["rl.reward_fn=rewards_here:boom"], "rl.reward=verifiable does not use it"),
])
def test_a_bad_reward_fn_is_one_line_before_anything_is_built(tmp_path, rl_parent, reward_module, extra, words):
    proc = run_evolm("train", rl_args(tmp_path / "run", rl_parent, "grpo", None, "train.iters=1", *extra),
                     check=False)
    line = one_line_error(proc, "rl.reward_fn")
    assert words in line, line
    assert not (tmp_path / "run").exists()


def test_metrics_are_over_every_data_parallel_rank_and_an_error_on_one_stops_all(tmp_path, rl_parent, reward_module):
    """DP=2: reward_fn/<name> are means over both ranks' responses; a function that fails on one rank's row only
    stops every rank with the same line (no rank waits forever on the other)."""
    out = tmp_path / "dp2"
    run_evolm("train", rl_args(out, rl_parent, "grpo", None, "train.iters=1", "rl.prompts_per_step=4",
                               "rl.samples_per_prompt=4", "rl.save_rollouts=true", "rl.reward=custom",
                               "rl.reward_fn=rewards_here:length_penalised"), nproc=2)
    ro = _rollouts(out) + [json.loads(x) for x in (out / "rollouts.dp1.jsonl").read_text().splitlines()]
    rec = metrics(out)[1]
    assert len(ro) == 16 and len(_rollouts(out)) == 8
    for name in ("score", "penalty", "hit"):
        assert rec[f"reward_fn/{name}"] == pytest.approx(sum(r["reward_fn"][name] for r in ro) / 16)
    assert rec["reward_mean"] == pytest.approx(sum(r["reward"] for r in ro) / 16)
    target = json.loads((out / "rollouts.dp1.jsonl").read_text().splitlines()[0])["id"]
    root = tmp_path / "user_code"
    (root / "one_rank.py").write_text(f"def fn(prompt, response, row):\n    if row['id'] == {target!r}:\n"
                                      "        raise RuntimeError('only here')\n    return 1.0\n")
    proc = run_evolm("train", rl_args(tmp_path / "fails", rl_parent, "grpo", None, "train.iters=1",
                                      "rl.prompts_per_step=4", "rl.samples_per_prompt=4", "rl.reward=custom",
                                      "rl.reward_fn=one_rank:fn"), nproc=2, check=False, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    want = f"error: rl.reward_fn: one_rank:fn raised RuntimeError: only here on the row id='{target}' (iteration 1)"
    assert proc.returncode != 0 and len(lines) == 2 and all(x.startswith(want) for x in lines), proc.stderr[-3000:]
    # each rank exits 2 with that line (torchrun then reports the failed ranks in its own words)
    assert proc.stderr.count("only here") == 2 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    # TP=2: tensor-parallel rank 0 alone calls the function (two ranks of one model must not score apart: a call
    # that times out on one only would split their updates) and hands its scores, or its error, to the other
    proc = run_evolm("train", rl_args(tmp_path / "tp2", rl_parent, "grpo", None, "train.iters=1",
                                      "rl.prompts_per_step=4", "rl.samples_per_prompt=4", "rl.reward=custom",
                                      "rl.reward_fn=one_rank:fn", "parallel.tp=2", "parallel.global_batch_size=16"),
                     nproc=2, check=False, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 2 and all(x.startswith(want) for x in lines), proc.stderr[-3000:]
