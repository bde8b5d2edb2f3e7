"""``evolm release``: publish finished models on the Hugging Face Hub.

    evolm release src=runs/tiny_sft repo=me/evolm-tiny-sft            # one run
    evolm release suite=tiny org=me [repo='{org}/evolm-{size}-{node}']  # every finished train node of a suite
    evolm release suite=tiny org=me dry_run=true                        # every repo, branch and file; no network

Each model (an actor or a reward model: ``<run>/checkpoints``) is exported by ``conversion.export.export`` -- which
reloads the written directory with transformers and compares logits -- into a staging directory
(``<run>/release/main``, ``<run>/release/step-<iteration>``; ``out=`` moves them) and pushed with huggingface_hub:
``create_repo`` then ``create_commit`` of the files whose content differs from the remote's (git blob sha1 of a
regular file, sha256 of an LFS file, as ``list_repo_tree`` reports them) and the deletion of remote files the export
no longer has. The final checkpoint is ``main``; each kept intermediate checkpoint is a branch ``step-<iteration>``.
A staged export is reused while its checkpoint is unchanged (the sha256 of its ``evolm.json``, which holds every
file's checksum), so re-running uploads only what changed -- nothing, when nothing did.

The model card is the export's, extended with front matter (``base_model`` = the parent's repo), the lineage up to
pretraining (each ancestor's stage, data, tokens and repo), the recipe (``recipe.yaml`` beside it: the composed
config), the run's final metrics and, in a suite, the rows of its evaluation nodes. A suite also gets an index repo
(``index_repo=``) whose README holds the suite's table (every model, its parent, revisions, and the suite report's
tables) and ``suite.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from evolm_nemo.checkpoint import io
from evolm_nemo.config.errors import ConfigError

MARKER = "<!-- evolm release -->"
PLACEHOLDERS = ("org", "suite", "node", "stage", "size", "model")
STATE = "release.json"  # in each model's staging dir: repo and the checkpoint each revision was exported from
KEEP_REMOTE = (".gitattributes",)  # the Hub's own file of a new repo: never deleted


@dataclass
class Revision:
    branch: str  # main | step-<iteration>
    checkpoint: Path
    iteration: int
    key: str  # sha256 of the checkpoint's evolm.json: its identity
    dir: Path  # staged export


@dataclass
class Model:
    node: str  # suite node, or the run dir's name
    run: Path
    meta: dict  # the final checkpoint's evolm.json
    repo: str = ""
    stage_dir: Path = Path()
    revisions: list[Revision] = field(default_factory=list)
    recipe: Optional[str] = None  # the suite's command line for it
    evals: list[tuple[str, dict]] = field(default_factory=list)  # (eval node, result.json)
    parents: list[dict] = field(default_factory=list)  # nearest first


# ------------------------------------------------------------------------------------------------------ small parts

_HASHES: dict[tuple, str] = {}


def _sha256_file(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process (shards are hashed for the listing
    and again for the comparison with the remote)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _hash(path)
    return _HASHES[key]


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub reports as a regular file's oid)."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def size_label(params: int) -> str:
    for scale, suffix in ((1e9, "b"), (1e6, "m"), (1e3, "k")):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return str(params)


def _params(meta: dict) -> int:
    from evolm_nemo.conversion.export import model_from_meta
    from evolm_nemo.model.build import param_count

    m = model_from_meta(meta, "evolm.json")
    return param_count(m)


def repo_name(pattern: str, fields: dict, key: str) -> str:
    """``pattern`` with its placeholders filled; a bad pattern or an invalid repo id is a ConfigError on ``key``."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as exc:
        raise ConfigError(key, f"bad pattern {pattern!r} ({exc})") from None
    for name in names:
        if name not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            raise ConfigError(key, f"unknown placeholder {{{name}}} in {pattern!r}; use {known}")
        if fields.get(name) in (None, ""):
            raise ConfigError("org" if name == "org" else key,
                              f"{pattern!r} uses {{{name}}}, which is not set" + (" (org=<user or organization>)"
                                                                                   if name == "org" else ""))
    repo = pattern.format(**{k: str(v) for k, v in fields.items() if v is not None})
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo.count("/") != 1:
            raise HFValidationError("a repo id is <user or organization>/<name>")
        validate_repo_id(repo)
    except HFValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(key, f"{pattern!r} gives {repo!r}, not a valid Hub repo id: {first}") from None
    return repo


def run_dir_of(path: str | Path) -> Path:
    """A run dir, its checkpoint root or one of its checkpoints -> the run dir."""
    p = Path(path).expanduser()
    if re.fullmatch(r"iter_\d{7}", p.name):
        p = p.parent
    if p.name == "checkpoints" and not (p / "checkpoints").is_dir():
        p = p.parent
    return p.resolve()


DAMAGED = "no usable checkpoint, its committed ones are damaged"


def finished(run: Path) -> tuple[bool, str, Optional[Path]]:
    """(finished?, why not / what, the final checkpoint)."""
    last = io.latest(run / "checkpoints")
    if last is None:
        damaged = [(p.name, why) for p in io.checkpoint_dirs(run / "checkpoints")
                   if (p / io.META).is_file() and (why := io.problem(p)) is not None]  # committed once, damaged since
        if damaged:
            return False, f"{DAMAGED} ({damaged[-1][0]}: {damaged[-1][1]})", None
        return False, "no committed checkpoint", None
    meta = io.read_meta(last)
    it, want = meta.get("iteration"), meta.get("planned_iters")
    if want is not None and it is not None and it >= want:
        return True, f"{last.name} of {want}", last
    return False, f"not finished ({last.name} of {want} iterations)", last


def _key(ckpt: Path) -> str:
    return hashlib.sha256((ckpt / io.META).read_bytes()).hexdigest()


def _revisions(model: Model, final: Path, with_steps: bool) -> list[Revision]:
    ckpts = io.committed(model.run / "checkpoints") if with_steps else [final]
    out = []
    for c in ckpts:
        it = int(io.read_meta(c).get("iteration", int(c.name.split("_")[1])))
        branch = "main" if c == final else f"step-{it}"
        out.append(Revision(branch, c, it, _key(c), model.stage_dir / branch))
    return sorted(out, key=lambda r: (r.branch != "main", r.iteration))


def _last_metrics(run: Path, iteration: int) -> dict:
    """The metrics.jsonl row of ``iteration`` (else the last row up to it): its scalar values."""
    path = run / "metrics.jsonl"
    best: dict = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int) and row["iteration"] <= iteration:
            best = row
    return {k: v for k, v in best.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _locate(parent: str, near: Path) -> str:
    """A lineage's parent path: as recorded when absolute (runs record it so) or found from here; a relative one
    (recorded by older runs, relative to the directory training ran in) is looked for under the ancestors of the
    child run ``near``."""
    if os.path.isabs(parent) or Path(parent).exists():
        return parent
    for base in Path(near).resolve().parents:
        if (base / parent).exists():
            return str(base / parent)
    return parent


def _parents(model: Model, repos: dict[Path, str]) -> list[dict]:
    """The ancestors up to pretraining, nearest first: run dir, stage, iteration, tokens, data, repo."""
    out, seen = [], {model.run}
    parent = (model.meta.get("lineage") or {}).get("parent")
    child = model.run
    while parent:
        parent = _locate(parent, child)
        run = run_dir_of(parent)
        if run in seen:
            break
        seen.add(run)
        entry: dict[str, Any] = {"run": str(run), "repo": repos.get(run) or _released_repo(run)}
        try:
            meta = io.read_meta(io.resolve(parent))
        except (io.CheckpointError, OSError, ValueError):
            entry["missing"] = True
            out.append(entry)
            break
        stages = (meta.get("lineage") or {}).get("stages") or [{}]
        entry.update(stage=meta.get("stage"), iteration=meta.get("iteration"),
                     tokens=(meta.get("extra") or {}).get("tokens"), data=stages[-1].get("data"))
        out.append(entry)
        child, parent = run, (meta.get("lineage") or {}).get("parent")
    return out


def _released_repo(run: Path) -> Optional[str]:
    """The repo a run was released to before (its default staging dir's record)."""
    try:
        return json.loads((run / "release" / STATE).read_text()).get("repo")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------- what to push

@dataclass
class Plan:
    models: list[Model]
    skipped: list[tuple[str, str]]  # (node, why)
    index: Optional[tuple[str, Path]] = None  # (repo, staging dir) of a suite's index card
    suite: Any = None
    table: list[Model] = field(default_factory=list)  # a suite: every finished model (the index card's rows)
    unfinished: list[tuple[str, str]] = field(default_factory=list)  # a suite: every train node not finished


def _one_run(cfg) -> Plan:
    src = Path(cfg.src).expanduser()
    if not src.exists():
        raise ConfigError("src", f"{cfg.src}: no such run directory")
    run = run_dir_of(src)
    if not (run / "checkpoints").is_dir():
        raise ConfigError("src", f"{cfg.src}: not a run directory (no checkpoints/ in it)")
    try:
        ok, why, last = finished(run)
    except io.CheckpointError as exc:
        raise ConfigError("src", str(exc)) from None
    if not ok:
        raise ConfigError("src", f"{run}: {why}; only finished runs are released " + (
            "(restore the checkpoint from a copy, or train the run again: train.resume=false train.overwrite=true)"
            if why.startswith(DAMAGED) else "(`evolm train` with the same recipe resumes it)"))
    if not cfg.repo:
        raise ConfigError("repo", "must be set: repo=<org/name> (or a pattern such as '{org}/evolm-{size}-{node}')")
    model = Model(node=run.name, run=run, meta=io.read_meta(last))
    model.repo = repo_name(cfg.repo, _fields(cfg, model, None), "repo")
    model.stage_dir = (Path(cfg.out).expanduser().resolve() if cfg.out else run / "release")
    model.revisions = _revisions(model, last, cfg.revisions)
    model.parents = _parents(model, {})
    return Plan([model], [])


def _fields(cfg, model: Model, suite_name: Optional[str]) -> dict:
    return {"org": cfg.org, "suite": suite_name, "node": model.node, "stage": model.meta.get("stage"),
            "size": size_label(_params(model.meta)), "model": (model.meta.get("model") or {}).get("name")}


def _suite(cfg) -> Plan:
    """Every finished train node of the suite (the index card's table); ``only=`` narrows what is pushed to those
    nodes (their parents' repos are still named), the index keeps the whole table."""
    from evolm_nemo.suite import spec

    suite = spec.load(str(cfg.suite), {"root": cfg.root} if cfg.root else {})
    wanted = None
    if cfg.only:
        wanted = set(cfg.only)
        for name in cfg.only:
            if name not in suite.nodes or suite.nodes[name].kind != "train":
                raise ConfigError("only", f"{name!r} is not a train node of suite {suite.name}")
    pattern = cfg.repo or "{org}/evolm-{size}-{node}"
    table, skipped, repos = [], [], {}
    for name in suite.order:
        node = suite.nodes[name]
        if node.kind != "train":
            continue
        run = Path(suite.out(name)).expanduser().resolve()
        try:
            ok, why, last = finished(run)
        except io.CheckpointError as exc:
            raise ConfigError(f"nodes.{name}", str(exc)) from None
        if not ok:
            skipped.append((name, why))
            continue
        model = Model(node=name, run=run, meta=io.read_meta(last))
        model.repo = repo_name(pattern, _fields(cfg, model, suite.name), "repo")
        model.stage_dir = (Path(cfg.out).expanduser().resolve() / name) if cfg.out else run / "release"
        model.revisions = _revisions(model, last, cfg.revisions)
        model.recipe = suite.expand(" ".join(["evolm train", f"experiment={node.experiment}", *suite.train_overrides,
                                              *node.overrides]), f"nodes.{name}.overrides")
        model.evals = _evals(suite, name)
        repos[run] = model.repo
        table.append(model)
    seen: dict[str, str] = {}
    for m in table:
        if m.repo in seen:
            raise ConfigError("repo", f"{pattern!r} names {m.repo} for both {seen[m.repo]} and {m.node}; add "
                                      "{node} to the pattern")
        seen[m.repo] = m.node
    for m in table:
        m.parents = _parents(m, repos)
    models = [m for m in table if wanted is None or m.node in wanted]
    index = None
    if table:
        index_repo = repo_name(cfg.index_repo, {"org": cfg.org, "suite": suite.name}, "index_repo")
        if index_repo in seen:
            raise ConfigError("index_repo", f"{index_repo} is also the repo of node {seen[index_repo]}")
        where = Path(cfg.out).expanduser().resolve() / "_index" if cfg.out else \
            Path(suite.root).expanduser().resolve() / "release_index"
        index = (index_repo, where)
    return Plan(models, [(n, w) for n, w in skipped if wanted is None or n in wanted], index, suite, table,
                skipped)


def _evals(suite, name: str) -> list[tuple[str, dict]]:
    """(eval node, its result.json) of every evaluation reading an export of train node ``name``: read when the
    release is planned (the dry run too), so a damaged one is one line naming the file before anything is exported
    -- it was left out of the card without a word, or (a field of another type) a crash while the card was written,
    after the exports."""
    from evolm_nemo.evaluation.report import read_result

    out = []
    for other in suite.order:
        ev = suite.nodes[other]
        if ev.kind == "eval" and ev.parent and suite.nodes[ev.parent].kind == "export" \
                and suite.nodes[ev.parent].parent == name:
            result = read_result(Path(suite.out(other)) / "result.json")
            if result is not None:
                out.append((other, result))
    return out


# ------------------------------------------------------------------------------------------------------------ cards

def _link(repo: Optional[str]) -> str:
    return f"[{repo}](https://huggingface.co/{repo})" if repo else "(not released)"


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "-" if v is None else str(v)


def _eval_rows(name: str, result: dict) -> list[list[str]]:
    rows = []
    down = result.get("downstream") or {}
    groups = dict(down.get("suites") or {})
    for avg in ("id_avg", "ood_avg"):
        if isinstance(down.get(avg), dict):
            groups[avg] = down[avg]
    for group, vals in groups.items():
        if isinstance(vals, dict):
            rows.append([name, "downstream", str(group)] + [_num(vals.get(k)) for k in ("pass1", "maj16", "pass16")])
    up = result.get("upstream") or {}
    if up.get("avg") is not None:
        rows.append([name, "upstream", "avg", _num(up.get("avg")), "-", "-"])
    for task, vals in (up.get("tasks") or {}).items():
        if isinstance(vals, dict):
            rows.append([name, "upstream", str(task), _num(vals.get("score")), "-", "-"])
    return rows


def release_section(model: Model, rev: Revision) -> list[str]:
    meta = io.read_meta(rev.checkpoint)
    lines = [MARKER, "", "## Release", "",
             f"- **repository**: {model.repo}, revision `{rev.branch}` = iteration {rev.iteration:,}"]
    steps = [r for r in model.revisions if r.branch != "main"]
    if steps:
        lines.append("- **intermediate checkpoints** (branches): " + ", ".join(f"`{r.branch}`" for r in steps)
                     + f"; the final one is `main`: `from_pretrained(\"{model.repo}\", "
                       f"revision=\"{steps[0].branch}\")`")
    lines += ["- **recipe**: " + (f"`{model.recipe}`; " if model.recipe else "") + "the composed config is "
              "`recipe.yaml`", ""]
    stages = (meta.get("lineage") or {}).get("stages") or []
    lines += ["### Parents up to pretraining", "",
              "| # | stage | model | data | tokens | repository |", "|---|---|---|---|---|---|"]
    ancestry = list(reversed(model.parents)) + [{"repo": model.repo, "self": True}]
    if len(ancestry) != len(stages):  # lineage recorded differently (imported models): stages without repos
        ancestry = [{}] * (len(stages) - 1) + [{"repo": model.repo, "self": True}] if stages else []
    total = 0
    for i, (st, anc) in enumerate(zip(stages, ancestry)):
        total += int(st.get("tokens") or 0)
        repo = f"{anc['repo']} (this model)" if anc.get("self") else _link(anc.get("repo"))
        lines.append(f"| {i} | {st.get('stage', '-')} | {st.get('model', '-')} | {st.get('data', '-')} | "
                     f"{_num(st.get('tokens'))} | {repo} |")
    lines.append("")
    if model.parents:
        lines.append("Parents: " + " <- ".join(
            (_link(p["repo"]) if p.get("repo") else f"`{Path(p['run']).name}` (not released)")
            + f" ({p.get('stage', '?')}, iteration {_num(p.get('iteration'))})" for p in model.parents) + ".")
    else:
        lines.append("Parents: none (trained from scratch).")
    if total:
        lines.append(f"Tokens over the whole lineage: {total:,}.")
    lines.append("")
    metrics = _last_metrics(model.run, rev.iteration)
    if metrics:
        lines += [f"### Metrics at iteration {rev.iteration:,} (metrics.jsonl)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in metrics.items() if k != "iteration"]
        lines.append("")
    if model.evals and rev.branch == "main":
        lines += ["### Evaluation", "", "| eval node | mode | task | Pass@1 / score | Maj@16 | Pass@16 |",
                  "|---|---|---|---|---|---|"]
        for name, result in model.evals:
            lines += ["| " + " | ".join(r) + " |" for r in _eval_rows(name, result)]
        lines.append("")
    return lines


def _export_body(readme: str) -> str:
    """The export's own card: front matter, title and an earlier release section left out."""
    text = readme
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        text = text[end + 5:] if end >= 0 else text
    lines = text.split(MARKER)[0].strip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip("\n") + "\n"


def model_card(model: Model, rev: Revision, body: str) -> str:
    head = model.meta.get("head", "lm")
    front = ["---", "library_name: transformers",
             f"pipeline_tag: {'text-classification' if head == 'value' else 'text-generation'}",
             "tags:", "- evolm", "- evolm-nemo", f"- {model.meta.get('stage', 'unknown')}"]
    parent = model.parents[0].get("repo") if model.parents else None
    if parent:
        front.append(f"base_model: {parent}")
    front += ["---", ""]
    title = f"# {model.repo}" + ("" if rev.branch == "main" else f" (`{rev.branch}`)")
    return "\n".join(front + [title, "", body.rstrip("\n"), ""] + release_section(model, rev))


def _recipe_yaml(meta: dict) -> str:
    import yaml

    return yaml.safe_dump(meta.get("config") or {}, sort_keys=True, default_flow_style=False)


def index_card(plan: Plan, repo: str) -> str:
    suite = plan.suite
    lines = ["---", "tags:", "- evolm", "- evolm-nemo", "---", "", f"# EvoLM suite `{suite.name}`", ""]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += ["Every model of the suite is its own repository; intermediate checkpoints are branches "
              "`step-<iteration>`. The suite's recipe is `suite.yaml`.", "",
              "| node | repository | stage | parent | iterations | tokens (stage) | loss | revisions |",
              "|---|---|---|---|---|---|---|---|"]
    for m in plan.table:
        parent = m.parents[0].get("repo") if m.parents else None
        loss = _last_metrics(m.run, m.revisions[0].iteration).get("loss")
        steps = [r.branch for r in m.revisions if r.branch != "main"]
        lines.append(f"| {m.node} | {_link(m.repo)} | {m.meta.get('stage')} | {_link(parent) if parent else '-'} | "
                     f"{_num(m.meta.get('iteration'))} | {_num((m.meta.get('extra') or {}).get('tokens'))} | "
                     f"{_num(loss)} | {', '.join(['main'] + steps)} |")
    lines.append("")
    if plan.unfinished:
        lines += ["Not finished yet: " + ", ".join(f"{n} ({why})" for n, why in plan.unfinished) + ".", ""]
    if suite.report:
        from evolm_nemo.suite import report as suite_report

        tables = suite_report.build(suite)
        if tables.md and any(cell[3] for cell in tables.cells):
            lines += ["## Results", ""] + [ln.replace("## ", "### ", 1) if ln.startswith("## ") else ln
                                           for ln in tables.md]
            missing = sorted(set(tables.missing))
            if missing:
                lines += [f"\"-\": not evaluated yet ({', '.join(missing)}).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- staging

def _state(stage_dir: Path) -> dict:
    try:
        data = json.loads((stage_dir / STATE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _settings(cfg) -> dict:
    """The export settings a staged export was made with (another set means another export)."""
    return {"dtype": cfg.dtype, "max_shard_size": cfg.max_shard_size, "verify_tol": cfg.verify_tol}


def export_intact(directory: Path) -> bool:
    """A staged export holds exactly the files its export recorded (``evolm_export.json``: size and checksum of
    each), plus the card and recipe the release writes: nothing deleted, cut short, edited or added."""
    try:
        record = json.loads((directory / "evolm_export.json").read_text())
        files = record["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return False  # an export from before file records, or no export at all: made again
    present = set(local_files(directory)) - {"README.md", "recipe.yaml", "evolm_export.json"}
    if present != set(files):
        return False
    for name, (size, checksum) in files.items():
        p = directory / name
        if p.stat().st_size != size or io.file_checksum(p, record.get("checksum", io.CHECKSUM)) != checksum:
            return False
    return True


def _reusable(model: Model, rev: Revision, cfg) -> bool:
    entry = (_state(model.stage_dir).get("revisions") or {}).get(rev.branch) or {}
    return entry.get("key") == rev.key and entry.get("settings") == _settings(cfg) and export_intact(rev.dir)


def stage(model: Model, cfg) -> None:
    """Every revision's verified export in its staging dir (re-exported only when its checkpoint changed), then
    its card and recipe."""
    from evolm_nemo.conversion.config import ExportHFConfig
    from evolm_nemo.conversion.export import export
    from evolm_nemo.fileio import write_json, write_text

    state = _state(model.stage_dir)
    done = state.get("revisions") or {}
    for rev in model.revisions:
        if _reusable(model, rev, cfg):  # its checkpoint, its settings, every file as exported
            continue
        export(ExportHFConfig(src=str(rev.checkpoint), dst=str(rev.dir), dtype=cfg.dtype,
                              max_shard_size=cfg.max_shard_size, verify=True, verify_tol=cfg.verify_tol,
                              overwrite=rev.dir.exists(), progress=False))
        done[rev.branch] = {"key": rev.key, "checkpoint": str(rev.checkpoint), "iteration": rev.iteration,
                            "settings": _settings(cfg)}
        write_json(model.stage_dir / STATE, {"repo": model.repo, "revisions": done})
    for rev in model.revisions:
        readme = rev.dir / "README.md"
        card = model_card(model, rev, _export_body(readme.read_text(encoding="utf-8")))
        if readme.read_text(encoding="utf-8") != card:
            write_text(readme, card)
        recipe = _recipe_yaml(io.read_meta(rev.checkpoint))
        if not (rev.dir / "recipe.yaml").is_file() or (rev.dir / "recipe.yaml").read_text() != recipe:
            write_text(rev.dir / "recipe.yaml", recipe)
    keep = {r.branch for r in model.revisions}
    write_json(model.stage_dir / STATE, {"repo": model.repo,
                                         "revisions": {k: v for k, v in done.items() if k in keep}})


def stage_index(plan: Plan) -> None:
    from evolm_nemo.fileio import write_bytes, write_text

    repo, where = plan.index
    card = index_card(plan, repo)
    where.mkdir(parents=True, exist_ok=True)
    if not (where / "README.md").is_file() or (where / "README.md").read_text() != card:
        write_text(where / "README.md", card)
    suite_yaml = plan.suite.path.read_bytes()
    if not (where / "suite.yaml").is_file() or (where / "suite.yaml").read_bytes() != suite_yaml:
        write_bytes(where / "suite.yaml", suite_yaml)
    table = [{"node": m.node, "repo": m.repo, "run_id": m.meta.get("run_id"), "stage": m.meta.get("stage"),
              "parent": m.parents[0].get("repo") if m.parents else None,
              "revisions": [r.branch for r in m.revisions]} for m in plan.table]
    text = json.dumps({"suite": plan.suite.name, "models": table}, indent=1) + "\n"
    if not (where / "models.json").is_file() or (where / "models.json").read_text() != text:
        write_text(where / "models.json", text)


def local_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def predicted_files(rev: Revision, cfg) -> list[str]:
    """Dry run before any export: the files ``export-hf`` will write (shards estimated from the parameter count)."""
    from evolm_nemo.conversion import hf
    from evolm_nemo.conversion.export import TOKENIZER_FILES, find_tokenizer, parse_dtype, stored_dtype

    meta = io.read_meta(rev.checkpoint)
    # the dtype export-hf writes: dtype=auto keeps the checkpoint's (bf16 for train.precision=auto on GPU)
    bytes_per = (parse_dtype(cfg.dtype) or stored_dtype(rev.checkpoint)).itemsize
    total = _params(meta) * bytes_per
    shards = max(1, -(-total // hf.parse_size(cfg.max_shard_size)))
    names = ["config.json", "README.md", "evolm_export.json", "recipe.yaml"]
    if meta.get("head", "lm") == "lm":
        names.append("generation_config.json")
    names += ["model.safetensors"] if shards == 1 else \
        [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] + ["model.safetensors.index.json"]
    try:
        tok = Path(find_tokenizer(rev.checkpoint, meta, None))
        names += [n for n in TOKENIZER_FILES if (tok / n).is_file()] if tok.is_dir() else ["tokenizer files"]
    except ConfigError:
        names.append("tokenizer files")
    return sorted(names)


# -------------------------------------------------------------------------------------------------------------- hub

def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("HF_TOKEN", "no Hugging Face token: set HF_TOKEN or run `hf auth login` (dry_run=true "
                                      "needs none)")
    return token


@contextmanager
def hub_errors(repo: str, branch: str):
    """The Hub's refusals and an unreachable endpoint as one line (what was pushed before stays; a re-run goes on)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        key = "HF_TOKEN" if status in (401, 403) else "repo"
        raise ConfigError(key, f"{repo}@{branch}: the Hub refused ({first}); re-run to go on") from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - httpx connection errors come in many types
        if not type(exc).__module__.startswith(("httpx", "httpcore")) and not isinstance(exc, OSError):
            raise
        from huggingface_hub import constants

        raise ConfigError("HF_ENDPOINT", f"cannot reach {constants.ENDPOINT} ({type(exc).__name__}: "
                                         f"{(str(exc).splitlines() or [''])[0]}); re-run to go on") from None


def _remote(api, repo: str, branch: str) -> Optional[dict[str, tuple[str, str]]]:
    """path -> (kind, id) on ``branch`` (kind sha256 for LFS files, sha1 for regular ones); None: no such branch."""
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = list(api.list_repo_tree(repo, revision=branch, recursive=True))
    except RevisionNotFoundError:
        return None
    out = {}
    for e in entries:
        if isinstance(e, RepoFile):
            out[e.path] = ("sha256", e.lfs.sha256) if e.lfs is not None else ("sha1", e.blob_id)
    return out


def _changes(files: dict[str, Path], remote: dict[str, tuple[str, str]]) -> tuple[list[str], list[str]]:
    changed = []
    for path, local in files.items():
        have = remote.get(path)
        if have is None:
            changed.append(path)
            continue
        kind, oid = have
        mine = _sha256_file(local) if kind == "sha256" else _git_sha1(local)
        if mine != oid:
            changed.append(path)
    deleted = [p for p in sorted(remote) if p not in files and p not in KEEP_REMOTE]
    return changed, deleted


def _remote_json(api, repo: str, branch: str, path: str) -> Optional[dict]:
    """One small JSON file of ``branch`` (None: not a JSON object)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo, path, revision=branch, endpoint=api.endpoint)
    response = get_session().get(url, headers=build_hf_headers(token=api.token, library_name="evolm-nemo"),
                                 follow_redirects=True)
    hf_raise_for_status(response)
    try:
        data = json.loads(response.content)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _taken(api, repo: str, branch: str, key: str, mine) -> Optional[str]:
    """Why ``branch`` of ``repo`` is not this release's to replace, or None. It is when the repo or branch does not
    exist, holds only the Hub's own files, or holds this release's marker: a model's ``evolm_export.json`` with
    this run's id (``mine``: the run id), an index's ``models.json`` of this suite whose models share ids with
    this one's (``mine``: (suite name, {node: run id}))."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:  # one request, no retries: an unreachable endpoint is one line at once
        info = api.model_info(repo, revision=branch)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None
    theirs = sorted(s.rfilename for s in info.siblings or [] if s.rfilename not in KEEP_REMOTE)
    if not theirs:
        return None
    marker = "models.json" if key == "index_repo" else "evolm_export.json"
    foreign = f"{repo}@{branch} holds files no evolm release put there ({', '.join(theirs[:3])}" + \
              (", ..." if len(theirs) > 3 else "") + ")"
    record = _remote_json(api, repo, branch, marker) if marker in theirs else None
    if record is None:
        return foreign
    if key == "index_repo":
        suite, ids = mine
        if record.get("suite") != suite:
            return f"{repo}@{branch} holds the index of suite {record.get('suite')!r}, not {suite!r}"
        for entry in record.get("models") or []:
            node, run_id = (entry.get("node"), entry.get("run_id")) if isinstance(entry, dict) else (None, None)
            if run_id and ids.get(node) and run_id != ids[node]:
                return (f"{repo}@{branch} holds the index of another launch of suite {suite!r} (its node {node} is "
                        f"run {run_id}, this one's is run {ids[node]})")
        return None
    run_id = record.get("run_id")
    if run_id and mine and run_id != mine:
        return (f"{repo}@{branch} holds the release of another run (run {run_id}, exported from "
                f"{record.get('source')}; this is run {mine})")
    return None


def check_owners(api, plan: Plan) -> None:
    """Before any export or upload: every branch the release would write is new, empty or this release's own --
    a second run (or suite launch) released to the same repo would otherwise replace the first's files."""
    checks = [(m.repo, r.branch, "repo", m.meta.get("run_id")) for m in plan.models for r in m.revisions]
    if plan.index:
        checks.append((plan.index[0], "main", "index_repo",
                       (plan.suite.name, {m.node: m.meta.get("run_id") for m in plan.table})))
    for repo, branch, key, mine in checks:
        with hub_errors(repo, branch):
            why = _taken(api, repo, branch, key, mine)
        if why:
            raise ConfigError(key, f"{why}: choose another {key}=, or overwrite=true to replace it")


def push(api, repo: str, branch: str, folder: Path, message: str) -> tuple[int, int, int]:
    """Bring ``branch`` of ``repo`` to ``folder``'s files. Returns (uploaded, deleted, unchanged)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = local_files(folder)
    remote = _remote(api, repo, branch)
    if remote is None:
        api.create_branch(repo, branch=branch, exist_ok=True)
        remote = _remote(api, repo, branch) or {}
    changed, deleted = _changes(files, remote)
    if changed or deleted:
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(files[p])) for p in changed]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deleted]
        api.create_commit(repo, operations=ops, commit_message=f"{message}: {branch}", revision=branch)
    return len(changed), len(deleted), len(files) - len(changed)


# ----------------------------------------------------------------------------------------------------------- command

def _print_plan(plan: Plan, cfg, staged: bool) -> None:
    vis = "private" if cfg.private else "public"
    for m in plan.models:
        parent = m.parents[0].get("repo") or m.parents[0].get("run") if m.parents else None
        print(f"repo {m.repo} ({vis}; {m.node}: {m.meta.get('stage')}, parent {parent or '-'})")
        for rev in m.revisions:
            print(f"  branch {rev.branch} <- {rev.checkpoint}")
            if staged or _reusable(m, rev, cfg):
                for path, p in local_files(rev.dir).items():
                    print(f"    {path}  {p.stat().st_size:,} B  sha256 {_sha256_file(p)[:16]}")
            else:
                for name in predicted_files(rev, cfg):
                    print(f"    {name}  (to export)")
    for node, why in plan.skipped:
        print(f"skip {node}: {why}")
    if plan.index:
        repo, where = plan.index
        print(f"repo {repo} ({vis}; index card of suite {plan.suite.name})")
        print("  branch main <- " + str(where))
        for name in ("README.md", "models.json", "suite.yaml"):
            print(f"    {name}")


def run(cfg) -> int:
    if bool(cfg.src) == bool(cfg.suite):
        raise ConfigError("src", "set exactly one of src=<run dir> (one run) or suite=<name> (a suite's finished "
                                 "models)")
    from evolm_nemo.conversion.export import parse_dtype
    from evolm_nemo.conversion import hf

    parse_dtype(cfg.dtype)
    hf.parse_size(cfg.max_shard_size)
    plan = _one_run(cfg) if cfg.src else _suite(cfg)
    n_rev = sum(len(m.revisions) for m in plan.models)
    if cfg.dry_run:
        _print_plan(plan, cfg, staged=False)
        print(f"dry run: {len(plan.models)} model repo(s), {n_rev} revision(s)"
              + (", 1 index repo" if plan.index else "") + (f"; {len(plan.skipped)} node(s) not finished"
                                                            if plan.skipped else "") + "; nothing pushed")
        return 0
    if not plan.models:
        raise ConfigError("suite", f"no finished model in suite {plan.suite.name} under {plan.suite.root} "
                                   f"({len(plan.skipped)} train node(s) not finished)")
    token = hub_token()
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="evolm-nemo")
    if not cfg.overwrite:
        check_owners(api, plan)
    for m in plan.models:
        stage(m, cfg)
    if plan.index:
        stage_index(plan)
    _print_plan(plan, cfg, staged=True)

    totals = [0, 0, 0]
    targets = [(m.repo, r.branch, r.dir) for m in plan.models for r in m.revisions]
    if plan.index:
        targets.append((plan.index[0], "main", plan.index[1]))
    created = set()
    for repo, branch, folder in targets:
        with hub_errors(repo, branch):
            if repo not in created:
                api.create_repo(repo, private=cfg.private, exist_ok=True, repo_type="model")
                created.add(repo)
            up, gone, same = push(api, repo, branch, folder, cfg.message)
        print(f"{repo}@{branch}: {up} uploaded, {gone} deleted, {same} unchanged")
        totals = [totals[0] + up, totals[1] + gone, totals[2] + same]
    print(f"released {len(created)} repo(s), {len(targets)} revision(s): {totals[0]} file(s) uploaded, "
          f"{totals[1]} deleted, {totals[2]} unchanged")
    return 0


STRINGS = ("src", "suite", "root", "repo", "org", "index_repo", "out", "dtype", "max_shard_size", "message")


def settings(overrides: list[str]):
    """``recipes/release.yaml`` with the command line's ``key=value`` items on top (parsed here, not by Hydra: the
    ``suite`` key would name Hydra's recipes/suite/ group). Patterns and names stay text (``{org}/x`` is no YAML
    mapping)."""
    import dataclasses

    import yaml

    from evolm_nemo.config.compose import recipes_dir
    from evolm_nemo.conversion.config import ReleaseConfig
    from evolm_nemo.suite.spec import parse_overrides

    names = [f.name for f in dataclasses.fields(ReleaseConfig)]
    values = yaml.safe_load((recipes_dir() / "release.yaml").read_text(encoding="utf-8")) or {}
    parsed = parse_overrides(overrides, dict.fromkeys(names))
    raw = {k.strip().lstrip("+"): v for k, _, v in (o.partition("=") for o in overrides)}
    for key, value in parsed.items():
        values[key] = raw[key] if key in STRINGS and value is not None and raw[key] not in ("null", "~") else value
    if values.get("only") is not None:
        only = values["only"]
        values["only"] = [str(v) for v in (only if isinstance(only, list) else [only])]
    try:
        values["verify_tol"] = float(values["verify_tol"])
    except (TypeError, ValueError):
        raise ConfigError("verify_tol", f"expected a number, got {values['verify_tol']!r}") from None
    if not (math.isfinite(values["verify_tol"]) and values["verify_tol"] > 0):  # NaN would pass any export
        raise ConfigError("verify_tol", f"must be a finite number > 0, got {values['verify_tol']!r}")
    if values.get("out") is not None and Path(str(values["out"])).expanduser().is_file():
        raise ConfigError("out", f"{values['out']} is a file; the staging root is a directory")
    for key in ("revisions", "private", "dry_run", "overwrite"):
        if not isinstance(values.get(key), bool):
            raise ConfigError(key, f"must be true or false; got {values.get(key)!r}")
    return ReleaseConfig(**{k: v for k, v in values.items() if k in names})


def main(overrides: list[str]) -> int:
    return run(settings(overrides))
