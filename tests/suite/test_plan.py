"""`evolm suite plan`: the arithmetic on EvoLM's presets against values computed by hand, and the graph's errors as
one line (real Hydra composition and stages.plan_run, no mocks)."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.suite import plan as plan_mod
from evolm_nemo.suite import spec
from tests.conftest import REPO, subprocess_env

# evolm_1b by hand: h=2048, L=22, ffn=4896, 32 heads of 64, 4 KV groups (kv width 256), vocab 32000.
#   attention per layer 2048*(2048+2*256) + 2048*2048 = 9,437,184; SwiGLU 3*2048*4896 = 30,081,024; norms 4,096
#   22 layers = 869,490,688; + final norm 2,048 + embedding and output 2*32000*2048 = 131,072,000
P_1B = 1_000_564_736
N_1B = P_1B - 32_000 * 2_048  # 935,028,736 non-embedding-input parameters
FPT_1B = 6 * N_1B + 12 * 22 * 2_048 * 2_048  # 5,610,172,416 + 1,107,296,256 = 6,717,468,672
H100 = 989e12


def gpu_hours(flops: float, mfu: float = 0.4) -> float:
    return flops / (mfu * H100) / 3600


@pytest.fixture(scope="module")
def evolm_plan():
    suite = spec.load("evolm")
    order = spec.select(suite, ["eval_ppo_1b_evolm", "eval_pretrain_4b_320b", "rm_1b_pairwise", "dpo_1b"])
    return plan_mod.build(suite, order)


def test_pretrain_1b_160b_by_hand(evolm_plan):
    r = evolm_plan.row("pretrain_1b_160b")
    assert FPT_1B == 6_717_468_672
    assert r.params == P_1B
    assert r.iters == 152_588  # ceil(160e9 / (512 * 2048)) = ceil(152,587.89)
    assert r.tokens == 160_000_114_688  # 152,588 * 1,048,576
    assert r.flops == pytest.approx(160_000_114_688 * 6_717_468_672, rel=1e-12)
    assert r.gpu_hours == pytest.approx(754.69, abs=0.01)  # 1.07480e21 / (0.4 * 989e12) / 3600
    assert r.ckpt_bytes == P_1B * 14  # bf16 weights 2 + fp32 main params 4 + Adam moments 8
    assert (r.nodes, r.gpus) == (4, 8)


def test_pretrain_4b_320b_by_hand(evolm_plan):
    # evolm_4b: h=4096, L=28, ffn=7792, kv width 4*128=512: attention 4096*(4096+1024)+4096^2 = 37,748,736,
    # SwiGLU 3*4096*7792 = 95,748,096, norms 8,192 -> 133,505,024 per layer; 28 layers = 3,738,140,672
    # + 4,096 + 2*32000*4096 = 262,144,000 -> 4,000,288,768
    p = 4_000_288_768
    fpt = 6 * (p - 32_000 * 4_096) + 12 * 28 * 4_096 * 2_048
    r = evolm_plan.row("pretrain_4b_320b")
    assert r.params == p
    assert r.iters == 152_588  # ceil(320e9 / (1024 * 2048))
    assert r.tokens == 152_588 * 2_097_152
    assert r.flops == pytest.approx(152_588 * 2_097_152 * fpt, rel=1e-12)
    assert r.gpu_hours == pytest.approx(gpu_hours(r.flops))
    assert r.ckpt_bytes == p * 14


def test_cpt_sft_ppo_1b_by_hand(evolm_plan):
    cpt = evolm_plan.row("cpt_1b_160b_fw8_fm42")
    assert cpt.iters == 47_684  # ceil(50e9 / 1,048,576) = ceil(47,683.7)
    assert cpt.parent == "pretrain_1b_160b"
    assert "train.init_from=runs/evolm/pretrain_1b_160b/checkpoints" in cpt.overrides
    sft = evolm_plan.row("sft_1b_fw8_fm42_100k_ep1")
    assert sft.iters == 781  # 100,000 examples x 1 epoch // 128
    assert sft.tokens == 781 * 128 * 2_048  # bound: every example padded to the 2048 context
    assert sft.flops == pytest.approx(781 * 128 * 2_048 * FPT_1B, rel=1e-12)
    ppo = evolm_plan.row("ppo_1b_evolm")
    assert ppo.iters == 97  # 100,000 prompts x 1 epoch // 1024 prompts per step
    tokens = 97 * 1_024 * (1_024 + 1_024)
    assert ppo.tokens == tokens
    # actor + critic training passes (1 PPO epoch) + rollout, log-prob and value forwards (1/3 each), no KL
    assert ppo.flops == pytest.approx(tokens * (2 * FPT_1B + 3 * FPT_1B / 3), rel=1e-12)
    critic = P_1B - 32_000 * 2_048 + 2_048
    assert ppo.ckpt_bytes == 14 * (P_1B + critic)
    hf = evolm_plan.row("hf_ppo_1b_evolm")
    assert hf.ckpt_bytes == 2 * P_1B  # bf16 HF weights
    ev = evolm_plan.row("eval_ppo_1b_evolm")
    problems = 1209 + 5000 + 800 + 500 + 1000 + 500
    assert ev.samples == problems
    assert ev.flops == pytest.approx(problems * 17 * 2_048 * FPT_1B / 3, rel=1e-12)
    assert ev.meta == {"size": "1B", "pretrain_tokens": 160_000_114_688, "stage": "rl",
                       "group": "sft_1b_fw8_fm42_100k_ep1"}


def test_rm_dpo_by_hand(evolm_plan):
    rm = evolm_plan.row("rm_1b_pairwise")
    assert rm.iters == 50_000 // 128
    assert rm.tokens == 390 * 128 * 2 * 2_048  # pairs: two sequences each
    assert rm.ckpt_bytes == 14 * (P_1B - 32_000 * 2_048 + 2_048)  # value head instead of the output layer
    dpo = evolm_plan.row("dpo_1b")
    assert dpo.flops == pytest.approx(390 * 128 * 2 * 2_048 * FPT_1B + 50_000 * 2 * 2_048 * FPT_1B / 3, rel=1e-12)


def test_whole_grid_totals_and_order():
    suite = spec.load("evolm", {"mfu": 0.5})
    plan = plan_mod.build(suite)
    assert len(plan.rows) == len(suite.nodes) and plan.totals["train"] >= 70
    seen = set()
    for r in plan.rows:  # topological: parents first
        assert all(d in seen for d in ([r.parent] if r.parent else []) + r.needs), r.node
        seen.add(r.node)
    r = plan.row("pretrain_1b_160b")
    assert r.gpu_hours == pytest.approx(754.69 * 0.4 / 0.5, abs=0.01)
    assert plan.totals["flops"] == pytest.approx(sum(x.flops for x in plan.rows))
    rows = list(csv.DictReader(io.StringIO(plan_mod.csv_text(plan))))
    assert rows[-1]["node"] == "TOTAL" and len(rows) == len(plan.rows) + 1
    assert rows[0]["node"] == plan.rows[0].node and int(rows[9]["iterations"]) == plan.rows[9].iters
    md = plan_mod.markdown(plan)
    assert "| 10 | pretrain_1b_160b | pretrain |" in md and "## DAG (topological order)" in md


def _suite(tmp_path, body: str):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nroot: " + str(tmp_path / "runs") + "\ngpus_per_node: 1\nnodes:\n" + body)
    return str(path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_order_follows_parents_not_file_order(tmp_path):
    path = _suite(tmp_path, "  c: {kind: export, parent: b}\n  b: {experiment: demo_cpt, parent: a}\n"
                            "  a: {experiment: demo}\n  d: {kind: eval, parent: c, needs: [a]}\n")
    assert spec.load(path).order == ["a", "b", "c", "d"]


def test_an_output_a_node_reads_is_a_dependency(tmp_path):
    """`${out:X}` in a node's overrides or the suite's train_overrides orders X first and is a dependency (plan
    rows, `only=`), without `needs`."""
    path = _suite(tmp_path, "  pt: {experiment: demo, overrides: [\"data.paths=[${out:world}/general]\"]}\n"
                            "  world: {kind: data, make: nano_world}\n")
    suite = spec.load(path)
    assert suite.order == ["world", "pt"] and suite.nodes["pt"].needs == ["world"]
    assert spec.select(suite, ["pt"]) == ["world", "pt"]
    path = _suite(tmp_path, "  pt: {experiment: demo}\n  world: {kind: data, make: nano_world}\n"
                            "  x: {kind: export, parent: pt}\n")
    text = open(path).read().replace("nodes:\n",
                                     "train_overrides: [\"data.tokenizer=${out:world}/tokenizer\"]\nnodes:\n")
    open(path, "w").write(text)
    suite = spec.load(path)
    assert suite.order == ["world", "pt", "x"] and suite.nodes["pt"].needs == ["world"]
    assert suite.nodes["x"].needs == []  # train_overrides are the train nodes' only
    with pytest.raises(ConfigError) as exc:
        spec.load(_suite(tmp_path, "  pt: {experiment: demo, overrides: [\"train.branch_from=${out:nope}\"]}\n"))
    assert exc.value.key == "nodes.pt.overrides" and "${out:nope} names no node of suite s" in exc.value.message


@pytest.mark.parametrize("layout, ok", [("", False), ("train.packing=true", True),
                                        ("parallel.max_tokens_per_microbatch=4096", True)])
def test_rl_mini_batches_follow_the_trainers_rule(tmp_path, layout, ok):
    """64 sequences per rank split into rl.mini_batches=2, not into 2 x micro_batch_size=48: refused only where the
    trainer (stages.rl.plan_iters) refuses it, i.e. unless the microbatches are packed or by a token budget."""
    body = ("  a: {experiment: demo}\n  b: {experiment: demo_sft, parent: a}\n"
            f"  c: {{experiment: demo_grpo, parent: b, overrides: [rl.mini_batches=2, parallel.micro_batch_size=48"
            f"{', ' + layout if layout else ''}]}}\n")
    suite = spec.load(_suite(tmp_path, body))
    if ok:
        assert plan_mod.build(suite).row("c").iters == 30
        return
    with pytest.raises(ConfigError) as exc:
        plan_mod.build(suite)
    assert exc.value.key == "nodes.c" and exc.value.message == (
        "parallel.micro_batch_size: each rank trains on 64 sequences per step: they must split into "
        "rl.mini_batches=2 x micro_batch_size=48")


def test_eval_max_model_len_follows_the_models_context(tmp_path):
    """An eval node's max_model_len: null is the model's context (the demo model's 128-token model.seq_length, which
    its export writes as max_position_embeddings) when shorter than EvoLM's 2048; a longer explicit value is refused
    at plan time, not by the evaluation after the training."""
    body = "  a: {experiment: demo}\n  x: {kind: export, parent: a}\n  e: {kind: eval, parent: x%s}\n"
    rows = plan_mod.build(spec.load(_suite(tmp_path, body % "")))
    assert rows.row("e").notes[-1].endswith("<= 128 tokens"), rows.row("e").notes
    with pytest.raises(ConfigError) as exc:
        plan_mod.build(spec.load(_suite(tmp_path, body % ", overrides: [max_model_len=129]")))
    assert exc.value.key == "nodes.e" and exc.value.message.startswith(
        "max_model_len: 129 is longer than the model's context of 128 tokens (a's model.seq_length)")


@pytest.mark.parametrize("mode, override, message", [
    ("", "n=0", "n: must be >= 1, got 0"),
    ("", "top_p=3", "top_p: must be in (0, 1], got 3.0"),
    ("", "temperature=-1", "temperature: the sampled pass needs a finite temperature > 0, got -1.0"),
    ("", "scoring=exact", "scoring: expected evolm or strict, got 'exact'"),
    ("", "backend=sglang", "backend: unknown backend 'sglang'; choose auto, trtllm, vllm, hf"),
    ("", "seed=-1", "seed: must be an integer in [0, 4294967295], got -1"),
    ("mode: upstream, ", "tasks=[mmlu]", "tasks: unknown task 'mmlu'; choose from hellaswag"),
    ("mode: upstream, ", "limit=0", "limit: must be >= 1 (or null for every document), got 0"),
    ("mode: upstream, ", "batch_size=big", "batch_size: expected a positive integer or auto, got 'big'"),
    ("mode: upstream, ", "batch_size='²'", "batch_size: expected a positive integer or auto, got '²'"),  # int() raised
    ("mode: upstream, ", "dtype=fp8", "dtype: expected one of auto, bfloat16"),
])
def test_eval_settings_are_checked_before_any_training(tmp_path, mode, override, message):
    """An eval node's settings are checked by the evaluation's own rules (evaluate.check_settings /
    upstream_settings) when the suite is planned (also before `suite launch`, dry run or not): they were checked
    only when the node ran, after every training it depends on."""
    body = f"  a: {{experiment: demo}}\n  x: {{kind: export, parent: a}}\n  e: {{kind: eval, {mode}parent: x, " \
           f"overrides: [\"{override}\"]}}\n"
    with pytest.raises(ConfigError) as exc:
        plan_mod.build(spec.load(_suite(tmp_path, body)))
    assert exc.value.key == "nodes.e" and exc.value.message.startswith(message), exc.value.message


@pytest.mark.parametrize("body, line", [
    ("  a: {experiment: demo}\n  b: {experiment: demo_cpt, parent: x}\n",
     "error: nodes.b.parent: names 'x', which is not a node of suite s"),
    ("  a: {experiment: demo_cpt, parent: c}\n  b: {experiment: demo_cpt, parent: a}\n"
     "  c: {experiment: demo_cpt, parent: b}\n",
     "error: nodes.b.parent: cycle: a -> c -> b -> a (each depends on the next); break it"),
    ("  a: {experiment: demo, gpu: 2}\n", "error: nodes.a.gpu: unknown key for a train node; valid keys: kind, "
                                           "parent, needs, overrides, nodes, gpus, time, note, experiment, samples, "
                                           "tokens_per_example"),
    ("  a: {experiment: demo}\n  b: {kind: eval, parent: a}\n",
     "error: nodes.b.parent: an evaluation reads an HF export; a is a train node (add an export node between them)"),
    ("  a: {experiment: demo_sft}\n",
     "error: nodes.a.parent: stage=sft starts from a parent run: name its node (or set train.init_from in overrides)"),
    ("  a: {experiment: demo_nope}\n", "error: nodes.a: experiment: no recipe 'demo_nope' in recipes/experiment/; did "
                                        "you mean demo_ppo or demo_dpo or demo_cpt?"),
    ("  a: {experiment: demo}\n  b: {experiment: demo_sft, parent: a}\n"
     "  c: {experiment: demo_ppo, parent: b, overrides: [rl.temperature=-1]}\n",
     "error: nodes.c: rl.temperature: must be >= 0 (0: greedy rollouts), got -1.0"),
    ("  a: {experiment: demo}\n  b: {experiment: demo_sft, parent: a}\n"
     "  c: {experiment: demo_grpo, parent: b, overrides: [rl.top_p=0]}\n",
     "error: nodes.c: rl.top_p: must be in (0, 1], got 0.0"),
    ("  a: {experiment: demo}\n  b: {experiment: demo_sft, parent: a}\n"
     "  c: {experiment: demo_grpo, parent: b, overrides: [rl.reward_model=runs/rm]}\n",
     "error: nodes.c: rl.reward_model: rl.reward=verifiable does not use it; set rl.reward=rm (the reward model alone) "
     "or rl.reward=sum (weighted with the verifiable reward), or leave rl.reward_model null"),
])
def test_bad_suites_are_one_line(tmp_path, body, line):
    proc = _cli("plan", f"suite={_suite(tmp_path, body)}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == line
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_node_count_checked_against_batch():
    with pytest.raises(ConfigError) as exc:  # 8 nodes x 8 GPUs: dp 64 x micro 16 = 1024 does not divide 512
        suite = spec.load("evolm")
        suite.nodes["pretrain_1b_160b"].nodes = 8
        plan_mod.build(suite, ["pretrain_1b_160b"])
    assert exc.value.key == "nodes.pretrain_1b_160b" and "parallel.global_batch_size" in exc.value.message


def test_unknown_suite_and_key():
    proc = _cli("plan", "suite=nope")
    assert proc.returncode == 2 and proc.stderr.startswith("error: suite: no suite 'nope' in ")
    proc = _cli("plan", "suite=tiny", "mfuu=0.3")
    assert proc.returncode == 2 and proc.stderr.startswith("error: mfuu: unknown key; valid keys:")
