"""CPT: continue from a pretraining checkpoint on a token-ratio mix (megatron BlendedDataset), lineage recorded."""

import json
from pathlib import Path

import numpy as np

from evolm_nemo.data.synthetic import ensure_synthetic
from tests.conftest import losses, run_evolm, tiny


def test_cpt_on_a_replay_mix(tmp_path, data_cache):
    pre = tmp_path / "pretrain"
    run_evolm("train", tiny(pre, data_cache, "train.iters=3"))
    text = ensure_synthetic(data_cache, 400, 1234, vocab_size=512)
    math = ensure_synthetic(data_cache, 200, 7, kind="math", tokenizer_dir=text.tokenizer_dir)
    cpt = tmp_path / "cpt"
    own_cache = tmp_path / "index_cache_root"  # megatron's sample-index cache for this run alone
    run_evolm("train", tiny(cpt, str(own_cache), "stage=cpt", f"train.init_from={pre / 'checkpoints'}", "train.iters=4",
                            "data.source=indexed", "data.name=fw8_fm42", f"data.paths=[{text.prefix},{math.prefix}]",
                            "data.weights=[8,42]", f"data.tokenizer={text.tokenizer_dir}"))
    got = losses(cpt)
    assert sorted(got) == [1, 2, 3, 4]
    meta = json.loads((cpt / "checkpoints" / "iter_0000004" / "evolm.json").read_text())
    stages = meta["lineage"]["stages"]
    assert [s["stage"] for s in stages] == ["pretrain", "cpt"] and stages[1]["data"] == "fw8_fm42"
    assert meta["lineage"]["parent"] == str(pre / "checkpoints")
    # the mix is megatron's BlendedDataset with the token ratios: 8/50 of the samples come from the replay corpus
    index = [p for p in (own_cache / "index_cache").glob("*-BlendedDataset-train-dataset_index.npy")]
    assert len(index) == 1
    picks = np.load(index[0], allow_pickle=False)
    assert len(picks) >= 4 * 8 and abs((picks == 0).mean() - 8 / 50) < 0.05
