"""Sample completions from an HF model directory with one of three backends: ``trtllm``, ``vllm`` or ``hf``.

EvoLM's decoding settings are the defaults: greedy (T=0, n=1) and sampled (T=1.0, top_p=1.0, n=16), repetition
penalty 1.1, max model length 2048 (prompt + completion), seed 42. Every backend returns, per prompt, ``n`` texts cut
at the first EOS and then at the first stop string (the stop string itself excluded, as vLLM does).

vllm and tensorrt_llm are imported only inside the functions that use them (GPU containers only).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.tasks import STOP, cut_at_stop

# backend -> (python module it needs, how to get it). "auto" tries them in this order: fastest first.
BACKENDS = {
    "trtllm": ("tensorrt_llm", "run inside the NGC TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release) "
               "or `pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com` on a CUDA machine"),
    "vllm": ("vllm", "run inside the vLLM container (vllm/vllm-openai) or `pip install vllm` on a CUDA machine"),
    "hf": ("transformers", "pip install transformers torch"),
}


@dataclass(frozen=True)
class Spec:
    """Decoding settings; the defaults are EvoLM's greedy setting."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    max_model_len: int = 2048  # prompt + completion tokens
    max_new_tokens: int | None = None  # extra cap on completion tokens; None: fill up to max_model_len
    seed: int = 42
    stop: tuple[str, ...] = STOP

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def budget(spec: Spec, prompt_len: int) -> int:
    """Completion tokens allowed after a prompt of ``prompt_len`` tokens (0 when the prompt fills the window)."""
    room = max(spec.max_model_len - prompt_len, 0)
    return room if spec.max_new_tokens is None else min(room, spec.max_new_tokens)


def prompt_seed(seed: int, key: int) -> int:
    """The sampling seed of the prompt at position ``key`` of a call: its samples depend on (seed, position) only,
    not on the batch size, the chunking or the engine's scheduling."""
    return (int(seed) * 1_000_003 + int(key)) % (2 ** 31)


def installed(backend: str) -> bool:
    module = BACKENDS[backend][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pick(backend: str) -> str:
    """Resolve ``auto`` to the fastest usable backend; a requested backend that is missing is a ConfigError."""
    if backend == "auto":
        for name in ("trtllm", "vllm"):
            if installed(name) and _cuda():
                return name
        return "hf"
    if backend not in BACKENDS:
        raise ConfigError("backend", f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if not installed(backend):
        module, how = BACKENDS[backend]
        raise ConfigError("backend", f"{backend} needs the `{module}` package, which is not installed: {how}")
    if backend != "hf" and not _cuda():
        raise ConfigError("backend", f"{backend} needs a CUDA GPU; none is visible (use backend=hf on CPU)")
    return backend


class Progress:
    """tqdm bar over prompts with ETA and generated tokens/s."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True)
        self.tokens = 0
        self.start = time.perf_counter()

    def update(self, prompts: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(prompts)

    def close(self) -> float:
        self.bar.close()
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


class Sampler:
    """Common interface: ``generate(prompts, spec) -> [[n texts] per prompt]``; ``stats`` holds the last run's."""

    name = "base"

    def __init__(self):
        self.stats: dict = {}

    def generate(self, prompts: Sequence[str], spec: Spec, desc: str = "sampling") -> list[list[str]]:
        ids = [self.encode(p) for p in prompts]
        # A prompt that leaves no room in max_model_len gets n empty completions (the engines would refuse it).
        fit = [i for i in range(len(prompts)) if budget(spec, len(ids[i])) > 0]
        if len(fit) < len(prompts):
            print(f"warning: {len(prompts) - len(fit)} prompt(s) fill max_model_len={spec.max_model_len}; "
                  "their completions are empty", file=sys.stderr)
        bar = Progress(len(prompts), f"{desc} ({self.name}, n={spec.n})")
        bar.update(len(prompts) - len(fit), 0)
        t0 = time.perf_counter()
        try:
            got = self._generate([prompts[i] for i in fit], [ids[i] for i in fit], spec, bar, fit) if fit else []
        finally:
            tok_s = bar.close()
        self.stats = {"backend": self.name, "prompts": len(prompts), "n": spec.n, "tokens": bar.tokens,
                      "seconds": round(time.perf_counter() - t0, 3), "tokens_per_s": round(tok_s, 1)}
        out = [[""] * spec.n for _ in prompts]
        for i, texts in zip(fit, got):
            out[i] = [cut_at_stop(t, spec.stop) for t in texts]
        return out

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids as the engine will see them (BOS included when the tokenizer adds one)."""
        raise NotImplementedError

    def _generate(self, prompts: list[str], ids: list[list[int]], spec: Spec, bar: Progress,
                  keys: list[int]) -> list[list[str]]:
        """``n`` completions of each prompt; ``keys``: each prompt's position in the call (its seed: ``prompt_seed``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (GPU memory) before another model is loaded."""


def eos_ids(model_dir: str, tok) -> list[int]:
    """The EOS ids the files of ``model_dir`` name: the tokenizer's ``eos_token`` and ``eos_token_id`` (an id or a
    list) in generation_config.json and config.json. Read from the files, not from a loaded model, so that the
    evaluation checks them before loading it (``evaluate.check_model``); the hf sampler ends completions at these
    and at its loaded generation config's."""
    ids = {tok.eos_token_id}
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(model_dir) / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids |= set(value if isinstance(value, list) else [value])
    return sorted(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


class HFSampler(Sampler):
    """transformers ``generate``: batched, KV cache, left padding; bf16 on GPU, fp32 on CPU.

    Prompts are batched longest first, ``batch_size // n`` per call; every prompt of a batch gets the completion
    budget of the batch's longest prompt (so prompt + completion never exceeds ``max_model_len``).
    """

    name = "hf"

    def __init__(self, model_dir: str, batch_size: int = 64, device: str | None = None,
                 trust_remote_code: bool = False):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left", trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        gen_eos = self.model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | set(eos_ids(model_dir, self.tok))
        self.eos = sorted(e for e in eos if e is not None)
        # Decode only with our Spec: a checkpoint's generation_config.json (top_k, stop strings, ...) must not leak in.
        self.model.generation_config = GenerationConfig(bos_token_id=self.tok.bos_token_id, eos_token_id=self.eos)
        # Pad with BOS when every prompt starts with it: the repetition penalty then sees the same token set with or
        # without padding, so a padded batch decodes exactly like a single prompt. Else the usual pad/EOS.
        probe = self.tok("x").input_ids
        bos = self.tok.bos_token_id
        self.pad = bos if bos is not None and probe[:1] == [bos] else (self.tok.pad_token_id or self.eos[0])

    def encode(self, prompt):
        return self.tok(prompt).input_ids

    def _generate(self, prompts, ids, spec, bar, keys):
        import torch

        out: list[list[str]] = [[] for _ in prompts]
        # Longest first: similar lengths share a batch (less padding) and an out-of-memory shows up at once.
        order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
        # Greedy prompts share batches; sampled ones run one prompt (its n samples) per call, seeded by its position:
        # transformers draws one random stream for the whole batch, so batch-mates would change each other's samples.
        per_batch = max(1, self.batch_size // spec.n) if spec.greedy else 1
        for start in range(0, len(order), per_batch):
            chunk = order[start:start + per_batch]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            # each row to its own budget (max_model_len less its own prompt), not the longest batch-mate's
            budgets = [budget(spec, len(ids[i])) for i in chunk]
            gen = self._gen_kwargs(spec, max(budgets))
            if not spec.greedy:
                torch.manual_seed(prompt_seed(spec.seed, keys[chunk[0]]))
            with torch.inference_mode():
                seqs = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                           tokenizer=self.tok, **gen)
            seqs = seqs[:, width:].view(len(chunk), spec.n, -1).tolist()
            tokens = 0
            for row, i in enumerate(chunk):
                texts = []
                for toks in seqs[row]:
                    toks, count = self._trim(toks[:budgets[row]])
                    tokens += count
                    texts.append(self.tok.decode(toks, skip_special_tokens=False))
                out[i] = texts
            bar.update(len(chunk), tokens)
        return out

    def _gen_kwargs(self, spec: Spec, max_new: int) -> dict:
        kw = dict(max_new_tokens=max_new, num_return_sequences=spec.n, repetition_penalty=spec.repetition_penalty,
                  eos_token_id=self.eos, pad_token_id=self.pad, use_cache=True,
                  stop_strings=list(spec.stop) or None)
        if spec.greedy:
            kw.update(do_sample=False)
        else:  # top_k=0 turns off transformers' default top-k of 50 (vLLM/EvoLM sample from the full distribution)
            kw.update(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0)
        return kw

    def _trim(self, toks: list[int]) -> tuple[list[int], int]:
        """Tokens before the first EOS, without the padding that follows a stop string; and the count generated."""
        cut = next((k for k, t in enumerate(toks) if t in self.eos), None)
        body = toks if cut is None else toks[:cut]
        n = len(body)
        while n and body[n - 1] == self.pad:
            n -= 1
        return body[:n], n + (cut is not None)

    def close(self) -> None:
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _EngineSampler(Sampler):
    """vLLM and TensorRT-LLM share the offline ``LLM.generate(prompts, [SamplingParams])`` shape: chunked calls."""

    llm = None
    chunk = 256

    def _params(self, spec: Spec, n_prompt_tokens: int, seed: int):
        raise NotImplementedError

    def _generate(self, prompts, ids, spec, bar, keys):
        out = []
        for start in range(0, len(prompts), self.chunk):
            part = prompts[start:start + self.chunk]
            params = [self._params(spec, len(p_ids), prompt_seed(spec.seed, key))  # per request: not the chunking's
                      for p_ids, key in zip(ids[start:start + self.chunk], keys[start:start + self.chunk])]
            results = self.llm.generate(part, params, use_tqdm=False)
            out += [[o.text for o in r.outputs] for r in results]
            bar.update(len(part), sum(len(o.token_ids) for r in results for o in r.outputs))
        return out


class VLLMSampler(_EngineSampler):
    """vLLM offline ``LLM.generate``; max_tokens is set per prompt (vLLM's default is 16)."""

    name = "vllm"

    def __init__(self, model_dir: str, max_model_len: int = 2048, seed: int = 42, chunk: int = 256,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.8):
        super().__init__()
        from vllm import LLM

        self.llm = LLM(model=model_dir, seed=seed, max_model_len=max_model_len, dtype="auto",
                       trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        self.tok = self.llm.get_tokenizer()
        self.chunk = chunk

    def encode(self, prompt):
        return self.tok(prompt).input_ids

    def _params(self, spec, n_prompt_tokens, seed):
        from vllm import SamplingParams

        return SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                              max_tokens=budget(spec, n_prompt_tokens), repetition_penalty=spec.repetition_penalty,
                              stop=list(spec.stop), skip_special_tokens=False, seed=seed)

    def close(self) -> None:
        del self.llm


class TRTLLMSampler(_EngineSampler):
    """TensorRT-LLM LLM API over an HF directory (or a built engine dir); max_tokens always set (default is 32)."""

    name = "trtllm"

    def __init__(self, model_dir: str, max_model_len: int = 2048, chunk: int = 256, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1):
        super().__init__()
        from tensorrt_llm import LLM

        self.llm = LLM(model=model_dir, max_seq_len=max_model_len, trust_remote_code=trust_remote_code,
                       tensor_parallel_size=tensor_parallel_size)
        self.tok = self.llm.tokenizer
        self.chunk = chunk

    def encode(self, prompt):
        return self.tok.encode(prompt)

    def _params(self, spec, n_prompt_tokens, seed):
        from tensorrt_llm import SamplingParams

        # Greedy is top_k=1 (TRT-LLM wants temperature > 0); sampling is top_k=0: the full distribution.
        pick_kw = dict(top_k=1) if spec.greedy else dict(top_k=0, top_p=spec.top_p, temperature=spec.temperature)
        return SamplingParams(n=spec.n, max_tokens=budget(spec, n_prompt_tokens), stop=list(spec.stop),
                              seed=seed, repetition_penalty=spec.repetition_penalty, skip_special_tokens=False,
                              **pick_kw)

    def close(self) -> None:
        self.llm.shutdown()
        del self.llm


def load(backend: str, model_dir: str, batch_size: int = 64, max_model_len: int = 2048, seed: int = 42,
         trust_remote_code: bool = False, tensor_parallel_size: int = 1) -> Sampler:
    """A ready sampler for ``backend`` (``auto`` resolved by :func:`pick`)."""
    backend = pick(backend)
    if backend == "hf":
        return HFSampler(model_dir, batch_size=batch_size, trust_remote_code=trust_remote_code)
    if backend == "vllm":
        return VLLMSampler(model_dir, max_model_len=max_model_len, seed=seed, trust_remote_code=trust_remote_code,
                           tensor_parallel_size=tensor_parallel_size)
    return TRTLLMSampler(model_dir, max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                         tensor_parallel_size=tensor_parallel_size)


def with_stop(spec: Spec, stop: Sequence[str]) -> Spec:
    return replace(spec, stop=tuple(stop))
