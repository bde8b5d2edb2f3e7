"""`evolm <command> --help` prints the command's keys with their values and comments, `--cfg job` the composed
recipe as YAML (Hydra's conventions); both compose for real and run nothing."""

import pytest
import yaml

from evolm_nemo import cli
from evolm_nemo.cli import RECIPES
from evolm_nemo.config import RootConfig, compose
from evolm_nemo.config.errors import ConfigError
from tests.conftest import run_evolm


def test_train_help_lists_every_key_with_its_comment():
    proc = run_evolm("train", ["--help"])
    out = proc.stdout
    assert out.startswith("usage: evolm train") and proc.stderr.strip() == ""
    lines = {line.split("=", 1)[0].strip(): line for line in out.splitlines() if line.startswith("  ") and "=" in line}
    assert "train.packing=false" in lines["train.packing"] and "# sft/rm/dpo/ppo/grpo" in lines["train.packing"]
    assert "# tensor-parallel size" in lines["parallel.tp"] and "parallel.tp=1" in lines["parallel.tp"]
    assert "rl.kl_clamp" in lines and "optim.stage_lr" in lines
    assert "stage: cpt, dpo, grpo, ppo, pretrain, rm, sft" in out  # config groups and their choices


def test_help_shows_the_composed_values_and_cfg_job_the_recipe(tmp_path):
    # a stage run without an experiment uses that stage's own rate (optim.stage_lr.sft), as a run would
    sft = run_evolm("train", ["stage=sft", "--help"]).stdout
    lr = next(line for line in sft.splitlines() if line.strip().startswith("optim.lr="))
    job = yaml.safe_load(run_evolm("train", ["stage=sft", "--cfg", "job"]).stdout)
    assert job["stage"] == "sft" and lr.split()[0] == f"optim.lr={job['optim']['lr']}"
    assert job["optim"]["lr"] == job["optim"]["stage_lr"]["sft"]
    # other commands: their own recipe; nothing runs (no output directory appears)
    out = tmp_path / "hf"
    exp = run_evolm("export-hf", [f"src={tmp_path}", f"dst={out}", "--cfg=job"]).stdout
    assert yaml.safe_load(exp)["dst"] == str(out) and not out.exists()
    assert "keys with model=" in run_evolm("eval", ["downstream", f"model={tmp_path}", "-h"]).stdout
    # release parses its own key=value items (a repo pattern is no Hydra value): shown as it parses them
    rel = run_evolm("release", ["suite=tiny", "org=me", "--help"]).stdout
    assert rel.startswith("usage: evolm release") and "keys with suite=tiny org=me:" in rel
    assert "overwrite=false" in rel and "# replace a branch holding another run's release" in rel
    job = yaml.safe_load(run_evolm("release", ["suite=tiny", "repo={org}/x-{node}", "--cfg", "job"]).stdout)
    assert job["repo"] == "{org}/x-{node}" and job["suite"] == "tiny" and job["dry_run"] is False


def test_a_bad_override_with_help_is_one_line():
    proc = run_evolm("train", ["parallel.tp=abc", "--help"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: parallel.tp: expected integer, got 'abc'"
    proc = run_evolm("release", ["dry_run=maybe", "--help"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: dry_run: must be true or false; got 'maybe'"


@pytest.mark.parametrize("command", sorted(RECIPES), ids=str)
def test_every_commands_help_names_each_key_with_a_comment(command, capsys):
    """In process (nothing is imported that --help does not need): every key a command takes is shown with its value
    and a comment (from its schema, else its recipe's YAML); `--cfg job` composes too."""
    assert cli.main([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: evolm {command}")
    keys = [line for line in out.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    assert keys and all("  # " in line for line in keys), [line for line in keys if "  # " not in line]
    assert cli.main([*command.split(), "--cfg", "job"]) == 0 and capsys.readouterr().out.strip()


def test_help_comments_and_groups_are_the_right_ones(capsys):
    """A comment line that opens the next block is not the field above's; only the groups the recipe's defaults
    list can pick are offered (recipes/suite/ is `evolm suite`'s, not a training group)."""
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("=", 1)[0].strip(): line for line in out.splitlines() if line.startswith("  ") and "=" in line}
    assert "data.source=synthetic" not in lines["sft.pad_to_multiple_of"]
    assert "evolm suite launch" not in lines["logger.experiment"]
    picks = out.split("config groups (pick one: group=name):")[1]
    assert "  stage: " in picks and "  experiment: " in picks and "  suite: " not in picks


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_a_stage_without_an_experiment_takes_its_own_budget(stage):
    """recipes/stage/<stage>.yaml counts epochs (train.epochs=1, no iterations): the root recipe's pretraining
    train.iters=60 no longer overrides it (a stage run stopped at 60 iterations, a fraction of its one epoch)."""
    cfg = compose("config", [f"stage={stage}"], RootConfig)
    assert (cfg.train.epochs, cfg.train.iters, cfg.train.tokens) == (1, None, None)
    assert compose("config", [], RootConfig).train.iters == 60  # pretraining's own default stays


@pytest.mark.parametrize("overrides,key,stages", [
    (["train.epochs=2"], "train.epochs", "stage=dpo|grpo|ppo|rm|sft"),
    (["stage=sft", "rl.temperature=0.5"], "rl.temperature", "stage=grpo|ppo"),
    (["stage=cpt", "sft.shuffle=false"], "sft.shuffle", "stage=sft"),
    (["experiment=demo_sft", "dpo.beta=0.2"], "dpo.beta", "stage=dpo"),  # the stage an experiment picks
])
def test_a_key_of_another_stage_is_named_as_theirs(overrides, key, stages):
    with pytest.raises(ConfigError) as err:
        compose("config", overrides, RootConfig)
    assert err.value.key == key and f"is a key of {stages} (recipes/stage/)" in err.value.message
    assert f"not of stage={compose('config', overrides[:-1], RootConfig).stage};" in err.value.message
    with pytest.raises(ConfigError) as err:
        compose("config", ["train.no_such_key=1"], RootConfig)
    assert "unknown key" in err.value.message


def test_commands_without_one_recipe_say_what_they_take_and_a_closed_pipe_is_quiet():
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    text = run_evolm("pipeline", ["--help"]).stdout
    assert "Any training override works here too" in text and "README" not in text.splitlines()[1]
    assert "fine-tune it (SFT, recipe experiment=demo_sft" in text  # every stage it runs (SFT was left out)
    assert "runs/demo" in text and "resumes when the same command runs again" in text  # where it writes, a rerun
    # in the order it runs them: the export and evaluation come after RL, in one process (it said step 5, before RM)
    steps = [text.index(s) for s in ("fine-tune it (SFT", "reward model on the SFT", "GRPO from the SFT",
                                     "then, in a single process", "export the SFT checkpoint", "evaluate the SFT")]
    assert steps == sorted(steps), text
    assert "evolm suite plan suite=evolm" in run_evolm("suite", ["--help"]).stdout
    # `evolm train --help | head -1`: the reader left before the help was written; no BrokenPipeError traceback,
    # the shell's status for it (128 + SIGPIPE)
    proc = subprocess.Popen([sys.executable, "-m", "evolm_nemo.cli", "train", "--help"], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize("flags, shown", [
    (["--cfg", "all"], "job"), (["-c", "job"], "job"), (["--cfg=all"], "job"), (["--resolve", "--cfg", "job"], "job"),
    (["-h"], "help"), (["-m"], "-m: evolm runs one configuration per command (no Hydra sweeps)"),
    (["--multirun", "train.seed=1,2"], "--multirun: evolm runs one configuration"),
    (["--cfg", "hydra"], "--cfg: evolm has no Hydra runtime config"), (["--cfg"], "--cfg: takes job"),
    (["--info"], "--info: not a flag evolm takes"), (["-cn", "other"], "-cn: not a flag evolm takes"),
])
def test_hydras_flags_are_taken_or_refused_by_name(flags, shown, capsys):
    """The flags a Hydra user types: `--cfg all`, `-c job`, `--resolve` show the composed recipe (evolm has no Hydra
    runtime config, and shows it resolved); `-m`, `--cfg hydra`, `--info`, ... are refused in one line naming the
    flag and why (they were refused as a key=value override, or `--cfg=all` as Hydra's lexer error)."""
    code = cli.main(["train", "train.seed=7", *flags])
    out, err = capsys.readouterr()
    if shown == "job":
        assert code == 0 and yaml.safe_load(out)["train"]["seed"] == 7 and err == ""
    elif shown == "help":
        assert code == 0 and out.startswith("usage: evolm train") and "train.seed=7" in out
    else:
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith(f"error: {shown}"), err


def test_a_routed_command_shows_the_help_of_what_it_runs(capsys):
    """`evolm report suite=<name>` runs the suite's report (cli.ROUTES): its --help / --cfg job said
    `error: suite: unknown key` (they composed recipes/report.yaml, which has no suite key)."""
    for flag in ("--help", "--cfg=job"):
        assert cli.main(["report", "suite=tiny", flag]) == 0
        out, err = capsys.readouterr()
        assert err == "" and out.startswith("usage: evolm report") and "evolm suite report suite=" in out
    assert cli.main(["report", "--help"]) == 0 and "runs=null" in capsys.readouterr().out  # unrouted: its keys
