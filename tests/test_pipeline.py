"""`evolm pipeline` (what `make demo` runs), shortened: pretrain -> CPT on a replay mix -> SFT (greedy accuracy before
and after) -> samples -> verified HF export -> eval + report."""

import json

from tests.conftest import run_evolm


def test_pipeline_end_to_end(tmp_path, data_cache):
    out = tmp_path / "demo"
    proc = run_evolm("pipeline", [f"run.out_dir={out}", f"data.cache_dir={data_cache}", "data.synthetic_docs=400",
                                  "train.iters=30", "train.save_interval=0", "train.progress=false"])
    text = proc.stdout
    assert "[pretrain] loss curve" in text and "[cpt] loss curve" in text and "[sft] loss curve" in text
    assert "(falling)" in text and "before SFT" in text and "after SFT" in text
    cpt = json.loads(next((out / "cpt" / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert [s["stage"] for s in cpt["lineage"]["stages"]] == ["pretrain", "cpt"]
    assert cpt["config"]["data"]["weights"] == [8.0, 42.0] and cpt["config"]["data"]["synthetic_kinds"] == ["text", "math"]
    sft = json.loads(next((out / "sft" / "checkpoints").glob("iter_*/evolm.json")).read_text())
    assert [s["stage"] for s in sft["lineage"]["stages"]] == ["pretrain", "cpt", "sft"]
    assert sft["lineage"]["parent"].startswith(str(out / "cpt"))
    assert text.count("sample> ") == 4
    assert "HF export (verified)" in text and (out / "hf" / "config.json").is_file()
    assert "gsm8k_platinum" in text and "Maj@16" in text and "plot: " in text
    result = json.loads((out / "eval" / "result.json").read_text())
    assert result["downstream"]["suites"]["gsm8k_platinum"]["n"] == 8 and result["stage"] == "sft"
    rows = [json.loads(line) for line in (out / "eval" / "scored.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["completions"]) == 16 and len(r["correct"]) == 16 for r in rows)
