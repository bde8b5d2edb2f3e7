"""PPO and GRPO on the one engine (real megatron-core, gloo): the documented contract; EvoLM's preset (one PPO epoch
over one mini-batch: every ratio exactly 1, the clip never acts, no reference model); the rollout engine's log-probs
equal the trainer's; a tiny run learns; the split into microbatches and DP ranks changes nothing; TP=2 equals TP=1;
SIGKILL and resume reproduces the uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest

from evolm_nemo.checkpoint import io as ckpt
from tests.conftest import (one_line_error, refused_in_process, run_evolm, train_then_sigkill,
                            train_then_sigkill_when, tree_bytes)


def metrics(out) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r}


def rl_args(out, parent, stage="ppo", data=None, *extra):
    """The contract (`evolm train stage=... train.init_from=<SFT> data.paths=[<rl.jsonl>] train.iters=N`) plus
    run-local settings."""
    return [f"run.out_dir={out}", f"stage={stage}", f"train.init_from={parent['sft']}",
            f"data.paths=[{data or parent['rl']}]", "train.progress=false", "train.tensorboard=false",
            "train.log_interval=1", "rl.max_response_tokens=48", "optim.min_lr=0", *extra]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_contract_and_evolm_preset(tmp_path, rl_parent, stage):
    out = tmp_path / stage
    # those paths run too; GRPO samples a tempered, truncated distribution (the ratio and the engine's log-probs
    # must describe that one)
    options = ["rl.tis_cap=5.0", "rl.loss_agg=seq_mean", "rl.temperature=0.7", "rl.top_p=0.9"] if stage == "grpo" else []
    interval = 2 if stage == "ppo" else 5  # every 2 steps; the final actor always, also in a run shorter than that
    proc = run_evolm("train", rl_args(out, rl_parent, stage, None, "train.iters=2", f"rl.val_data={rl_parent['rl8']}",
                                      f"rl.val_interval={interval}", "rl.val_size=4", *options))
    rows = metrics(out)
    assert sorted(rows) == [1, 2]
    assert "val_accuracy" not in rows[1] and 0.0 <= rows[2]["val_accuracy"] <= 1.0  # greedy validation
    for r in rows.values():
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["response_length_mean"] > 0
        # one PPO epoch over one mini-batch (EvoLM's verl run): the ratio is exactly 1, the clip never acts
        assert r["ratio_mean"] == 1.0 and r["clip_fraction"] == 0.0 and r["kl_old"] == 0.0
        # the trainer's recomputed log-probs equal the rollout engine's (fp32 on CPU)
        assert r["logp_mismatch_max"] < 1e-4 and abs(r["prob_ratio_mean"] - 1.0) < 1e-5
        assert "kl_ref" not in r  # KL off: no reference model exists
    # rl8 is the first 8 prompts of the training set: validating on them is said
    assert "warning: rl.val_data: 4 of its 4 validation prompts are training prompts too" in proc.stderr
    roles = "actor + critic |" if stage == "ppo" else "actor |"
    assert roles in proc.stdout and "reference" not in proc.stdout
    meta = json.loads((ckpt.latest(out / "checkpoints") / "evolm.json").read_text())
    assert [s["stage"] for s in meta["lineage"]["stages"]][-2:] == ["sft", stage]
    if stage == "ppo":
        assert "value_loss" in rows[1] and "explained_variance" in rows[1]
        critic = json.loads((ckpt.latest(out / "critic") / "evolm.json").read_text())
        assert critic["head"] == "value" and critic["role"] == "critic"
        # the actor exports like any checkpoint, the critic as a one-label sequence classifier (both verified)
        run_evolm("export-hf", [f"src={out}", f"dst={tmp_path / 'actor_hf'}", "progress=false"])
        run_evolm("export-hf", [f"src={out / 'critic'}", f"dst={tmp_path / 'critic_hf'}", "progress=false"])
        assert json.loads((tmp_path / "actor_hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        config = json.loads((tmp_path / "critic_hf" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        assert config.get("num_labels", len(config.get("id2label") or {})) == 1
        assert "ppo" in (tmp_path / "actor_hf" / "README.md").read_text()


@pytest.mark.parametrize("stage,extra", [
    ("grpo", ["rl.prompts_per_step=8", "rl.samples_per_prompt=8", "optim.lr=1e-4", "parallel.micro_batch_size=16"]),
    ("ppo", ["rl.prompts_per_step=8", "rl.samples_per_prompt=4", "optim.lr=1e-4", "rl.critic_lr=1e-3",
             "parallel.micro_batch_size=16"]),
])
def test_a_tiny_run_learns(tmp_path, rl_parent, stage, extra):
    """8 fixed prompts the SFT model solves now and then: the mean reward rises by a clear margin."""
    out = tmp_path / stage
    run_evolm("train", rl_args(out, rl_parent, stage, rl_parent["rl8"], "train.iters=24", "train.epochs=null",
                               "optim.warmup_fraction=0", *extra))
    rewards = [r["reward_mean"] for _, r in sorted(metrics(out).items())]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, (stage, rewards)


GREEDY = ["rl.temperature=0", "rl.prompts_per_step=4", "train.iters=2", "rl.critic_lr=1e-3", "optim.lr=1e-4",
          "optim.warmup_fraction=0"]  # greedy rollouts: the same responses whichever rank rolls a prompt out


def _compare(got, want, keys=("loss", "actor_grad_norm", "value_loss", "critic_grad_norm", "reward_mean",
                              "response_length_mean"), tol=1e-6):
    for it in want:
        for key in keys:
            assert abs(got[it][key] - want[it][key]) <= tol * max(1.0, abs(want[it][key])), \
                (it, key, got[it][key], want[it][key])


@pytest.fixture(scope="module")
def references() -> dict:
    """The split test's one-process greedy PPO run (micro-batch 4), kept as the TP test's reference: the split test
    proves micro-batch size changes nothing."""
    return {}


def test_split_into_microbatches_and_ranks_changes_nothing(tmp_path, rl_parent, references):
    """PPO (GAE, whitening): micro-batch 4/1, DP=2 (validation split over the replicas), packed rows (one rank and two; GAE stays within each
    sequence) and a token budget give the same steps; with sequence-mean aggregation, packed rows (the actor's and the
    critic's segments) give the padded run's steps too."""
    runs = {}
    # greedy validation of the final actor on 5 prompts: two replicas validate 3 + 2 of them, one process all 5
    val = [f"rl.val_data={rl_parent['rl8']}", "rl.val_interval=2", "rl.val_size=5"]
    for name, extra, nproc in (("m4", ["parallel.micro_batch_size=4", *val], 1),
                               ("m1", ["parallel.micro_batch_size=1"], 1),
                               ("dp2", ["parallel.micro_batch_size=1", *val], 2),
                               ("packed", ["train.packing=true"], 1), ("packed_dp2", ["train.packing=true"], 2),
                               ("budget", ["parallel.max_tokens_per_microbatch=128"], 1)):
        out = tmp_path / name
        run_evolm("train", rl_args(out, rl_parent, "ppo", None, *GREEDY, *extra), nproc=nproc)
        runs[name] = metrics(out)
    assert runs["m4"][1]["actor_grad_norm"] > 0 and runs["m4"][2]["actor_grad_norm"] > 0
    for name in runs:
        _compare(runs[name], runs["m4"])
    assert runs["dp2"][2]["val_examples"] == runs["m4"][2]["val_examples"] == 5
    assert runs["dp2"][2]["val_accuracy"] == runs["m4"][2]["val_accuracy"]
    references["ppo"] = runs["m4"]
    seq = {}
    for name, extra in (("padded", ["parallel.micro_batch_size=4"]), ("packed", ["train.packing=true"])):
        out = tmp_path / f"seq_{name}"
        run_evolm("train", rl_args(out, rl_parent, "ppo", None, *GREEDY, "rl.loss_agg=seq_mean", *extra))
        seq[name] = metrics(out)
    _compare(seq["packed"], seq["padded"], keys=("loss", "actor_grad_norm", "value_loss", "critic_grad_norm"))


def test_grpo_layouts_change_nothing(tmp_path, rl_parent):
    """GRPO with sequence-mean aggregation (a packed row's sequences are its segments), dynamic sampling and TIS,
    two mini-batches: padded, packed and by a token budget give the same steps -- the budget run on two
    data-parallel ranks: sampled rollouts are keyed by a sequence's place in the step's global batch, so two replicas
    sample what one process does."""
    runs = {}
    for name, extra, nproc in (("padded", ["parallel.micro_batch_size=2"], 1), ("packed", ["train.packing=true"], 1),
                               ("budget_dp2", ["parallel.max_tokens_per_microbatch=128"], 2)):
        out = tmp_path / name
        run_evolm("train", rl_args(out, rl_parent, "grpo", None, "train.iters=2", "rl.prompts_per_step=4",
                                   "rl.samples_per_prompt=4", "rl.loss_agg=seq_mean", "rl.dynamic_sampling=true",
                                   "rl.tis_cap=5.0", "rl.mini_batches=2", "optim.lr=1e-4", "optim.warmup_fraction=0",
                                   *extra), nproc=nproc)
        runs[name] = metrics(out)
    assert runs["padded"][1]["actor_grad_norm"] > 0
    for name in ("packed", "budget_dp2"):  # two ranks sum the gradient in another order: 1e-5, the layouts' bound
        _compare(runs[name], runs["padded"], keys=("loss", "actor_grad_norm", "reward_mean", "entropy",
                                                    "groups_dropped", "response_length_mean"), tol=1e-5)


def test_a_mini_batch_dynamic_sampling_emptied_is_no_update(tmp_path, rl_parent):
    """Gold answers no response can give: every group's rewards are equal, dynamic sampling drops them all, and no
    optimizer step runs (with weight decay on, a zero-gradient AdamW step would still shrink the weights): the actor
    leaves the run exactly as the SFT parent entered it, the skipped updates are counted and the learning-rate
    schedule still advances."""
    import safetensors.torch

    never = tmp_path / "never.jsonl"
    never.write_text("".join(json.dumps({**json.loads(line), "gold_answer": "-987654.125"}) + "\n"
                             for line in rl_parent["rl8"].read_text().splitlines()))
    out = tmp_path / "run"
    run_evolm("train", rl_args(out, rl_parent, "grpo", never, "train.iters=2", "rl.prompts_per_step=4",
                               "rl.samples_per_prompt=2", "rl.mini_batches=2", "rl.dynamic_sampling=true",
                               "optim.weight_decay=0.1", "optim.lr=1e-3", "optim.warmup_fraction=0.5",
                               "parallel.micro_batch_size=2"))
    rows = metrics(out)
    for r in rows.values():
        assert r["reward_mean"] == 0.0 and r["groups_dropped"] == 4 and r["updates_skipped"] == 2
        assert r["loss"] == 0.0 and r["actor_grad_norm"] == 0.0
    assert rows[2]["lr"] > rows[1]["lr"]  # warmup over the 4 engine steps went on
    for src, dst in ((rl_parent["sft"], tmp_path / "sft_hf"), (out, tmp_path / "rl_hf")):
        run_evolm("export-hf", [f"src={src}", f"dst={dst}", "progress=false"])
    before = safetensors.torch.load_file(tmp_path / "sft_hf" / "model.safetensors")
    after = safetensors.torch.load_file(tmp_path / "rl_hf" / "model.safetensors")
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


def test_tp2_equals_tp1(tmp_path, rl_parent, references):
    """TP=2, and TP=2 with sequence parallelism (each row's length rounded up to a multiple of 2, packed rows too),
    give the one-process steps (the split test's run, else made here)."""
    if "ppo" not in references:
        run_evolm("train", rl_args(tmp_path / "tp1", rl_parent, "ppo", None, *GREEDY, "parallel.micro_batch_size=2"))
        references["ppo"] = metrics(tmp_path / "tp1")
    for name, extra in (("tp2", []), ("tp2_sp", ["parallel.sp=true"]), ("tp2_sp_packed", ["parallel.sp=true", "train.packing=true"])):
        out = tmp_path / name
        run_evolm("train", rl_args(out, rl_parent, "ppo", None, *GREEDY, "parallel.micro_batch_size=2",
                                   "parallel.tp=2", "parallel.global_batch_size=8", *extra), nproc=2)
        _compare(metrics(out), references["ppo"], tol=1e-5)


def test_sigkill_mid_rl_then_resume_matches(tmp_path, rl_parent):
    args = ["train.iters=8", "train.save_interval=2", "train.keep_last=10", "rl.prompts_per_step=8"]
    full = tmp_path / "full"
    run_evolm("train", rl_args(full, rl_parent, "ppo", None, *args))
    want = metrics(full)
    out = tmp_path / "killed"
    killed_at = train_then_sigkill(rl_args(out, rl_parent, "ppo", None, *args), out, at_least=2)
    assert killed_at < 8
    resumed = run_evolm("train", rl_args(out, rl_parent, "ppo", None, *args))
    assert "resuming at iteration" in resumed.stdout
    got = metrics(out)
    assert sorted(got) == list(range(1, 9))
    _compare(got, want)


def test_ppo_pair_is_pruned_as_a_pair(tmp_path, rl_parent):
    """keep_last=1, SIGKILL after the critic's new checkpoint is committed and before the actor's is: the older pair
    is still whole (nothing is pruned until the actor commits the new pair), so the run resumes from it and
    finishes, and only the newest pair is kept."""
    args = ["train.iters=3", "train.save_interval=1", "train.keep_last=1", "rl.prompts_per_step=8"]
    out = tmp_path / "run"

    def critic_committed_alone():  # the critic's iteration 2 is committed, the actor's is not yet
        critic, actor = out / "critic" / "iter_0000002", out / "checkpoints" / "iter_0000002"
        return 2 if (critic / "evolm.json").exists() and not (actor / "evolm.json").exists() else None

    train_then_sigkill_when(rl_args(out, rl_parent, "ppo", None, *args), critic_committed_alone)
    assert ckpt.latest(out / "checkpoints").name == "iter_0000001"
    assert ckpt.is_complete(out / "critic" / "iter_0000001")  # the actor's partner was not pruned
    resumed = run_evolm("train", rl_args(out, rl_parent, "ppo", None, *args))
    assert "resuming at iteration 1" in resumed.stdout
    assert sorted(metrics(out)) == [1, 2, 3]
    for root in ("checkpoints", "critic"):  # keep_last=1: one pair, the newest
        assert [p.name for p in ckpt.checkpoint_dirs(out / root)] == ["iter_0000003"]


@pytest.mark.parametrize("extra,key", [
    (["stage=grpo", "rl.samples_per_prompt=1"], "rl.samples_per_prompt"),
    (["rl.kl=loss"], "rl.initial_policy_kl_penalty"),
    (["rl.kl_estimator=k9"], "rl.kl_estimator"),
    (["rl.prompts_per_step=3", "parallel.micro_batch_size=2"], "parallel.micro_batch_size"),
    (["train.init_from=null"], "train.init_from"),
    (["rl.discount_factor=-1"], "rl.discount_factor"),
    (["rl.gae_lambda=5"], "rl.gae_lambda"),
    (["rl.entropy_bonus=-0.01"], "rl.entropy_bonus"),
    (["rl.temperature=-1"], "rl.temperature"),
    (["rl.top_p=0"], "rl.top_p"),
    (["rl.top_p=2"], "rl.top_p"),
    (["rl.critic_lr=-1"], "rl.critic_lr"),
    (["rl.kl_clamp=0"], "rl.kl_clamp"),
    (["stage=grpo", "rl.temperature=0"], "rl.temperature"),  # identical samples: every advantage 0
    (["stage=grpo", "rl.kl=reward", "rl.initial_policy_kl_penalty=0.01"], "rl.kl"),  # would never act in GRPO
    (["rl.ratio_eps=1.0"], "rl.ratio_eps"),  # the low clip would vanish
    (["rl.val_interval=1", "rl.val_size=0"], "rl.val_size"),
    (["rl.dynamic_sampling=true"], "rl.dynamic_sampling"),  # another algorithm's setting: not silently ignored
    (["stage=grpo", "rl.critic_init=runs/x"], "rl.critic_init"),
    (["rl.stop_strings=['']"], "rl.stop_strings"),  # would end every response before its first token
    # settings the run would not read: refused rather than silently ignored
    (["rl.reward_model=runs/x"], "rl.reward_model"),  # rl.reward=verifiable (the default) reads no RM
    (["rl.reward=custom", "rl.reward_model=runs/x"], "rl.reward_model"),
    (["rl.val_data=runs/val.jsonl"], "rl.val_data"),  # rl.val_interval=0 (the default): validation off
])
def test_bad_rl_recipe_is_one_line(tmp_path, rl_parent, capsys, extra, key):
    refused_in_process(capsys, "train", rl_args(tmp_path / "run", rl_parent, "ppo", None, "train.iters=2", *extra), key)
    assert not (tmp_path / "run").exists()


def test_a_critic_init_that_is_not_a_checkpoint_is_one_line(tmp_path, rl_parent):
    """rl.critic_init = the demo's dataset directory (no checkpoint in it): one line before anything is built, where
    it used to fail in the critic's load with a traceback after the models were built."""
    from tests.conftest import one_line_error

    data_dir = rl_parent["rl"].parent
    proc = run_evolm("train", rl_args(tmp_path / "run", rl_parent, "ppo", None, "train.iters=2",
                                      f"rl.critic_init={data_dir}"), check=False)
    line = one_line_error(proc, "rl.critic_init")
    assert f"{data_dir}: no complete checkpoint found" in line and "whose backbone starts the critic" in line, line
    assert not (tmp_path / "run").exists()


def test_bad_prompt_rows_are_one_line(tmp_path, rl_parent):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "Human: hi\nAssistant:"}) + "\n")
    proc = run_evolm("train", rl_args(tmp_path / "run", rl_parent, "ppo", bad, "train.iters=2"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "gold_answer" in lines[0], proc.stderr
    # validation prompts that cannot fit: refused before anything starts (they used to fail at the first validation)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "v", "prompt": "word " * 400, "gold_answer": "1"}) + "\n")
    proc = run_evolm("train", rl_args(tmp_path / "run", rl_parent, "ppo", None, "train.iters=2",
                                      f"rl.val_data={long}", "rl.val_interval=1"), check=False)
    assert one_line_error(proc, "rl.val_data").endswith("none of its 1 prompts fits rl.max_prompt_tokens=1024 (and "
                                                         "model.seq_length)"), proc.stderr
    assert not (tmp_path / "run").exists()


def test_prompts_that_leave_less_than_the_response_budget_are_counted(rl_parent):
    """seq_length 128, max_response_tokens 48: a prompt of more than 80 tokens is kept (it fits max_prompt_tokens)
    with a shorter response budget, and counted; one of 128 or more cannot fit and is skipped."""
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.data.tokenizer import load_tokenizer
    from evolm_nemo.rl.data import RLPrompts, fit_prompts

    cfg = compose("config", rl_args("/nonexistent/run", rl_parent, "ppo"), RootConfig)
    tok = load_tokenizer(ckpt.parent_tokenizer(cfg.train.init_from) or cfg.data.tokenizer)
    def of_length(lo, hi):  # a text whose encoding has lo < n <= hi tokens
        return next(t for t in (" ".join(["word"] * k) for k in range(1, 1000)) if lo < len(tok(t)["input_ids"]) <= hi)

    texts = ["Human: 1+1?\nAssistant:", of_length(80, 127), of_length(40, 80), of_length(127, 1000)]
    lengths = [len(x) for x in tok(texts)["input_ids"]]
    prompts = RLPrompts([str(i) for i in range(4)], texts, ["2"] * 4)
    fitted, skipped = fit_prompts(cfg, prompts)
    assert skipped == sum(n > 127 for n in lengths) and len(fitted) == 4 - skipped, lengths
    assert fitted.short_budget == sum(80 < n <= 127 for n in lengths) == 1, lengths


def test_pipeline_parallel_is_refused_before_anything_starts(rl_parent):
    from evolm_nemo.config import ConfigError, RootConfig, compose
    from evolm_nemo.stages import plan_run

    cfg = compose("config", rl_args("/nonexistent/run", rl_parent, "ppo", None, "train.iters=2", "parallel=pp2"),
                  RootConfig)
    with pytest.raises(ConfigError) as err:
        plan_run(cfg, world_size=2)
    assert err.value.key == "parallel.pp"


def test_sampled_distribution_under_tp2(tmp_path, rl_parent):
    """T=0.7, top_p=0.9 at TP=2 (the nucleus over the gathered vocabulary): the engine's log-probs equal the
    trainer's, and at the first (only) PPO epoch every ratio is 1."""
    out = tmp_path / "tp2"
    run_evolm("train", rl_args(out, rl_parent, "ppo", None, "train.iters=1", "rl.prompts_per_step=4",
                               "rl.temperature=0.7", "rl.top_p=0.9", "parallel.tp=2", "parallel.global_batch_size=8"),
              nproc=2)
    r = metrics(out)[1]
    assert r["ratio_mean"] == 1.0 and r["clip_fraction"] == 0.0
    assert r["logp_mismatch_max"] < 1e-4 and abs(r["prob_ratio_mean"] - 1.0) < 1e-5


@pytest.mark.parametrize("engine,temperature,top_p", [("continuous", 1.0, 1.0), ("continuous", 0.7, 0.9),
                                                      ("static", 0.7, 0.9)])
def test_engine_log_probs_equal_the_exported_actor(tmp_path, rl_parent, engine, temperature, top_p):
    """The rollout engine's per-token log-probs equal transformers' on the HF export of the same weights (lr 0, so the
    saved actor is the one that rolled out), under the distribution that sampled: softmax(logits / T) cut to the
    top-p nucleus. Both engines (continuous batching, the default; megatron's static one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from evolm_nemo.losses.rl import sampling_logits

    out = tmp_path / "run"
    run_evolm("train", rl_args(out, rl_parent, "ppo", None, "train.iters=1", "optim.lr=0", "rl.save_rollouts=true",
                               f"rl.temperature={temperature}", f"rl.top_p={top_p}", f"rl.rollout_engine={engine}"))
    run_evolm("export-hf", [f"src={out}", f"dst={tmp_path / 'hf'}", "progress=false"])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["iteration"] == 1 for r in rows)
    worst, compared = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            start = len(r["prompt_ids"]) - 1
            labels = ids[0, 1:]
            logp = torch.log_softmax(sampling_logits(hf(input_ids=ids).logits[0, :-1], temperature, top_p,
                                                     keep=labels), -1)
            for i, (tok, eng) in enumerate(zip(r["response_ids"], r["engine_logp"])):
                if eng is not None:
                    worst = max(worst, abs(float(logp[start + i, tok]) - eng))
                    compared += 1
    assert compared > 50 and worst < 1e-4, (compared, worst)


def test_rollouts_do_not_depend_on_how_many_sequences_decode_at_once(tmp_path, rl_parent):
    """The continuous engine's samples are a function of (seed, iteration, rank) and the weights: 3 or 32 sequences
    decoded at once (a slot refilled as soon as a response ends, or all at once) give the same responses and steps."""
    runs = {}
    for width in (32, 3):
        out = tmp_path / f"w{width}"
        run_evolm("train", rl_args(out, rl_parent, "grpo", None, "train.iters=2", "rl.prompts_per_step=4",
                                   "rl.samples_per_prompt=4", "rl.save_rollouts=true",
                                   f"rl.rollout_micro_batch_size={width}"))
        runs[width] = ([(r["id"], r["response_ids"]) for r in map(json.loads, (out / "rollouts.jsonl")
                                                                   .read_text().splitlines())], metrics(out))
    assert len(runs[32][0]) == 32 and runs[3][0] == runs[32][0]
    assert len({len(ids) for _, ids in runs[32][0]}) > 1  # responses of different lengths: slots were freed early
    _compare(runs[3][1], runs[32][1], keys=("loss", "actor_grad_norm", "reward_mean", "response_length_mean"))


def test_the_frozen_reference_runs_in_the_actors_precision(tmp_path, rl_parent):
    """bf16 with KL on: the reference is built as the actor is (megatron's Float16Module: every parameter in bf16,
    norms too, fp32 logits), so at the parent's weights both give the same logits. It was a bare model: its norms
    kept the checkpoint's fp32 values where the actor's are bf16, and its logits were up to 0.156 apart from the
    actor's at the same checkpoint (on CPU): a KL penalty at the very first step."""
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    facts = tmp_path / "facts.json"
    args = rl_args(tmp_path / "run", rl_parent, "grpo", rl_parent["rl8"], "train.iters=1", "rl.prompts_per_step=4",
                   "rl.kl=loss", "rl.initial_policy_kl_penalty=0.5", "train.precision=bf16")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "rl" / "_frozen_precision.py"), str(facts), *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(facts.read_text())
    assert got["actor"] == got["reference"] == ["torch.bfloat16"], got
    assert got["logits_dtypes"] == ["torch.float32", "torch.float32"] and got["max_diff"] == 0.0, got


def test_a_resume_keeps_the_reference_it_started_with(tmp_path, rl_parent):
    """KL on: the frozen reference is the parent checkpoint the run started from. A parent run that saved another
    checkpoint since (here: a different model's weights as its newest) is not a new KL anchor after a resume: the
    resumed iteration equals the uninterrupted one and the run says which reference it kept."""
    parent = tmp_path / "parent"
    shutil.copytree(rl_parent["sft"] / "checkpoints", parent / "checkpoints")
    given = {**rl_parent, "sft": parent}
    args = ["train.iters=2", "train.save_interval=1", "train.keep_last=5", "rl.prompts_per_step=4",
            "rl.kl=loss", "rl.initial_policy_kl_penalty=0.5"]
    out = tmp_path / "run"
    run_evolm("train", rl_args(out, given, "grpo", rl_parent["rl8"], *args))
    want = metrics(out)
    started = str(ckpt.latest(parent / "checkpoints"))
    assert json.loads((out / "checkpoints" / "iter_0000002" / "evolm.json").read_text())["extra"]["rl_sources"] == \
        {"reference": started}
    shutil.rmtree(out / "checkpoints" / "iter_0000002")  # as if killed after iteration 1
    newer = parent / "checkpoints" / "iter_0999999"  # the parent run went on: another model is its latest now
    shutil.copytree(ckpt.latest(rl_parent["sft"].parent / "pre" / "checkpoints"), newer)
    assert ckpt.latest(parent / "checkpoints") == newer
    resumed = run_evolm("train", rl_args(out, given, "grpo", rl_parent["rl8"], *args))
    assert f"reference: {started}, the one this run started with (the latest is now {newer})" in resumed.stdout
    _compare(metrics(out), want, keys=("loss", "actor_grad_norm", "kl_ref", "reward_mean"))


def test_resume_with_other_prompts_or_samples_is_refused(tmp_path, rl_parent):
    """An RL run resumed with another rl.samples_per_prompt, rl.prompts_per_step or prompt file is refused in one line
    naming the key, nothing touched; the unchanged command resumes."""
    args = ["train.epochs=null", "train.iters=2", "train.save_interval=1", "train.keep_last=5",
            "rl.prompts_per_step=4"]
    out, prompts = tmp_path / "run", rl_parent["rl8"]
    run_evolm("train", rl_args(out, rl_parent, "grpo", prompts, *args, "rl.samples_per_prompt=2"))
    shutil.rmtree(out / "checkpoints" / "iter_0000002")  # as if killed after iteration 1
    before = tree_bytes(out)
    for data, extra, key in [(prompts, "rl.samples_per_prompt=4", "rl.samples_per_prompt"),
                             (prompts, "rl.prompts_per_step=8", "rl.prompts_per_step"),
                             (rl_parent["rl"], "rl.samples_per_prompt=2", "data.paths")]:
        proc = run_evolm("train", rl_args(out, rl_parent, "grpo", data, *args, extra), check=False)
        line = one_line_error(proc, key)
        assert "iter_0000001 was trained" in line and "train.resume=false" in line
    assert tree_bytes(out) == before
    resumed = run_evolm("train", rl_args(out, rl_parent, "grpo", prompts, *args, "rl.samples_per_prompt=2"))
    assert "resuming at iteration 1" in resumed.stdout and sorted(metrics(out)) == [1, 2]
