"""EvoLM's six takeaways as claims checked against a suite's own runs (``report.takeaways`` in a suite recipe; issue
21). Each claim reads the numbers its nodes produced -- the held-out loss per source a training run logs
(``metrics.jsonl``: ``val_loss_<source>`` and, before the first step, ``val_loss_<source>_at_0``) or an evaluation's
``result.json`` (``downstream.id_avg`` / ``ood_avg``: pass1 = greedy, maj16, pass16, correct_ratio; ``upstream.avg``,
the lm-eval 0-shot average, for ``diminishing_returns`` over eval nodes) -- and says
**holds**, **does not hold** or **not measured** with those numbers. Nothing is tuned until a claim holds: a
direction that does not appear at a suite's scale is reported as it is.

A node may be given as a list (one per seed): the claim uses the mean and shows the spread (min..max) and the count.
A claim over a sequence (``budgets`` / ``steps``) may name its points (``labels``, one per entry; default: the first
node of each) and its axis (``axis``); the report draws every claim as one panel of ``takeaways.png`` (:func:`plot`:
a line over the sequence, or bars side by side, seeds as error bars from min to max).

    report:
      takeaways:
        - {claim: diminishing_returns, budgets: [pretrain_100it, pretrain_200it, pretrain_400it], source: general}
        - {claim: diminishing_returns, budgets: [eval_pretrain_20b, eval_pretrain_40b, eval_pretrain_80b]}  # upstream
        - {claim: replay_mitigates_forgetting, no_replay: cpt_fm50, replay: cpt_fw8_fm42, general: general,
           domain: math}
        - {claim: cpt_bridge, with_cpt: eval_sft_cpt, without_cpt: eval_sft_nocpt}
        - {claim: sft_scaling, steps: [eval_sft_ep1, eval_sft_ep2, eval_sft_ep4], labels: [1, 2, 4],
           axis: SFT epochs}
        - {claim: rl_sharpens, sft: [eval_sft_s1, eval_sft_s2], rl: [eval_rl_s1, eval_rl_s2]}
        - {claim: allocation, steps: [eval_sft_heavy, eval_balanced, eval_rl_heavy]}   # SFT share falling
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evolm_nemo.config.errors import ConfigError

# claim -> (its keys: node roles and the node kinds they name, then plain keys), what it says. diminishing_returns
# reads the held-out loss of `source` from train nodes, or the upstream average from eval nodes (then no `source`).
CLAIMS: dict[str, tuple[dict[str, tuple[str, ...]], tuple[str, ...], str]] = {
    "diminishing_returns": ({"budgets": ("train", "eval")}, ("source",),
                            "Pretraining: each larger budget lowers the held-out loss by less than the one before "
                            "(diminishing returns)"),
    "replay_mitigates_forgetting": ({"no_replay": ("train",), "replay": ("train",)}, ("general", "domain"),
                                    "CPT on domain data forgets general text; replay forgets less and keeps a "
                                    "domain gain"),
    "cpt_bridge": ({"with_cpt": ("eval",), "without_cpt": ("eval",)}, (),
                   "Domain CPT is the bridge: the same post-training reaches higher in-domain accuracy after it"),
    "sft_scaling": ({"steps": ("eval",)}, (),
                    "More SFT raises in-domain accuracy with diminishing returns; out-of-domain saturates or falls"),
    "rl_sharpens": ({"sft": ("eval",), "rl": ("eval",)}, (),
                    "RL raises greedy accuracy and the correct ratio while Pass@16 barely moves"),
    "allocation": ({"steps": ("eval",)}, (),
                   "Under a fixed post-training budget, moving it from SFT to RL trades in-domain for "
                   "out-of-domain accuracy"),
}
UPSTREAM_SAYS = ("Pretraining: each larger budget raises the upstream 0-shot average by less than the one before "
                 "(diminishing returns)")
LISTS = ("budgets", "steps")  # roles that are a sequence of nodes (each of which may be a list of seeds)
SWEEP_KEYS = ("labels", "axis")  # optional, for a claim over a sequence: its points' names and the axis's


@dataclass
class Claim:
    claim: str
    says: str
    verdict: str  # "holds" | "does not hold" | "not measured"
    evidence: str
    seeds: int
    figure: "Figure | None" = None  # what the claim's panel of takeaways.png draws


@dataclass
class Value:
    """A number over seeds: mean, min, max, count."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return self.format(3)

    def format(self, digits: int) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}..{self.hi:.{digits}f}, {self.n} seeds]"


@dataclass
class Figure:
    """One claim's panel: a line per series over ``points`` (``line``) or bars side by side (``bars``); values in
    percent when ``percent``."""

    kind: str  # "line" | "bars"
    points: list[str]
    series: dict[str, list["Value | None"]]
    axis: str
    ylabel: str
    percent: bool


def finite(x) -> float | None:
    """A finite number, else None: a result's odd value (text, a list, NaN) reads as missing, never as a number."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def value(xs: list) -> Value | None:
    """Mean, min, max and count of the finite numbers among ``xs`` (a missing, non-numeric or non-finite entry --
    a torn record, NaN -- is not measured); None when there is none."""
    xs = [v for v in map(finite, xs) if v is not None]
    return Value(statistics.fmean(xs), min(xs), max(xs), len(xs)) if xs else None


def validate(rows, nodes: dict) -> list[dict]:
    """``report.takeaways``: a list of claims, each naming nodes of the right kind. Returns the rows."""
    if not isinstance(rows, list):
        raise ConfigError("report.takeaways", "expected a list of claims")
    for i, row in enumerate(rows):
        key = f"report.takeaways[{i}]"
        if not isinstance(row, dict) or row.get("claim") not in CLAIMS:
            raise ConfigError(f"{key}.claim", f"expected one of: {', '.join(CLAIMS)}")
        roles, plain, _ = CLAIMS[row["claim"]]
        sweep = [r for r in roles if r in LISTS]
        optional = SWEEP_KEYS if sweep else ()
        for k in row:
            if k not in ("claim", *roles, *plain, *optional):
                raise ConfigError(f"{key}.{k}", f"unknown key for {row['claim']}; valid keys: claim, "
                                                f"{', '.join([*roles, *plain, *optional])}")
        for k in roles:
            if k not in row:
                raise ConfigError(f"{key}.{k}", "required")
        named = set()
        for role, kinds in roles.items():
            groups = row[role] if role in LISTS else [row[role]]
            least = 3 if row["claim"] == "diminishing_returns" else 2  # returns diminish between two drops
            if role in LISTS and (not isinstance(groups, list) or len(groups) < least):
                raise ConfigError(f"{key}.{role}", f"expected a list of at least {least} entries (each a node, or a "
                                                   "list of seeds)")
            for group in groups:
                for name in group if isinstance(group, list) else [group]:
                    if not isinstance(name, str) or name not in nodes or nodes[name].kind not in kinds:
                        raise ConfigError(f"{key}.{role}", f"{name!r} is not a{'n' if kinds[0][0] == 'e' else ''} "
                                                           f"{' or '.join(kinds)} node of this suite")
                    named.add(nodes[name].kind)
            if len(named) > 1:
                raise ConfigError(f"{key}.{role}", f"mixes {' and '.join(sorted(named))} nodes; name one kind")
        for k in plain:
            if row["claim"] == "diminishing_returns" and named == {"eval"}:  # upstream average: no source
                if k in row:
                    raise ConfigError(f"{key}.{k}", "is for train nodes (their held-out loss); eval nodes give the "
                                                    "upstream average")
            elif k not in row:
                raise ConfigError(f"{key}.{k}", "required")
        labels = row.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(row[sweep[0]])
                                   or not all(isinstance(x, (str, int, float)) for x in labels)):
            raise ConfigError(f"{key}.labels", f"expected a list of {len(row[sweep[0]])} names, one per entry of "
                                               f"{sweep[0]}")
        if "axis" in row and not isinstance(row["axis"], str):
            raise ConfigError(f"{key}.axis", "expected a string (the x axis's name)")
    return rows


class Reader:
    """The numbers of a suite's nodes: ``out(node)`` is the node's output directory."""

    def __init__(self, out: Callable[[str], str]):
        self.out = out
        self._metrics: dict[str, dict] = {}  # each run's files are read once, however many claims use them
        self._results: dict[str, dict] = {}

    def metrics(self, node: str) -> dict:
        """The last held-out evaluation a training run logged (the row holding ``val_loss_*`` keys), or {}."""
        if node not in self._metrics:
            self._metrics[node] = self._read_metrics(node)
        return self._metrics[node]

    def _read_metrics(self, node: str) -> dict:
        path = Path(self.out(node)) / "metrics.jsonl"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return {}
        last: dict = {}
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if isinstance(row, dict) and any(k.startswith("val_loss_") for k in row):
                last = {**last, **row}
        return last

    def result(self, node: str) -> dict:
        if node not in self._results:
            self._results[node] = self._read_result(node)
        return self._results[node]

    def _read_result(self, node: str) -> dict:
        path = Path(self.out(node)) / "result.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):  # (UnicodeDecodeError is a ValueError)
            data = {}
        return data if isinstance(data, dict) else {}

    def section(self, node: str, *keys: str) -> dict:
        """``result.json``'s mapping at ``keys`` ({} where any level is missing or not a mapping)."""
        d = self.result(node)
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d if isinstance(d, dict) else {}

    def loss(self, group, source: str, at_0: bool = False) -> Value | None:
        key = f"val_loss_{source}" + ("_at_0" if at_0 else "")
        return value([self.metrics(n).get(key) for n in _seeds(group)])

    def upstream(self, group) -> Value | None:
        """The lm-eval 0-shot average (percent) of eval nodes."""
        return value([self.section(n, "upstream").get("avg") for n in _seeds(group)])

    def down(self, group, split: str, metric: str) -> Value | None:
        return value([self.section(n, "downstream", f"{split}_avg").get(metric) for n in _seeds(group)])


def _seeds(group) -> list[str]:
    return list(group) if isinstance(group, list) else [group]


def _seed_count(row: dict) -> int:
    """The most seeds any point of the claim has (each point's own count is in its numbers)."""
    roles = CLAIMS[row["claim"]][0]
    counts = [len(_seeds(g)) for r in roles for g in (row[r] if r in LISTS else [row[r]])]
    return max(counts) if counts else 0


def _pct(v: Value | None) -> str:
    if v is None:
        return "-"
    if v.n == 1:
        return f"{100 * v.mean:.1f}%"
    return f"{100 * v.mean:.1f}% [{100 * v.lo:.1f}..{100 * v.hi:.1f}, {v.n} seeds]"


def _missing(*vals) -> bool:
    return any(v is None for v in vals)


def check(rows: list[dict], reader: Reader) -> list[Claim]:
    return [_check(row, reader) for row in rows]


def _labels(row: dict, role: str) -> list[str]:
    given = row.get("labels")
    return [str(x) for x in given] if given is not None else [_seeds(g)[0] for g in row[role]]


def _figure(row: dict, r: Reader) -> Figure:
    """The panel of one claim: the numbers its verdict reads, over its points."""
    name = row["claim"]
    if name == "diminishing_returns":
        axis = row.get("axis", "pretraining budget")
        if "source" not in row:
            return Figure("line", _labels(row, "budgets"),
                          {"upstream 0-shot average": [r.upstream(g) for g in row["budgets"]]}, axis,
                          "upstream 0-shot average (%)", False)
        return Figure("line", _labels(row, "budgets"),
                      {f"{row['source']} held-out loss": [r.loss(g, row["source"]) for g in row["budgets"]]},
                      axis, "held-out loss", False)
    if name == "replay_mitigates_forgetting":
        g, d = row["general"], row["domain"]

        def change(k: str, source: str, sign: float) -> Value | None:
            a, b = r.loss(row[k], source, True), r.loss(row[k], source)
            if a is None or b is None:
                return None
            x = sign * (b.mean - a.mean)
            return Value(x, x, x, min(a.n, b.n))

        return Figure("bars", ["no replay", "replay"],
                      {f"{g} loss change (forgetting)": [change(k, g, 1.0) for k in ("no_replay", "replay")],
                       f"{d} loss drop (domain gain)": [change(k, d, -1.0) for k in ("no_replay", "replay")]},
                      "CPT", "loss change", False)
    if name == "cpt_bridge":
        return Figure("bars", ["with CPT", "without CPT"],
                      {"in-domain greedy": [r.down(row[k], "id", "pass1") for k in ("with_cpt", "without_cpt")]},
                      "", "accuracy (%)", True)
    if name == "rl_sharpens":
        return Figure("bars", ["SFT", "SFT+RL"],
                      {label: [r.down(row[k], "id", metric) for k in ("sft", "rl")]
                       for label, metric in (("greedy", "pass1"), ("correct ratio", "correct_ratio"),
                                             ("Pass@16", "pass16"))},
                      "in-domain", "accuracy (%)", True)
    # sft_scaling, allocation: greedy accuracy in and out of domain over the steps
    return Figure("line", _labels(row, "steps"),
                  {f"{split} greedy": [r.down(g, key, "pass1") for g in row["steps"]]
                   for split, key in (("in-domain", "id"), ("out-of-domain", "ood"))},
                  row.get("axis", "SFT share falling" if name == "allocation" else "more SFT"), "accuracy (%)",
                  True)


def _check(row: dict, r: Reader) -> Claim:
    claim = _verdict(row, r)
    claim.figure = _figure(row, r)
    return claim


def _verdict(row: dict, r: Reader) -> Claim:
    name = row["claim"]
    says = CLAIMS[name][2]
    if name == "diminishing_returns" and "source" not in row:
        says = UPSTREAM_SAYS
    seeds = _seed_count(row)

    def done(holds: bool | None, evidence: str) -> Claim:
        verdict = "not measured" if holds is None else ("holds" if holds else "does not hold")
        return Claim(name, says, verdict, evidence, seeds)

    if name == "diminishing_returns" and "source" not in row:  # eval nodes: the upstream average rises
        avgs = [r.upstream(g) for g in row["budgets"]]
        if _missing(*avgs):
            return done(None, "upstream average missing for " + ", ".join(
                str(g) for g, v in zip(row["budgets"], avgs) if v is None))
        gains = [b.mean - a.mean for a, b in zip(avgs, avgs[1:])]
        text = ("upstream 0-shot average by budget: " + " -> ".join(v.format(2) for v in avgs) + "; gains: "
                + ", ".join(f"{d:+.2f}" for d in gains))
        return done(all(d > 0 for d in gains) and all(b < a for a, b in zip(gains, gains[1:])), text)

    if name == "diminishing_returns":
        losses = [r.loss(g, row["source"]) for g in row["budgets"]]
        if _missing(*losses):
            return done(None, "held-out loss missing for " + ", ".join(
                str(g) for g, v in zip(row["budgets"], losses) if v is None))
        drops = [a.mean - b.mean for a, b in zip(losses, losses[1:])]
        text = f"{row['source']} loss by budget: " + " -> ".join(str(v) for v in losses) + \
               "; drops: " + ", ".join(f"{d:+.3f}" for d in drops)
        return done(all(d > 0 for d in drops) and all(b < a for a, b in zip(drops, drops[1:])), text)

    if name == "replay_mitigates_forgetting":
        g, d = row["general"], row["domain"]
        vals = {k: (r.loss(row[k], g, True), r.loss(row[k], g), r.loss(row[k], d, True), r.loss(row[k], d))
                for k in ("no_replay", "replay")}
        if _missing(*vals["no_replay"], *vals["replay"]):
            return done(None, "held-out losses before/after CPT missing")
        forget = {k: v[1].mean - v[0].mean for k, v in vals.items()}
        gain = {k: v[2].mean - v[3].mean for k, v in vals.items()}
        text = (f"{g} loss change (forgetting): no replay {forget['no_replay']:+.3f}, replay {forget['replay']:+.3f}; "
                f"{d} loss drop (domain gain): no replay {gain['no_replay']:+.3f}, replay {gain['replay']:+.3f}")
        return done(forget["no_replay"] > 0 and forget["replay"] < forget["no_replay"] and gain["replay"] > 0, text)

    if name == "cpt_bridge":
        a, b = r.down(row["with_cpt"], "id", "pass1"), r.down(row["without_cpt"], "id", "pass1")
        if _missing(a, b):
            return done(None, "in-domain greedy accuracy missing")
        return done(a.mean > b.mean, f"in-domain greedy: with CPT {_pct(a)}, without {_pct(b)}")

    if name == "sft_scaling":
        ids = [r.down(g, "id", "pass1") for g in row["steps"]]
        oods = [r.down(g, "ood", "pass1") for g in row["steps"]]
        if _missing(*ids, *oods):
            return done(None, "greedy accuracy missing for some step")
        up = [b.mean - a.mean for a, b in zip(ids, ids[1:])]
        ood_up = [b.mean - a.mean for a, b in zip(oods, oods[1:])]
        text = ("in-domain greedy: " + " -> ".join(_pct(v) for v in ids) + "; out-of-domain: "
                + " -> ".join(_pct(v) for v in oods))
        holds = all(x >= 0 for x in up) and up[-1] <= up[0] and ood_up[-1] <= max(up[-1], 0.0)
        return done(holds and sum(up) > 0, text)

    if name == "rl_sharpens":
        g0, g1 = r.down(row["sft"], "id", "pass1"), r.down(row["rl"], "id", "pass1")
        c0, c1 = r.down(row["sft"], "id", "correct_ratio"), r.down(row["rl"], "id", "correct_ratio")
        p0, p1 = r.down(row["sft"], "id", "pass16"), r.down(row["rl"], "id", "pass16")
        if _missing(g0, g1, p0, p1):
            return done(None, "greedy or Pass@16 missing")
        gain = g1.mean - g0.mean
        if _missing(c0, c1):  # undefined where no problem has a correct completion: greedy alone can refute
            text = (f"in-domain, SFT -> SFT+RL: greedy {_pct(g0)} -> {_pct(g1)}, correct ratio undefined (no correct "
                    f"completion), Pass@16 {_pct(p0)} -> {_pct(p1)}")
            return done(False if gain <= 0 else None, text)
        text = (f"in-domain, SFT -> SFT+RL: greedy {_pct(g0)} -> {_pct(g1)}, correct ratio {_pct(c0)} -> {_pct(c1)}, "
                f"Pass@16 {_pct(p0)} -> {_pct(p1)}")
        return done(gain > 0 and c1.mean > c0.mean and abs(p1.mean - p0.mean) < gain, text)

    # allocation: steps ordered by a falling SFT share
    ids = [r.down(g, "id", "pass1") for g in row["steps"]]
    oods = [r.down(g, "ood", "pass1") for g in row["steps"]]
    if _missing(*ids, *oods):
        return done(None, "greedy accuracy missing for some allocation")
    text = ("SFT share falling: in-domain greedy " + " -> ".join(_pct(v) for v in ids) + "; out-of-domain "
            + " -> ".join(_pct(v) for v in oods))
    return done(ids[-1].mean < ids[0].mean and oods[-1].mean > oods[0].mean, text)


def markdown(claims: list[Claim]) -> list[str]:
    """The takeaways table (Markdown lines)."""
    if not claims:
        return []
    lines = ["## EvoLM's takeaways, checked on this suite", "",
             "| # | claim | verdict | numbers | seeds (most per point) |", "|---|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {c.says} (`{c.claim}`) | **{c.verdict}** | {c.evidence} | {c.seeds} |")
    held = sum(c.verdict == "holds" for c in claims)
    lines += ["", f"{held} of {len(claims)} hold; " + f"{sum(c.verdict == 'not measured' for c in claims)} not "
              "measured. A claim is never tuned until it holds: what does not appear at this scale is shown as is.", ""]
    return lines


def plot(claims: list[Claim], path: Path) -> str | None:
    """``takeaways.png``: one panel per claim, numbered as in the table (None when no claim has a number)."""
    panels = [(i, c) for i, c in enumerate(claims, 1)
              if c.figure and any(v is not None for vals in c.figure.series.values() for v in vals)]
    if not panels:
        return None
    from evolm_nemo.evaluation.render import finish, panel_grid

    fig, axes = panel_grid(len(panels), 4.6, 3.6)
    for ax, (i, c) in zip(axes, panels):
        f = c.figure
        scale = 100.0 if f.percent else 1.0
        xs = list(range(len(f.points)))
        width = 0.8 / max(len(f.series), 1)
        for k, (label, vals) in enumerate(f.series.items()):
            pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
            if not pts:
                continue
            mean = [scale * v.mean for _, v in pts]
            err = [[scale * (v.mean - v.lo) for _, v in pts], [scale * (v.hi - v.mean) for _, v in pts]]
            spread = any(v.n > 1 for _, v in pts)
            if f.kind == "line":
                ax.errorbar([x for x, _ in pts], mean, yerr=err if spread else None, marker="o", markersize=4,
                            capsize=3, label=label)
            else:
                ax.bar([x + (k - (len(f.series) - 1) / 2) * width for x, _ in pts], mean, width,
                       yerr=err if spread else None, capsize=3, label=label)
        ax.set_xticks(xs)
        ax.set_xticklabels(f.points, fontsize=7, rotation=20 if max(map(len, f.points)) > 12 else 0)
        ax.set_xlabel(f.axis, fontsize=8)
        ax.set_ylabel(f.ylabel, fontsize=8)
        ax.set_title(f"{i}. {c.claim}: {c.verdict}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        if f.kind == "bars":
            ax.axhline(0.0, color="gray", lw=0.6)
            low, high = ax.get_ylim()
            ax.set_ylim(low, high + 0.3 * (high - low))  # room for the legend above the bars
    return finish(fig, axes, len(panels), path)
