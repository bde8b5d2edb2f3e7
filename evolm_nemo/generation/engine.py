"""Batched generation with megatron-core's static inference engine (KV cache): megatron's GPU code path as shipped,
and on CPU (gloo) through the CPU layer, where it is tested.

    gen = Generator(model, tokenizer, max_seq=2048)          # model: a GPTModel (pp=1), any TP; on every TP rank
    gen.generate(["Q: 2+3=", "Hi"], max_new_tokens=32)       # greedy
    gen.generate(prompts, 32, temperature=1.0, top_p=0.9, seed=7, stop_strings=["\\n\\n"])

It is ``StaticInferenceEngine(legacy=True)`` + ``TextGenerationController`` + ``GPTInferenceWrapper`` over a
``StaticInferenceContext``: prompts are right-padded into static batches of up to ``max_batch``, prefilled up to the
shortest prompt, then decoded one token per step from the KV cache. Greedy equals the no-cache reference loop
``generation.greedy.greedy_ids`` token for token (tests/generation). Under tensor parallelism every TP rank calls
``generate`` with the same arguments; the logits are gathered on all of them and each samples the same tokens from
its identically seeded generator. (megatron's dynamic engine is not used: on CPU it fails to build and megatron
falls back to this static one.)

Completions stop at EOS (not included), after ``max_new_tokens``, when prompt + completion reaches ``max_seq``, or
at the first stop string (generation of that prompt ends there; the stop string is cut off, as vLLM does).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from evolm_nemo.data.tokenizer import MegatronHFTokenizer
from evolm_nemo.losses.rl import sampling_logits
from evolm_nemo.runtime.signals import import_megatron_inference
from evolm_nemo.tasks import cut_at_stop

@dataclass
class Completion:
    text: str  # decoded completion, cut before the first stop string
    ids: list[int]  # generated token ids (EOS excluded; the tokens of a matched stop string included)
    finish: str  # "eos" | "stop" | "length"
    log_probs: list[float] | None = None  # with return_log_probs: log p of each id (a final EOS has none)


def _megatron_tokenizer(tokenizer):
    return tokenizer if isinstance(tokenizer, MegatronHFTokenizer) else MegatronHFTokenizer(tokenizer)


def _controller_class():
    import_megatron_inference()
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class StopStringController(TextGenerationController):
        """megatron's controller plus stop strings: a prompt whose completion contains one is marked done (its
        static-batch row is then ignored, like after EOS). Only the completion's last few tokens are decoded per
        step, so the check is O(1) per token."""

        stop: tuple[str, ...] = ()
        stopped: set[int] = set()  # batch rows finished by a stop string (indices into the current static batch)
        sampled: tuple[float, float, int] | None = None  # (temperature, top_p, top_k): report log p of the
        #                                                          distribution that sampled
        _prompt_lengths: list[int] = []
        _budgets: list[int] = []
        _step_logp: list[torch.Tensor] = []

        def generate_all_output_tokens_static_batch(self, active_requests, active_streams=None):
            self._prompt_lengths = [len(r.prompt_tokens) for r in active_requests.values()]
            self._budgets = [r.sampling_params.num_tokens_to_generate for r in active_requests.values()]
            self.stopped = set()
            self._step_logp = []
            done = super().generate_all_output_tokens_static_batch(active_requests, active_streams)
            first = min(self._prompt_lengths, default=0)
            for row, request in enumerate(done.values()):
                request.stopped_by_string = row in self.stopped
                if self.sampled is not None and getattr(request, "generated_log_probs", None) is not None:
                    # step j sampled the token at position first + j; this row's k-th token sits at L_row + k
                    start = self._prompt_lengths[row] - first
                    request.generated_log_probs = [float(self._step_logp[start + k][row])
                                                   for k in range(len(request.generated_log_probs))]
            return done

        def sample_from_logits(self, last_token_logits, sampling_params=None, vocab_size=None, *args, **kwargs):
            ids = super().sample_from_logits(last_token_logits, sampling_params, vocab_size, *args, **kwargs)
            if self.sampled is not None:
                temperature, top_p, top_k = self.sampled
                x = sampling_logits(last_token_logits, temperature, top_p, keep=ids)
                if top_k > 0:  # megatron samples top-k from the tempered logits: the same cut, as the continuous one
                    kth = x.topk(top_k, dim=-1).values[:, -1:]
                    x = x.masked_fill(x < kth, float("-inf"))
                self._step_logp.append(torch.log_softmax(x, dim=-1).gather(-1, ids.long().unsqueeze(-1))
                                       .squeeze(-1).cpu())
            return ids

        def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                     is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
            done, lengths = super().update_generation_status(
                updated_prompts_tokens, generation_started, current_context_end_position, is_generation_done_tensor,
                generated_sequence_lengths, termination_id)
            if not self.stop:
                return done, lengths
            tail = 4 * max(len(s) for s in self.stop) + 4  # a character is at most 4 byte-level tokens
            end = current_context_end_position + 1
            for row in torch.nonzero(generation_started & ~done).flatten().tolist():
                if end - self._prompt_lengths[row] > self._budgets[row]:
                    continue  # past this row's budget (a longer prompt shares the batch): trimmed off, never a stop
                start = max(self._prompt_lengths[row], end - tail)
                text = self._detokenize(updated_prompts_tokens[row, start:end].tolist(), skip_special_tokens=False)
                if any(s in text for s in self.stop):
                    done[row] = True
                    self.stopped.add(row)
            return done, lengths

    return StopStringController


@contextlib.contextmanager
def _progress(enabled: bool):
    """The static engine draws its own tqdm bar ("static requests"); silence it unless ``enabled``."""
    from functools import partial

    import_megatron_inference()
    from megatron.core.inference.engines import static_engine

    original = static_engine.tqdm
    if not enabled:
        static_engine.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        static_engine.tqdm = original


class _Engine:
    """What both generation engines share: how a prompt is encoded, the text-only call, and a request's checks and
    token budgets. Subclasses set ``tokenizer`` (a ``MegatronHFTokenizer``), ``add_bos`` and ``max_seq`` through
    ``_set_tokenizer`` and implement ``complete``."""

    tokenizer: MegatronHFTokenizer
    add_bos: bool
    max_seq: int

    def _set_tokenizer(self, tokenizer, max_seq: int, progress: bool) -> None:
        self.tokenizer = _megatron_tokenizer(tokenizer)
        hf = self.tokenizer.hf
        # Prompts are encoded as evaluation encodes them: with BOS when the tokenizer adds one (Llama-2), else as is.
        self.add_bos = hf.bos_token_id is not None and hf("x")["input_ids"][:1] == [hf.bos_token_id]
        self.max_seq = int(max_seq)
        self.progress = progress and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as the engine feeds them."""
        ids = self.tokenizer.tokenize(prompt)
        return [self.tokenizer.hf.bos_token_id, *ids] if self.add_bos else ids

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop_strings: Sequence[str] | None = None) -> list[str]:
        """Completions of ``prompts`` (text only): greedy at temperature 0, else sampled with top-p or top-k."""
        return [c.text for c in self.complete(prompts, max_new_tokens, temperature, top_p, top_k, seed,
                                              stop_strings)]

    def complete(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop_strings: Sequence[str] | None = None,
                 return_log_probs: bool = False) -> list[Completion]:
        raise NotImplementedError

    def _request(self, prompts: Sequence[str], max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                 stop_strings: Sequence[str] | None) -> tuple[tuple[str, ...], list[list[int]], list[int]]:
        """(stop strings, each prompt's ids, each prompt's token budget), or ValueError for bad settings/prompts."""
        if not (math.isfinite(temperature) and temperature >= 0) or not 0.0 < top_p <= 1.0 or top_k < 0:
            # NaN fails every comparison: it would pass `temperature < 0` and sample garbage
            raise ValueError(f"bad sampling settings: temperature={temperature} top_p={top_p} top_k={top_k}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature > 0 and top_k > 0 and top_p < 1.0:
            raise ValueError("use top_p or top_k, not both")
        stop = tuple(s for s in (stop_strings or ()) if s)
        ids = [self.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.max_seq:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_seq={self.max_seq} leaves no room")
        return stop, ids, [min(int(max_new_tokens), self.max_seq - len(p)) for p in ids]

    def _finished(self, ids: list[int], finish: str, stop: tuple[str, ...],
                  log_probs: list[float] | None) -> Completion:
        """A finished sequence as a Completion: its text cut at the first stop string (then ``finish`` is "stop",
        also when the budget's last token completed it)."""
        text = self.tokenizer.detokenize(ids, skip_special_tokens=True)
        if stop and cut_at_stop(text, stop) != text:
            text, finish = cut_at_stop(text, stop), "stop"
        return Completion(text, ids, finish, log_probs)


class Generator(_Engine):
    """megatron-core static inference engine around one GPTModel (pp=1; TP any, sequence parallel switched off
    while generating), with KV cache.

    ``max_seq``: prompt + completion tokens (the KV cache length); ``max_batch``: prompts per static batch (the KV
    cache width). ``tokenizer``: an HF tokenizer or ``data.tokenizer.MegatronHFTokenizer``.
    """

    def __init__(self, model, tokenizer, max_seq: int, max_batch: int = 8, progress: bool = False):
        from megatron.core import parallel_state

        import_megatron_inference()
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )
        from megatron.core.utils import get_model_config, unwrap_model

        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("Generator supports pipeline parallel size 1 (tensor parallel any)")
        # megatron DDP -> its module (a Float16Module under bf16 is kept: it casts the logits back to fp32)
        self.model = model = model.module if hasattr(model, "ddp_config") else model
        self._inner = unwrap_model(model)  # the GPTModel
        self._set_tokenizer(tokenizer, max_seq, progress)
        self.max_batch = int(max_batch)
        config = get_model_config(model)
        wrapper_config = InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=config.params_dtype,
            inference_batch_times_seqlen_threshold=-1,  # pp=1: never split batches into micro-batches
            padded_vocab_size=self._inner.vocab_size,
            inference_max_requests=self.max_batch,
            inference_max_seq_length=self.max_seq,
        )
        context = StaticInferenceContext.from_config(wrapper_config)
        wrapped = GPTInferenceWrapper(model, wrapper_config, context)
        self.controller = _controller_class()(wrapped, self.tokenizer)
        with warnings.catch_warnings():  # "the static engine will be deprecated": the dynamic one needs CUDA
            warnings.simplefilter("ignore")
            self.engine = StaticInferenceEngine(self.controller, max_batch_size=self.max_batch, legacy=True)
        # The legacy engine reseeds torch's global generator on every call; sampling uses the controller's own
        # generator, so leave the global one (dropout, data order) alone.
        self.engine.random_seed = None

    def complete(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop_strings: Sequence[str] | None = None,
                 return_log_probs: bool = False) -> list[Completion]:
        """Like ``generate``, with the token ids and why each completion ended; ``return_log_probs`` adds the log-prob
        of every generated token under the distribution it was sampled from (tempered, top-p or top-k truncated:
        ``losses.rl.sampling_logits``); greedy (temperature 0) reports the untempered model's."""
        from megatron.core.inference.sampling_params import SamplingParams
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        stop, ids, budgets = self._request(prompts, max_new_tokens, temperature, top_p, top_k, stop_strings)
        # prompts with the same token budget share static batches
        results: list[Completion | None] = [None] * len(prompts)
        self.controller.sampling_rng.manual_seed(int(seed))
        self.controller.stop = stop
        self.controller.sampled = ((float(temperature), float(top_p), int(top_k))
                                   if return_log_probs and temperature > 0 else None)
        was_training = getattr(self.model, "training", False)
        # megatron's static engine refuses sequence parallelism (dense models): switch it off while generating
        sp = self._inner.config.sequence_parallel
        if sp:
            set_model_to_sequence_parallel(self._inner, False)
        try:
            with _progress(self.progress):
                for budget in sorted(set(budgets)):
                    rows = [i for i, b in enumerate(budgets) if b == budget]
                    if budget <= 0:
                        for i in rows:
                            results[i] = Completion("", [], "length")
                        continue
                    params = SamplingParams(
                        temperature=float(temperature) if temperature > 0 else 1.0,
                        top_k=1 if temperature == 0 else int(top_k),
                        top_p=0.0 if temperature == 0 or top_k > 0 or top_p >= 1.0 else float(top_p),
                        num_tokens_to_generate=budget,
                        return_log_probs=return_log_probs,
                    )
                    requests = [self.engine.add_request(prompt=prompts[i], add_BOS=self.add_bos,
                                                       sampling_params=params) for i in rows]
                    self.engine.run_engine()
                    pool = self.engine.scheduler.completed_request_pool
                    for i, rid in zip(rows, requests):
                        results[i] = self._completion(pool.pop(rid), budget, stop)
        finally:
            self.controller.stop = ()
            self.controller.sampled = None
            self.model.train(was_training)
            if sp:
                set_model_to_sequence_parallel(self._inner, True)
        return results  # type: ignore[return-value]

    def _completion(self, request, budget: int, stop) -> Completion:
        new = [int(t) for t in request.generated_tokens.tolist()]
        lps = getattr(request, "generated_log_probs", None)
        lps = [float(x) for x in lps] if lps is not None else None
        finish = "stop" if getattr(request, "stopped_by_string", False) else (
            "length" if len(new) >= budget else "eos")
        return self._finished(new, finish, stop, lps)
