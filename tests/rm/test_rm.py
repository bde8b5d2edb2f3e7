"""Reward models, DPO and RM rewards for RL (issue 9) on real megatron-core, transformers and `evolm` processes.

The data: the demo's held-out word problems with correct and incorrect completions (tests/rm/_data.py), judged by
the real `evolm score`, turned into datasets by the real `evolm prepare-rm`; the parent is the shared SFT model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_evolm
from tests.rm._data import completions_rows, write_completions

COMMON = ["train.progress=false", "train.tensorboard=false"]


def metrics(out) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r}


@pytest.fixture(scope="module")
def rm_data(sft_parent, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_data")
    comp = write_completions(root / "completions.jsonl", completions_rows(sft_parent["eval"], 120))
    run_evolm("score", [f"input={comp}", f"output={root / 'scored.jsonl'}", "progress=false"])
    tok = next(Path(sft_parent["cache"]).glob("synthetic-text-*/tokenizer"))
    for kind in ("outcome", "pairs"):
        run_evolm("prepare-rm", [f"input={root / 'scored.jsonl'}", f"output={root / kind}", f"tokenizer={tok}",
                                 f"kind={kind}", "progress=false"])
    return {"root": root, "scored": root / "scored.jsonl", "outcome": root / "outcome", "pairs": root / "pairs",
            "tok": tok, "sft": sft_parent["sft"], "rl8": sft_parent["rl8"]}


def rm_overrides(out, d, *extra):
    return ["experiment=demo_rm", f"data.paths=[{d['outcome']}]", f"train.init_from={d['sft']}",
            f"run.out_dir={out}", *COMMON, *extra]


# ------------------------------------------------------------------------------------------------------ data


def test_prepare_rm_examples_and_pairs_follow_the_labels(rm_data, tmp_path):
    from evolm_nemo.data.rm import RMDataset
    from evolm_nemo.data.tokenizer import load_tokenizer

    scored = [json.loads(x) for x in rm_data["scored"].read_text().splitlines()]
    assert all(len(r["correct"]) == 8 and sum(r["correct"]) == 4 for r in scored)  # the checker's verdicts
    tok = load_tokenizer(str(rm_data["tok"]))
    out = RMDataset(rm_data["outcome"])
    assert out.kind == "outcome" and len(out) == 960 and out.labels.sum() == 480 and len(out.pairs) == 0
    # sequence i is problem i // 8's completion i % 8, its label the checker's verdict, its ids as sampled
    for i in (0, 9, 500, 959):
        row = scored[i // 8]
        prompt = tok(f"Human: {row['problem']}\nAssistant:").input_ids
        resp = tok(row["completions"][i % 8], add_special_tokens=False, split_special_tokens=True).input_ids
        assert list(out.ids(i)) == prompt + resp and out.prompt_len[i] == len(prompt)
        assert out.labels[i] == float(row["correct"][i % 8]) and out.groups[i] == i // 8
    pairs = RMDataset(rm_data["pairs"])
    assert pairs.kind == "pairs" and len(pairs.pairs) == 120 * 4  # max_pairs_per_problem=4 of 4 x 4 candidates
    assert np.all(pairs.labels[pairs.pairs[:, 0]] == 1) and np.all(pairs.labels[pairs.pairs[:, 1]] == 0)
    assert np.all(pairs.groups[pairs.pairs[:, 0]] == pairs.groups[pairs.pairs[:, 1]])
    assert len({tuple(p) for p in pairs.pairs.tolist()}) == len(pairs.pairs)  # no pair twice


def test_rm_arrays_of_another_shape_are_one_line(rm_data, tmp_path):
    """labels.npy of two dimensions, or pairs.npy naming a sequence the dataset does not have, were tracebacks in
    the first step (before the content hash says anything, and in datasets without one)."""
    import shutil

    from evolm_nemo.config.errors import ConfigError
    from evolm_nemo.data.rm import RMDataset

    for name, damage in (("labels", lambda a: a.reshape(-1, 1)), ("pairs", lambda a: a + 10_000)):
        bad = tmp_path / name
        shutil.copytree(rm_data["pairs"], bad)
        np.save(bad / f"{name}.npy", damage(np.load(bad / f"{name}.npy")))
        with pytest.raises(ConfigError) as err:
            RMDataset(bad)
        assert err.value.key == "data.paths" and str(bad) in err.value.message


def test_a_held_out_problem_is_held_out_of_every_dataset(rm_data, tmp_path):
    """Two datasets of the same problems (here the outcome and the pairs set of one scored file): rm.val_fraction
    holds a problem out of both. Each dataset numbered its own problems, and a problem held out of one was trained
    on from the other, so val_loss / val_auc measured on training problems."""
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.stages.rm import RMData

    cfg = compose("config", rm_overrides(tmp_path / "r", rm_data, f"data.paths=[{rm_data['outcome']},"
                                                                  f"{rm_data['pairs']}]"), RootConfig)
    data = RMData(cfg, pairs=False, val_fraction=0.2)
    prompt = lambda q: data.ids(int(q))[:int(data.prompt_len[q])].tobytes()  # noqa: E731
    held, trained = ({prompt(q) for q in units[:, 0]} for units in (data.val_units, data.train_units))
    assert len(held) == 24 and len(trained) == 96 and not held & trained  # 20% of the 120 problems, apart
    assert len(np.unique(data.groups)) == 120


def test_a_damaged_rm_dataset_is_refused_and_a_resume_on_other_data_too(rm_data, tmp_path):
    """An RM dataset is checked against its manifest's content hash (tokens, index, labels, groups, pairs) at first
    use: a same-size flip in labels.npy is refused in one line naming it; an RM run resumed on other data.paths is
    refused in one line naming the key, nothing touched."""
    import shutil

    from tests.conftest import one_line_error, tree_bytes

    bad = tmp_path / "outcome"
    shutil.copytree(rm_data["outcome"], bad)
    labels = bad / "labels.npy"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 0x01
    labels.write_bytes(bytes(data))
    line = one_line_error(run_evolm("train", rm_overrides(tmp_path / "bad", {**rm_data, "outcome": bad},
                                                          "train.iters=1"), check=False), "data.paths")
    assert "labels.npy" in line and "does not match the content_sha256" in line
    assert not (tmp_path / "bad").exists()

    out, args = tmp_path / "rm", ["train.epochs=null", "train.iters=1"]
    run_evolm("train", rm_overrides(out, rm_data, *args))
    before = tree_bytes(out)
    line = one_line_error(run_evolm("train", rm_overrides(out, rm_data, *args, f"data.paths=[{rm_data['pairs']}]",
                                                          "rm.objective=pairwise"), check=False), "data.paths")
    assert "was trained on other data than data.paths holds now" in line
    assert tree_bytes(out) == before


def test_prepare_rm_plain_rows_dedup_and_balance(rm_data, tmp_path):
    from evolm_nemo.data.rm import PrepareRMConfig, RMDataset, prepare_rm

    src = tmp_path / "rows.jsonl"
    rows = [{"prompt": "Q1", "response": " a", "label": 1}, {"prompt": "Q1", "response": " a", "label": 1},
            {"prompt": "Q1", "response": " b", "label": 0}, {"prompt": "Q2", "response": " c", "label": False},
            {"prompt": "Q2", "response": " d", "label": 0}, {"prompt": "Q3", "chosen": " e", "rejected": " f"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare_rm(PrepareRMConfig(input=str(src), output=str(tmp_path / "o"), tokenizer=str(rm_data["tok"]),
                                   progress=False))
    c = m["counts"]
    assert c["duplicates"] == 1 and c["positive"] == c["negative"] == 2 and c["subsampled"] == 2
    m = prepare_rm(PrepareRMConfig(input=str(src), output=str(tmp_path / "p"), tokenizer=str(rm_data["tok"]),
                                   kind="pairs", progress=False))
    assert m["counts"]["pairs"] == 2 and m["counts"]["no_pair"] == 1  # Q1 (a, b), Q3 (e, f); Q2 has no correct one
    ds = RMDataset(tmp_path / "p")
    assert ds.labels[ds.pairs[:, 0]].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("line, key, words", [
    ('{"prompt": "Q", "response": " a", "label": 2}', "rows.jsonl:2", "label must be 0/1"),
    ('{"problem": "Q", "completions": [" a"], "correct": []}', "rows.jsonl:2", "of one length"),
    ('{"prompt": "Q", "chosen": " a", "rejected": " a"}', "rows.jsonl:2", "same text"),
    ('{"question": "Q"}', "rows.jsonl:2", "unrecognised row"),
    ('not json', "rows.jsonl:2", "not valid JSON"),
    # one response, both verdicts / one pair both ways: the first silently won (half the labels meant were learned)
    ('{"prompt": "Q0", "response": " ok", "label": 0}', "rows.jsonl:2", 'response " ok" is labelled incorrect here '
                                                                      "and correct at "),
    ('{"problem": "Q0", "completions": [" no", " ok"], "correct": [false, false]}', "rows.jsonl:2",
     "rows.jsonl:1 for the same prompt"),
    ('{"prompt": "Q", "chosen": " a", "rejected": " b"}\n{"prompt": "Q", "chosen": " b", "rejected": " a"}',
     "rows.jsonl:3", "rows.jsonl:2 reversed"),
])
def test_prepare_rm_malformed_row_is_one_line_with_its_number(rm_data, tmp_path, line, key, words):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"prompt": "Q0", "response": " ok", "label": 1}\n' + line + "\n")
    proc = run_evolm("prepare-rm", [f"input={src}", f"output={tmp_path / 'out'}", f"tokenizer={rm_data['tok']}"],
                     check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and key in lines[0] and words in lines[0], proc.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


# ------------------------------------------------------------------------------------------------------ rm stage


@pytest.fixture(scope="module")
def outcome_rm(rm_data, tmp_path_factory):
    """The demo recipe's outcome RM on the scored completions, and its HF export (read by several tests)."""
    root = tmp_path_factory.mktemp("outcome_rm")
    run_evolm("train", rm_overrides(root / "rm", rm_data))
    run_evolm("export-hf", [f"src={root / 'rm'}", f"dst={root / 'hf'}", "progress=false"])
    return {"run": root / "rm", "hf": root / "hf"}


@pytest.fixture(scope="module")
def ppo_with_rm(rm_data, outcome_rm, tmp_path_factory):
    """PPO whose reward adds the outcome RM's score (its HF export imported with `evolm import-hf`): rollouts saved;
    its critic is a value-head checkpoint too."""
    root = tmp_path_factory.mktemp("ppo_with_rm")
    imported, out = root / "imported", root / "ppo"
    run_evolm("import-hf", [f"src={outcome_rm['hf']}", f"dst={imported}", "progress=false"])
    run_evolm("train", ["stage=ppo", f"train.init_from={rm_data['sft']}", f"data.paths=[{rm_data['rl8']}]",
                        f"run.out_dir={out}", "train.iters=2", "rl.max_response_tokens=48",
                        "rl.reward=sum", f"rl.reward_model={imported}", "rl.reward_model_weight=0.5",
                        "rl.save_rollouts=true", *COMMON])
    return out


def test_outcome_rm_learns_and_its_hf_export_scores_the_same(rm_data, outcome_rm):
    """A tiny outcome RM separates the checker's correct from incorrect completions of held-out problems
    (validation AUC > 0.8); its HF LlamaForSequenceClassification export scores every validation sequence like
    our model (1e-5), from the text as `evolm eval downstream rm=` sees it."""
    out = outcome_rm["run"]
    last = metrics(out)[max(metrics(out))]
    assert last["val_auc"] > 0.8 and last["val_accuracy"] > 0.8 and last["val_examples"] == 192, last
    meta = json.loads(next((out / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert meta["head"] == "value" and meta["lineage"]["stages"][-1]["stage"] == "rm"

    hf = outcome_rm["hf"]
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    from evolm_nemo.evaluation.rm import RewardModel

    scored = [json.loads(x) for x in rm_data["scored"].read_text().splitlines()]
    val = [json.loads(x) for x in (out / "rm_val_scores.jsonl").read_text().splitlines()]
    pairs = [(scored[v["index"] // 8]["problem"], scored[v["index"] // 8]["completions"][v["index"] % 8]) for v in val]
    got = RewardModel(str(hf), batch_size=7).score(pairs)
    assert max(abs(a - v["score"]) for a, v in zip(got, val)) < 1e-5


def test_a_one_class_outcome_rm_is_said_and_its_auc_is_null(rm_data, tmp_path):
    """Outcome examples all of one class (prepare-rm balance=false): a warning for the training and the validation
    split each, and val_auc null in metrics.jsonl (a bare NaN was written: not JSON), said as undefined."""
    from evolm_nemo.data.rm import PrepareRMConfig, prepare_rm
    from evolm_nemo.pipeline import rm_validation_line

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Q{i}", "response": f" a{k}", "label": 1}) + "\n"
                           for i in range(10) for k in range(2)))
    prepare_rm(PrepareRMConfig(input=str(src), output=str(tmp_path / "one"), tokenizer=str(rm_data["tok"]),
                               balance=False, progress=False))
    out = tmp_path / "rm"
    proc = run_evolm("train", rm_overrides(out, rm_data, f"data.paths=[{tmp_path / 'one'}]", "train.iters=1"))
    assert "warning: rm.objective=outcome: all 16 training examples are correct (one class)" in proc.stderr
    assert "warning: rm.objective=outcome: all 4 validation examples are correct (one class): val_auc is " \
           "undefined" in proc.stderr

    def refuse(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    rows = [json.loads(x, parse_constant=refuse) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_auc"] is None and rows[-1]["val_examples"] == 4, rows[-1]
    assert rm_validation_line(rows[-1]).startswith("[rm] validation on held-out problems: AUC undefined (one class), ")


def test_pairwise_validation_of_chained_preferences(rm_data, tmp_path):
    """Pairwise validation runs end to end: val_accuracy and val_auc are those of the held-out pairs' final scores in
    rm_val_scores.jsonl. Preferences are chained (a>b, b>c): b's stored label is its first role only, so val_auc
    compares every response chosen in a pair with every other response rejected in one (losses.preference.roles_auc)."""
    from evolm_nemo.data.rm import PrepareRMConfig, RMDataset, prepare_rm
    from evolm_nemo.losses.preference import roles_auc

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": f" {a}", "rejected": f" {b}"}) + "\n"
                           for i in range(10) for a, b in (("good", "fair"), ("fair", "poor"))))
    prepare_rm(PrepareRMConfig(input=str(src), output=str(tmp_path / "chain"), tokenizer=str(rm_data["tok"]),
                               kind="pairs", progress=False))
    out = tmp_path / "rm"
    proc = run_evolm("train", rm_overrides(out, rm_data, f"data.paths=[{tmp_path / 'chain'}]",
                                           "rm.objective=pairwise", "train.epochs=1", "train.iters=2"))
    assert " | 1 iters (train.epochs=1 caps train.iters=2) | " in proc.stdout  # 16 training pairs, 16 a batch
    last = metrics(out)[1]
    scores = {v["index"]: v["score"] for v in map(json.loads, (out / "rm_val_scores.jsonl").read_text().splitlines())}
    pairs = np.array([p for p in RMDataset(tmp_path / "chain").pairs.tolist() if p[0] in scores])
    assert len(scores) == 6 and last["val_pairs"] == len(pairs) == 4, (last, scores)  # two held-out problems
    acc = np.mean([(scores[c] > scores[r]) + 0.5 * (scores[c] == scores[r]) for c, r in pairs])
    assert last["val_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert last["val_auc"] == pytest.approx(roles_auc(scores, pairs), abs=1e-6)


def test_rm_in_bf16_starts_from_its_sft_backbone(rm_data, tmp_path):
    """bf16 (what a GPU runs by default) wraps the model in megatron's Float16Module, whose load_state_dict returns
    nothing: the backbone load must still start the RM (it raised AttributeError) and check for missing keys."""
    out = tmp_path / "rm_bf16"
    run_evolm("train", rm_overrides(out, rm_data, "train.precision=bf16", "train.iters=1", "rm.val_fraction=0"))
    row = metrics(out)[1]
    assert 0.0 < row["loss"] < 5.0 and row["grad_norm"] > 0
    meta = json.loads(next((out / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert meta["config"]["train"]["precision"] == "bf16" and meta["head"] == "value"


SPLITS = (("1x4", ["parallel.micro_batch_size=1"], 1), ("4x1", ["parallel.micro_batch_size=4"], 1), ("dp2", ["parallel.micro_batch_size=1"], 2),
          ("packed", ["train.packing=true"], 1), ("packed_dp2", ["train.packing=true"], 2),
          ("budget", ["parallel.max_tokens_per_microbatch=400"], 1))


@pytest.fixture(scope="module")
def references() -> dict:
    """Each stage's one-process pairwise run of the split tests (micro-batch 1), kept for the layout tests: the split
    tests prove micro-batch size changes nothing, so it is their one-process reference too."""
    return {}


def test_rm_loss_and_grads_do_not_depend_on_the_split(rm_data, tmp_path, references):
    """Pairwise (a pair is one unit: both answers in one microbatch): micro 1x4, 4x1, DP=2, packed rows (one
    rank and two) and a token budget agree on loss, accuracy and grad norm (two steps). Outcome (one answer per unit,
    the same layout code): micro 4x1 against DP=2 (micro 1, two per rank) and packed rows over DP=2."""
    for objective, data, splits in (("outcome", rm_data["outcome"], ("4x1", "dp2", "packed_dp2")),
                                    ("pairwise", rm_data["pairs"], tuple(name for name, _, _ in SPLITS))):
        runs = {}
        for name, extra, nproc in (s for s in SPLITS if s[0] in splits):
            out = tmp_path / f"{objective}_{name}"
            run_evolm("train", rm_overrides(out, rm_data, f"data.paths=[{data}]", f"rm.objective={objective}",
                                            *extra, "parallel.global_batch_size=4",
                                            "train.iters=2", "train.log_interval=1", "rm.val_fraction=0"),
                      nproc=nproc)
            runs[name] = metrics(out)
        base = runs["1x4"] if "1x4" in runs else runs["4x1"]
        if objective == "pairwise":
            references["rm"] = base
        for name, got in runs.items():
            for it in (1, 2):
                for key in ("loss", "grad_norm", "accuracy"):
                    assert abs(got[it][key] - base[it][key]) <= 1e-6 * max(1.0, abs(base[it][key])), \
                        (objective, name, it, key, got[it][key], base[it][key])
        assert base[1]["loss"] > 0.1
        packed = runs["packed"] if "packed" in runs else runs["packed_dp2"]
        assert packed[1]["padding_fraction"] < runs["4x1"][1]["padding_fraction"]


@pytest.mark.parametrize("extra, key", [
    (["rm.objective=pairs"], "rm.objective"),
    (["rm.objective=pairwise"], "data.paths"),  # an outcome dataset holds no pairs
    (["rm.val_fraction=1.0"], "rm.val_fraction"),
    (["rm.val_fraction=0.999"], "rm.val_fraction"),  # every problem held out
    (["train.init_from=null"], "train.init_from"),
    (["data.paths=[/nonexistent/rm]"], "data.paths"),
    (["rm.margin=0.5"], "rm.margin"),  # a Bradley-Terry margin: outcome BCE would ignore it
    (["rm.margin=-0.5"], "rm.margin"),  # must be >= 0
])
def test_bad_rm_recipe_is_one_line(rm_data, tmp_path, capsys, extra, key):
    from tests.conftest import refused_in_process

    refused_in_process(capsys, "train", rm_overrides(tmp_path / "r", rm_data, *extra), key)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------------ dpo


def test_dpo_starts_at_log2_widens_the_margin_and_resumes(rm_data, tmp_path):
    """Step 1's loss is log 2 (policy = reference); the chosen-minus-rejected margin rises; with RPO's NLL term
    the chosen log-prob rises too (plain DPO lowered it on this data: both are logged). A resumed run reads the
    reference log-probs computed once at the start."""
    import math

    base = ["experiment=demo_dpo", f"data.paths=[{rm_data['pairs']}]", f"train.init_from={rm_data['sft']}",
            "train.log_interval=1", *COMMON]
    out = tmp_path / "dpo"
    proc = run_evolm("train", [*base, f"run.out_dir={out}", "dpo.sft_weight=1.0"])
    assert proc.stdout.count("reference log-probs of") == 1
    m = metrics(out)
    first, last = m[1], m[max(m)]
    assert abs(first["reward_margin"]) < 1e-5 and abs(first["chosen_reward"]) < 1e-5
    assert last["reward_margin"] > 1.0 and last["chosen_reward"] > 0.1 and last["accuracy"] > 0.9, last
    assert (out / "dpo_reference.safetensors").is_file()

    plain = tmp_path / "plain"
    run_evolm("train", [*base, f"run.out_dir={plain}", "train.iters=4"])
    p = metrics(plain)
    assert abs(p[1]["loss"] - math.log(2.0)) < 1e-6  # policy == reference at the first step
    # the same command again resumes at its last checkpoint: the stored reference is read, not recomputed
    proc = run_evolm("train", [*base, f"run.out_dir={plain}", "train.iters=4"])
    assert "reference log-probs of" not in proc.stdout
    reference = plain / "dpo_reference.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(reference), "pt") as f:  # this run's datasets, a 0-d array: one line (len() raised)
        meta, kept = f.metadata(), reference.read_bytes()
    save_file({"logp": torch.tensor(0.0, dtype=torch.float64)}, str(reference), metadata=meta)
    proc = run_evolm("train", [*base, f"run.out_dir={plain}", "train.iters=4"], check=False)
    assert proc.returncode == 2 and "holds log-probs of shape ()" in proc.stderr, proc.stderr
    reference.write_bytes(kept[:100])  # cut short (a full disk, a killed copy): one line
    proc = run_evolm("train", [*base, f"run.out_dir={plain}", "train.iters=4"], check=False)
    assert proc.returncode == 2 and "dpo_reference.safetensors is unreadable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    reference.unlink()
    proc = run_evolm("train", [*base, f"run.out_dir={plain}", "train.iters=4"], check=False)
    assert proc.returncode == 2 and "dpo_reference.safetensors is missing" in proc.stderr, proc.stderr
    ipo = tmp_path / "ipo"
    run_evolm("train", [*base, f"run.out_dir={ipo}", "train.iters=6", "dpo.loss_type=ipo", "dpo.beta=0.5"])
    q = metrics(ipo)
    assert abs(q[1]["loss"] - 1.0) < 1e-5  # (0 - 1/(2 beta))^2 = 1 at the start
    assert q[6]["reward_margin"] > q[1]["reward_margin"]


def test_dpo_invariant_to_the_split(rm_data, tmp_path, references):
    """Micro 1x4, DP=2 (micro 2 per rank), packed rows (one rank and two) and a token budget: the same DPO steps."""
    runs = {}
    for name, extra, nproc in (("1x4", ["parallel.micro_batch_size=1"], 1), ("dp2", ["parallel.micro_batch_size=2"], 2),
                               ("packed", ["train.packing=true"], 1),
                               ("packed_dp2", ["train.packing=true"], 2),
                               ("budget", ["parallel.max_tokens_per_microbatch=400"], 1)):
        out = tmp_path / name
        run_evolm("train", ["experiment=demo_dpo", f"data.paths=[{rm_data['pairs']}]",
                            f"train.init_from={rm_data['sft']}", f"run.out_dir={out}", "train.iters=2",
                            "train.log_interval=1", *extra, "parallel.global_batch_size=4", *COMMON], nproc=nproc)
        runs[name] = metrics(out)
    references["dpo"] = runs["1x4"]
    for name, got in runs.items():
        for it in (1, 2):
            for key in ("loss", "grad_norm", "reward_margin", "chosen_logp"):
                assert abs(got[it][key] - runs["1x4"][it][key]) < 1e-5 * max(1.0, abs(runs["1x4"][it][key])), \
                    (name, it, key)


# ------------------------------------------------------------------------------------------------------ rl reward


def test_ppo_with_an_imported_hf_reward_model_scores_like_transformers(outcome_rm, ppo_with_rm):
    """An HF LlamaForSequenceClassification (our RM's export) imported with `evolm import-hf` is PPO's reward
    model (rl.reward=sum): each rollout's rm_score equals transformers' score of the same token ids, and the reward
    is the weighted sum with the checker's verdict."""
    hf, out = outcome_rm["hf"], ppo_with_rm
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(hf), dtype=torch.float32).eval()
    rows = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    eos = 2
    assert rows and all("rm_score" in r for r in rows)
    for r in rows:
        resp = r["response_ids"][:-1] if r["response_ids"] and r["response_ids"][-1] == eos else r["response_ids"]
        with torch.no_grad():
            want = float(model(input_ids=torch.tensor([r["prompt_ids"] + resp])).logits[0, 0])
        assert abs(r["rm_score"] - want) < 1e-5
        assert abs(r["reward"] - (r["correct"] + 0.5 * r["rm_score"])) < 1e-6
    last = metrics(out)[max(metrics(out))]
    assert "rm_score_mean" in last and 0.0 <= last["correct_ratio"] <= 1.0


def test_rl_reward_model_errors_are_one_line(rm_data, tmp_path, outcome_rm):
    base = ["stage=ppo", f"train.init_from={rm_data['sft']}", f"data.paths=[{rm_data['rl8']}]",
            f"run.out_dir={tmp_path / 'p'}", "train.iters=1", *COMMON]
    for extra, words in ((["rl.reward=rm"], "needs a reward-model checkpoint"),
                         (["rl.reward=rm", f"rl.reward_model={rm_data['sft']}"], "not a reward model"),
                         (["rl.reward=bogus"], "must be one of"),
                         # a 128-token RM would read only the end of a 256-token prompt + response (BOS cut off)
                         (["rl.reward=rm", f"rl.reward_model={outcome_rm['run']}", "model.seq_length=256"],
                          "reads at most 128 tokens, but a prompt + response may hold 256")):
        proc = run_evolm("train", [*base, *extra], check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "rl.reward" in lines[0] and words in lines[0], \
            proc.stderr


def _layout_base(rm_data, stage: str) -> list[str]:
    return [f"experiment=demo_{stage}", f"data.paths=[{rm_data['pairs']}]", f"train.init_from={rm_data['sft']}",
            "train.iters=2", "train.log_interval=1", "parallel.micro_batch_size=2", "parallel.global_batch_size=4",
            *COMMON, *(["rm.val_fraction=0", "rm.objective=pairwise"] if stage == "rm" else [])]


@pytest.fixture(scope="module")
def one_process(rm_data, tmp_path_factory, references):
    """Each stage's padded one-process run (the split test's, else made once, on first use): the layouts'
    reference."""
    runs = references

    def get(stage: str) -> dict:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"{stage}_tp1") / "tp1"
            run_evolm("train", [*_layout_base(rm_data, stage), f"run.out_dir={out}"])
            runs[stage] = metrics(out)
        return runs[stage]

    return get


@pytest.mark.parametrize("stage, layout, packing", [("rm", "tp2", False), ("rm", "pp2", False), ("dpo", "tp2", False),
                                                   ("rm", "pp2", True), ("dpo", "tp2_sp", True), ("rm", "tp2_sp", True)])
def test_layouts_equal_tp1(rm_data, tmp_path, one_process, stage, layout, packing):
    """Pairwise RM at TP=2 and PP=2 (a microbatch of pairs sends 2x rows between stages), DPO at TP=2, and packed
    (RM at PP=2, DPO and RM at TP=2 with sequence parallel: the replicated value head's gradient is split back over
    the ranks, not summed): the same losses and grad norms as one padded process."""
    run_evolm("train", [*_layout_base(rm_data, stage), f"parallel={layout}", "parallel.micro_batch_size=2",
                        "parallel.global_batch_size=4", f"run.out_dir={tmp_path / layout}",
                        f"train.packing={str(packing).lower()}"], nproc=2)
    ref, got = one_process(stage), metrics(tmp_path / layout)
    for it in (1, 2):
        for key in ("loss", "grad_norm"):
            assert abs(got[it][key] - ref[it][key]) < 1e-5 * max(1.0, abs(ref[it][key])), (it, key)


def test_a_value_head_checkpoint_is_refused_where_a_language_model_or_a_reward_model_belongs(rm_data, tmp_path,
                                                                                            outcome_rm, ppo_with_rm):
    """A reward model as the parent of an LM stage would start from a random LM head; a PPO critic as rl.reward_model
    scores returns, not rewards: both are one line naming the key, before anything is built."""
    rm, ppo = outcome_rm["run"], ppo_with_rm
    data = {"sft": [f"data.paths=[{rm_data['outcome']}]"], "dpo": [f"data.paths=[{rm_data['pairs']}]"],
            "grpo": [f"data.paths=[{rm_data['rl8']}]"]}
    for stage, extra in data.items():
        proc = run_evolm("train", [f"stage={stage}", f"train.init_from={rm}", f"run.out_dir={tmp_path / stage}",
                                   "train.iters=1", *extra, *COMMON], check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: train.init_from:") and "no language-model head" in lines[0], lines[0]
        assert not (tmp_path / stage).exists()
    proc = run_evolm("train", ["stage=grpo", f"train.init_from={rm_data['sft']}", f"data.paths=[{rm_data['rl8']}]",
                               f"run.out_dir={tmp_path / 'g'}", "train.iters=1", "rl.reward=rm",
                               f"rl.reward_model={ppo / 'critic'}", *COMMON], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "rl.reward_model" in lines[0] and "PPO critic" in lines[0]
    # its HF export and the import of that stay a critic (evolm_export.json carries the role): the same refusal,
    # where the import used to be accepted as a reward model; eval rm= refuses the export too
    hf_dir, imported = tmp_path / "critic_hf", tmp_path / "critic_imported"
    run_evolm("export-hf", [f"src={ppo / 'critic'}", f"dst={hf_dir}", "progress=false"])
    assert json.loads((hf_dir / "evolm_export.json").read_text())["role"] == "critic"
    assert json.loads((outcome_rm["hf"] / "evolm_export.json").read_text())["role"] == "reward_model"
    assert "PPO critic" in (hf_dir / "README.md").read_text()
    proc = run_evolm("import-hf", [f"src={hf_dir}", f"dst={imported}", "progress=false"])
    assert "(value, a PPO critic, " in proc.stdout
    meta = json.loads((imported / "iter_0000000" / "evolm.json").read_text())
    assert meta["role"] == "critic" and meta["lineage"]["parents"][0]["role"] == "critic"
    proc = run_evolm("train", ["stage=grpo", f"train.init_from={rm_data['sft']}", f"data.paths=[{rm_data['rl8']}]",
                               f"run.out_dir={tmp_path / 'g2'}", "train.iters=1", "rl.reward=rm",
                               f"rl.reward_model={imported}", *COMMON], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: rl.reward_model:") and \
        "is a PPO critic" in lines[0], proc.stderr
    assert not (tmp_path / "g2").exists()
    from evolm_nemo.config.errors import ConfigError
    from evolm_nemo.evaluation.evaluate import _check_rm

    with pytest.raises(ConfigError) as exc:
        _check_rm(str(hf_dir))
    assert exc.value.key == "rm" and "is the export of a PPO critic" in exc.value.message
    _check_rm(str(outcome_rm["hf"]))  # a reward model's export passes


def test_the_reward_model_runs_in_the_actors_precision(tmp_path, rm_data, outcome_rm):
    """bf16: the frozen reward model is built as the actor is (megatron's Float16Module: every parameter in bf16, norms
    too), so its scores are the fp32 model's up to bf16 rounding -- transformers' fp32 score of the export, within
    0.05 on scores of order 1."""
    import subprocess
    import sys

    from transformers import AutoModelForSequenceClassification

    from tests.conftest import REPO, subprocess_env
    from tests.rl.test_rl import rl_args

    facts = tmp_path / "facts.json"
    parent = {"sft": rm_data["sft"]}
    args = rl_args(tmp_path / "run", parent, "grpo", rm_data["rl8"], "train.iters=1", "rl.prompts_per_step=4",
                   "rl.kl=loss", "rl.initial_policy_kl_penalty=0.5", "train.precision=bf16", "rl.reward=rm",
                   f"rl.reward_model={outcome_rm['run']}")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "rl" / "_frozen_precision.py"), str(facts), *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(facts.read_text())
    assert got["reward_model"] == ["torch.bfloat16"], got
    model = AutoModelForSequenceClassification.from_pretrained(str(outcome_rm["hf"]), dtype=torch.float32).eval()
    with torch.no_grad():
        want = [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in got["rm_sequences"]]
    assert all(abs(a - b) < 0.05 for a, b in zip(got["rm_scores"], want)), (got["rm_scores"], want)
