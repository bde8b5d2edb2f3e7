"""TP=2, PP=2 and TP=2+SP give the TP=1 loss for the same weights (forward, and after 3 optimizer steps);
a checkpoint saved at TP=2 resumes at TP=1 and at PP=2 with the same losses (optimizer state resharded)."""

import pytest

from tests.conftest import losses, run_evolm, tiny

TOL = 1e-5


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, data_cache):
    """The TP=1 model's initial weights, committed through one zero-learning-rate step."""
    out = tmp_path_factory.mktemp("init")
    run_evolm("train", tiny(out, data_cache, "train.iters=1", "optim.lr=0", "optim.min_lr=0",
                            "optim.weight_decay=0"))
    return str(out / "checkpoints" / "iter_0000001")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache, init_ckpt):
    out = tmp_path_factory.mktemp("tp1")
    run_evolm("train", tiny(out, data_cache, "train.iters=4", f"train.init_from={init_ckpt}"))
    return losses(out)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2_sp"])
def test_layout_matches_tp1(layout, tmp_path, data_cache, init_ckpt, reference):
    run_evolm("train", tiny(tmp_path, data_cache, f"parallel={layout}", "train.iters=4",
                            f"train.init_from={init_ckpt}"), nproc=2)
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    # iteration 1 is the forward of the shared initial weights; 4 is after 3 optimizer steps
    for it in (1, 2, 3, 4):
        assert abs(got[it] - reference[it]) < TOL, (layout, it, got[it], reference[it])
    assert got[4] < got[1] - 0.05  # it really trained


def test_reshard_tp2_to_tp1_and_pp2(tmp_path, data_cache):
    import shutil

    full = tmp_path / "tp2"
    run_evolm("train", tiny(full, data_cache, "parallel=tp2", "train.iters=6", "train.save_interval=3",
                            "train.keep_last=5", "optim.distributed=true"), nproc=2)
    want = losses(full)
    for layout, nproc in (("single", 1), ("pp2", 2)):
        out = tmp_path / layout
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(full / "checkpoints" / "iter_0000003", out / "checkpoints" / "iter_0000003")
        proc = run_evolm("train", tiny(out, data_cache, f"parallel={layout}", "train.iters=6",
                                       "optim.distributed=true"), nproc=nproc)
        assert "resuming at iteration 3" in proc.stdout
        got = losses(out)
        assert sorted(got) == [4, 5, 6]
        for it in (4, 5, 6):
            assert abs(got[it] - want[it]) < TOL, (layout, it, got[it], want[it])
