"""CPT: continue from a pretraining checkpoint on a token-ratio mix (megatron BlendedDataset), lineage recorded."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from evolm_nemo.data.synthetic import ensure_synthetic
from tests.conftest import losses, one_line_error, run_evolm, tiny, tree_bytes


def test_cpt_on_a_replay_mix(tmp_path, data_cache):
    pre = tmp_path / "pretrain"
    run_evolm("train", tiny(pre, data_cache, "train.iters=3"))
    text = ensure_synthetic(data_cache, 400, 1234, vocab_size=512)
    math = ensure_synthetic(data_cache, 200, 7, kind="math", tokenizer_dir=text.tokenizer_dir)
    cpt = tmp_path / "cpt"
    own_cache = tmp_path / "index_cache_root"  # megatron's sample-index cache for this run alone
    mine = tiny(cpt, str(own_cache), "stage=cpt", f"train.init_from={pre / 'checkpoints'}", "train.iters=4",
                "data.source=indexed", "data.name=fw8_fm42", f"data.paths=[{text.prefix},{math.prefix}]",
                "data.weights=[8,42]", f"data.tokenizer={text.tokenizer_dir}", "train.save_interval=2")
    run_evolm("train", mine)
    got = losses(cpt)
    assert sorted(got) == [1, 2, 3, 4]
    meta = json.loads((cpt / "checkpoints" / "iter_0000004" / "evolm.json").read_text())
    stages = meta["lineage"]["stages"]
    assert [s["stage"] for s in stages] == ["pretrain", "cpt"] and stages[1]["data"] == "fw8_fm42"
    assert meta["lineage"]["parent"] == str(pre / "checkpoints")
    # the parent checkpoint it started from (what `evolm suite launch` compares with the parent's now), kept by a
    # resume
    parent = json.loads((pre / "checkpoints" / "iter_0000003" / "evolm.json").read_text())
    assert meta["parent_run"] == {"run_id": parent["run_id"], "iteration": 3}
    shutil.rmtree(cpt / "checkpoints" / "iter_0000004")
    assert "resuming at iteration 2" in run_evolm("train", mine).stdout
    assert json.loads((cpt / "checkpoints" / "iter_0000004" / "evolm.json").read_text())["parent_run"] == \
        meta["parent_run"]
    # the mix is megatron's BlendedDataset with the token ratios: 8/50 of the samples come from the replay corpus
    index = [p for p in (own_cache / "index_cache").glob("*-BlendedDataset-train-dataset_index.npy")]
    assert len(index) == 1
    picks = np.load(index[0], allow_pickle=False)
    assert len(picks) >= 4 * 8 and abs((picks == 0).mean() - 8 / 50) < 0.05
    # another mix is another run (train.init_from, a new run.out_dir): resuming this one with it is refused
    before = tree_bytes(cpt)
    other = tiny(cpt, str(own_cache), "stage=cpt", f"train.init_from={pre / 'checkpoints'}", "train.iters=4",
                 "data.source=indexed", "data.name=fw8_fm42", f"data.paths=[{text.prefix},{math.prefix}]",
                 "data.weights=[42,8]", f"data.tokenizer={text.tokenizer_dir}")
    line = one_line_error(run_evolm("train", other, check=False), "data.weights")
    assert "was trained with data.weights=[8.0,42.0], this recipe has [42.0,8.0]" in line
    assert tree_bytes(cpt) == before


def test_tokens_per_source_of_an_8_42_mix(tmp_path, data_cache):
    """Per-source accounting (issue 13 item 3): the tokens each source gave, in metrics.jsonl every record, in the
    final line and in the checkpoint, are megatron's blending index counted over the trained global batches, and
    within 0.5% of the 8:42 plan. (demo_cpt's mix, trained from scratch: the accounting needs no parent, and CPT
    refuses to start without one.)"""
    out = tmp_path / "cpt"
    iters, gbs, seq = 20, 64, 128
    proc = run_evolm("train", tiny(out, data_cache, "data.synthetic_kinds=[text,math]", "data.weights=[8,42]",
                                   f"train.iters={iters}", f"parallel.global_batch_size={gbs}",
                                   "parallel.micro_batch_size=16"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:  # every sample is seq tokens of one source
        assert r["tokens_text"] + r["tokens_math"] == r["iteration"] * gbs * seq == r["tokens"]
    last = records[-1]
    total = iters * gbs * seq
    for name, weight in (("text", 8 / 50), ("math", 42 / 50)):
        assert abs(last[f"tokens_{name}"] - weight * total) / (weight * total) <= 0.005, (name, last)
    # the counts are the blending index's: recount it from megatron's cache
    index = list((Path(data_cache) / "index_cache").glob("*-BlendedDataset-train-dataset_index.npy"))
    picks = [np.load(p)[: iters * gbs] for p in index if iters * gbs <= len(np.load(p)) <= iters * gbs + 1]
    assert any(int((p == 0).sum()) * seq == last["tokens_text"] for p in picks)
    line = next(x for x in proc.stdout.splitlines() if "tokens per source after" in x)
    assert "text " in line and "plan 16.00%" in line and "plan 84.00%" in line
    meta = json.loads((out / "checkpoints" / f"iter_{iters:07d}" / "evolm.json").read_text())
    assert meta["extra"]["tokens_by_source"] == {"text": last["tokens_text"], "math": last["tokens_math"]}
    assert meta["lineage"]["stages"][-1]["mix"] == {"text": 0.16, "math": 0.84}


def _val(out) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith("val_loss_")} for r in rows if "val_s" in r}


def test_held_out_loss_per_source_before_and_after_cpt(tmp_path, data_cache):
    """Checkpoint dynamics (issue 13 items 2, 3): held-out loss per source at token intervals; each source's held-out
    samples are the same whatever the mix, so CPT's loss before its first step is the parent's at its last; the
    results are deterministic for a seed."""
    split = 'data.split="98,2,0"'
    pre = tmp_path / "pre"
    run_evolm("train", tiny(pre, data_cache, "train.iters=3", "data.synthetic_kinds=[text,math]", "data.weights=[1,1]",
                            split, "train.val_tokens_interval=2048"))
    parent = _val(pre)
    assert sorted(parent) == [2, 3] and set(parent[3]) >= {"val_loss_text", "val_loss_math"}
    runs = []
    for name in ("cpt", "cpt_again"):
        out = tmp_path / name
        proc = run_evolm("train", tiny(out, data_cache, "experiment=demo_cpt", f"train.init_from={pre}",
                                       "train.iters=6", split, "train.val_tokens_interval=3072"))
        runs.append(_val(out))
        assert "held-out loss per source, iteration 0 -> 6: text " in proc.stdout
    got = runs[0]
    assert sorted(got) == [3, 6] and got == runs[1]  # deterministic
    for source in ("text", "math"):
        assert got[3][f"val_loss_{source}_at_0"] == pytest.approx(parent[3][f"val_loss_{source}"], abs=1e-6)
        assert got[6][f"val_loss_{source}_at_0"] == got[3][f"val_loss_{source}_at_0"]
    assert got[6]["val_loss_math"] < got[3]["val_loss_math_at_0"]  # 42 parts math: its held-out loss falls
    # a source of weight 0 is not trained on, only measured (CPT without replay that still watches general text)
    out = tmp_path / "no_replay"
    proc = run_evolm("train", tiny(out, data_cache, "experiment=demo_cpt", f"train.init_from={pre}", "train.iters=6",
                                   split, "train.val_tokens_interval=6144", "data.weights=[0,50]"))
    assert "text 0 (0.00%, plan 0.00%), math 6.144K (100.00%, plan 100.00%)" in proc.stdout
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["tokens_text"] == 0 and last["tokens_math"] == last["tokens"] == 6 * 1024
    assert last["val_loss_text_at_0"] == pytest.approx(parent[3]["val_loss_text"], abs=1e-6)
    assert last["val_loss_math"] < last["val_loss_math_at_0"]


def test_held_out_loss_needs_a_validation_split(tmp_path, data_cache, capsys):
    from evolm_nemo import cli

    assert cli.main(["train", *tiny(tmp_path / "r", data_cache, "train.val_tokens_interval=1M")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: train.val_tokens_interval: ") and "98,2,0" in err[0]


def test_cpt_without_a_parent_is_one_line(tmp_path, data_cache, capsys):
    """CPT continues a trained model: without train.init_from (the demo_cpt recipe leaves it to `evolm pipeline`) it
    trained one from random weights and recorded it as a CPT; now one line, before anything is built or written."""
    from tests.conftest import refused_in_process

    out = tmp_path / "cpt"
    line = refused_in_process(capsys, "train", tiny(out, data_cache, "experiment=demo_cpt", "train.iters=2"),
                              "train.init_from")
    assert "stage=cpt continues a trained model" in line and "train.branch_from" in line
    assert not out.exists()


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_every_stage_without_a_parent_says_it_in_the_same_line_first(tmp_path, data_cache, capsys, stage):
    """One check for every stage that continues a model (``stages.plan_run``, before the recipe's data is read):
    each stage had its own copy, in its own words, after some of its data checks."""
    from tests.conftest import refused_in_process

    out = tmp_path / stage
    line = refused_in_process(capsys, "train", tiny(out, data_cache, f"experiment=demo_{stage}",
                                                    "data.source=indexed", "data.paths=[/nonexistent/data]"),
                              "train.init_from")
    assert f"stage={stage} continues a trained model: set train.init_from" in line, line
    assert "train.branch_from" not in line and not out.exists()  # a cooldown branch is pretraining's
