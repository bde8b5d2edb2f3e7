"""Our SDPA core attention equals megatron's DotProductAttention (GQA, causal and padding masks, gradients)."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, subprocess_env


def test_sdpa_matches_megatron_dot_product_attention():
    script = Path(__file__).with_name("_attention_check.py")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
