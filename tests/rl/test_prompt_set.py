"""The RL prompt set is a set: a problem id, and a prompt, appears once across its files (a repeated one would be
rolled out and trained on twice as often); a repeat is one line naming the file, the line and the id, before any
model loads. A resumed run keeps the frozen roles (reference, reward model) it started with."""

from __future__ import annotations

import json

import pytest

from evolm_nemo.config.errors import ConfigError
from tests.conftest import refused_in_process


def write_prompts(path, ids):
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Human: ({i}) {n} + 1?\nAssistant:",
                                        "gold_answer": str(n + 1)}) + "\n" for n, i in enumerate(ids)))
    return path


def test_a_repeated_id_is_refused_naming_the_file_line_and_id(tmp_path):
    from evolm_nemo.rl.data import read_prompts

    good = write_prompts(tmp_path / "good.jsonl", ["p0", "p1", "p2"])
    assert read_prompts([str(good)]).ids == ["p0", "p1", "p2"]
    bad = write_prompts(tmp_path / "bad.jsonl", ["p0", "p1", "p0"])
    with pytest.raises(ConfigError) as exc:
        read_prompts([str(bad)])
    assert exc.value.key == f"{bad}:3" and '"p0" again (first at ' + f"{bad}:1)" in exc.value.message
    other = write_prompts(tmp_path / "other.jsonl", ["q0", "p2"])  # across the files of one set, too
    with pytest.raises(ConfigError) as exc:
        read_prompts([str(good), str(other)], "rl.val_data")
    assert exc.value.key == f"{other}:2" and f'"p2" again (first at {good}:3)' in exc.value.message
    assert "rl.val_data" in exc.value.message


def test_a_repeated_prompt_under_another_id_is_refused_too(tmp_path):
    # the same problem twice, here with two gold answers: one response would be rewarded both ways
    from evolm_nemo.rl.data import read_prompts

    path = tmp_path / "rl.jsonl"
    rows = [{"id": "a", "prompt": "Human: 1 + 1?\nAssistant:", "gold_answer": "2"},
            {"id": "b", "prompt": "Human: 2 + 2?\nAssistant:", "gold_answer": "4"},
            {"id": "c", "prompt": "Human: 1 + 1?\nAssistant:", "gold_answer": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as exc:
        read_prompts([str(path)], "rl.val_data")
    assert exc.value.key == f"{path}:3" and f"field 'prompt': the prompt of {path}:1 again (id \"c\")" in \
        exc.value.message and "rl.val_data" in exc.value.message


def test_evolm_train_refuses_it_in_one_line_before_the_model(tmp_path, capsys, a_run):
    dup = write_prompts(tmp_path / "rl.jsonl", ["a", "b", "c", "b"])
    line = refused_in_process(capsys, "train", [f"run.out_dir={tmp_path / 'run'}", "stage=grpo",
                                                f"train.init_from={a_run}", f"data.paths=[{dup}]", "train.iters=1",
                                                "train.progress=false"], f"{dup}:4")
    assert "field 'id': \"b\" again (first at " in line and f"{dup}:2" in line, line
    assert not (tmp_path / "run").exists()


def test_a_resume_keeps_the_frozen_roles_it_started_with():
    """A run that started without a reward model (rl.reward=sum with a reward function only) and is resumed with
    rl.reward_model set would take the RM's scores from the resumed step on: refused in one line naming the key;
    the roles it started with pass, and checkpoints from before rl_sources are not compared."""
    from evolm_nemo.stages.rl import check_no_role_added

    started = {"rl_sources": {"reference": "/runs/sft/checkpoints/iter_0000010"}}
    with pytest.raises(ConfigError) as err:
        check_no_role_added(started, {"reference": "/runs/sft/checkpoints/iter_0000010", "reward_model": "/rm/iter_2"})
    assert err.value.key == "rl.reward_model" and "started without a reward model" in err.value.message
    check_no_role_added(started, {"reference": "/runs/sft/checkpoints/iter_0000012"})  # another path: restore's note
    check_no_role_added({}, {"reward_model": "/rm/iter_2"})  # an old checkpoint: nothing recorded to compare
    with pytest.raises(ConfigError) as err:
        check_no_role_added({"rl_sources": {}}, {"reference": "/runs/sft"})
    assert err.value.key == "train.init_from"
