"""One room per stage: what a stage supplies to the one loop (``train.loop.fit``) is its data, its objective and its
roles. The registry below maps ``stage=<name>`` to its module; validation (``config.validate``) and dispatch
(``run``) both go through it. Each module has ``plan_iters(cfg, dp) -> int`` (checks the stage's data and derives
the iteration count before anything heavy) and ``build(cfg, plan, rt) -> Stage`` (``stages.base.Stage``: what the loop
drives); a stage that saves more than one role says where (``checkpoint_dirs(cfg)``, actor first).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.validate import Plan
from evolm_nemo.train.loop import MAIN, TrainResult, fit

STAGES = {
    "pretrain": "evolm_nemo.stages.pretrain",  # next-token loss on packed documents
    "cpt": "evolm_nemo.stages.pretrain",  # the same objective from train.init_from, on a replay mix
    "sft": "evolm_nemo.stages.sft",  # prompt-masked fine-tuning on a prepared SFT dataset
    "ppo": "evolm_nemo.stages.rl",  # PPO with verifiable rewards: actor + critic, rollouts from the live actor
    "grpo": "evolm_nemo.stages.rl",  # GRPO: n samples per prompt, group-relative advantages, no critic
    "rm": "evolm_nemo.stages.rm",  # reward model: scalar head, outcome (BCE) or pairwise (Bradley-Terry) objective
    "dpo": "evolm_nemo.stages.dpo",  # direct preference optimisation against the frozen train.init_from
}


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(STAGES[name])


def run(cfg: RootConfig, plan: Plan) -> TrainResult:
    """Train the stage ``cfg.stage`` names through the one loop."""
    module = stage_module(cfg.stage)
    dirs = module.checkpoint_dirs(cfg) if hasattr(module, "checkpoint_dirs") else (MAIN,)
    return fit(cfg, plan, module.build, dirs)
