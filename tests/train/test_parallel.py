"""TP=2, PP=2, TP=2+SP and DP=2 (distributed optimizer) give the TP=1 loss for the same weights (forward, and after 3 optimizer steps);
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


LAYOUTS = {
    "tp2": ["parallel=tp2"],
    "pp2": ["parallel=pp2"],
    "tp2_sp": ["parallel=tp2_sp"],
    "dp2_distributed_optimizer": ["parallel=single", "optim.distributed=true"],  # dp=2, sharded Adam state
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1(layout, tmp_path, data_cache, init_ckpt, reference):
    run_evolm("train", tiny(tmp_path, data_cache, *LAYOUTS[layout], "train.iters=4",
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


def test_bf16_mixed_precision_trains(tmp_path, data_cache, init_ckpt):
    """The production precision path (bf16 params, fp32 main params in megatron's Float16 optimizer), on CPU."""
    run_evolm("train", tiny(tmp_path, data_cache, "train.precision=bf16", "train.iters=6",
                            f"train.init_from={init_ckpt}"))
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 7)) and got[6] < got[1] - 0.05
