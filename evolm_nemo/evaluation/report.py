"""`evolm report runs=<glob> out=<dir>`: aggregate per-model result JSONs into CSV, Markdown and PNG plots.

Per-model result JSON (``result.json``, written by ``evolm eval downstream`` and ``evolm eval upstream``, which
merge into the same file when given the same ``out``)::

    {
      "schema": "evolm-result/1",
      "model": "1B-160BT-sft",            # display name (required)
      "model_dir": "/path/to/hf/dir",     # what was evaluated
      "size": "1B",                       # model size label, or null
      "pretrain_tokens": 160000000000,    # pretraining tokens (int), or null
      "stage": "sft",                     # pretrain | cpt | sft | rl (or any label), or null
      "group": "1B-160BT-cpt-FW8FM42",    # models differing only by stage share a group (pairs SFT with SFT+RL)
      "inferred": ["size", ...],          # the keys guessed from the directory name: a later evaluation's guesses
                                          # never replace a value given explicitly (name=, stage=, group=, ...)
      "downstream": {                     # `evolm score` summary: fractions in [0, 1]
        "scoring": "evolm",               # evolm | strict: the equivalence mode that produced the numbers
        "suites": {"gsm8k_platinum": {"n", "pass1", "maj16", "rm16", "pass16", "correct_ratio"}, ...},
        "id_avg": {...}, "ood_avg": {...},
        "sampling": {"backend", "n", "temperature", "top_p", "repetition_penalty", "max_model_len", "seed", ...},
        "export": {"run_id", "iteration", "sha256"}   # the evolm export evaluated (optional; null: none)
      },
      "upstream": {                       # lm-eval 0-shot, percent
        "tasks": {"hellaswag": {"acc", "acc_norm", "score", "n"}, ...},
        "avg": 52.3,                      # mean of the task scores (acc_norm, or acc for winogrande)
        "export": {...}                   # as downstream's
      }
    }

``downstream`` and ``upstream`` are each optional; ``rm16`` is null without reward-model scores. ``export``
(``hfdir.export_identity``: the checkpoint the model directory's ``evolm_export.json`` names, and that file's
sha256) is kept per mode -- the two modes of one model may have evaluated two exports of it -- and lets `evolm suite
launch` tell an evaluation of the export there now from one of an earlier export; results written before it have
none. The report writes
``results.csv`` (one row per model, every metric), ``report.md`` (the tables of the paper, in percent) and the plots
``tokens.png`` (metrics vs pretraining tokens per model size), ``id_vs_ood.png``, ``sft_vs_rl.png``,
``rm_vs_accuracy.png`` (per suite: each model's mean ORM score vs its correct ratio, Pearson r; EvoLM's Takeaway 12)
and ``maj_vs_pass.png``; a plot without data to draw is skipped and listed as such in report.md.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evolm_nemo.config.errors import ConfigError, first_line
from evolm_nemo.evaluation import dynamics as dyn
from evolm_nemo.evaluation.render import md_table as _md_table, save_png as _save
from evolm_nemo.evaluation.tasks import non_finite
from evolm_nemo.fileio import (OWNER, check_writable, lock_file, lock_output, owned_elsewhere, signals_held, temp_dir,
                               unlock, write_json, write_text)
from evolm_nemo.tasks import ID_SUITES, OOD_SUITES, UPSTREAM, UPSTREAM_NAMES

SCHEMA = "evolm-result/1"
METRICS = ("pass1", "maj16", "rm16", "pass16", "correct_ratio")
M_NAMES = {"pass1": "Greedy", "maj16": "Maj@16", "rm16": "RM@16", "pass16": "Pass@16", "correct_ratio": "Correct ratio"}
RL_STAGES = ("rl", "ppo", "grpo", "sft+rl")
STAGE_ORDER = ("pretrain", "cpt", "sft", *RL_STAGES)
# in ``out``: the names of the files the last report wrote there. The next report removes those it does not write
# again (a plot without data now, results.csv after a dynamics-only report), so that ``out`` never shows a plot or
# table of the previous results beside the new report.md -- and nothing else: a file no report wrote (the user's own
# results.csv, notes) is never touched, and a new plot of ``_build`` needs no second list kept by hand
MANIFEST = ".evolm_report.json"


@dataclass
class ReportConfig:
    runs: Optional[str] = None  # glob of result JSONs (or of run dirs holding result.json)
    dynamics: Optional[str] = None  # glob of training run dirs: capability vs tokens, intermediate vs decayed
    out: str = "runs/report"  # output dir: results.csv, report.md, *.png


# ---------------------------------------------------------------------------------------------------- result files


def infer_meta(model_dir: str) -> dict:
    """size / pretrain_tokens / stage / group guessed from an EvoLM-style name like ``myllama-1B-160BT-sftep1``."""
    name = Path(str(model_dir).rstrip("/")).name
    meta = {"model": name, "size": None, "pretrain_tokens": None, "stage": None, "group": name}
    m = re.search(r"(\d+(?:\.\d+)?)B-(\d+(?:\.\d+)?)BT", name, re.IGNORECASE)
    if m:
        meta["size"] = f"{m.group(1)}B"
        meta["pretrain_tokens"] = int(float(m.group(2)) * 1e9)
    low = name.lower()
    stage = "rl" if re.search(r"rlep|ppo|grpo|-rl\b", low) else "sft" if "sft" in low else \
        "cpt" if "cpt" in low else "pretrain" if m else None
    meta["stage"] = stage
    meta["group"] = re.sub(r"[-_](sft|rl|ppo|grpo)[a-z0-9]*", "", name, flags=re.IGNORECASE) or name
    return meta


def update_result(path: str | Path, meta: dict, **parts) -> dict:
    """Merge ``meta`` (non-null values) and ``parts`` (downstream=..., upstream=...) into the result JSON, under the
    file's lock (an upstream and a downstream evaluation of one model may finish together). ``meta["inferred"]``:
    keys guessed from the directory name, which never replace a value an earlier evaluation was given explicitly."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    holder = lock_file(lock)
    while holder is not None:  # another evaluation is writing it: the next moment it is ours
        time.sleep(0.05)
        holder = lock_file(lock)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data = data if isinstance(data, dict) else {}
        data["schema"] = SCHEMA
        meta = dict(meta)
        guessed = set(meta.pop("inferred", []))
        had_explicit = {k for k in data if k not in set(data.get("inferred") or [])}
        now_inferred = set(data.get("inferred") or [])
        for k, v in meta.items():
            if k in guessed and k in data and k in had_explicit:
                continue  # a guess never replaces an explicit value
            if v is not None or k not in data:
                data[k] = v
                (now_inferred.add if k in guessed else now_inferred.discard)(k)
        data["inferred"] = sorted(now_inferred)
        data.update(parts)
        write_json(path, data)
    finally:
        unlock(lock, remove=True)
    return data


def load_results(pattern: str) -> list[tuple[str, dict]]:
    """Result JSONs matching ``pattern`` (a dir counts as dir/result.json); one-line error for a bad file."""
    paths = []
    for p in sorted(glob.glob(pattern, recursive=True)):
        p = Path(p)
        if p.is_dir():
            p = p / "result.json"
        if p.is_file() and p not in paths:
            paths.append(p)
    if not paths:
        raise ConfigError("runs", f"no result JSON matches {pattern!r}")
    out = []
    for p in paths:
        data = read_result(p)
        if not isinstance(data.get("model"), str):
            raise ConfigError(str(p), "not a result JSON: needs a string field 'model'")
        out.append((str(p), data))
    return out


def read_result(path: str | Path) -> dict | None:
    """The result JSON at ``path``, as a command that publishes its figures reads it (`evolm report`, the model cards
    of `evolm release`): None when there is none; a file that is not JSON, not an object or has a field of another
    type than the schema's (``check_result``), or one that cannot be read, is a one-line ConfigError naming it --
    never skipped without a word nor a crash once the work is under way."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:  # e.g. no permission to read it
        raise ConfigError(str(path), f"cannot be read ({exc.strerror or first_line(exc)})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise ConfigError(str(path), f"not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"not a result JSON: expected an object, got {type(data).__name__}")
    check_result(data, str(path))
    return data


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_result(data: dict, where: str) -> None:
    """Every field the report reads has the schema's type (above), or a ConfigError naming ``where`` and the field:
    one line, before anything is written. Numbers are finite (no NaN / Infinity: the report's outputs are strict).
    A result of another schema (a newer evolm's) is refused rather than read as this one; one without is read."""
    schema = data.get("schema")
    if schema is not None and schema != SCHEMA:
        raise ConfigError(where, f"schema {json.dumps(schema)[:40]} is not {SCHEMA}, the one this evolm reads; report "
                                 "it with the evolm that wrote it")
    if (found := non_finite(data, big_ints=True)) is not None:
        shown = json.dumps(found[1]) if isinstance(found[1], float) else f"{str(found[1])[:12]}... (past a float)"
        raise ConfigError(where, f"field '{found[0]}' holds {shown}, not a finite number; fix the evaluation that "
                                 "wrote it or set it to null")

    def need(path: str, value, ok: bool, what: str) -> None:
        if value is not None and not ok:
            raise ConfigError(where, f"field '{path}' must be {what} or null, got {json.dumps(value)[:60]}")

    def obj(path: str, value) -> dict:
        need(path, value, isinstance(value, dict), "an object")
        return value or {}

    def metrics(path: str, value, keys) -> None:
        value = obj(path, value)
        for key in ("n", *keys):
            need(f"{path}.{key}", value.get(key), _number(value.get(key)), "a number")

    for key in ("size", "stage", "group", "model_dir"):
        need(key, data.get(key), isinstance(data.get(key), str), "a string")
    tokens = data.get("pretrain_tokens")
    need("pretrain_tokens", tokens, _number(tokens) and tokens >= 0, "a number of tokens >= 0")
    down = obj("downstream", data.get("downstream"))
    need("downstream.scoring", down.get("scoring"), isinstance(down.get("scoring"), str), "a string")
    for scope in ("id_avg", "ood_avg"):
        metrics(f"downstream.{scope}", down.get(scope), METRICS)
    for suite, m in obj("downstream.suites", down.get("suites")).items():
        metrics(f"downstream.suites.{suite}", m, (*METRICS, "rm_score_mean"))
    up = obj("upstream", data.get("upstream"))
    need("upstream.avg", up.get("avg"), _number(up.get("avg")), "a number")
    for mode, part in (("downstream", down), ("upstream", up)):  # optional: results from before it have none
        made = obj(f"{mode}.export", part.get("export"))
        for key in ("run_id", "sha256"):
            need(f"{mode}.export.{key}", made.get(key), isinstance(made.get(key), str), "a string")
        it = made.get("iteration")
        need(f"{mode}.export.iteration", it, _number(it) and not isinstance(it, float), "an iteration number")
    for task, m in obj("upstream.tasks", up.get("tasks")).items():
        metrics(f"upstream.tasks.{task}", m, ("acc", "acc_norm", "score"))


# ----------------------------------------------------------------------------------------------------------- tables


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def flat_row(data: dict) -> dict:
    """One CSV row: identity columns then every metric (downstream in percent like the upstream ones)."""
    row = {k: data.get(k) for k in ("model", "size", "pretrain_tokens", "stage", "group")}
    row["scoring"] = _get(data, "downstream", "scoring")
    for t in UPSTREAM:
        row[f"up_{t}"] = _get(data, "upstream", "tasks", t, "score")
    row["up_avg"] = _get(data, "upstream", "avg")
    over = averaged_over(data)
    row["up_tasks"] = ";".join(over["upstream"])
    row["id_suites"], row["ood_suites"] = ";".join(over["id"]), ";".join(over["ood"])
    down = data.get("downstream") or {}
    for scope in ("id_avg", "ood_avg"):
        for m in METRICS:
            row[f"{scope}_{m}"] = _pct(_get(down, scope, m))
    for suite in sorted((down.get("suites") or {})):
        for m in METRICS:
            row[f"{suite}_{m}"] = _pct(_get(down, "suites", suite, m))
    return row


def _pct(x):
    return None if x is None else round(100.0 * float(x), 2)


def averaged_over(data: dict) -> dict[str, list[str]]:
    """Which suites a result's ``id_avg`` / ``ood_avg`` and which tasks its upstream ``avg`` are means of (those it
    was evaluated on)."""
    suites = _get(data, "downstream", "suites") or {}
    tasks = _get(data, "upstream", "tasks") or {}
    return {"id": [s for s in ID_SUITES if s in suites], "ood": [s for s in OOD_SUITES if s in suites],
            "upstream": [t for t in UPSTREAM if t in tasks]}


def _partial_note(data: dict, scopes: tuple[str, ...]) -> str | None:
    """What a result's averages in ``scopes`` leave out of the full sets (None when nothing): a report row marked
    with it is not comparable with complete ones."""
    over = averaged_over(data)
    full = {"id": ID_SUITES, "ood": OOD_SUITES, "upstream": UPSTREAM}
    parts = []
    for scope in scopes:
        missing = [x for x in full[scope] if x not in over[scope]]
        if missing:
            name = {"id": "ID", "ood": "OOD", "upstream": "Avg"}[scope]
            parts.append(f"{name} over {', '.join(over[scope]) or 'nothing'} (without {', '.join(missing)})")
    return "; ".join(parts) or None


def _marked(rows: list[dict], scopes: tuple[str, ...], name=lambda d: d["model"]) -> tuple[list[str], list[str]]:
    """Model cells, ``†`` after each whose averages miss part of the full sets, and the footnote lines saying what."""
    cells, notes = [], []
    for d in rows:
        note = _partial_note(d, scopes)
        cells.append(name(d) + (" †" if note else ""))
        if note:
            notes.append(f"- † {name(d)}: {note}")
    if notes:
        notes = ["† averages over the part of the suites/tasks this model was evaluated on, not comparable with "
                 "complete rows:", *notes, ""]
    return cells, notes


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _tokens(n) -> str:
    return "-" if n is None else f"{n / 1e9:g}B"


def _sort_key(data: dict):
    number = re.search(r"\d+(?:\.\d+)?", data.get("size") or "")  # its first number: "1.5B", "v2-1B", "1.2.3B"
    num = float(number.group()) if number else 0.0
    stage = (data.get("stage") or "").lower()
    rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    return (num, data.get("pretrain_tokens") or 0, data.get("group") or "", rank, stage, data["model"])


def _is_rl(data: dict) -> bool:
    return (data.get("stage") or "").lower() in RL_STAGES


def sft_rl_pairs(results: list[dict]) -> list[tuple[dict, dict]]:
    """(SFT, SFT+RL) results that share a group: every RL result of the group (seeds, RL variants) beside the
    group's SFT (its last, if several)."""
    by_group: dict[str, dict] = {}
    for d in results:
        key = "rl" if _is_rl(d) else "sft" if (d.get("stage") or "").lower() == "sft" else None
        if key and d.get("downstream"):
            by_group.setdefault(d.get("group") or d["model"], {}).setdefault(key, []).append(d)
    return [(g["sft"][-1], rl) for g in by_group.values() if "sft" in g for rl in g.get("rl", [])]


def _pair_label(sft: dict, rl: dict, pairs: list[tuple[dict, dict]]) -> str:
    """The group's name, and the RL model's where the group has more than one RL result."""
    group = sft.get("group") or sft["model"]
    several = sum(1 for s, _ in pairs if (s.get("group") or s["model"]) == group) > 1
    return f"{group} ({rl['model']})" if several else group


def markdown(results: list[dict], plots: dict[str, str | None], dynamics: list[str] | None = None) -> str:
    lines = ["# EvoLM evaluation report", ""]
    modes = sorted({_get(d, "downstream", "scoring") for d in results if d.get("downstream")} - {None})
    if modes:
        lines += [f"Downstream scoring mode: {', '.join(modes)}. Downstream metrics are percent of problems; "
                  "ID = GSM8K-Platinum + MATH, OOD = CRUXEval, BoardgameQA, TabMWP, StrategyQA (suite averages).", ""]
    up = [d for d in results if d.get("upstream")]
    if up:
        lines += ["## Upstream (lm-eval, 0-shot)", ""]
        header = ["model", "size", "tokens", *[UPSTREAM_NAMES[t] for t in UPSTREAM], "Avg"]
        names, notes = _marked(up, ("upstream",))
        rows = [[name, d.get("size") or "-", _tokens(d.get("pretrain_tokens")),
                 *[_fmt(_get(d, "upstream", "tasks", t, "score"), 2) for t in UPSTREAM],
                 _fmt(_get(d, "upstream", "avg"), 2)] for name, d in zip(names, up)]
        lines += _md_table(header, rows) + [""] + notes
    down = [d for d in results if d.get("downstream")]
    if down:
        lines += ["## Downstream", ""]
        cols = [("id_avg", "pass1"), ("id_avg", "maj16"), ("id_avg", "rm16"), ("id_avg", "pass16"),
                ("ood_avg", "pass1"), ("ood_avg", "maj16"), ("ood_avg", "rm16"), ("ood_avg", "pass16")]
        header = ["model", "stage", *[f"{M_NAMES[m]} {'ID' if s == 'id_avg' else 'OOD'}" for s, m in cols]]
        names, notes = _marked(down, ("id", "ood"))
        rows = [[name, d.get("stage") or "-",
                 *[_fmt(_pct(_get(d, "downstream", s, m))) for s, m in cols]] for name, d in zip(names, down)]
        lines += _md_table(header, rows) + [""] + notes
        suites = sorted({s for d in down for s in (_get(d, "downstream", "suites") or {})})
        if suites:
            lines += ["### Per suite (Greedy / Maj@16 / Pass@16)", ""]
            rows = [[d["model"], *["/".join(_fmt(_pct(_get(d, "downstream", "suites", s, m)))
                                            for m in ("pass1", "maj16", "pass16")) for s in suites]] for d in down]
            lines += _md_table(["model", *suites], rows) + [""]
    pairs = sft_rl_pairs(results)
    if pairs:
        lines += ["## SFT / SFT+RL", ""]
        cols = [("id_avg", "pass1"), ("id_avg", "maj16"), ("id_avg", "pass16"),
                ("ood_avg", "pass1"), ("ood_avg", "maj16"), ("ood_avg", "pass16")]
        header = ["model", *[f"{M_NAMES[m]} {'ID' if s == 'id_avg' else 'OOD'}" for s, m in cols]]
        def downstream_over(d):
            over = averaged_over(d)
            return over["id"], over["ood"]

        # either model's averages partial, or the two over different suites, marks the pair
        marked = [_pair_label(sft, rl, pairs) + (" †" if _partial_note(sft, ("id", "ood"))
                                                        or _partial_note(rl, ("id", "ood"))
                                                        or downstream_over(sft) != downstream_over(rl) else "")
                  for sft, rl in pairs]
        rows = [[name,
                 *[f"{_fmt(_pct(_get(sft, 'downstream', s, m)))}/{_fmt(_pct(_get(rl, 'downstream', s, m)))}"
                   for s, m in cols]] for name, (sft, rl) in zip(marked, pairs)]
        lines += _md_table(header, rows) + [""]
        if any(n.endswith(" †") for n in marked):
            lines += ["† SFT or SFT+RL averages over part of the suites (see Downstream), or over different ones", ""]
    points = rm_accuracy_points(results)
    if points:
        lines += ["## ORM score vs accuracy (EvoLM Takeaway 12)", ""]
        rows = []
        for suite, pts in points.items():
            r = pearson([x for _, x, _ in pts], [y for _, _, y in pts])
            rows.append([suite, str(len(pts)), "n/a" if r is None else f"{r:.2f}"])
        lines += _md_table(["suite", "models", "Pearson r"], rows) + [""]
    lines += dynamics or []
    lines += ["## Plots", ""]
    for name, path in plots.items():
        lines.append(f"![{name}]({Path(path).name})" if path else f"- {name}: skipped (no data to draw)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------ plots


def plot_tokens(results: list[dict], path: Path) -> str | None:
    """Upstream avg and downstream ID/OOD greedy vs pretraining tokens, one line per (size, stage)."""
    import matplotlib.pyplot as plt

    panels = [("Upstream avg (%)", lambda d: _get(d, "upstream", "avg")),
              ("ID Greedy (%)", lambda d: _pct(_get(d, "downstream", "id_avg", "pass1"))),
              ("OOD Greedy (%)", lambda d: _pct(_get(d, "downstream", "ood_avg", "pass1")))]
    series = []
    for title, get in panels:
        lines: dict[str, list] = {}
        for d in results:
            y = get(d)
            if y is not None and d.get("pretrain_tokens"):
                label = f"{d.get('size') or '?'}" + (f" {d['stage']}" if d.get("stage") else "")
                lines.setdefault(label, []).append((d["pretrain_tokens"] / 1e9, y))
        if lines:
            series.append((title, lines))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], series):
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in lines.values() for p in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("pretraining tokens (B)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _scatter(results, path, xs, ys, xlabel, ylabel, title, diagonal=False) -> str | None:
    import matplotlib.pyplot as plt

    pts = [(d, x, y) for d in results for x, y in [(xs(d), ys(d))] if x is not None and y is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sizes = sorted({d.get("size") or "?" for d, _, _ in pts})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(sizes)}
    for d, x, y in pts:
        ax.scatter(x, y, color=colors[d.get("size") or "?"], marker="^" if _is_rl(d) else "o")
        ax.annotate(d["model"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for s in sizes:
        ax.scatter([], [], color=colors[s], label=s)
    if diagonal:
        hi = max(max(x, y) for _, x, y in pts) or 1.0
        ax.plot([0, hi], [0, hi], color="gray", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (triangles: SFT+RL)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="size")
    out = _save(fig, path)
    plt.close(fig)
    return out


def pearson(xs, ys) -> float | None:
    """Pearson's r (None below 3 points or without spread)."""
    import numpy as np

    if len(xs) < 3:
        return None
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def rm_accuracy_points(results: list[dict]) -> dict[str, list[tuple[dict, float, float]]]:
    """Per suite: (result, mean ORM score of its completions, its correct ratio) for every result that has both."""
    out: dict[str, list] = {}
    for d in results:
        for suite, m in (_get(d, "downstream", "suites") or {}).items():
            if m.get("rm_score_mean") is not None and m.get("correct_ratio") is not None:
                out.setdefault(suite, []).append((d, float(m["rm_score_mean"]), float(m["correct_ratio"])))
    return out


def plot_rm_accuracy(results: list[dict], path: Path) -> str | None:
    """EvoLM's Takeaway 12: the mean ORM score of a model's samples against their accuracy, one panel per suite,
    one point per model, Pearson's r in each title."""
    import matplotlib.pyplot as plt

    points = rm_accuracy_points(results)
    if not points:
        return None
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 4), squeeze=False)
    for ax, (suite, pts) in zip(axes[0], points.items()):
        ax.scatter([x for _, x, _ in pts], [100 * y for _, _, y in pts],
                   marker="o", c=["tab:orange" if _is_rl(d) else "tab:blue" for d, _, _ in pts])
        for d, x, y in pts:
            ax.annotate(d["model"], (x, 100 * y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        r = pearson([x for _, x, _ in pts], [y for _, _, y in pts])
        ax.set_title(f"{suite}: Pearson r = {'n/a' if r is None else f'{r:.2f}'} ({len(pts)} models)", fontsize=9)
        ax.set_xlabel("mean ORM score")
        ax.set_ylabel("correct ratio (%)")
        ax.grid(alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_sft_rl(results: list[dict], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    pairs = sft_rl_pairs(results)
    if not pairs:
        return None
    cols = [("id_avg", "pass1"), ("id_avg", "maj16"), ("id_avg", "pass16"),
            ("ood_avg", "pass1"), ("ood_avg", "maj16"), ("ood_avg", "pass16")]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, (sft, rl) in zip(axes[0], pairs):
        xs = range(len(cols))
        for off, d, label in ((-0.2, sft, "SFT"), (0.2, rl, "SFT+RL")):
            ax.bar([x + off for x in xs], [_pct(_get(d, "downstream", s, m)) or 0.0 for s, m in cols], width=0.4,
                   label=label)
        ax.set_xticks(list(xs), [f"{M_NAMES[m]}\n{'ID' if s == 'id_avg' else 'OOD'}" for s, m in cols], fontsize=8)
        ax.set_ylabel("%")
        ax.set_title(_pair_label(sft, rl, pairs))
        ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def build(pattern: str | None, out: str, dynamics: str | None = None) -> dict:
    """Write results.csv, report.md and the plots into ``out``; returns {name: path or None}. ``dynamics``: a glob
    of training run dirs whose metrics carry validation losses and probes (dynamics.png, dynamics.csv and two
    sections of report.md)."""
    import matplotlib

    matplotlib.use("Agg")
    if pattern is None and dynamics is None:
        raise ConfigError("runs", "required: a glob of result JSONs, e.g. runs='runs/eval/*/result.json' "
                                  "(or dynamics=<glob of training run dirs>)")
    curves = None
    if dynamics is not None:
        curves = dyn.load_curves(dynamics)
    foreign = owned_elsewhere(out)
    if foreign is not None:
        raise ConfigError("out", f"{foreign}; a report goes in a directory of its own: pick another out")
    check_writable(out, "out", directory=True)  # not an existing file, and writable: before any work
    lock_output(out, "out")  # a second report into ``out`` at the same time is refused in one line
    results = sorted((d for _, d in load_results(pattern)), key=_sort_key) if pattern is not None else []
    final = Path(out)
    final.mkdir(parents=True, exist_ok=True)
    out_dir = temp_dir(final / ".report", owned=True)  # drawn in ``out`` aside, then moved in at once: never half
    # a report there (inside ``out``: its parent may not be writable)
    try:
        made = _build(results, out_dir, curves)
        names = sorted(p.name for p in out_dir.iterdir() if p.name not in (OWNER, MANIFEST))
        before = _reported(final)
        with signals_held():  # the new report's files in, the previous report's others out: not split by a stop
            if not set(names) <= before:  # a kill (-9) part-way leaves every name either report wrote listed
                write_json(final / MANIFEST, {"files": sorted(before | set(names))})
            for name in names:
                os.replace(out_dir / name, final / name)
            for name in sorted(before - set(names)):
                if not (final / name).is_dir():
                    (final / name).unlink(missing_ok=True)
            write_json(final / MANIFEST, {"files": names})
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {k: None if v is None else str(final / Path(v).name) for k, v in made.items()}


def _reported(out: Path) -> set[str]:
    """The files the previous report listed in ``out``'s manifest (``MANIFEST``): plain names of files in ``out``,
    never the manifest or a temporary directory's marker. No manifest (no report yet, or one written before it
    existed) or an unreadable one lists nothing: a file is removed only when a report is known to have written it."""
    try:
        listed = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(listed, list):
        return set()
    return {n for n in listed if isinstance(n, str) and n not in ("", ".", "..", MANIFEST, OWNER)
            and "/" not in n and "\\" not in n and "\0" not in n}


def _build(results: list[dict], out_dir: Path, curves) -> dict:
    plots = {}
    if results:
        plots = {
            "tokens": plot_tokens(results, out_dir / "tokens.png"),
            "id_vs_ood": _scatter(results, out_dir / "id_vs_ood.png",
                                  lambda d: _pct(_get(d, "downstream", "id_avg", "maj16")),
                                  lambda d: _pct(_get(d, "downstream", "ood_avg", "maj16")),
                                  "ID Maj@16 (%)", "OOD Maj@16 (%)", "ID vs OOD"),
            "sft_vs_rl": plot_sft_rl(results, out_dir / "sft_vs_rl.png"),
            "rm_vs_accuracy": plot_rm_accuracy(results, out_dir / "rm_vs_accuracy.png"),
            "maj_vs_pass": _scatter(results, out_dir / "maj_vs_pass.png",
                                    lambda d: _pct(_get(d, "downstream", "id_avg", "pass16")),
                                    lambda d: _pct(_get(d, "downstream", "id_avg", "maj16")),
                                    "ID Pass@16 (%)", "ID Maj@16 (%)", "Maj@16 vs Pass@16", diagonal=True),
        }
    written = {}
    sections = None
    if curves is not None:
        drawn = dyn.plot(curves, out_dir / "dynamics.png")
        sections = dyn.markdown(curves)
        plots["dynamics"] = drawn
        written["dynamics_csv"] = dyn.write_csv(curves, out_dir / "dynamics.csv")
    if results:
        rows = [flat_row(d) for d in results]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(out_dir / "results.csv", buf.getvalue())
        written["csv"] = str(out_dir / "results.csv")
    write_text(out_dir / "report.md", markdown(results, plots, sections))
    return {**written, "markdown": str(out_dir / "report.md"), **plots}

