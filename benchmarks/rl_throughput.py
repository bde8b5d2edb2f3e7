"""RL rollout throughput: megatron-core's inference engine on the live actor (what `stage=ppo|grpo` samples with) vs
transformers' `generate` (KV cache) on the same weights exported to HF, for the same prompts, n and lengths; then a
short PPO run's time split (rollout / reward / prepare / update) from its metrics.

Both sample at temperature 1 (top_p 1) with the same number of prompts per batch; generated tokens are counted up to
and including EOS. Rounds are interleaved; medians are printed with their ratio. Goal on CPU: ratio >= 1.0.

    .venv/bin/python benchmarks/rl_throughput.py --checkpoint runs/demo/sft     # after `make demo`
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/demo/sft", help="an SFT checkpoint (run dir or iter_* dir)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppo-iters", type=int, default=5, help="iterations of the PPO run for the time split (0: skip)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evolm_nemo.checkpoint import io as ckpt
    from evolm_nemo.cli import quiet_known_notices
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.generation.engine import Generator
    from evolm_nemo.model.build import build_model
    from evolm_nemo.runtime.distributed import setup, teardown

    quiet_known_notices()
    src = ckpt.resolve(args.checkpoint)
    meta = ckpt.read_meta(src)
    work = Path(tempfile.mkdtemp(prefix="rl_bench_"))
    hf_dir = work / "hf"
    subprocess.run([str(Path(sys.executable).parent / "evolm"), "export-hf", f"src={src}", f"dst={hf_dir}",
                    "progress=false"], check=True, cwd=REPO, capture_output=True)
    rl_rows = sorted((REPO / "runs" / "cache").glob("synthetic-sft-*/rl.jsonl"))
    prompts = ([json.loads(line)["prompt"] for line in rl_rows[0].read_text().splitlines()[:args.prompts]] if rl_rows
               else [f"Human: What is {i} + {i}?\nAssistant:" for i in range(args.prompts)])

    m = meta["model"]
    cfg = compose("config", [f"model.{k}={v}" for k, v in m.items() if k not in ("name",)], RootConfig)
    rt = setup(1, 1, seed=0, precision="fp32")
    model = build_model(cfg.model, cfg.parallel)
    ckpt.load_weights(src, [model])
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    gen = Generator(model, tok, max_seq=cfg.model.seq_length, max_batch=args.prompts * args.n)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf.generation_config.stop_strings = None  # the export carries EvoLM's; RL rollouts stop at EOS on both sides
    rep = [p for p in prompts for _ in range(args.n)]
    enc = tok(rep, return_tensors="pt", padding=True, padding_side="left")

    def ours() -> float:
        t0 = time.perf_counter()
        out = gen.complete(rep, args.max_new, temperature=1.0, seed=1, return_log_probs=True)
        tokens = sum(len(c.ids) + (c.finish == "eos") for c in out)
        return tokens / (time.perf_counter() - t0)

    def theirs() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              max_new_tokens=args.max_new, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                              eos_token_id=tok.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        tokens = 0
        for row in new.tolist():
            tokens += (row.index(tok.eos_token_id) + 1) if tok.eos_token_id in row else len(row)
        return tokens / (time.perf_counter() - t0)

    ours(), theirs()  # warm-up
    res = {"ours": [], "hf": []}
    for r in range(args.rounds):
        res["ours"].append(ours())
        res["hf"].append(theirs())
        print(f"round {r + 1}: ours {res['ours'][-1]:,.0f} | HF generate {res['hf'][-1]:,.0f} generated tok/s",
              flush=True)
    o, h = statistics.median(res["ours"]), statistics.median(res["hf"])
    print(f"model {meta['model']['name']} ({src}); {args.prompts} prompts x n={args.n}, <= {args.max_new} new tokens, "
          f"T=1; ours = megatron static inference engine (KV cache) + per-token log-probs")
    print(f"ours {o:,.0f} generated tok/s | transformers generate {h:,.0f} | ratio {o / h:.3f}")
    teardown()
    if args.ppo_iters:
        import os

        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}  # setup() set them for this process
        out = work / "ppo"
        subprocess.run([str(Path(sys.executable).parent / "evolm"), "train", "experiment=demo_ppo",
                        f"train.init_from={src}", f"run.out_dir={out}", f"train.iters={args.ppo_iters}",
                        "train.progress=false", "train.tensorboard=false"], check=True, cwd=REPO,
                       capture_output=True, env=env)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # skip warm-up
        split = {k: statistics.median(r[k] for r in rows) for k in ("time_rollout_s", "time_reward_s",
                                                                     "time_prepare_s", "time_update_s", "step_s")}
        print("PPO step (experiment=demo_ppo, median over iterations 2..): " +
              ", ".join(f"{k[5:-2] if k.startswith('time_') else k[:-2]} {v:.3f}s" for k, v in split.items()))


if __name__ == "__main__":
    main()
