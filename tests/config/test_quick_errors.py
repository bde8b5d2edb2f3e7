"""A recipe error is one line before any heavy work: every command composes and checks its keys before it imports
torch / megatron-core (0.5 s instead of 3-10 s on the 2-core box). `evolm pipeline` checks the recipe of every stage
it will run before the first one starts."""

import subprocess
import sys

import pytest

from evolm_nemo.cli import COMMANDS
from tests.conftest import REPO, subprocess_env

PROBE = "import sys\nfrom evolm_nemo.cli import main\nrc = main(sys.argv[1:])\nprint('torch' in sys.modules)\n" \
        "sys.exit(rc)\n"
CASES = [[c] for c in COMMANDS if c not in ("eval", "suite")] + [
    ["eval", "downstream"], ["eval", "upstream"], ["suite", "plan"], ["suite", "status"], ["suite", "launch"]]


@pytest.mark.parametrize("command", CASES, ids=" ".join)
def test_an_unknown_key_is_one_line_before_torch_is_imported(command):
    proc = subprocess.run([sys.executable, "-c", PROBE, *command, "no_such_key=1"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no_such_key" in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "False", f"evolm {' '.join(command)} imported torch before checking its keys"


@pytest.mark.parametrize("override, key", [
    ("train.iters=-5", "train.iters"),  # a value every stage's recipe refuses
    ("probe.tokens_interval=51200", "probe.tokens_interval"),  # pretraining and CPT take it; SFT, the third stage, not
    ("train.tokens=2K", "train.tokens"),  # a token budget: pretraining and CPT take it alone; SFT counts epochs
    ("train.val_tokens_interval=1K", "train.val_tokens_interval"),  # held-out loss: pretraining and CPT only
], ids=["every stage", "a later stage", "a budget", "validation"])
def test_the_pipeline_checks_every_stage_recipe_before_torch(tmp_path, override, key):
    """A value that one of the pipeline's stages refuses is one line before the first stage starts (and before torch
    is imported), not after minutes of pretraining."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "pipeline", f"run.out_dir={tmp_path / 'run'}",
                           f"data.cache_dir={tmp_path / 'cache'}", override], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {key}:"), proc.stderr
    assert proc.stdout.strip() == "False", "evolm pipeline imported torch before checking its stages' recipes"
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_check_sees_torch_when_it_is_imported():
    """The probe itself can fail: a command that does import torch first is caught."""
    proc = subprocess.run([sys.executable, "-c", "import torch\n" + PROBE, "train", "no_such_key=1"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip() == "True"
