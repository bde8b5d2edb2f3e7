"""One room per stage: what a stage supplies to the one loop (``train.loop.fit``) is its data, its objective and its
roles. The registry below maps ``stage=<name>`` to its module; planning (``plan_run``) and dispatch (``run``) both go
through it. Each module has ``plan_iters(cfg, dp) -> int`` (checks the stage's data and derives the iteration count
before anything heavy), ``data_identity(cfg) -> dict`` (what defines its data and batch: config key -> value, data
by content fingerprints; the loop records it in every checkpoint and refuses a resume that changes it), optionally
``check_plan(cfg, iters)`` (what else needs the iterations: pretraining's WSD branches, held-out validation, probes),
and ``build(cfg, plan, rt) -> Stage`` (``stages.base.Stage``: what the loop drives); a stage that saves more than
one role says where (``checkpoint_dirs(cfg)``, actor first), one that keeps checkpoints beside them
(``Stage.snapshots``) where those go (``kept_dirs(cfg)``: a fresh run refuses them as another run's, an overwrite
removes them, a resume may start from the run's own).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.validate import Layout, Plan, check_schedule, check_shape, choice, validate
from evolm_nemo.fileio import KINDS, check_writable, is_hf_model_dir, output_kind, owned_elsewhere

if TYPE_CHECKING:
    from evolm_nemo.train.loop import TrainResult
# checkpoint.io and train.loop (torch, megatron-core) are imported where they are used: `evolm train` composes and
# checks the recipe first, so that a recipe error is one line without the heavy imports


@dataclass(frozen=True)
class Kind:
    """What the rest of the house needs to know of a stage, so that only this package tests stage names."""

    module: str
    budget: str  # tokens: train.tokens/iters over packed documents (WSD branches, held-out loss, probes) |
    #              epochs: passes over a dataset of units | prompts: RL steps over prompts (rl.* batch sizes)
    unit: str  # a dataset unit: tokens | examples | pairs | prompts
    label: str  # the model's stage in evaluation results and reports
    from_parent: bool = True  # starts from train.init_from (a parent run)
    critic: bool = False  # trains a critic beside the actor (saved under <run>/critic)
    head: str = "lm"  # the trained model's output layer: lm | value (a scalar head)
    reference_pass: bool = False  # a frozen reference's forward over the data before the first step
    starts_group: bool = False  # the models it and its descendants make share a report group (SFT, then RL)
    lays_out: bool = False  # its microbatches may be packed (train.packing) or formed by a token budget
    section: str | None = None  # the recipe section of its own settings (sft, rl, rm, dpo)


STAGES = {
    # next-token loss on packed documents
    "pretrain": Kind("evolm_nemo.stages.pretrain", "tokens", "tokens", "pretrain", from_parent=False),
    # the same objective from train.init_from, on a replay mix
    "cpt": Kind("evolm_nemo.stages.pretrain", "tokens", "tokens", "cpt"),
    # prompt-masked fine-tuning on a prepared SFT dataset
    "sft": Kind("evolm_nemo.stages.sft", "epochs", "examples", "sft", starts_group=True, lays_out=True, section="sft"),
    # PPO with verifiable rewards: actor + critic, rollouts from the live actor
    "ppo": Kind("evolm_nemo.stages.rl", "prompts", "prompts", "rl", critic=True, lays_out=True, section="rl"),
    # GRPO: n samples per prompt, group-relative advantages, no critic
    "grpo": Kind("evolm_nemo.stages.rl", "prompts", "prompts", "rl", lays_out=True, section="rl"),
    # reward model: scalar head, outcome (BCE) or pairwise (Bradley-Terry) objective
    "rm": Kind("evolm_nemo.stages.rm", "epochs", "examples", "rm", head="value", lays_out=True, section="rm"),
    # direct preference optimisation against the frozen train.init_from
    "dpo": Kind("evolm_nemo.stages.dpo", "epochs", "pairs", "dpo", reference_pass=True, lays_out=True,
                section="dpo"),
}


# where a stage other than pretraining / CPT measures on held-out data (data.val_paths is refused for them)
OWN_VALIDATION = {"sft": "SFT has no validation set", "dpo": "DPO has no validation set",
                  "rm": "a reward model holds out rm.val_fraction of the problems",
                  "ppo": "RL validates on rl.val_data", "grpo": "RL validates on rl.val_data"}


def kind(name: str) -> Kind:
    """The registry's entry for ``stage=<name>``, or a ConfigError naming the key ``stage``."""
    choice("stage", name, tuple(STAGES))
    return STAGES[name]


def sequences_per_unit(cfg: RootConfig) -> int:
    """Sequences a dataset unit of ``cfg``'s stage trains on: 2 for a preference pair (DPO, a pairwise RM)."""
    return 2 if kind(cfg.stage).unit == "pairs" or (cfg.stage == "rm" and cfg.rm.objective == "pairwise") else 1


def synthetic_size(cfg: RootConfig) -> int | None:
    """Units in the generated (``data.source=synthetic``) dataset of ``cfg``'s stage, when it has one."""
    module = stage_module(cfg.stage)
    return module.synthetic_size(cfg) if hasattr(module, "synthetic_size") else None


def rl_split(cfg: RootConfig, dp: int) -> tuple[str, str] | None:
    """The RL batch's split over ``dp`` data-parallel ranks, then into ``rl.mini_batches`` (and each mini-batch into
    ``micro_batch_size`` rows, unless packing or a token budget lays its microbatches out): the key and message of
    the first thing that does not divide, or None. The trainer and ``evolm suite plan`` refuse alike."""
    r, p, t = cfg.rl, cfg.parallel, cfg.train
    if r.prompts_per_step % dp:
        return "rl.prompts_per_step", f"{r.prompts_per_step} prompts do not split over {dp} data-parallel ranks"
    per_rank = r.prompts_per_step // dp * r.samples_per_prompt
    if t.packing or p.max_tokens_per_microbatch is not None:  # microbatches not by count
        if per_rank % r.mini_batches:
            return "rl.mini_batches", (f"each rank trains on {per_rank} sequences per step: they must split into "
                                       f"rl.mini_batches={r.mini_batches}")
    elif per_rank % (r.mini_batches * p.micro_batch_size):
        return "parallel.micro_batch_size", (f"each rank trains on {per_rank} sequences per step: they must split "
                                             f"into rl.mini_batches={r.mini_batches} x micro_batch_size="
                                             f"{p.micro_batch_size}")
    return None


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(kind(name).module)


def check_budget_keys(cfg: RootConfig) -> None:
    """Which of ``train.tokens`` / ``train.iters`` / ``train.epochs`` the stage takes, one line each: pretraining and
    CPT one of tokens or iters; the fine-tuning stages epochs and/or iters over their data, RL over its prompts."""
    t, k = cfg.train, kind(cfg.stage)
    if k.budget == "tokens":
        if t.epochs is not None:
            raise ConfigError("train.epochs", f"applies to stage=sft|rm|dpo|ppo|grpo; {cfg.stage} takes train.tokens "
                                              "or train.iters (set train.epochs=null)")
        if t.tokens is None and t.iters is None:
            raise ConfigError("train.tokens", "set one of train.tokens (e.g. 160B) or train.iters")
        if t.tokens is not None and t.iters is not None:
            raise ConfigError("train.tokens", f"train.tokens={t.tokens} and train.iters={t.iters} both set: keep one "
                                              "(the other =null)")
        return
    over = "over the prompts" if k.budget == "prompts" else "over the data"
    if t.tokens is not None:
        raise ConfigError("train.tokens", f"stage={cfg.stage} trains by train.epochs or train.iters ({over}); set "
                                          "train.tokens=null")
    if t.epochs is None and t.iters is None:
        raise ConfigError("train.epochs", f"stage={cfg.stage} needs train.epochs (passes {over}) or train.iters")


def check_recipe(cfg: RootConfig, world_size: int | None = None) -> Layout:
    """The recipe's own rules for its stage (``config.validate.validate``, its budget keys and which stage may take
    which keys): no file read, nothing heavy imported, so a command that runs several stages (`evolm pipeline`)
    checks all of their recipes before the first one starts. Returns the layout at ``world_size``."""
    k, t = kind(cfg.stage), cfg.train
    if cfg.probe.tokens_interval is not None and k.budget != "tokens":
        raise ConfigError("probe.tokens_interval", f"is for stage=pretrain|cpt, not {cfg.stage}")
    layout = validate(cfg, world_size, global_batches=k.budget != "prompts")
    if (t.packing or cfg.parallel.max_tokens_per_microbatch is not None) and not k.lays_out:
        key = "train.packing" if t.packing else "parallel.max_tokens_per_microbatch"
        raise ConfigError(key, f"is for stage={'|'.join(n for n, x in STAGES.items() if x.lays_out)}, not "
                               f"{cfg.stage}")
    check_budget_keys(cfg)
    if (t.branch_budgets or t.branch_from) and k.budget != "tokens":
        raise ConfigError("train.branch_from" if t.branch_from else "train.branch_budgets",
                          f"WSD branches are for stage=pretrain|cpt, not {cfg.stage}")
    if t.val_tokens_interval is not None and k.budget != "tokens":
        raise ConfigError("train.val_tokens_interval", f"is for stage=pretrain|cpt; {cfg.stage} has its own "
                                                       "validation settings")
    if cfg.data.val_paths and k.budget != "tokens":  # else read by nobody: no validation, and nothing said
        raise ConfigError("data.val_paths", f"is for the held-out loss of stage=pretrain|cpt; stage={cfg.stage} would "
                                            f"ignore it ({OWN_VALIDATION[cfg.stage]}): set data.val_paths=[]")
    return layout


def plan_run(cfg: RootConfig, world_size: int | None = None, parent_checked: bool = False) -> Plan:
    """Everything `evolm train` checks before it builds anything, in this order, and the plan it derives: the recipe
    (``check_recipe``: ``config.validate.validate`` and the stage's keys), that a stage continuing a model names it
    (``check_started_from``, unless ``parent_checked``: `evolm suite plan` plans copies without the parent its graph
    names), that no input lies in the run directory ``train.overwrite`` would start over
    (``check_inputs_outside_run``), that the outputs can be written, the parent checkpoint (``train.init_from``), the
    stage's data and iterations (its ``plan_iters``), the schedule over them (``config.validate.check_schedule``) and
    the stage's ``check_plan``. Each failure is a one-line ConfigError naming the key."""
    k = kind(cfg.stage)
    layout = check_recipe(cfg, world_size)
    if not parent_checked:
        check_started_from(cfg)
    check_inputs_outside_run(cfg)
    check_writable(cfg.run.out_dir, "run.out_dir", directory=True)
    check_run_dir(cfg.run.out_dir)
    if cfg.data.source == "synthetic" or k.budget == "tokens":  # generated corpora / sample-index caches
        check_writable(cfg.data.cache_dir, "data.cache_dir", directory=True)
    if cfg.train.init_from is not None:
        check_parent(cfg)
    module = stage_module(cfg.stage)
    iters = module.plan_iters(cfg, layout.dp)
    check_schedule(cfg, iters)
    if hasattr(module, "check_plan"):
        module.check_plan(cfg, iters)
    return Plan(world_size=layout.world_size, dp=layout.dp, iters=iters, tokens_per_iter=layout.tokens_per_iter,
                num_microbatches=layout.num_microbatches)


def run_inputs(cfg: RootConfig) -> list[tuple[str, str]]:
    """``(key, path)`` for every file or directory a run of ``cfg`` reads: its parents, the RL critic and reward
    model, the data (prepared datasets, indexed prefixes, RL prompt files, validation sets), the tokenizer and the
    probes' task files. (``data.cache_dir`` is a cache the run also writes, not an input.)"""
    t, d, r, p = cfg.train, cfg.data, cfg.rl, cfg.probe
    found = [("train.init_from", t.init_from), ("train.branch_from", t.branch_from), ("rl.critic_init", r.critic_init),
             ("rl.reward_model", r.reward_model), ("rl.val_data", r.val_data), ("probe.tasks_dir", p.tasks_dir),
             ("probe.data_dir", p.data_dir)]
    if d.tokenizer and Path(d.tokenizer).expanduser().exists():  # (else a hub name)
        found.append(("data.tokenizer", d.tokenizer))
    found += [("data.paths", path) for path in d.paths or ()] + [("data.val_paths", path) for path in d.val_paths or ()]
    return [(key, str(path)) for key, path in found if path]


def check_run_dir(out: str) -> None:
    """``run.out_dir`` is a directory of its own: a new or empty one, a training run's, or one of other files -- not
    another command's output (an export, a dataset, a checkpoint, a model directory) nor inside one, nor a run's own
    ``checkpoints/`` or ``tensorboard/`` (``fileio.owned_elsewhere``)."""
    path = Path(out).expanduser().resolve()
    kind = output_kind(path) if path.is_dir() else None
    if kind not in (None, "run", "other"):
        raise ConfigError("run.out_dir", f"{path} is {KINDS[kind]}; a training run goes in a directory of its own: "
                                         "pick another run.out_dir")
    foreign = owned_elsewhere(path, itself=False)
    if foreign is not None:
        raise ConfigError("run.out_dir", f"{foreign}; a training run goes in a directory of its own: pick another "
                                         "run.out_dir")


def check_inputs_outside_run(cfg: RootConfig) -> None:
    """``train.overwrite=true`` starts the run directory over (its checkpoints removed, its logs restarted), so none
    of the run's inputs (``run_inputs``) may lie inside ``run.out_dir``: a parent checkpoint, a stable run to branch
    from, a dataset there would be destroyed before it is read. Refused in one line naming the input's key, before
    anything is touched."""
    if not cfg.train.overwrite:
        return  # without it nothing of the directory is removed (a fresh start refuses a directory with checkpoints)
    out = Path(cfg.run.out_dir).expanduser().resolve()
    for key, path in run_inputs(cfg):
        where = Path(path).expanduser().resolve()
        if where.is_relative_to(out):
            raise ConfigError(key, f"{path} lies inside run.out_dir={cfg.run.out_dir}, whose checkpoints and logs "
                                   "train.overwrite=true removes before training: it would be destroyed before it is "
                                   "read; write this run to another run.out_dir")


def check_started_from(cfg: RootConfig) -> None:
    """A stage that continues a trained model (``Kind.from_parent``: CPT and the post-training stages) names it:
    ``train.init_from`` (or, pretraining by tokens, a WSD stable run's ``train.branch_from``). Without it a CPT run
    trained a model from random weights and recorded it as a CPT. The one check of it, in ``plan_run`` after the
    recipe's own checks and before any data is read."""
    t, k = cfg.train, kind(cfg.stage)
    if k.from_parent and not t.init_from and not t.branch_from:
        branch = ", or train.branch_from=<a WSD stable run> for a cooldown branch" if k.budget == "tokens" else ""
        raise ConfigError("train.init_from", f"stage={cfg.stage} continues a trained model: set train.init_from to "
                                             "its checkpoint (a run's checkpoints, or an `evolm import-hf` output)"
                                             f"{branch}; stage=pretrain trains from scratch")


def check_parent(cfg: RootConfig) -> None:
    """``train.init_from`` is a complete checkpoint of the same model shape (its evolm.json, no tensors read)."""
    path = cfg.train.init_from
    if not Path(path).exists():
        raise ConfigError("train.init_from", f"no checkpoint at {path}")
    if is_hf_model_dir(path):
        name = Path(path).resolve().name or "model"
        raise ConfigError("train.init_from", f"{path} is a HuggingFace model directory, not an evolm checkpoint; "
                                             f"import it first with evolm import-hf src={path} "
                                             f"dst=runs/{name}_imported, then set train.init_from to that")
    from evolm_nemo.checkpoint import io as ckpt

    try:
        meta = ckpt.read_meta(ckpt.resolve(path))
    except ckpt.CheckpointError as exc:
        raise ConfigError("train.init_from", str(exc)) from None
    head = meta.get("head", "lm")
    if head != "lm" and kind(cfg.stage).head == "lm":
        raise ConfigError("train.init_from", f"{path} is a {meta.get('role') or 'reward model'} checkpoint (a scalar "
                                             f"{head} head, no language-model head); stage={cfg.stage} starts from "
                                             "a language model (a pretraining, CPT or SFT run)")
    check_shape(cfg.model, meta, lambda ours, theirs, name: f"{ours} differs from the parent checkpoint's {theirs} "
                                                           f"(train.init_from={path}, model {name}); pick the model "
                                                           "preset it was trained with")


def run(cfg: RootConfig, plan: Plan) -> TrainResult:
    """Train the stage ``cfg.stage`` names through the one loop (``plan`` from ``plan_run``)."""
    from evolm_nemo.train.loop import MAIN, fit

    module = stage_module(cfg.stage)
    dirs = module.checkpoint_dirs(cfg) if hasattr(module, "checkpoint_dirs") else (MAIN,)
    kept = module.kept_dirs(cfg) if hasattr(module, "kept_dirs") else ()
    return fit(cfg, plan, module.build, dirs, data_identity(cfg), run_settings(cfg), kept)


def data_identity(cfg: RootConfig) -> dict:
    """What defines the data and batch of ``cfg``'s run (its stage's ``data_identity``), JSON-plain."""
    return stage_module(cfg.stage).data_identity(cfg)


# What a resume may change (everything else of the sections a stage reads must stay as the run started, or the
# resumed run would not be the run its checkpoints record -- megatron's scheduler, for one, keeps the checkpoint's
# learning rates and ignores the recipe's): where the run writes and what it shows; how each step's batch is laid
# out over ranks and microbatches (the loss does not depend on it); the iteration budget (train.loop.resume_check
# refuses a change with its own message); inputs named by path whose content the stage's ``data_identity`` checks,
# or that the run keeps from its start (the parent, the reference and the reward model, rl.critic_init); and what is
# measured beside training (validation, probes), and which checkpoints are kept (a WSD stable run's branch points:
# train.branch_budgets only saves more of them).
RESUME_FREE = frozenset({
    "model.name", "model.layer_spec", "model.core_attention",
    "data.name", "data.paths", "data.val_paths", "data.tokenizer", "data.cache_dir", "data.hf_dataset",
    "data.max_epochs", "data.synthetic_val_docs",
    "optim.distributed", "optim.stage_lr",
    "parallel.tp", "parallel.pp", "parallel.sp", "parallel.micro_batch_size", "parallel.max_tokens_per_microbatch",
    "train.tokens", "train.iters", "train.epochs", "train.log_interval", "train.save_interval", "train.keep_last",
    "train.init_from", "train.branch_from", "train.val_tokens_interval", "train.val_batches", "train.resume",
    "train.overwrite", "train.save_on_signal", "train.peak_tflops", "train.progress", "train.tensorboard",
    "train.packing", "train.branch_budgets",
    "sft.pad_to_multiple_of", "rm.pad_to_multiple_of", "dpo.pad_to_multiple_of", "rm.val_interval",
    "rl.rollout_micro_batch_size", "rl.critic_init", "rl.reward_model", "rl.reward_fn_workers", "rl.val_data",
    "rl.val_interval", "rl.val_size", "rl.save_rollouts",
})


def run_settings(cfg: RootConfig) -> dict:
    """The settings of ``cfg`` a resume must keep (dotted key -> value): ``stage`` and every key of the model,
    data, optim, parallel and train sections and of the stage's own (``Kind.section``), but ``RESUME_FREE``.
    ``train.loop.resume_check`` compares them with the config the checkpoint records."""
    from evolm_nemo.config.compose import to_dict

    plain = to_dict(cfg)
    sections = ("model", "data", "optim", "parallel", "train") + ((kind(cfg.stage).section,)
                                                                   if kind(cfg.stage).section else ())
    unused = {"parallel.global_batch_size"} if kind(cfg.stage).budget == "prompts" else set()  # RL: rl.* sizes
    found = {"stage": cfg.stage}
    for section in sections:
        for key, value in plain[section].items():
            if f"{section}.{key}" not in RESUME_FREE | unused:
                found[f"{section}.{key}"] = value
    return found
