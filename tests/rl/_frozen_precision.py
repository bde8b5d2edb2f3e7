"""One process, train.precision=bf16, KL on: build the RL stage's roles as `evolm train` does and write, as JSON to
argv[1], the parameter dtypes of the actor and of the frozen reference, and the largest difference between their
logits on one batch once the reference holds the parent's weights (the actor starts from them too); with a reward
model (rl.reward=rm), its parameter dtypes and its scores of two sequences (written with them)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    from megatron.core.utils import unwrap_model

    from evolm_nemo.checkpoint import io as ckpt
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.runtime.distributed import setup, teardown
    from evolm_nemo.stages import plan_run, stage_module

    cfg = compose("config", sys.argv[2:], RootConfig)
    plan = plan_run(cfg, world_size=1)
    rt = setup(1, 1, seed=0, precision=cfg.train.precision)
    stage = stage_module(cfg.stage).build(cfg, plan, rt)
    roles = stage.build(rt)
    actor = roles[0].model
    ckpt.load_weights(ckpt.resolve(cfg.train.init_from), [actor])
    stage.prepare(actor, rt, None, cfg.run.out_dir)
    torch.manual_seed(0)
    tokens = torch.randint(3, cfg.model.vocab_size, (2, 24))  # no special token (EOS: 2) among them
    pos = torch.arange(24).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        a, r = actor(tokens, pos, None), stage.ref(tokens, pos, None)
    dtypes = {name: sorted({str(p.dtype) for p in unwrap_model(m).parameters()})
              for name, m in (("actor", actor), ("reference", stage.ref))}
    out = {**dtypes, "logits_dtypes": [str(a.dtype), str(r.dtype)],
           "max_diff": float((a.float() - r.float()).abs().max())}
    if stage.rm is not None:  # the frozen reward model: its dtypes, and its scores of two sequences
        seqs = [tokens[0, :20].tolist(), tokens[1, :12].tolist()]
        out["reward_model"] = sorted({str(p.dtype) for p in unwrap_model(stage.rm.model).parameters()})
        out["rm_sequences"] = seqs
        out["rm_scores"] = stage.rm.score([s[:6] for s in seqs], [s[6:] for s in seqs], stage.eos)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    teardown()


if __name__ == "__main__":
    main()
