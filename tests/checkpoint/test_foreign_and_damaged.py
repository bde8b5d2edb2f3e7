"""A save never replaces another run's complete checkpoint, and keep-last does not count checkpoints the resume passed
over. Hand-made checkpoint directories (committed by their evolm.json's manifest) and the real io functions; no
process group is needed."""

import json

import pytest

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.errors import ConfigError


def _checkpoint(root, iteration, run_id, damaged=False):
    """A committed checkpoint as the size check sees it; ``damaged``: a recorded checksum its file does not match."""
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "common.pt").write_bytes(b"x" * 16)
    record = {"iteration": iteration, "run_id": run_id, "manifest": {"common.pt": 16}, "checksum": ckpt.CHECKSUM,
              "checksums": {"common.pt": "0" if damaged else ckpt.file_checksum(path / "common.pt")}}
    (path / ckpt.META).write_text(json.dumps(record))
    return path


def test_a_save_refuses_to_replace_another_runs_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    theirs = _checkpoint(root, 5, "run-a")
    before = (theirs / ckpt.META).read_bytes()
    with pytest.raises(ConfigError) as err:
        ckpt.save(root, 5, [], meta={"run_id": "run-b"})
    assert err.value.key == "run.out_dir" and str(theirs) in str(err.value) and "run-a" in str(err.value)
    assert (theirs / ckpt.META).read_bytes() == before and ckpt.is_complete(theirs)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000005"]  # no temporary directory left


def test_what_a_save_may_replace(tmp_path):
    root = tmp_path / "checkpoints"
    ours, theirs = _checkpoint(root, 1, "run-b"), _checkpoint(root, 2, "run-a")
    cut = _checkpoint(root, 3, "run-a")
    (cut / "common.pt").write_bytes(b"x")  # another run's attempt, cut short: not a checkpoint
    assert ckpt._in_the_way(ours, "run-b") is None and ckpt._in_the_way(cut, "run-b") is None
    assert ckpt._in_the_way(root / "iter_0000004", "run-b") is None
    assert ckpt._in_the_way(theirs, "run-b") is not None


def test_keep_last_does_not_count_the_checkpoints_resume_passed_over(tmp_path):
    # resumed from 3 (4 and 5 damaged, passed over), then 4 is saved anew: keep_last=2 keeps 3 and 4, the
    # damaged 5 neither counts nor is removed (the run's own save at 5 replaces it)
    out = tmp_path / "run"
    root = out / "checkpoints"
    (out / ckpt.RUN_FILE).parent.mkdir(parents=True)
    (out / ckpt.RUN_FILE).write_text(json.dumps({"run_id": "run-a"}))
    for it in (1, 2, 3, 4):
        _checkpoint(root, it, "run-a")
    _checkpoint(root, 5, "run-a", damaged=True)
    assert ckpt.damage(root / "iter_0000005") is not None
    ckpt.prune([root], "run-a", keep_last=2, newest="iter_0000004")
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["iter_0000003", "iter_0000004", "iter_0000005"]


def test_a_partner_half_of_a_set_never_committed_is_removed_not_refused(tmp_path):
    # PPO saves the critic, then the actor commits the pair: a kill between the two saves of the first pair leaves
    # critic/iter_1 of this run and no actor checkpoint. Rerunning the command starts afresh (the half is removed,
    # said in one line); another run's checkpoint there still refuses the directory
    out = tmp_path / "run"
    roots = [out / "checkpoints", out / "critic"]
    out.mkdir()
    (out / ckpt.RUN_FILE).write_text(json.dumps({"run_id": "run-a"}))
    half = _checkpoint(roots[1], 1, "run-a")
    said = []
    dry = ckpt.start_run(out, roots, resume=True, overwrite=False, dry=True)
    assert dry.checkpoint is None and half.is_dir()  # a dry start removes nothing
    start = ckpt.start_run(out, roots, resume=True, overwrite=False, say=said.append)
    assert start.checkpoint is None and not half.exists()
    assert len(said) == 1 and str(half) in said[0]
    _checkpoint(roots[1], 1, "run-x")
    with pytest.raises(ConfigError) as err:
        ckpt.start_run(out, roots, resume=True, overwrite=False)
    assert err.value.key == "run.out_dir" and (roots[1] / "iter_0000001").is_dir()
