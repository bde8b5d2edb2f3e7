"""The tiny suite end to end on the local executor (CPU, real processes): pretrain x2 -> CPT x2 -> SFT x2 -> PPO ->
HF exports -> downstream evaluation; the plan's iterations and checkpoint sizes against what the trainer did and
wrote; a relaunch starts nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.suite import plan as plan_mod
from evolm_nemo.suite import spec
from tests.conftest import REPO, subprocess_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite_tiny")
    cmd = [sys.executable, "-m", "evolm_nemo.cli", "suite", "launch", "suite=tiny", "executor=local", f"root={root}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, cmd, proc


def test_every_node_ran_and_finished(tiny):
    root, _, proc = tiny
    suite = spec.load("tiny", {"root": str(root)})
    for name in suite.order:
        assert f"[suite] {name}: done in " in proc.stdout, name
    assert f"[suite] tiny: {len(suite.order)} nodes complete" in proc.stdout
    for name in ("eval_sft_ep2", "eval_ppo_sft_ep2"):
        result = json.loads((root / name / "result.json").read_text())
        assert result["downstream"]["suites"]["gsm8k_platinum"]["n"] == 4
        assert result["group"] == "sft_ep2" and result["size"] == "tiny" and result["pretrain_tokens"] == 81_920
    assert json.loads((root / "eval_ppo_sft_ep2" / "result.json").read_text())["stage"] == "rl"
    assert json.loads((root / "eval_sft_ep2" / "result.json").read_text())["stage"] == "sft"
    hf = json.loads((root / "export_ppo_sft_ep2" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"]


def test_plan_matches_what_the_trainer_did(tiny):
    root, _, _ = tiny
    plan = plan_mod.build(spec.load("tiny", {"root": str(root)}))
    for row in plan.rows:
        if row.kind != "train":
            continue
        last = ckpt.latest(root / row.node / "checkpoints")
        meta = json.loads((last / "evolm.json").read_text())
        assert meta["planned_iters"] == row.iters == meta["iteration"], row.node  # the trainer's own plan
        lineage_parent = meta["config"]["train"]["init_from"]
        if row.parent:
            assert lineage_parent == f"{root}/{row.parent}/checkpoints"
        on_disk = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
        if row.stage == "ppo":
            on_disk += sum(p.stat().st_size for p in ckpt.latest(root / row.node / "critic").rglob("*")
                           if p.is_file())
        assert 1.0 <= on_disk / row.ckpt_bytes <= 1.15, (row.node, on_disk, row.ckpt_bytes)
    for row in plan.rows:
        if row.kind == "export":
            on_disk = sum(p.stat().st_size for p in (root / row.node).glob("*.safetensors"))
            assert 1.0 <= on_disk / row.ckpt_bytes <= 1.05, (row.node, on_disk, row.ckpt_bytes)


def test_relaunch_starts_nothing(tiny):
    root, cmd, _ = tiny
    logs = {p.name: p.stat().st_size for p in (root / "logs").iterdir()}
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("; skipped") == 12 and "starting" not in proc.stdout
    assert {p.name: p.stat().st_size for p in (root / "logs").iterdir()} == logs


def test_report_fills_the_tables_from_the_results(tiny):
    root, _, _ = tiny
    out = root / "report"
    proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "report", "suite=tiny", f"root={root}",
                           f"out={out}"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sft = json.loads((root / "eval_sft_ep2" / "result.json").read_text())["downstream"]
    rl = json.loads((root / "eval_ppo_sft_ep2" / "result.json").read_text())["downstream"]
    want = " | ".join(f"{100 * sft['id_avg'][m]:.1f}/{100 * rl['id_avg'][m]:.1f} (-/-)"
                      for m in ("pass1", "maj16", "pass16"))
    md = (out / "report.md").read_text()
    assert f"| tiny-80it | {want} |" in md and "0 results missing" in md
    assert f"| FW8+FM42 (2 epochs of SFT) | {100 * sft['suites']['gsm8k_platinum']['pass1']:.2f} | - |" in md
    assert (out / "report.csv").read_text().splitlines()[0] == "table,row,metric,ours,evolm"
