"""benchmarks/gpu/check.sh (issue 11) on a CPU machine: the dry run (arguments, wheel list, wheel folder, plan; no
torch, no CUDA) as a real subprocess, bad arguments (one line, exit 2), and a smoke run of the measuring parts at the
tiny shape, so the driver keeps up with the training, generation and sampling APIs it calls."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

GPU = REPO / "benchmarks" / "gpu"
CHECK_SH = GPU / "check.sh"
CHECK_PY = GPU / "check.py"


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cmd: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
    env = dict(subprocess_env(), PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def fake_wheels(folder: Path, names: dict[str, str] | None = None) -> Path:
    """Empty files named like the wheels fetch_wheels.sh saves (enough for the dry run, which reads names)."""
    folder.mkdir(parents=True, exist_ok=True)
    check = load_check()
    for name, version in check.wanted_wheels():
        file = (names or {}).get(name) or f"{re.sub(r'[-_.]+', '_', name)}-{version}-py3-none-any.whl"
        (folder / file).write_bytes(b"")
    return folder


def test_dry_run_through_check_sh(tmp_path):
    wheels = fake_wheels(tmp_path / "wheels", {"megatron-core": "megatron_core-0.16.1-cp312-cp312-manylinux_2_24_"
                                                                "x86_64.manylinux_2_28_x86_64.whl"})
    proc = run(["bash", str(CHECK_SH), "--dry-run", "--wheels", str(wheels)])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("evolm GPU check (issue 11), dry run: nothing installed, torch and CUDA untouched")
    assert "arguments: ok (parts=env,tests,train,train_recompute,sft_packed,sample_hf,sample_megatron" in out
    assert "micro-batch 4/8/16" in out and "seq 2048" in out and "n=16" in out and "128 prompt + 512 new" in out
    for name, version in load_check().wanted_wheels():
        assert re.search(rf"^  {re.escape(name)}=={re.escape(version)}\s+present ", out, re.M), out
    assert "wheel folder: complete (4/4" in out
    for step in ("install", "env", "tests", "train", "train_recompute", "sft_packed", "sample_hf", "sample_megatron"):
        assert re.search(rf"^  {step}\s+\d+s  ", out, re.M), step
    total = int(re.search(r"^  total\s+(\d+)s", out, re.M).group(1))
    assert total <= 480  # under 8 minutes, install included
    assert out.rstrip().endswith("ready: yes")
    assert proc.stderr == ""


def test_dry_run_without_wheels_says_what_to_do(tmp_path):
    proc = run([sys.executable, str(CHECK_PY), "--dry-run", "--wheels", str(tmp_path / "absent")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("MISSING") == len(load_check().wanted_wheels())
    assert "wheel folder: absent" in proc.stdout and "run bash benchmarks/gpu/fetch_wheels.sh" in proc.stdout
    assert proc.stdout.rstrip().endswith("ready: no (wheels)")


def test_dry_run_flags_wrong_wheels(tmp_path):
    wheels = fake_wheels(tmp_path / "w", {"megatron-core": "megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl",
                                          "hydra-core": "hydra_core-1.3.7-py3-none-any.whl"})
    (wheels / "omegaconf-2.2.0-py3-none-any.whl").write_bytes(b"")  # a second version next to the right one
    out = run([sys.executable, str(CHECK_PY), "--dry-run", "--wheels", str(wheels)]).stdout
    assert re.search(r"megatron-core==0.16.1\s+NOT cp312/manylinux x86_64", out), out
    assert re.search(r"hydra-core==1.3.8\s+WRONG VERSION: hydra_core-1.3.7", out), out
    assert re.search(r"omegaconf==2.3.1\s+DUPLICATE", out), out
    assert "wheel folder: incomplete" in out and out.rstrip().endswith("ready: no (wheels)")


def test_dry_run_imports_no_torch():
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['check.py', '--dry-run']; "
            f"runpy.run_path({str(CHECK_PY)!r}, run_name='__main__')")
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plan (" in proc.stdout


@pytest.mark.parametrize("args", [["--mbs", "4,x"], ["--mbs", "5"], ["--parts", "train,nope"], ["--bogus"],
                                  ["--budget-s", "10"], ["--prompt-len", "1800", "--new-tokens", "512"],
                                  ["--steps", "0"], ["--n", "-1"]])
def test_bad_argument_is_one_line_and_exit_2(args):
    for cmd in ([sys.executable, str(CHECK_PY), "--dry-run", *args], ["bash", str(CHECK_SH), "--dry-run", *args]):
        proc = run(cmd)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("check.py: error: "), proc.stderr
        assert proc.stdout == ""


def test_plan_and_wheel_list_are_consistent():
    check = load_check()
    assert check.INSTALL_BUDGET_S + sum(limit for limit, _ in check.PARTS.values()) <= check.TOTAL_BUDGET_S <= 480
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    for name, version in check.wanted_wheels():
        assert pins.get(name.lower()) == version, f"{name}=={version} differs from constraints.txt"
    assert "/benchmarks/gpu/wheels/" in (REPO / ".gitignore").read_text().splitlines()
    for script in (CHECK_SH, GPU / "fetch_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_smoke_run_of_the_measuring_parts(tmp_path):
    """Every measuring part at the tiny shape on this CPU (fp32): the JSON and the table come out."""
    out = tmp_path / "out"
    proc = run([sys.executable, str(CHECK_PY), "--smoke", "--parts",
                "train_recompute,sft_packed,sample_hf,sample_megatron",
                "--mbs", "4", "--out", str(out), "--work", str(tmp_path / "work")], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    train = res["parts"]["train_recompute"]
    assert train["status"] == "ok" and train["recompute"]["granularity"] == "full"
    config = train["configs"][0]
    assert config["mbs"] == 4 and config["tokens_per_s"] > 0 and "error" not in config
    assert config["layer0_forwards_per_microbatch"] == 2  # recomputed in the backward pass
    hf, megatron = res["parts"]["sample_hf"], res["parts"]["sample_megatron"]
    for sample in (hf, megatron["continuous"], megatron["static"]):
        assert sample["status"] == "ok", sample
        assert sample["prompt_tokens"] == 8 and sample["generated_tokens"] > 0
    assert hf["sequences"] == megatron["sequences"] == 8 and megatron["status"] == "ok"
    assert megatron["weights"] == "the hf part's model"
    assert megatron["tokens_per_s"] == megatron["continuous"]["tokens_per_s"]
    sft = res["parts"]["sft_packed"]
    assert sft["status"] == "ok" and sft["padding"]["packed"] < sft["padding"]["padded"], sft
    assert all(v > 0 for v in sft["answer_tokens_per_s"].values()) and sft["packed_over_padded"] > 0
    assert "megatron continuous" in proc.stdout and "SFT (" in proc.stdout
    env = res["environment"]  # what the run used, from its first part
    assert set(env) >= {"python", "torch", "cuda", "megatron_core", "device"} and env["torch"] and env["megatron_core"]
    assert env["device"] and all(res["parts"][p]["environment"] == env for p in res["parts"])
    assert "sampling: n=4" in proc.stdout and "goals: MFU (6N) >= 0.5" in proc.stdout
    assert (out / "gpu_check_log.txt").is_file()
