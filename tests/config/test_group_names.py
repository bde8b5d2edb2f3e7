"""Issue 10 item 9: a misspelled recipe name (``experiment=``, ``model=``, ...) is refused in one line naming the
group and the closest names; before, a misspelled optional ``experiment`` silently trained the tiny default."""

from __future__ import annotations

import pytest

from evolm_nemo import cli
from evolm_nemo.config import ConfigError, RootConfig, compose
from tests.conftest import run_evolm


@pytest.mark.parametrize("override, key, suggestion", [
    ("experiment=sft_1b_evolmm", "experiment", "ppo_1b_evolm"),
    ("experiment=pretrain_1b_16b", "experiment", "pretrain_1b_160b"),
    ("+experiment=demo_sfft", "experiment", "demo_sft"),
    ("model=evolm_2b", "model", "evolm_1b"),
    ("parallel=tp3", "parallel", "tp2"),
])
def test_misspelled_recipe_names_are_refused_with_suggestions(override, key, suggestion, capsys):
    assert cli.main(["train", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {key}: no recipe ") and "did you mean" in err[0] and suggestion in err[0], err


def test_a_name_nothing_resembles_lists_where_to_look():
    with pytest.raises(ConfigError) as err:
        compose("config", ["experiment=zzz"], RootConfig)
    assert err.value.key == "experiment" and "recipes/experiment" in err.value.message


def test_correct_names_and_other_commands_keys_still_compose():
    assert compose("config", ["experiment=demo"], RootConfig).train.iters > 0
    from evolm_nemo.config.compose import compose_command  # `model=` is a path there, not the group
    from evolm_nemo.evaluation.evaluate import DownstreamConfig

    cfg = compose_command("eval_downstream", ["model=/no/such/hf/dir"], DownstreamConfig)
    assert cfg.model == "/no/such/hf/dir"


def test_misspelled_experiment_via_the_cli_exits_2_and_trains_nothing(tmp_path):
    proc = run_evolm("train", ["experiment=sft_1b_evolmm", f"run.out_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: experiment: no recipe 'sft_1b_evolmm'")
    assert not (tmp_path / "run").exists()
