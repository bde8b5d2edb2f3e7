"""Damaged, deleted and foreign checkpoints, and recipes that no longer fit the run they would resume (issue 10 items
1, 3, 4, 5 and the resume halves of 10/11): each is named in one line, resume falls back to the previous committed
checkpoint or refuses, and nothing of the run is lost."""

import json
import shutil

import pytest

from evolm_nemo.checkpoint import io as ckpt
from tests.conftest import losses, run_evolm, tiny

ITERS = 12


def _overrides(out, cache, *extra):
    return tiny(out, cache, f"train.iters={ITERS}", "train.save_interval=3", "train.keep_last=10", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("reference")
    run_evolm("train", _overrides(out, data_cache))
    return out


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out, out / "checkpoints"


def _flip_middle(path, n=4096):
    """Same size, different bytes: what a bad disk or a torn copy leaves."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    lo, hi = max(0, mid - n // 2), min(len(data), mid + n // 2)
    data[lo:hi] = bytes(b ^ 0xFF for b in data[lo:hi])
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def _one_error_line(proc, key):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}:"), (proc.returncode,
                                                                                                 proc.stderr[-3000:])
    return lines[0]


def _largest_shard(directory):
    return max(directory.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("target", ["shard", ".metadata", "common.pt"])
def test_damaged_file_is_named_and_resume_falls_back(tmp_path, data_cache, reference, target):
    out, root = _copy(reference, tmp_path)
    newest = root / f"iter_{ITERS:07d}"
    path = _largest_shard(newest) if target == "shard" else newest / target
    _flip_middle(path)
    assert ckpt.is_complete(newest)  # sizes match: only the checksums can tell
    assert path.name in ckpt.damage(newest)
    proc = run_evolm("train", _overrides(out, data_cache))
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("[evolm] skipping checkpoint")]
    assert len(skipped) == 1 and newest.name in skipped[0] and path.name in skipped[0] and "damaged" in skipped[0]
    assert f"resuming at iteration {ITERS - 3}" in proc.stdout
    want, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        assert abs(got[it] - want[it]) <= 1e-6, (it, got[it], want[it])
    assert ckpt.damage(newest) is None  # rewritten whole


@pytest.mark.parametrize("target", ["shard", ".metadata"])
def test_export_of_a_damaged_checkpoint_refuses(tmp_path, data_cache, reference, target):
    out, root = _copy(reference, tmp_path)
    newest = root / f"iter_{ITERS:07d}"
    path = _largest_shard(newest) if target == "shard" else newest / target
    _flip_middle(path)
    proc = run_evolm("export-hf", [f"src={newest}", f"dst={tmp_path / 'hf'}"], check=False)
    line = _one_error_line(proc, "src")
    assert path.name in line and "damaged" in line
    assert not (tmp_path / "hf").exists()


def test_a_damaged_parent_is_one_line_naming_train_init_from(tmp_path, data_cache, reference):
    """A parent (train.init_from) with a damaged shard was a CheckpointError traceback: one line naming the key and
    the file; the new run leaves nothing."""
    parent, root = _copy(reference, tmp_path)
    shard = _largest_shard(root / f"iter_{ITERS:07d}")
    _flip_middle(shard)
    out = tmp_path / "child"
    proc = run_evolm("train", tiny(out, data_cache, "train.iters=2", f"train.init_from={parent}"), check=False)
    line = _one_error_line(proc, "train.init_from")
    assert shard.name in line and "damaged" in line
    assert not out.exists()  # checked before the run directory is made (it kept a .lock and run.json)


def test_a_cut_newest_checkpoint_is_passed_over_with_a_word(tmp_path, reference, capsys):
    """export-hf src=<run> and train.init_from=<run> took the previous checkpoint without a word when the newest was
    cut short; src=<that checkpoint> said "incomplete" without naming the file. Now the run's newest complete one is
    still used, and the one passed over is said once per process with its file."""
    out, root = _copy(reference, tmp_path)
    newest = root / f"iter_{ITERS:07d}"
    shard = _largest_shard(newest)
    shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    assert ckpt.resolve(out) == root / f"iter_{ITERS - 3:07d}"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"[evolm] note: passing over checkpoint {newest} ({shard.name} has "
                                               "1000 bytes") and err[0].endswith(f"using iter_{ITERS - 3:07d}")
    assert ckpt.resolve(root) == root / f"iter_{ITERS - 3:07d}" and capsys.readouterr().err == ""  # once
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint is incomplete \({shard.name} has 1000 bytes"):
        ckpt.resolve(newest)
    shutil.rmtree(newest / "rng", ignore_errors=True)
    (newest / ckpt.META).unlink()  # never committed (a save killed before its commit): nothing to say
    ckpt._PASSED_OVER.clear()
    assert ckpt.resolve(out) == root / f"iter_{ITERS - 3:07d}" and capsys.readouterr().err == ""


def test_export_reads_each_file_for_its_checksum_once(tmp_path, reference):
    """export-hf checks every file before anything heavy and then loads without checking again (a 4B checkpoint is
    tens of GB read per pass): each file of the checkpoint is checksummed exactly once."""
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    newest = reference / "checkpoints" / f"iter_{ITERS:07d}"
    script = (  # the real command, with the checksum function counting what it reads
        "import collections, sys\n"
        "from evolm_nemo.checkpoint import io\n"
        "seen, plain = collections.Counter(), io.file_checksum\n"
        "def counted(path, *a, **k):\n"
        "    seen[str(path)] += 1\n"
        "    return plain(path, *a, **k)\n"
        "io.file_checksum = counted\n"
        "from evolm_nemo.cli import main\n"
        "code = main(['export-hf', *sys.argv[1:]])\n"
        "import json; print('COUNTS', json.dumps(seen))\n"
        "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script, f"src={newest}", f"dst={tmp_path / 'hf'}", "progress=false"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.split("COUNTS", 1)[1])
    source = {path: n for path, n in seen.items() if path.startswith(str(newest) + "/")}  # not the export's own
    recorded = json.loads((newest / "evolm.json").read_text())["checksums"]
    assert len(source) == len(recorded) and set(source.values()) == {1}, source


def test_a_checkpoint_is_verified_once_per_process_until_it_changes(tmp_path, reference, monkeypatch):
    """RL's actor, reference and critic start from one parent: verified once, not three times; a checkpoint whose
    evolm.json was rewritten since (a new commit) is read again, and damage found then is named."""
    import collections

    out, root = _copy(reference, tmp_path)
    newest = root / f"iter_{ITERS:07d}"
    seen, plain = collections.Counter(), ckpt.file_checksum
    monkeypatch.setattr(ckpt, "file_checksum", lambda path, *a, **k: seen.update([str(path)]) or plain(path, *a, **k))
    ckpt.verify(newest)
    files = len(seen)
    ckpt.verify(newest)
    assert files > 1 and len(seen) == files and max(seen.values()) == 1
    _flip_middle(_largest_shard(newest))
    meta = (newest / "evolm.json").read_text()
    (newest / "evolm.json").unlink()
    (newest / "evolm.json").write_text(meta)  # committed anew: another file, the same record
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.verify(newest)
    assert max(seen.values()) == 2


def test_deleted_files_are_named_and_none_usable_refuses(tmp_path, data_cache, reference):
    out, root = _copy(reference, tmp_path)
    newest = root / f"iter_{ITERS:07d}"
    (newest / "common.pt").unlink()
    proc = run_evolm("train", _overrides(out, data_cache))
    assert f"[evolm] skipping checkpoint {newest}: common.pt is missing" in proc.stdout
    assert f"resuming at iteration {ITERS - 3}" in proc.stdout

    # every checkpoint damaged: refuse in one line, metrics.jsonl and the checkpoints untouched
    for directory in ckpt.checkpoint_dirs(root):
        _largest_shard(directory).unlink()
    metrics = (out / "metrics.jsonl").read_bytes()
    names = sorted(p.name for p in root.iterdir())
    proc = run_evolm("train", _overrides(out, data_cache), check=False)
    line = _one_error_line(proc, "train.resume")
    assert str(root) in line and "train.overwrite=true" in line and "is missing" in line
    assert (out / "metrics.jsonl").read_bytes() == metrics and sorted(p.name for p in root.iterdir()) == names

    # asked to start over: it says so and does
    proc = run_evolm("train", _overrides(out, data_cache, "train.overwrite=true"))
    assert "[evolm] train.overwrite=true: removed 4 checkpoint(s) of the previous run" in proc.stdout
    assert "resuming" not in proc.stdout
    assert sorted(losses(out)) == list(range(1, ITERS + 1))


def test_a_fresh_run_does_not_take_over_another_runs_directory(tmp_path, data_cache, reference):
    out, root = _copy(reference, tmp_path)
    before = sorted(p.name for p in root.iterdir())
    old_id = json.loads((out / ckpt.RUN_FILE).read_text())["run_id"]
    short = ["train.resume=false", "train.iters=5", "train.save_interval=1", "train.keep_last=2"]
    proc = run_evolm("train", tiny(out, data_cache, *short), check=False)
    line = _one_error_line(proc, "run.out_dir")
    assert str(out) in line and "train.overwrite=true" in line and "new run.out_dir" in line
    assert sorted(p.name for p in root.iterdir()) == before

    proc = run_evolm("train", tiny(out, data_cache, *short, "train.overwrite=true"))
    assert "[evolm] train.overwrite=true: removed 4 checkpoint(s) of the previous run" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000005"]
    done = proc.stdout.split("checkpoint ")[-1].strip()
    assert done == str(root / "iter_0000005") and ckpt.is_complete(root / "iter_0000005")
    new_id = json.loads((out / ckpt.RUN_FILE).read_text())["run_id"]
    assert new_id != old_id and ckpt.run_id_of(root / "iter_0000005") == new_id
    assert ckpt.resolve(out) == root / "iter_0000005"


def test_keep_last_never_prunes_the_run_for_a_foreign_checkpoint(tmp_path, data_cache, reference):
    out = tmp_path / "b"
    args = tiny(out, data_cache, "train.iters=6", "train.save_interval=2", "train.keep_last=2")
    run_evolm("train", args)
    root = out / "checkpoints"
    shutil.rmtree(root / "iter_0000006")  # B is now resumable from 4
    foreign = root / "iter_0000100"  # another run's checkpoint, newer by number, dropped in by hand
    shutil.copytree(reference / "checkpoints" / f"iter_{ITERS:07d}", foreign)
    proc = run_evolm("train", args)
    assert f"[evolm] skipping checkpoint {foreign}: written by run" in proc.stdout
    assert "resuming at iteration 4" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000006", "iter_0000100"]
    assert ckpt.resolve(out) == root / "iter_0000006"  # what export-hf src=<run> takes: this run's newest


@pytest.mark.parametrize("extra,key,say", [
    (["train.iters=20"], "train.iters", "planned for 12 iterations"),
    (["train.iters=6"], "train.iters", "planned for 12 iterations"),  # below the checkpoint: no silent exit 0
    (["train.iters=null", "train.tokens=20480"], "train.tokens", "planned for 12 iterations"),
    (["model.num_layers=3"], "model.num_layers", "differs from 2"),
])
def test_a_recipe_that_does_not_fit_the_checkpoint_refuses(tmp_path, data_cache, reference, extra, key, say):
    out, root = _copy(reference, tmp_path)
    metrics = (out / "metrics.jsonl").read_bytes()
    proc = run_evolm("train", _overrides(out, data_cache, *extra), check=False)
    line = _one_error_line(proc, key)
    assert say in line and str(root / f"iter_{ITERS:07d}") in line
    if key.startswith("train."):
        assert f"train.iters={ITERS}" in line and "train.init_from=" in line
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_resumes(tmp_path, data_cache, small_disk):
    """ENOSPC for real (a 3 MiB tmpfs holds one ~2 MiB checkpoint, not two) in the middle of a save: one line naming
    the checkpoint, no `iter_*.tmp-*` left filling the disk, the committed one intact; once there is room, the same
    command resumes from it and finishes."""
    disk = small_disk.mount("3m")
    args = tiny(disk / "run", data_cache, "train.iters=4", "train.save_interval=2", "train.keep_last=10")
    proc = run_evolm("train", args, check=False)
    line = _one_error_line(proc, "run.out_dir")
    root = disk / "run" / "checkpoints"
    assert f"cannot write checkpoint {root / 'iter_0000004'}: No space left on device" in line, line
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002"]
    assert ckpt.damage(root / "iter_0000002") is None
    small_disk.grow(disk, "64m")
    resumed = run_evolm("train", args)
    assert "resuming at iteration 2" in resumed.stdout and ckpt.latest(root).name == "iter_0000004"
    assert sorted(losses(disk / "run")) == [1, 2, 3, 4]
