"""Continuous batching over the live megatron model: a finished sequence frees its slot at once, and the next prompt
takes it -- no step pays for a sequence that has ended (what verl, NeMo-RL and vLLM do; megatron-core's dynamic
engine does it on CUDA only). Same API as ``engine.Generator``:

    gen = ContinuousGenerator(model, tokenizer, max_seq=2048, max_batch=64)
    gen.complete(prompts, 512, temperature=1.0, top_p=0.9, seed=7, return_log_probs=True)

How it works. The model is megatron's own GPTModel (embedding, decoder layers, output layer, any TP), called with two
things swapped for the duration of a call: each layer's core attention becomes a ``_CachedAttention`` that writes the
new keys/values into a per-slot KV cache and attends over that slot's cached positions only, and RoPE is given per
row (``[s, b, 1, d]``, rows at different positions), cut from megatron's own rotary table. The active slots are
always the first ``n`` rows of the cache: when a sequence ends, the last active row is copied into its slot
(compaction), so a decode step is one forward over exactly the live sequences. Waiting prompts (longest first, so
similar lengths are prefilled together) are prefilled in one forward each time enough slots are free.

Sampling is counter-based: the token of request ``r`` at its ``k``-th step is drawn by inverse CDF with a uniform
that depends only on ``(seed, r, k)`` (a 32-bit integer hash), never on which slot, step or batch it ran in. So the
samples for a seed do not depend on ``max_batch``, on the order requests are admitted, on the other prompts of the
call, or on how a batch is split over calls (``first_request`` numbers a slice's requests as in the whole) (up to float rounding of the logits, which the tests find equal on CPU). Greedy (temperature 0) is argmax
and equals ``generation.greedy.greedy_ids`` token for token. Log-probs describe the distribution sampled from
(``losses.rl.sampling_logits``: tempered, top-p truncated), as the trainer recomputes them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from evolm_nemo.generation.engine import Completion, _Engine
from evolm_nemo.losses.rl import sampling_logits
from evolm_nemo.runtime.cpu_compat import device_mode_paused

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (``lowbias32``) on int64 tensors holding values < 2**32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniforms(seed: int, requests: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row (float64), a function of ``(seed, request, step)`` only."""
    key = _mix32(torch.full_like(requests, int(seed) & _M32) ^ 0x9E3779B9)
    key = _mix32(key ^ (requests & _M32))
    key = _mix32(key ^ (steps & _M32) ^ 0x85EBCA6B)
    return (key.double() + 0.5) / 2.0 ** 32


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, u: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, log p(ids))`` for rows of ``logits [b, V]``: argmax at temperature 0 (log p of the untempered model),
    else inverse-CDF sampling with the uniforms ``u [b]`` from the tempered distribution cut to the top-p nucleus
    (``sampling_logits``) or to the top ``top_k``."""
    if temperature == 0:
        ids = logits.argmax(dim=-1)
        return ids, torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    x = sampling_logits(logits, temperature, top_p)
    if top_k > 0:
        kth = x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    logp = torch.log_softmax(x, dim=-1)
    cdf = logp.double().exp().cumsum(dim=-1)
    ids = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True).squeeze(-1)
    ids = ids.clamp(max=x.shape[-1] - 1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class _Cache:
    """Keys/values of every layer, ``[slots, kv_heads, max_seq, head_dim]`` (allocated on first write), and what the
    forward under way is: a prefill of the batch's rows from ``start`` on, at positions ``0..s-1`` (``pos`` None), or
    a decode step of rows ``[0, b)``, each at its own position ``pos[r]``."""

    def __init__(self, slots: int, max_seq: int):
        self.slots, self.max_seq = slots, max_seq
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.start, self.pos = 0, None

    def move(self, src: int, dst: int, length: int) -> None:
        for t in (*self.k.values(), *self.v.values()):
            t[dst, :, :length] = t[src, :, :length]


class _CachedAttention(torch.nn.Module):
    """Core attention with the per-slot KV cache (inputs ``[s, b, heads, head_dim]`` with RoPE applied)."""

    def __init__(self, cache: _Cache, layer: int, scale: float):
        super().__init__()
        self.cache, self.layer, self.scale = cache, layer, scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        c = self.cache
        sq, b = query.shape[0], query.shape[1]
        if self.layer not in c.k:
            shape = (c.slots, key.shape[2], c.max_seq, key.shape[3])
            c.k[self.layer] = key.new_zeros(shape)
            c.v[self.layer] = value.new_zeros(shape)
        kc, vc = c.k[self.layer], c.v[self.layer]
        q = query.permute(1, 2, 0, 3)  # [b, heads, s, d]
        if c.pos is None:  # prefill: rows start.., positions 0..sq-1
            rows = slice(c.start, c.start + b)
            kc[rows, :, :sq] = key.permute(1, 2, 0, 3)
            vc[rows, :, :sq] = value.permute(1, 2, 0, 3)
            k, v, mask, causal = kc[rows, :, :sq], vc[rows, :, :sq], None, sq > 1
        else:  # decode: rows 0..b-1, one query each at its own position
            at = torch.arange(b, device=kc.device)
            kc[at, :, c.pos] = key[0]
            vc[at, :, c.pos] = value[0]
            length = int(c.pos.max()) + 1
            k, v = kc[:b, :, :length], vc[:b, :, :length]
            mask = (torch.arange(length, device=kc.device)[None, :] <= c.pos[:, None])[:, None, None, :]
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


class _Slot:
    __slots__ = ("request", "prompt_len", "budget", "ids", "logps", "finish")

    def __init__(self, request: int, prompt_len: int, budget: int):
        self.request, self.prompt_len, self.budget = request, prompt_len, budget
        self.ids: list[int] = []
        self.logps: list[float] = []
        self.finish: str | None = None


class ContinuousGenerator(_Engine):
    """Continuous batching on one GPTModel (pp=1; TP any, sequence parallel switched off while generating).

    ``max_seq``: prompt + completion tokens (the KV cache length); ``max_batch``: sequences decoded at once (the KV
    cache width). ``tokenizer``: an HF tokenizer or ``data.tokenizer.MegatronHFTokenizer``."""

    def __init__(self, model, tokenizer, max_seq: int, max_batch: int = 8, progress: bool = False):
        from megatron.core import parallel_state
        from megatron.core.utils import unwrap_model

        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("ContinuousGenerator supports pipeline parallel size 1 (tensor parallel any)")
        self.model = model.module if hasattr(model, "ddp_config") else model
        self._inner = unwrap_model(self.model)
        self._set_tokenizer(tokenizer, max_seq, progress)
        self.eos_id = self.tokenizer.hf.eos_token_id
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.refill_at = max(1, self.max_batch // 8)  # free slots that trigger a prefill while others decode
        # the last call's work: forwards, and decode rows (each one a live sequence's next token: no idle slot)
        self.stats = _new_stats()

    # ------------------------------------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _swapped(self, cache: _Cache):
        """Each layer's core attention -> the cached one; unfused RoPE (per-row frequencies); no sequence parallel;
        eval mode. Everything is put back afterwards."""
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        inner, config = self._inner, self._inner.config
        originals = []
        for i, layer in enumerate(inner.decoder.layers):
            core = layer.self_attention.core_attention
            scale = getattr(core, "softmax_scale", None) or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
            originals.append(core)
            layer.self_attention.core_attention = _CachedAttention(cache, i, scale)
        flags = {k: getattr(config, k) for k in ("apply_rope_fusion", "fused_single_qkv_rope") if hasattr(config, k)}
        for k in flags:
            setattr(config, k, False)
        sp, was_training = config.sequence_parallel, self.model.training
        if sp:
            set_model_to_sequence_parallel(inner, False)
        self.model.eval()
        try:
            yield
        finally:
            for layer, core in zip(inner.decoder.layers, originals):
                layer.self_attention.core_attention = core
            for k, v in flags.items():
                setattr(config, k, v)
            if sp:
                set_model_to_sequence_parallel(inner, True)
            self.model.train(was_training)

    def _logits(self, ids: torch.Tensor, pos: torch.Tensor, rope: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``[b, V]`` at column ``last[r]`` of each row of ``ids [b, s]`` (positions ``pos``)."""
        inner = self._inner
        hidden = inner.embedding(input_ids=ids, position_ids=pos)  # [s, b, h]
        hidden = inner.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope[pos.t()])
        hidden = hidden[last, torch.arange(ids.shape[0], device=hidden.device)][None]  # [1, b, h]
        weight = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights else None
        logits, _ = inner.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[0].float()

    def complete(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, stop_strings: Sequence[str] | None = None,
                 return_log_probs: bool = False, first_request: int = 0) -> list[Completion]:
        """Like ``generate``, with the token ids and why each completion ended; ``return_log_probs`` adds the log-prob
        of every generated token under the distribution it was sampled from (greedy: the untempered model's).
        ``first_request``: the sampling key of the first prompt (the others follow it), so a call given a slice
        ``prompts[j:]`` with ``first_request=j`` samples what one call given all of them did for that slice (data-
        parallel ranks each sampling their part of one batch)."""
        if isinstance(first_request, bool) or not isinstance(first_request, int) or first_request < 0:
            raise ValueError(f"first_request must be an integer >= 0, got {first_request!r}")
        stop, encoded, budgets = self._request(prompts, max_new_tokens, temperature, top_p, top_k, stop_strings)
        results: list[Completion | None] = [None] * len(prompts)
        self.stats = stats = _new_stats()
        for i, b in enumerate(budgets):
            if b <= 0:
                results[i] = Completion("", [], "length", [] if return_log_probs else None)
        waiting = sorted((i for i, b in enumerate(budgets) if b > 0), key=lambda i: -len(encoded[i]))
        if not waiting:
            return results  # type: ignore[return-value]
        slots = min(self.max_batch, len(waiting))
        need = max(len(encoded[i]) + budgets[i] for i in waiting)
        cache = _Cache(slots, need)
        device = next(self._inner.parameters()).device
        rope = self._inner.rotary_pos_emb(need)[:, 0]  # [need, 1, d]: megatron's own table, indexed per row
        tail = 4 * max((len(s) for s in stop), default=0) + 4  # a character is at most 4 byte-level tokens
        active: list[_Slot] = []
        bar = _bar(len(waiting), self.progress)
        temp, tp = float(temperature), float(top_p)

        def take(rows: list[_Slot], logits: torch.Tensor) -> None:
            steps = torch.tensor([len(s.ids) for s in rows], dtype=torch.int64)
            reqs = torch.tensor([first_request + s.request for s in rows], dtype=torch.int64)
            ids, logp = sample(logits, temp, tp, int(top_k), uniforms(seed, reqs, steps))
            for s, t, lp in zip(rows, ids.tolist(), logp.tolist()):
                if t == self.eos_id:
                    s.finish = "eos"
                    continue
                s.ids.append(t)
                s.logps.append(lp)
                if stop and any(x in self.tokenizer.detokenize(s.ids[-tail:], skip_special_tokens=False)
                                for x in stop):
                    s.finish = "stop"
                elif len(s.ids) >= s.budget:
                    s.finish = "length"

        def retire() -> None:
            """Finished rows leave; the last active row moves into each freed slot (its cache row with it)."""
            i = 0
            while i < len(active):
                if active[i].finish is None:
                    i += 1
                    continue
                done = active[i]
                results[done.request] = self._completion(done, stop, return_log_probs)
                bar.update(1)
                last = len(active) - 1
                if i != last:
                    cache.move(last, i, active[last].prompt_len + len(active[last].ids))
                    active[i] = active[last]
                active.pop()

        with torch.no_grad(), self._swapped(cache), device_mode_paused():
            while waiting or active:
                free = slots - len(active)
                if waiting and free >= min(len(waiting), self.refill_at if active else 1):
                    batch = [waiting.pop(0) for _ in range(min(free, len(waiting)))]
                    width = max(len(encoded[i]) for i in batch)
                    ids = torch.zeros(len(batch), width, dtype=torch.int64)
                    for r, i in enumerate(batch):
                        ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                    new = [_Slot(i, len(encoded[i]), budgets[i]) for i in batch]
                    cache.start, cache.pos = len(active), None
                    pos = torch.arange(width, dtype=torch.int64).expand(len(batch), width).to(device)
                    last = torch.tensor([s.prompt_len - 1 for s in new], device=device)
                    take(new, self._logits(ids.to(device), pos, rope, last))
                    active.extend(new)
                    stats["prefills"] += 1
                    stats["max_active"] = max(stats["max_active"], len(active))
                    retire()
                    continue
                pos = torch.tensor([s.prompt_len + len(s.ids) - 1 for s in active], dtype=torch.int64,
                                   device=device)
                cache.start, cache.pos = 0, pos
                ids = torch.tensor([[s.ids[-1]] for s in active], dtype=torch.int64, device=device)
                take(active, self._logits(ids, pos[:, None], rope, torch.zeros_like(pos)))
                stats["decode_steps"] += 1
                stats["decode_rows"] += len(active)
                retire()
        bar.close()
        return results  # type: ignore[return-value]

    def _completion(self, s: _Slot, stop, return_log_probs: bool) -> Completion:
        return self._finished(list(s.ids), s.finish, stop, list(s.logps) if return_log_probs else None)


def _new_stats() -> dict:
    """The last ``complete`` call's counts: prefill batches, decode steps, rows decoded, most slots in use."""
    return {"prefills": 0, "decode_steps": 0, "decode_rows": 0, "max_active": 0}


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="seq", disable=not enabled, leave=False)
