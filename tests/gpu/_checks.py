"""The work behind tests/gpu (the CUDA-marked tests), written so it also runs on CPU (through the CPU layer): that is
how its logic is exercised on machines without a GPU (``python tests/gpu/_checks.py smoke``).

``python tests/gpu/_checks.py cpu-engine OUT`` is the CPU engine's reference run (test_gpu.py starts it with CUDA
hidden, so the CPU layer is active in it): a few fp32 training steps of the tiny model from CPU-initialised weights,
written to OUT/cpu_engine.json (losses, grad norms) and OUT/cpu_engine.pt (the initial weights and the batches), so
the CUDA run can start from exactly the same weights and data."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The tiny recipe (2 layers, hidden 64, GQA 4/2, vocab 512, seq 128), local spec, constant lr (no scheduler).
TINY = ["model.layer_spec=local", "optim.lr=1e-3", "parallel.micro_batch_size=4", "parallel.global_batch_size=8"]
MICROBATCHES = 2  # 2 x 4 sequences per step

# Tolerances (relative loss difference per step; see test_gpu.py for why these sizes).
CUDA_VS_CPU_FIRST = 2e-5  # fp32, same weights and data: the first step's loss (before any update)
CUDA_VS_CPU_LATER = 2e-4  # fp32, the following steps (after Adam updates on both sides)
CUDA_VS_CPU_GRAD_NORM = 1e-3
BF16_VS_FP32_FIRST = 5e-3  # bf16 (Float16Module, fp32 main params) vs fp32: bf16 keeps ~3 significant digits
BF16_VS_FP32_LATER = 1e-2
BF16_VS_FP32_DROP = 0.1  # the loss drop over the steps, bf16 vs fp32 (relative)
HF_LOGITS_ABS = 1e-4  # CUDA fp32 megatron logits vs transformers on CPU fp32, same weights


def quiet() -> None:
    warnings.filterwarnings("ignore")
    try:
        from evolm_nemo.cli import quiet_known_notices

        quiet_known_notices()
    except Exception:
        pass


def tiny_cfg(precision: str, *extra: str):
    from evolm_nemo.config import RootConfig, compose

    return compose("config", [f"train.precision={precision}", *TINY, *extra], RootConfig)


def make_batches(cfg, seed: int = 0) -> list[dict]:
    """MICROBATCHES fixed random microbatches (CPU tensors): the same every step, so the loss falls (memorising)."""
    m, mbs = cfg.model, cfg.parallel.micro_batch_size
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, m.vocab_size, (mbs, m.seq_length + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(mbs, m.seq_length),
                    "position_ids": torch.arange(m.seq_length).unsqueeze(0).expand(mbs, -1).contiguous()})
    return out


def unwrap(model):
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def snapshot(model) -> dict:
    """The GPTModel's weights as fp32 CPU tensors (``_extra_state`` left out)."""
    return {k: v.detach().float().cpu().clone() for k, v in unwrap(model).state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def load_weights(model, optimizer, state: dict) -> None:
    inner = unwrap(model)
    missing, unexpected = inner.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    optimizer.reload_model_params()  # bf16: the fp32 main params are copied from the model params


def train_run(cfg, rt, batches: list[dict], steps: int, state: dict | None = None) -> dict:
    """``steps`` optimizer steps on ``batches`` (every step the same); starts from ``state`` when given."""
    from evolm_nemo.stages.base import lm_forward_step
    from evolm_nemo.train.engine import build_training_model, train_step

    model, optimizer, _ = build_training_model(cfg, rt)
    if state is not None:
        load_weights(model, optimizer, state)
    else:
        state = snapshot(model)
    losses, norms = [], []
    for _ in range(steps):
        r = train_step(model, optimizer, batches, lm_forward_step, cfg.model.seq_length,
                       cfg.parallel.micro_batch_size, rt)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    return {"losses": losses, "grad_norms": norms, "state": state, "model": model,
            "param_dtype": str(next(unwrap(model).parameters()).dtype), "device": str(rt.device)}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def bf16_vs_fp32(steps: int = 5) -> dict:
    """The same weights and batches trained in fp32 and in bf16 (megatron mixed precision) on this device."""
    from evolm_nemo.runtime.distributed import setup

    rt32 = setup(1, 1, seed=0, precision="fp32")
    cfg32 = tiny_cfg("fp32")
    batches = make_batches(cfg32)
    fp32 = train_run(cfg32, rt32, batches, steps)
    rt16 = setup(1, 1, seed=0, precision="bf16")
    bf16 = train_run(tiny_cfg("bf16"), rt16, batches, steps, state=fp32["state"])
    return {"fp32": fp32["losses"], "bf16": bf16["losses"], "fp32_grad_norms": fp32["grad_norms"],
            "bf16_grad_norms": bf16["grad_norms"], "bf16_param_dtype": bf16["param_dtype"],
            "bf16_wrapper": type(bf16["model"].module).__name__, "device": bf16["device"]}


CPU_STEPS = 3


def cpu_engine(out: Path) -> dict:
    """The reference: fp32 steps on the CPU engine (run with CUDA hidden), CPU-initialised weights."""
    from evolm_nemo.runtime import cpu_compat
    from evolm_nemo.runtime.distributed import setup

    quiet()
    out.mkdir(parents=True, exist_ok=True)
    rt = setup(1, 1, seed=0, precision="fp32")
    cfg = tiny_cfg("fp32")
    batches = make_batches(cfg, seed=1)
    res = train_run(cfg, rt, batches, CPU_STEPS)
    torch.save({"state": res["state"], "batches": batches}, out / "cpu_engine.pt")
    facts = {"losses": res["losses"], "grad_norms": res["grad_norms"], "cpu_layer_active": cpu_compat.is_active(),
             "device": res["device"]}
    (out / "cpu_engine.json").write_text(json.dumps(facts))
    return facts


def replay_cpu_engine(out: Path) -> dict:
    """The CPU engine's weights and batches, trained the same number of steps on this process's device."""
    from evolm_nemo.runtime.distributed import setup

    payload = torch.load(out / "cpu_engine.pt", weights_only=True)
    rt = setup(1, 1, seed=0, precision="fp32")
    res = train_run(tiny_cfg("fp32"), rt, payload["batches"], CPU_STEPS, state=payload["state"])
    return {"losses": res["losses"], "grad_norms": res["grad_norms"], "device": res["device"]}


def logits_vs_hf() -> dict:
    """A GPTModel built on this device (fp32) and transformers' LlamaForCausalLM on CPU (fp32) with its weights."""
    from transformers import LlamaForCausalLM

    from evolm_nemo.config.schema import ModelConfig, ParallelConfig
    from evolm_nemo.conversion.export import megatron_logits, probe_ids
    from evolm_nemo.conversion.hf import hf_config, to_hf
    from evolm_nemo.model.build import build_model
    from evolm_nemo.runtime.distributed import setup

    rt = setup(1, 1, seed=0, precision="fp32")
    m = ModelConfig(init_method_std=0.1, layer_spec="local")
    model = build_model(m, ParallelConfig(), torch.float32)
    hf_state = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            for hf_name, t in to_hf(name, tensor, m):
                hf_state[hf_name] = t.detach().float().cpu().contiguous().clone()
    hf = LlamaForCausalLM(hf_config(m, "lm", torch.float32, tied=False, tokens={})).eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    ids = probe_ids(m.vocab_size, 2, 48)
    ours = megatron_logits(model, ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.float()
    return {"max_abs": float((ours - theirs).abs().max()), "scale": float(theirs.abs().max()),
            "missing": [k for k in missing if "rotary" not in k], "unexpected": list(unexpected),
            "device": str(next(model.parameters()).device), "on": str(rt.device)}


def seeded_weights(model, std: float, seed: int = 0) -> None:
    """Overwrite every matrix with N(0, std) drawn on the CPU from ``seed`` (norm weights stay 1): the same weights
    whatever device the model lives on (GPU initialisation draws differently)."""
    gen = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(t.shape, generator=gen) * std for name, t in model.state_dict().items()
             if isinstance(t, torch.Tensor) and t.dim() > 1 and not name.endswith("_extra_state")}
    model.load_state_dict(state, strict=False)


def reference_greedy(model, prompt_ids: list[int], max_new: int, max_length: int, eos: int | None) -> list[int]:
    """No-cache greedy loop on the model's device (generation.greedy.greedy_ids builds its inputs on the CPU)."""
    device = next(model.parameters()).device
    ids, new = list(prompt_ids), []
    model.eval()
    with torch.no_grad():
        while len(new) < max_new and len(ids) < max_length:
            tokens = torch.tensor([ids], dtype=torch.long, device=device)
            positions = torch.arange(len(ids), dtype=torch.long, device=device).unsqueeze(0)
            nxt = int(model(tokens, positions, None)[0, -1].float().argmax())
            if eos is not None and nxt == eos:
                break
            ids.append(nxt)
            new.append(nxt)
    return new


GEN_PROMPTS = ["Ben has 2 bags. Each bag has 7 cups.", "Count from 3 to 9:", "A", "The cat sat on the mat and then it"]


def generator_facts(work: Path) -> dict:
    """megatron's static inference engine on this device: greedy (fp32) against the no-cache loop; sampling in bf16
    through Float16Module (what a trained model is) completes with valid tokens."""
    from megatron.core.transformer.module import Float16Module

    from evolm_nemo.config.schema import ModelConfig, ParallelConfig
    from evolm_nemo.data.synthetic import generate
    from evolm_nemo.data.tokenizer import load_tokenizer, train_tokenizer
    from evolm_nemo.generation.engine import Generator
    from evolm_nemo.model.build import build_model
    from evolm_nemo.runtime.distributed import setup

    rt = setup(1, 1, seed=0, precision="fp32")
    tok_dir = work / "tok"
    tok = load_tokenizer(tok_dir) if tok_dir.is_dir() else train_tokenizer(
        [d["text"] for d in generate("text", 200, 0)], tok_dir, 512)
    m = ModelConfig(init_method_std=0.1, seq_length=64, layer_spec="local")
    model = build_model(m, ParallelConfig(), torch.float32)
    seeded_weights(model, m.init_method_std)  # as on the CPU, where these prompts run 24 tokens without EOS
    new = 24
    ref = [reference_greedy(model, tok(p, add_special_tokens=False)["input_ids"], new, 64, tok.eos_token_id)
           for p in GEN_PROMPTS]
    got = Generator(model, tok, max_seq=64, max_batch=8).complete(GEN_PROMPTS, new)
    setup(1, 1, seed=0, precision="bf16")
    inner16 = build_model(m, ParallelConfig(), torch.bfloat16)
    seeded_weights(inner16, m.init_method_std)
    model16 = Float16Module(inner16.config, inner16)
    sampled = Generator(model16, tok, max_seq=64, max_batch=8).complete(GEN_PROMPTS * 4, new, temperature=1.0,
                                                                        seed=3)
    return {"ref": ref, "engine": [c.ids for c in got], "finish": [c.finish for c in got],
            "sampled_ids": [c.ids for c in sampled], "sampled_finish": [c.finish for c in sampled],
            "vocab": len(tok), "device": str(rt.device)}


def spec_builds(layer_spec: str) -> dict:
    """Build the tiny model with ``layer_spec`` (local|te) on this device and run one bf16 forward with labels."""
    from megatron.core.transformer.module import Float16Module

    from evolm_nemo.config.schema import ModelConfig, ParallelConfig
    from evolm_nemo.model.build import build_model, layer_spec as pick_spec
    from evolm_nemo.runtime.distributed import setup

    rt = setup(1, 1, seed=0, precision="bf16")
    m = ModelConfig(layer_spec=layer_spec)
    _, name = pick_spec(m)
    inner = build_model(m, ParallelConfig(), torch.bfloat16)
    model = Float16Module(inner.config, inner)
    tokens = torch.randint(0, m.vocab_size, (2, m.seq_length + 1), device=rt.device)
    pos = torch.arange(m.seq_length, device=rt.device).unsqueeze(0).expand(2, -1)
    loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
    loss.float().mean().backward()
    grads = [p.grad for p in inner.parameters() if p.grad is not None]
    return {"spec": name, "loss": float(loss.float().mean()), "grads": len(grads),
            "params": sum(1 for _ in inner.parameters()), "device": str(rt.device)}


def main(argv: list[str]) -> int:
    quiet()
    if len(argv) == 2 and argv[0] == "cpu-engine":
        print(json.dumps(cpu_engine(Path(argv[1]))))
        return 0
    if len(argv) == 2 and argv[0] == "smoke":  # the whole logic on this machine (CPU: through the CPU layer)
        work = Path(argv[1])
        facts = {"bf16_vs_fp32": bf16_vs_fp32(), "logits_vs_hf": logits_vs_hf(),
                 "generator": generator_facts(work), "local": spec_builds("local")}
        print(json.dumps(facts, default=str))
        return 0
    print("usage: _checks.py cpu-engine OUT | smoke WORK", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
