"""The measuring parts of benchmarks/gpu/check.py, each run in a process of its own (``check.py --part NAME``).

Every part writes its result file as it goes (``Recorder``), so a part that is killed at its time limit or crashes
still leaves what it measured; every measurement inside a part catches its own errors (out-of-memory included),
records the error string and goes on with the next one.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3, as the generated tokenizer and Llama-2 (bos 1, eos 2)
PACKAGES = ["torch", "megatron-core", "hydra-core", "omegaconf", "antlr4-python3-runtime", "transformers",
            "tokenizers", "safetensors", "numpy", "tqdm", "einops", "pytest", "transformer-engine",
            "transformer_engine_torch", "flash-attn", "apex", "triton"]
MODULES = ["megatron.core", "hydra", "omegaconf", "transformers", "evolm_nemo.train.loop", "evolm_nemo.train.engine",
           "evolm_nemo.generation.engine", "evolm_nemo.evaluation.sampling", "evolm_nemo.conversion.hf",
           "evolm_nemo.conversion.export"]
NCCL_FALLBACK = {"NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}


def short_error(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:limit]


class Recorder:
    """The part's result file, rewritten atomically on every change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"status": "running"}
        self.flush()

    def set(self, **kw) -> None:
        self.data.update(kw)
        self.flush()

    def append(self, key: str, item) -> None:
        self.data.setdefault(key, []).append(item)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    try:
        from evolm_nemo.cli import quiet_known_notices

        quiet_known_notices()
    except Exception:
        pass


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_cuda() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def left(args) -> float:
    """Seconds left before this part's deadline."""
    return args.part_deadline - time.time() if args.part_deadline else 1e9


# ------------------------------------------------------------------------------------------------------------ env

def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What the part ran on: Python, torch and its CUDA, megatron-core and the device. Every part records it (check.py
    copies the first into the JSON's top-level ``environment``)."""
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "megatron_core": _version("megatron-core"),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


_NCCL_PROBE = """
import os, socket, torch, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
torch.cuda.set_device(0)
dist.init_process_group("nccl")
t = torch.ones(4, device="cuda")
dist.all_reduce(t)
g = dist.new_group([0])
dist.all_reduce(t, group=g)
torch.cuda.synchronize()
print("nccl ok", float(t.sum()))
dist.destroy_process_group()
"""


def _nccl_start(extra: dict) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(extra)
    return subprocess.Popen([sys.executable, "-c", _NCCL_PROBE], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _nccl_wait(proc: subprocess.Popen, timeout: float) -> str:
    """'ok', or why a one-rank NCCL group (init, all-reduce, a new group) failed."""
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return f"timeout after {timeout:.0f} s"
    if proc.returncode == 0 and "nccl ok" in out:
        return "ok"
    tail = (err or out).strip().splitlines()
    errors = [line for line in tail if "rror" in line]
    return f"rc={proc.returncode}: {(errors or tail or [''])[-1][:300]}"


def _matmul_tflops() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def _sdpa(smoke: bool) -> dict:
    """The SDPA kernels the local spec's attention (SDPAttention, GQA through enable_gqa) can use at the 1B shape."""
    import torch
    import torch.nn.functional as F

    b, hq, hkv, s, d = (4, 32, 4, 2048, 64) if not smoke else (1, 4, 2, 64, 16)
    dev = "cuda"
    q = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    out: dict = {"shape": [b, hq, hkv, s, d]}

    def run(fn, reps=5):
        for _ in range(2):
            fn().sum().backward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn().sum().backward()
        torch.cuda.synchronize()
        return round((time.perf_counter() - t) / reps * 1e3, 3)

    variants = {
        "gqa_default_ms": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "repeat_kv_default_ms": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1), is_causal=True),
    }
    for key, fn in variants.items():
        try:
            out[key] = run(fn)
        except Exception as exc:
            out[key] = short_error(exc)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("gqa_flash_only", SDPBackend.FLASH_ATTENTION),
                              ("gqa_cudnn_only", SDPBackend.CUDNN_ATTENTION),
                              ("gqa_efficient_only", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    out[name + "_ms"] = run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True), reps=2)
            except Exception as exc:
                out[name + "_ms"] = short_error(exc, 200)
    except Exception as exc:
        out["backends"] = short_error(exc)
    return out


def part_env(args, rec: Recorder) -> None:
    rec.set(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
            cpus=os.cpu_count(), versions={p: _version(p) for p in PACKAGES})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        rec.set(nvidia_smi=(smi.stdout or smi.stderr).strip()[:300])
    except Exception as exc:
        rec.set(nvidia_smi=short_error(exc))
    import torch

    info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    rec.set(gpu=info)
    # NCCL first, in the background (the training parts need it; a hang must not eat this part's time)
    probe = _nccl_start({}) if torch.cuda.is_available() else None
    quiet()
    imports = {}
    for mod in MODULES:
        try:
            importlib.import_module(mod)
            imports[mod] = "ok"
        except Exception as exc:
            imports[mod] = short_error(exc)
    try:
        import transformer_engine  # noqa: F401

        imports["transformer_engine"] = "ok"
    except Exception as exc:
        imports["transformer_engine"] = short_error(exc, 200)
    rec.set(imports=imports)
    try:
        from evolm_nemo.model.build import _te_spec
        from evolm_nemo.train.metrics import peak_flops

        rec.set(te_spec_available=_te_spec() is not None)
        if torch.cuda.is_available():
            peak = peak_flops(args.peak_tflops, torch.device("cuda", 0))
            rec.set(peak_tflops=peak / 1e12 if peak else None)
    except Exception as exc:
        rec.set(te_spec_available=short_error(exc))
    if probe is not None:
        plain = _nccl_wait(probe, 12)
        rec.set(nccl={"plain": plain}, nccl_env={})
        if plain != "ok":  # a second try with the loopback socket only, no shared memory / P2P / InfiniBand
            fallback = _nccl_wait(_nccl_start(NCCL_FALLBACK), 12)
            rec.set(nccl={"plain": plain, "fallback": fallback},
                    nccl_env=NCCL_FALLBACK if fallback == "ok" else {})
        for key, fn in (("matmul_bf16_tflops", _matmul_tflops), ("sdpa", lambda: _sdpa(args.smoke))):
            try:
                rec.set(**{key: fn()})
            except Exception as exc:
                rec.set(**{key: short_error(exc)})
            free_cuda()
    try:
        from evolm_nemo.runtime import cpu_compat

        rec.set(cpu_layer_would_activate=cpu_compat.should_activate())
    except Exception as exc:
        rec.set(cpu_layer_would_activate=short_error(exc))
    rec.set(status="ok")


# ---------------------------------------------------------------------------------------------------------- train

def _train_overrides(args, mbs: int) -> list[str]:
    preset, optim = ("tiny", "tiny") if args.smoke else ("evolm_1b", "evolm_1b")
    precision = "bf16" if cuda() else "fp32"
    return [f"model={preset}", f"model.seq_length={args.seq}", f"optim={optim}", "parallel=single",
            f"parallel.micro_batch_size={mbs}", f"parallel.global_batch_size={args.global_batch}",
            f"train.precision={precision}"]


class _Trainer:
    """The model, optimizer and FLOP counts one training part measures, built once for all its micro-batch sizes."""

    def __init__(self, args, rec: Recorder, recompute: bool):
        from megatron.core.utils import unwrap_model

        from evolm_nemo.config import RootConfig, compose
        from evolm_nemo.model.build import flops_per_token, layer_spec, param_count
        from evolm_nemo.runtime.distributed import setup
        from evolm_nemo.train.engine import build_training_model
        from evolm_nemo.train.metrics import peak_flops

        quiet()
        cfg = compose("config", _train_overrides(args, min(args.mbs)), RootConfig)
        m = self.m = cfg.model
        rt = self.rt = setup(1, 1, seed=0, precision=cfg.train.precision)
        t0 = time.perf_counter()
        self.model, self.optimizer, _ = build_training_model(cfg, rt)
        sync()
        build_s = time.perf_counter() - t0
        inner = self.inner = unwrap_model(self.model)
        tc = inner.config
        if recompute:  # full activation recomputation, every layer on its own (read by TransformerBlock each forward)
            tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers = "full", "uniform", 1
            if inner.decoder.config is not tc:
                raise RuntimeError("the decoder does not share the model's TransformerConfig: recompute not applied")
        self.n_all = param_count(m)
        self.n = self.n_all - m.vocab_size * m.hidden_size  # the input embedding is a lookup, not a matmul
        self.fpt = flops_per_token(m)
        self.peak = peak_flops(args.peak_tflops, rt.device)
        self.recompute = recompute
        self.step_s = None  # the last step's seconds, of whichever configuration ran it
        rec.set(model={"preset": m.name, "layers": m.num_layers, "hidden": m.hidden_size, "ffn": m.ffn_hidden_size,
                       "heads": m.num_attention_heads, "groups": m.num_query_groups, "vocab": m.vocab_size,
                       "seq": m.seq_length, "params": self.n_all, "params_non_embedding": self.n},
                spec=layer_spec(m)[1], dtype=str(rt.dtype), device=str(rt.device), build_s=round(build_s, 2),
                recompute={"granularity": tc.recompute_granularity, "method": tc.recompute_method,
                           "num_layers": tc.recompute_num_layers},
                optimizer={"distributed": cfg.optim.distributed, "class": type(self.optimizer).__name__},
                peak_tflops=self.peak / 1e12 if self.peak else None,
                flops_per_token={"6N": 6 * self.n, "6N_all_params": 6 * self.n_all, "6N+attention": self.fpt},
                configs=[])

    def batches(self, mbs: int, gbs: int, seq: int) -> list[dict]:
        import torch

        device = self.rt.device
        gen = torch.Generator(device=device).manual_seed(mbs)
        batches = []
        for _ in range(gbs // mbs):
            tokens = torch.randint(0, self.m.vocab_size, (mbs, seq + 1), device=device, generator=gen)
            batches.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                            "loss_mask": torch.ones(mbs, seq, device=device),
                            "position_ids": torch.arange(seq, device=device).unsqueeze(0).expand(mbs, -1)
                            .contiguous()})
        return batches

    def measure(self, args, entry: dict, mbs: int, share: float) -> None:
        """Warm-up and timed steps at micro-batch size ``mbs`` within ``share`` seconds; fills ``entry``."""
        from evolm_nemo.stages.base import lm_forward_step
        from evolm_nemo.train.engine import train_step

        gbs, seq, n, n_all, peak = args.global_batch, args.seq, self.n, self.n_all, self.peak
        warmup, steps = args.warmup, args.steps
        batches = self.batches(mbs, gbs, seq)
        free_cuda()
        reset_peak()
        losses, times, warmed = [], [], 0
        t_config = time.perf_counter()
        while warmed < warmup or len(times) < steps:
            calls = []
            first = warmed == 0 and not times
            hook = self.inner.decoder.layers[0].register_forward_hook(lambda *_: calls.append(1)) if first else None
            sync()
            t = time.perf_counter()
            r = train_step(self.model, self.optimizer, batches, lm_forward_step, seq, mbs, self.rt)
            sync()
            dt = time.perf_counter() - t
            if hook is not None:  # 2 with recomputation (forward, then again in backward), else 1
                hook.remove()
                entry["layer0_forwards_per_microbatch"] = len(calls) / (gbs // mbs)
            losses.append(round(r.loss, 4))
            if warmed < warmup:
                warmed += 1
            else:
                times.append(dt)
            self.step_s = dt
            if time.perf_counter() - t_config + 1.2 * dt > share:  # out of this configuration's time
                if times:
                    entry["cut_short"] = f"{len(times)} of {steps} timed steps fitted"
                    break
                warmup = warmed  # no more warm-up: one timed step next
        warmup, steps = warmed, len(times)
        tps = steps * gbs * seq / sum(times)
        entry.update(warmup=warmup, steps=steps, step_s=[round(x, 4) for x in times[:50]],
                     tokens_per_s=round(tps, 1), losses=losses[:50], **memory())
        if peak:
            entry.update(mfu_6n=round(6 * n * tps / peak, 4), mfu_6n_all_params=round(6 * n_all * tps / peak, 4),
                         mfu_6n_attention=round(self.fpt * tps / peak, 4))
        entry["tflops_6n"] = round(6 * n * tps / 1e12, 2)
        if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
            entry["error"] = f"non-finite loss {losses}"


def part_train(args, rec: Recorder, recompute: bool) -> None:
    trainer = _Trainer(args, rec, recompute)
    gbs, seq = args.global_batch, args.seq
    for index, mbs in enumerate(args.mbs):
        entry = {"mbs": mbs, "microbatches": gbs // mbs, "global_batch": gbs, "seq": seq, "recompute": recompute}
        step_s = trainer.step_s
        if step_s is not None and int((left(args) - 8) / max(step_s * 1.3, 1e-3)) < 2:
            entry["error"] = f"skipped: out of time ({left(args):.0f} s left, last step {step_s:.2f} s)"
            rec.append("configs", entry)
            continue
        share = (left(args) - 8) / (len(args.mbs) - index)  # this configuration's part of the time left
        try:
            trainer.measure(args, entry, mbs, share)
        except Exception as exc:
            entry["error"] = short_error(exc)
            entry["oom"] = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            entry.update(memory())
            entry["trace"] = traceback.format_exc(limit=6)[-1500:]
            del exc
            try:
                trainer.model.zero_grad_buffer()
                trainer.optimizer.zero_grad()
            except Exception:
                pass
        free_cuda()
        rec.append("configs", entry)
    ok = [c for c in rec.data["configs"] if "tokens_per_s" in c and "error" not in c]
    rec.set(status="ok" if ok else "error", error=None if ok else "no configuration ran")


# ------------------------------------------------------------------------------------------------------- sampling

def sample_shape(args):
    """The model preset (recipes/model/*.yaml) read without hydra, so the hf part runs even without megatron."""
    import yaml

    from evolm_nemo.config.schema import ModelConfig

    raw = yaml.safe_load((REPO / "recipes" / "model" / f"{'tiny' if args.smoke else 'evolm_1b'}.yaml").read_text())
    m = ModelConfig(**raw)
    m.seq_length = max(m.seq_length, args.prompt_len + args.new_tokens)
    return m


def make_tokenizer(vocab_size: int, path: Path):
    """A byte-level BPE with exactly ``vocab_size`` ids, like Llama-2's 32000 = the model's vocabulary (so every id a
    random model samples decodes, and transformers' stop-string criterion can index its table by any id): <unk> <s>
    </s> <pad>, the 256 byte symbols, then two-symbol merges. Lowercase letters and the space never merge, so a
    prompt of k such characters is exactly k tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    free = set(PROMPT_CHARS.replace(" ", "\u0120"))  # the byte-level alphabet writes the space as U+0120
    symbols = [c for c in alphabet if c not in free]
    merges = []
    for a in symbols:
        for b in symbols:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    if len(vocab) != vocab_size:
        raise ValueError(f"cannot build a {vocab_size}-token vocabulary (got {len(vocab)})")
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return fast


PROMPT_CHARS = "abcdefghijklmnopqrstuvwxyz "


def prompts(count: int, length: int) -> list[str]:
    """``count`` different prompts of ``length`` characters = tokens (see make_tokenizer)."""
    import random

    rng = random.Random(1234)
    return ["".join(rng.choice(PROMPT_CHARS) for _ in range(length)) for _ in range(count)]


def sample_dir(args) -> Path:
    return Path(args.work) / ("sample_tiny" if args.smoke else "sample_1b")


def build_sample_model(args, rec: Recorder) -> Path:
    """A random LlamaForCausalLM of the 1B shape (bf16 on GPU) + make_tokenizer's tokenizer, saved as an HF dir."""
    import torch
    from transformers import LlamaForCausalLM

    from evolm_nemo.conversion.hf import hf_config

    m = sample_shape(args)
    out = sample_dir(args)
    done = out / "READY"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_tokenizer(m.vocab_size, out)
    dtype = torch.bfloat16 if cuda() else torch.float32
    cfg = hf_config(m, "lm", dtype, tied=False, tokens={"bos": 1, "eos": 2, "pad": 3})
    torch.manual_seed(0)
    with torch.device("cuda" if cuda() else "cpu"):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # random weights must be finite (an uninitialised tensor would poison sampling)
        for p in model.parameters():
            if not bool(torch.isfinite(p).all()):
                p.normal_(0.0, m.init_method_std)
    model.to(dtype).save_pretrained(str(out))
    del model
    free_cuda()
    done.write_text("ok\n")
    rec.set(model_dir=str(out), model_build_s=round(time.perf_counter() - t, 2))
    return out


def _fit_tokens(args, per_token_s: float, fixed_s: float) -> int:
    """New tokens that fit in the part's time left (all of them when they fit)."""
    room = left(args) - 10 - fixed_s
    fit = int(room / max(per_token_s, 1e-6))
    return max(0, min(args.new_tokens, fit))


def part_sample_hf(args, rec: Recorder) -> None:
    from evolm_nemo.evaluation.sampling import HFSampler, Spec

    quiet()
    out = build_sample_model(args, rec)
    seqs = args.prompts * args.n
    t = time.perf_counter()
    sampler = HFSampler(str(out), batch_size=seqs)
    rec.set(load_s=round(time.perf_counter() - t, 2), device=str(sampler.device),
            dtype=str(next(sampler.model.parameters()).dtype), attn=getattr(sampler.model.config,
                                                                          "_attn_implementation", None))
    texts = prompts(args.prompts, args.prompt_len)
    rec.set(prompt_tokens=len(sampler.encode(texts[0])), prompts=args.prompts, n=args.n, sequences=seqs)
    window = args.prompt_len + args.new_tokens
    base = Spec(n=args.n, temperature=1.0, top_p=1.0, max_model_len=window, max_new_tokens=16)
    # warm-up at the full batch and 16 new tokens; its time per token sizes the measured run to the time left
    sync()
    t = time.perf_counter()
    sampler.generate(texts, base, desc="warm-up")
    sync()
    warm = time.perf_counter() - t
    new = _fit_tokens(args, warm / 16, 0)
    rec.set(warmup_s=round(warm, 2), new_tokens=new, new_tokens_asked=args.new_tokens)
    if new < 16:
        rec.set(status="error", error=f"out of time for the measured run ({left(args):.0f} s left)")
        return
    reset_peak()
    spec = Spec(n=args.n, temperature=1.0, top_p=1.0, max_model_len=window, max_new_tokens=new)
    sync()
    t = time.perf_counter()
    outs = sampler.generate(texts, spec, desc="measured")
    sync()
    dt = time.perf_counter() - t
    tokens = sampler.stats.get("tokens", 0)
    rec.set(seconds=round(dt, 3), generated_tokens=tokens, tokens_per_s=round(tokens / dt, 1),
            nominal_tokens_per_s=round(seqs * new / dt, 1), sampler_stats=sampler.stats,
            completions=sum(len(o) for o in outs), settings={"temperature": 1.0, "top_p": 1.0,
                                                             "repetition_penalty": spec.repetition_penalty,
                                                             "stop": list(spec.stop)},
            **memory())
    sampler.close()
    rec.set(status="ok")


def part_sample_megatron(args, rec: Recorder) -> None:
    import torch
    from megatron.core.transformer.module import Float16Module

    from evolm_nemo.config.schema import ParallelConfig
    from evolm_nemo.data.tokenizer import load_tokenizer
    from evolm_nemo.generation.continuous import ContinuousGenerator
    from evolm_nemo.generation.engine import Generator
    from evolm_nemo.model.build import build_model, layer_spec
    from evolm_nemo.runtime.distributed import setup

    quiet()
    m = sample_shape(args)
    rt = setup(1, 1, seed=0, precision="bf16" if cuda() else "fp32")
    out = sample_dir(args)
    if not (out / "READY").exists():
        try:
            build_sample_model(args, rec)
        except Exception as exc:
            rec.set(model_dir_error=short_error(exc))
    if (out / "tokenizer.json").exists():
        tok = load_tokenizer(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        tok = make_tokenizer(m.vocab_size, out)
    t = time.perf_counter()
    model = build_model(m, ParallelConfig(), rt.dtype)
    weights = "random init"
    try:
        from evolm_nemo.conversion.hf import HFWeights, from_hf

        src = HFWeights(out)
        state = {name: from_hf(name, src.get, m) for name, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor) and not name.endswith("_extra_state")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        weights = "the hf part's model" if not unexpected else f"partial: unexpected {unexpected[:2]}"
        del state
    except Exception as exc:
        weights = f"random init ({short_error(exc, 200)})"
    if rt.dtype != torch.float32:
        model = Float16Module(model.config, model)
    free_cuda()
    seqs = args.prompts * args.n
    window = args.prompt_len + args.new_tokens
    rec.set(build_s=round(time.perf_counter() - t, 2), weights=weights, spec=layer_spec(m)[1], dtype=str(rt.dtype),
            device=str(rt.device), prompts=args.prompts, n=args.n, sequences=seqs)
    texts = prompts(args.prompts, args.prompt_len)
    batch = [p for p in texts for _ in range(args.n)]  # n samples of a prompt = n rows
    engines = {"continuous": ContinuousGenerator, "static": Generator}
    for index, (name, engine) in enumerate(engines.items()):
        entry: dict = {"engine": engine.__name__}
        try:
            gen = engine(model, tok, max_seq=window, max_batch=seqs)
            entry["prompt_tokens"] = len(gen.encode(texts[0]))
            _sample_measure(args, gen, batch, entry, share=1.0 / (len(engines) - index))
        except Exception as exc:
            entry.update(status="error", error=short_error(exc), trace=traceback.format_exc(limit=6)[-1500:])
        free_cuda()
        rec.set(**{name: entry})
    # the figures of the default engine also at the top level (earlier results and the summary read these)
    first = rec.data.get("continuous", {})
    rec.set(**{k: first[k] for k in ("tokens_per_s", "generated_tokens", "seconds", "new_tokens") if k in first})
    ok = [n for n in engines if rec.data.get(n, {}).get("status") == "ok"]
    rec.set(status="ok" if ok else "error", error=None if ok else "no engine ran")


def _sample_measure(args, gen, batch: list[str], entry: dict, share: float) -> None:
    """A 16-token warm-up, then as many new tokens as fit in ``share`` of the part's time left; fills ``entry``."""
    sync()
    t = time.perf_counter()
    gen.complete(batch, 16, temperature=1.0, seed=0)
    sync()
    warm = time.perf_counter() - t
    room = (left(args) - 10) * share
    new = max(0, min(args.new_tokens, int(room / max(warm / 16, 1e-6))))
    entry.update(warmup_s=round(warm, 2), new_tokens=new, new_tokens_asked=args.new_tokens)
    if new < 16:
        entry.update(status="error", error=f"out of time for the measured run ({left(args):.0f} s left)")
        return
    reset_peak()
    sync()
    t = time.perf_counter()
    comps = gen.complete(batch, new, temperature=1.0, top_p=1.0, seed=1)
    sync()
    dt = time.perf_counter() - t
    tokens = sum(len(c.ids) + (c.finish == "eos") for c in comps)  # EOS counted, as the hf backend counts it
    finishes: dict = {}
    for c in comps:
        finishes[c.finish] = finishes.get(c.finish, 0) + 1
    entry.update(seconds=round(dt, 3), generated_tokens=tokens, tokens_per_s=round(tokens / dt, 1),
                 nominal_tokens_per_s=round(len(batch) * new / dt, 1), finish=finishes,
                 settings={"temperature": 1.0, "top_p": 1.0}, status="ok", **memory())


def part_sft_packed(args, rec: Recorder) -> None:
    """benchmarks/sft_throughput.py's measurement at the 1B preset (tiny with --smoke): padded, packed, HF."""
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sft_throughput import measure

    quiet()
    preset = "tiny" if args.smoke else "evolm_1b"
    batch = 4 if args.smoke else 8
    opts = types.SimpleNamespace(preset=preset, layers=None, hidden=None, ffn=None, heads=None, groups=None,
                                 vocab=None, seq=args.seq, batch=batch, micro=batch, steps=2, rounds=2, mix="evolm")
    result = measure(opts)
    tps = result["answer_tokens_per_s"]
    rec.set(**result, packed_over_padded=round(tps["packed"] / tps["padded"], 3),
            padded_over_hf=round(tps["padded"] / tps["HF"], 3), status="ok")


PARTS = {"env": part_env, "train": lambda a, r: part_train(a, r, False),
         "train_recompute": lambda a, r: part_train(a, r, True), "sft_packed": part_sft_packed,
         "sample_hf": part_sample_hf,
         "sample_megatron": part_sample_megatron}


def run(name: str, args) -> int:
    rec = Recorder(Path(args.result))
    try:
        rec.set(environment=environment())
    except Exception as exc:
        rec.set(environment={"error": short_error(exc)})
    try:
        PARTS[name](args, rec)
    except Exception as exc:
        rec.set(status="error", error=short_error(exc), trace=traceback.format_exc(limit=8)[-3000:])
        traceback.print_exc()
        return 1
    return 0
