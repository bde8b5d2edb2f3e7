"""`evolm suite report` / `evolm report suite=`: PAPER.md's tables from a suite's result.json files (written here
in the documented schema), EvoLM's published figures beside ours."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def _write(root, node, data):
    (root / node).mkdir(parents=True)
    (root / node / "result.json").write_text(json.dumps({"schema": "evolm-result/1", "model": node, **data}))


def test_evolm_tables(tmp_path):
    root = tmp_path / "runs"
    tasks = {"hellaswag": 50.0, "winogrande": 52.0, "piqa": 70.0, "openbookqa": 35.0, "arc_easy": 60.0,
             "arc_challenge": 33.0}
    _write(root, "eval_pretrain_1b_160b", {"upstream": {"avg": 50.0, "tasks": {k: {"score": v} for k, v in
                                                                               tasks.items()}}})
    for budget, avg in (("20b", 46.44), ("40b", 49.38), ("80b", 49.9), ("320b", 50.1)):  # 1B: gains +2.94, +0.52,
        _write(root, f"eval_pretrain_1b_{budget}", {"upstream": {"avg": avg}})            # +0.10, +0.10: not less
    down = {"scoring": "evolm", "id_avg": {"pass1": 0.125, "maj16": 0.15, "pass16": 0.35},
            "ood_avg": {"pass1": 0.25, "maj16": 0.26, "pass16": 0.55},
            "suites": {"gsm8k_platinum": {"pass1": 0.2}}}
    _write(root, "eval_sft_1b_fw8_fm42_100k_ep1", {"downstream": down})
    for ep, (acc, ood) in ((2, (0.15, 0.24)), (4, (0.16, 0.22))):  # part of the epochs sweep
        _write(root, f"eval_sft_1b_fw8_fm42_100k_ep{ep}", {"downstream": {"id_avg": {"pass1": acc},
                                                                          "ood_avg": {"pass1": ood}}})
    proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", "report", "suite=evolm", f"root={root}"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (root / "report" / "report.md").read_text()
    assert "| 1B-160BT | 50.00 | 52.30 | -2.30 |" in md
    assert "| 1B-20BT | 46.44 | 46.44 | 0.00 |" in md
    assert "| 50.00 / 52.30 | 52.00 / 53.99 | 70.00 / 71.71 | 35.00 / 36.60 | 60.00 / 63.09 | 33.00 / 36.09 |" in md
    assert ("| 1B-160BT | 12.5/- (12.8/17.5) | 15.0/- (14.2/22.5) | 35.0/- (34.5/45.1) | 25.0/- (23.8/28.2) | "
            "26.0/- (25.6/31.6) | 55.0/- (55.3/64.9) |") in md
    assert "| FW8+FM42 | 20.00 | 21.01 |" in md and "| no CPT | - | 6.04 |" in md
    assert "downstream scoring: evolm" in md and "16 results missing" in md
    # the takeaways: measured where the suite's results are there, "not measured" (named) where not
    assert ("| 2 | Pretraining: each larger budget raises the upstream 0-shot average by less than the one before "
            "(diminishing returns) (`diminishing_returns`) | **does not hold** | upstream 0-shot average by budget: "
            "46.44 -> 49.38 -> 49.90 -> 50.00 -> 50.10; gains: +2.94, +0.52, +0.10, +0.10 | 1 |") in md
    assert "| 4 | Domain CPT is the bridge" in md and "| 9 | Under a fixed post-training budget" in md
    assert "0 of 9 hold; 8 not measured" in md  # the epochs sweep has 3 of its 6 points
    assert "](takeaways.png)" in md and (root / "report" / "takeaways.png").is_file()
    rows = list(csv.DictReader((root / "report" / "report.csv").open()))
    assert {"table": "upstream", "row": "1B-160BT", "metric": "avg", "ours": "50.0000", "evolm": "52.3"} in rows


def test_bad_report_section_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngpus_per_node: 1\nreport:\n  downstream:\n    - {row: x, sft: a, rl: b}\n"
                    "nodes:\n  a: {experiment: demo}\n  b: {kind: export, parent: a}\n")
    proc = subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "report", f"suite={path}"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: report.downstream[0].sft: 'a' is not an eval node of this suite"
