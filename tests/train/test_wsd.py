"""WSD schedule and cooldown branches (evolm_nemo.train.wsd): megatron-core's WSD scheduler against the formulas; one
stable run keeps a checkpoint where each budget's cooldown starts; a branch continues it (weights, optimizer state,
step count, data position) in a new run directory and ends at min_lr, so stable steps + branch steps are exactly the
single WSD run of that budget; bad branch recipes are one line before anything heavy."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from evolm_nemo import cli
from evolm_nemo.train import wsd
from tests.conftest import run_evolm, tiny

LR, MIN_LR, WARMUP, FRACTION, STABLE_ITERS = 3.0e-3, 3.0e-4, 4, 0.25, 40
WSD = ["optim.decay_style=wsd", f"optim.wsd_decay_fraction={FRACTION}", f"optim.warmup_iters={WARMUP}"]


def wsd_lr(k: int, n: int, shape: str = "linear", warmup: int = WARMUP, fraction: float = FRACTION) -> float:
    """The rate step k+1 uses in a WSD run of n iterations (module doc of evolm_nemo.train.wsd)."""
    if warmup and k <= warmup:
        return LR * k / warmup
    d = max(1, round(fraction * n))
    if k <= n - d:
        return LR
    r = min(1.0, (k - (n - d)) / d)
    c = {"linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r)), "1-sqrt": 1 - math.sqrt(r)}[shape]
    return MIN_LR + (LR - MIN_LR) * c


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_megatron_wsd_scheduler_follows_the_formula(shape):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from evolm_nemo.train.engine import _scheduler

    o = SimpleNamespace(lr=LR, min_lr=MIN_LR, warmup_fraction=0.1, warmup_iters=WARMUP, decay_style="wsd",
                        wsd_decay_fraction=FRACTION, wsd_decay_shape=shape, weight_decay=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    n = 37
    sched = _scheduler(OptimizerParamScheduler, opt, o, n)
    for k in range(n + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(wsd_lr(k, n, shape), rel=1e-12, abs=1e-15), k
        sched.step(increment=1)
    assert wsd_lr(n, n, shape) == pytest.approx(MIN_LR)


def test_rl_wsd_warmup_is_checked_over_the_steps_its_scheduler_counts():
    """RL's schedulers run over rl.ppo_epochs x rl.mini_batches optimizer steps per rollout iteration
    (stages.rl.RLStage.build); the WSD warmup rule counted rollout iterations and refused a 3-step warmup in an
    8-step run ("starts at iteration 1 of 2") whose cooldown the scheduler starts at step 6. Now the rule and the
    scheduler agree, and the refusal says steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from evolm_nemo.config import ConfigError, RootConfig, compose
    from evolm_nemo.config.validate import check_schedule
    from evolm_nemo.train.engine import _scheduler

    def cfg(warmup):
        return compose("config", ["stage=grpo", "rl.samples_per_prompt=2", "optim.decay_style=wsd",
                                  f"optim.warmup_iters={warmup}", "rl.ppo_epochs=4", "train.iters=2"], RootConfig)

    check_schedule(cfg(3), 2)  # accepted: warmup steps 1-3, peak 4-6, cooldown 7-8
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _scheduler(OptimizerParamScheduler, opt, cfg(3).optim, 2 * 4)  # as RLStage.build makes it
    assert sched.lr_warmup_steps == 3 and sched.lr_decay_steps - sched.wsd_decay_steps == 6
    with pytest.raises(ConfigError) as exc:
        check_schedule(cfg(7), 2)
    assert exc.value.key == "optim.warmup_iters" and exc.value.message == (
        "the 7-step warmup runs into the cooldown, which starts at step 6 of 8 (RL schedules count optimizer steps: "
        "rl.ppo_epochs x rl.mini_batches = 4 per iteration, 8 over train.iters=2); shorten the warmup or "
        "optim.wsd_decay_fraction")


def _records(out) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r}


@pytest.fixture(scope="module")
def stable(tmp_path_factory, data_cache):
    """A 40-iteration WSD run that keeps branch points for 20 and 40 iterations (cooldowns start at 15 and 30),
    with keep_last=1 pruning its ordinary checkpoints."""
    out = tmp_path_factory.mktemp("stable")
    run_evolm("train", tiny(out, data_cache, f"train.iters={STABLE_ITERS}", *WSD, "train.save_interval=10",
                            "train.keep_last=1", "train.branch_budgets=[20480,40960]"))
    return out


def test_a_stable_run_started_over_replaces_the_branch_points_of_the_run_before(tmp_path, data_cache, stable):
    """The branch points are the run's checkpoints too: a fresh run into a directory holding another run's refuses
    them in one line (it used to train until the first branch point and die there, unable to replace another run's
    checkpoint), and train.overwrite=true removes them with the rest, so the new run keeps its own."""
    import shutil

    from evolm_nemo.checkpoint import io as ckpt
    from tests.conftest import one_line_error

    out = tmp_path / "again"
    shutil.copytree(stable / "branches", out / "branches")  # without the run.json naming their run: another run's
    args = tiny(out, data_cache, "train.iters=20", *WSD, "train.branch_budgets=[20480]")
    line = one_line_error(run_evolm("train", args, check=False), "run.out_dir")
    assert "branches/iter_0000015" in line and "train.overwrite=true" in line
    assert "train.resume=true" not in line  # branch points are never resumed: that advice could not help
    assert sorted(p.name for p in ckpt.committed(out / "branches")) == ["iter_0000015", "iter_0000030"]
    proc = run_evolm("train", [*args, "train.overwrite=true"])
    assert "removed 2 checkpoint(s)" in proc.stdout
    run = json.loads((out / "run.json").read_text())["run_id"]
    assert [(p.name, ckpt.run_id_of(p)) for p in ckpt.checkpoint_dirs(out / "branches")] == [("iter_0000015", run)]


def test_a_stable_run_killed_after_a_branch_point_resumes_there(tmp_path, data_cache, stable):
    """Killed after a branch point, before its next regular save (train.save_interval=0, the default, saves none): the
    rerun resumes from its newest branch point -- a whole checkpoint of this run -- and continues as the uninterrupted
    run did; it was refused as 'another run' whose only way out, train.overwrite=true, removed the branch points."""
    import shutil

    from evolm_nemo.checkpoint import io as ckpt

    out = tmp_path / "killed"
    shutil.copytree(stable / "branches", out / "branches")
    shutil.copy(stable / "run.json", out / "run.json")
    before = {p.name: (p / "evolm.json").stat().st_mtime_ns for p in ckpt.committed(out / "branches")}
    proc = run_evolm("train", tiny(out, data_cache, f"train.iters={STABLE_ITERS}", *WSD, "train.save_interval=10",
                                   "train.keep_last=1", "train.branch_budgets=[20480,40960]"))
    assert f"resuming from {out / 'branches' / 'iter_0000030'}" in proc.stdout, proc.stdout[-2000:]
    assert "resuming at iteration 30" in proc.stdout
    assert {p.name: (p / "evolm.json").stat().st_mtime_ns for p in ckpt.committed(out / "branches")} == before
    want, got = _records(stable), _records(out)
    assert sorted(got) == list(range(31, STABLE_ITERS + 1))
    assert all(got[i]["loss"] == want[i]["loss"] for i in got), [(i, got[i]["loss"], want[i]["loss"]) for i in got]


def test_a_budget_listed_after_the_run_passed_its_branch_point_is_said(tmp_path, data_cache, stable):
    """A resume with train.branch_budgets naming a branch point already behind it (never saved) says so: nothing can
    save it now, and the branch would be refused much later."""
    import shutil

    out = tmp_path / "late"
    shutil.copytree(stable / "checkpoints", out / "checkpoints")
    shutil.copy(stable / "run.json", out / "run.json")
    proc = run_evolm("train", tiny(out, data_cache, f"train.iters={STABLE_ITERS}", *WSD, "train.save_interval=10",
                                   "train.keep_last=1", "train.branch_budgets=[20480,40960]"))
    assert "[evolm] warning: train.branch_budgets: the branch point of 20480 (iteration 15), 40960 (iteration 30) " \
           "is behind the resumed iteration 40 and was not saved" in proc.stderr, proc.stderr[-2000:]


def _branch(out, cache, stable_dir, iters):
    return run_evolm("train", tiny(out, cache, f"train.iters={iters}", *WSD, f"train.branch_from={stable_dir}"))


def test_stable_run_keeps_its_branch_points(stable):
    from evolm_nemo.checkpoint import io as ckpt

    assert [p.name for p in ckpt.committed(stable / "checkpoints")] == ["iter_0000040"]  # keep_last=1
    points = {p.name: json.loads((p / "evolm.json").read_text()) for p in ckpt.committed(stable / "branches")}
    assert sorted(points) == ["iter_0000015", "iter_0000030"]
    assert points["iter_0000015"]["branch_budget"] == "20480" and points["iter_0000015"]["has_optimizer"]
    got = _records(stable)
    assert sorted(got) == list(range(1, STABLE_ITERS + 1))
    for i, r in got.items():
        assert r["lr"] == pytest.approx(wsd_lr(i - 1, STABLE_ITERS), rel=1e-12, abs=1e-15), i


def test_branch_starts_from_the_stable_checkpoint_and_ends_at_min_lr(tmp_path, data_cache, stable):
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.train.engine import _scheduler

    n, s = 20, 15
    proc = _branch(tmp_path, data_cache, stable, n)
    assert f"branching off {stable / 'branches' / 'iter_0000015'} at iteration {s}" in proc.stdout
    got, base = _records(tmp_path), _records(stable)
    assert sorted(got) == list(range(s + 1, n + 1))
    # the stable run's weights and data position: step 16 sees the same loss and gradient; its optimizer state and
    # step count: step 17 (after one update at the same peak rate) too, bitwise
    for i in (s + 1, s + 2):
        assert got[i]["loss"] == base[i]["loss"] and got[i]["grad_norm"] == base[i]["grad_norm"], i
    assert got[n]["loss"] != base[n]["loss"]  # then it decays, the stable run does not
    # stable steps 1..15 + branch steps 16..20 are exactly the 20-iteration WSD run's rates
    rates = [base[i]["lr"] for i in range(1, s + 1)] + [got[i]["lr"] for i in range(s + 1, n + 1)]
    assert rates == pytest.approx([wsd_lr(k, n) for k in range(n)], rel=1e-12, abs=1e-15)
    # ends at min_lr: the committed scheduler is at step 20 of a 20-step WSD schedule, whose rate is the floor
    last = tmp_path / "checkpoints" / f"iter_{n:07d}"
    state = dist_checkpointing.load_common_state_dict(str(last))["evolm"]["scheduler"]
    assert state["num_steps"] == n and state["lr_decay_steps"] == n and state["lr_warmup_steps"] == WARMUP
    cfg = compose("config", [*WSD, f"train.iters={n}"], RootConfig)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = _scheduler(OptimizerParamScheduler, opt, cfg.optim, n)
    sched.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(MIN_LR, rel=1e-12)
    meta = json.loads((last / "evolm.json").read_text())
    branch = meta["lineage"]["branch"]
    assert branch["iteration"] == s == n - round(FRACTION * n) and branch["stable_iters"] == STABLE_ITERS
    assert meta["lineage"]["stages"][-1]["stable_steps"] == s and meta["lineage"]["stages"][-1]["tokens"] == n * 1024
    assert meta["planned_iters"] == n
    # rerunning the branch resumes it (its own directory), not the stable run
    again = _branch(tmp_path, data_cache, stable, n)
    assert "is complete" in again.stdout


def test_branch_at_the_stable_budget_reproduces_the_stable_tail(tmp_path, data_cache, stable):
    """The stable run's own cooldown is the branch of its own budget: every step equal, bitwise."""
    _branch(tmp_path, data_cache, stable, STABLE_ITERS)
    got, base = _records(tmp_path), _records(stable)
    assert sorted(got) == list(range(31, STABLE_ITERS + 1))
    for i in got:
        assert (got[i]["loss"], got[i]["lr"], got[i]["grad_norm"]) == (base[i]["loss"], base[i]["lr"],
                                                                          base[i]["grad_norm"]), i


def _refused(capsys, args, key, *fragments):
    assert cli.main(["train", *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {key}: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])


def test_bad_branch_recipes_are_one_line(tmp_path, data_cache, stable, capsys):
    base = tiny(tmp_path / "b", data_cache)
    _refused(capsys, [*base, "train.iters=30", *WSD, f"train.branch_from={stable}"], "train.branch_from",
             "starts at iteration 22", "iter_0000015, iter_0000030")
    _refused(capsys, [*base, "train.iters=20", f"train.branch_from={stable}"], "optim.decay_style", "wsd")
    _refused(capsys, [*base, "train.iters=20", *WSD, f"train.branch_from={stable}",
                      f"train.init_from={stable}"], "train.branch_from", "not both")
    _refused(capsys, [*base, "train.iters=20", *WSD, f"train.branch_from={stable}", "optim.lr=1e-3"], "optim.lr",
             "stable run's")
    _refused(capsys, [*base, "train.iters=20", *WSD, f"train.branch_from={tmp_path / 'nowhere'}"],
             "train.branch_from", "no stable run")
    _refused(capsys, [*base, "train.iters=20", *WSD, "train.branch_budgets=[40960]"], "train.branch_budgets",
             "more than this run's")
    _refused(capsys, [*base, "train.iters=20", "train.branch_budgets=[10240]"], "train.branch_budgets",
             "decay_style=wsd")
    _refused(capsys, [*base, "train.iters=20", *WSD, "optim.wsd_decay_shape=sqrt"], "optim.wsd_decay_shape",
             "1-sqrt")
    _refused(capsys, [*base, "train.iters=20", "optim.decay_style=wsd", "optim.warmup_iters=18"],
             "optim.warmup_iters", "runs into the cooldown")
    # cosine (and linear, constant): a warmup as long as the run never reaches the peak nor decays
    _refused(capsys, [*base, "train.iters=20", "optim.decay_style=cosine", "optim.warmup_iters=20"],
             "optim.warmup_iters", "never reach optim.lr")
    _refused(capsys, [*base, "train.iters=20", "optim.decay_style=linear", "optim.warmup_fraction=0.99"],
             "optim.warmup_fraction", "never reach optim.lr")
    assert not (tmp_path / "b").exists()


def test_plan_for_the_evolm_1b_grid(capsys):
    p = wsd.plan(wsd.EVOLM_1B_BUDGETS, 512 * 2048, 0.2)
    rows = {r["budget"]: r for r in p["rows"]}
    assert rows["20B"]["iters"] == 19_074 and rows["160B"]["iters"] == 152_588
    assert rows["20B"]["branch_at"] == 19_074 - round(0.2 * 19_074)
    assert p["cosine_iters"] == sum(r["iters"] for r in p["rows"])
    assert p["wsd_iters"] == rows["320B"]["iters"] + sum(r["cooldown_iters"] for b, r in rows.items() if b != "320B")
    assert 0.60 < p["ratio"] < 0.62  # (320 + 0.2 * 300) / 620
    assert wsd.main([]) == 0
    out = capsys.readouterr().out
    assert "320B" in out and "of the compute" in out


def test_the_1b_branch_recipes_start_at_the_stable_recipes_branch_points():
    from evolm_nemo.config import RootConfig, compose
    from evolm_nemo.stages.pretrain import iterations

    stable = compose("config", ["experiment=wsd_1b_stable"], RootConfig)
    n = iterations(stable)
    saves = wsd.branch_saves(stable, n)
    assert sorted(saves) == [15_259, 30_518, 61_035, 122_070] and n == 305_176
    wsd.check_stable(stable, n)
    for budget in ("20b", "40b", "80b", "160b"):
        cfg = compose("config", [f"experiment=wsd_1b_{budget}"], RootConfig)
        assert cfg.train.branch_from == "runs/wsd_1b_stable" and cfg.optim.decay_style == "wsd"
        assert wsd.branch_iteration(cfg.optim, iterations(cfg)) in saves
        assert saves[wsd.branch_iteration(cfg.optim, iterations(cfg))] == budget.upper()
        assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_iters, cfg.parallel.global_batch_size) == \
            (stable.optim.lr, stable.optim.min_lr, stable.optim.warmup_iters, stable.parallel.global_batch_size)


def test_a_killed_branch_resumes_its_own_run(tmp_path, data_cache, stable):
    """A branch is a run like any other: SIGKILLed mid-cooldown, the rerun resumes from its own checkpoint (its
    schedule, not the stable run's) and the cooldown still equals the stable run's, step for step."""
    from tests.conftest import train_then_sigkill

    args = tiny(tmp_path, data_cache, f"train.iters={STABLE_ITERS}", *WSD, f"train.branch_from={stable}",
                "train.save_interval=1", "train.keep_last=20")
    killed_at = train_then_sigkill(args, tmp_path, at_least=32)
    assert 32 <= killed_at < STABLE_ITERS
    resumed = run_evolm("train", args)
    assert f"resuming at iteration {killed_at}" in resumed.stdout and "branching off" not in resumed.stdout
    got, base = _records(tmp_path), _records(stable)
    assert sorted(got) == list(range(31, STABLE_ITERS + 1))
    for i in got:
        assert (got[i]["loss"], got[i]["lr"]) == (base[i]["loss"], base[i]["lr"]), i
