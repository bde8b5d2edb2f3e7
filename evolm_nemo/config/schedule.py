"""Learning-rate schedule lengths of a run of ``iters`` iterations (the arithmetic ``config.validate`` checks and
``train.wsd`` builds on)."""

from __future__ import annotations


def warmup_iters(o, iters: int) -> int:
    """Warmup iterations of a run of ``iters``: ``optim.warmup_iters`` when set, else ``warmup_fraction * iters``."""
    w = getattr(o, "warmup_iters", None)
    return int(w) if w is not None else int(round(o.warmup_fraction * iters))


def decay_iters(o, iters: int) -> int:
    """WSD cooldown length of a run of ``iters`` iterations (at least 1)."""
    return max(1, int(round(o.wsd_decay_fraction * iters)))


def branch_iteration(o, iters: int) -> int:
    """Where the cooldown of a ``iters``-iteration WSD run starts: the stable steps it shares."""
    return iters - decay_iters(o, iters)
