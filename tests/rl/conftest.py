"""One SFT parent for the RL tests: the demo's pretraining, then SFT on the demo's generated word problems (a model
that solves some of them, so rewards carry signal)."""

from pathlib import Path

import pytest

from tests.conftest import run_evolm


@pytest.fixture(scope="session")
def rl_parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_parent")
    cache = root / "cache"
    common = [f"data.cache_dir={cache}", "train.progress=false", "train.tensorboard=false"]
    run_evolm("train", ["experiment=demo", f"run.out_dir={root / 'pre'}", *common])
    run_evolm("train", ["experiment=demo_sft", f"run.out_dir={root / 'sft'}", f"train.init_from={root / 'pre'}",
                        "train.epochs=3", *common])
    rl = next(Path(cache).glob("synthetic-sft-*/rl.jsonl"))
    small = root / "rl8.jsonl"  # a fixed set of 8 prompts: a task the tiny model can learn in a few steps
    small.write_text("".join(rl.read_text().splitlines(keepends=True)[:8]))
    return {"sft": root / "sft", "rl": rl, "rl8": small, "cache": cache}
