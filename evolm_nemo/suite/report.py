"""`evolm suite report suite=<name> [out=DIR]` (also `evolm report suite=<name>`): PAPER.md's tables filled from a
suite's evaluation results, EvoLM's published figures in a column beside ours.

The suite's ``report:`` section says which eval node fills which row (recipes/suite/evolm.yaml):

* ``upstream``: lm-eval 0-shot average by pretraining budget (``result.json`` ``upstream.avg``, percent);
* ``upstream_tasks``: the same per task for one model;
* ``downstream``: SFT / SFT+RL -- Greedy (Pass@1), Maj@16 and Pass@16 averaged over the ID and the OOD suites;
* ``cpt_replay``: GSM8K-Platinum Pass@1 after SFT, one row per CPT mix;
* ``takeaways``: EvoLM's six findings as claims with the suite's own numbers, each holds / does not hold / not
  measured (``suite/takeaways.py``), and ``takeaways.png``: one panel per claim, drawn from the same numbers (EvoLM's
  figures in shape: accuracy in and out of domain over SFT epochs, SFT examples and the SFT/RL allocation, held-out
  loss over the pretraining budgets, forgetting with and without replay, SFT vs SFT+RL).

A row whose result is not there yet reads "-" and is counted; each table says which scoring produced our numbers
(EvoLM's figures come from its own evaluator, ``scoring=evolm``). Writes ``report.md`` and ``report.csv`` (one line per
cell: table, row, metric, ours, published) and the figure into ``out`` (default ``<root>/report``), atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.fileio import lock_output, owned_elsewhere, write_text
from evolm_nemo.suite import takeaways
from evolm_nemo.suite.spec import Suite
from evolm_nemo.tasks import UPSTREAM_NAMES

DOWN_METRICS = [("greedy_id", "Greedy ID", "id_avg", "pass1"), ("maj16_id", "Maj@16 ID", "id_avg", "maj16"),
                ("pass16_id", "Pass@16 ID", "id_avg", "pass16"), ("greedy_ood", "Greedy OOD", "ood_avg", "pass1"),
                ("maj16_ood", "Maj@16 OOD", "ood_avg", "maj16"), ("pass16_ood", "Pass@16 OOD", "ood_avg", "pass16")]


def _result(suite: Suite, node: str) -> dict | None:
    path = Path(suite.out(node)) / "result.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(str(path), f"not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


_num = takeaways.finite  # a result's odd value (text, NaN, a list) reads as missing, never a crash


def _pct(x) -> float | None:
    x = _num(x)
    return None if x is None else 100.0 * x


def _f(x, digits: int = 2) -> str:
    x = _num(x)
    return "-" if x is None else f"{x:.{digits}f}"


class _Tables:
    def __init__(self, suite: Suite):
        self.suite = suite
        self.md: list[str] = []
        self.cells: list[list] = []
        self.missing: list[str] = []
        self.scorings: set[str] = set()
        self.claims: list[takeaways.Claim] = []
        self.figure_at: int | None = None  # where in ``md`` the takeaways figure goes, once drawn

    def result(self, node: str) -> dict | None:
        data = _result(self.suite, node)
        if data is None:
            self.missing.append(node)
        else:
            scoring = _get(data, "downstream", "scoring")
            if isinstance(scoring, str) and scoring:
                self.scorings.add(scoring)
        return data

    def table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        self.md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md += ["| " + " | ".join(r) + " |" for r in rows] or ["| " + " | ".join(["(no rows)"] * len(header))
                                                                   + " |"]
        self.md.append("")

    def cell(self, table: str, row: str, metric: str, ours, published) -> None:
        self.cells.append([table, row, metric, "" if ours is None else f"{ours:.4f}",
                           "" if published is None else published])


def build(suite: Suite) -> _Tables:
    t = _Tables(suite)
    rep = suite.report
    if not rep:
        raise ConfigError("report", f"suite {suite.name} has no report: section naming the eval node of each row")
    rows = []
    for r in rep.get("upstream", []):
        ours = _num(_get(t.result(r["eval"]), "upstream", "avg"))
        pub = r.get("published")
        rows.append([str(r["row"]), _f(ours), _f(pub), _f(None if ours is None or pub is None else ours - pub)])
        t.cell("upstream", r["row"], "avg", ours, pub)
    if "upstream" in rep:
        t.table("Upstream: lm-eval 0-shot average by pretraining budget (%)",
                ["model", "ours", "EvoLM", "ours - EvoLM"], rows)
    for r in rep.get("upstream_tasks", []):
        data = t.result(r["eval"])
        pub = r.get("published") or {}
        cells = []
        for key in UPSTREAM_NAMES:
            ours = _num(_get(data, "upstream", "tasks", key, "score"))
            cells.append(f"{_f(ours)} / {_f(pub.get(key))}")
            t.cell("upstream_tasks", r["row"], key, ours, pub.get(key))
        t.table(f"Upstream per task, {r['row']} (%, ours / EvoLM)", list(UPSTREAM_NAMES.values()), [cells])
    rows = []
    for r in rep.get("downstream", []):
        sft, rl = t.result(r["sft"]), t.result(r["rl"])
        pub = r.get("published") or {}
        cells = [str(r["row"])]
        for key, _, group, metric in DOWN_METRICS:
            a, b = _pct(_get(sft, "downstream", group, metric)), _pct(_get(rl, "downstream", group, metric))
            p = pub.get(key) or [None, None]
            cells.append(f"{_f(a, 1)}/{_f(b, 1)} ({_f(p[0], 1)}/{_f(p[1], 1)})")
            t.cell("downstream", r["row"], f"{key}_sft", a, p[0])
            t.cell("downstream", r["row"], f"{key}_rl", b, p[1])
        rows.append(cells)
    if "downstream" in rep:
        t.table("Downstream after CPT FW8+FM42: SFT / SFT+RL, ours (EvoLM) (%)",
                ["model"] + [name for _, name, _, _ in DOWN_METRICS], rows)
    rows = []
    for r in rep.get("cpt_replay", []):
        ours = _pct(_get(t.result(r["eval"]), "downstream", "suites", "gsm8k_platinum", "pass1"))
        pub = r.get("published")
        rows.append([str(r["row"]), _f(ours), _f(pub)])
        t.cell("cpt_replay", r["row"], "gsm8k_platinum_pass1", ours, pub)
    if "cpt_replay" in rep:
        t.table("CPT replay: GSM8K-Platinum Pass@1 after SFT (%)", ["CPT mix", "ours", "EvoLM"], rows)
    if "takeaways" in rep:
        claims = t.claims = takeaways.check(rep["takeaways"], takeaways.Reader(suite.out))
        t.md += takeaways.markdown(claims)
        t.figure_at = len(t.md)
        for c in claims:
            t.cells.append(["takeaways", c.claim, c.verdict, c.evidence, ""])
    return t


def markdown(t: _Tables) -> str:
    s = t.suite
    scoring = ", ".join(sorted(t.scorings)) or "-"
    head = [f"# Suite `{s.name}`: the paper's tables from {s.root}", "",
            f"Ours: each row's eval node under {s.root} (downstream scoring: {scoring}); EvoLM: the published figures "
            "(shared/PAPER.md; its evaluator = scoring=evolm). \"-\": not there.", ""]
    missing = sorted(set(t.missing))
    tail = [f"{len(missing)} results missing" + (f": {', '.join(missing)}" if missing else ""), ""]
    return "\n".join(head + t.md + tail)


def csv_text(t: _Tables) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "metric", "ours", "evolm"])
    w.writerows(t.cells)
    return buf.getvalue()


def write(suite: Suite, out: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.csv`` and ``takeaways.png`` (when a claim has numbers) into ``out`` (default
    ``<root>/report``) and print the Markdown. Returns the directory."""
    out = Path(str(out or Path(suite.root) / "report"))
    foreign = owned_elsewhere(out)
    if foreign is not None:
        raise ConfigError("out", f"{foreign}; a report goes in a directory of its own: pick another out")
    lock_output(out, "out")  # a second report into ``out`` at the same time is refused in one line
    t = build(suite)
    figure = takeaways.plot(t.claims, out / "takeaways.png") if t.figure_at is not None else None
    if figure is None:  # an earlier report's figure would show numbers this report no longer has
        (out / "takeaways.png").unlink(missing_ok=True)
    else:
        t.md[t.figure_at:t.figure_at] = ["![EvoLM's takeaways on this suite: one panel per claim, numbered as in the "
                                         "table](takeaways.png)", ""]
    md = markdown(t)
    write_text(out / "report.md", md)
    write_text(out / "report.csv", csv_text(t))
    print(md, end="")
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'}" + (f", {figure}" if figure else ""))
    return out
