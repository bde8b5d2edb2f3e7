"""`evolm suite launch`: the sbatch scripts of a dry run, an idempotent relaunch (finished runs skipped, a SIGKILLed
one resumed), all with real `evolm` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from evolm_nemo.checkpoint import io as ckpt
from tests.conftest import REPO, subprocess_env


def suite_cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "evolm_nemo.cli", "suite", *args], cwd=REPO,
                          env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_slurm_dry_run_writes_sbatch_scripts(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "slurm"
    proc = suite_cli("launch", "suite=evolm", "executor=slurm", "dry_run=true", f"root={root}", f"out={out}",
                     "only=[eval_ppo_1b_evolm]", "slurm.account=acct", "slurm.partition=batch")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.glob("*.sbatch"))
    chain = ["pretrain_1b_160b", "cpt_1b_160b_fw8_fm42", "sft_1b_fw8_fm42_100k_ep1", "ppo_1b_evolm",
             "hf_ppo_1b_evolm", "eval_ppo_1b_evolm"]
    assert names == sorted(f"{n}.sbatch" for n in chain)
    pre = (out / "pretrain_1b_160b.sbatch").read_text()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --exclusive",
                 "#SBATCH --signal=TERM@300", "#SBATCH --time=04:00:00",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)']:
        assert line in pre.splitlines(), line
    flat = pre.replace(" \\\n  ", " ")
    assert ("srun --nodes=4 --ntasks-per-node=1 --container-image=evolm-nemo-train:25.09 "
            "--container-mounts=/lustre/evolm/data:/workspace/evolm/data,/lustre/evolm/runs:/workspace/evolm/runs "
            "--container-workdir=/workspace/evolm --no-container-mount-home torchrun --nnodes=$SLURM_NNODES "
            "--nproc_per_node=8 --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d "
            "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT -m evolm_nemo.train.entry experiment=pretrain_1b_160b "
            f"run.name=pretrain_1b_160b run.out_dir={root}/pretrain_1b_160b") in flat
    cpt = (out / "cpt_1b_160b_fw8_fm42.sbatch").read_text()
    assert f"train.init_from={root}/pretrain_1b_160b/checkpoints" in cpt
    ev = (out / "eval_ppo_1b_evolm.sbatch").read_text().replace(" \\\n  ", " ")
    assert "--container-image=evolm-nemo-eval:1.2.0" in ev and "#SBATCH --gpus-per-node=1" in ev
    assert (f"python -m evolm_nemo.cli eval downstream model={root}/hf_ppo_1b_evolm out={root}/eval_ppo_1b_evolm "
            "name=hf_ppo_1b_evolm size=1B pretrain_tokens=160000114688 stage=rl group=sft_1b_fw8_fm42_100k_ep1 "
            "data_dir=data/eval/cooked") in ev
    assert "--exclusive" not in ev and "torchrun" not in ev
    for p in out.glob("*.s*"):
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0, p.name
    # submit.sh against a stand-in sbatch that records its arguments: dependencies resolve to the parents' job ids
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text("#!/bin/bash\nn=$(( $(wc -l < \"$SBATCH_LOG\" 2>/dev/null || echo 0) + 1001 ))\n"
                                   "echo \"$n $*\" >> \"$SBATCH_LOG\"\necho \"$n;cluster\"\n")
    (bindir / "sbatch").chmod(0o755)
    env = dict(subprocess_env(), PATH=f"{bindir}:{os.environ['PATH']}", SBATCH_LOG=str(tmp_path / "sbatch.log"))
    run = subprocess.run(["bash", str(out / "submit.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls == [
        "1001 --parsable pretrain_1b_160b.sbatch",
        "1002 --parsable --dependency=afterok:1001 cpt_1b_160b_fw8_fm42.sbatch",
        "1003 --parsable --dependency=afterok:1002 sft_1b_fw8_fm42_100k_ep1.sbatch",
        "1004 --parsable --dependency=afterok:1003 ppo_1b_evolm.sbatch",
        "1005 --parsable --dependency=afterok:1004 hf_ppo_1b_evolm.sbatch",
        "1006 --parsable --dependency=afterok:1005 eval_ppo_1b_evolm.sbatch"]
    assert "submitted 6 of 6 jobs" in run.stdout
    # relaunched while the pretraining job is still queued: it is not submitted twice, the CPT waits for it
    (bindir / "squeue").write_text("#!/bin/bash\n[[ \"$*\" == *evolm-evolm-pretrain_1b_160b* ]] && echo 777\n"
                                   "exit 0\n")
    (bindir / "squeue").chmod(0o755)
    (tmp_path / "sbatch.log").unlink()
    run = subprocess.run(["bash", str(out / "submit.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls[0] == "1001 --parsable --dependency=afterok:777 cpt_1b_160b_fw8_fm42.sbatch" and len(calls) == 5
    assert "pretrain_1b_160b: already queued as job 777" in run.stdout and "submitted 5 of 6 jobs" in run.stdout


def test_slurm_without_sbatch_is_one_line(tmp_path):
    env = dict(subprocess_env(), PATH=str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    proc = suite_cli("launch", "suite=tiny", "executor=slurm", f"root={tmp_path}", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: executor: slurm: sbatch is not on PATH (run this on a Slurm login node), "
                                   "or pass dry_run=true to write the scripts only")


def test_relaunch_skips_finished_runs_and_resumes_a_killed_one(tmp_path):
    root = tmp_path / "runs"
    suite = tmp_path / "two.yaml"
    suite.write_text(f"name: two\nroot: {root}\ngpus_per_node: 1\n"
                     f"train_overrides: [data.cache_dir={tmp_path}/cache, train.progress=false, "
                     "train.tensorboard=false]\nnodes:\n"
                     "  pre: {experiment: demo, overrides: [train.iters=60, train.save_interval=10]}\n"
                     "  cpt: {experiment: demo_cpt, parent: pre, overrides: [train.iters=10]}\n")
    cmd = [sys.executable, "-m", "evolm_nemo.cli", "suite", "launch", f"suite={suite}", "executor=local"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        last = ckpt.latest(root / "pre" / "checkpoints")
        if last is not None and int(last.name.split("_")[1]) >= 10:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its trainer, mid-run
            killed = int(last.name.split("_")[1])
            break
        time.sleep(0.02)
    proc.wait()
    assert killed is not None and killed < 60, "the run ended before it could be killed"

    status = suite_cli("status", f"suite={suite}")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert any(line.split()[:3] == ["pre", "pretrain", "resume"] for line in lines), status.stdout
    assert any(line.split()[:3] == ["cpt", "cpt", "new"] for line in lines), status.stdout

    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[suite] pre: resuming pretrain" in again.stdout and "[suite] cpt: starting cpt" in again.stdout
    log = (root / "logs" / "pre.log").read_text()
    assert "resum" in log.split("$ ")[-1].lower()  # the trainer's own resume line, in the second attempt
    meta = json.loads((ckpt.latest(root / "pre" / "checkpoints") / "evolm.json").read_text())
    assert meta["iteration"] == 60 and meta["planned_iters"] == 60
    rows = [json.loads(x) for x in (root / "pre" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["iteration"] for r in rows] == sorted({r["iteration"] for r in rows})  # one clean run, no repeats

    sizes = {p: p.stat().st_size for p in (root / "logs").iterdir()}
    third = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    assert "[suite] pre: done (iter_0000060 of 60); skipped" in third.stdout
    assert "[suite] cpt: done (iter_0000010 of 10); skipped" in third.stdout
    assert {p: p.stat().st_size for p in (root / "logs").iterdir()} == sizes  # nothing was started

    dry = suite_cli("launch", f"suite={suite}", "executor=slurm", "dry_run=true", f"out={tmp_path / 'slurm'}")
    assert dry.returncode == 0, dry.stderr
    assert not list((tmp_path / "slurm").glob("*.sbatch"))
    assert 'echo "submitted $submitted of 0 jobs"' in (tmp_path / "slurm" / "submit.sh").read_text()
