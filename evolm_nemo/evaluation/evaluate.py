"""`evolm eval downstream|upstream` as typed functions (evaluation/cli.py composes the recipes and calls them): sample +
score the six downstream suites, or run lm-eval.

downstream writes into ``out``: ``completions.jsonl`` (the `evolm score` input format, so sampling and scoring can
run on different machines), ``scored.jsonl``, ``result.json`` (schema in evaluation/report.py) and prints the
metrics table; until ``result.json`` is written, ``.sampled/<suite>.json`` holds each suite sampled so far (a rerun
with the same model and settings resumes after it). upstream writes ``upstream.json`` (lm-eval's results) and merges
its summary into ``result.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from evolm_nemo.config.errors import ConfigError, check_seed, first_line
from evolm_nemo.config.tokens import parse_tokens
from evolm_nemo.config.validate import once
from evolm_nemo.conversion import hfdir
from evolm_nemo.data.tokenizer import has_tokenizer, load_tokenizer
from evolm_nemo.evaluation import rm as rm_mod
from evolm_nemo.evaluation import sampling
from evolm_nemo.evaluation import tasks as registry
from evolm_nemo.evaluation import upstream as up
from evolm_nemo.evaluation.report import build, infer_meta, update_result
from evolm_nemo.evaluation.score import score_rows
from evolm_nemo.fileio import (KINDS, check_writable, lock_output, output_kind, owned_elsewhere, release_output,
                               write_json, write_jsonl)
from evolm_nemo.tasks import SUITES, UPSTREAM



@dataclass
class ResultMeta:
    """Fields both eval modes share: the model, its data and limit, where results go and how the model is labelled in
    reports (documented in recipes/eval_downstream.yaml and recipes/eval_upstream.yaml)."""

    out: Optional[str] = None
    overwrite: bool = False  # replace an evaluation of another model in out (its result files are removed first)
    name: Optional[str] = None
    size: Optional[str] = None
    pretrain_tokens: Optional[str] = None
    stage: Optional[str] = None
    group: Optional[str] = None
    trust_remote_code: bool = False
    model: Optional[str] = None  # the HF model directory evaluated
    data_dir: Optional[str] = None
    limit: Optional[int] = None


@dataclass
class DownstreamConfig(ResultMeta):
    tasks: List[str] = field(default_factory=lambda: list(SUITES))
    backend: str = "auto"
    n: int = 16
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    max_model_len: Optional[int] = None  # null: resolved by model_len (EvoLM's 2048, or less: the model's context)
    max_new_tokens: Optional[int] = None
    seed: int = 42
    batch_size: int = 64
    tensor_parallel_size: int = 1
    scoring: str = "evolm"
    workers: int = 0
    rm: Optional[str] = None
    rm_batch_size: int = 8


@dataclass
class UpstreamConfig(ResultMeta):
    tasks: List[str] = field(default_factory=lambda: list(UPSTREAM))
    tasks_dir: Optional[str] = None
    batch_size: str = "16"
    dtype: str = "auto"
    device: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------- common


def _model_dir(model: Optional[str]) -> str:
    """``model`` is an HF directory with its tokenizer. A training run or checkpoint given instead (megatron weights,
    no config.json) is named as such, with the export that makes its HF directory."""
    if not model:
        raise ConfigError("model", "required: an HF model directory (config.json + weights)")
    if not (Path(model) / "config.json").is_file():
        kind = output_kind(model) if Path(model).is_dir() else None
        if kind in ("run", "checkpoint", "hf-import"):  # megatron weights: evaluation reads an HF export of them
            raise ConfigError("model", f"{model} is {KINDS[kind]}, not an HF model directory (no config.json); "
                                       f"export it first: evolm export-hf src={model} dst=<dir>, then model=<dir>")
        raise ConfigError("model", f"{model} is not an HF model directory ("
                                   + ("no config.json)" if Path(model).exists() else "no such directory)"))
    if not has_tokenizer(model):
        raise ConfigError("model", f"{model} has no tokenizer files (tokenizer.json, tokenizer_config.json, a "
                                   "vocabulary ...); save the model's tokenizer beside it (evolm export-hf does)")
    return model


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_model(path: str, key: str = "model", head: str = "lm", trust_remote_code: bool = False,
                sampled: bool = False) -> None:
    """The HF model directory ``path`` will load, checked without loading it (once the settings and data are read,
    before any model is): ``config.json``, each weight file's header (a cut-short safetensors; a
    ``pytorch_model.bin`` read with weights_only=True), the model transformers builds from ``config.json`` (on the
    meta device: no memory) against the stored tensors (each one present -- else transformers fills it at random, e.g.
    the untied ``lm_head.weight`` of a reward model or critic export, which ``head="lm"`` refuses from its
    ``architectures`` first -- and of its shape), the tokenizer, and the tokenizer against the embedding
    rows. ``head``: "lm" (AutoModelForCausalLM) or "value" (AutoModelForSequenceClassification, the reward model).
    One line naming ``key`` and the file, field or tensor; these were tracebacks once the model loaded (for the
    reward model: after all the sampling). A TensorRT-LLM engine directory (``*.engine``) has no HF weights: its
    config.json and tokenizer are checked. ``sampled``: the model is sampled from (downstream), so it must name an
    EOS token somewhere the samplers read it (``_check_eos``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = hfdir.read_config(path, key)
    config_file = Path(path) / "config.json"
    archs = [str(a) for a in spec.get("architectures") or []]
    if head == "lm" and any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(key, f"{config_file} describes a {archs[0]} (a reward model or PPO critic: a score head, "
                               "no LM head to sample from); pass a causal LM (...ForCausalLM, e.g. `evolm export-hf` "
                               "of a pretrain, SFT or RL actor checkpoint)" + ("; a reward model goes in rm="
                                                                               if key == "model" else ""))
    if any(Path(path).glob("*.engine")):
        load_tokenizer(path, trust_remote_code, key=key, require_eos=False)
        return
    bins: dict = {}  # a pytorch_model*.bin, loaded (weights_only) once and let go once its shapes are read
    files = hfdir.weight_files(path, key, bins)
    stored = hfdir.tensor_specs(files, key, bins)
    del bins
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        auto = AutoModelForSequenceClassification if head == "value" else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers' config validation, an unknown architecture, remote code not allowed
        raise ConfigError(key, f"{config_file}: transformers cannot build the model it describes "
                               f"({first_line(exc)[:300]})") from None
    if "quantization_config" not in spec:  # a quantized checkpoint stores packed shapes of its own
        found = _stored_names(model, stored)
        renamed = _renamed_on_load(model, stored)  # then a name absent from the files says nothing
        for name, want in model.state_dict().items():  # in the model's order: the embedding first
            have = found.get(name)
            if have is None and (renamed or name not in found):
                continue
            if have is None:
                # transformers would load the rest and initialise this one at random (a warning, then junk samples)
                tied = " (its embeddings are not tied: tie_word_embeddings is false)" \
                    if name.endswith("lm_head.weight") and not getattr(config, "tie_word_embeddings", False) else ""
                raise ConfigError(key, f"{Path(path)} has no tensor {name} in its weight files, yet the "
                                       f"{type(model).__name__} its config.json describes needs it{tied}: "
                                       "transformers would fill it with random values")
            if tuple(stored[have][1]) != tuple(want.shape):
                unset = [f for f in SIZE_FIELDS if f not in spec and hasattr(config, f)]
                hint = (f" (it sets no {', '.join(unset)}: transformers used its default"
                        f"{'s' if len(unset) > 1 else ''} {', '.join(str(getattr(config, f)) for f in unset)})"
                        if unset else "")
                raise ConfigError(key, f"tensor {have} in {files[have].name} has shape {list(stored[have][1])}, "
                                       f"{config_file} implies {list(want.shape)}{hint}")
    tok = load_tokenizer(path, trust_remote_code, key=key, require_eos=False)
    if sampled:
        _check_eos(path, key, tok)
    try:
        rows = model.get_input_embeddings().weight.shape[0]
    except Exception:  # a model class without the accessor: nothing to compare
        return
    if len(tok) > rows:
        raise ConfigError(key, f"its tokenizer has {len(tok)} tokens, more than the model's {rows} embedding rows "
                               f"(vocab_size in {Path(path) / 'config.json'}): ids from {rows} on have no embedding")


def _check_eos(path: str, key: str, tok) -> None:
    """A sampled model names an EOS token (``sampling.eos_ids``: the tokenizer's ``eos_token``, ``eos_token_id`` in
    generation_config.json or config.json). One naming none was an IndexError out of the hf sampler once the model
    had loaded (it pads with EOS when the prompts carry no BOS), and would otherwise run every completion to its
    token budget."""
    if not sampling.eos_ids(path, tok):
        raise ConfigError(key, f"{path} names no EOS token (eos_token in its tokenizer files, eos_token_id in "
                               "config.json or generation_config.json): a completion could end only at the token "
                               "budget; set eos_token_id in its config.json (evolm export-hf writes it)")


def _renamed_on_load(model, stored: dict) -> bool:
    """Whether transformers renames or merges this checkpoint's tensors as it loads them: the model class has a
    conversion mapping of its own (e.g. Mixtral's experts, stored one per expert, loaded stacked), or a stored name
    matches one of the legacy renamings (``LayerNorm.gamma`` ...). Unknown (another transformers): True, and the
    presence of each tensor is left to transformers."""
    import re

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping

        if get_model_conversion_mapping(model, add_legacy=False):
            return True
        patterns = []
        for rename in get_checkpoint_conversion_mapping("legacy") or []:
            source = getattr(rename, "source_patterns", None)
            patterns += [source] if isinstance(source, str) else list(source or [])
        legacy = [re.compile(p) for p in patterns]
    except Exception:
        return True
    return any(p.search(name) for name in stored for p in legacy)


def _stored_names(model, stored: dict) -> dict:
    """{state_dict name: the stored tensor that fills it, or None when none does} for ``model``'s tensors. A tensor
    is found under its own name, under the name without the base model's prefix (a checkpoint saved from the bare
    ``LlamaModel``, which transformers loads into the causal LM) or through a tied alias (``lm_head.weight`` is the
    embedding when ``tie_word_embeddings`` is true); names the model class lets be missing are left out."""
    import re

    prefix = f"{getattr(model, 'base_model_prefix', '') or ''}."
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]

    def lookup(name: str):
        if name in stored:
            return name
        if prefix != "." and name.startswith(prefix) and name[len(prefix):] in stored:
            return name[len(prefix):]
        return None

    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, tensor in named:
        aliases.setdefault(id(tensor), []).append(name)
    by_name = dict(named)
    found = {}
    for name in model.state_dict():
        tensor = by_name.get(name)
        names = aliases.get(id(tensor), [name]) if tensor is not None else [name]
        have = next((h for h in map(lookup, [name, *names]) if h is not None), None)
        if have is None and any(p.search(name) for p in ignore):
            continue  # the model class says it may be absent
        found[name] = have
    return found


def _meta(cfg) -> dict:
    """Result-JSON identity: explicit values win over what the directory name suggests. ``meta["inferred"]`` lists
    the keys guessed from the name (a later evaluation's guesses never replace an earlier explicit value)."""
    meta = infer_meta(cfg.model)
    inferred = {k for k, v in meta.items() if v is not None}
    meta["model_dir"] = str(Path(cfg.model).resolve())
    for key in ("name", "size", "stage", "group"):
        value = getattr(cfg, key)
        if value is not None:
            meta["model" if key == "name" else key] = str(value)
            inferred.discard("model" if key == "name" else key)
    if cfg.pretrain_tokens is not None:
        meta["pretrain_tokens"] = parse_tokens(cfg.pretrain_tokens, "pretrain_tokens")
        inferred.discard("pretrain_tokens")
    meta["inferred"] = sorted(inferred)
    return meta


def _out_dir(cfg) -> Path:
    return Path(cfg.out) if cfg.out else Path("runs") / "eval" / Path(cfg.model.rstrip("/")).name


# what an evaluation writes into its out dir (report/: `evolm report` of it, as the demo makes)
EVAL_FILES = ("result.json", "upstream.json", "completions.jsonl", "scored.jsonl", ".sampled", "report")


def check_out(cfg, out: Path) -> bool:
    """Before any data or model is loaded: ``out`` is writable, is not another command's output (a training run, a
    checkpoint, an export, the model directory itself ...), and holds no other model's evaluation -- an upstream
    and a downstream evaluation of one model share it (result.json names the model directory), another model's
    results are replaced only with ``overwrite=true``. Returns whether they are to be (``clear_out``)."""
    foreign = owned_elsewhere(out)
    if foreign is not None:
        raise ConfigError("out", f"{foreign}; evaluation results go in a directory of their own: pick another out")
    check_writable(out, "out", directory=True)  # before hours of sampling, not at the first write after them
    # one evaluation at a time writes ``out`` (until the command ends): a second one, of any model or mode, is refused
    # in one line instead of mixing its files and result.json with the first's
    taken = lock_output(out, "out")
    try:
        result = Path(out) / "result.json"
        if not result.is_file():
            return False
        try:
            theirs = json.loads(result.read_text(encoding="utf-8")).get("model_dir")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            theirs = None
        if theirs == str(Path(cfg.model).resolve()):
            return False  # this model's own evaluation: the other mode's results stay, this mode's are replaced
        if not cfg.overwrite:
            raise ConfigError("out", f"{out} holds the evaluation of "
                                     f"{theirs or 'another model (unreadable result.json)'}; pick another out, or "
                                     "pass overwrite=true to replace it")
        return True
    except ConfigError:
        if taken:
            release_output(out)
        raise


def clear_out(out: Path) -> None:
    """Remove another model's evaluation files from ``out`` (``check_out`` said so; once the data is read, before
    the model is loaded)."""
    for name in EVAL_FILES:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ------------------------------------------------------------------------------------------------------- downstream


def _load_tasks(cfg: DownstreamConfig):
    """(task, problems) per requested suite, all loaded and checked before any model is (the task names were
    checked by ``check_settings``, which ``downstream`` runs first)."""
    out = []
    for name in cfg.tasks:
        task = registry.get_task(name)
        path = None
        if cfg.data_dir:
            path = Path(cfg.data_dir) / f"{task.name}.jsonl"
            if not path.is_file():
                raise ConfigError("data_dir", f"missing {path} (cooked JSONL: id, problem, gt_solution, gt_answer)")
            path = str(path)
        problems = registry.load_problems(task, path=path, limit=cfg.limit)
        if not problems:
            raise ConfigError("data_dir" if path else "tasks", f"no problems in {path or task.name}")
        out.append((task, problems))
    return out


EVOLM_MAX_MODEL_LEN = 2048  # EvoLM's prompt + completion window
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


def model_context(path: str) -> tuple[Optional[int], str]:
    """The longest sequence (prompt + completion tokens) the model in ``path`` was built for and where it was read:
    a TensorRT-LLM engine's ``max_seq`` (evolm_trtllm.json) or ``build_config.max_seq_len``, else config.json's
    ``max_position_embeddings`` (or another model family's name for it), stretched by a ``rope_scaling`` factor as
    vLLM does. (None, "") when nothing says."""
    record = Path(path) / "evolm_trtllm.json"
    if record.is_file():
        try:
            seq = json.loads(record.read_text(encoding="utf-8")).get("max_seq")
        except (OSError, ValueError, AttributeError):
            seq = None
        if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
            return seq, f"max_seq in {record}"
    spec = hfdir.read_config(path, "model")
    config_file = Path(path) / "config.json"
    build_cfg = spec.get("build_config")
    if isinstance(build_cfg, dict) and isinstance(build_cfg.get("max_seq_len"), int) and build_cfg["max_seq_len"] > 0:
        return build_cfg["max_seq_len"], f"build_config.max_seq_len in {config_file}"
    for where, prefix in ((spec, ""), (spec.get("text_config"), "text_config."),
                          (spec.get("pretrained_config"), "pretrained_config.")):
        if not isinstance(where, dict):
            continue
        for name in CONTEXT_FIELDS:
            value = where.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return _rope_stretched(value, where.get("rope_scaling"), f"{prefix}{name} in {config_file}")
    return None, ""


def _rope_stretched(length: int, rope, source: str) -> tuple[int, str]:
    """vLLM's rule: a RoPE scaling factor stretches max_position_embeddings (llama3 / longrope configs already give
    the stretched length; yarn stretches original_max_position_embeddings)."""
    if not isinstance(rope, dict):
        return length, source
    kind = rope.get("rope_type") or rope.get("type")
    factor = rope.get("factor")
    if kind in (None, "default", "su", "longrope", "llama3") or not isinstance(factor, (int, float)) or factor <= 1:
        return length, source
    base = rope.get("original_max_position_embeddings") if kind == "yarn" else None
    base = base if isinstance(base, int) and base > 0 else length
    return int(base * factor), f"{source} x rope_scaling.factor {factor}"


def model_len(cfg) -> int:
    """``max_model_len`` as sampling uses it, for the model in ``cfg.model`` (``resolve_model_len``)."""
    return resolve_model_len(cfg.max_model_len, *model_context(cfg.model))


def resolve_model_len(max_model_len: Optional[int], context: Optional[int], source: str) -> int:
    """null is EvoLM's 2048, or the model's ``context`` (read from ``source``) when that is shorter (as vLLM defaults
    to the model's length); an explicit value longer than the context is refused in one line -- the hf backend
    would generate past the positions the model was trained on (vLLM refuses it itself). `evolm suite plan` applies
    the same rule to an eval node, from its parent run's model.seq_length."""
    if max_model_len is None:
        return min(EVOLM_MAX_MODEL_LEN, context) if context else EVOLM_MAX_MODEL_LEN
    if context and max_model_len > context:
        raise ConfigError("max_model_len", f"{max_model_len} is longer than the model's context of {context} "
                                           f"tokens ({source}); set max_model_len <= {context}, or null for "
                                           f"{min(EVOLM_MAX_MODEL_LEN, context)}")
    return max_model_len


def _check(cfg: DownstreamConfig) -> DownstreamConfig:
    """Every setting checked before any data or model is loaded; returns ``cfg`` with ``max_model_len`` resolved."""
    check_settings(cfg)
    _model_dir(cfg.model)
    if cfg.rm is not None:
        _check_rm(cfg.rm)
    return dataclasses.replace(cfg, max_model_len=model_len(cfg))


def check_settings(cfg: DownstreamConfig) -> None:
    """The settings that need neither the model, the data nor this machine: checked by the evaluation before it
    loads anything and by `evolm suite plan` for an eval node before any training (one rule, one place)."""
    check_seed("seed", cfg.seed)
    if not cfg.tasks:
        raise ConfigError("tasks", f"empty; choose from {', '.join(SUITES)}")
    for name in cfg.tasks:
        registry.get_task(name)  # ConfigError naming `tasks` for an unknown suite
    once("tasks", list(cfg.tasks), "its problems would be sampled and counted twice")
    if cfg.backend != "auto" and cfg.backend not in sampling.BACKENDS:
        raise ConfigError("backend", f"unknown backend {cfg.backend!r}; choose auto, {', '.join(sampling.BACKENDS)}")
    if cfg.scoring not in ("evolm", "strict"):
        raise ConfigError("scoring", f"expected evolm or strict, got {cfg.scoring!r}")
    if cfg.n < 1:
        raise ConfigError("n", f"must be >= 1, got {cfg.n}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError("limit", f"must be >= 1 (or null for all problems), got {cfg.limit}")
    if cfg.max_model_len is not None and cfg.max_model_len < 2:
        raise ConfigError("max_model_len", f"must be >= 2 (or null: the model's context, at most 2048), got "
                                           f"{cfg.max_model_len}")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1 (or null), got {cfg.max_new_tokens}")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {cfg.batch_size}")
    if not 0.0 < cfg.top_p <= 1.0:  # NaN fails the comparison too
        raise ConfigError("top_p", f"must be in (0, 1], got {cfg.top_p}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0.0):
        raise ConfigError("temperature", f"the sampled pass needs a finite temperature > 0, got {cfg.temperature}")
    if not (math.isfinite(cfg.repetition_penalty) and cfg.repetition_penalty > 0.0):
        raise ConfigError("repetition_penalty", f"must be a finite number > 0 (1: none), got {cfg.repetition_penalty}")
    if cfg.tensor_parallel_size < 1:
        raise ConfigError("tensor_parallel_size", f"must be >= 1, got {cfg.tensor_parallel_size}")
    if cfg.backend == "hf":
        check_backend(cfg, "hf")
    if cfg.workers < 0:
        raise ConfigError("workers", f"must be >= 0 (0: one scorer per CPU core), got {cfg.workers}")
    if cfg.rm_batch_size < 1:
        raise ConfigError("rm_batch_size", f"must be >= 1, got {cfg.rm_batch_size}")


def check_backend(cfg: DownstreamConfig, backend: str) -> None:
    """What the resolved ``backend`` cannot do: the hf sampler runs the model on one device, so a
    tensor_parallel_size above 1 would be ignored."""
    if backend == "hf" and cfg.tensor_parallel_size > 1:
        raise ConfigError("tensor_parallel_size", f"{cfg.tensor_parallel_size} needs backend=vllm or trtllm (a GPU "
                                                  "and the package); the hf backend runs the model on one device")


def _check_rm(path: str) -> None:
    """``rm`` is a reward model as evaluation/rm.py loads it (AutoModelForSequenceClassification with one output),
    read from its config.json: a causal LM export was refused only after all the sampling, once it was loaded."""
    spec = hfdir.read_config(path, "rm")
    archs = spec.get("architectures") or []
    if archs and not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ConfigError("rm", f"{path} is a {', '.join(map(str, archs))}, not a reward model (an "
                                "...ForSequenceClassification with one output, e.g. `evolm export-hf` of an RM run)")
    if hfdir.export_role(path, "rm") == "critic":  # as rl.reward_model refuses the critic (and its import)
        raise ConfigError("rm", f"{path} is the export of a PPO critic ({Path(path) / hfdir.EXPORT_RECORD}): it "
                                "predicts returns, not rewards; use a reward model (`evolm export-hf` of a stage=rm "
                                "run)")
    labels = spec.get("id2label")
    n = len(labels) if isinstance(labels, dict) else spec.get("num_labels", 2)  # transformers' default: 2 labels
    if n != 1:
        raise ConfigError("rm", f"{path} has {n} outputs; a reward model has exactly one (num_labels=1)")


SAMPLED = ".sampled"  # under ``out``: each suite's sampled rows until result.json is written (a rerun resumes)


def sampling_identity(cfg: DownstreamConfig, backend: str) -> dict:
    """What decides a suite's samples: the model's files (name, size, modification time), the backend and every
    sampling setting. A rerun with the same identity reuses a suite sampled before it was interrupted."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(cfg.model).iterdir() if p.is_file())
    settings = {k: getattr(cfg, k) for k in ("n", "greedy", "temperature", "top_p", "repetition_penalty",
                                             "max_model_len", "max_new_tokens", "seed", "batch_size",
                                             "tensor_parallel_size")}
    return {"model": str(Path(cfg.model).resolve()), "files": [list(f) for f in files], "backend": backend,
            **settings}


def _suite_rows(task, problems, greedy, sampled) -> list[dict]:
    rows = []
    for k, p in enumerate(problems):
        row = {"suite": task.name, "id": p["id"], "problem": p["problem"], "gt_solution": p["gt_solution"],
               "gt_answer": p["gt_answer"], "completions": sampled[k]}
        if greedy is not None:
            row["greedy"] = greedy[k][0]
        rows.append(row)
    return rows


def _problems_key(task, problems: list[dict], prompts: list[str]) -> str:
    """The suite's problems (every field a row keeps), prompts (its template applied) and stop strings, hashed."""
    fields = [[p["id"], p["problem"], p["gt_solution"], p["gt_answer"]] for p in problems]
    return hashlib.sha256(json.dumps([task.name, list(task.stop), prompts, fields], default=str)
                          .encode("utf-8")).hexdigest()


def _kept(path: Path, identity: dict, key: str) -> tuple[list[dict], list[dict]] | None:
    """A suite's (rows, stats) sampled by an interrupted run with the same identity and prompts, else None."""
    try:
        part = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(part, dict) or part.get("identity") != json.loads(json.dumps(identity)) or \
            part.get("prompts") != key or not isinstance(part.get("rows"), list):
        return None
    return part["rows"], part.get("stats", [])


def sample_rows(cfg: DownstreamConfig, loaded, out: Path | None = None) -> tuple[list[dict], dict]:
    """Greedy + n-sample completions for every problem, as `evolm score` input rows; plus sampling stats. With
    ``out``: each suite's rows are kept in ``out/.sampled/<suite>.json`` as soon as it is sampled, and a suite
    found there with the same model, settings and problems (a run stopped in a later suite, or in scoring) is not
    sampled again; the model is loaded only when a suite needs it."""
    backend = sampling.pick(cfg.backend)
    identity = sampling_identity(cfg, backend) if out is not None else None
    common = dict(repetition_penalty=cfg.repetition_penalty, max_model_len=cfg.max_model_len,
                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    rows, stats, sampler = [], {"backend": backend, "runs": []}, None
    try:
        for task, problems in loaded:
            prompts = [task.prompt(p["problem"]) for p in problems]
            key = _problems_key(task, problems, prompts)
            path = out / SAMPLED / f"{task.name}.json" if out is not None else None
            kept = _kept(path, identity, key) if path is not None and path.is_file() else None
            if kept is not None:
                print(f"[eval] {task.name}: {len(problems)} problems' completions kept from an interrupted run with "
                      f"the same model and settings ({path})", flush=True)
                rows += kept[0]
                stats["runs"] += kept[1]
                continue
            if sampler is None:
                sampler = sampling.load(backend, cfg.model, batch_size=cfg.batch_size,
                                        max_model_len=cfg.max_model_len, seed=cfg.seed,
                                        trust_remote_code=cfg.trust_remote_code,
                                        tensor_parallel_size=cfg.tensor_parallel_size)
            stop = tuple(task.stop)
            greedy, runs = None, []
            if cfg.greedy:
                greedy = sampler.generate(prompts, sampling.Spec(n=1, temperature=0.0, stop=stop, **common),
                                          desc=f"{task.name} greedy")
                runs.append({"suite": task.name, **sampler.stats})
            sampled = sampler.generate(prompts, sampling.Spec(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                                              stop=stop, **common), desc=f"{task.name} n={cfg.n}")
            runs.append({"suite": task.name, **sampler.stats})
            suite_rows = _suite_rows(task, problems, greedy, sampled)
            if path is not None:
                write_json(path, {"identity": identity, "prompts": key, "stats": runs, "rows": suite_rows})
            rows += suite_rows
            stats["runs"] += runs
    finally:
        if sampler is not None:
            sampler.close()
    return rows, stats


def table(summary: dict, title: str = "", k: int = 16) -> str:
    """Fixed-width metrics table (percent) from an `evolm score` summary; ``k``: samples per problem (the
    ``maj16``/``rm16``/``pass16`` keys keep EvoLM's names whatever it is, the headers say it)."""
    cols = [("n", "n"), ("pass1", "Pass@1"), ("maj16", f"Maj@{k}"), ("rm16", f"RM@{k}"), ("pass16", f"Pass@{k}"),
            ("correct_ratio", "CorrRatio")]
    head = f"{'suite':<16}" + "".join(f"{c:>10}" for _, c in cols)
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for suite, m in summary.items():
        if not isinstance(m, dict):
            continue
        cells = []
        for key, _ in cols:
            v = m.get(key)
            cells.append(f"{'-':>10}" if v is None else f"{v:>10}" if key == "n" else f"{100 * v:>10.1f}")
        lines.append(f"{suite:<16}" + "".join(cells))
    return "\n".join(lines)


def downstream(cfg: DownstreamConfig) -> dict:
    """Sample and score ``cfg.tasks`` (greedy + n samples each), write completions.jsonl, scored.jsonl and
    result.json into the out dir and print the metrics table. Returns the result JSON."""
    cfg = _check(cfg)
    meta = _meta(cfg)
    made_from = hfdir.export_identity(cfg.model)  # the export loaded below, before hours of sampling (not after them)
    check_backend(cfg, sampling.pick(cfg.backend))  # a missing backend fails here, before data or model loading
    out = _out_dir(cfg)
    replace = check_out(cfg, out)  # before hours of sampling, not at the first write after them
    loaded = _load_tasks(cfg)
    check_model(cfg.model, "model", "lm", cfg.trust_remote_code, sampled=True)
    if cfg.rm:
        check_model(cfg.rm, "rm", "value", cfg.trust_remote_code)  # before the sampling, not after it
    if replace:
        clear_out(out)
    rows, stats = sample_rows(cfg, loaded, out)
    completions = out / "completions.jsonl"
    write_jsonl(completions, rows)
    if cfg.rm:
        rows = rm_mod.add_scores(str(completions), cfg.rm, batch_size=cfg.rm_batch_size,
                                 trust_remote_code=cfg.trust_remote_code)
    scored, summary = score_rows(rows, cfg.scoring, workers=cfg.workers, progress=True)
    write_jsonl(out / "scored.jsonl", scored)
    settings = {k: getattr(cfg, k) for k in ("n", "greedy", "temperature", "top_p", "repetition_penalty",
                                             "max_model_len", "max_new_tokens", "seed", "limit", "rm")}
    suites = {k: v for k, v in summary.items() if k not in ("id_avg", "ood_avg")}
    down = {"scoring": cfg.scoring, "suites": suites, "id_avg": summary.get("id_avg"),
            "ood_avg": summary.get("ood_avg"), "sampling": {**settings, **stats}, "export": made_from}
    result = update_result(out / "result.json", meta, downstream=down)
    shutil.rmtree(out / SAMPLED, ignore_errors=True)  # done: the next run samples afresh
    print(table(summary, f"{meta['model']} (scoring={cfg.scoring}, backend={stats['backend']})", cfg.n))
    print(f"wrote {completions}, {out / 'scored.jsonl'}, {out / 'result.json'}")
    return result


# --------------------------------------------------------------------------------------------------------- upstream


def upstream_settings(cfg: UpstreamConfig) -> int | str:
    """The upstream settings that need neither the model, the data nor this machine (the evaluation's and `evolm
    suite plan`'s check of an eval node, before any training; tasks, limit and dtype by ``upstream.check_settings``);
    returns lm-eval's batch size."""
    up.check_settings(list(cfg.tasks), limit=cfg.limit, dtype=cfg.dtype)
    batch = cfg.batch_size if cfg.batch_size == "auto" or cfg.batch_size.startswith("auto:") else None
    if batch is None:
        if not cfg.batch_size.isdecimal() or int(cfg.batch_size) < 1:
            raise ConfigError("batch_size", f"expected a positive integer or auto, got {cfg.batch_size!r}")
        batch = int(cfg.batch_size)
    return batch


def upstream(cfg: UpstreamConfig) -> dict:
    """lm-eval 0-shot on ``cfg.tasks``: writes upstream.json, merges the summary into result.json and prints the table.
    Returns the result JSON."""
    _model_dir(cfg.model)
    batch = upstream_settings(cfg)
    meta = _meta(cfg)
    made_from = hfdir.export_identity(cfg.model)  # the export the harness loads below
    replace = check_out(cfg, _out_dir(cfg))  # before the harness runs
    tasks_dir = up.tasks_dir_for(cfg.tasks_dir, cfg.data_dir)
    up.check(cfg.model, cfg.tasks, tasks_dir, cfg.data_dir, device=cfg.device)
    check_model(cfg.model, "model", "lm", cfg.trust_remote_code)
    if replace:  # another model's results go only once every setting and the data are known to be good
        clear_out(_out_dir(cfg))
    summary, raw = up.run(cfg.model, cfg.tasks, tasks_dir=tasks_dir, data_dir=cfg.data_dir, batch_size=batch,
                          limit=cfg.limit, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                          checked=True)
    out = _out_dir(cfg)
    write_json(out / "upstream.json", json.loads(json.dumps(raw, default=str)))
    summary["source"] = "local" if tasks_dir else "lm-eval built-in"
    summary["export"] = made_from
    result = update_result(out / "result.json", meta, upstream=summary)
    head = f"{'task':<16}{'acc':>8}{'acc_norm':>10}{'score':>8}{'n':>8}"
    lines = [f"{meta['model']} (lm-eval 0-shot)", head, "-" * len(head)]
    for t, m in summary["tasks"].items():
        norm = "-" if m["acc_norm"] is None else f"{m['acc_norm']:.2f}"
        lines.append(f"{t:<16}{m['acc']:>8.2f}{norm:>10}{m['score']:>8.2f}{m['n']:>8}")
    lines.append(f"{'avg':<16}{'':>8}{'':>10}{summary['avg']:>8.2f}")
    print("\n".join(lines))
    print(f"wrote {out / 'upstream.json'}, {out / 'result.json'}")
    return result


# ------------------------------------------------------------------------------------------------- embedded default


def demo(model: str, out: str, data_dir: str, limit: int = 4, n: int = 16, max_new_tokens: int = 64,
         **fields) -> dict:
    """The last step of `make demo`: hf backend, greedy + n samples on every suite in ``data_dir``, scored; prints the
    metrics table (from :func:`downstream`) and the plot path. ``fields``: more DownstreamConfig values (name, size,
    pretrain_tokens, stage, rm, workers, ...). Returns {name: path} of what the report wrote."""
    tasks = [s for s in SUITES if (Path(data_dir) / f"{s}.jsonl").is_file()]
    downstream(DownstreamConfig(model=model, out=out, data_dir=data_dir, tasks=tasks, limit=limit, n=n,
                                max_new_tokens=max_new_tokens, backend="hf", **fields))
    written = build(str(Path(out) / "result.json"), str(Path(out) / "report"))
    plot = next((written[k] for k in ("id_vs_ood", "maj_vs_pass", "tokens") if written.get(k)), None)
    print(f"plot: {plot or 'none (no data to draw)'}\nreport: {written['markdown']}")
    return written
