"""SIGKILL and SIGTERM of the training process leave no process behind (issue 10 item 7): megatron's checkpoint writer
results server and the multiprocessing resource tracker it started used to outlive a killed trainer. Real processes,
real signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evolm_nemo.checkpoint import io as ckpt
from tests.conftest import REPO, evolm_cmd, subprocess_env, tiny, train_then_sigterm


def alive_in_group(pgid: int) -> list[str]:
    """Processes (not zombies) of process group ``pgid``: their command lines."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                found.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120])
        except (OSError, IndexError, ValueError):
            pass
    return found


def _wait_gone(pgid: int, seconds: float = 10.0) -> list[str]:
    deadline = time.time() + seconds
    while (left := alive_in_group(pgid)) and time.time() < deadline:
        time.sleep(0.1)
    return left


def test_sigkill_of_the_trainer_leaves_no_process_behind(tmp_path, data_cache):
    proc = subprocess.Popen(evolm_cmd("train", tiny(tmp_path, data_cache, "train.iters=400", "train.save_interval=2")),
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while ckpt.latest(tmp_path / "checkpoints") is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.3)  # a few more saves
        os.kill(proc.pid, signal.SIGKILL)  # the trainer only, as the OOM killer or a node agent would
        assert proc.wait(timeout=30) == -signal.SIGKILL
        left = _wait_gone(proc.pid)
        assert not left, left
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_FORKER = """
import multiprocessing as mp, os, signal, sys, time
from evolm_nemo.runtime.signals import children_die_with_parent
children_die_with_parent()
child = mp.get_context("fork").Process(target=time.sleep, args=(120,))
child.start()
print(child.pid, flush=True)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_forked_child_dies_with_its_parent(tmp_path):
    """What megatron's checkpoint writers are (forked from the trainer for each save): SIGKILL mid-save takes them
    along instead of leaving them running."""
    proc = subprocess.run([sys.executable, "-c", _FORKER], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=60, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the forked child outlived its parent")


def test_sigterm_mid_ppo_commits_the_actor_critic_pair(tmp_path, sft_parent):
    """The RL loop has its own iterations: SIGTERM there commits actor and critic at the same iteration, exits 143,
    leaves nothing running; the pair resumes (and is stopped again once it has trained a step past the resume), and a
    damaged critic half makes the pair unusable (named). The resumed pair is stopped by SIGHUP, as by SIGTERM."""
    from tests.rl.test_rl import rl_args

    args = rl_args(tmp_path, sft_parent, "ppo", sft_parent["rl8"], "train.iters=30", "train.epochs=null",
                   "rl.prompts_per_step=8")
    code, err, step = train_then_sigterm(args, tmp_path, after_rows=2)
    assert code == 143, err[-3000:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step  # one row per iteration, none past it
    name = f"iter_{step:07d}"
    assert ckpt.latest(tmp_path / "checkpoints").name == name and ckpt.latest(tmp_path / "critic").name == name
    assert ckpt.damage(tmp_path / "critic" / name) is None

    shard = max((tmp_path / "critic" / name).glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    refused = subprocess.run(evolm_cmd("train", args), cwd=REPO, env=subprocess_env(), capture_output=True,
                             text=True, timeout=300)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: train.resume:"), lines
    assert f"critic/{name}" in lines[0] and shard.name in lines[0]
    data[len(data) // 2] ^= 0xFF  # repaired: the pair resumes
    shard.write_bytes(bytes(data))
    resumed: dict = {}  # a hangup (the terminal or ssh session gone) stops it the same way: it used to kill it
    code, err, again = train_then_sigterm(args, tmp_path, after_rows=step + 1, output=resumed, sig="SIGHUP")
    assert code == 143 and f"resuming at iteration {step}" in resumed["stdout"], err[-3000:]
    assert again > step and ckpt.latest(tmp_path / "critic").name == f"iter_{again:07d}"


def test_a_stop_signal_the_loop_no_longer_acts_on_reaches_the_callers_handler():
    """A SIGTERM in a training's last iteration (or its final save) is not acted on by the loop, which is ending; the
    handler installed before the training (`evolm pipeline`'s, which stops before its next stage) gets it when the
    training ends. Without one (plain `evolm train`: the default action) nothing is sent again: it ended whole."""
    import signal

    from evolm_nemo.runtime.signals import StopSignal

    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with StopSignal():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held by the training
        assert got == [signal.SIGTERM]
        got.clear()
        with pytest.raises(RuntimeError), StopSignal():  # a training that failed: its own error goes up, alone
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError
        assert got == []
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signals_held_wait_for_the_end_of_a_step_that_must_not_be_split():
    """fileio.signals_held (prepare-sft's dataset + RL file commit): a real SIGTERM and SIGINT sent inside wait;
    at its end the first goes to the handler that was there before, and that handler is back."""
    import pytest

    from evolm_nemo.fileio import signals_held

    seen = []

    def before(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the interpreter runs handlers between instructions: room for them to run
                    pass
                assert seen == []  # held
                inside = True
        assert inside and seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # steps that fail: their error goes on, not replaced by the held signal's "stopped by ..."
        with pytest.raises(OSError, match="disk full"):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                raise OSError("disk full")
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
