"""`evolm train key=value ...`: compose the recipe, validate it (before any heavy work), train the stage.

Single process: `evolm train`. Several: `torchrun --nproc_per_node 2 -m evolm_nemo.train.entry parallel=tp2`
(which calls this through ``evolm_nemo.cli``).
"""

from __future__ import annotations

from evolm_nemo.config import RootConfig, compose


def main(overrides: list[str]) -> int:
    cfg = compose("config", overrides, RootConfig)  # a recipe error is one line here, before torch is imported
    from evolm_nemo.runtime.distributed import teardown
    from evolm_nemo.stages import plan_run, run

    plan = plan_run(cfg)
    try:
        result = run(cfg, plan)
        if result.runtime.is_main and result.losses:
            first, last = result.losses[0], result.losses[-1]
            what = result.history_key.removesuffix("_mean")  # RL runs hand back the reward history
            print(f"[evolm] done: {what} {first:.4f} -> {last:.4f} over {len(result.losses)} iterations; "
                  f"checkpoint {result.checkpoint}", flush=True)
    finally:
        teardown()
    return 0
