"""Experiment tracking beside ``metrics.jsonl``: ``logger.wandb=true`` (Weights & Biases) and ``logger.mlflow=true``
(MLflow), on rank 0 only. Both are optional extras (``pip install evolm-nemo[tracking]``), imported only when turned
on; a missing package is one line (``check``) before anything is built.

Each tracker gets the same scalars as ``metrics.jsonl`` (every record ``MetricsWriter`` writes, keyed by
``iteration``) and the composed recipe as the run's config (W&B: ``config``; MLflow: flattened params plus the
whole recipe as the ``recipe.yaml`` artifact). A suite node (``evolm suite launch`` sets ``logger.suite``,
``logger.node`` and ``logger.parent``) carries the DAG: W&B ``group`` = suite, ``job_type`` = stage, tags
``node:<node>`` / ``parent:<parent>``; MLflow experiment = suite, tags ``evolm.node`` / ``evolm.parent`` /
``evolm.stage`` and, when the parent run was tracked too, ``mlflow.parentRunId`` (the child nests under its parent
in the UI) and ``evolm.parent_run_id``.

The tracker run ids are stored in ``<run.out_dir>/tracking.json`` with the evolm run id (``run.json``): a resumed
run (same evolm run id) continues the same W&B run (``resume="allow"``) and the same MLflow run; a fresh start
(``train.overwrite=true``, or a restart before the first checkpoint) opens new ones. Iterations after the resumed
checkpoint are logged again by the resumed run (as ``metrics.jsonl`` is rewritten from there): the later point of
an iteration is the one that counts. W&B's x-axis is ``iteration`` (``define_metric``), so replayed iterations are
never dropped as out-of-order steps. wandb-core buffers records, so a process killed without finishing its W&B run
(SIGKILL, OOM, a lost node) may lose the rows before its checkpoint: the resume logs them again from
``metrics.jsonl`` (``held_through`` in ``tracking.json``: how far a finished W&B segment got). MLflow's writes are
synchronous.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path

from evolm_nemo.config.errors import ConfigError

TRACKING_FILE = "tracking.json"
_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}  # key -> (module, pip name)
_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. :/]")


def enabled(cfg) -> list[str]:
    lg = cfg.logger
    return [name for name in ("wandb", "mlflow") if getattr(lg, name)]


def check(cfg) -> None:
    """The tracking packages asked for are importable (found, not imported: every rank, cheap); else one line."""
    for name in enabled(cfg):
        module, pip_name = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logger.{name}", f"needs the {pip_name} package, which is not installed; "
                                                "`pip install evolm-nemo[tracking]` (or `pip install -c "
                                                f"constraints.txt {pip_name}`), or set logger.{name}=false")


def mlflow_uri(cfg) -> str:
    """Where MLflow logs: ``logger.mlflow_uri``, else $MLFLOW_TRACKING_URI, else ./mlruns (a plain path is a local
    file store)."""
    uri = cfg.logger.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
    if ":" not in uri.split("/")[0] and uri != "databricks":
        uri = Path(uri).resolve().as_uri()
    if uri.startswith("file:"):  # MLflow 3 keeps the file store in maintenance mode, behind an opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def wandb_dir(cfg) -> str:
    """Where W&B writes its files: $WANDB_DIR, else run.out_dir (``<run.out_dir>/wandb``)."""
    return os.environ.get("WANDB_DIR") or str(cfg.run.out_dir)


def reach(cfg) -> None:
    """Rank 0, before the model is built: the tracking backends asked for can take a run -- MLflow's store answers,
    W&B's directory is writable, an online W&B has a login -- else one line now rather than after minutes of
    building and loading."""
    lg = cfg.logger
    if lg.wandb and os.environ.get("WANDB_MODE") != "disabled":
        from evolm_nemo.fileio import check_writable

        try:
            check_writable(wandb_dir(cfg), "logger.wandb", directory=True)
        except ConfigError as e:
            where = "$WANDB_DIR" if os.environ.get("WANDB_DIR") else "run.out_dir"
            raise ConfigError("logger.wandb", f"W&B writes its files under {where}: {e.message}; point WANDB_DIR "
                                              "at a writable directory") from None
    if lg.wandb and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun"):
        import wandb

        if not wandb.login(prompt=False, verify=False):  # a stored or WANDB_API_KEY login; no network
            raise ConfigError("logger.wandb", "W&B is online but has no login: run `wandb login` or set "
                                              "WANDB_API_KEY (or WANDB_MODE=offline to log locally)")
    if lg.mlflow:
        uri = mlflow_uri(cfg)
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:  # an unreachable server, a refused store, a bad scheme
            raise ConfigError("logger.mlflow_uri", f"MLflow at {uri} does not answer ({type(e).__name__}: "
                                                   f"{(str(e).splitlines() or [''])[0][:300]})") from None


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of a metrics record, ``iteration`` left out (it is the step)."""
    return {k: float(v) for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and v is not None}


def mlflow_key(key: str) -> str:
    """MLflow's metric names allow letters, digits, ``_ - . : /`` and spaces; anything else becomes ``_``."""
    return _MLFLOW_KEY.sub("_", key)


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values (MLflow params) of the composed recipe."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = tree if isinstance(tree, str) else json.dumps(tree)
    return out


def _read(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def parent_tracking(cfg) -> dict:
    """The parent run's ``tracking.json`` (``train.init_from`` / ``train.branch_from`` point into its run
    directory: the checkpoint root, a checkpoint, or the run directory itself); {} when there is none."""
    for ref in (cfg.train.init_from, cfg.train.branch_from):
        if not ref:
            continue
        p = Path(ref)
        for d in (p, p.parent, p.parent.parent):
            found = _read(d / TRACKING_FILE)
            if found:
                return found
    return {}


class Trackers:
    """The W&B run and/or MLflow run of one training run (rank 0 only); ``log`` mirrors a metrics record."""

    def __init__(self, cfg, out_dir: Path, run_id: str, config: dict, start: int = 0):
        self.cfg, self.out = cfg, Path(out_dir)
        self.path = self.out / TRACKING_FILE
        stored = _read(self.path)
        same = stored.get("run_id") == run_id  # a resume of the run these trackers belong to
        self.state = {"run_id": run_id}
        self.wandb_run = None
        self.mlflow = None  # (client, run id)
        self.last = start  # the last iteration logged
        lg = cfg.logger
        parent = parent_tracking(cfg)  # the parent run's tracker ids (mlflow.parentRunId), if it was tracked
        try:
            if lg.wandb:
                self._open_wandb(config, stored.get("wandb") if same else None, start)
            if lg.mlflow:
                self._open_mlflow(config, stored.get("mlflow") if same else None, parent.get("mlflow") or {})
        except BaseException:
            self.close("FAILED")
            raise
        self._store()

    def _store(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(TRACKING_FILE + ".part")
        part.write_text(json.dumps(self.state, indent=1) + "\n")
        os.replace(part, self.path)

    # ------------------------------------------------------------------------------------------------ W&B
    def _open_wandb(self, config: dict, stored: dict | None, start: int) -> None:
        import wandb

        lg, cfg = self.cfg.logger, self.cfg
        run_id = (stored or {}).get("id") or os.urandom(5).hex()  # W&B ids: [a-z0-9]
        tags = ([f"node:{lg.node}"] if lg.node else []) + ([f"parent:{lg.parent}"] if lg.parent else []) + list(lg.tags)
        directory = wandb_dir(self.cfg)
        Path(directory).mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(project=lg.project, entity=lg.entity, id=run_id, resume="allow",
                             name=lg.name or cfg.run.name, group=lg.suite, job_type=cfg.stage, tags=tags or None,
                             config=config, dir=directory)
        except Exception as e:  # wandb.errors.CommError / UsageError (no login, ...)
            raise ConfigError("logger.wandb", f"W&B did not start a run ({type(e).__name__}: "
                                              f"{(str(e).splitlines() or [''])[0]}); `wandb login`, or "
                                              "WANDB_MODE=offline (files under run.out_dir/wandb, `wandb sync` "
                                              "later)") from None
        run.define_metric("iteration")
        run.define_metric("*", step_metric="iteration")
        self.wandb_run = run
        held = int((stored or {}).get("held_through") or 0)
        self.state["wandb"] = {"id": run.id, "project": lg.project, "entity": lg.entity,
                               "mode": "offline" if run.offline else "online", "dir": directory,
                               "held_through": held}
        if stored and held < start:
            # The previous process ended without finishing its W&B run (SIGKILL, OOM, a lost node): wandb-core
            # buffers records (up to its transaction-log flush interval), so rows up to the resumed checkpoint may
            # be missing. metrics.jsonl keeps them: they are logged again (an online run's summary says how far
            # the server got; rows it already holds are skipped).
            if not run.offline:
                try:
                    held = max(held, int(run.summary.get("iteration") or 0))
                except (TypeError, ValueError):
                    pass
            for row in metrics_rows(self.out / "metrics.jsonl"):
                if held < row["iteration"] <= start:
                    run.log({"iteration": int(row["iteration"]), **scalars(row)})

    # ------------------------------------------------------------------------------------------------ MLflow
    def _open_mlflow(self, config: dict, stored: dict | None, parent: dict) -> None:
        lg, cfg = self.cfg.logger, self.cfg
        uri = mlflow_uri(cfg)
        from mlflow.entities import Param  # imported here: the extra is optional
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(tracking_uri=uri)
            name = lg.experiment or lg.suite or lg.project
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run_id = None
            if stored and stored.get("run_id") and stored.get("tracking_uri") == uri:
                try:
                    client.get_run(stored["run_id"])
                    run_id = stored["run_id"]
                except Exception:  # gone from this store: a new run, said below
                    print(f"[evolm] logger.mlflow: run {stored['run_id']} is not in {uri}; logging to a new run",
                          flush=True)
            if run_id is None:
                tags = {"evolm.stage": cfg.stage, "evolm.run_id": self.state["run_id"]}
                for key in ("suite", "node", "parent"):
                    if getattr(lg, key):
                        tags[f"evolm.{key}"] = getattr(lg, key)
                for tag in lg.tags:
                    tags[f"evolm.tag.{tag}"] = "true"
                if parent.get("run_id") and parent.get("tracking_uri") == uri:
                    tags["evolm.parent_run_id"] = parent["run_id"]
                    if parent.get("experiment_id") == exp_id:
                        tags["mlflow.parentRunId"] = parent["run_id"]
                run = client.create_run(exp_id, run_name=lg.name or cfg.run.name, tags=tags)
                run_id = run.info.run_id
                params = [Param(k[:250], v[:6000]) for k, v in flatten(config).items()]
                for i in range(0, len(params), 100):
                    client.log_batch(run_id, params=params[i:i + 100])
                import yaml

                client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "recipe.yaml")
            else:
                client.update_run(run_id, status="RUNNING")
        except ConfigError:
            raise
        except Exception as e:  # MlflowException (a refused store, an unreachable server, ...)
            raise ConfigError("logger.mlflow_uri", f"MLflow at {uri} refused the run ({type(e).__name__}: "
                                                   f"{(str(e).splitlines() or [''])[0][:300]})") from None
        self.mlflow = (client, run_id)
        self.state["mlflow"] = {"run_id": run_id, "experiment_id": exp_id, "experiment": name, "tracking_uri": uri}

    # ------------------------------------------------------------------------------------------------ records
    def log(self, record: dict) -> None:
        """Mirror one record to the open backends. A backend that fails (a server gone, a full disk, a revoked key)
        is said in one line and dropped for the rest of the run: training goes on, metrics.jsonl keeps every row."""
        step = int(record["iteration"])
        self.last = max(self.last, step)
        values = scalars(record)
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({"iteration": step, **values})
            except Exception as exc:
                self._drop("wandb", exc, step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
            try:
                for i in range(0, len(metrics), 1000):
                    client.log_batch(run_id, metrics=metrics[i:i + 1000])
            except Exception as exc:
                self._drop("mlflow", exc, step)

    @staticmethod
    def _warn(name: str, exc: BaseException, step: int | None) -> None:
        where = f"at iteration {step}" if step is not None else "at the end"
        print(f"[evolm] warning: logger.{name}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]} "
              f"{where}; training goes on without it (metrics.jsonl has every row)", flush=True)

    def _drop(self, name: str, exc: BaseException, step: int) -> None:
        self._warn(name, exc, step)
        if name == "wandb":
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=1)
            except Exception:
                pass
        else:
            self.mlflow = None

    def close(self, status: str = "FINISHED") -> None:
        """End both runs: ``FINISHED``, ``KILLED`` (stopped by a signal; resumable) or ``FAILED``. A backend that
        fails to end its run is said in one line; the training run's own outcome stands."""
        ok = status == "FINISHED"
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish(exit_code=0 if ok else 143 if status == "KILLED" else 1)  # flushes every record
            except Exception as exc:
                self._warn("wandb", exc, None)
            self.state["wandb"]["held_through"] = self.last
            try:
                self._store()
            except OSError:
                if ok:
                    raise
        if self.mlflow is not None:
            (client, run_id), self.mlflow = self.mlflow, None
            try:
                client.set_terminated(run_id, status=status)
            except Exception as exc:
                self._warn("mlflow", exc, None)


def metrics_rows(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line left out)."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
    return rows


def open_trackers(cfg, out_dir, run_id: str, config: dict, start: int = 0) -> Trackers | None:
    """The tracker runs of a run starting (or resuming) at iteration ``start`` (rank 0), or None when off."""
    return Trackers(cfg, Path(out_dir), run_id, config, start) if enabled(cfg) else None
