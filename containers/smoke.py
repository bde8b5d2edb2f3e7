"""The first command each image runs: `python containers/smoke.py train|eval [--allow-cpu]`.

train: torch with CUDA, Transformer Engine importable, megatron-core's version, then a 3-iteration training of the
tiny model on generated data through `evolm train` (bf16 with Transformer Engine's layer spec on a GPU).
eval: torch with CUDA, tensorrt_llm importable, the evaluation side of evolm-nemo (math-verify, lm-eval) and one
answer judged by the shared checker.
Exit 0 and a last line `smoke: ok` when everything holds; otherwise the first failure, exit 1. --allow-cpu turns the
GPU-only checks into notes (this is how the CPU tests run it).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile


def _fail(msg: str) -> int:
    print(f"smoke: FAILED: {msg}", flush=True)
    return 1


def gpu(allow_cpu: bool) -> str | None:
    import torch

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}", flush=True)
    if torch.cuda.is_available():
        print(f"devices: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", flush=True)
        return None
    return None if allow_cpu else "no CUDA device visible (docker run --gpus all / srun --gpus-per-node)"


def optional_import(name: str, allow_cpu: bool) -> str | None:
    try:  # a bare transformer-engine raises RuntimeError, not ImportError
        module = __import__(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
        note = f"{name} not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if allow_cpu:
            print(f"note: {note}", flush=True)
            return None
        return note
    print(f"{name} {getattr(module, '__version__', '?')}", flush=True)
    return None


def train(allow_cpu: bool) -> int:
    for problem in (gpu(allow_cpu), optional_import("transformer_engine", allow_cpu)):
        if problem:
            return _fail(problem)
    import megatron.core

    print(f"megatron-core {megatron.core.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="evolm-smoke-") as tmp:
        cmd = [sys.executable, "-m", "evolm_nemo.cli", "train", "train.iters=3", f"run.out_dir={tmp}/run",
               f"data.cache_dir={tmp}/cache", "train.progress=false", "train.tensorboard=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("[evolm]")]
        print("\n".join(lines[-3:]), flush=True)
        if proc.returncode != 0:
            return _fail(f"`evolm train` exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    print("smoke: ok", flush=True)
    return 0


def evaluate(allow_cpu: bool) -> int:
    for problem in (gpu(allow_cpu), optional_import("tensorrt_llm", allow_cpu)):
        if problem:
            return _fail(problem)
    import lm_eval  # noqa: F401
    import math_verify  # noqa: F401

    import evolm_nemo.evaluation.cli  # noqa: F401
    from evolm_nemo.answers import judge

    if not judge("gsm8k_platinum", "2 + 2 = \\boxed{4}", "4", "evolm"):
        return _fail("the answer checker judged \\boxed{4} == 4 wrong")
    print("answer checker: \\boxed{4} == 4", flush=True)
    print("smoke: ok", flush=True)
    return 0


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    allow_cpu = "--allow-cpu" in argv
    if args not in (["train"], ["eval"]):
        print("usage: python containers/smoke.py train|eval [--allow-cpu]", file=sys.stderr)
        return 2
    return train(allow_cpu) if args[0] == "train" else evaluate(allow_cpu)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
