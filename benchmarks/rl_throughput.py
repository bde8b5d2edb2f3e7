"""RL rollout throughput on a response-length mix where about half the samples end early: the continuous-batching
engine (`generation/continuous.py`, what `stage=ppo|grpo` samples with by default), megatron-core's static inference
engine (`rl.rollout_engine=static`) and transformers' `generate` (KV cache) on the same weights exported to HF, for
the same prompts, n and lengths; then, with `--checkpoint`, a short PPO run's time split (rollout / reward / prepare /
update) with each engine.

The models are random-initialised (seeded) at two shapes, `tiny` (the CPU preset, 0.17M) and `25m` (hidden 512, 8
layers, 8 heads, SwiGLU 1408, vocab 512: BENCHMARKS.md's `mid`), with a larger init std than training's so the logits are peaked. The
length mix is made, not hoped for: calibration passes (no EOS) find the token most samples emit early and scale its
output-layer row until about half the samples emit it within the first half of `--max-new`; that token is then EOS
for every engine (the HF export carries the scaled row). All sample
at temperature 1 (top_p 1); generated tokens are counted up to and including EOS. Rounds are interleaved; medians
are printed with the ratios. Goal on CPU: continuous >= 1.0x transformers at both shapes.

    .venv/bin/python benchmarks/rl_throughput.py                                   # both shapes
    .venv/bin/python benchmarks/rl_throughput.py --checkpoint runs/demo/sft        # + PPO step split (after make demo)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _args import Parser, main, positive

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": [],
    "25m": ["model.hidden_size=512", "model.num_layers=8", "model.num_attention_heads=8", "model.num_query_groups=8",
            "model.ffn_hidden_size=1408", "model.seq_length=256"],
}


def _evolm() -> str:
    return str(Path(sys.executable).parent / "evolm")


def _env() -> dict:
    """This process's environment without the rank variables ``setup()`` set (a child command sets up its own)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}


def _without_eos(gen, prompts: list[str], max_new: int) -> list:
    """The samples the benchmark measures (seed 7, T=1), drawn with no token ending them."""
    eos = gen.eos_id
    gen.eos_id = -1
    try:
        return gen.complete(prompts, max_new, temperature=1.0, seed=7)
    finally:
        gen.eos_id = eos


def _early(gen, prompts: list[str], max_new: int, token: int) -> float:
    """The fraction of samples (drawn without EOS) that emit ``token`` within their first ``max_new // 2`` tokens."""
    return sum(token in c.ids[:max_new // 2] for c in _without_eos(gen, prompts, max_new)) / len(prompts)


def make_half_end_early(gen, weight, prompts: list[str], max_new: int) -> tuple[int, float, float]:
    """Pick the token most samples emit early and scale its output-layer row until about half the samples emit it
    within their first ``max_new // 2`` tokens (the counter-based sampler makes the samples up to that token the same
    with and without it as EOS). Returns (token, scale, fraction)."""
    import torch

    out = _without_eos(gen, prompts, max_new)
    token = Counter(t for c in out for t in set(c.ids[:max_new // 2])).most_common(1)[0][0]
    row = weight[token].detach().clone()
    lo, hi, scale = 1.0, 1.0, 1.0
    with torch.no_grad():
        frac = _early(gen, prompts, max_new, token)
        while frac < 0.5 and hi < 1024:
            lo, hi = hi, hi * 2
            weight[token] = row * hi
            frac = _early(gen, prompts, max_new, token)
        scale = hi
        for _ in range(6 if hi > 1 else 0):  # bisect the scale towards a fraction of 0.5
            mid = (lo + hi) / 2
            weight[token] = row * mid
            f = _early(gen, prompts, max_new, token)
            if abs(f - 0.5) < abs(frac - 0.5):
                scale, frac = mid, f
            lo, hi = (mid, hi) if f < 0.5 else (lo, mid)
        weight[token] = row * scale
    return token, scale, frac


def shape_row(name: str, args, work: Path, tok_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from evolm_nemo.checkpoint import io as ckpt
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.data.tokenizer import load_tokenizer
    from evolm_nemo.generation.continuous import ContinuousGenerator
    from evolm_nemo.generation.engine import Generator
    from evolm_nemo.model.build import build_model

    cfg = compose("config", ["model=tiny", "model.init_method_std=0.1", *SHAPES[name]], RootConfig)
    torch.manual_seed(1234)
    model = build_model(cfg.model, cfg.parallel)
    params = sum(p.numel() for p in model.parameters())
    tok = load_tokenizer(tok_dir)
    rows = json.loads((tok_dir / "prompts.json").read_text())[:args.prompts]
    rep = [p for p in rows for _ in range(args.n)]
    max_seq = cfg.model.seq_length
    batch = args.max_batch or len(rep)
    cont = ContinuousGenerator(model, tok, max_seq=max_seq, max_batch=batch)
    inner = model
    weight = (inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights
              else inner.output_layer.weight)
    eos, scale, frac = make_half_end_early(cont, weight, rep, args.max_new)
    tok = copy.deepcopy(tok)
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    cont = ContinuousGenerator(model, tok, max_seq=max_seq, max_batch=batch)
    static = Generator(model, tok, max_seq=max_seq, max_batch=batch)

    src = ckpt.save(work / name / "ckpt", 0, [model], meta={"model": dataclasses.asdict(cfg.model), "head": "lm"},
                    layout={"tp": 1, "pp": 1})
    hf_dir = work / name / "hf"
    subprocess.run([_evolm(), "export-hf", f"src={src}", f"dst={hf_dir}", f"tokenizer={tok_dir}", "progress=false"],
                   check=True, cwd=REPO, capture_output=True, env=_env())
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf.generation_config.stop_strings = None
    enc = tok(rep, return_tensors="pt", padding=True, padding_side="left")

    def megatron(gen):
        def run() -> tuple[float, float]:
            t0 = time.perf_counter()
            out = gen.complete(rep, args.max_new, temperature=1.0, seed=7, return_log_probs=True)
            tokens = sum(len(c.ids) + (c.finish == "eos") for c in out)
            early = sum(c.finish == "eos" and len(c.ids) < args.max_new // 2 for c in out) / len(out)
            return tokens / (time.perf_counter() - t0), early
        return run

    def transformers_generate() -> tuple[float, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                              eos_token_id=eos)
        tokens, early = 0, 0
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            n = (row.index(eos) + 1) if eos in row else len(row)
            tokens += n
            early += eos in row and n - 1 < args.max_new // 2
        return tokens / (time.perf_counter() - t0), early / len(rep)

    engines = {"continuous": megatron(cont), "static": megatron(static), "transformers": transformers_generate}
    for run in engines.values():
        run()  # warm-up
    res: dict[str, list] = {k: [] for k in engines}
    for r in range(args.rounds):
        for k, run in engines.items():
            res[k].append(run())
        print(f"  {name} round {r + 1}: " + " | ".join(f"{k} {v[-1][0]:,.0f}" for k, v in res.items())
              + " generated tok/s", flush=True)
    med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
    early = {k: v[-1][1] for k, v in res.items()}
    return {"shape": name, "params": params, "eos": eos, "scale": scale, "calibrated_early": frac, "early": early, "tok_s": med,
            "sequences": len(rep), "max_batch": batch}


def ppo_split(args, work: Path, src: Path) -> None:
    for engine in ("static", "continuous"):
        out = work / f"ppo-{engine}"
        subprocess.run([_evolm(), "train", "experiment=demo_ppo", f"train.init_from={src}", f"run.out_dir={out}",
                        f"train.iters={args.ppo_iters}", f"rl.rollout_engine={engine}", "train.progress=false",
                        "train.tensorboard=false"], check=True, cwd=REPO, capture_output=True, env=_env())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # skip warm-up
        split = {k: statistics.median(r[k] for r in rows) for k in ("time_rollout_s", "time_reward_s",
                                                                     "time_prepare_s", "time_update_s", "step_s")}
        print(f"PPO step, rl.rollout_engine={engine} (experiment=demo_ppo, median over iterations 2..): " +
              ", ".join(f"{k[5:-2] if k.startswith('time_') else k[:-2]} {v:.3f}s" for k, v in split.items()))


def shapes(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [x for x in names if x not in SHAPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown shape {','.join(unknown)}; shapes: {', '.join(SHAPES)}")
    return names


def parent(path: str) -> Path:
    """``--checkpoint``'s latest complete checkpoint, found before any measuring (not after minutes of it)."""
    from evolm_nemo.checkpoint import io as ckpt
    from evolm_nemo.config.errors import ConfigError

    try:
        return ckpt.resolve(path)
    except ckpt.CheckpointError as exc:
        raise ConfigError("--checkpoint", str(exc)) from None


def run() -> None:
    ap = Parser(__doc__)
    ap.add_argument("--shapes", type=shapes, default="tiny,25m", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--prompts", type=positive, default=32)
    ap.add_argument("--n", type=positive, default=4, help="samples per prompt")
    ap.add_argument("--max-new", type=positive, default=48)
    ap.add_argument("--max-batch", type=int, default=0, help="sequences decoded at once (0: all of them)")
    ap.add_argument("--rounds", type=positive, default=3)
    ap.add_argument("--checkpoint", default="", help="an SFT checkpoint: also time demo_ppo steps with each engine")
    ap.add_argument("--ppo-iters", type=positive, default=5, help="PPO iterations per engine (the first is not timed)")
    args = ap.parse_args()
    if args.max_batch < 0:
        ap.error(f"argument --max-batch: expected 0 (all) or a positive integer, got {args.max_batch}")
    if args.checkpoint and args.ppo_iters < 2:
        ap.error("argument --ppo-iters: at least 2 (the first iteration is a warm-up, not timed)")
    src = parent(args.checkpoint) if args.checkpoint else None
    work = Path(tempfile.mkdtemp(prefix="rl_bench_"))
    try:  # its models, HF exports and PPO runs are removed at the end, also on failure
        measure(args, work, src)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path, src: Path | None) -> None:
    from evolm_nemo.cli import quiet_known_notices
    from evolm_nemo.data.synthetic import generate
    from evolm_nemo.data.tokenizer import train_tokenizer
    from evolm_nemo.runtime.distributed import setup, teardown

    quiet_known_notices()
    tok_dir = work / "tokenizer"
    train_tokenizer([d["text"] for d in generate("text", 400, 0)], tok_dir, 512)
    prompts = [f"Human: {d['text'].splitlines()[0][:200]}\nAssistant:" for d in generate("math", args.prompts, 3)]
    (tok_dir / "prompts.json").write_text(json.dumps(prompts))
    setup(1, 1, seed=0, precision="fp32")
    results = [shape_row(s, args, work, tok_dir) for s in args.shapes]
    teardown()
    for r in results:
        t = r["tok_s"]
        print(f"{r['shape']} ({r['params'] / 1e6:.2f}M params): {r['sequences']} sequences ({args.prompts} prompts x "
              f"n={args.n}), <= {args.max_new} new tokens, max_batch {r['max_batch']}, T=1; EOS = token {r['eos']} "
              f"(output row x{r['scale']:.3g}), "
              f"ending before {args.max_new // 2} tokens: " +
              ", ".join(f"{k} {v:.0%}" for k, v in r["early"].items()))
        print(f"  continuous {t['continuous']:,.0f} tok/s | static {t['static']:,.0f} | transformers "
              f"{t['transformers']:,.0f} | continuous/transformers {t['continuous'] / t['transformers']:.3f} | "
              f"continuous/static {t['continuous'] / t['static']:.3f} | static/transformers "
              f"{t['static'] / t['transformers']:.3f}")
    if src is not None:
        ppo_split(args, work, src)


if __name__ == "__main__":
    sys.exit(main(run))
