"""`evolm train key=value ...`: compose the recipe, validate it (before any heavy work), train.

Single process: `evolm train`. Several: `torchrun --nproc_per_node 2 -m evolm_nemo.train.entry parallel=tp2`.
"""

from __future__ import annotations

import sys

from evolm_nemo.config import RootConfig, compose
from evolm_nemo.stages import plan_run


def main(overrides: list[str]) -> int:
    cfg = compose("config", overrides, RootConfig)
    plan = plan_run(cfg)
    from evolm_nemo.runtime.distributed import teardown
    from evolm_nemo.train.loop import run

    try:
        result = run(cfg, plan)
        if result.runtime.is_main and result.losses:
            losses = result.losses
            what = "reward" if cfg.stage in ("ppo", "grpo") else "loss"  # RL runs hand back the reward history
            print(f"[evolm] done: {what} {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} iterations; "
                  f"checkpoint {result.checkpoint}", flush=True)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    from evolm_nemo.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
