"""`python -m evolm_nemo.suite.demo_data src=<SFT run> out=<dir> [limit=8] [cache_dir=...]`: the tiny suite's
evaluation data -- the demo's held-out generated word problems (disjoint from its SFT and RL sets), for the SFT
run's tokenizer, in GSM8K's cooked schema (``<out>/gsm8k_platinum.jsonl``), exactly as `evolm pipeline` writes them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evolm_nemo.config import RootConfig, compose
from evolm_nemo.config.errors import ConfigError, print_error
from evolm_nemo.data.sft_synthetic import ensure_synthetic_sft
from evolm_nemo.fileio import read_jsonl, write_jsonl
from evolm_nemo.suite.spec import parse_overrides


@dataclass
class DemoDataConfig:
    src: Optional[str] = None  # the SFT run dir (or any run of the demo's tokenizer)
    out: Optional[str] = None  # output directory
    limit: int = 8  # problems
    cache_dir: str = "runs/cache"  # where the demo's generated sets live (the SFT run's data.cache_dir)


def write_demo_problems(directory, problems: list[dict]) -> Path:
    """Held-out generated word problems in EvoLM's cooked GSM8K schema (gold after `#### `)."""
    directory = Path(directory)
    rows = [{"id": q["id"], "problem": q["problem"], "gt_solution": f"{q['solution']}\n#### {q['answer']}",
             "gt_answer": None} for q in problems]
    write_jsonl(directory / "gsm8k_platinum.jsonl", rows)
    return directory


def main(overrides: list[str]) -> int:
    opts = parse_overrides(overrides, {k: None for k in DemoDataConfig.__dataclass_fields__})
    cfg = DemoDataConfig(**opts)
    if not cfg.src or not cfg.out:
        raise ConfigError("src" if not cfg.src else "out", "required (src=<run dir> out=<dir>)")
    if not (Path(cfg.src) / "checkpoints").is_dir():
        raise ConfigError("src", f"{cfg.src} has no checkpoints/ (name the SFT run directory)")
    sft = compose("config", ["experiment=demo_sft", f"train.init_from={cfg.src}/checkpoints",
                             f"data.cache_dir={cfg.cache_dir}"], RootConfig)
    data = ensure_synthetic_sft(sft)
    problems = read_jsonl(data.eval_path)[:cfg.limit]
    path = write_demo_problems(cfg.out, problems)
    print(f"wrote {len(problems)} held-out problems to {path / 'gsm8k_platinum.jsonl'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as exc:
        print_error(exc.key, exc.message)
        sys.exit(2)
