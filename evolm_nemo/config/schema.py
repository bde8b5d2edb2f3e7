"""Typed schema of a training recipe. Every YAML under recipes/ is merged onto these dataclasses, so an unknown key
or a wrong type is caught (with its full dotted name) before any heavy work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from evolm_nemo.tasks import QUESTION_TEMPLATE


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name, recorded in checkpoints and model cards
    num_layers: int = 2  # transformer blocks
    hidden_size: int = 64  # model width
    ffn_hidden_size: int = 176  # SwiGLU intermediate size (per gate/up projection)
    num_attention_heads: int = 4  # query heads
    num_query_groups: int = 2  # key/value heads (GQA); equal to num_attention_heads for MHA
    vocab_size: int = 512  # embedding rows; must cover the tokenizer's vocabulary
    seq_length: int = 128  # training context length (EvoLM: 2048); at most 2^24 (RoPE positions are float32)
    norm_eps: float = 1.0e-5  # RMSNorm epsilon
    rope_base: float = 10000.0  # RoPE theta
    init_method_std: float = 0.02  # normal init std for all weights
    layer_spec: str = "auto"  # auto | te | local: Transformer Engine when importable on GPU, else megatron local
    core_attention: str = "sdpa"  # local spec only: sdpa (torch fused SDPA) | megatron (unfused DotProductAttention)


@dataclass
class DataConfig:
    name: str = "synthetic"  # label for logs and lineage
    source: str = "synthetic"  # synthetic: generate corpus + tokenizer under cache_dir | indexed: use `paths`
    paths: List[str] = field(default_factory=list)  # megatron indexed-dataset prefixes (without .bin/.idx)
    weights: Optional[List[float]] = None  # token-ratio weights, one per path (None = proportional to size)
    tokenizer: Optional[str] = None  # HF tokenizer dir or hub name (Llama-2's for real runs)
    split: str = "100,0,0"  # train,valid,test split of each dataset (megatron convention)
    val_paths: List[str] = field(default_factory=list)  # held-out prefixes, one per source in data.paths order: the
    #                          held-out loss (train.val_tokens_interval) reads these whole instead of a split part
    synthetic_val_docs: int = 0  # synthetic source: also generate this many held-out documents per kind (another
    #                              seed) for the held-out loss, so training keeps every document
    cache_dir: str = "runs/cache"  # where megatron caches sample indices (and the synthetic corpus lives)
    synthetic_docs: int = 2000  # synthetic source: number of generated documents
    synthetic_seed: int = 1234  # synthetic source: corpus seed
    synthetic_kinds: List[str] = field(default_factory=lambda: ["text"])  # synthetic source: corpora to mix (text |
    # math), all tokenized with the text corpus's tokenizer; `weights` gives their token ratios (CPT replay)
    hf_dataset: Optional[str] = None  # provenance: HF hub dataset the indexed files were prepared from
    max_epochs: float = 1.0  # indexed mixes: passes over any one source a run may make (more is refused; raise it
    #                          to repeat a small source on purpose)


@dataclass
class OptimConfig:
    lr: float = 3.0e-3  # peak learning rate
    min_lr: float = 3.0e-4  # cosine floor
    weight_decay: float = 0.1  # decoupled AdamW weight decay
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    eps: float = 1.0e-8  # Adam epsilon
    clip_grad: float = 1.0  # global grad-norm clip (0 disables)
    warmup_fraction: float = 0.1  # fraction of iterations spent in linear warmup
    decay_style: str = "cosine"  # cosine | linear | constant | wsd (after warmup)
    warmup_iters: Optional[int] = None  # explicit warmup iterations (overrides warmup_fraction): a WSD stable run
    #                                     and its branches share one warmup, whatever their budgets (RL: optimizer
    #                                     steps, rl.ppo_epochs x rl.mini_batches per iteration, as its schedule runs)
    wsd_decay_fraction: float = 0.2  # decay_style=wsd: the last fraction of iterations decays to min_lr (cooldown)
    wsd_decay_shape: str = "linear"  # decay_style=wsd: linear | cosine | 1-sqrt
    distributed: bool = False  # shard optimizer state over data-parallel ranks (megatron distributed optimizer)
    stage_lr: Dict[str, float] = field(default_factory=dict)  # this model size's peak lr of each post-training stage
    #                                     (sft, rm, dpo, ppo, grpo): what `optim.lr` is for that stage without an
    #                                     experiment (pretraining and CPT use `optim.lr` itself)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size; divides heads and query groups
    pp: int = 1  # pipeline-parallel size; divides num_layers
    sp: bool = False  # sequence parallel (needs tp > 1)
    micro_batch_size: int = 2  # sequences per forward/backward on one rank
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    max_tokens_per_microbatch: Optional[int] = None  # sft/rm/dpo/ppo/grpo: microbatches by a token budget (rows x
    #                                     padded length) instead of micro_batch_size; with train.packing a row's capacity


@dataclass
class TrainConfig:
    tokens: Optional[str] = None  # token budget (160B, 1.6B, 20_000_000_000) -> iterations = tokens / (gbs * seq)
    iters: Optional[int] = None  # explicit iteration count (instead of tokens); with epochs (sft): the smaller wins
    epochs: Optional[int] = None  # stage=sft: passes over the dataset (iterations = examples * epochs // global batch)
    seed: int = 42  # global seed (init, data order)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    log_interval: int = 1  # iterations between metric records
    save_interval: int = 0  # iterations between checkpoints (0: only at the end)
    keep_last: int = 2  # committed checkpoints to keep
    init_from: Optional[str] = None  # parent checkpoint: load its weights only (CPT/SFT/PPO start here)
    branch_budgets: List[str] = field(default_factory=list)  # WSD stable run: budgets (20B, ...) to branch at; a
    #                                     checkpoint is kept under <run>/branches/ where each budget's cooldown starts
    val_tokens_interval: Optional[str] = None  # pretrain/cpt: held-out loss per data source every this many tokens
    #                                            (1B, ...), before the first step and at the end; needs a valid part
    #                                            in data.split; null: off
    val_batches: int = 1  # pretrain/cpt: global batches of held-out samples per source and validation
    branch_from: Optional[str] = None  # WSD cooldown branch: a stable run (or its checkpoint at the cooldown start);
    #                                    weights, optimizer state and step count are loaded, then it decays to min_lr
    resume: bool = True  # continue from the latest committed checkpoint in out_dir if there is one
    overwrite: bool = False  # a fresh start may remove the checkpoints already in out_dir (else it refuses)
    save_on_signal: bool = True  # on SIGTERM (preemption): save a checkpoint after the current iteration, exit 143
    peak_tflops: Optional[float] = None  # per-device peak for MFU (None: known GPUs auto, CPU not reported)
    progress: bool = True  # tqdm progress bar with ETA on rank 0
    tensorboard: bool = True  # also write TensorBoard events
    packing: bool = False  # sft/rm/dpo/ppo/grpo: lay each rank's examples into packed rows (best-fit, whole
    #                        examples, attention within each only) instead of padded microbatches; same batch and loss


@dataclass
class SFTConfig:
    overlength: str = "truncate"  # truncate | drop: examples longer than model.seq_length + 1 tokens (counted)
    shuffle: bool = True  # a new order every epoch (seeded by train.seed and the epoch); false: dataset order
    pad_to_multiple_of: int = 1  # microbatch length rounded up to a multiple (8 suits GPU kernels)

    # data.source=synthetic (the demo): generated word problems, prepared like `evolm prepare-sft` would
    prompt_template: str = QUESTION_TEMPLATE  # EvoLM's (LLaMA-Factory "default"); = eval's prompt
    answer_template: str = "{answer}"  # the assistant turn; EOS is appended
    synthetic_examples: int = 2000  # generated SFT problems (disjoint from the demo's RL and eval problems)
    synthetic_seed: int = 4321  # their seed


@dataclass
class RLConfig:
    """PPO / GRPO (NeMo-Aligner's vocabulary where it fits; ``stage`` names the algorithm). Defaults are EvoLM's verl
    0.2 run as released."""

    prompts_per_step: int = 8  # prompts per iteration over all data-parallel ranks (EvoLM 1B: 1024)
    samples_per_prompt: int = 1  # n responses per prompt (EvoLM PPO: 1; GRPO needs >= 2)
    rollout_engine: str = "continuous"  # continuous (a finished sequence's slot takes the next) | static (megatron's)
    rollout_micro_batch_size: int = 32  # sequences the rollout engine decodes at once (its KV cache width)
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # rollout nucleus sampling
    max_prompt_tokens: int = 1024  # longer prompts are skipped (counted)
    max_response_tokens: int = 1024  # responses cut here are flagged truncated
    stop_strings: List[str] = field(default_factory=list)  # besides EOS (EvoLM/verl: EOS only)
    reward_scoring: str = "strict"  # the answer checker's mode for the verifiable reward: strict | evolm
    reward_cut_at_stop: bool = True  # judge the response up to the evaluation's stop strings (Human, Assistant:
    # what evaluation keeps of a sample); false: the whole response, a made-up next turn included (verl 0.2)
    reward_suite: str = "gsm8k_platinum"  # the checker's equivalence rule (math suites)
    ppo_epochs: int = 1  # passes over each rollout batch (EvoLM: 1)
    mini_batches: int = 1  # optimizer steps per PPO epoch (EvoLM: 1, mini-batch = batch)
    ratio_eps: float = 0.2  # policy clip (low side)
    ratio_eps_high: Optional[float] = None  # clip-higher (DAPO); None: = ratio_eps
    dual_clip: Optional[float] = 3.0  # dual-clip constant for negative advantages (None: off)
    value_clip: Optional[float] = 0.5  # critic value clip (None: off)
    entropy_bonus: float = 0.001  # entropy coefficient
    discount_factor: float = 1.0  # GAE gamma
    gae_lambda: float = 1.0  # GAE lambda
    whiten_advantages: bool = True  # PPO: normalise advantages over the global batch
    kl: str = "off"  # off | reward (k1 in the reward) | loss (estimator below); EvoLM: off
    kl_estimator: str = "k3"  # k1 | k2 | k3 (kl=loss)
    kl_clamp: Optional[float] = 10.0  # cap of the k3 estimate per token (verl's low_var_kl: 10); None: no cap
    initial_policy_kl_penalty: float = 0.0  # KL coefficient
    loss_agg: str = "token_mean"  # token_mean (over the global batch) | seq_mean
    tis_cap: Optional[float] = None  # truncated importance sampling cap (rollouts from another engine/precision)
    critic_lr: float = 2.0e-5  # critic peak lr (warmup optim.warmup_fraction, then optim.decay_style)
    critic_init: Optional[str] = None  # critic backbone: None = train.init_from (fresh scalar head) | a checkpoint
    grpo_normalize_std: bool = True  # GRPO: divide by the group std (false: Dr. GRPO)
    dynamic_sampling: bool = False  # GRPO: drop groups whose rewards are all equal (DAPO; not refilled)
    val_data: Optional[str] = None  # JSONL {id, prompt, gold_answer} for greedy validation
    val_interval: int = 0  # iterations between validations (0: off)
    val_size: int = 64  # validation prompts
    save_rollouts: bool = False  # write every rollout (prompt/response ids, engine log-probs, reward) to rollouts.jsonl
    reward: str = "verifiable"  # verifiable (the answer checker) | rm (a reward model) | custom (rl.reward_fn) | sum
    #                             (weighted: verifiable + the RM if rl.reward_model + the function if rl.reward_fn)
    reward_model: Optional[str] = None  # rl.reward=rm|sum: a value-head checkpoint (`stage=rm` run, or import-hf of
    #                                     an HF LlamaForSequenceClassification)
    reward_model_weight: float = 1.0  # rl.reward=sum: weight of the RM score
    verifiable_weight: float = 1.0  # rl.reward=sum: weight of the verifiable reward
    reward_fn: Optional[str] = None  # rl.reward=custom|sum: a user reward function `package.module:function`, called
    #                                  as fn(prompt, response, row) -> float | {"score": float, <metric>: float, ...}
    reward_fn_weight: float = 1.0  # rl.reward=sum: weight of the reward function's score
    reward_fn_timeout: float = 10.0  # seconds per call; a call past it scores 0 (counted: reward_fn_timeouts)
    reward_fn_workers: int = 2  # helper processes that run the function (the answer checker's kind of pool)
    reward_fn_errors: str = "raise"  # raise (an exception / bad return stops the run, one line) | zero (scores 0,
    #                                  counted: reward_fn_errors)


@dataclass
class RMConfig:
    """Reward-model training (``stage=rm``) on `evolm prepare-rm` datasets."""

    objective: str = "outcome"  # outcome (BCE on correct/incorrect) | pairwise (Bradley-Terry on chosen/rejected)
    margin: float = 0.0  # pairwise: -log sigmoid(r_chosen - r_rejected - margin)
    shuffle: bool = True  # a new order every epoch (train.seed + epoch)
    val_fraction: float = 0.1  # problems held out for validation (loss, accuracy, AUC); 0: none
    val_interval: int = 0  # iterations between validations (0: only at the end)
    pad_to_multiple_of: int = 1  # microbatch length rounded up to a multiple


@dataclass
class DPOConfig:
    """Direct preference optimisation (``stage=dpo``) on pairs from `evolm prepare-rm kind=pairs`."""

    beta: float = 0.1  # strength of the implicit KL to the reference (= train.init_from)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (IPO: squared loss on length-normalised log-ratios)
    label_smoothing: float = 0.0  # conservative DPO: the preference labels' assumed noise
    sft_weight: float = 0.0  # RPO: + this x the chosen response's per-token NLL (keeps its likelihood rising)
    shuffle: bool = True  # a new order of the pairs every epoch (train.seed + epoch); false: dataset order
    pad_to_multiple_of: int = 1  # microbatch length rounded up to a multiple (8 suits GPU kernels)


@dataclass
class ProbeConfig:
    """Capability probes of the live model during pretraining / CPT (checkpoint dynamics; evaluation/probe.py)."""

    tokens_interval: Optional[str] = None  # every this many training tokens (1B, ...), before the first step and at
    #                                        the end; null: off
    upstream: List[str] = field(default_factory=list)  # lm-eval 0-shot tasks (piqa, arc_easy, ...) through lm-eval
    upstream_limit: Optional[int] = 200  # items per upstream task (null: all)
    tasks_dir: Optional[str] = None  # local lm-eval YAMLs; null with data_dir set: eval/upstream; both null: lm-eval's
    #                                  built-in tasks (hub)
    data_dir: Optional[str] = None  # <task>.jsonl rows for the local tasks
    downstream: List[str] = field(default_factory=list)  # suites (gsm8k_platinum, math, ...): greedy, shared checker
    downstream_dir: Optional[str] = None  # <suite>.jsonl in EvoLM's cooked schema; null: the suite's hub source
    downstream_limit: int = 32  # problems per suite
    template: Optional[str] = None  # prompt with {problem}; null: each suite's own template (eval/tasks)
    max_new_tokens: int = 256  # completion tokens per downstream problem
    scoring: str = "evolm"  # evolm | strict: the checker's mode
    batch_size: int = 16  # sequences per probe forward / generation batch
    max_fraction: Optional[float] = 0.1  # bound: probes take at most this fraction of the run's wall time (the next
    #                                      probe is postponed when one costs more); null: never postponed


@dataclass
class RunConfig:
    name: str = "tiny_pretrain"  # run name (directory name under runs/ by default)
    out_dir: str = "runs/tiny_pretrain"  # checkpoints, metrics.jsonl, tensorboard/


@dataclass
class LoggerConfig:
    """Experiment trackers beside metrics.jsonl and TensorBoard (rank 0; ``pip install evolm-nemo[tracking]``)."""

    wandb: bool = False  # Weights & Biases (WANDB_MODE=offline: files under run.out_dir/wandb, `wandb sync` later)
    mlflow: bool = False  # MLflow (client only: a tracking server, or a local file store)
    project: str = "evolm"  # W&B project; the MLflow experiment outside a suite
    entity: Optional[str] = None  # W&B entity (team or user); null: the login's default
    name: Optional[str] = None  # the tracker run's name; null: run.name
    tags: List[str] = field(default_factory=list)  # extra W&B tags (MLflow: evolm.tag.<tag> tags)
    mlflow_uri: Optional[str] = None  # tracking URI (http://host:5000, file:/path, a path); null:
    #                                   MLFLOW_TRACKING_URI, else ./mlruns (a file store)
    experiment: Optional[str] = None  # MLflow experiment; null: logger.suite, else logger.project

    # set by `evolm suite launch` for every train node (the DAG as structure); null outside a suite
    suite: Optional[str] = None  # W&B group, MLflow experiment
    node: Optional[str] = None  # the suite node (W&B tag node:<node>, MLflow tag evolm.node)
    parent: Optional[str] = None  # its parent node (W&B tag parent:<parent>; MLflow tag evolm.parent and the
    #                               parent's run as mlflow.parentRunId when it was tracked too)


@dataclass
class RootConfig:
    stage: str = "pretrain"  # pretrain | cpt | sft | ppo | grpo | rm | dpo (evolm_nemo.stages.STAGES)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # stage=sft only
    rl: RLConfig = field(default_factory=RLConfig)  # stage=ppo | grpo only
    rm: RMConfig = field(default_factory=RMConfig)  # stage=rm only
    dpo: DPOConfig = field(default_factory=DPOConfig)  # stage=dpo only
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # stage=pretrain | cpt: capability probes while training
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # W&B / MLflow beside metrics.jsonl
    lineage: Any = field(default_factory=dict)  # free-form provenance carried into checkpoints and model cards
