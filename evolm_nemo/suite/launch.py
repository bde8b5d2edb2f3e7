"""`evolm suite launch suite=<name> executor=local|slurm [dry_run=true]`: every pending run of a suite, parents first.

Idempotent: before anything is started each node's state is read from its output --

* ``done``: a train node whose newest committed checkpoint is at its planned last iteration (the trainer would say
  "is complete"); an export whose HF directory exists (exports appear atomically, only once verified); an
  evaluation whose ``result.json`` holds its mode; a data step whose file exists. Done nodes are skipped.
* ``resume``: a train node with committed checkpoints short of the end. It is launched again with the same
  command; the trainer resumes from the newest committed checkpoint (``train.resume=true``, its default).
* ``new``: nothing there yet.

``executor=local`` runs the pending nodes one after another as real processes (``python -m evolm_nemo.cli ...``, or
``torchrun --nproc_per_node <local.nproc>`` for trainings), each logging to ``<root>/logs/<node>.log``; the first
failure stops the launch (its dependants cannot start) and is reported in one line with the log's tail.

``executor=slurm`` writes one sbatch script per pending node -- pyxis ``--container-image`` / ``--container-mounts``,
``torchrun`` across the job's nodes with a c10d rendezvous on the first node, ``--signal=TERM@<s>`` so a training
commits a checkpoint before its time limit -- and ``submit.sh``, which submits them in topological order, each with
``--dependency=afterok:`` on its pending parents. ``dry_run=true`` stops there; otherwise submit.sh is run (needs
``sbatch``). NeMo-Run is not used: nemo-run 0.11.1 with leptonai<0.47 would downgrade pinned packages of this
environment (anyio, cloudpickle, urllib3) and pull ray, paramiko and torchx, so the scripts are written here in
the same pyxis form NeMo-Run's SlurmExecutor produces.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.suite.plan import Plan, Row
from evolm_nemo.suite.spec import Suite


@dataclass
class Job:
    row: Row
    state: str  # done | resume | new
    detail: str
    argv: list[str] = field(default_factory=list)  # after `python -m evolm_nemo.cli` (or the module for data)


def train_state(out: Path, planned: int | None) -> tuple[str, str]:
    from evolm_nemo.checkpoint import io as ckpt

    last = ckpt.latest(out / "checkpoints")
    if last is None:
        return ("new", "no committed checkpoint") if not out.exists() else ("new", f"{out} has no committed "
                                                                                  "checkpoint yet")
    meta = json.loads((last / ckpt.META).read_text())
    it, want = meta.get("iteration"), meta.get("planned_iters")
    if want is not None and it is not None and it >= want and (planned is None or want == planned):
        return "done", f"{last.name} of {want}"
    return "resume", f"{last.name} of {want if want is not None else planned}"


def node_state(suite: Suite, row: Row) -> tuple[str, str]:
    out = Path(suite.out(row.node))
    if row.kind == "train":
        return train_state(out, row.iters)
    if row.kind == "export":
        return ("done", "HF directory present") if (out / "config.json").is_file() else ("new", "not exported")
    if row.kind == "eval":
        mode = row.stage.split("-", 1)[1]
        try:
            result = json.loads((out / "result.json").read_text())
        except (OSError, ValueError):
            result = {}
        return ("done", "result.json present") if mode in result else ("new", "no result yet")
    return ("done", "data present") if (out / "gsm8k_platinum.jsonl").is_file() else ("new", "not written")


def argv_for(plan: Plan, row: Row) -> list[str]:
    """The command line of a node after the interpreter (`-m evolm_nemo.cli <command> ...` semantics)."""
    s = plan.suite
    node = s.nodes[row.node]
    if row.kind == "train":
        return ["train", *row.overrides]
    if row.kind == "export":
        return ["export-hf", *row.overrides]
    if row.kind == "eval":
        return ["eval", node.mode, *row.overrides]
    parent = plan.row(node.parent)
    cache = parent.cfg.data.cache_dir if parent.cfg is not None else "runs/cache"
    items = [f"src={s.out(node.parent)}", f"out={s.out(row.node)}", f"cache_dir={cache}"]
    if node.limit:
        items.append(f"limit={node.limit}")
    return ["-m", "evolm_nemo.suite.demo_data", *items]


def jobs(plan: Plan) -> list[Job]:
    out = []
    for row in plan.rows:
        state, detail = node_state(plan.suite, row)
        out.append(Job(row=row, state=state, detail=detail, argv=argv_for(plan, row)))
    return out


def status_table(js: list[Job]) -> str:
    width = max(len(j.row.node) for j in js)
    lines = [f"{'node':<{width}}  {'stage':<16} state   detail"]
    lines += [f"{j.row.node:<{width}}  {j.row.stage:<16} {j.state:<7} {j.detail}" for j in js]
    counts = {s: sum(j.state == s for j in js) for s in ("done", "resume", "new")}
    lines.append(f"{counts['done']} done, {counts['resume']} to resume, {counts['new']} new")
    return "\n".join(lines)


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


def run_local(plan: Plan, js: list[Job]) -> int:
    suite = plan.suite
    logs = Path(suite.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    total = time.monotonic()
    for job in js:
        name = job.row.node
        if job.state == "done":
            print(f"[suite] {name}: done ({job.detail}); skipped", flush=True)
            continue
        cmd = local_command(suite, job)
        log = logs / f"{name}.log"
        verb = "resuming" if job.state == "resume" else "starting"
        print(f"[suite] {name}: {verb} {job.row.stage} -> {suite.out(name)} (log {log})", flush=True)
        start = time.monotonic()
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait()
            except BaseException:  # Ctrl-C / SIGTERM of the launcher: the node stops too (it commits on SIGTERM)
                proc.terminate()
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
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


def _remote_python_cmd(job: Job) -> list[str]:
    if job.row.kind == "data":
        return ["python", *job.argv]
    return ["python", "-m", "evolm_nemo.cli", *job.argv]


def sbatch_script(plan: Plan, job: Job, logs: Path) -> str:
    s, row = plan.suite, job.row
    node = s.nodes[row.node]
    sl = s.slurm
    gpus = row.gpus if row.kind == "train" else (node.gpus or (1 if row.kind != "data" else 0))
    lines = ["#!/bin/bash",
             f"# evolm suite {s.name}: node {row.node} ({row.stage}), parent {row.parent or '-'}; written by "
             "`evolm suite launch executor=slurm`",
             f"#SBATCH --job-name={job_name(s, row.node)}",
             f"#SBATCH --nodes={row.nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    lines.append(f"#SBATCH --time={node.time or sl['time']}")
    if sl.get("account"):
        lines.append(f"#SBATCH --account={sl['account']}")
    if sl.get("partition"):
        lines.append(f"#SBATCH --partition={sl['partition']}")
    if sl.get("exclusive") and row.kind == "train":
        lines.append("#SBATCH --exclusive")
    if row.kind == "train" and sl.get("signal_seconds"):
        lines.append(f"#SBATCH --signal=TERM@{int(sl['signal_seconds'])}")  # commit a checkpoint before the limit
    lines.append(f"#SBATCH --output={logs}/{row.node}-%j.log")
    lines += ["", "set -euo pipefail",
              'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"export MASTER_PORT={int(sl['master_port'])}",
              "export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false"]
    lines += list(sl.get("setup") or [])
    image = (sl.get("eval_container_image") if row.kind == "eval" else None) or sl["container_image"]
    srun = ["srun", f"--nodes={row.nodes}", "--ntasks-per-node=1", f"--container-image={image}"]
    if sl.get("container_mounts"):
        srun.append(f"--container-mounts={','.join(sl['container_mounts'])}")
    srun += [f"--container-workdir={sl['container_workdir']}", "--no-container-mount-home"]
    if row.kind == "train":
        cmd = ["torchrun", "--nnodes=$SLURM_NNODES", f"--nproc_per_node={gpus}", "--rdzv_id=$SLURM_JOB_ID",
               "--rdzv_backend=c10d", "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT",
               "-m", "evolm_nemo.train.entry", *job.argv[1:]]
    else:
        cmd = _remote_python_cmd(job)
    shell = [a if a.startswith("--") and "$" in a else shlex.quote(a) for a in srun + cmd]
    if "-m" in shell:  # `-m <module>` on one line
        i = shell.index("-m")
        shell[i:i + 2] = [f"-m {shell[i + 1]}"]
    lines += ["", f"# state when written: {job.state} ({job.detail})", " \\\n  ".join(shell), ""]
    return "\n".join(lines)


def job_name(suite: Suite, node: str) -> str:
    return f"evolm-{suite.name}-{node}"


def submit_script(plan: Plan, pending: list[Job]) -> str:
    """Submits in topological order, each job ``afterok`` on its pending parents. A node whose job is already queued
    or running (same job name, this user: ``squeue``) is not submitted twice; its dependants wait for that job."""
    names = {j.row.node for j in pending}
    lines = ["#!/bin/bash",
             f"# Submits the {len(pending)} pending runs of suite {plan.suite.name} in topological order; each job "
             "waits (afterok) for its pending parents. Runs already complete were left out when this was written;",
             "# a run whose job is still queued or running (same job name) is not submitted again.",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "declare -A JOB", "submitted=0",
             "queued() { squeue -h --me -n \"$1\" -o %i 2>/dev/null | head -n 1 || true; }"]
    for j in pending:
        node = j.row.node
        deps = [d for d in ([j.row.parent] if j.row.parent else []) + j.row.needs if d in names]
        dep = f"--dependency=afterok:{':'.join('${JOB[' + d + ']}' for d in deps)} " if deps else ""
        lines.append(f"jid=$(queued {shlex.quote(job_name(plan.suite, node))}); "
                     f"if [ -n \"$jid\" ]; then echo \"{node}: already queued as job $jid\"; "
                     f"else jid=$(sbatch --parsable {dep}{shlex.quote(node + '.sbatch')}); "
                     f"submitted=$((submitted + 1)); echo \"{node}: job ${{jid%%;*}}\"; fi; "
                     f"JOB[{node}]=${{jid%%;*}}")
    lines.append(f'echo "submitted $submitted of {len(pending)} jobs"')
    return "\n".join(lines) + "\n"


def write_slurm(plan: Plan, js: list[Job], directory: Path) -> Path:
    """sbatch scripts + submit.sh into ``directory``, replaced as a whole (never a mix of two launches)."""
    pending = [j for j in js if j.state != "done"]
    logs = (Path(plan.suite.root) / "logs").resolve()
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for j in pending:
            (tmp / f"{j.row.node}.sbatch").write_text(sbatch_script(plan, j, logs), encoding="utf-8")
        (tmp / "submit.sh").write_text(submit_script(plan, pending), encoding="utf-8")
        (tmp / "status.txt").write_text(status_table(js) + "\n", encoding="utf-8")
        for p in tmp.iterdir():
            p.chmod(0o755 if p.suffix in (".sh", ".sbatch") else 0o644)
        tmp.chmod(0o755)
        from evolm_nemo.fileio import replace_dir

        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def run_slurm(plan: Plan, js: list[Job], directory: Path, dry_run: bool) -> int:
    if not dry_run and shutil.which("sbatch") is None:
        raise ConfigError("executor", "slurm: sbatch is not on PATH (run this on a Slurm login node), or pass "
                                      "dry_run=true to write the scripts only")
    (Path(plan.suite.root) / "logs").mkdir(parents=True, exist_ok=True)
    path = write_slurm(plan, js, directory)
    pending = [j for j in js if j.state != "done"]
    for j in js:
        print(f"[suite] {j.row.node}: {j.state} ({j.detail})" + ("; skipped" if j.state == "done" else ""))
    print(f"[suite] wrote {len(pending)} sbatch scripts and {path / 'submit.sh'}")
    if dry_run:
        print(f"[suite] dry run: nothing submitted; inspect, then `bash {path / 'submit.sh'}`")
        return 0
    return subprocess.call(["bash", str(path / "submit.sh")])
