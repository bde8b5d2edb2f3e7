"""`evolm suite plan suite=<name>`: one row per run of a suite -- stage, parent, model, tokens or samples,
iterations, FLOPs, estimated H100 GPU-hours at a stated MFU, checkpoint size, nodes asked for -- with totals and the
DAG in topological order, as Markdown and CSV.

The arithmetic is the trainer's own: every train node's recipe is composed with Hydra exactly as `evolm train`
composes it (``experiment=<name>`` + the suite's derived overrides), pretraining / CPT iterations come from
``config.validate`` (the function `evolm train` calls before it builds anything), fine-tuning iterations from
``stages.base.epoch_iters``, FLOPs per token from ``model.build.flops_per_token`` and parameter counts from
``model.build.param_count``. What cannot be known without the data is said in the row's notes:

* SFT / RM / DPO / RL sizes come from the suite (``samples:`` -- EvoLM's 100K, 30K/70K allocations, ...) or the
  recipe (the demo's generated sets), not from a prepared dataset, which may hold fewer after filtering;
* tokens per fine-tuning example are an upper bound unless ``tokens_per_example`` is given: ``model.seq_length``
  for SFT/RM/DPO (microbatches are padded to their longest example, at most the context), ``rl.max_prompt_tokens +
  rl.max_response_tokens`` for RL rollouts;
* RL FLOPs count, per sample token, the rollout forward, the log-prob (and value) recompute, a reference forward
  when a KL is on, and ``rl.ppo_epochs`` training passes of the actor (and critic): a forward is 1/3 of
  ``flops_per_token``; decoding with a KV cache is counted as a forward;
* evaluation FLOPs are a bound: every problem of the suites x (n + greedy) sequences x ``max_model_len`` tokens x a
  forward; decoding runs far below the training MFU, so its GPU-hours are the least reliable figure here.

GPU-hours = FLOPs / (mfu x 989 TFLOP/s, the H100's dense bf16 peak in train/metrics.py) / 3600.
Checkpoint size (one committed checkpoint): parameters x (weight bytes + optimizer bytes): bf16 weights (2) with
fp32 main params + Adam moments (12), or fp32 weights (4) + moments (8, no separate main copy) -- measured on the
tiny model: predicted 1,896,192 bytes; its .distcp files hold 1,986,707, the whole directory 2,058,633 (metadata,
RNG; tests/suite/test_launch.py holds the ratio within 1.0-1.15). PPO adds the critic's checkpoint; exports are
the weights alone in the stored dtype.
"""

from __future__ import annotations

import copy
import csv
import io
import re
from dataclasses import dataclass, field
from typing import Optional

from evolm_nemo.config import RootConfig, compose
from evolm_nemo.config.compose import compose_command
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.tokens import format_tokens
from evolm_nemo.config.validate import validate
from evolm_nemo.evaluation import tasks as registry
from evolm_nemo.evaluation.evaluate import (DownstreamConfig, UpstreamConfig, check_settings, resolve_model_len,
                                            upstream_settings)
from evolm_nemo.model.build import flops_per_token, param_count
from evolm_nemo.stages import kind, plan_run, rl_split, sequences_per_unit, synthetic_size
from evolm_nemo.stages.base import epoch_iters
from evolm_nemo.suite.spec import Node, Suite
from evolm_nemo.train.metrics import _PEAK_TFLOPS

H100 = "H100"


@dataclass
class Row:
    index: int
    node: str
    kind: str
    stage: str  # pretrain | cpt | sft | ppo | grpo | rm | dpo | export | eval-downstream | eval-upstream | data
    parent: Optional[str]
    needs: list[str]
    model: str = ""
    params: int = 0
    tokens: Optional[int] = None  # tokens trained on (pretrain/cpt: exact; others: bound/estimate)
    samples: Optional[int] = None  # examples / prompts / pairs in the dataset (fine-tuning, RL)
    epochs: Optional[int] = None
    iters: Optional[int] = None
    flops: float = 0.0
    gpu_hours: float = 0.0
    ckpt_bytes: int = 0
    nodes: int = 1
    gpus: int = 1
    notes: list[str] = field(default_factory=list)
    cfg: object = None  # the composed RootConfig (train nodes)
    overrides: list[str] = field(default_factory=list)  # what `evolm train` / export / eval gets
    meta: dict = field(default_factory=dict)  # size / pretrain_tokens / stage / group for the eval results

    @property
    def data(self) -> str:
        unit = kind(self.stage).unit if self.kind == "train" else "problems" if self.kind == "eval" else "examples"
        if unit == "tokens":
            return f"{format_tokens(self.tokens)} tokens"
        if self.samples is not None:
            ep = f" x {self.epochs} ep" if self.epochs else ""
            return f"{format_tokens(self.samples)} {unit}{ep}"
        return ""


@dataclass
class SuitePlan:
    """A suite's DAG as rows in topological order (not config.validate's Plan, the iteration plan of one run)."""

    suite: Suite
    rows: list[Row]
    peak_tflops: float

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.node == name)

    @property
    def totals(self) -> dict:
        return {"runs": len(self.rows),
                "train": sum(r.kind == "train" for r in self.rows),
                "flops": sum(r.flops for r in self.rows),
                "gpu_hours": sum(r.gpu_hours for r in self.rows),
                "ckpt_bytes": sum(r.ckpt_bytes for r in self.rows),
                "node_hours": sum(r.gpu_hours / max(r.gpus, 1) for r in self.rows)}


def peak_tflops(device: str = H100) -> float:
    return _PEAK_TFLOPS[device]


def checkpoint_bytes(params: int, precision: str, distributed: bool) -> int:
    """One committed checkpoint: weights + optimizer state (see the module docstring)."""
    bf16 = precision != "fp32"
    weights = 2 if bf16 else 4
    optimizer = 8 + (4 if (bf16 or distributed) else 0)
    return params * (weights + optimizer)


def value_params(m) -> int:
    """A value/reward model: the LM without its output layer, plus a scalar head (hidden -> 1)."""
    return param_count(m) - m.vocab_size * m.hidden_size + m.hidden_size


def size_label(model_name: str) -> str:
    m = re.search(r"(\d+(?:\.\d+)?)b$", model_name, re.IGNORECASE)
    return f"{m.group(1)}B" if m else model_name


def _dedupe(items: list[str]) -> list[str]:
    """key=value items, the last value of a key winning, in first-seen order (Hydra refuses a key twice)."""
    seen: dict[str, str] = {}
    for item in items:
        key = item.partition("=")[0].lstrip("+")
        seen.pop(key, None)
        seen[key] = item
    return list(seen.values())


def train_overrides(suite: Suite, node: Node) -> list[str]:
    key = f"nodes.{node.name}.overrides"
    derived = [f"experiment={node.experiment}", f"run.name={node.name}", f"run.out_dir={suite.out(node.name)}",
               f"logger.suite={suite.name}", f"logger.node={node.name}"]  # the DAG for W&B / MLflow (when on)
    if node.parent:
        derived += [f"train.init_from={suite.out(node.parent)}/checkpoints", f"logger.parent={node.parent}"]
    extra = [suite.expand(o, "train_overrides") for o in suite.train_overrides]
    extra += [suite.expand(o, key) for o in node.overrides]
    return _dedupe(derived + extra)


def _compose_train(suite: Suite, node: Node):
    try:
        return compose("config", train_overrides(suite, node), RootConfig)
    except ConfigError as exc:
        raise ConfigError(f"nodes.{node.name}", f"{exc.key}: {exc.message}") from None


def _check_layout(cfg, world: int, node: Node):
    """The recipe's rules at the node's world size (``config.validate``: model shape, tp/pp/sp, batch divisibility,
    optimizer keys) and, for a stage trained by tokens, its plan on a copy without data and parent (those are checked
    when the job starts): the Plan (its iteration count is the trainer's), None for the other stages."""
    budget = kind(cfg.stage).budget
    c = copy.deepcopy(cfg)
    c.train.init_from = None
    c.data.source, c.data.paths, c.data.weights, c.data.synthetic_kinds = "synthetic", [], None, ["text"]
    c.data.synthetic_docs = max(c.data.synthetic_docs, 1)  # a stand-in corpus (indexed presets leave it 0)
    if c.data.val_paths:  # held-out files, like the training data, are checked when the job starts
        c.data.val_paths, c.data.synthetic_val_docs = [], 1
    c.train.branch_from = None  # so is a WSD branch's stable run (its budget is the branch's own)
    try:
        if budget != "tokens":  # RL batches are rl.* sizes; their rules are checked below
            validate(c, world_size=world, global_batches=budget != "prompts")
            return None
        return plan_run(c, world_size=world, parent_checked=True)  # the node names it (_train_row checks)
    except ConfigError as exc:
        raise ConfigError(f"nodes.{node.name}", f"{exc.key}: {exc.message} (at {node.nodes} node(s) x "
                                                f"{world // node.nodes} GPUs)") from None


def _samples(cfg, node: Node, row: Row) -> int:
    if node.samples is not None:
        row.notes.append("size from the suite")
        return node.samples
    size = synthetic_size(cfg) if cfg.data.source == "synthetic" else None
    if size is not None:
        row.notes.append("size: the demo's RL set" if kind(cfg.stage).unit == "prompts" else
                         "size: sft.synthetic_examples")
        return size
    raise ConfigError(f"nodes.{node.name}.samples", f"stage={cfg.stage}: the plan needs the dataset's size "
                                                    "(examples, prompts or pairs), e.g. samples: 100K")


def _train_row(suite: Suite, node: Node, row: Row, rows: dict[str, Row]) -> None:
    cfg = _compose_train(suite, node)
    row.cfg, row.overrides = cfg, train_overrides(suite, node)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    row.stage, row.model = cfg.stage, m.name
    row.params = param_count(m)
    parent = rows.get(node.parent) if node.parent else None
    explicit_parent = any(o.startswith("train.init_from=") for o in node.overrides)
    k = kind(cfg.stage)
    if k.from_parent and parent is None and not explicit_parent:
        raise ConfigError(f"nodes.{node.name}.parent", f"stage={cfg.stage} starts from a parent run: name its node "
                                                       "(or set train.init_from in overrides)")
    if parent is not None and parent.kind != "train":
        raise ConfigError(f"nodes.{node.name}.parent", f"{node.parent} is a {parent.kind} node; a training starts "
                                                       "from a train node's checkpoints")
    if parent is not None and parent.model != m.name:
        raise ConfigError(f"nodes.{node.name}.parent", f"{node.parent} trains {parent.model}, this recipe "
                                                       f"{m.name}; pick the parent's model preset")
    row.gpus = node.gpus or suite.gpus_per_node
    world = node.nodes * row.gpus
    vplan = _check_layout(cfg, world, node)
    fpt = flops_per_token(m)
    fwd = fpt / 3.0
    precision = "fp32" if t.precision == "fp32" else "bf16"  # auto is bf16 on the GPUs this plans for
    row.ckpt_bytes = checkpoint_bytes(row.params, precision, cfg.optim.distributed)
    if k.budget == "tokens":
        row.iters = vplan.iters
        row.tokens = vplan.iters * vplan.tokens_per_iter
        row.flops = row.tokens * fpt
    elif k.budget == "epochs":
        n = _samples(cfg, node, row)
        row.samples, row.epochs = n, t.epochs
        try:
            row.iters = epoch_iters(cfg, n, k.unit)
        except ConfigError as exc:
            raise ConfigError(f"nodes.{node.name}", f"{exc.key}: {exc.message}") from None
        tpe = node.tokens_per_example or m.seq_length
        if not node.tokens_per_example:
            row.notes.append(f"<= {tpe} tokens/example")
        units = row.iters * p.global_batch_size
        row.tokens = units * sequences_per_unit(cfg) * tpe
        row.flops = row.tokens * fpt
        if k.reference_pass:  # the frozen reference's log-probs, once over the data before the first step
            row.flops += n * 2 * tpe * fwd
        if k.head == "value":
            row.params = value_params(m)
            row.ckpt_bytes = checkpoint_bytes(row.params, precision, cfg.optim.distributed)
    else:  # RL: steps over prompts
        r = cfg.rl
        from evolm_nemo.stages.rl import check_ranges as rl_ranges

        try:
            rl_ranges(cfg)  # what the trainer refuses before it builds anything
        except ConfigError as exc:
            raise ConfigError(f"nodes.{node.name}", f"{exc.key}: {exc.message}") from None
        n = _samples(cfg, node, row)
        row.samples, row.epochs = n, t.epochs
        dp = world // (p.tp * p.pp)
        if (split := rl_split(cfg, dp)) is not None:  # the trainer's own rule
            raise ConfigError(f"nodes.{node.name}", f"{split[0]}: {split[1]}")
        iters = None  # the same arithmetic as stages.rl.plan_iters, over the suite's prompt count
        if t.epochs is not None:
            iters = n * t.epochs // r.prompts_per_step
        if t.iters is not None:
            iters = t.iters if iters is None else min(iters, t.iters)
        if not iters:
            raise ConfigError(f"nodes.{node.name}.samples", f"{n} prompts x {t.epochs} epochs is less than one "
                                                            f"step of rl.prompts_per_step={r.prompts_per_step}")
        row.iters = iters
        tpe = node.tokens_per_example or (r.max_prompt_tokens + r.max_response_tokens)
        if not node.tokens_per_example:
            row.notes.append(f"<= {tpe} tokens/sample")
        row.tokens = iters * r.prompts_per_step * r.samples_per_prompt * tpe
        critic = k.critic
        passes = r.ppo_epochs * (fpt * (2 if critic else 1))
        forwards = fwd * (2 + (1 if critic else 0) + (1 if r.kl != "off" else 0))
        row.flops = row.tokens * (passes + forwards)
        if critic:
            row.ckpt_bytes += checkpoint_bytes(value_params(m), precision, cfg.optim.distributed)
    # identity of what this run produces, for evaluation results and reports
    pre_tokens = row.tokens if not k.from_parent else (parent.meta.get("pretrain_tokens") if parent else None)
    group = node.name if k.starts_group else (parent.meta.get("group") if parent else node.name)
    row.meta = {"size": size_label(m.name), "pretrain_tokens": pre_tokens, "stage": k.label, "group": group}


def _export_row(suite: Suite, node: Node, row: Row, rows: dict[str, Row]) -> None:
    parent = rows[node.parent]
    if parent.kind != "train":
        raise ConfigError(f"nodes.{node.name}.parent", f"an export reads a train node's checkpoint; {node.parent} is "
                                                       f"a {parent.kind} node")
    # the actor's parameters (checkpoints/); a PPO critic stays a training artefact
    row.stage, row.model, row.params, row.meta = "export", parent.model, parent.params, dict(parent.meta)
    fp32 = parent.cfg is not None and parent.cfg.train.precision == "fp32"
    row.ckpt_bytes = row.params * (4 if fp32 else 2)
    row.gpus = node.gpus or 1
    row.overrides = _dedupe([f"src={suite.out(node.parent)}", f"dst={suite.out(node.name)}",
                             *[suite.expand(o, f"nodes.{node.name}.overrides") for o in node.overrides]])


def _eval_row(suite: Suite, node: Node, row: Row, rows: dict[str, Row]) -> None:
    parent = rows[node.parent]
    if parent.kind != "export":
        raise ConfigError(f"nodes.{node.name}.parent", f"an evaluation reads an HF export; {node.parent} is a "
                                                       f"{parent.kind} node (add an export node between them)")
    row.stage, row.model, row.params = f"eval-{node.mode}", parent.model, parent.params
    row.gpus = node.gpus or 1
    meta = dict(parent.meta)
    items = [f"model={suite.out(node.parent)}", f"out={suite.out(node.name)}", f"name={node.parent}"]
    for k in ("size", "pretrain_tokens", "stage", "group"):
        if meta.get(k) is not None:
            items.append(f"{k}={meta[k]}")
    items += [suite.expand(o, f"nodes.{node.name}.overrides") for o in node.overrides]
    row.overrides = _dedupe(items)
    row.meta = meta
    if node.mode != "downstream":
        try:  # the evaluation's own checks of its settings, here before the training instead of after it
            upstream_settings(compose_command("eval_upstream", list(row.overrides), UpstreamConfig))
        except ConfigError as exc:
            raise ConfigError(f"nodes.{node.name}", f"{exc.key}: {exc.message}") from None
        row.notes.append("lm-eval log-likelihoods: not estimated")
        return
    try:
        ecfg = compose_command("eval_downstream", [o for o in row.overrides], DownstreamConfig)
        check_settings(ecfg)
        problems = 0
        for name in ecfg.tasks:
            size = registry.get_task(name).size
            problems += min(size, ecfg.limit) if ecfg.limit else size
    except ConfigError as exc:
        raise ConfigError(f"nodes.{node.name}", f"{exc.key}: {exc.message}") from None
    seqs = problems * (ecfg.n + (1 if ecfg.greedy else 0))
    rows_parent = rows.get(parent.parent)
    fpt, context = 0.0, None
    if rows_parent is not None and rows_parent.cfg is not None:
        fpt = flops_per_token(rows_parent.cfg.model)
        context = rows_parent.cfg.model.seq_length  # the export's max_position_embeddings
    try:  # the evaluation's own rule, here before the training instead of after it
        length = resolve_model_len(ecfg.max_model_len, context, f"{parent.parent}'s model.seq_length")
    except ConfigError as exc:
        raise ConfigError(f"nodes.{node.name}", f"{exc.key}: {exc.message}") from None
    row.samples, row.tokens = problems, seqs * length
    row.flops = row.tokens * fpt / 3.0
    row.notes.append(f"{problems:,} problems x {seqs // max(problems, 1)} seqs, <= {length} tokens")


def _data_row(suite: Suite, node: Node, row: Row, rows: dict[str, Row]) -> None:
    row.stage, row.model = f"data-{node.make}", rows[node.parent].model if node.parent else "-"
    row.overrides = [suite.expand(o, f"nodes.{node.name}.overrides") for o in node.overrides]
    row.gpus = 0
    row.notes.append("CPU step")


def build(suite: Suite, order: Optional[list[str]] = None) -> SuitePlan:
    peak = peak_tflops()
    rows: dict[str, Row] = {}
    for i, name in enumerate(order or suite.order, 1):
        node = suite.nodes[name]
        row = Row(index=i, node=name, kind=node.kind, stage=node.kind, parent=node.parent,
                  needs=[n for n in node.needs if n != node.parent], nodes=node.nodes)
        {"train": _train_row, "export": _export_row, "eval": _eval_row, "data": _data_row}[node.kind](
            suite, node, row, rows)
        row.gpu_hours = row.flops / (suite.mfu * peak * 1e12) / 3600.0
        rows[name] = row
    return SuitePlan(suite=suite, rows=list(rows.values()), peak_tflops=peak)


# ---------------------------------------------------------------------------------------------------------- output


def _num(x: float) -> str:
    return f"{x:.3g}" if x else "-"


def _hours(h: float) -> str:
    return "-" if not h else f"{h:,.1f}" if h >= 0.1 else f"{h:.2g}"


def _gb(b: int) -> str:
    return f"{b / 1e9:.3g}" if b >= 1e7 else (f"{b / 1e6:.3g} MB" if b else "-")


def markdown(plan: SuitePlan) -> str:
    s, t = plan.suite, plan.totals
    lines = [f"# Suite `{s.name}`: {t['runs']} runs ({t['train']} trainings) -- {s.path}", ""]
    if s.description:
        lines += [s.description.strip(), ""]
    lines += [f"Estimates at MFU {s.mfu:g} of an H100's {plan.peak_tflops:g} dense bf16 TFLOP/s. FLOPs: "
              "6*N*D + attention (model.build.flops_per_token); pretraining/CPT iterations from config.validate, "
              "fine-tuning iterations from stages.base.epoch_iters; fine-tuning/RL sizes from the suite or recipe "
              "and token counts as upper bounds where noted (evolm_nemo/suite/plan.py). Checkpoint: one committed "
              "checkpoint (weights + optimizer state; PPO: actor + critic) in GB; exports: HF weights.", "",
              "| # | node | stage | parent | model | data | iters | FLOPs | H100 GPU-h | ckpt GB | nodes x GPUs "
              "| notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in plan.rows:
        parent = r.parent or ""
        if r.needs:
            parent += f" (+{', '.join(r.needs)})"
        gpus = f"{r.nodes} x {r.gpus}" if r.gpus else "CPU"
        lines.append(f"| {r.index} | {r.node} | {r.stage} | {parent} | {r.model} | {r.data} | "
                     f"{f'{r.iters:,}' if r.iters else '-'} | {_num(r.flops)} | "
                     f"{_hours(r.gpu_hours)} | {_gb(r.ckpt_bytes)} | {gpus} | "
                     f"{'; '.join(r.notes)} |")
    lines += ["", f"**Totals:** {t['runs']} runs, {t['flops']:.3g} FLOPs, {_hours(t['gpu_hours'])} H100 GPU-hours "
                  f"({_hours(t['node_hours'])} node-hours), {t['ckpt_bytes'] / 1e9:,.4g} GB of final checkpoints "
                  "and exports.", "", "## DAG (topological order)", ""]
    for r in plan.rows:
        deps = [d for d in ([r.parent] if r.parent else []) + r.needs]
        lines.append(f"{r.index}. `{r.node}`" + (f" <- {', '.join(f'`{d}`' for d in deps)}" if deps else ""))
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("order", "node", "kind", "stage", "parent", "needs", "model", "params", "tokens", "samples", "epochs",
              "iterations", "flops", "gpu_hours", "checkpoint_bytes", "nodes", "gpus_per_node", "notes")


def csv_text(plan: SuitePlan) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in plan.rows:
        w.writerow([r.index, r.node, r.kind, r.stage, r.parent or "", " ".join(r.needs), r.model, r.params or "",
                    r.tokens or "", r.samples or "", r.epochs or "", r.iters or "", f"{r.flops:.6g}" if r.flops else 0,
                    f"{r.gpu_hours:.4f}", r.ckpt_bytes, r.nodes, r.gpus, "; ".join(r.notes)])
    t = plan.totals
    w.writerow(["", "TOTAL", "", "", "", "", "", "", "", "", "", "", f"{t['flops']:.6g}", f"{t['gpu_hours']:.4f}",
                t["ckpt_bytes"], "", "", f"{t['runs']} runs"])
    return buf.getvalue()
