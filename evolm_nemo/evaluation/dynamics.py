"""Training dynamics in the report: capability vs tokens across runs and sizes, and intermediate vs fully decayed
checkpoints side by side (EvoLM's Table 3), from the runs' own ``metrics.jsonl``.

A run directory's records carry what the trainer measured while training: ``val_loss_<source>`` (held-out loss per
data source, ``train.val_tokens_interval``) and ``probe_up_<task>`` / ``probe_up_avg`` / ``probe_down_<suite>``
(capability probes, ``probe.tokens_interval``), each at the record's ``tokens``; values measured before the first
step are suffixed ``_at_<iteration>``. The run's identity (model, stage, WSD branch) comes from its newest checkpoint's
``evolm.json``.

Pairs for the side-by-side table: a WSD cooldown branch of budget ``B`` (its lineage names the stable run's branch
checkpoint) against the stable run's own record at ``B`` tokens (the nearest at or before ``B``): the same tokens
seen, undecayed vs decayed.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.tokens import format_tokens
from evolm_nemo.evaluation.render import finish, md_table, panel_grid
from evolm_nemo.fileio import write_text

AT = re.compile(r"^(?P<key>.+)_at_(?P<it>\d+)$")
PREFIXES = ("probe_up_", "probe_down_", "val_loss_")
SKIP = ("probe_s", "probe_fraction")


@dataclass
class Curve:
    run: str  # run directory
    name: str  # label: the run dir's name
    model: str | None = None  # model size name (tiny, 1B, ...)
    stage: str | None = None
    tokens_per_iter: int | None = None
    branch_of: str | None = None  # WSD branch: the stable run's directory
    budget: int | None = None  # WSD branch: the tokens its model has seen at the end
    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(tokens, value)]

    def at(self, metric: str, tokens: int) -> tuple[int, float] | None:
        """This run's value of ``metric`` at ``tokens`` (the nearest record at or before it)."""
        pts = [p for p in self.points.get(metric, []) if p[0] <= tokens]
        return max(pts) if pts else None

    def last(self, metric: str) -> tuple[int, float] | None:
        pts = self.points.get(metric)
        return max(pts) if pts else None


def _metric(key: str) -> bool:
    return key.startswith(PREFIXES) and key not in SKIP


def load_curve(run: Path) -> Curve | None:
    """The dynamics of one run directory (None when its metrics carry no validation or probe records)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    curve = Curve(run=str(run), name=run.name)
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        it, tokens = row.get("iteration"), row.get("tokens")
        if not it or tokens is None:
            continue
        curve.tokens_per_iter = curve.tokens_per_iter or tokens // it
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            m = AT.match(key)
            if m and _metric(m["key"]):
                curve.points.setdefault(m["key"], []).append((int(m["it"]) * (tokens // it), float(value)))
            elif _metric(key):
                curve.points.setdefault(key, []).append((int(tokens), float(value)))
    if not curve.points:
        return None
    # one point per measurement: the held-out loss before the first step is in the first record and the last
    curve.points = {m: sorted(set(pts)) for m, pts in curve.points.items()}
    _identify(curve, run)
    return curve


def _identify(curve: Curve, run: Path) -> None:
    from evolm_nemo.checkpoint import io as ckpt

    last = ckpt.latest(run / "checkpoints")
    if last is None:
        return
    try:
        meta = ckpt.read_meta(last)
    except Exception:  # a damaged meta only costs the labels
        return
    curve.model = (meta.get("model") or {}).get("name")
    curve.stage = meta.get("stage")
    lineage = meta.get("lineage") or {}
    prior = sum(int(st.get("tokens") or 0) for st in (lineage.get("stages") or [])[:-1] if isinstance(st, dict))
    if prior and not lineage.get("branch"):  # a later stage (CPT): on the axis of all tokens seen, parents first
        curve.points = {m: [(t + prior, v) for t, v in pts] for m, pts in curve.points.items()}
    branch = lineage.get("branch")
    if branch and branch.get("from"):
        curve.branch_of = str(Path(branch["from"]).resolve().parent.parent)
        if meta.get("planned_iters") and curve.tokens_per_iter:
            curve.budget = int(meta["planned_iters"]) * curve.tokens_per_iter


def load_curves(pattern: str) -> list[Curve]:
    """Every run directory (or its metrics.jsonl) matching ``pattern`` (globs, comma-separated) that recorded
    dynamics."""
    paths = []
    for part in (p.strip() for p in str(pattern).split(",")):
        found = sorted(glob.glob(str(Path(part).expanduser()))) if part else []
        if not found:
            raise ConfigError("dynamics", f"no run directory matches {part!r}")
        paths += [f for f in found if f not in paths]
    runs = [Path(p).parent if Path(p).name == "metrics.jsonl" else Path(p) for p in paths]
    curves = [c for c in (load_curve(r) for r in runs if r.is_dir()) if c is not None]
    if not curves:
        raise ConfigError("dynamics", f"none of the {len(runs)} runs matching {pattern!r} recorded validation loss or "
                                      "probes (train.val_tokens_interval, probe.tokens_interval)")
    return curves


def metrics_of(curves: list[Curve]) -> list[str]:
    order = {p: i for i, p in enumerate(("probe_up_avg", "probe_down_", "probe_up_", "val_loss_"))}

    def key(m: str):
        rank = next((order[p] for p in order if m == p or m.startswith(p)), 9)
        return rank, m

    return sorted({m for c in curves for m in c.points}, key=key)


def decayed_pairs(curves: list[Curve]) -> list[tuple[Curve, Curve]]:
    """(stable run, branch) for every WSD branch whose stable run is among ``curves``."""
    by_dir = {str(Path(c.run).resolve()): c for c in curves}
    return [(by_dir[c.branch_of], c) for c in curves if c.branch_of in by_dir and c.budget]


def markdown(curves: list[Curve]) -> list[str]:
    """The report's dynamics sections: per-run start/end table and the intermediate-vs-decayed table."""
    metrics = metrics_of(curves)
    lines = ["## Training dynamics", "",
             "Measured while training (probes: percent; validation: per-token loss). First and last record per "
             "run.", ""]
    header = ["run", "model", "stage", *metrics]
    rows = []
    for c in curves:
        cells = []
        for m in metrics:
            pts = c.points.get(m)
            cells.append("-" if not pts else f"{pts[0][1]:.2f} -> {pts[-1][1]:.2f}")
        rows.append([c.name, c.model or "-", c.stage or "-", *cells])
    lines += md_table(header, rows) + [""]
    pairs = decayed_pairs(curves)
    if pairs:
        lines += ["## Intermediate vs fully decayed (EvoLM Table 3)", "",
                  "Each WSD branch at budget B against its stable run's record at B tokens (undecayed; the nearest "
                  "record at or before B, if within 10% of B).", ""]
        header = ["budget", "metric", "intermediate (stable run)", "fully decayed (branch)", "delta"]
        rows = []
        for stable, branch in pairs:
            for m in metrics:
                end, mid = branch.last(m), stable.at(m, branch.budget)
                if end is None or mid is None:
                    continue
                if mid[0] < 0.9 * branch.budget:  # the stable run measured nothing near B: no comparison
                    rows.append([format_tokens(branch.budget), m, f"- (last record at {format_tokens(mid[0])})",
                                 f"{end[1]:.2f}", "-"])
                    continue
                note = "" if mid[0] == branch.budget else f" (at {format_tokens(mid[0])})"
                rows.append([format_tokens(branch.budget), m, f"{mid[1]:.2f}{note}", f"{end[1]:.2f}",
                             f"{end[1] - mid[1]:+.2f}"])
        lines += md_table(header, rows) + [""]
    return lines


def plot(curves: list[Curve], path: Path) -> str | None:
    """One panel per metric, one line (colour) per run, tokens seen on x; WSD branches dashed."""
    import matplotlib.pyplot as plt

    metrics = metrics_of(curves)
    if not metrics:
        return None
    fig, axes = panel_grid(len(metrics), 5, 3.6)
    from matplotlib.ticker import FuncFormatter

    colors = {c.run: plt.cm.tab10(i % 10) for i, c in enumerate(curves)}
    axis = FuncFormatter(lambda x, _: format_tokens(int(x)) if x > 0 else "0")
    for ax, m in zip(axes, metrics):
        for c in curves:
            pts = c.points.get(m)
            if not pts:
                continue
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", markersize=3,
                    linestyle="--" if c.branch_of else "-", color=colors[c.run],
                    label=f"{c.name} ({c.model or '?'}{', ' + c.stage if c.stage else ''})")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("tokens seen (all stages)", fontsize=8)
        ax.xaxis.set_major_formatter(axis)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return finish(fig, axes, len(metrics), path)


def write_csv(curves: list[Curve], path: Path) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "model", "stage", "branch_of", "metric", "tokens", "value"])
    for c in curves:
        for m, pts in sorted(c.points.items()):
            for t, v in pts:
                w.writerow([c.name, c.model or "", c.stage or "", c.branch_of or "", m, t, v])
    write_text(path, buf.getvalue())
    return str(path)
