"""Recipe composition, validation (one-line errors naming the key, exit code 2, nothing written), token budgets."""

import subprocess
from pathlib import Path

import pytest

from evolm_nemo.config import ConfigError, RootConfig, compose, iterations_for, parse_tokens
from evolm_nemo.config.validate import validate
from evolm_nemo.model.build import param_count
from evolm_nemo.stages import plan_run
from tests.conftest import BIN, REPO, subprocess_env


def _check(overrides, world_size=1):
    return plan_run(compose("config", overrides, RootConfig), world_size=world_size)


@pytest.mark.parametrize("text,tokens", [("160B", 160 * 10**9), ("1.6B", 1_600_000_000), ("20_000_000_000", 2 * 10**10),
                                         ("500M", 5 * 10**8), ("2.5e9", 2_500_000_000), ("320b", 320 * 10**9),
                                         (1000, 1000)])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("bad", ["-5B", "abc", "0", "1.6X", "", "B"])
def test_parse_tokens_rejects(bad):
    with pytest.raises(ConfigError) as err:
        parse_tokens(bad)
    assert err.value.key == "train.tokens"


def test_token_budget_to_iterations():
    # 1B/160B: 160e9 / (512 * 2048) = 152587.89 -> 152588 iterations
    assert iterations_for(160 * 10**9, 512, 2048) == 152588
    assert iterations_for(1024, 8, 128) == 1
    plan = _check(["train.tokens=1.6M"])  # a budget given alone replaces the recipe's train.iters=60
    assert plan.iters == -(-1_600_000 // (8 * 128))
    cfg = compose("config", ["experiment=pretrain_1b_160b", "train.iters=5"], RootConfig)
    assert (cfg.train.iters, cfg.train.tokens) == (5, None)  # and train.iters alone an experiment's train.tokens
    assert plan.tokens_per_iter == 8 * 128


def test_evolm_grid_composes():
    cfg = compose("config", ["experiment=pretrain_1b_160b", "data.source=synthetic", "data.paths=[]",
                             "data.synthetic_docs=2000"], RootConfig)
    plan = plan_run(cfg, world_size=32)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size) == (22, 2048, 4896)
    assert (cfg.model.num_attention_heads, cfg.model.num_query_groups, cfg.model.vocab_size) == (32, 4, 32000)
    assert cfg.optim.lr == 2e-4 and cfg.optim.min_lr == 2e-5 and cfg.parallel.global_batch_size == 512
    assert plan.iters == 152588 and plan.dp == 32 and plan.num_microbatches == 1
    for packed in (["stage=sft", "train.packing=true"], ["stage=sft", "parallel.max_tokens_per_microbatch=4096"]):
        layout = validate(compose("config", ["experiment=pretrain_1b_160b", "data.source=synthetic", "data.paths=[]",
                                             *packed], RootConfig), world_size=32)
        assert layout.num_microbatches is None and layout.dp == 32  # each batch's examples decide the count
    assert 0.95e9 < param_count(cfg.model) < 1.1e9
    for name in ("evolm_0.5b", "evolm_4b"):
        assert compose("config", [f"model={name}"], RootConfig).model.name == name
    experiments = sorted(p.stem for p in (REPO / "recipes" / "experiment").glob("pretrain_*.yaml"))
    assert len([e for e in experiments if e != "demo"]) == 14


@pytest.mark.parametrize("overrides,world,key", [
    (["parallel.foo=1"], 1, "parallel.foo"),
    (["+model.bogus=2"], 1, "model.bogus"),
    (["parallel.tp=abc"], 1, "parallel.tp"),
    (["parallel.tp=3"], 3, "parallel.tp"),                      # does not divide heads
    (["model.num_query_groups=1", "parallel.tp=2"], 2, "parallel.tp"),  # does not divide query groups
    (["parallel.pp=3"], 3, "parallel.pp"),                      # does not divide layers
    (["parallel.global_batch_size=6"], 4, "parallel.global_batch_size"),
    (["train.tokens=-1B", "train.iters=null"], 1, "train.tokens"),
    (["train.tokens=lots", "train.iters=null"], 1, "train.tokens"),
    (["train.tokens=1B", "train.iters=5"], 1, "train.tokens"),  # both tokens and iters
    (["train.iters=null"], 1, "train.tokens"),                  # neither
    (["data.source=indexed", "data.paths=[/nonexistent/doc]", "data.tokenizer=x"], 1, "data.paths"),
    (["parallel.sp=true"], 1, "parallel.sp"),
    (["model=nonexistent"], 1, "model"),
    (["optim.min_lr=1.0"], 1, "optim.min_lr"),
    (["data.synthetic_kinds=[text,math]", "data.weights=[1]"], 1, "data.weights"),
    (["data.synthetic_kinds=[math]"], 1, "data.synthetic_kinds"),
    (["model.seq_length=100000000"], 1, "model.seq_length"),    # past what RoPE's float32 positions tell apart
    (["stage=sft", "data.val_paths=[/nonexistent/val]"], 1, "data.val_paths"),  # the held-out loss of pretraining /
    (["stage=rm", "data.val_paths=[/nonexistent/val]"], 1, "data.val_paths"),   # CPT: the other stages ignored it
])
def test_validation_errors(overrides, world, key):
    with pytest.raises(ConfigError) as err:
        _check(overrides, world_size=world)
    assert err.value.key == key, str(err.value)


def test_seq_length_is_at_most_what_float32_rope_positions_hold():
    """megatron-core and HF compute RoPE positions in float32: every position up to 2^24 is exact, past it two
    positions share one angle. 2^24 passes the recipe's rules; one more is one line naming model.seq_length (it used
    to build the data and the model, then die in an allocation traceback)."""
    import torch

    from evolm_nemo.config.validate import MAX_SEQ_LENGTH

    positions = torch.arange(MAX_SEQ_LENGTH + 2, dtype=torch.float32)[-3:].tolist()
    assert positions[0] == MAX_SEQ_LENGTH - 1 and positions[1] == positions[2] == MAX_SEQ_LENGTH  # the rounding
    validate(compose("config", [f"model.seq_length={MAX_SEQ_LENGTH}"], RootConfig))
    with pytest.raises(ConfigError) as err:
        validate(compose("config", [f"model.seq_length={MAX_SEQ_LENGTH + 1}"], RootConfig))
    assert err.value.key == "model.seq_length" and "16,777,217" in err.value.message, str(err.value)


def test_tp_must_divide_the_vocabulary():
    # megatron's VocabParallelEmbedding asserts vocab_size % tp == 0 after the model is built; refuse it up front
    validate(compose("config", ["model.vocab_size=514", "parallel.tp=2"], RootConfig), world_size=2)
    with pytest.raises(ConfigError) as err:
        validate(compose("config", ["model.vocab_size=513", "parallel.tp=2"], RootConfig), world_size=2)
    assert err.value.key == "parallel.tp" and "model.vocab_size=513" in str(err.value), str(err.value)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([str(BIN / "evolm"), "train", "parallel.tp=3", f"run.out_dir={out}",
                           f"data.cache_dir={tmp_path / 'cache'}"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parallel.tp:"), proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert list(Path(tmp_path).iterdir()) == []


@pytest.fixture(scope="module")
def tiny_parent(a_run):
    return a_run / "checkpoints" / "iter_0000001"  # copied before use (_parent_like)


def _parent_like(tiny_parent, cfg, where):
    """The tiny checkpoint with the experiment's model shape in its evolm.json (validation reads only that)."""
    import dataclasses
    import json
    import shutil

    shutil.copytree(tiny_parent, where)
    meta = json.loads((where / "evolm.json").read_text())
    meta["model"] = dataclasses.asdict(cfg.model)
    (where / "evolm.json").write_text(json.dumps(meta))
    return where


def _pairs_dataset(parent, out):
    """600 (chosen, rejected) pairs of distinct prompts through `evolm prepare-rm` (kind=pairs)."""
    import json

    from evolm_nemo.data.rm import PrepareRMConfig, prepare_rm

    src = out.parent / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}", "rejected": f" {i}"})
                           + "\n" for i in range(600)))
    tok = json.loads((parent / "evolm.json").read_text())["tokenizer"]
    prepare_rm(PrepareRMConfig(input=str(src), output=str(out), tokenizer=tok, kind="pairs", progress=False))
    return out


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(name, request, tmp_path, data_cache):
    # real data files are absent here: validate everything else on the generated corpus
    held_out = ["data.synthetic_val_docs=8"] if name.startswith("nano_") else []  # nano: held-out loss per source
    cfg = compose("config", [f"experiment={name}", "data.source=synthetic", "data.paths=[]", "data.weights=null",
                           "train.init_from=null", "train.branch_from=null", "data.synthetic_docs=2000", *held_out],
                  RootConfig)
    if cfg.stage in ("sft", "ppo", "grpo", "rm", "dpo"):  # post-training needs a parent (its tokenizer and shape): the tiny one, dressed as the experiment's
        parent = _parent_like(request.getfixturevalue("tiny_parent"), cfg, tmp_path / "parent")
        data = ["data.source=synthetic", "data.paths=[]"]
        if cfg.stage in ("ppo", "grpo"):
            data += ["rl.prompts_per_step=64", "rl.val_interval=0", "rl.val_data=null"]  # the demo RL set is small
        if cfg.stage in ("rm", "dpo"):  # a small preference dataset made with the parent's tokenizer
            data = ["data.source=indexed", f"data.paths=[{_pairs_dataset(parent, tmp_path / 'pairs')}]"]
        original = cfg
        cfg = compose("config", [f"experiment={name}", f"train.init_from={parent}", f"data.cache_dir={data_cache}",
                                 *data], RootConfig)
    p = cfg.parallel
    world = p.tp * p.pp * (p.global_batch_size // p.micro_batch_size if cfg.stage not in ("ppo", "grpo") else 1)
    plan = plan_run(cfg, world_size=world, parent_checked=True)  # cpt_*: no parent checkpoint here
    assert plan.iters > 0
    if name.startswith("cpt_"):
        assert cfg.stage == "cpt" and cfg.train.tokens == "50B"
    if name.startswith("sft_"):  # EvoLM's SFT settings (PAPER.md)
        lr, gbs = {"1b": (1e-5, 128), "4b": (7.5e-6, 256)}[name.split("_")[1]]
        assert cfg.stage == "sft" and cfg.optim.lr == lr and cfg.parallel.global_batch_size == gbs
        assert cfg.optim.weight_decay == 0.0 and cfg.optim.warmup_fraction == 0.1 and cfg.train.epochs >= 1
        assert cfg.sft.prompt_template == "Human: {question}\nAssistant:" and cfg.model.seq_length == 2048
    if name.startswith("ppo_") and "evolm" in name:  # EvoLM's verl run as released (PAPER.md)
        r, o = original.rl, original.optim
        lr, critic_lr, prompts = {"1b": (2e-6, 2e-5, 1024), "4b": (1e-6, 1e-5, 2048)}[name.split("_")[1]]
        assert cfg.stage == "ppo" and (o.lr, r.critic_lr, r.prompts_per_step) == (lr, critic_lr, prompts)
        assert (r.samples_per_prompt, r.ppo_epochs, r.mini_batches, r.kl) == (1, 1, 1, "off")
        assert (r.discount_factor, r.gae_lambda, r.ratio_eps, r.dual_clip, r.value_clip, r.entropy_bonus) == \
            (1.0, 1.0, 0.2, 3.0, 0.5, 0.001)
        assert (o.weight_decay, o.clip_grad, o.warmup_fraction, o.decay_style) == (0.01, 1.0, 0.1, "constant")
        assert r.temperature == 1.0 and r.top_p == 1.0 and r.max_prompt_tokens == r.max_response_tokens == 1024


def test_stage_registry_answers_for_every_stage():
    from evolm_nemo.config import ConfigError
    from evolm_nemo.stages import STAGES, kind, stage_module

    assert tuple(STAGES) == ("pretrain", "cpt", "sft", "ppo", "grpo", "rm", "dpo")
    for name in STAGES:  # every stage plans its data, says what defines it (resume) and builds what the loop drives
        module = stage_module(name)
        assert callable(module.plan_iters) and callable(module.build) and callable(module.data_identity), name
        assert kind(name).budget in ("tokens", "epochs", "prompts")
    with pytest.raises(ConfigError) as err:
        kind("pretrian")
    assert err.value.key == "stage" and "pretrain" in err.value.message


@pytest.mark.parametrize("size", ["tiny", "evolm_0.5b", "evolm_1b", "evolm_4b"])
def test_a_stage_without_an_experiment_uses_its_own_rate(size):
    """`evolm train stage=<s>` with no experiment: the post-training stages take this size's rate for that stage
    (recipes/optim/<size>.yaml: stage_lr), an order or more below pretraining's; pretraining and CPT keep optim.lr;
    an explicit optim.lr still wins."""
    pre = compose("config", [f"optim={size}"], RootConfig).optim
    for stage in ("sft", "rm", "dpo", "ppo", "grpo"):
        o = compose("config", [f"stage={stage}", f"optim={size}"], RootConfig).optim
        assert o.lr == pre.stage_lr[stage] and o.lr <= pre.lr / 3 and o.min_lr == 0.0, (size, stage, o.lr)
    assert compose("config", ["stage=cpt", f"optim={size}"], RootConfig).optim.lr == pre.lr
    assert compose("config", ["stage=grpo", f"optim={size}", "optim.lr=5e-5"], RootConfig).optim.lr == 5e-5
    if size == "evolm_1b":  # EvoLM's 1B rates (PAPER.md): SFT 1e-5, PPO actor 2e-6
        assert pre.stage_lr["sft"] == 1e-5 and pre.stage_lr["ppo"] == 2e-6


def test_every_data_preset_names_every_data_key():
    """Hydra overrides only keys a composed YAML has: each data preset lists every `data.*` key of the schema, so
    `data.<key>=...` works whichever preset an experiment picks (`data.synthetic_val_docs=8` under fineweb_edu was
    refused as an unknown key)."""
    import dataclasses

    import yaml

    from evolm_nemo.config.compose import recipes_dir
    from evolm_nemo.config.schema import DataConfig

    keys = {f.name for f in dataclasses.fields(DataConfig)}
    for path in sorted((recipes_dir() / "data").glob("*.yaml")):
        missing = keys - set(yaml.safe_load(path.read_text()))
        assert not missing, (path.name, sorted(missing))
    cfg = compose("config", ["experiment=wsd_1b_stable", "data.synthetic_val_docs=8"], RootConfig)
    assert cfg.data.synthetic_val_docs == 8


@pytest.mark.parametrize("command,overrides,key", [
    ("train", ["train.seed=-1"], "train.seed"),
    ("train", ["train.seed=4294967296"], "train.seed"),
    ("train", ["stage=cpt", "data.synthetic_seed=-3"], "data.synthetic_seed"),
    ("train", ["stage=sft", "sft.synthetic_seed=-1"], "sft.synthetic_seed"),
    ("eval", ["downstream", "seed=-1"], "seed"),
    ("prepare-sft", ["seed=-1"], "seed"),
    ("prepare-rm", ["seed=-2"], "seed"),
])
def test_a_seed_numpy_would_refuse_is_refused_first(capsys, tmp_path, command, overrides, key):
    """numpy takes seeds in [0, 2**32 - 1] only: `evolm train train.seed=-1` used to build the model and then die in
    a numpy traceback. Every command's seed is checked with the recipe, in one line, before anything is built."""
    from tests.conftest import refused_in_process

    line = refused_in_process(capsys, command, [*overrides, f"run.out_dir={tmp_path / 'run'}"]
                              if command == "train" else overrides, key)
    assert "[0, 4294967295]" in line
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_negative_seed_before_writing(capsys, tmp_path, a_run):
    from tests.conftest import refused_in_process

    refused_in_process(capsys, "export-hf", [f"src={a_run}", f"dst={tmp_path / 'hf'}", "seed=-1"], "seed")
    assert list(tmp_path.iterdir()) == []
