"""The prepared GPU check of issue 11: the CUDA-marked tests, 1B training throughput/MFU and n=16 sampling speed, in
one run of under 8 minutes on a device machine (CUDA, Python 3.12, torch, no megatron-core: check.sh installs the
carried wheels first). Results: one JSON under $OUT (else runs/gpu_check/; its ``environment``: torch, CUDA,
megatron-core, device) and a summary table.

    bash benchmarks/gpu/fetch_wheels.sh                  # on the CPU box: the wheels, into benchmarks/gpu/wheels/
    bash benchmarks/gpu/check.sh --dry-run               # on the CPU box: arguments, wheel list and plan; no CUDA
    bash benchmarks/gpu/check.sh                         # on the device machine (carry benchmarks/gpu/wheels)
    bash benchmarks/gpu/check.sh --smoke                 # every part at the tiny shape, on whatever is here (CPU)

Each part runs in its own process under a time limit (the plan below); a part that fails, runs out of memory or
is killed at its limit leaves its error string (and whatever it measured) in the JSON, and the rest still run. This
file imports nothing beyond the standard library: the dry run touches neither torch nor CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WHEEL_LIST = HERE / "wheels.txt"
RESULT_NAME = "gpu_check.json"
LOG_NAME = "gpu_check_log.txt"
TOTAL_BUDGET_S = 470  # the whole run, install included: under 8 minutes
INSTALL_BUDGET_S = 20  # check.sh's pip install (not a part of this file; in the plan and the budget)
# name -> (time limit in seconds, what it does). Order = run order.
PARTS = {
    "env": (40, "versions, GPU, imports, TE, NCCL, bf16 matmul TFLOP/s, SDPA (GQA) kernels"),
    "tests": (90, "pytest -m gpu tests/gpu: bf16 vs fp32, CUDA vs CPU engine, CPU layer off, local/TE spec, "
                   "inference engine, hf sampler"),
    "train": (70, "evolm_1b training steps in bf16 at each micro-batch size, no recompute: tokens/s, MFU (6N, "
                  "6N+attention), peak memory"),
    "train_recompute": (60, "the same with full activation recomputation (uniform, 1 layer per checkpoint)"),
    "sft_packed": (60, "evolm_1b SFT steps on an EvoLM-shaped length mix: padded microbatches vs packed rows (TE THD, "
                       "cu_seqlens) vs transformers + AdamW: answer tokens/s"),
    "sample_hf": (65, "a random 1B-shape HF model + tokenizer written; hf backend sampling: generated tokens/s"),
    "sample_megatron": (65, "the same weights in the continuous-batching engine (RL's default) and megatron's static "
                            "inference engine"),
}
SMOKE_SCALE = 4  # --smoke: every limit x4 (CPU)
# option -> (default, --smoke default)
DEFAULTS = {"mbs": ([4, 8, 16], [2, 4]), "global_batch": (32, 8), "seq": (2048, 128), "prompts": (32, 2),
            "n": (16, 4), "prompt_len": (128, 8), "new_tokens": (512, 16)}
GOALS = {"mfu_6n": 0.50, "sampling_tokens_per_s": 10_000}
_WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)"
                       r"\.whl$")


class ArgError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2)."""

    def error(self, message):  # noqa: D401
        print(f"check.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part {','.join(unknown) or text!r}; parts: {', '.join(PARTS)}")
    return [n for n in PARTS if n in names]  # run order


def parser() -> Parser:
    ap = Parser(prog="check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="check arguments, wheel list and plan; touch no CUDA")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (CPU: fp32)")
    ap.add_argument("--out", default=None, help="result folder (default: $OUT, else runs/gpu_check)")
    ap.add_argument("--work", default="/tmp/evolm_gpu_check", help="scratch folder (models, logs)")
    ap.add_argument("--wheels", default=str(HERE / "wheels"), help="the carried wheel folder")
    ap.add_argument("--parts", type=_parts, default=list(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    ap.add_argument("--budget-s", type=int, default=None,
                    help=f"whole run, install included (default {TOTAL_BUDGET_S}; --smoke: x{SMOKE_SCALE})")
    ap.add_argument("--mbs", type=_int_list, default=None, help="micro-batch sizes, comma list (default 4,8,16; "
                                                                 "--smoke 2,4)")
    ap.add_argument("--seq", type=int, default=None, help="training sequence length (default 2048; --smoke 128)")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per step (default 32; --smoke 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per micro-batch size")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per micro-batch size")
    ap.add_argument("--prompts", type=int, default=None, help="sampling prompts (default 32; --smoke 2)")
    ap.add_argument("--n", type=int, default=None, help="samples per prompt (default 16; --smoke 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; --smoke 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 512; --smoke 16)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for MFU (default: known GPUs)")
    ap.add_argument("--install-status", default="none", choices=["ok", "failed", "skipped", "none"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--install-log", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-deadline", type=float, default=None, help=argparse.SUPPRESS)
    return ap


def parse(argv: list[str]) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    smoke = args.smoke
    for key, (full, tiny) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if smoke else full)
    if args.budget_s is None:
        args.budget_s = TOTAL_BUDGET_S * (SMOKE_SCALE if smoke else 1)
    try:
        _check(args)
    except ArgError as exc:
        ap.error(str(exc))
    return args


def _check(args) -> None:
    if args.part is not None and (args.part not in PARTS or args.part == "tests" or not args.result):
        raise ArgError(f"--part needs one of {', '.join(p for p in PARTS if p != 'tests')} and --result")
    if not 60 <= args.budget_s <= 7200:
        raise ArgError(f"--budget-s must be between 60 and 7200, got {args.budget_s}")
    bad = [b for b in args.mbs if args.global_batch % b]
    if args.global_batch <= 0 or bad:
        raise ArgError(f"--global-batch {args.global_batch} is not a multiple of micro-batch size(s) "
                       f"{','.join(map(str, bad)) or '?'}")
    if not 16 <= args.seq <= 8192:
        raise ArgError(f"--seq must be between 16 and 8192, got {args.seq}")
    if args.warmup < 0 or args.steps < 1:
        raise ArgError(f"--warmup must be >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
    for key in ("prompts", "n", "prompt_len", "new_tokens"):
        if getattr(args, key) < 1:
            raise ArgError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    window = 2048 if not args.smoke else 1024
    if args.prompt_len + args.new_tokens > window:
        raise ArgError(f"--prompt-len + --new-tokens must fit the model's {window}-token window, got "
                       f"{args.prompt_len + args.new_tokens}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ArgError(f"--peak-tflops must be > 0, got {args.peak_tflops}")


# ------------------------------------------------------------------------------------------------------ wheels

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wanted_wheels(path: Path = WHEEL_LIST) -> list[tuple[str, str]]:
    """(name, version) pairs of the wheel list (``name==version`` lines, # comments)."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" not in line:
            raise ValueError(f"{path.name}: {line!r} is not name==version")
        name, version = (x.strip() for x in line.split("==", 1))
        out.append((name, version))
    return out


def _compatible(py: str, abi: str, plat: str) -> bool:
    """Installable by CPython 3.12 on manylinux x86_64."""
    pys = set(py.split("."))
    abis = set(abi.split("."))
    plats = set(plat.split("."))
    py_ok = bool(pys & {"py3", "cp312", "py312", "py2.py3"}) or "py3" in py
    abi_ok = bool(abis & {"none", "cp312", "abi3"})
    plat_ok = "any" in plats or any(p.endswith("x86_64") and ("manylinux" in p or p == "linux_x86_64")
                                    for p in plats)
    return py_ok and abi_ok and plat_ok


def wheel_report(folder: Path, wanted: list[tuple[str, str]]) -> dict:
    files = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    parsed = []
    for f in files:
        m = _WHEEL_RE.match(f.name)
        if m:
            parsed.append((f, _norm(m["name"]), m["version"], _compatible(m["py"], m["abi"], m["plat"])))
    rows, complete = [], True
    for name, version in wanted:
        hits = [p for p in parsed if p[1] == _norm(name)]
        exact = [p for p in hits if p[2] == version]
        if len(hits) > 1:
            state, complete = f"DUPLICATE: {', '.join(p[0].name for p in hits)} (keep one version)", False
        elif exact and exact[0][3]:
            state = f"present  {exact[0][0].name} ({exact[0][0].stat().st_size / 2**20:.2f} MiB)"
        elif exact:
            state, complete = f"NOT cp312/manylinux x86_64: {exact[0][0].name}", False
        elif hits:
            state, complete = f"WRONG VERSION: {hits[0][0].name}", False
        else:
            state, complete = "MISSING", False
        rows.append((f"{name}=={version}", state))
    known = {_norm(n) for n, _ in wanted}
    extra = [f.name for f in files if not (_WHEEL_RE.match(f.name) and _norm(_WHEEL_RE.match(f.name)["name"]) in known)]
    size = sum(f.stat().st_size for f in files)
    return {"folder": str(folder), "present": folder.is_dir(), "rows": rows, "extra": extra,
            "complete": complete and folder.is_dir(), "bytes": size}


# -------------------------------------------------------------------------------------------------------- plan

def limits(args) -> dict[str, int]:
    scale = SMOKE_SCALE if args.smoke else 1
    return {name: PARTS[name][0] * scale for name in args.parts}


def plan_lines(args) -> list[str]:
    lim = limits(args)
    install = INSTALL_BUDGET_S * (SMOKE_SCALE if args.smoke else 1)
    lines = [f"  {'step':<16} {'limit':>6}  what",
             f"  {'install':<16} {install:>5}s  check.sh: pip install --no-index --no-deps --target "
             f"/tmp/evolm_gpu_site {_rel(Path(args.wheels))}/*.whl (skipped when megatron-core 0.16.1 already "
             f"imports)"]
    for name in args.parts:
        lines.append(f"  {name:<16} {lim[name]:>5}s  {PARTS[name][1]}")
    total = install + sum(lim.values())
    lines.append(f"  {'total':<16} {total:>5}s  of a {args.budget_s} s budget (each part stops at its limit or at "
                 f"the budget's end, whichever comes first)")
    return lines


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def out_dir(args) -> Path:
    return Path(args.out or os.environ.get("OUT") or REPO / "runs" / "gpu_check")


def settings_line(args) -> str:
    shape = "tiny" if args.smoke else "evolm_1b"
    return (f"parts={','.join(args.parts)} | train: {shape}, seq {args.seq}, global batch {args.global_batch}, "
            f"micro-batch {'/'.join(map(str, args.mbs))}, {args.warmup} warm-up + {args.steps} timed steps, "
            f"recompute off/on | sampling: {args.prompts} prompts x n={args.n}, {args.prompt_len} prompt + "
            f"{args.new_tokens} new tokens | budget {args.budget_s} s")


def dry_run(args) -> int:
    print("evolm GPU check (issue 11), dry run: nothing installed, torch and CUDA untouched")
    print(f"arguments: ok ({settings_line(args)})")
    try:
        wanted = wanted_wheels()
    except (OSError, ValueError) as exc:
        print(f"wheel list: ERROR {exc}")
        return 1
    print(f"wheel list: {_rel(WHEEL_LIST)} ({len(wanted)} packages; fetched by benchmarks/gpu/fetch_wheels.sh as "
          f"cp312 manylinux x86_64 wheels, --no-deps)")
    rep = wheel_report(Path(args.wheels), wanted)
    for req, state in rep["rows"]:
        print(f"  {req:<32} {state}")
    for name in rep["extra"]:
        print(f"  {'(not in the list)':<32} {name}")
    if rep["complete"]:
        print(f"wheel folder: complete ({len(wanted)}/{len(wanted)}, {rep['bytes'] / 2**20:.2f} MiB) at "
              f"{_rel(Path(rep['folder']))}; carry it: carry=[\"{_rel(Path(rep['folder']))}\"]")
    else:
        state = "absent" if not rep["present"] else "incomplete"
        print(f"wheel folder: {state} at {_rel(Path(rep['folder']))}: run bash benchmarks/gpu/fetch_wheels.sh")
    print(f"plan ({'smoke: tiny shapes, ' if args.smoke else ''}each step a process of its own):")
    for line in plan_lines(args):
        print(line)
    print(f"results: {out_dir(args) / RESULT_NAME} and {LOG_NAME}; summary table on stdout")
    print(f"ready: {'yes' if rep['complete'] else 'no (wheels)'}")
    return 0


# ------------------------------------------------------------------------------------------------------ running

def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in paths:
        paths.append(str(REPO))
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_MININTERVAL="5")
    env.update(extra or {})
    return env


def run_process(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """Run ``cmd`` in its own session, output to ``log``; on timeout kill its whole process group. (rc, seconds);
    rc None means killed at the limit."""
    t = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return rc, time.time() - t


def part_argv(args, name: str, result: Path, deadline: float) -> list[str]:
    argv = [sys.executable, str(HERE / "check.py"), "--part", name, "--result", str(result),
            "--part-deadline", f"{deadline:.1f}", "--work", args.work, "--mbs", ",".join(map(str, args.mbs)),
            "--seq", str(args.seq), "--global-batch", str(args.global_batch), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--prompts", str(args.prompts), "--n", str(args.n),
            "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
            "--budget-s", str(args.budget_s)]
    if args.smoke:
        argv.append("--smoke")
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


def tail(path: Path, chars: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def junit(path: Path) -> dict:
    """Outcome per test from pytest's junit XML."""
    out: dict = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "tests": {}}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        out["parse_error"] = str(exc)
        return out
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "errors"}.get(tag, tag)
                message = (node.get("message") or node.text or "")[:600]
                break
        out[outcome] = out.get(outcome, 0) + 1
        out["tests"][name] = {"outcome": outcome, "seconds": float(case.get("time", 0) or 0),
                              **({"message": message} if message else {})}
    return out


def run_tests(args, work: Path, timeout: float, env: dict) -> dict:
    xml = work / "junit.xml"
    xml.unlink(missing_ok=True)
    log = work / "logs" / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    if importlib.util.find_spec("pytest_timeout") is not None:  # one hung test must not take the whole part
        cmd.append(f"--timeout={int(max(30, timeout / 2))}")
    rc, secs = run_process(cmd, log, timeout, env)
    res = junit(xml)
    if not res["tests"]:  # killed before pytest wrote its XML: the -v lines say what had finished
        for name, outcome in re.findall(r"::(\w+) (PASSED|FAILED|SKIPPED|ERROR)", tail(log, 200000)):
            key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors"}[outcome]
            res[key] += 1
            res["tests"][name] = {"outcome": key, "message": "from the log (no junit XML)"}
    res.update(part_s=round(secs, 1), returncode=rc)
    if rc is None:
        res.update(status="timeout", error=f"killed at its {timeout:.0f} s limit")
    elif rc == 0 and res["failed"] == 0 and res["errors"] == 0:
        res["status"] = "ok"
    else:
        last = (tail(log, 600).strip().splitlines() or ["no output"])[-1]
        res.update(status="error", error=f"pytest rc={rc}: {res['failed']} failed, {res['errors']} errors; {last}")
    res["log_tail"] = tail(log, 3000)
    return res


def run_part(args, name: str, work: Path, timeout: float, env: dict) -> dict:
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    log = work / "logs" / f"{name}.log"
    rc, secs = run_process(part_argv(args, name, result, time.time() + timeout), log, timeout, env)
    try:
        res = json.loads(result.read_text())
    except (OSError, ValueError):
        res = {}
    res["part_s"] = round(secs, 1)
    res["returncode"] = rc
    if rc is None:
        res.update(status="timeout", error=f"killed at its {timeout:.0f} s limit" + (
            f" (it had recorded: {res.get('error')})" if res.get("error") else ""))
    elif res.get("status") in (None, "running"):
        res.update(status="error", error=res.get("error") or f"crashed (rc={rc}): " + (
            tail(log, 400).strip().splitlines() or ["no output"])[-1])
    if res.get("status") != "ok":
        res["log_tail"] = tail(log, 3000)
    return res


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESULT_NAME + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / RESULT_NAME)


def install_info(args) -> dict:
    info = {"status": args.install_status}
    if args.install_log:
        info["log_tail"] = tail(Path(args.install_log), 1500)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.part:
        sys.path.insert(0, str(HERE))
        import _parts

        return _parts.run(args.part, args)
    if args.dry_run:
        return dry_run(args)
    start = args.started_at or time.time()
    deadline = start + args.budget_s
    out, work = out_dir(args), Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    for old in (work / "logs").glob("*.log"):  # this run's logs only
        old.unlink()
    results: dict = {"issue": 11, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "host": os.uname().nodename, "smoke": args.smoke, "settings": vars(args).copy(),
                     "install": install_info(args), "parts": {}}
    for key in ("part", "result", "part_deadline", "install_log", "install_status", "started_at", "dry_run"):
        results["settings"].pop(key, None)
    write(results, out)
    print(f"evolm GPU check (issue 11): {settings_line(args)}")
    for line in plan_lines(args):
        print(line)
    print(f"install: {args.install_status} ({time.time() - start:.0f} s since start)", flush=True)
    env = child_env()
    lim = limits(args)
    for name in args.parts:
        room = deadline - time.time()
        if room < 15:
            res = {"status": "skipped", "error": f"out of time ({room:.0f} s of the budget left)"}
        elif name == "tests":
            res = run_tests(args, work, min(lim[name], room), env)
        else:
            res = run_part(args, name, work, min(lim[name], room), env)
        results["parts"][name] = res
        if "environment" not in results and "torch" in (res.get("environment") or {}):
            results["environment"] = res["environment"]  # torch, CUDA, megatron-core, device: what the run used
        write(results, out)
        print(f"[{name}] {res.get('status')} in {res.get('part_s', 0):.0f} s"
              + (f": {res.get('error')}" if res.get("error") else ""), flush=True)
        if name == "env":
            env = child_env(res.get("nccl_env") or {})
            if res.get("status") == "ok" and not (res.get("gpu") or {}).get("cuda_available") and not args.smoke:
                for rest in args.parts[args.parts.index("env") + 1:]:
                    results["parts"][rest] = {"status": "skipped", "error": "no CUDA device (use --smoke on CPU)"}
                break
    results["summary"] = summary(results)
    results["total_s"] = round(time.time() - start, 1)
    write(results, out)
    logs = [f"===== {p.stem} =====\n{tail(p, 20000)}" for p in sorted((work / "logs").glob("*.log"))]
    (out / LOG_NAME).write_text("\n".join(logs))
    print_table(results)
    print(f"results: {out / RESULT_NAME} (+ {LOG_NAME}); {results['total_s']:.0f} s in all")
    failed = [n for n, r in results["parts"].items() if r.get("status") != "ok"]
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------ summary

def summary(results: dict) -> dict:
    parts = results["parts"]
    train = [c for key in ("train", "train_recompute") for c in (parts.get(key) or {}).get("configs", [])
             if "tokens_per_s" in c and not c.get("error")]
    best = max(train, key=lambda c: c["tokens_per_s"], default=None)
    megatron = parts.get("sample_megatron") or {}
    samplers = {"sample_hf": (parts.get("sample_hf") or {}).get("tokens_per_s"),
                "sample_megatron": megatron.get("tokens_per_s"),
                **{f"sample_megatron_{e}": (megatron.get(e) or {}).get("tokens_per_s") for e in ("continuous", "static")}}
    sft = parts.get("sft_packed") or {}
    fastest = max((v for v in samplers.values() if v), default=None)
    tests = parts.get("tests") or {}
    return {"best_training": best and {k: best.get(k) for k in ("mbs", "recompute", "tokens_per_s", "mfu_6n",
                                                                "mfu_6n_attention", "peak_mem_gib")},
            "sampling_tokens_per_s": samplers,
            "goal_mfu_6n": {"goal": GOALS["mfu_6n"], "best": best and best.get("mfu_6n"),
                            "met": bool(best and (best.get("mfu_6n") or 0) >= GOALS["mfu_6n"])},
            "goal_sampling": {"goal": GOALS["sampling_tokens_per_s"], "best": fastest,
                              "met": bool(fastest and fastest >= GOALS["sampling_tokens_per_s"])},
            "sft_answer_tokens_per_s": sft.get("answer_tokens_per_s"),
            "sft_packed_over_padded": sft.get("packed_over_padded"),
            "tests": {k: tests.get(k) for k in ("passed", "failed", "skipped", "errors")}}


def _f(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def print_table(results: dict) -> None:
    parts = results["parts"]
    env = parts.get("env") or {}
    gpu = env.get("gpu") or {}
    versions = env.get("versions") or {}
    print()
    print(f"== {gpu.get('device', 'no GPU')} | torch {gpu.get('torch', '?')} (CUDA {gpu.get('cuda_runtime')}) | "
          f"megatron-core {versions.get('megatron-core')} | transformers {versions.get('transformers')} | "
          f"TE spec {'yes' if env.get('te_spec_available') is True else 'no'} | bf16 matmul "
          f"{_f(env.get('matmul_bf16_tflops'), '.0f')} TFLOP/s ==")
    print(f"{'part':<16} {'status':<8} {'s':>5}  note")
    print(f"{'install':<16} {results['install'].get('status'):<8} {'':>5}")
    for name, res in parts.items():
        note = res.get("error") or ""
        if name == "tests" and "passed" in res:
            note = (f"{res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped, {res['errors']} errors"
                    + (f"; {note}" if res.get("status") != "ok" else ""))
        print(f"{name:<16} {str(res.get('status')):<8} {_f(res.get('part_s'), '5.0f'):>5}  {note[:150]}")
    tests = (parts.get("tests") or {}).get("tests") or {}
    for test, t in tests.items():
        if t["outcome"] != "passed":
            print(f"  {t['outcome']:<7} {test}: {t.get('message', '')[:160]}")
    rows = [(key, c) for key in ("train", "train_recompute") for c in (parts.get(key) or {}).get("configs", [])]
    if rows:
        t = parts.get("train") or parts.get("train_recompute") or {}
        m = t.get("model") or {}
        print(f"\ntraining: {m.get('preset')} ({_f(m.get('params'), ',')} params), seq {m.get('seq')}, "
              f"{t.get('dtype')}, {t.get('spec')}, peak {_f(t.get('peak_tflops'), '.0f')} TFLOP/s")
        print(f"{'recompute':<10} {'mbs':>4} {'tokens/s':>10} {'MFU 6N':>7} {'6N+attn':>8} {'TFLOP/s':>8} "
              f"{'peak GiB':>9}  note")
        for key, c in rows:
            print(f"{'yes' if c.get('recompute') else 'no':<10} {c.get('mbs'):>4} "
                  f"{_f(c.get('tokens_per_s'), ',.0f'):>10} "
                  f"{_f(c.get('mfu_6n'), '.3f'):>7} {_f(c.get('mfu_6n_attention'), '.3f'):>8} "
                  f"{_f(c.get('tflops_6n'), '.0f'):>8} {_f(c.get('peak_mem_gib'), '.1f'):>9}  "
                  f"{(c.get('error') or '')[:90]}")
    samp = [(k, parts[k]) for k in ("sample_hf", "sample_megatron") if k in parts]
    if samp:
        print(f"\nsampling: n={results['settings'].get('n')}, {results['settings'].get('prompts')} prompts, "
              f"{results['settings'].get('prompt_len')} prompt + {results['settings'].get('new_tokens')} new tokens")
        print(f"{'backend':<16} {'seqs':>5} {'new':>5} {'gen tokens':>11} {'s':>7} {'gen tok/s':>10}  note")
        rows = []
        for k, r in samp:
            engines = [(f"megatron {e}", r[e]) for e in ("continuous", "static") if isinstance(r.get(e), dict)]
            rows += engines or [(k.replace("sample_", ""), r)]
        for k, r in rows:
            seqs = r.get("sequences", (parts.get("sample_megatron") or {}).get("sequences"))
            print(f"{k:<16} {_f(seqs, 'd'):>5} {_f(r.get('new_tokens'), 'd'):>5} "
                  f"{_f(r.get('generated_tokens'), ',d'):>11} {_f(r.get('seconds'), '.1f'):>7} "
                  f"{_f(r.get('tokens_per_s'), ',.0f'):>10}  {(r.get('error') or '')[:90]}")
    sft = parts.get("sft_packed") or {}
    if sft.get("answer_tokens_per_s"):
        tps = sft["answer_tokens_per_s"]
        print(f"\nSFT ({sft.get('shape')}; {sft.get('batch')} examples, mix {sft.get('mix')}): answer tok/s padded "
              f"{_f(tps.get('padded'), ',.0f')} | packed {_f(tps.get('packed'), ',.0f')} | HF "
              f"{_f(tps.get('HF'), ',.0f')}; packed/padded {_f(sft.get('packed_over_padded'), '.3f')}")
    s = results.get("summary") or {}
    g1, g2 = s.get("goal_mfu_6n") or {}, s.get("goal_sampling") or {}
    print(f"\ngoals: MFU (6N) >= {g1.get('goal')}: best {_f(g1.get('best'), '.3f')} "
          f"({'met' if g1.get('met') else 'not met'}) | sampling >= {_f(g2.get('goal'), ',')} tok/s: best "
          f"{_f(g2.get('best'), ',.0f')} ({'met' if g2.get('met') else 'not met'})")


if __name__ == "__main__":
    sys.exit(main())
