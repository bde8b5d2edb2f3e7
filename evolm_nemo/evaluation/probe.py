"""Capability probes of the live model during training (checkpoint dynamics): no export, no second process.

* **Upstream**: a few hundred 0-shot items per task through lm-eval itself (its task YAMLs, prompts, metrics and
  request construction; :class:`LiveLM` answers its loglikelihood requests with the megatron model in memory,
  tokenising exactly as lm-eval's ``hf`` model does, so a probe equals ``evolm eval upstream`` on the exported
  checkpoint -- tested).
* **Downstream**: greedy completions of a few dozen problems per suite through the continuous-batching engine
  (``generation.continuous``), judged by the shared answer checker (:func:`evolm_nemo.answers.judge`), the same
  checker evaluation uses.

Both run on every rank of the training job with identical inputs (tensor-parallel ranks take part in every forward;
pp=1). Results are percentages, keyed ``probe_up_<task>``, ``probe_up_avg``, ``probe_down_<suite>``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from evolm_nemo.answers import gold_answer, judge
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation import upstream as up
from evolm_nemo.evaluation.tasks import get_task
from evolm_nemo.evaluation.tasks import load_problems as task_problems
from evolm_nemo.generation.continuous import ContinuousGenerator


def _tp_gather(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this tensor-parallel rank's shard (identity at tp=1)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        return gather_from_tensor_model_parallel_region(logits)
    return logits


@contextlib.contextmanager
def inference_mode(model):
    """eval(), no grad, sequence parallel off (for arbitrary lengths); restored after."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel
    from megatron.core.utils import unwrap_model

    inner = unwrap_model(model)
    was_training = inner.training
    sp = inner.config.sequence_parallel
    inner.eval()
    if sp:
        set_model_to_sequence_parallel(inner, False)
    try:
        with torch.no_grad():
            yield inner
    finally:
        if sp:
            set_model_to_sequence_parallel(inner, True)
        inner.train(was_training)


def _lm_base():
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ConfigError("probe.upstream", "lm-eval is not installed: pip install -c constraints.txt 'lm-eval[hf]'")
    return TemplateLM


def live_lm(model, tokenizer, max_length: int, batch_size: int = 16):
    """An lm-eval model answering loglikelihood requests with the megatron ``model`` as it is now."""

    class LiveLM(_lm_base()):
        """lm-eval ``TemplateLM`` over a megatron GPTModel: context/continuation encoding as lm-eval's ``hf`` model
        (the tokenizer's own special tokens, BOS when it adds one; trailing context spaces moved to the
        continuation by lm-eval), left-truncated to ``max_length + 1`` tokens, log-probs in fp32."""

        backend = "causal"

        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self._max_length, self.batch_size = int(max_length), int(batch_size)

        @property
        def eot_token_id(self):
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self):
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self):
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return getattr(self.tokenizer, "name_or_path", "tokenizer")

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                extra = {"add_special_tokens": False}  # the string already starts with BOS (lm-eval's rule)
            ids = self.tokenizer.encode(string, **extra)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            out: list = [None] * len(requests)
            with inference_mode(self.model) as inner:
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    inps, conts = [], []
                    for i in chunk:
                        _, ctx, cont = requests[i]
                        if not ctx or not cont:
                            raise ValueError("lm-eval request with an empty context or continuation")
                        inps.append((ctx + cont)[-(self._max_length + 1):][:-1])
                        conts.append(cont)
                    width = max(len(x) for x in inps)
                    tokens = torch.zeros(len(inps), width, dtype=torch.long)
                    for row, ids in enumerate(inps):
                        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                    positions = torch.arange(width, dtype=torch.long).unsqueeze(0).expand_as(tokens)
                    logits = _tp_gather(inner(tokens, positions, None)).float()
                    logp = torch.log_softmax(logits, dim=-1)
                    for row, i in enumerate(chunk):
                        n, cont = len(inps[row]), conts[row]
                        span = logp[row, n - len(cont):n]
                        want = torch.tensor(cont, dtype=torch.long)
                        greedy = bool((span.argmax(-1) == want).all())
                        out[i] = (float(span.gather(-1, want.unsqueeze(-1)).sum()), greedy)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("the upstream probe takes multiple-choice tasks (loglikelihood requests)")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("the upstream probe takes multiple-choice tasks (loglikelihood requests)")

    return LiveLM()


def upstream(model, tokenizer, tasks: Sequence[str], tasks_dir: Optional[str], data_dir: Optional[str],
             limit: Optional[int], max_length: int, batch_size: int = 16) -> dict:
    """lm-eval 0-shot on the live model: :func:`evolm_nemo.evaluation.upstream.summarize`'s shape (percent)."""
    import os

    # Every rank computes the same results itself; lm-eval returns them only where LOCAL_RANK is 0 (its TP rule).
    local = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        return up.evaluate(live_lm(model, tokenizer, max_length, batch_size), list(tasks), tasks_dir, data_dir,
                           limit=limit, quiet=True)[0]
    finally:
        if local is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = local


@dataclass
class Problems:
    """One downstream suite's probe problems: prompts (the task's template), gold answers, stop strings."""
    suite: str
    prompts: list[str]
    golds: list[str]
    stop: tuple[str, ...]


def load_problems(suite: str, data_dir: Optional[str], limit: int, template: Optional[str] = None) -> Problems:
    """``<data_dir>/<suite>.jsonl`` in EvoLM's cooked schema (or the task's hub source without data_dir); prompts from
    the suite's template, or ``template`` (``{problem}`` replaced) when given."""
    from pathlib import Path

    task = get_task(suite)
    path = None if data_dir is None else str(Path(data_dir) / f"{suite}.jsonl")
    rows = task_problems(task, path, limit)
    form = template or task.template
    return Problems(task.name, [form.replace("{problem}", r["problem"]) for r in rows],
                    [gold_answer(task.name, r) for r in rows], tuple(task.stop))


MIN_ROOM = 16  # completion tokens a probe problem must have room for (fewer: left out of the probe)


def fitting(problems: Problems, tokenizer, max_seq: int, max_new_tokens: int, verbose: bool = True) -> Problems:
    """The problems whose prompt leaves room for an answer within ``max_seq`` tokens (a note names how many were left
    out; none left: a one-line error)."""
    room = min(int(max_new_tokens), MIN_ROOM)
    keep = [i for i, p in enumerate(problems.prompts) if len(tokenizer(p)["input_ids"]) + room <= max_seq]
    if not keep:
        raise ConfigError("probe.downstream", f"no {problems.suite} problem leaves {room} tokens for an answer within "
                                              f"model.seq_length={max_seq}; choose shorter problems")
    if len(keep) < len(problems.prompts) and verbose:
        print(f"[evolm] probe: {len(problems.prompts) - len(keep)} of {len(problems.prompts)} {problems.suite} "
              f"problems leave fewer than {room} tokens for an answer within model.seq_length={max_seq}; probing "
              f"the other {len(keep)}", flush=True)
    return Problems(problems.suite, [problems.prompts[i] for i in keep], [problems.golds[i] for i in keep],
                    problems.stop)


def downstream(model, tokenizer, problems: Problems, max_new_tokens: int, max_seq: int, mode: str = "evolm",
               max_batch: int = 32) -> tuple[float, list[str]]:
    """Greedy accuracy (fraction) of ``problems`` on the live model, judged by the shared checker; and the texts."""
    texts = ContinuousGenerator(model, tokenizer, max_seq=max_seq, max_batch=max_batch).generate(
        problems.prompts, max_new_tokens, stop_strings=problems.stop)  # greedy; the engine leaves torch's RNG alone
    right = sum(judge(problems.suite, t, g, mode) for t, g in zip(texts, problems.golds))
    return right / max(len(problems.prompts), 1), texts
