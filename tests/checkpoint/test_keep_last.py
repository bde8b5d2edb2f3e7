"""keep_last-N retention and the commit record of real checkpoints."""

import json

from evolm_nemo.checkpoint import io as ckpt
from tests.conftest import run_evolm, tiny


def test_keep_last_and_commit_record(tmp_path, data_cache):
    run_evolm("train", tiny(tmp_path, data_cache, "train.iters=5", "train.save_interval=1", "train.keep_last=2"))
    root = tmp_path / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["iter_0000004", "iter_0000005"]  # older ones pruned, no temp dirs left
    meta = json.loads((root / "iter_0000005" / ckpt.META).read_text())
    assert meta["iteration"] == 5 and meta["has_optimizer"] and meta["model"]["name"] == "tiny"
    assert meta["extra"]["consumed_samples"] == 5 * 8 and meta["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert meta["manifest"] and all((root / "iter_0000005" / f).is_file() for f in meta["manifest"])
    assert ckpt.resolve(tmp_path) == root / "iter_0000005"
    assert ckpt.describe(root / "iter_0000004")["iteration"] == 4
