"""Scoring throughput: `evolm score` on 1,000 problems x 16 completions vs a naive all-pairs sympy scorer.

    python benchmarks/score_throughput.py [--problems 1000] [--completions 16] [--scoring evolm|strict] [--workers 2]

The input is generated deterministically from the real problems in tests/fixtures/eval/ (all six suites): numbers in
the gold answers are shifted per problem so that answers differ between problems (no free cache hits), and each
completion is a filler chain of thought ending in a right answer written in another surface form (``$12``, ``\\$12``,
``1,000``, ``12 dollars``, ``12 \\text{ cm}``, ``\\dfrac``, ``a/b``, decimals, delimited LaTeX, unquoted strings,
yes/no words, ...), a wrong answer, several boxes, an answer cut out of the last 128 characters, no answer or garbage.

Two scorers on the same file, in the same run:
  * `evolm score` (the real CLI, in a subprocess, timed end to end including interpreter start-up): fast path,
    cache and one math-verify helper process per worker.
  * naive: every math check through math-verify/sympy (both directions, no fast path, no cache), and Maj@16 from the
    full 16 x 16 pairwise equivalence matrix; run on the same number of worker processes.
It prints both times, their ratio, and whether every verdict (correct[], pass1, maj16, rm16, pass16) is identical.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolm_nemo import answers  # noqa: E402
from evolm_nemo.evaluation.metrics import majority_answers, rm_index  # noqa: E402
from evolm_nemo.fileio import write_jsonl  # noqa: E402
from evolm_nemo.tasks import SUITES  # noqa: E402

from _args import Parser, positive  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "eval"
WORDS = ("we", "first", "compute", "the", "total", "so", "then", "each", "value", "gives", "therefore", "number",
         "of", "items", "is", "multiplied", "by", "and", "added", "to", "result", "which", "means", "check", "again")

# ------------------------------------------------------------------------------------------------------------------
# Deterministic input generation
# ------------------------------------------------------------------------------------------------------------------


def _shift_numbers(text: str, offset: int) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) + offset), text)


def _numeric(g: str):
    g2 = g.replace(",", "")
    return g2 if re.fullmatch(r"-?\d+(\.\d+)?", g2) else None


def _math_variants(g: str, rng: random.Random) -> list[str]:
    out = [g, g.replace(" ", ""), f"${g}$", g.replace(",", ", ")]
    num = _numeric(g)
    if num is not None:
        out += [num, f"${num}", f"\\${num}", f"{num} dollars", f"{num} \\text{{ cm}}", f"\\text{{{num}}}", f"{num}.",
                f"{num}\\%", f"{float(num):.2f}", f" {num} "]
        if "." not in num and abs(int(num)) >= 1000:
            out += [f"{int(num):,}", f"\\${int(num):,}"]
        if "." not in num:
            out += [f"{num}.0", f"{num}.00", f"\\frac{{{2 * int(num)}}}{{2}}"]
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", g) or re.fullmatch(r"(-?)(\d+)/(\d+)", g)
    if m:
        s, a, b = m.group(1), int(m.group(2)), int(m.group(3))
        out += [f"{s}{a}/{b}", f"{s}\\frac{{{a}}}{{{b}}}", f"{s}\\dfrac{{{a}}}{{{b}}}",
                f"{s}\\frac{{{2 * a}}}{{{2 * b}}}",
                f"{(-1 if s else 1) * a / b:.6f}", f"{s}\\frac{a}{b}" if a < 10 and b < 10 else f"{s}{a}/{b}"]
    if "\\frac" in g:
        out.append(g.replace("\\frac", "\\dfrac"))
    if not any(ch.isdigit() for ch in g):
        out += [f"\\text{{{g}}}", g.lower(), g.capitalize()]
    return out


def _crux_variants(g: str) -> list[str]:
    out = [g, f"\\text{{{g}}}", g.replace("'", '"')]
    if g.startswith("'") and g.endswith("'"):
        out.append(g[1:-1])
    return out


def _nli_variants(g: str) -> list[str]:
    table = {"True": ["True", "true", "Yes", "\\text{True}", "The statement is true"],
             "False": ["False", "false", "No", "\\text{False}", "Not sure", "None"],
             "Uncertain": ["Uncertain", "unknown", "uncertain", "It cannot be determined, uncertain"]}
    return table.get(g, [g])


def _wrong(suite: str, g: str, k: int) -> str:
    if answers.SUITE_KIND[suite] == "nli":
        return ["True", "False", "Uncertain"][(["True", "False", "Uncertain"].index(g) + k) % 3] if g in (
            "True", "False", "Uncertain") else "False"
    if answers.SUITE_KIND[suite] == "crux":
        return ["[]", "'abc'", "0", "None", "(1, 2)"][k % 5]
    shifted = _shift_numbers(g, k)
    return shifted if shifted != g else ["7", "\\frac{1}{2}", "\\text{no}", "x+1"][k % 4]


def _filler(rng: random.Random, n_chars: int) -> str:
    words, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS) if rng.random() > 0.15 else str(rng.randint(1, 999))
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def _completion(rng: random.Random, answer: str | None, style: str) -> str:
    cot = _filler(rng, rng.randint(80, 1200))
    if style == "boxed":
        return f"{cot}. So the final answer is $\\boxed{{{answer}}}$."
    if style == "answer_is":
        return f"{cot}. The answer is {answer}."
    if style == "answer_is_colon":
        return f"{cot}. Hence the answer is: {answer}"
    if style == "two_boxes":
        return f"{cot}. First guess \\boxed{{0}}, but after checking, \\boxed{{{answer}}}"
    if style == "cut":  # the answer is not in the last 128 characters
        return f"{cot}. \\boxed{{{answer}}} " + _filler(rng, 200)
    if style == "none":
        return cot
    if style == "garbage":
        return rng.choice([cot + " \\boxed{" * 5, cot + "}}}}{{", "\\boxed{}" + cot, "\\fbox{3}" + cot, "",
                           cot + "\\boxed{" + "(" * 300 + "}"])
    raise ValueError(style)


def generate(n_problems: int, n_completions: int, seed: int) -> list[dict]:
    fixtures = {s: [json.loads(l) for l in open(FIXTURES / f"{s}.jsonl", encoding="utf-8")] for s in SUITES}
    rows = []
    for i in range(n_problems):
        rng = random.Random(seed * 1_000_003 + i)
        suite = SUITES[i % len(SUITES)]
        base = dict(fixtures[suite][(i // len(SUITES)) % len(fixtures[suite])])
        kind = answers.SUITE_KIND[suite]
        offset = i // (len(SUITES) * len(fixtures[suite]))
        if kind == "math" and offset:
            if base["gt_answer"] is None and suite == "gsm8k_platinum":
                head, _, tail = base["gt_solution"].rpartition("#### ")
                base["gt_solution"] = f"{head}#### {_shift_numbers(tail, offset)}"
            elif base["gt_answer"] is None:
                gold = answers.gold_answer(suite, base)
                base["gt_solution"] = base["gt_solution"].replace(f"\\boxed{{{gold}}}",
                                                                  f"\\boxed{{{_shift_numbers(gold, offset)}}}")
            else:
                base["gt_answer"] = base["gt_solution"] = _shift_numbers(base["gt_answer"], offset)
        gold = answers.gold_answer(suite, base)
        right = (_math_variants(gold, rng) if kind == "math" else
                 _crux_variants(gold) if kind == "crux" else _nli_variants(gold))
        wrong = [_wrong(suite, gold, k) for k in (1, 2, 3)]
        completions = []
        for _ in range(n_completions):
            r = rng.random()
            answer = rng.choice(right) if r < 0.45 else rng.choice(wrong) if r < 0.85 else None
            style = rng.choices(["boxed", "answer_is", "answer_is_colon", "two_boxes", "cut"],
                                [60, 15, 5, 10, 10])[0] if answer is not None else rng.choice(["none", "garbage"])
            completions.append(_completion(rng, answer, style))
        row = {"suite": suite, "id": f"{base['id']}#{i}", "problem": base["problem"],
               "gt_solution": base["gt_solution"], "gt_answer": base["gt_answer"], "completions": completions,
               "rm_scores": [round(rng.gauss(0, 1), 1) for _ in range(n_completions)]}
        if rng.random() < 0.5:
            row["greedy"] = _completion(rng, rng.choice(right + wrong), "boxed")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Naive scorer: every math comparison through math-verify / sympy, all 16 x 16 pairs for Maj@16
# ------------------------------------------------------------------------------------------------------------------


def _naive_equiv(suite: str, a, b, mode: str) -> bool:
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return False
    if answers.SUITE_KIND[suite] != "math":
        return answers.is_equiv(suite, a, b, mode)  # no sympy involved for CRUXEval / BoardgameQA / StrategyQA
    return answers.slow_equiv_inprocess(mode, a, b, answers.TIMEOUT_S)


def naive_score_row(args) -> dict:
    row, mode = args
    suite = row["suite"]
    gold = answers.gold_answer(suite, row)
    completions = row["completions"]
    extracted = [answers.extract_answer(c, mode) for c in completions]
    correct = [_naive_equiv(suite, e, gold, mode) for e in extracted]
    greedy = row.get("greedy")
    pass1 = _naive_equiv(suite, answers.extract_answer(greedy, mode), gold, mode) if greedy is not None else correct[0]
    votes = majority_answers(completions, mode=mode)
    n = len(votes)
    same = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            same[i][j] = same[j][i] = _naive_equiv(suite, votes[i], votes[j], mode)
    clusters: list[list[int]] = []
    for i in range(n):
        for cluster in clusters:
            if same[i][cluster[0]]:
                cluster.append(i)
                break
        else:
            clusters.append([i])
    first = max(clusters, key=len)[0]
    maj = completions.index(completions[first])
    rm = rm_index(row.get("rm_scores"))
    return {"correct": correct, "pass1": bool(pass1), "maj16": bool(correct[maj]),
            "rm16": None if rm is None else bool(correct[rm]), "pass16": any(correct)}


def main() -> int:
    ap = Parser(__doc__)
    ap.add_argument("--problems", type=positive, default=1000)
    ap.add_argument("--completions", type=positive, default=16)
    ap.add_argument("--scoring", choices=answers.MODES, default="evolm")
    ap.add_argument("--workers", type=positive, default=2, help="workers for both scorers (default 2: the 2-core goal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-naive", action="store_true", help="only time `evolm score`")
    ap.add_argument("--keep", type=str, default=None, help="directory to keep the generated input and output in")
    args = ap.parse_args()

    if args.keep:
        if Path(args.keep).exists() and not Path(args.keep).is_dir():
            ap.error(f"argument --keep: {args.keep} is a file, not a directory")
        held = [n for n in ("completions.jsonl", "scored.jsonl") if (Path(args.keep) / n).exists()]
        if held:  # an earlier run's input and output: never replaced (nor mixed with this run's)
            ap.error(f"argument --keep: {args.keep} already holds {' and '.join(held)}; pick a new directory")
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        return run(args, Path(args.keep))
    with tempfile.TemporaryDirectory(prefix="score_bench_") as tmp:
        return run(args, Path(tmp))


def run(args, workdir: Path) -> int:
    rows = generate(args.problems, args.completions, args.seed)
    inp, out = workdir / "completions.jsonl", workdir / "scored.jsonl"
    write_jsonl(inp, rows)
    print(f"input: {len(rows)} problems x {args.completions} completions -> {inp}", flush=True)

    evolm = [str(Path(sys.executable).parent / "evolm")]
    if not Path(evolm[0]).exists():
        evolm = [sys.executable, "-m", "evolm_nemo.cli"]
    cmd = evolm + ["score", f"input={inp}", f"output={out}", f"scoring={args.scoring}", f"workers={args.workers}",
                   "progress=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    t_score = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    scored = [json.loads(l) for l in open(out, encoding="utf-8")]
    print(f"evolm score (scoring={args.scoring}, workers={args.workers}): {t_score:.2f} s  "
          f"({len(rows) / t_score:.0f} problems/s, {len(rows) * args.completions / t_score:.0f} completions/s)")
    print("summary:", json.dumps({k: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in s.items()}
                                  for k, s in summary.items()}))
    if args.skip_naive:
        return 0

    t0 = time.perf_counter()
    with get_context("fork").Pool(args.workers) as pool:
        naive = pool.map(naive_score_row, [(row, args.scoring) for row in rows], chunksize=4)
    t_naive = time.perf_counter() - t0
    fields = ("correct", "pass1", "maj16", "rm16", "pass16")
    mismatches = [(row["id"], k, a[k], b[k]) for row, a, b in zip(rows, scored, naive) for k in fields if a[k] != b[k]]
    print(f"naive all-pairs sympy ({args.workers} processes): {t_naive:.2f} s")
    print(f"speed-up: {t_naive / t_score:.1f}x")
    print(f"identical verdicts: {not mismatches} ({len(mismatches)} mismatching fields over {len(rows)} problems)")
    for m in mismatches[:20]:
        print("  mismatch:", m)
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
