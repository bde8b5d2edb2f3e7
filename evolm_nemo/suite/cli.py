"""`evolm suite plan|status|launch suite=<name> ...`: a suite recipe (recipes/suite/) as one plan and one launch.

    evolm suite plan suite=evolm [mfu=0.4] [format=md|csv] [out=DIR]      # table + totals + DAG; out: plan.md/.csv
    evolm suite status suite=tiny                                         # done / resume / new per node
    evolm suite launch suite=tiny executor=local                          # pending nodes, parents first, on CPU
    evolm suite launch suite=evolm executor=slurm dry_run=true [out=DIR]  # NeMo-Run's sbatch scripts, not submitted
    evolm suite report suite=evolm [out=DIR]                              # PAPER.md's tables, EvoLM's beside ours

Common keys: root= (where every node writes), only=[node,...] (those and what they depend on), mfu=,
gpus_per_node=, slurm.<key>= (container_image, container_mounts, account, partition, time, ...), local.nproc=,
logger.<key>= (wandb, mlflow, project, entity, tags, mlflow_uri, experiment: W&B / MLflow for every train node,
grouped by the suite's DAG; see README "Tracking").
"""

from __future__ import annotations

from pathlib import Path

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.fileio import write_text
from evolm_nemo.suite import report as suite_report
from evolm_nemo.suite import spec
from evolm_nemo.suite.spec import parse_overrides

COMMON = {"suite": None, "root": None, "mfu": None, "gpus_per_node": None, "only": None, "slurm": "section",
          "local": "section", "logger": "section"}
ACTIONS = {"plan": {"format": None, "out": None}, "status": {},
           "launch": {"executor": None, "dry_run": None, "out": None}}


def _load(opts: dict):
    from evolm_nemo.suite import plan as plan_mod

    suite_opts = {k: v for k, v in opts.items() if k in ("root", "mfu", "gpus_per_node") or "." in k}
    suite = spec.load(None if opts.get("suite") is None else str(opts["suite"]), suite_opts)
    order = spec.select(suite, opts.get("only"))
    return plan_mod.build(suite, order)


def report(overrides: list[str]) -> int:
    """`evolm suite report suite=<name> [root=DIR] [out=DIR]` (also `evolm report suite=<name>`)."""
    opts = spec.parse_overrides(overrides, {"suite": None, "root": None, "out": None})
    suite = spec.load(None if opts.get("suite") is None else str(opts["suite"]),
                      {"root": opts["root"]} if opts.get("root") else {})
    suite_report.write(suite, opts.get("out"))
    return 0


def main(overrides: list[str]) -> int:
    overrides = list(overrides)
    if not overrides or "=" in overrides[0]:
        raise ConfigError("suite", "usage: evolm suite plan|status|launch|report suite=<name> ... (e.g. evolm suite "
                                   "plan suite=evolm)")
    action = overrides.pop(0)
    if action == "report":
        return report(overrides)
    if action not in ACTIONS:
        raise ConfigError("suite", f"unknown action {action!r}; use plan, status, launch or report")
    opts = parse_overrides(overrides, {**COMMON, **ACTIONS[action]})
    from evolm_nemo.suite import launch, plan as plan_mod  # torch and megatron-core: after the keys' check

    if action == "plan":
        fmt = str(opts.get("format") or "md")
        if fmt not in ("md", "csv"):
            raise ConfigError("format", f"must be md or csv; got {fmt!r}")
        plan = _load(opts)
        md, text_csv = plan_mod.markdown(plan), plan_mod.csv_text(plan)
        if opts.get("out"):
            out = Path(str(opts["out"]))
            write_text(out / "plan.md", md)
            write_text(out / "plan.csv", text_csv)
        print(md if fmt == "md" else text_csv, end="")
        if opts.get("out"):
            print(f"wrote {Path(str(opts['out'])) / 'plan.md'} and plan.csv")
        return 0
    if action == "status":
        plan = _load(opts)
        print(launch.status_table(launch.jobs(plan)))
        return 0
    executor = opts.get("executor")
    if executor not in ("local", "slurm"):
        raise ConfigError("executor", f"must be local or slurm; got {executor!r}")
    dry = opts.get("dry_run", False)
    if not isinstance(dry, bool):
        raise ConfigError("dry_run", f"must be true or false; got {dry!r}")
    plan = _load(opts)  # every node's recipe composed and checked before anything starts
    js = launch.jobs(plan)
    if executor == "local":
        if dry:
            print(launch.status_table(js))
            for j in js:
                if j.state != "done":
                    import shlex

                    print(f"{j.row.node}: {shlex.join(launch.local_command(plan.suite, j))}")
            return 0
        return launch.run_local(plan, js)
    directory = Path(str(opts.get("out") or Path(plan.suite.root) / "slurm"))
    return launch.run_slurm(plan, js, directory, dry)
