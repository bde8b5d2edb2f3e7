"""Under torchrun with 2 gloo ranks at TP=2: ``rl.stats.on_tp_rank0`` with a function that fails on rank 0 in a way
that is no ConfigError (a broken pipe of a reward pool, a checker bug). Each rank writes what it raised to
WORKDIR/rank<r>.txt; rank 1 must not wait on the broadcast forever."""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    work = Path(sys.argv[1])
    from evolm_nemo.rl.stats import on_tp_rank0
    from evolm_nemo.runtime.distributed import setup, teardown

    setup(2, 1, seed=0, precision="fp32")
    import torch.distributed as dist

    rank = dist.get_rank()

    def fails():
        raise BrokenPipeError("the reward pool went away")

    try:
        on_tp_rank0(fails)
        said = "returned"
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the fact the test judges
        said = f"{type(exc).__name__}: {exc}"
    assert on_tp_rank0(lambda: rank * 10 + 7) == 7  # still in step: rank 0's value on both ranks
    (work / f"rank{rank}.txt").write_text(said)
    teardown()


if __name__ == "__main__":
    main()
