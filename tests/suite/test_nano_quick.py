"""EvoLM-nano (issue 21): `recipes/suite/nano.yaml` (the study) and `nano_quick.yaml` (its CI-scale variant) plan on
the nano presets (real Hydra composition and stages.plan_run, no mocks) before the world exists; the world is a
suite node; and nano_quick runs end to end through the real launcher (NeMo-Run's local executor, one process per
node) and `evolm report`, whose takeaways are measured from the runs' own records."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.suite import launch
from evolm_nemo.suite import plan as plan_mod
from evolm_nemo.suite import spec
from tests.conftest import REPO, subprocess_env

P_NANO_1M = 1_000_576  # recipes/model/nano_1m.yaml, by hand


def _topological(plan) -> None:
    seen = set()
    for r in plan.rows:  # parents first
        assert all(d in seen for d in ([r.parent] if r.parent else []) + r.needs), r.node
        seen.add(r.node)


def test_nano_plans_evolms_grid(tmp_path):
    root = tmp_path / "nano"
    suite = spec.load("nano", {"root": str(root)})
    plan = plan_mod.build(suite)
    assert len(plan.rows) == len(suite.nodes) == 59
    stages = {r.node: r.stage for r in plan.rows}
    assert stages["world"] == "data-nano_world" and plan.row("world").parent is None
    train = [r for r in plan.rows if r.kind == "train"]
    assert all(r.params == P_NANO_1M and r.model == "nano_1m" for r in train) and len(train) == 24
    # the pretraining ladder: one WSD run and its branches, 0.5x..4x params in tokens
    assert [plan.row(n).iters for n in ("pt_250", "pt_500", "pt_1000", "pt_stable")] == [250, 500, 1000, 2000]
    assert f"train.branch_from={root}/pt_stable" in plan.row("pt_250").overrides
    world = f"{root}/world"
    assert f"data.paths=[{world}/general,{world}/math]" in plan.row("cpt_fm50").overrides
    assert "data.weights=[0,50]" in plan.row("cpt_fm50").overrides
    assert "data.weights=[8,42]" in plan.row("cpt_fw8_fm42").overrides
    assert [plan.row(f"sft_1k_ep{e}").iters for e in (1, 2, 4, 8)] == [62, 125, 250, 500]
    assert {stages[f"grpo_1k_s{s}"] for s in (1, 2, 3)} == {"grpo"}
    assert sum(r.kind == "eval" for r in plan.rows) == 17
    claims = [t["claim"] for t in suite.report["takeaways"]]
    assert sorted(set(claims)) == ["allocation", "cpt_bridge", "diminishing_returns", "replay_mitigates_forgetting",
                                   "rl_sharpens", "sft_scaling"]
    _topological(plan)
    # the world node's command: the world's module with its own keys, into the node's directory
    job = {j.row.node: j for j in launch.jobs(plan)}["world"]
    assert job.argv == ["-m", "evolm_nemo.data.nano_world", f"out={world}", "val_docs=1000",
                        "sft_subsets=[250,500,750,1000]"]
    assert job.state == "new"


def test_nano_quick_plans(tmp_path):
    suite = spec.load("nano_quick", {"root": str(tmp_path / "nq")})
    plan = plan_mod.build(suite)
    assert len(plan.rows) == len(suite.nodes) == 12
    assert [plan.row(n).iters for n in ("pt_20", "pt_40", "pt_stable")] == [20, 40, 60]
    assert plan.row("sft").stage == "sft" and plan.row("grpo").stage == "grpo"
    assert plan.row("eval_sft").samples == 16  # 8 ID + 8 OOD problems
    _topological(plan)


@pytest.mark.parametrize("node,key", [
    ("{kind: data, make: nano_world, parent: x}", "nodes.w.parent"),
    ("{kind: data, make: nano_world, overrides: [out=/elsewhere]}", "nodes.w.overrides"),
    ("{kind: data, make: nano_world, overrides: [general_doc=5]}", "nodes.w.overrides"),
    ("{kind: data, make: demo_eval}", "nodes.w.parent"),
])
def test_a_bad_world_node_is_named(tmp_path, node, key):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nnodes:\n  x: {{kind: train, experiment: demo}}\n  w: {node}\n")
    with pytest.raises(ConfigError) as e:
        spec.load(str(path))
    assert e.value.key == key


def test_nano_plan_cli():
    proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", "plan", "suite=nano"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "**Totals:** 59 runs" in proc.stdout and "| nano_1m |" in proc.stdout


def test_nano_presets_compose_with_stage_rates():
    """recipes/model|optim/nano_*.yaml: the sizes the READMEs state, and post-training rates from stage_lr an order
    of magnitude or so below pretraining's (as tests/config/test_config.py checks for the other presets)."""
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.model.build import param_count

    for size, params in (("nano_1m", P_NANO_1M), ("nano_4m", 4_152_064)):
        cfg = compose("config", [f"model={size}", f"optim={size}"], RootConfig)
        assert cfg.model.name == size and cfg.model.vocab_size == 1024 and param_count(cfg.model) == params
        pre = cfg.optim
        for stage in ("sft", "rm", "dpo", "ppo", "grpo"):
            o = compose("config", [f"stage={stage}", f"optim={size}"], RootConfig).optim
            assert o.lr == pre.stage_lr[stage] and o.lr <= pre.lr / 3 and o.min_lr == 0.0, (size, stage, o.lr)


@pytest.fixture(scope="module")
def nano_quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("nano_quick")
    cmd = [sys.executable, "-m", "evolm_nemo.cli", "suite", "launch", "suite=nano_quick", "executor=local",
           f"root={root}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, proc


def test_nano_quick_runs_through_the_launcher_and_the_report(nano_quick):
    root, proc = nano_quick
    suite = spec.load("nano_quick", {"root": str(root)})
    for name in suite.order:
        assert f"[suite] {name}: done in " in proc.stdout, name
    world = json.loads((root / "world" / "manifest.json").read_text())
    assert world["sets"] == {"sft": 64, "rl": 32, "eval_id": 8, "eval_ood": 8} and world["sft"]["sft"] == 64
    for name in ("eval_sft", "eval_grpo"):
        result = json.loads((root / name / "result.json").read_text())
        assert {s: v["n"] for s, v in result["downstream"]["suites"].items()} == {"gsm8k_platinum": 8, "tabmwp": 8}
    # CPT without replay trained on math only, yet measured general text; with replay both
    no_replay = json.loads((root / "cpt_fm50" / "metrics.jsonl").read_text().splitlines()[-1])
    replay = json.loads((root / "cpt_fw8_fm42" / "metrics.jsonl").read_text().splitlines()[-1])
    assert no_replay["tokens_general"] == 0 and replay["tokens_general"] > 0
    report = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "report", "suite=nano_quick", f"root={root}"],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    md = (root / "report" / "report.md").read_text()
    assert "](takeaways.png)" in md and (root / "report" / "takeaways.png").stat().st_size > 20_000
    verdicts = {}
    for line in md.split("## EvoLM's takeaways")[1].splitlines():  # | n | says | verdict | evidence | seeds |
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            verdicts[cells[0]] = cells[2].strip("*")
    assert len(verdicts) == 3 and all(v in ("holds", "does not hold") for v in verdicts.values()), md
    # the forgetting the report states is the runs' own record
    forgot = no_replay["val_loss_general"] - no_replay["val_loss_general_at_0"]
    assert f"no replay {forgot:+.3f}" in md
