"""Experiment tracking (logger.wandb / logger.mlflow), offline for real: W&B's offline run files read back through
W&B's own record protobufs, an MLflow local file store read back with MLflow's own client. Both hold the values of
metrics.jsonl at every step, the composed recipe as config, the suite's DAG as structure; a killed and resumed run
continues the same run ids; a missing package is one line."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest

from evolm_nemo.train.tracking import mlflow_key, scalars
from tests.conftest import one_line_error, run_evolm, tiny, train_then_sigkill, train_then_sigterm

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline (files under each run's out_dir), an MLflow file store under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    return uri, ["logger.wandb=true", "logger.mlflow=true", f"logger.mlflow_uri='{uri}'"]


# ------------------------------------------------------------------------------------------------ reading back


def wandb_records(path: Path):
    """The records of a ``.wandb`` file (W&B's transaction log: a 7-byte header, then LevelDB-log framing -- 32 KiB
    blocks, 7-byte chunk headers crc32/length/type, FULL=1 FIRST=2 MIDDLE=3 LAST=4), parsed with W&B's own
    ``Record`` protobuf. A torn tail (a killed run) ends the scan."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and size == 0:  # zero padding at a block's end
            pos += left - 7
            continue
        chunk = data[pos:pos + size]
        pos += size
        if len(chunk) < size:
            return
        if kind in (1, 4):
            raw, parts = (parts + chunk if kind == 4 else chunk), b""
            record = pb.Record()
            record.ParseFromString(raw)
            yield record
        else:
            parts = chunk if kind == 2 else parts + chunk


def wandb_runs(out: Path) -> list[dict]:
    """Each offline run directory under ``out/wandb`` (oldest first): its run record and history rows. A directory
    whose process was killed before wandb-core flushed anything (its ``.wandb`` file holds the header alone) is
    left out."""
    runs = []
    for d in (out / "wandb").glob("offline-run-*"):
        (log,) = d.glob("*.wandb")
        run, history = None, []
        for r in wandb_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        if run is None:
            continue
        runs.append({"run": run, "history": history, "config": {i.key: json.loads(i.value_json)
                                                                 for i in run.config.update}})
    return sorted(runs, key=lambda x: x["run"].start_time.ToNanoseconds())


def jsonl_rows(out: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_values(rows: dict[int, dict], logged: dict[int, dict]) -> None:
    """Every step of metrics.jsonl, every scalar, the same value in the tracker (the last one logged at a step)."""
    assert sorted(logged) == sorted(rows)
    for step, row in rows.items():
        want = scalars(row)
        assert want and {k: logged[step].get(k) for k in want} == pytest.approx(want, rel=1e-12, abs=0), step


def wandb_by_step(runs: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for run in runs:  # a resumed run's segment after the killed one's: its rows win
        for h in run["history"]:
            out[int(h["iteration"])] = h
    return out


def mlflow_by_step(client, run_id: str, keys) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, mlflow_key(key)):  # logged order: the later point of a step wins
            out.setdefault(m.step, {})[key] = m.value
    return out


def mlflow_client(uri: str):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store is behind an opt-in
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------------------------------------ tests


def test_wandb_and_mlflow_hold_metrics_jsonl_and_the_suite_dag(tmp_path, data_cache, offline):
    uri, on = offline
    parent, child = tmp_path / "pre", tmp_path / "child"
    run_evolm("train", tiny(parent, data_cache, "train.iters=3", *on, "logger.suite=study", "logger.node=pre"))
    run_evolm("train", tiny(child, data_cache, "train.iters=4", f"train.init_from={parent / 'checkpoints'}", *on,
                            "logger.suite=study", "logger.node=child", "logger.parent=pre", "logger.tags=[demo]"))
    client = mlflow_client(uri)
    ids = {}
    for out, iters, node, tags in ((parent, 3, "pre", ["node:pre"]),
                                   (child, 4, "child", ["node:child", "parent:pre", "demo"])):
        rows = jsonl_rows(out)
        assert sorted(rows) == list(range(1, iters + 1))
        stored = json.loads((out / "tracking.json").read_text())
        assert stored["run_id"] == json.loads((out / "run.json").read_text())["run_id"]
        ids[node] = stored
        # W&B: one offline run, the DAG as group / job_type / tags, the recipe as config, every step's values
        (wb,) = wandb_runs(out)
        run = wb["run"]
        assert (run.run_id, run.project, run.run_group, run.job_type, list(run.tags), run.display_name) == (
            stored["wandb"]["id"], "evolm", "study", "pretrain", tags, "tiny_pretrain")
        assert wb["config"]["train"]["iters"] == iters and wb["config"]["logger"]["node"] == node
        assert_same_values(rows, wandb_by_step([wb]))
        # MLflow: experiment = suite, tags, params = the recipe (and recipe.yaml), every step's values
        r = client.get_run(stored["mlflow"]["run_id"])
        assert client.get_experiment(r.info.experiment_id).name == "study" and r.info.status == "FINISHED"
        assert r.data.tags["evolm.node"] == node and r.data.tags["evolm.stage"] == "pretrain"
        assert r.data.params["train.iters"] == str(iters) and r.data.params["model.name"] == "tiny"
        assert "recipe.yaml" in [f.path for f in client.list_artifacts(r.info.run_id)]
        keys = {k for row in rows.values() for k in scalars(row)}
        assert {"loss", "lr", "grad_norm", "tokens"} <= keys
        assert_same_values(rows, mlflow_by_step(client, r.info.run_id, keys))
    # the child run hangs under its parent's (the DAG's edge), in the same experiment
    tags = client.get_run(ids["child"]["mlflow"]["run_id"]).data.tags
    assert tags["evolm.parent"] == "pre"
    assert tags["mlflow.parentRunId"] == tags["evolm.parent_run_id"] == ids["pre"]["mlflow"]["run_id"]


def test_a_killed_run_resumes_the_same_wandb_and_mlflow_runs(tmp_path, data_cache, offline):
    uri, on = offline
    out = tmp_path / "run"
    args = tiny(out, data_cache, "train.iters=8", "train.save_interval=2", *on)
    at = train_then_sigkill(args, out, at_least=2)
    assert at < 8
    first = json.loads((out / "tracking.json").read_text())
    run_evolm("train", args)
    again = json.loads((out / "tracking.json").read_text())
    assert (again["wandb"]["id"], again["mlflow"]) == (first["wandb"]["id"], first["mlflow"])  # the same runs
    rows = jsonl_rows(out)
    assert sorted(rows) == list(range(1, 9))
    # W&B: one offline directory per process, one run id (`wandb sync` joins them); the killed process's rows up to
    # its checkpoint are there even where wandb-core had not flushed them (logged again from metrics.jsonl)
    wb = wandb_runs(out)
    assert wb and {w["run"].run_id for w in wb} == {first["wandb"]["id"]}
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2
    assert_same_values(rows, wandb_by_step(wb))
    assert json.loads((out / "tracking.json").read_text())["wandb"]["held_through"] == 8
    client = mlflow_client(uri)
    (run,) = client.search_runs([first["mlflow"]["experiment_id"]])
    assert run.info.run_id == first["mlflow"]["run_id"] and run.info.status == "FINISHED"
    keys = {k for row in rows.values() for k in scalars(row)}
    assert_same_values(rows, mlflow_by_step(client, run.info.run_id, keys))


def test_a_sigterm_stop_ends_the_tracker_runs_as_killed_and_the_rerun_continues_them(tmp_path, data_cache, offline):
    uri, on = offline
    out = tmp_path / "run"
    args = tiny(out, data_cache, "train.iters=16", *on)
    rc, _, stopped = train_then_sigterm(args, out, after_rows=2)
    assert rc == 143 and stopped < 16
    first = json.loads((out / "tracking.json").read_text())
    assert first["wandb"]["held_through"] == stopped  # finished: nothing to log again
    client = mlflow_client(uri)
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "KILLED"
    (wb,) = wandb_runs(out)
    assert sorted(int(h["iteration"]) for h in wb["history"]) == list(range(1, stopped + 1))
    run_evolm("train", args)
    again = json.loads((out / "tracking.json").read_text())
    assert (again["wandb"]["id"], again["mlflow"]) == (first["wandb"]["id"], first["mlflow"])
    rows = jsonl_rows(out)
    assert sorted(rows) == list(range(1, 17))
    wb = wandb_runs(out)
    assert len(wb) == 2 and min(int(h["iteration"]) for h in wb[1]["history"]) == stopped + 1  # no replay
    assert_same_values(rows, wandb_by_step(wb))
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "FINISHED"
    assert_same_values(rows, mlflow_by_step(client, first["mlflow"]["run_id"], {k for r in rows.values()
                                                                                 for k in scalars(r)}))


def test_a_tracking_store_lost_mid_run_is_one_warning_and_training_finishes(tmp_path, data_cache, offline):
    """The MLflow store disappears while the run trains (a server gone): one warning line naming logger.mlflow,
    the run trains to its end and exits 0, metrics.jsonl and the W&B run have every row, the checkpoint is saved."""
    import shutil
    import subprocess
    import time

    from tests.conftest import REPO, evolm_cmd, subprocess_env

    uri, on = offline
    out = tmp_path / "run"
    proc = subprocess.Popen(evolm_cmd("train", tiny(out, data_cache, "train.iters=30", "train.log_interval=1", *on)),
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = tmp_path / "mlruns"
    while proc.poll() is None:  # the store goes once training has logged its first row to it
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if rows and store.exists():
            for _ in range(100):  # the run may write a file into it while it goes (rmtree: "Directory not empty")
                shutil.rmtree(store, ignore_errors=True)
                if not store.exists():
                    break
                time.sleep(0.01)
            break
        time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and not store.exists(), stderr
    warnings = [ln for ln in stdout.splitlines() if ln.startswith("[evolm] warning: logger.mlflow")]
    assert len(warnings) == 1 and "training goes on without it" in warnings[0], stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 31))
    (wb,) = wandb_runs(out)
    assert sorted(int(h["iteration"]) for h in wb["history"]) == list(range(1, 31))
    assert (out / "checkpoints" / "iter_0000030" / "evolm.json").is_file()


@pytest.mark.parametrize("name,package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_tracking_package_is_one_line(tmp_path, monkeypatch, name, package):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.modules[{name!r}] = None  # as if not installed: importlib.util.find_spec says None
    """))
    monkeypatch.setenv("PYTHONPATH", f"{hide}:{__import__('os').environ.get('PYTHONPATH', '')}")
    out = tmp_path / "run"
    proc = run_evolm("train", [f"run.out_dir={out}", f"logger.{name}=true", "train.iters=1"], check=False)
    line = one_line_error(proc, f"logger.{name}")
    assert "pip install evolm-nemo[tracking]" in line and package in line
    assert not (out / "tracking.json").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["wandb", "mlflow", "wandb_dir"])
def test_a_tracking_backend_that_cannot_take_a_run_is_one_line_before_the_model_is_built(tmp_path, monkeypatch,
                                                                                         data_cache, name):
    """An online W&B without a login, an MLflow server nobody answers at, a $WANDB_DIR that cannot be written (it
    was a traceback once the model was built): one line naming the key, before the run directory is made and the
    model built."""
    from tests.conftest import free_port, unwritable_dir

    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    if name == "wandb_dir":
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(unwritable_dir(tmp_path) / "wandb"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no W&B login
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    out = tmp_path / "run"
    extra = (["logger.mlflow=true", f"logger.mlflow_uri=http://127.0.0.1:{free_port()}"] if name == "mlflow" else
             ["logger.wandb=true"])
    proc = run_evolm("train", tiny(out, data_cache, "train.iters=1", *extra), check=False)
    line = one_line_error(proc, "logger.mlflow_uri" if name == "mlflow" else "logger.wandb")
    assert {"wandb": "wandb login", "mlflow": "does not answer", "wandb_dir": "$WANDB_DIR"}[name] in line
    assert not out.exists() and "params" not in proc.stdout  # nothing made, nothing built


def test_suite_nodes_carry_the_dag_and_command_line_logger_keys(tmp_path):
    from evolm_nemo.config.errors import ConfigError
    from evolm_nemo.suite import plan, spec

    suite = spec.load("tiny", {"logger.wandb": True, "logger.tags": ["a", "b"]})
    items = plan.train_overrides(suite, suite.nodes["sft_ep2"])
    for item in ("logger.suite=tiny", "logger.node=sft_ep2", "logger.parent=cpt_80it_fw8_fm42", "logger.wandb=true",
                 "logger.tags=[a,b]"):
        assert item in items
    assert not any(i.startswith("logger.parent=") for i in plan.train_overrides(suite, suite.nodes["pretrain_40it"]))
    with pytest.raises(ConfigError, match="valid logger keys"):
        spec.load("tiny", {"logger.node": "x"})
