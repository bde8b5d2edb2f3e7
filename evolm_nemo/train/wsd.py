"""WSD (warmup-stable-decay) schedules and cooldown branches: one stable run gives a fully decayed model at every
budget.

``optim.decay_style=wsd`` on a run of ``N`` iterations: linear warmup over ``W`` iterations (``optim.warmup_iters``,
else ``warmup_fraction * N``), the peak ``optim.lr`` until ``N - D``, then a decay to ``optim.min_lr`` over the last
``D = round(optim.wsd_decay_fraction * N)`` iterations, shaped ``linear``, ``cosine`` or ``1-sqrt``. It is
megatron-core's ``OptimizerParamScheduler`` WSD style (``lr_decay_steps=N``, ``wsd_decay_steps=D``). With ``k`` the
scheduler's step count (the rate step ``k + 1`` uses) and ``r = (k - (N - D)) / D`` in the decay::

    lr(k) = min_lr + (lr - min_lr) * c(r),   c = 1 - r | (1 + cos(pi r)) / 2 | 1 - sqrt(r)

so ``lr(N) = min_lr`` once the last step is taken.

A **stable run** lists ``train.branch_budgets`` (e.g. 20B, 40B, 80B, 160B, each at most its own budget): at the
iteration where each budget's cooldown would start, ``S_B = N_B - round(f * N_B)``, it also commits a checkpoint (with
optimizer state and scheduler position) under ``<run>/branches/``, which keep-last never prunes. A **branch**
(``train.branch_from=<stable run>``, ``train.tokens=B``, ``optim.decay_style=wsd``) is a new run directory that loads
that checkpoint's weights and optimizer state, continues at iteration ``S_B`` (the data order is a function of the
iteration, the dataset is built at the stable run's size, so it sees what the stable run saw next) and decays over
``N_B - S_B`` iterations. Its model has seen exactly ``B`` tokens, ``S_B`` of its steps shared with the stable run;
the stable run's own tail is the branch of its own budget. ``python -m evolm_nemo.train.wsd`` prints the compute of
branches vs separate cosine runs for a grid.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from evolm_nemo.config import RootConfig, compose
from evolm_nemo.config.compose import recipes_dir
from evolm_nemo.config.errors import ConfigError, print_error
from evolm_nemo.config.schedule import branch_iteration, decay_iters, warmup_iters
from evolm_nemo.config.tokens import format_tokens, iterations_for, parse_tokens
from evolm_nemo.config.validate import SHAPE_KEYS

SHAPES = {"linear": "linear", "cosine": "cosine", "1-sqrt": "minus_sqrt"}  # ours -> megatron's lr_wsd_decay_style
BRANCHES = "branches"  # <run>/branches/iter_N: the stable run's branch points (never pruned)


def scheduler_kwargs(o, iters: int, warmup: int | None = None) -> dict:
    """Keyword arguments for megatron's OptimizerParamScheduler (lr part) for a run of ``iters`` iterations."""
    warmup = warmup_iters(o, iters) if warmup is None else warmup
    kwargs = dict(init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
                  lr_decay_steps=max(iters, warmup + 1))
    if o.decay_style == "wsd":
        kwargs.update(lr_decay_style="WSD", wsd_decay_steps=decay_iters(o, iters),
                      lr_wsd_decay_style=SHAPES[o.wsd_decay_shape])
    else:
        kwargs.update(lr_decay_style=o.decay_style)
    return kwargs


def budget_iters(cfg, budget, key: str = "train.branch_budgets") -> int:
    return iterations_for(parse_tokens(budget, key), cfg.parallel.global_batch_size, cfg.model.seq_length)


def branch_saves(cfg, iters: int) -> dict[int, str]:
    """Stable run: {iteration: budget} where each of ``train.branch_budgets`` starts its cooldown."""
    out = {}
    for budget in cfg.train.branch_budgets or []:
        n = budget_iters(cfg, budget)
        out[branch_iteration(cfg.optim, n)] = str(budget)
    return out


def check_stable(cfg, iters: int) -> None:
    """``train.branch_budgets`` of a stable run: WSD, each budget at most the run's own, each branch point after the
    warmup and before the run's own cooldown."""
    o, t = cfg.optim, cfg.train
    if not t.branch_budgets:
        return
    if o.decay_style != "wsd":
        raise ConfigError("train.branch_budgets", f"branches need optim.decay_style=wsd (got {o.decay_style}): the "
                                                  "stable run's rate must still be at its peak where they start")
    warm, own = warmup_iters(o, iters), branch_iteration(o, iters)
    for budget in t.branch_budgets:
        n = budget_iters(cfg, budget)
        s = branch_iteration(o, n)
        if n > iters:
            raise ConfigError("train.branch_budgets", f"{budget} = {n:,} iterations is more than this run's {iters:,}; "
                                                      "list budgets up to the run's own")
        if s <= warm:
            raise ConfigError("train.branch_budgets", f"{budget}'s cooldown would start at iteration {s:,}, inside "
                                                      f"the {warm:,}-iteration warmup; lower optim.warmup_iters or "
                                                      "drop the budget")
        if s > own:
            raise ConfigError("train.branch_budgets", f"{budget}'s cooldown would start at iteration {s:,}, after "
                                                      f"this run's own cooldown starts ({own:,})")


@dataclass(frozen=True)
class BranchPoint:
    path: Path  # the stable run's checkpoint at the cooldown start
    iteration: int  # S: stable steps shared with the stable run
    meta: dict  # its evolm.json
    warmup: int  # the stable run's warmup iterations (the branch keeps them)
    stable_iters: int  # the stable run's planned iterations (its dataset was built for them)


def _stable_optim(meta: dict) -> dict:
    return ((meta.get("config") or {}).get("optim") or {})


def resolve_branch(cfg, iters: int) -> BranchPoint:
    """Cheap (evolm.json only): the stable checkpoint a branch of ``iters`` iterations starts from, or ConfigError."""
    from types import SimpleNamespace

    from evolm_nemo.checkpoint import io as ckpt

    o, t = cfg.optim, cfg.train
    key = "train.branch_from"
    if o.decay_style != "wsd":
        raise ConfigError("optim.decay_style", f"a branch (train.branch_from) decays with wsd; got {o.decay_style}")
    if t.init_from:
        raise ConfigError(key, "set either train.branch_from (weights + optimizer state + step count of a stable "
                               "run) or train.init_from (weights only), not both")
    s = branch_iteration(o, iters)
    src = Path(t.branch_from)
    if not src.exists():
        raise ConfigError(key, f"no stable run or checkpoint at {src}; train the stable run first (its branch "
                               "points appear under <run>/branches/ as it passes them)")
    name = f"iter_{s:07d}"
    if (src / ckpt.META).exists():
        found = src
    else:
        found = next((c for c in (src / BRANCHES / name, src / "checkpoints" / name) if (c / ckpt.META).exists()),
                     None)
    if found is None:
        have = sorted({p.name for root in (src / BRANCHES, src / "checkpoints")
                       for p in ckpt.checkpoint_dirs(root) if ckpt.is_complete(p)})
        raise ConfigError(key, f"a branch of {iters:,} iterations with optim.wsd_decay_fraction={o.wsd_decay_fraction}"
                               f" starts at iteration {s:,}, but {src} has no committed checkpoint there (it has: "
                               f"{', '.join(have) or 'none'}); list this budget in the stable run's "
                               "train.branch_budgets, or pick the budget / fraction of a saved one")
    why = ckpt.problem(found)
    if why is not None:
        raise ConfigError(key, f"{found}: {why}")
    meta = json.loads((found / ckpt.META).read_text())
    run = ckpt.owner(found.parent)
    if run and meta.get("run_id") and meta["run_id"] != run:
        raise ConfigError(key, f"{found} was written by run {meta['run_id']}, an earlier run in "
                               f"{found.parent.parent} (now run {run}); branch off a checkpoint of the current run")
    if int(meta.get("iteration", -1)) != s:
        raise ConfigError(key, f"{found} is at iteration {meta.get('iteration')}; a branch of {iters:,} iterations "
                               f"with optim.wsd_decay_fraction={o.wsd_decay_fraction} starts at {s:,}")
    if not meta.get("has_optimizer"):
        raise ConfigError(key, f"{found} has no optimizer state; a branch continues the stable run's optimizer")
    theirs = meta.get("model") or {}
    for k in SHAPE_KEYS + ("seq_length",):
        if k in theirs and theirs[k] != getattr(cfg.model, k):
            raise ConfigError(f"model.{k}", f"{getattr(cfg.model, k)} differs from the stable run's {theirs[k]} "
                                            f"({found}); a branch continues that model")
    stable_cfg = meta.get("config") or {}
    gbs = ((stable_cfg.get("parallel") or {}).get("global_batch_size"))
    if gbs is not None and gbs != cfg.parallel.global_batch_size:
        raise ConfigError("parallel.global_batch_size", f"{cfg.parallel.global_batch_size} differs from the stable "
                                                        f"run's {gbs}; a branch's steps must be the stable run's steps")
    so = _stable_optim(meta)
    for k in ("lr", "min_lr"):
        if k in so and float(so[k]) != float(getattr(o, k)):
            raise ConfigError(f"optim.{k}", f"{getattr(o, k)} differs from the stable run's {so[k]} ({found}); a "
                                            "branch decays from the stable run's peak to its floor")
    stable_iters = int(meta.get("planned_iters") or s)
    warm = warmup_iters(SimpleNamespace(warmup_iters=so.get("warmup_iters"),
                                        warmup_fraction=so.get("warmup_fraction", o.warmup_fraction)), stable_iters)
    if so.get("decay_style") not in ("wsd", "constant", None):
        raise ConfigError(key, f"{found} is from a {so.get('decay_style')} run: its rate already decays; branch off a "
                               "wsd (or constant) stable run")
    if so.get("decay_style") == "wsd":
        stable_decay_start = stable_iters - max(1, int(round(float(so.get("wsd_decay_fraction", 0.2)) * stable_iters)))
        if s > stable_decay_start:
            raise ConfigError(key, f"{found} (iteration {s:,}) is inside the stable run's own cooldown (from "
                                   f"{stable_decay_start:,}); branch from a stable-phase checkpoint")
    if s <= warm:
        raise ConfigError(key, f"the branch would start at iteration {s:,}, inside the stable run's {warm:,}-iteration "
                               "warmup; give it a larger budget or a smaller optim.wsd_decay_fraction")
    if s >= iters:
        raise ConfigError("train.iters", f"{iters} iterations leave no cooldown after the branch point {s}")
    return BranchPoint(found, s, meta, warm, stable_iters)


def branch_lineage(cfg, point: BranchPoint, record: dict) -> dict:
    """A branch's lineage: the stable run's ancestry, then this stage (its budget, not the stable run's), and where
    it branched off."""
    stable = point.meta.get("lineage") or {}
    prior = list(stable.get("stages", []))[:-1]
    o = cfg.optim
    return {"stages": prior + [{"stage": cfg.stage, "model": cfg.model.name, **record, "schedule": "wsd",
                                "stable_steps": point.iteration}],
            "parent": stable.get("parent"),
            "branch": {"from": str(point.path), "iteration": point.iteration, "stable_run_id": point.meta.get("run_id"),
                       "stable_iters": point.stable_iters, "warmup_iters": point.warmup,
                       "decay_fraction": o.wsd_decay_fraction, "decay_shape": o.wsd_decay_shape},
            **{k: v for k, v in (cfg.lineage or {}).items() if k not in ("stages", "parent", "branch")}}


# ----------------------------------------------------------------------------------------------------------- plan

EVOLM_1B_BUDGETS = ("20B", "40B", "80B", "160B", "320B")


def plan(budgets, tokens_per_iter: int, decay_fraction: float, flops_per_token: float | None = None) -> dict:
    """Compute of fully decayed models at every budget: separate cosine runs (EvoLM) vs one WSD stable run to the
    largest budget (which decays itself) plus a cooldown branch per smaller budget. Iterations, tokens and (given
    ``flops_per_token``) training FLOPs."""
    from types import SimpleNamespace

    o = SimpleNamespace(wsd_decay_fraction=decay_fraction)
    rows = []
    pairs = sorted(((iterations_for(parse_tokens(b, "budgets"), tokens_per_iter, 1), str(b)) for b in budgets))
    largest = pairs[-1][0]
    for n, b in pairs:
        d = decay_iters(o, n)
        rows.append({"budget": b, "iters": n, "branch_at": n - d, "cooldown_iters": d,
                     "new_iters": n if n == largest else d, "cosine_iters": n})
    wsd = sum(r["new_iters"] for r in rows)
    cosine = sum(r["cosine_iters"] for r in rows)
    out = {"rows": rows, "wsd_iters": wsd, "cosine_iters": cosine, "ratio": wsd / cosine,
           "tokens_per_iter": tokens_per_iter, "decay_fraction": decay_fraction,
           "wsd_tokens": wsd * tokens_per_iter, "cosine_tokens": cosine * tokens_per_iter}
    if flops_per_token:
        out["wsd_flops"] = out["wsd_tokens"] * flops_per_token
        out["cosine_flops"] = out["cosine_tokens"] * flops_per_token
    return out


def format_plan(p: dict) -> str:
    tpi = p["tokens_per_iter"]
    lines = [f"WSD branches vs separate cosine runs ({tpi:,} tokens/iter, cooldown {p['decay_fraction']:.0%} of each "
             "budget)", f"{'budget':>8} {'iters':>9} {'branch at':>10} {'cooldown':>9} {'new (wsd)':>10} "
                        f"{'cosine':>9}"]
    for r in p["rows"]:
        lines.append(f"{r['budget']:>8} {r['iters']:>9,} {r['branch_at']:>10,} {r['cooldown_iters']:>9,} "
                     f"{r['new_iters']:>10,} {r['cosine_iters']:>9,}")
    lines.append(f"{'total':>8} {'':>9} {'':>10} {'':>9} {p['wsd_iters']:>10,} {p['cosine_iters']:>9,}")
    extra = ""
    if "wsd_flops" in p:
        extra = f"; {p['wsd_flops']:.3g} vs {p['cosine_flops']:.3g} training FLOPs"
    lines.append(f"WSD: {format_tokens(p['wsd_tokens'])} tokens, cosine runs: {format_tokens(p['cosine_tokens'])} "
                 f"tokens = {p['ratio']:.1%} of the compute{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m evolm_nemo.train.wsd [model=evolm_1b] [budgets=20B,40B,...] [fraction=0.2]``: the plan for EvoLM's
    1B grid by default (the model's parallel recipe: global batch 512 x 2048 tokens for 1B)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(args) - {"model", "budgets", "fraction", "global_batch_size"}
    if unknown or any("=" not in a for a in argv):
        print(f"error: {sorted(unknown) or argv}: expected model=, budgets=, fraction=, global_batch_size=",
              file=sys.stderr)
        return 2
    from evolm_nemo.model.build import flops_per_token

    model = args.get("model", "evolm_1b")
    try:
        parallel = model if (recipes_dir() / "parallel" / f"{model}.yaml").is_file() else "evolm_1b"
        cfg = compose("config", [f"model={model}", f"parallel={parallel}"], RootConfig)
        gbs = int(args.get("global_batch_size", cfg.parallel.global_batch_size))
        budgets = [b for b in args.get("budgets", ",".join(EVOLM_1B_BUDGETS)).split(",") if b]
        fraction = float(args.get("fraction", 0.2))
        if not 0 < fraction < 1:
            raise ConfigError("fraction", f"must be in (0, 1), got {fraction}")
        table = plan(budgets, gbs * cfg.model.seq_length, fraction, flops_per_token(cfg.model))
        print(f"model {cfg.model.name}: {format_plan(table)}")
    except (ConfigError, ValueError) as exc:
        key, msg = (exc.key, exc.message) if isinstance(exc, ConfigError) else ("args", str(exc))
        print_error(key, msg)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
