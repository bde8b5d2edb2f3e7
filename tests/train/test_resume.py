"""Resume: a run SIGKILLed after a checkpoint and resumed reproduces the uninterrupted run's per-step losses (data
order included); a checkpoint cut short is never used, the previous complete one is."""

import json
import shutil

import pytest

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.runtime.distributed import resolve_precision
from tests.conftest import losses, one_line_error, run_evolm, tiny, train_then_sigkill, tree_bytes

ITERS = 30


def _overrides(out, cache):
    return tiny(out, cache, f"train.iters={ITERS}", "train.save_interval=3", "train.keep_last=20")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("full")
    run_evolm("train", _overrides(out, data_cache))
    return out


def test_sigkill_then_resume_matches(tmp_path, data_cache, uninterrupted):
    killed_at = train_then_sigkill(_overrides(tmp_path, data_cache), tmp_path, at_least=6)
    assert killed_at < ITERS
    resumed = run_evolm("train", _overrides(tmp_path, data_cache))
    start = int(resumed.stdout.split("resuming at iteration ")[1].split()[0])
    assert killed_at <= start < ITERS
    want, got = losses(uninterrupted), losses(tmp_path)
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        assert abs(got[it] - want[it]) <= 1e-6, (it, got[it], want[it])


def test_cut_short_checkpoint_is_skipped(tmp_path, data_cache, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    root = out / "checkpoints"
    last = ckpt.latest(root)
    assert last.name == f"iter_{ITERS:07d}"
    # an interrupted write: a shard file cut in half
    shard = max((p for p in last.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    # leftovers that must never count: a temp dir and a dir with no commit record
    (root / f"iter_{ITERS + 3:07d}.tmp-deadbeef").mkdir()
    (root / f"iter_{ITERS + 6:07d}").mkdir()
    assert not ckpt.is_complete(last)
    assert ckpt.latest(root).name == f"iter_{ITERS - 3:07d}"
    proc = run_evolm("train", _overrides(out, data_cache))
    assert f"resuming at iteration {ITERS - 3}" in proc.stdout
    want, got = losses(uninterrupted), losses(out)
    for it in range(ITERS - 2, ITERS + 1):
        assert abs(got[it] - want[it]) <= 1e-6
    assert ckpt.latest(root).name == f"iter_{ITERS:07d}" and ckpt.is_complete(ckpt.latest(root))


def test_a_second_training_into_a_busy_run_dir_refuses(tmp_path, data_cache):
    """Two trainings into one run directory at once: the second refuses in one line and leaves the first alone (it
    then stops cleanly on SIGTERM, its checkpoint committed); once the first has ended, the directory is free: a
    rerun takes it and resumes (stopped again after a step, to keep the test short)."""
    import signal
    import subprocess
    import time

    from tests.conftest import REPO, evolm_cmd, subprocess_env, train_then_sigterm

    args = tiny(tmp_path, data_cache, "train.iters=400", "train.log_interval=1")
    first = subprocess.Popen(evolm_cmd("train", args), cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended too early"
        second = run_evolm("train", args, check=False)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: run.out_dir:"), lines
        assert "in use by another training" in lines[0]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 143 and "committed" in err.strip().splitlines()[-1], err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    stopped = len((tmp_path / "metrics.jsonl").read_text().splitlines())
    # free again once the first ended; SIGUSR1 (`sbatch --signal=USR1@90`, Lightning's habit) stops it as SIGTERM does
    code, _, again = train_then_sigterm(args, tmp_path, after_rows=stopped + 1, sig="SIGUSR1")
    assert code == 143 and again > stopped


def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path, data_cache, uninterrupted):
    """Preemption (Slurm sends SIGTERM first): the run stops after the current iteration, commits a checkpoint
    there, says so in one line, exits 143, leaves no process behind -- and the rerun continues bitwise."""
    from tests.conftest import train_then_sigterm

    code, err, stopped_at = train_then_sigterm(_overrides(tmp_path, data_cache), tmp_path, after_rows=4)
    assert code == 143, err[-3000:]
    assert 4 <= stopped_at < ITERS
    newest = ckpt.latest(tmp_path / "checkpoints")
    assert newest.name == f"iter_{stopped_at:07d}" and str(newest) in err.strip().splitlines()[-1]
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))
    resumed = run_evolm("train", _overrides(tmp_path, data_cache))
    assert f"resuming at iteration {stopped_at}" in resumed.stdout
    want, got = losses(uninterrupted), losses(tmp_path)
    assert sorted(got) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        assert abs(got[it] - want[it]) <= 1e-6, (it, got[it], want[it])


def test_a_diverging_run_stops_in_one_line_before_it_saves(tmp_path, data_cache):
    """A non-finite loss or grad norm stops the run before that iteration is recorded or saved: one line naming
    optim.lr and the last checkpoint, exit 2; the checkpoints before it stay and load."""
    out = tmp_path / "run"
    proc = run_evolm("train", tiny(out, data_cache, "train.iters=8", "train.save_interval=1", "train.keep_last=20",
                                   "optim.lr=1e30", "optim.warmup_fraction=0"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: optim.lr: "), proc.stderr
    bad = int(lines[0].split(" at iteration ")[1].split(":")[0])
    assert bad <= 8 and "the run diverged" in lines[0]
    saved = [int(p.name.split("_")[1]) for p in ckpt.committed(out / "checkpoints")]
    assert saved == list(range(1, bad))
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == bad - 1  # the diverged iteration is not recorded


def test_a_run_that_does_not_fit_in_memory_stops_in_one_line(tmp_path, data_cache):
    """An allocation the machine refuses (here under an 8 GB address-space limit, a 4M-token sequence) was a
    [rank0] traceback from deep inside the forward pass: one line names the keys that shrink a step."""
    import resource
    import subprocess

    from tests.conftest import REPO, evolm_cmd, subprocess_env

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    proc = subprocess.run(evolm_cmd("train", tiny(tmp_path / "run", data_cache, "train.iters=2",
                                                  "model.seq_length=4000000")),
                          cwd=REPO, env={**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)  # a CUDA start-up would not fit in 8 GB
    line = one_line_error(proc, "parallel.micro_batch_size")
    assert "out of memory (tried to allocate " in line and "model.seq_length=4000000" in line, line


DATA_ARGS = ["train.iters=4", "train.save_interval=2", "train.keep_last=5"]


@pytest.fixture(scope="module")
def cut_at_2(tmp_path_factory, data_cache):
    """A 4-iteration run whose checkpoint 4 is gone, as if it was killed after iteration 2."""
    out = tmp_path_factory.mktemp("cut")
    run_evolm("train", tiny(out, data_cache, *DATA_ARGS))
    shutil.rmtree(out / "checkpoints" / "iter_0000004")
    return out


@pytest.mark.parametrize("change,key", [
    ("parallel.global_batch_size=4", "parallel.global_batch_size"),
    ("data.synthetic_seed=7", "data.synthetic_seed"),  # another corpus
    ("train.seed=7", "train.seed"),  # another data order
])
def test_resume_with_other_data_or_batch_is_refused(tmp_path, data_cache, cut_at_2, change, key):
    """What defines a run's data and batch is recorded in its checkpoints; a resume that changes it is refused in
    one line naming the key and the ways forward, before anything is touched; the unchanged command still
    resumes. (A new mix is a new run: CPT from train.init_from, a WSD branch -- tests/train/test_cpt.py,
    test_wsd.py.)"""
    out = tmp_path / "run"
    shutil.copytree(cut_at_2, out)
    before = tree_bytes(out)
    line = one_line_error(run_evolm("train", tiny(out, data_cache, *DATA_ARGS, change), check=False), key)
    assert "iter_0000002 was trained with" in line and "train.resume=false" in line and "train.init_from=" in line
    assert tree_bytes(out) == before
    resumed = run_evolm("train", tiny(out, data_cache, *DATA_ARGS))
    assert "resuming at iteration 2" in resumed.stdout and sorted(losses(out)) == [1, 2, 3, 4]


def test_a_resume_from_a_checkpoint_holding_pickled_code_is_one_line(tmp_path, data_cache, cut_at_2):
    """The run's own newest checkpoint altered to hold pickled code, its checksums updated to match (so it is not
    passed over as damaged): the resume was a CheckpointError traceback; now one line naming it and the ways on,
    and the payload never runs."""
    from tests.evaluation._tiny import plant_payload

    out = tmp_path / "run"
    shutil.copytree(cut_at_2, out)
    marker = tmp_path / "payload_ran"
    plant_payload(out / "checkpoints" / "iter_0000002", marker)
    line = one_line_error(run_evolm("train", tiny(out, data_cache, *DATA_ARGS), check=False), "train.resume")
    assert "iter_0000002: its files cannot be loaded with weights_only=True" in line and \
        "train.overwrite=true" in line, line
    assert not marker.exists()


def test_a_resume_keeps_the_settings_its_run_started_with(tmp_path, data_cache, cut_at_2):
    """A learning rate changed on resume was ignored (megatron's scheduler keeps the checkpoint's) while the new
    value was recorded; other optimizer settings changed the run mid-way. Refused in one line naming the key and the
    others that differ, nothing touched; what only lays the batch out, writes or shows may change, and the run goes
    on exactly as the uninterrupted one."""
    want = losses(cut_at_2)  # the whole 4-iteration run's record (only its checkpoint 4 was removed)
    out = tmp_path / "run"
    shutil.copytree(cut_at_2, out)
    before = tree_bytes(out)
    here = resolve_precision("auto")  # what train.precision=auto runs on this machine
    other = "fp32" if here == "bf16" else "bf16"
    line = one_line_error(run_evolm("train", tiny(out, data_cache, *DATA_ARGS, "optim.lr=1e-2", "optim.beta1=0.5",
                                              f"train.precision={other}"), check=False), "optim.lr")
    assert "iter_0000002 was trained with optim.lr=" in line and "(and optim.beta1, train.precision)" in line, line
    assert tree_bytes(out) == before
    # a run that ran in another precision than auto means here (trained on a GPU, resumed on CPU): refused
    ran_elsewhere = tmp_path / "elsewhere"
    shutil.copytree(cut_at_2, ran_elsewhere)
    record = ran_elsewhere / "checkpoints" / "iter_0000002" / "evolm.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "precision": other}))
    line = one_line_error(run_evolm("train", tiny(ran_elsewhere, data_cache, *DATA_ARGS), check=False),
                          "train.precision")
    assert f"was trained with train.precision={other}, this recipe has {here}" in line, line
    # naming the precision auto means here is no change
    run_evolm("train", tiny(out, data_cache, *DATA_ARGS, "parallel.micro_batch_size=1", "train.save_interval=1",
                            "train.log_interval=2", f"train.precision={here}"))
    got = losses(out)
    assert sorted(got) == [1, 2, 4] and abs(got[4] - want[4]) <= 1e-5 * abs(want[4]), (got, want)
