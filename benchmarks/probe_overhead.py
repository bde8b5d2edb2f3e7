"""Cost of the capability probes during training (issue 13): the same tiny pretraining with and without probes.

    python benchmarks/probe_overhead.py [--iters 120] [--every 30] [--rounds 1] [--max-fraction 0.1]

Each round trains the tiny model for ``--iters`` iterations twice in fresh run dirs, interleaved: plain, and with
``probe.tokens_interval`` = ``--every`` iterations' tokens (lm-eval 0-shot on the six local sample tasks of
eval/upstream/sample, 20 items; greedy on 16 generated short word problems, 32 new tokens), with
``probe.max_fraction`` as given. It prints, from the runs' own records: the mean step time of each, the probes'
count, mean ``probe_s`` and ``probe_fraction``, and whole-run wall time with/without (the probes' real overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _args import Parser, main, positive

ROOT = Path(__file__).resolve().parents[1]
TASKS = "piqa,arc_easy,arc_challenge,hellaswag,openbookqa,winogrande"


def problems(directory: Path) -> None:
    rows = [{"id": f"b{i}", "problem": f"Ann has {a} cups and gets {b} more. How many cups does Ann have?",
             "gt_solution": f"{a} + {b} = {a + b}\n#### {a + b}", "gt_answer": None}
            for i, (a, b) in enumerate((x % 9 + 1, (3 * x) % 7 + 1) for x in range(16))]
    (directory / "gsm8k_platinum.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def train(out: Path, cache: Path, iters: int, probe: list[str]) -> float:
    cmd = [sys.executable, "-m", "evolm_nemo.cli", "train", f"run.out_dir={out}", f"data.cache_dir={cache}",
           f"train.iters={iters}", "train.log_interval=1", "train.progress=false", "train.tensorboard=false", *probe]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0


def max_fraction(text: str) -> str:
    """``probe.max_fraction``'s value as the override takes it: a fraction in (0, 1], or null (no bound)."""
    if text != "null":
        try:
            ok = 0 < float(text) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or null, got {text!r}")
    return text


def run() -> int:
    ap = Parser(__doc__)
    ap.add_argument("--iters", type=positive, default=120)
    ap.add_argument("--every", type=positive, default=30, help="iterations between probes")
    ap.add_argument("--rounds", type=positive, default=1)
    ap.add_argument("--max-fraction", type=max_fraction, default="0.1", help="probe.max_fraction (null: no bound)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="evolm_probe_bench_") as tmp:
        tmp = Path(tmp)
        (tmp / "dd").mkdir()
        problems(tmp / "dd")
        probe = [f"probe.tokens_interval={a.every * 1024}", f"probe.upstream=[{TASKS}]",
                 f"probe.data_dir={ROOT / 'eval' / 'upstream' / 'sample'}", "probe.downstream=[gsm8k_platinum]",
                 f"probe.downstream_dir={tmp / 'dd'}", "probe.max_new_tokens=32", f"probe.max_fraction={a.max_fraction}"]
        train(tmp / "warm", tmp / "cache", 2, [])  # corpus, tokenizer and index caches built once, untimed
        for r in range(a.rounds):
            walls, recs = {}, {}
            for name, extra in (("plain", []), ("probed", probe)):
                out = tmp / f"{name}{r}"
                walls[name] = train(out, tmp / "cache", a.iters, extra)
                recs[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
            step = {k: sum(x["step_s"] for x in v) / len(v) for k, v in recs.items()}
            probes = [x for x in recs["probed"] if "probe_s" in x]
            first = next(x for x in recs["probed"] if any(k.startswith("probe_s_at_") for k in x))
            start_s = next(v for k, v in first.items() if k.startswith("probe_s_at_"))
            mean_s = sum(x["probe_s"] for x in probes) / len(probes)
            mean_f = sum(x["probe_fraction"] for x in probes) / len(probes)
            total_probe = start_s + sum(x["probe_s"] for x in probes)
            cut = probes[0]["iteration"]
            before = [x["step_s"] for x in recs["probed"] if x["iteration"] <= cut]
            after = [x["step_s"] for x in recs["probed"] if x["iteration"] > cut]
            same = [x["step_s"] for x in recs["plain"] if x["iteration"] > cut]
            print(f"round {r}: {a.iters} iters; mean step_s plain {step['plain']:.4f} s, probed {step['probed']:.4f} s "
                  f"(ratio {step['probed'] / step['plain']:.3f}); after the first probe (iteration {cut}): probed "
                  f"{sum(after) / max(len(after), 1):.4f} s vs plain {sum(same) / max(len(same), 1):.4f} s; before "
                  f"it: probed {sum(before) / len(before):.4f} s")
            print(f"  probes: {len(probes)} + 1 before the first step at iterations "
                  f"{[x['iteration'] for x in probes]}; mean probe_s {mean_s:.3f} s = {mean_s / step['plain']:.1f} "
                  f"plain steps; mean probe_fraction {mean_f:.3f} (max_fraction {a.max_fraction})")
            print(f"  wall: plain {walls['plain']:.1f} s, probed {walls['probed']:.1f} s (+{walls['probed'] - walls['plain']:.1f} s); "
                  f"probe time {total_probe:.1f} s = {total_probe / (step['plain'] * a.iters):.3f} of the plain "
                  f"run's step time")
    return 0


if __name__ == "__main__":
    sys.exit(main(run))
