"""`evolm eval downstream|upstream model=<HF dir> ...` and `evolm report ...`: compose the recipe, call the typed
function (evaluation/evaluate.py, evaluation/report.py, suite/report.py).

downstream writes into ``out``: ``completions.jsonl`` (the `evolm score` input format, so sampling and scoring can
run on different machines), ``scored.jsonl``, ``result.json`` (schema in evaluation/report.py) and prints the
metrics table. upstream writes ``upstream.json`` (lm-eval's results) and merges its summary into ``result.json``.
"""

from __future__ import annotations

import sys

from evolm_nemo.config.compose import compose, compose_command
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation import evaluate
from evolm_nemo.evaluation.evaluate import DownstreamConfig, UpstreamConfig
from evolm_nemo.evaluation.report import ReportConfig, build, load_results


def main(overrides: list[str]) -> int:
    overrides = list(overrides)
    mode = overrides.pop(0) if overrides and "=" not in overrides[0] else "downstream"
    if mode == "downstream":
        return downstream(overrides)
    if mode == "upstream":
        return upstream(overrides)
    raise ConfigError("eval", f"unknown mode {mode!r}; use `evolm eval downstream ...` or `evolm eval upstream ...`")


def downstream(overrides: list[str]) -> int:
    evaluate.downstream(compose_command("eval_downstream", overrides, DownstreamConfig))
    return 0


def upstream(overrides: list[str]) -> int:
    evaluate.upstream(compose_command("eval_upstream", overrides, UpstreamConfig))
    return 0


def report(overrides: list[str]) -> int:
    """`evolm report runs=<glob> [dynamics=<glob>] out=<dir>` (a suite's tables, `evolm report suite=<name>`, are
    ``suite.cli.report``: the console script routes there)."""
    cfg = compose("report", overrides, ReportConfig)
    written = build(cfg.runs or None, cfg.out, cfg.dynamics or None)
    if cfg.runs:
        print(f"models: {len(load_results(cfg.runs))}")
    for name, path in written.items():
        print(f"{name}: {path or 'skipped (no data)'}")
    return 0


if __name__ == "__main__":
    from evolm_nemo.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))
