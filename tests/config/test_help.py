"""`evolm <command> --help` prints the command's keys with their values and comments, `--cfg job` the composed
recipe as YAML (Hydra's conventions); both compose for real and run nothing."""

import yaml

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
