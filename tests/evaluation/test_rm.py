"""ORM scoring with a tiny random LlamaForSequenceClassification: 16 scores per row, batching-exact, atomic rewrite."""

from __future__ import annotations

import json

import pytest

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation import rm
from evolm_nemo.tasks import TEMPLATE
from tests.evaluation._tiny import make_rm, one_thread

threads = pytest.fixture(scope="module", autouse=True)(one_thread)

CHAT = ("{% for m in messages %}{{ bos_token if loop.first else '' }}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
        "{% endfor %}")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm_plain")
    model, tok = make_rm(path)
    return path, model, tok


def _ref(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def _rows():
    comps = [" The answer is \\boxed{5}.", " No.", "", " 2 + 3 = 5 so the answer is 5</s>", " x" * 40]
    return [
        {"suite": "gsm8k_platinum", "id": "a", "problem": "What is 2 + 3?", "gt_solution": "#### 5", "gt_answer": None,
         "completions": [comps[i % 5] + " " * (i // 5) for i in range(16)], "extra": [1, 2]},
        {"suite": "strategyqa", "id": "b", "problem": "Is the sky green?", "gt_solution": "False",
         "gt_answer": "False", "completions": [comps[(i + 2) % 5] for i in range(16)]},
    ]


def test_add_scores_adds_16_exact_scores(tmp_path, plain):
    path, model, tok = plain
    comp = tmp_path / "completions.jsonl"
    comp.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    rm.add_scores(str(comp), str(path), batch_size=5)  # ragged batches of different lengths

    rows = [json.loads(x) for x in comp.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["extra"] == [1, 2]
    for row in rows:
        assert len(row["rm_scores"]) == 16 and all(isinstance(s, float) for s in row["rm_scores"])
        for c, s in zip(row["completions"], row["rm_scores"]):
            # No chat template: the templated prompt's ids (with BOS), then the completion's as sampled (no BOS)
            # (a literal "</s>" in a completion is text, not the EOS token: special tokens are split)
            ids = tok(TEMPLATE.format(problem=row["problem"])).input_ids + \
                tok(c, add_special_tokens=False, split_special_tokens=True).input_ids
            assert s == pytest.approx(_ref(model, ids), abs=1e-5)
    assert len({round(s, 6) for s in rows[0]["rm_scores"]}) > 3  # scores depend on the text
    assert [p.name for p in tmp_path.iterdir()] == ["completions.jsonl"]


def test_chat_template_pair(tmp_path):
    model, tok = make_rm(tmp_path, seed=1, chat_template=CHAT)
    scorer = rm.RewardModel(str(tmp_path), batch_size=4)
    assert scorer.chat
    ids = scorer.encode("What is 2 + 3?", " It is 5.")
    assert tok.decode(ids) == "<s><|user|>What is 2 + 3?</s><|assistant|> It is 5.</s>"  # one BOS, from the template
    scores = scorer.score([("What is 2 + 3?", " It is 5."), ("Q", " a much longer answer " * 5)])
    assert scores[0] == pytest.approx(_ref(model, ids), abs=1e-5)
    assert scores[1] == pytest.approx(_ref(model, scorer.encode("Q", " a much longer answer " * 5)), abs=1e-5)


def test_bad_rows_and_models_fail_before_writing(tmp_path, plain):
    comp = tmp_path / "c.jsonl"
    good = json.dumps(_rows()[0])
    comp.write_text(good + "\n" + json.dumps({"problem": "p", "completions": "not a list"}) + "\n")
    before = comp.read_text()
    with pytest.raises(ConfigError) as e:
        rm.add_scores(str(comp), str(plain[0]))
    assert e.value.key == f"{comp}:2" and "completions" in e.value.message
    assert comp.read_text() == before
    with pytest.raises(ConfigError) as e:
        rm.add_scores(str(comp), str(tmp_path / "no_model"))
    assert e.value.key == "rm"


def test_reward_model_needs_one_output(tmp_path):
    from transformers import LlamaForSequenceClassification

    _, tok = make_rm(tmp_path)
    cfg = LlamaForSequenceClassification.from_pretrained(tmp_path).config
    cfg.num_labels = 2
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="exactly one"):
        rm.RewardModel(str(tmp_path))


def test_a_reward_model_that_scores_nan_is_one_line_and_nothing_is_written(tmp_path):
    """Scoring refuses a non-finite rm_score; the RM step refused nothing and wrote NaN into the completions, so a
    run stopped only at scoring, its file holding the NaNs. Now it stops at the RM, the file as it was."""
    import torch

    model, _ = make_rm(tmp_path / "rm", seed=2)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "rm")
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    before = comp.read_text()
    with pytest.raises(ConfigError) as e:
        rm.add_scores(str(comp), str(tmp_path / "rm"))
    assert e.value.key == "rm" and "scored completion 0 of problem 'a' as nan" in e.value.message
    assert comp.read_text() == before
