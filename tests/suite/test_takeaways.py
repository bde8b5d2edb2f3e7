"""`report.takeaways` (suite/takeaways.py): EvoLM's six findings checked against a suite's own runs. The runs'
files (metrics.jsonl held-out losses, result.json downstream averages) are written here in the documented formats;
the verdicts follow from their numbers: a claim that holds, one that does not, one whose runs are missing, seeds
averaged with their spread."""

from __future__ import annotations

import json

import pytest

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.suite import report, spec

SUITE = """name: t
gpus_per_node: 1
report:
  takeaways:
    - {claim: diminishing_returns, budgets: [p1, p2, p3], source: general}
    - {claim: replay_mitigates_forgetting, no_replay: cpt_math, replay: cpt_mix, general: general, domain: math}
    - {claim: cpt_bridge, with_cpt: e_cpt, without_cpt: e_nocpt}
    - {claim: sft_scaling, steps: [e_ep1, e_ep2, e_ep4], labels: [1, 2, 4], axis: SFT epochs}
    - {claim: rl_sharpens, sft: [e_sft_s1, e_sft_s2], rl: [e_rl_s1, e_rl_s2]}
    - {claim: allocation, steps: [e_missing, e_cpt]}
nodes:
  p1: {experiment: demo}
  p2: {experiment: demo}
  p3: {experiment: demo}
  cpt_math: {experiment: demo_cpt, parent: p3}
  cpt_mix: {experiment: demo_cpt, parent: p3}
  x: {kind: export, parent: cpt_mix}
"""
EVALS = ["e_cpt", "e_nocpt", "e_ep1", "e_ep2", "e_ep4", "e_sft_s1", "e_sft_s2", "e_rl_s1", "e_rl_s2", "e_missing"]


def _metrics(root, node, **vals):
    (root / node).mkdir(parents=True)
    rows = [{"iteration": 1, "loss": 3.0}, {"iteration": 2, "loss": 2.5, **vals}, {"iteration": 3, "loss": 2.4}]
    (root / node / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 4, "lo')


def _result(root, node, pass1, ood=0.1, ratio=0.2, pass16=0.6):
    (root / node).mkdir(parents=True)
    down = {"id_avg": {"pass1": pass1, "pass16": pass16, "correct_ratio": ratio},
            "ood_avg": {"pass1": ood, "pass16": 0.3, "correct_ratio": 0.1}}
    (root / node / "result.json").write_text(json.dumps({"schema": "evolm-result/1", "downstream": down}))


@pytest.fixture
def suite(tmp_path):
    text = SUITE + "".join(f"  {e}: {{kind: eval, parent: x}}\n" for e in EVALS)
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_verdicts_follow_the_numbers(tmp_path, suite):
    root = tmp_path / "runs"
    # pretraining: drops 0.5 then 0.2 (diminishing)
    for node, loss in (("p1", 3.0), ("p2", 2.5), ("p3", 2.3)):
        _metrics(root, node, val_loss_general=loss)
    # CPT: no replay forgets 0.4 of general, replay 0.1; both gain on math
    _metrics(root, "cpt_math", val_loss_general=2.7, val_loss_general_at_0=2.3, val_loss_math=1.0,
             val_loss_math_at_0=2.0)
    _metrics(root, "cpt_mix", val_loss_general=2.4, val_loss_general_at_0=2.3, val_loss_math=1.2,
             val_loss_math_at_0=2.0)
    _result(root, "e_cpt", 0.30)
    _result(root, "e_nocpt", 0.35)  # the bridge does not show here: reported as such
    for node, acc, ood in (("e_ep1", 0.20, 0.10), ("e_ep2", 0.30, 0.12), ("e_ep4", 0.34, 0.11)):
        _result(root, node, acc, ood)
    _result(root, "e_sft_s1", 0.20, ratio=0.20, pass16=0.60)
    _result(root, "e_sft_s2", 0.24, ratio=0.22, pass16=0.62)
    _result(root, "e_rl_s1", 0.30, ratio=0.35, pass16=0.61)
    _result(root, "e_rl_s2", 0.32, ratio=0.37, pass16=0.63)
    s = spec.load(str(suite), {"root": str(root)})
    t = report.build(s)
    md = "\n".join(t.md)
    got = {row[1]: row[2] for row in t.cells if row[0] == "takeaways"}
    assert got == {"diminishing_returns": "holds", "replay_mitigates_forgetting": "holds",
                   "cpt_bridge": "does not hold", "sft_scaling": "holds", "rl_sharpens": "holds",
                   "allocation": "not measured"}
    assert "general loss by budget: 3.000 -> 2.500 -> 2.300; drops: +0.500, +0.200" in md
    assert "forgetting): no replay +0.400, replay +0.100" in md and "no replay +1.000, replay +0.800" in md
    assert "with CPT 30.0%, without 35.0%" in md
    assert "greedy 22.0% [20.0..24.0, 2 seeds] -> 31.0% [30.0..32.0, 2 seeds]" in md
    rl_row = next(line for line in t.md if line.startswith("| 5 | RL raises greedy accuracy"))
    assert rl_row.endswith("| 2 |")  # two seeds
    assert "4 of 6 hold; 1 not measured" in md
    # each claim's panel draws the numbers its verdict read, over its named points
    figs = {c.claim: c.figure for c in t.claims}
    sft = figs["sft_scaling"]
    assert (sft.kind, sft.points, sft.axis, sft.percent) == ("line", ["1", "2", "4"], "SFT epochs", True)
    assert [v.mean for v in sft.series["in-domain greedy"]] == [0.20, 0.30, 0.34]
    assert [v.mean for v in sft.series["out-of-domain greedy"]] == [0.10, 0.12, 0.11]
    dim = figs["diminishing_returns"]
    assert dim.points == ["p1", "p2", "p3"] and [v.mean for v in dim.series["general held-out loss"]] == [3.0, 2.5, 2.3]
    replay = figs["replay_mitigates_forgetting"].series
    assert [round(v.mean, 6) for v in replay["general loss change (forgetting)"]] == [0.4, 0.1]
    assert [round(v.mean, 6) for v in replay["math loss drop (domain gain)"]] == [1.0, 0.8]
    greedy = figs["rl_sharpens"].series["greedy"]
    assert [(v.mean, v.lo, v.hi, v.n) for v in greedy] == [(0.22, 0.20, 0.24, 2), (0.31, 0.30, 0.32, 2)]
    assert figs["allocation"].series["in-domain greedy"] == [None, figs["cpt_bridge"].series["in-domain greedy"][0]]
    # the report writes the figure and links it under the takeaways table
    out = report.write(s, tmp_path / "report")
    png = (out / "takeaways.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    written = (out / "report.md").read_text()
    assert "](takeaways.png)" in written and written.index("](takeaways.png)") > written.index("4 of 6 hold")


def test_no_numbers_no_figure(tmp_path, suite):
    out = report.write(spec.load(str(suite), {"root": str(tmp_path / "runs")}), tmp_path / "report")
    assert not (out / "takeaways.png").exists() and "takeaways.png" not in (out / "report.md").read_text()
    assert "0 of 6 hold; 6 not measured" in (out / "report.md").read_text()


def test_a_direction_that_does_not_appear_is_reported_as_such(tmp_path, suite):
    root = tmp_path / "runs"
    for node, loss in (("p1", 3.0), ("p2", 2.9), ("p3", 2.5)):  # drops 0.1 then 0.4: not diminishing
        _metrics(root, node, val_loss_general=loss)
    _result(root, "e_sft_s1", 0.20)
    _result(root, "e_sft_s2", 0.20)
    _result(root, "e_rl_s1", 0.20, pass16=0.9)  # no greedy gain, Pass@16 moved
    _result(root, "e_rl_s2", 0.20, pass16=0.9)
    t = report.build(spec.load(str(suite), {"root": str(root)}))
    got = {row[1]: row[2] for row in t.cells if row[0] == "takeaways"}
    assert got["diminishing_returns"] == "does not hold" and got["rl_sharpens"] == "does not hold"
    assert got["replay_mitigates_forgetting"] == "not measured"


def test_diminishing_returns_over_upstream_evaluations(tmp_path):
    """Budgets given as eval nodes: the claim reads their upstream 0-shot average (EvoLM's own figures for 1B hold:
    gains +2.94, +2.50, +0.42, +0.19); its panel draws those averages."""
    evals = ["u20", "u40", "u80", "u160", "u320"]
    text = (SUITE.split("report:")[0] + "report:\n  takeaways:\n    - {claim: diminishing_returns, budgets: ["
            + ", ".join(evals) + "], labels: [20B, 40B, 80B, 160B, 320B]}\nnodes:" + SUITE.split("nodes:")[1]
            + "".join(f"  {e}: {{kind: eval, mode: upstream, parent: x}}\n" for e in evals))
    path = tmp_path / "u.yaml"
    path.write_text(text)
    root = tmp_path / "runs"
    for node, avg in zip(evals, (46.44, 49.38, 51.88, 52.30, 52.49)):
        (root / node).mkdir(parents=True)
        (root / node / "result.json").write_text(json.dumps({"upstream": {"avg": avg}}))
    t = report.build(spec.load(str(path), {"root": str(root)}))
    claim = t.claims[0]
    assert claim.verdict == "holds" and claim.says.startswith("Pretraining: each larger budget raises the upstream")
    assert claim.evidence == ("upstream 0-shot average by budget: 46.44 -> 49.38 -> 51.88 -> 52.30 -> 52.49; gains: "
                              "+2.94, +2.50, +0.42, +0.19")
    series = claim.figure.series["upstream 0-shot average"]
    assert [v.mean for v in series] == [46.44, 49.38, 51.88, 52.30, 52.49] and claim.figure.percent is False
    (root / "u80" / "result.json").unlink()
    claim = report.build(spec.load(str(path), {"root": str(root)})).claims[0]
    assert claim.verdict == "not measured" and claim.evidence == "upstream average missing for u80"


@pytest.mark.parametrize("row,key", [
    ("{claim: nope}", "report.takeaways[0].claim"),
    ("{claim: cpt_bridge, with_cpt: e_cpt}", "report.takeaways[0].without_cpt"),
    ("{claim: cpt_bridge, with_cpt: p1, without_cpt: e_cpt}", "report.takeaways[0].with_cpt"),
    ("{claim: sft_scaling, steps: [e_cpt]}", "report.takeaways[0].steps"),
    ("{claim: diminishing_returns, budgets: [p1, p2], source: general}", "report.takeaways[0].budgets"),
    ("{claim: rl_sharpens, sft: e_cpt, rl: e_cpt, extra: 1}", "report.takeaways[0].extra"),
    ("{claim: sft_scaling, steps: [e_cpt, e_cpt], labels: [1]}", "report.takeaways[0].labels"),
    ("{claim: sft_scaling, steps: [e_cpt, e_cpt], axis: [1]}", "report.takeaways[0].axis"),
    ("{claim: cpt_bridge, with_cpt: e_cpt, without_cpt: e_cpt, labels: [a, b]}", "report.takeaways[0].labels"),
    ("{claim: diminishing_returns, budgets: [e_cpt, e_cpt, e_cpt], source: general}", "report.takeaways[0].source"),
    ("{claim: diminishing_returns, budgets: [p1, p2, e_cpt], source: general}", "report.takeaways[0].budgets"),
    ("{claim: diminishing_returns, budgets: [p1, p2, p3]}", "report.takeaways[0].source"),
    ("{claim: diminishing_returns, budgets: [p1, p2, x]}", "report.takeaways[0].budgets"),
])
def test_a_bad_claim_is_named(tmp_path, row, key):
    text = SUITE.split("report:")[0] + f"report:\n  takeaways:\n    - {row}\n" + "nodes:" + SUITE.split("nodes:")[1]
    path = tmp_path / "bad.yaml"
    path.write_text(text + "  e_cpt: {kind: eval, parent: x}\n")
    with pytest.raises(ConfigError) as err:
        spec.load(str(path))
    assert err.value.key == key


def test_rl_sharpens_without_a_correct_completion(tmp_path, suite):
    """A model with no correct completion has no correct ratio (undefined, not 0): greedy alone still refutes the
    claim when RL did not raise it; with a greedy gain the claim cannot be judged."""
    root = tmp_path / "runs"
    for node, p in (("e_sft_s1", 0.0), ("e_sft_s2", 0.0), ("e_rl_s1", 0.0), ("e_rl_s2", 0.0)):
        _result(root, node, p, ratio=None, pass16=0.0)
    t = report.build(spec.load(str(suite), {"root": str(root)}))
    got = {row[1]: (row[2], row[3]) for row in t.cells if row[0] == "takeaways"}
    assert got["rl_sharpens"][0] == "does not hold" and "correct ratio undefined" in got["rl_sharpens"][1]
