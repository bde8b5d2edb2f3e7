"""`recipes/suite/nano_quick.yaml` (EvoLM-nano, issue 21): plans without error on the nano presets (real Hydra
composition and stages.plan_run, no mocks), before the generated world exists."""

from __future__ import annotations

import subprocess
import sys

from evolm_nemo.suite import plan as plan_mod
from evolm_nemo.suite import spec
from tests.conftest import REPO, subprocess_env

P_NANO_1M = 1_000_576  # recipes/model/nano_1m.yaml, by hand


def test_nano_quick_plans(tmp_path):
    suite = spec.load("nano_quick", {"root": str(tmp_path / "nq")})
    plan = plan_mod.build(suite)
    assert len(plan.rows) == len(suite.nodes) == 10
    kinds = {r.node: r.stage for r in plan.rows}
    assert sum(s == "pretrain" for s in kinds.values()) == 2 and sum(s == "cpt" for s in kinds.values()) == 2
    assert kinds["sft_fw8_fm42"] == "sft" and kinds["grpo_fw8_fm42"] == "grpo"
    assert {r.node for r in plan.rows if r.kind == "export"} == {"export_sft_fw8_fm42", "export_grpo_fw8_fm42"}
    train = [r for r in plan.rows if r.kind == "train"]
    assert all(r.params == P_NANO_1M and r.model == "nano_1m" for r in train)
    assert plan.row("pretrain_100it").iters == 100 and plan.row("pretrain_200it").iters == 200
    world = f"{tmp_path / 'nq'}/world"
    replay = plan.row("cpt_200it_fw8_fm42").overrides
    assert f"data.paths=[{world}/general,{world}/math]" in replay and "data.weights=[8,42]" in replay
    assert f"data.paths=[{world}/math]" in plan.row("cpt_200it_fm50").overrides
    ev = plan.row("eval_sft_fw8_fm42")
    assert "tasks=[gsm8k_platinum,tabmwp]" in ev.overrides and ev.samples == 16  # 8 ID + 8 OOD problems
    seen = set()
    for r in plan.rows:  # topological: parents first
        assert all(d in seen for d in ([r.parent] if r.parent else []) + r.needs), r.node
        seen.add(r.node)


def test_nano_quick_plan_cli():
    proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", "plan", "suite=nano_quick"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "**Totals:** 10 runs" in proc.stdout and "| nano_1m |" in proc.stdout


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

