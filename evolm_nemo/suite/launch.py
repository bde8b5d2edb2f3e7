"""`evolm suite launch suite=<name> executor=local|slurm [dry_run=true]`: every pending run of a suite, parents first,
through NeMo-Run (nemo-run 0.11.1; imported only here, when launching).

Idempotent: before anything is started each node's state is read from its output --

* ``done``: a train node whose newest committed checkpoint is at its planned last iteration (the trainer would say
  "is complete"); an export whose HF directory exists (exports appear atomically, only once verified); an
  evaluation whose ``result.json`` holds its mode; a data step whose file exists. Done nodes are skipped.
* ``resume``: a train node with committed checkpoints short of the end. It is launched again with the same
  command; the trainer resumes from the newest committed checkpoint (``train.resume=true``, its default).
* ``new``: nothing there yet -- or an export, evaluation or training that no longer shows its parent
  (``outdated``: the parent runs again, was trained again, or was exported again since): done again, an export
  with ``overwrite=true``, a training as a new run of its directory.

``executor=local``: each pending node, one after another, is one ``run.Experiment`` with one ``run.Script`` on a
``run.LocalExecutor`` (``python -m evolm_nemo.cli ...``, or ``torchrun --standalone --nproc_per_node <local.nproc>``
for trainings), logging to ``<root>/logs/<node>.log``; the first failure stops the launch (its dependants are not
started) and is reported in one line with the log's tail. One experiment per node rather than one DAG: NeMo-Run's
local DAG starts a task whose dependency failed (observed with 0.11.1). NeMo-Run's local scheduler starts each task
in a session of its own; ``evolm_nemo.suite.node`` wraps the node so that it dies with the launcher. SIGTERM or
Ctrl-C of the launcher is passed on to the running node (a training commits its save-on-signal checkpoint); the
launcher waits for it to end, says so in one line and exits with 128 + the signal; a second signal cancels the node.

``executor=slurm``: one ``run.Experiment`` holding every pending node, each a ``run.Script`` on a
``run.SlurmExecutor`` -- pyxis ``container_image`` / ``container_mounts``, ``nodes``, ``gpus_per_node``, ``time``,
``account`` / ``partition`` from the suite recipe, ``--signal=TERM@<s>`` so a training commits a checkpoint before
its time limit, ``torchrun`` across the job's nodes (``run.Torchrun``, c10d rendezvous) -- added with
``dependencies=[...]`` along the DAG, so NeMo-Run submits them with ``--dependency=afterok:`` (and
``--kill-on-invalid-dep=yes``: a failed parent cancels its dependants). NeMo-Run forces the
container's working directory to its job directory, so each node's script first changes to
``slurm.container_workdir``. A pending node whose job is still queued or running (same job name, ``squeue --me``) is
not submitted twice; its dependants wait for that job -- unless that job is pending on a dependency that can never be
satisfied (reason ``DependencyNeverSatisfied``) or on a parent submitted again now: it is cancelled (``scancel``)
and submitted again. ``dry_run=true`` runs NeMo-Run's dry run and copies the
sbatch scripts it wrote (and each node's script) to ``out=`` (default ``<root>/slurm``) for inspection; nothing is
submitted. NeMo-Run's experiment metadata goes to ``$NEMORUN_HOME`` (default here ``<root>/nemo_run``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.compose import changed_keys, compose
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.conversion import hfdir
from evolm_nemo.conversion.config import ExportHFConfig
from evolm_nemo.fileio import check_dst, lock_file, replace_dir, temp_dir
from evolm_nemo.stages import kind
from evolm_nemo.suite.node import pid_file
from evolm_nemo.suite.plan import Row, SuitePlan
from evolm_nemo.suite.spec import DATA_MAKERS, Suite


@dataclass
class Job:
    row: Row
    state: str  # done | resume | new
    detail: str
    argv: list[str] = field(default_factory=list)  # after `python -m evolm_nemo.cli` (or the module for data)


# What fixes a run's iteration count besides its dataset's size, by budget (stages.base.epoch_iters,
# stages.rl.plan_iters): a fine-tuning / RL plan is an estimate from the suite's ``samples:``, so a finished run whose
# own count differs is done unless one of these changed since (then the trainer, relaunched, names the key)
COUNT_KEYS = {"epochs": ("train.epochs", "train.iters", "parallel.global_batch_size"),
              "prompts": ("train.epochs", "train.iters", "rl.prompts_per_step")}


def _count_change(recorded: dict | None, cfg, budget: str) -> str | None:
    """The first key of ``COUNT_KEYS[budget]`` whose value in a checkpoint's recorded config differs from ``cfg``'s,
    as ``key=theirs -> ours``; keys the record lacks are not compared."""
    if cfg is None:
        return None
    ours = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in COUNT_KEYS.get(budget, ())}
    changed = changed_keys(recorded or {}, ours)
    return f"{changed[0][0]}={changed[0][1]} -> {changed[0][2]}" if changed else None


def train_state(out: Path, planned: int | None, budget: str = "tokens", cfg=None) -> tuple[str, str]:
    """A train node's state from its newest committed checkpoint. ``planned``: the plan's iterations -- the
    trainer's own for a token budget (a checkpoint planned otherwise was trained by another recipe: resumed, the
    trainer refuses it naming the key), an estimate from the suite's ``samples:`` for the other budgets (their runs
    count their real dataset: a finished one is done, with a note where the counts differ, unless a ``COUNT_KEYS``
    value changed since)."""
    last = ckpt.latest(out / "checkpoints")
    if last is None:
        return ("new", "no committed checkpoint") if not out.exists() else ("new", f"{out} has no committed "
                                                                                  "checkpoint yet")
    meta = json.loads((last / ckpt.META).read_text())
    it, want = meta.get("iteration"), meta.get("planned_iters")
    if want is None or it is None or it < want:
        return "resume", f"{last.name} of {want if want is not None else planned}"
    if planned is None or want == planned:
        return "done", f"{last.name} of {want}"
    if budget != "tokens" and (changed := _count_change(meta.get("config"), cfg, budget)) is None:
        return "done", f"{last.name} of {want} (the run's count over its dataset; the plan estimated {planned})"
    return "resume", f"{last.name} of {want}" + (f"; this recipe changed {changed}" if budget != "tokens" else "")


def node_state(suite: Suite, row: Row) -> tuple[str, str]:
    out = Path(suite.out(row.node))
    if row.kind == "train":
        return train_state(out, row.iters, kind(row.stage).budget, row.cfg)
    if row.kind == "export":
        return ("done", "HF directory present") if (out / "config.json").is_file() else ("new", "not exported")
    if row.kind == "eval":
        mode = row.stage.split("-", 1)[1]
        try:
            result = json.loads((out / "result.json").read_text())
        except (OSError, ValueError):
            result = {}
        done = isinstance(result, dict) and isinstance(result.get(mode), dict)
        return ("done", "result.json present") if done else ("new", "no result yet")
    made = DATA_MAKERS[suite.nodes[row.node].make][1]
    return ("done", "data present") if (out / made).is_file() else ("new", "not written")


def argv_for(plan: SuitePlan, row: Row) -> list[str]:
    """The command line of a node after the interpreter (`-m evolm_nemo.cli <command> ...` semantics)."""
    s = plan.suite
    node = s.nodes[row.node]
    if row.kind == "train":
        return ["train", *row.overrides]
    if row.kind == "export":
        return ["export-hf", *row.overrides]
    if row.kind == "eval":
        return ["eval", node.mode, *row.overrides]
    module = DATA_MAKERS[node.make][0]
    if node.make == "nano_world":
        return ["-m", module, f"out={s.out(row.node)}", *row.overrides]
    parent = plan.row(node.parent)
    cache = parent.cfg.data.cache_dir if parent.cfg is not None else "runs/cache"
    items = [f"src={s.out(node.parent)}", f"out={s.out(row.node)}", f"cache_dir={cache}"]
    if node.limit:
        items.append(f"limit={node.limit}")
    return ["-m", module, *items]


def jobs(plan: SuitePlan) -> list[Job]:
    out, states = [], {}
    for row in plan.rows:  # parents first
        state, detail = node_state(plan.suite, row)
        argv = argv_for(plan, row)
        judged = state == "done" or (row.kind == "train" and state == "resume")  # a resume grows the stale run on
        why = outdated(plan.suite, row, states) if judged else None
        if why is not None:
            state, detail = "new", f"redone: {why}"
            if row.kind == "export":
                argv.append("overwrite=true")  # the node's own earlier export, replaced once the new one is verified
            if row.kind == "train":  # the node's own run, trained from a parent checkpoint that is gone
                argv += ["train.resume=false", "train.overwrite=true"]
        states[row.node] = state
        out.append(Job(row=row, state=state, detail=detail, argv=argv))
    return out


def outdated(suite: Suite, row: Row, states: dict[str, str]) -> str | None:
    """Why a done export or evaluation (or a training: ``_train_outdated``) no longer shows its parent (None when it
    does): the parent runs again in this launch, an export was made from another run or checkpoint than its ``src``
    gives now (the run was removed and trained again), or an evaluation's result.json records another export than
    the one there now. Such a node was
    skipped as done, and the suite's report and release cards showed the earlier model's results for the new one.
    What it was made from is read from the records (never from file times, which a copy without -p or clock skew on
    a shared filesystem changes); a node whose record predates them is not judged."""
    node = suite.nodes[row.node]
    if row.kind == "train":
        return _train_outdated(suite, row, states)
    if row.kind not in ("export", "eval") or not node.parent:
        return None
    again = f"its parent {node.parent} runs again" if states.get(node.parent, "done") != "done" else None
    if row.kind == "export":
        return _export_outdated(suite, row, again)
    if again is not None:
        return again
    mode = row.stage.split("-", 1)[1]
    try:
        result = json.loads((Path(suite.out(row.node)) / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    made = result.get(mode) if isinstance(result, dict) else None
    made = made.get("export") if isinstance(made, dict) else None
    now = hfdir.export_identity(Path(suite.out(node.parent)))
    if not isinstance(made, dict) or now is None or made.get("sha256") == now["sha256"]:
        return None  # evaluated before results recorded their export (left as done), or of the export there now
    return (f"it evaluated another export (iteration {made.get('iteration')} of run {made.get('run_id')}) than "
            f"{node.parent} holds now (iteration {now['iteration']} of run {now['run_id']})")


def _export_outdated(suite: Suite, row: Row, again: str | None) -> str | None:
    """:func:`outdated` of an export: its record (``evolm_export.json``) against the checkpoint its own ``src``
    resolves to now, as `evolm export-hf` resolves it (the node's composed overrides: a node may pin ``src`` to one
    checkpoint of its parent, an intermediate one, rather than the parent run's newest). ``again``: why the parent
    runs again (or None); an export pinned to a checkpoint that is there, of the recorded run and iteration, stays
    done even so -- the parent's further training does not change it."""
    try:
        record = hfdir.export_record(Path(suite.out(row.node)), "dst")
        src = compose("export_hf", list(row.overrides), ExportHFConfig).src
        found = ckpt.resolve(src)
        meta = json.loads((found / ckpt.META).read_text())
    except (ConfigError, ckpt.CheckpointError, OSError, ValueError, TypeError):
        return again  # not one of ours to judge, or its src is not there (yet): as its parent
    if not isinstance(record, dict) or not isinstance(meta, dict):
        return again
    if (record.get("run_id"), record.get("iteration")) != (meta.get("run_id"), meta.get("iteration")):
        return (f"it was exported from iteration {record.get('iteration')} of run {record.get('run_id')}; its src "
                f"{src} is now {found.name} of run {meta.get('run_id')}")
    pinned = (Path(src) / ckpt.META).exists()  # src names the checkpoint itself, not a run whose newest it takes
    return None if pinned else again


def _train_outdated(suite: Suite, row: Row, states: dict[str, str]) -> str | None:
    """Why a train node's run no longer grows from its parent (None when it does, or cannot be judged): its
    checkpoints record the parent checkpoint it started from (``ckpt.PARENT_RUN``), and its parent node trains again
    in this launch, or its ``train.init_from`` now resolves to another run's or iteration's -- the parent run was
    removed and trained again. Kept, the child (and its exports, evaluations and release cards) would pass for a
    descendant of a model it never saw. A run from before the record is not judged."""
    init_from = row.cfg.train.init_from if row.cfg is not None else None
    if not init_from:
        return None
    try:
        last = ckpt.latest(Path(suite.out(row.node)) / "checkpoints")
        made = json.loads((last / ckpt.META).read_text()).get(ckpt.PARENT_RUN) if last is not None else None
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(made, dict):
        return None
    parent = suite.nodes[row.node].parent
    if parent and states.get(parent, "done") != "done":
        return f"its parent {parent} trains again"
    try:
        found = ckpt.resolve(init_from)
        meta = json.loads((found / ckpt.META).read_text())
    except (ckpt.CheckpointError, OSError, ValueError):
        return None  # the parent is not there: the training says so
    if not isinstance(meta, dict) or (made.get("run_id"), made.get("iteration")) == (meta.get("run_id"),
                                                                                     meta.get("iteration")):
        return None
    return (f"it was trained from iteration {made.get('iteration')} of run {made.get('run_id')}; its "
            f"train.init_from {init_from} is now {found.name} of run {meta.get('run_id')}")


def status_table(js: list[Job]) -> str:
    width = max(len(j.row.node) for j in js)
    lines = [f"{'node':<{width}}  {'stage':<16} state   detail"]
    lines += [f"{j.row.node:<{width}}  {j.row.stage:<16} {j.state:<7} {j.detail}" for j in js]
    counts = {s: sum(j.state == s for j in js) for s in ("done", "resume", "new")}
    lines.append(f"{counts['done']} done, {counts['resume']} to resume, {counts['new']} new")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ nemo-run


def nemo_run(suite: Suite):
    """NeMo-Run, imported lazily (it takes seconds and is only needed to launch); experiments under the suite."""
    if not os.environ.get("NEMORUN_HOME"):
        os.environ["NEMORUN_HOME"] = str((Path(suite.root) / "nemo_run").resolve())
    try:
        import nemo_run as run
        from nemo_run.config import set_nemorun_home
    except Exception as e:  # ImportError, or leptonai>=0.47's import-time failure
        raise ConfigError("executor", f"launching needs NeMo-Run, which did not import ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}); install it with `pip install -c "
                                      "constraints.txt nemo-run==0.11.1 'leptonai<0.47'` (make install does)") from None
    set_nemorun_home(os.environ["NEMORUN_HOME"])
    import logging

    for name in ("nemo_run", "torchx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return run


def _experiment(run, title: str):
    return run.Experiment(title, log_level="WARN", clean_mode=True, enable_goodbye_message=False,
                          skip_status_at_exit=True)


# ------------------------------------------------------------------------------------------------------------ local


def local_command(suite: Suite, job: Job) -> list[str]:
    py = sys.executable
    if job.row.kind == "data":
        return [py, *job.argv]
    if job.row.kind == "train" and suite.local["nproc"] > 1:
        return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={suite.local['nproc']}",
                "-m", "evolm_nemo.train.entry", *job.argv[1:]]
    return [py, "-m", "evolm_nemo.cli", *job.argv]


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


_TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN")


def _run_local_node(run, suite: Suite, job: Job, log: Path) -> int:
    """One node as one NeMo-Run experiment on a LocalExecutor; blocks until it ends; returns its exit status."""
    cmd = local_command(suite, job)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
    rc_file = log.with_suffix(".rc")
    rc_file.unlink(missing_ok=True)
    Path(pid_file(rc_file)).unlink(missing_ok=True)  # a killed wrapper's: its pid may belong to anyone by now
    wrapped = [sys.executable, "-m", "evolm_nemo.suite.node", str(log), str(rc_file), "--", *cmd]
    script = run.Script(inline=f"cd {shlex.quote(os.getcwd())}\nexec {shlex.join(wrapped)}\n",
                        env={"PYTHONUNBUFFERED": "1"})
    name = job.row.node
    stop = _StopRequest()
    with _experiment(run, job_name(suite, name)) as exp:
        exp.add(script, executor=run.LocalExecutor(), name=name)
        exp.run()
        try:
            with stop:  # SIGTERM / Ctrl-C of the launcher: passed on to the node, which saves and ends
                while exp.status(return_dict=True)[name]["status"].name not in _TERMINAL:
                    if stop.signum:
                        stop.forward(Path(pid_file(rc_file)))
                    time.sleep(0.2)
        except BaseException:  # a second signal, or anything else: NeMo-Run cancels the node (SIGTERM, then KILL)
            exp.cancel(name)
            raise
    try:
        rc = int(rc_file.read_text())
    except (OSError, ValueError):
        rc = -1  # it did not get as far as the wrapper's end (killed)
    finally:
        rc_file.unlink(missing_ok=True)
    if stop.signum:
        print(f"[suite] stopped by {signal.Signals(stop.signum).name}: node {name} ended with exit code {rc} (its "
              f"last lines: {log}); relaunch the same command to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum)
    return rc


class _StopRequest:
    """While the launcher waits for a node: the first SIGTERM / SIGINT is remembered (and passed on to the node by
    ``forward``, so that a training commits its save-on-signal checkpoint); the launcher then waits for the node to
    end, however long its save takes. A second signal stops the wait (KeyboardInterrupt)."""

    def __init__(self):
        self.signum = 0
        self.sent = False
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def forward(self, pid_path: Path) -> None:
        """SIGTERM to the node's wrapper (once its pid file is there), which passes it to the node."""
        if self.sent:
            return
        try:
            os.kill(int(pid_path.read_text()), signal.SIGTERM)
            self.sent = True
        except (OSError, ValueError):
            pass  # not started yet, or already gone: tried again on the next poll


def lock_launch(suite: Suite) -> None:
    """One launcher per suite root at a time (until this process ends): two would share the nodes' logs and exit-status
    files, and submit or run the same node twice."""
    holder = lock_file(Path(suite.root) / ".launch.lock")
    if holder is not None:
        raise ConfigError("root", f"{Path(suite.root).resolve()} is being launched by another `evolm suite launch` "
                                  f"(pid {holder}); wait for it to end, or stop it (it passes SIGTERM on to its node)")


def run_local(plan: SuitePlan, js: list[Job]) -> int:
    suite = plan.suite
    lock_launch(suite)
    logs = Path(suite.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    total = time.monotonic()
    run = None
    for job in js:
        name = job.row.node
        if job.state == "done":
            print(f"[suite] {name}: done ({job.detail}); skipped", flush=True)
            continue
        run = run or nemo_run(suite)
        log = (logs / f"{name}.log").resolve()
        verb = "resuming" if job.state == "resume" else "starting"
        print(f"[suite] {name}: {verb} {job.row.stage} -> {suite.out(name)} (log {log})", flush=True)
        start = time.monotonic()
        rc = _run_local_node(run, suite, job, log)
        took = time.monotonic() - start
        if rc != 0:
            print(_tail(log), file=sys.stderr)
            raise ConfigError(f"nodes.{name}", f"{job.row.stage} exited {rc} after {took:.1f} s; its dependants were "
                                               f"not started; log: {log} (fix, then relaunch: finished runs are "
                                               "skipped, this one resumes)")
        state, detail = node_state(suite, job.row)
        if state != "done":
            raise ConfigError(f"nodes.{name}", f"{job.row.stage} exited 0 but its output is not complete ({detail}); "
                                               f"log: {log}")
        print(f"[suite] {name}: done in {took:.1f} s ({detail})", flush=True)
    print(f"[suite] {suite.name}: {len(js)} nodes complete in {time.monotonic() - total:.1f} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------ slurm


def job_name(suite: Suite, node: str) -> str:
    return f"evolm-{suite.name}-{node}"


def node_script(plan: SuitePlan, job: Job) -> str:
    """What one task of the node runs inside the container (torchrun runs it once per rank for a training)."""
    sl = plan.suite.slurm
    if job.row.kind == "train":
        cmd = ["python", "-m", "evolm_nemo.train.entry", *job.argv[1:]]
    elif job.row.kind == "data":
        cmd = ["python", *job.argv]
    else:
        cmd = ["python", "-m", "evolm_nemo.cli", *job.argv]
    lines = [f"# evolm suite {plan.suite.name}: node {job.row.node} ({job.row.stage}), parent {job.row.parent or '-'}; "
             f"state when written: {job.state} ({job.detail})",
             f"cd {shlex.quote(sl['container_workdir'])}", f"exec {shlex.join(cmd)}"]
    return "\n".join(lines) + "\n"


def slurm_executor(run, plan: SuitePlan, job: Job, external: list[str], waits: bool = False):
    """``waits``: the job has a dependency (``external`` or this experiment's): if a parent fails, Slurm cancels it
    (``--kill-on-invalid-dep=yes``) rather than leaving it pending forever."""
    s, row = plan.suite, job.row
    node, sl = s.nodes[row.node], s.slurm
    gpus = row.gpus if row.kind == "train" else (node.gpus or (1 if row.kind != "data" else 0))
    image = (sl.get("eval_container_image") if row.kind == "eval" else None) or sl["container_image"]
    train = row.kind == "train"
    extra = {}
    if external:  # parents whose jobs are already queued (not part of this experiment)
        extra["dependency"] = "afterok:" + ":".join(external)
    if waits or external:
        extra["kill_on_invalid_dep"] = "yes"
    home = Path(os.environ["NEMORUN_HOME"])
    ex = run.SlurmExecutor(
        account=sl.get("account") or "", partition=sl.get("partition"), job_name_prefix=f"evolm-{s.name}-",
        time=node.time or sl["time"], nodes=row.nodes, ntasks_per_node=1, gpus_per_node=gpus or None,
        exclusive=True if (sl.get("exclusive") and train) else None,
        signal=f"TERM@{int(sl['signal_seconds'])}" if (train and sl.get("signal_seconds")) else None,
        container_image=image, container_mounts=list(sl.get("container_mounts") or []),
        srun_args=["--no-container-mount-home"], additional_parameters=extra or None,
        setup_lines="\n".join(sl.get("setup") or []) or None,
        env_vars={"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        tunnel=run.LocalTunnel(job_dir=str(home / "experiments")), packager=run.Packager(),
        poll_estimated_start_time=False)
    if train:
        ex.launcher = run.Torchrun(rdzv_backend="c10d", rdzv_port=int(sl["master_port"]))
        ex.torchrun_nproc_per_node = gpus
    if external:  # NeMo-Run writes --dependency=<type>:<ids of this experiment's parents>; the queued ones go first
        ex.dependency_type = extra["dependency"]
    return ex


def _slurm(cmd: list[str]) -> tuple[subprocess.CompletedProcess | None, str | None]:
    """Run a Slurm client command: (its result, None) or (None, why it failed, in one line)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if proc.returncode:
        return None, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
    return proc, None


def queued_jobs(suite: Suite, nodes: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """node -> [(id, state, reason)] of this user's queued or running jobs of the same name (``squeue --me``)."""
    out = {}
    for n in nodes:
        proc, failed = _slurm(["squeue", "-h", "--me", "-n", job_name(suite, n), "-o", "%i %T %r"])
        if failed:  # not knowing what is queued could submit a node twice
            raise ConfigError("executor", f"slurm: squeue failed ({failed}); cannot tell which nodes are already "
                                          "queued, so nothing was submitted; retry when squeue answers")
        found = [tuple((line.split(None, 2) + ["", ""])[:3]) for line in proc.stdout.splitlines() if line.strip()]
        if found:
            out[n] = found
    return out


NEVER = "DependencyNeverSatisfied"  # squeue's reason for a job whose afterok parent failed


def sort_queued(pending: list[Job], found: dict[str, list[tuple[str, str, str]]]) -> tuple[dict[str, str],
                                                                                           dict[str, list[str]]]:
    """(node -> the queued job its dependants wait for, node -> its stale jobs to cancel) over ``pending`` (parents
    first). A job is stale when it is pending on a dependency that can never be satisfied (a parent failed; Slurm
    leaves such jobs pending unless they were submitted with --kill-on-invalid-dep) or on a parent that is submitted
    again now (it waits for the parent's old job): cancelled, it is submitted again after its parent."""
    names = {j.row.node for j in pending}
    queued: dict[str, str] = {}
    stale: dict[str, list[str]] = {}
    for j in pending:
        node = j.row.node
        resubmitted = any(d in names and d not in queued for d in _parents(j))
        for jid, state, reason in found.get(node, []):
            if state == "PENDING" and (reason == NEVER or resubmitted):
                stale.setdefault(node, []).append(jid)
            elif node not in queued:
                queued[node] = jid
    return queued, stale


def cancel_jobs(ids: list[str]) -> None:
    _, failed = _slurm(["scancel", *ids])
    if failed:
        raise ConfigError("executor", f"slurm: scancel {' '.join(ids)} failed ({failed}); those jobs can never start "
                                      "(a parent failed), so nothing was submitted; cancel them, then relaunch")


def _parents(job: Job) -> list[str]:
    return ([job.row.parent] if job.row.parent else []) + list(job.row.needs)


def run_slurm(plan: SuitePlan, js: list[Job], directory: Path, dry_run: bool) -> int:
    if not dry_run and shutil.which("sbatch") is None:
        raise ConfigError("executor", "slurm: sbatch is not on PATH (run this on a Slurm login node), or pass "
                                      "dry_run=true to write the scripts only")
    suite = plan.suite
    lock_launch(suite)
    if dry_run:  # the scripts replace `directory` as a whole: only ever an earlier dry run's scripts
        check_dst(directory, overwrite=True, key="out", kind="suite-slurm")
    (Path(suite.root) / "logs").mkdir(parents=True, exist_ok=True)
    pending = [j for j in js if j.state != "done"]
    queued, stale = sort_queued(pending, {} if dry_run else queued_jobs(suite, [j.row.node for j in pending]))
    for j in js:
        print(f"[suite] {j.row.node}: {j.state} ({j.detail})" + ("; skipped" if j.state == "done" else "")
              + (f"; already queued as job {queued[j.row.node]}" if j.row.node in queued else "")
              + (f"; its queued job {', '.join(stale[j.row.node])} can never start (a parent failed or is submitted "
                 "again): cancelled, submitted again" if j.row.node in stale else ""), flush=True)
    if stale:
        cancel_jobs([i for ids in stale.values() for i in ids])
    run = nemo_run(suite)
    added: dict[str, str] = {}
    deps_of: dict[str, list[str]] = {}
    with _experiment(run, f"evolm-{suite.name}") as exp:
        for j in pending:
            node = j.row.node
            if node in queued:
                continue
            external = [queued[d] for d in _parents(j) if d in queued]
            internal = [added[d] for d in _parents(j) if d in added]
            deps_of[node] = [d for d in _parents(j) if d in added] + [f"{d}(job {queued[d]})" for d in _parents(j)
                                                                      if d in queued]
            added[node] = exp.add(run.Script(inline=node_script(plan, j)), executor=slurm_executor(
                run, plan, j, external, waits=bool(internal)), name=node, dependencies=internal or None)
        if not added:
            print(f"[suite] nothing to submit ({len(js) - len(pending)} done, {len(queued)} queued)")
            if dry_run:
                write_dry_run(exp, plan, js, {}, directory, dry=False)
            return 0
        if dry_run:
            exp.dryrun(log=False, delete_exp_dir=False)
            path = write_dry_run(exp, plan, js, deps_of, directory)
            print(f"[suite] dry run: wrote {len(added)} sbatch scripts (NeMo-Run's) to {path}; nothing submitted")
            return 0
        exp.run(detach=True)
        for j in exp.jobs:
            print(f"[suite] {j.id}: job {str(j.handle).split('://', 1)[-1].split('/')[1] if j.handle else '?'}"
                  + (f" (afterok {', '.join(deps_of[j.id])})" if deps_of.get(j.id) else ""), flush=True)
    print(f"[suite] submitted {len(added)} of {len(pending)} pending jobs through NeMo-Run (experiment "
          f"{exp._exp_dir})")
    return 0


def write_dry_run(exp, plan: SuitePlan, js: list[Job], deps_of: dict[str, list[str]], directory: Path,
                  dry: bool = True) -> Path:
    """NeMo-Run's sbatch scripts (``<node>.sbatch``) and node scripts (``scripts/<node>.sh``), the dependencies
    (``dependencies.txt``) and the node states (``status.txt``) into ``directory``, replaced as a whole."""
    directory = Path(directory)
    tmp = temp_dir(directory)
    exp_dir = Path(exp._exp_dir)
    try:
        (tmp / "scripts").mkdir()
        for node in deps_of:
            shutil.copyfile(exp_dir / f"{node}_sbatch.sh", tmp / f"{node}.sbatch")
            shutil.copyfile(exp_dir / node / "scripts" / f"{node}.sh", tmp / "scripts" / f"{node}.sh")
        (tmp / "dependencies.txt").write_text(
            "# node: the pending parents it waits for (sbatch --dependency=afterok), in submission order\n"
            + "".join(f"{n}: {' '.join(d) or '-'}\n" for n, d in deps_of.items()), encoding="utf-8")
        (tmp / "status.txt").write_text(status_table(js) + "\n", encoding="utf-8")
        (tmp / "evolm_suite_slurm.json").write_text(json.dumps({"suite": plan.suite.name}) + "\n", encoding="utf-8")
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() or p.suffix in (".sh", ".sbatch") else 0o644)
        tmp.chmod(0o755)
        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if dry:
            shutil.rmtree(exp_dir, ignore_errors=True)
    return directory
