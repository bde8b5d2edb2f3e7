"""A suite recipe (``recipes/suite/<name>.yaml``): EvoLM's grid as a DAG of named runs.

Each node is one run -- a training (``kind: train``: ``experiment=<recipe>`` + overrides), an HF export, an
evaluation, or a small data step -- and names its parent by node name. This module reads the YAML, checks every key,
and orders the graph; a bad suite is one ConfigError naming the key (``nodes.<node>.<key>``) before anything runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from evolm_nemo.config.compose import recipes_dir
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.tokens import parse_tokens
from evolm_nemo.data.nano_world import WorldConfig
from evolm_nemo.suite.takeaways import validate as validate_takeaways

KINDS = ("train", "export", "eval", "data")
EVAL_MODES = ("downstream", "upstream")
# A data node's maker -> (the module its command runs, the file in its directory that says it is done).
# demo_eval: the demo's held-out generated problems in GSM8K's cooked schema (parent: an SFT run);
# nano_world: EvoLM-nano's generated world (evolm_nemo/data/nano_world.py; no parent; overrides are its keys)
DATA_MAKERS = {"demo_eval": ("evolm_nemo.suite.demo_data", "gsm8k_platinum.jsonl"),
               "nano_world": ("evolm_nemo.data.nano_world", "manifest.json")}
COMMON_KEYS = ("kind", "parent", "needs", "overrides", "nodes", "gpus", "time", "note")
KIND_KEYS = {
    "train": ("experiment", "samples", "tokens_per_example"),
    "export": (),
    "eval": ("mode",),
    "data": ("make", "limit"),
}
SUITE_KEYS = ("name", "description", "root", "gpus_per_node", "mfu", "train_overrides", "slurm", "local", "report",
              "nodes")
REPORT_TABLES = {"upstream": ("eval",), "upstream_tasks": ("eval",), "downstream": ("sft", "rl"),
                 "cpt_replay": ("eval",)}
SLURM_KEYS = ("container_image", "eval_container_image", "container_mounts", "container_workdir", "account",
              "partition", "time", "gpus_per_node", "exclusive", "signal_seconds", "master_port", "setup")
# logger.<key>= at `evolm suite plan|status|launch`: W&B / MLflow for every train node (suite/node/parent are the
# launcher's to set)
LOGGER_KEYS = ("wandb", "mlflow", "project", "entity", "tags", "mlflow_uri", "experiment")
LOCAL_KEYS = ("nproc",)
# directories the launcher and the report write under the suite's root: no node may be named like them
RESERVED = ("logs", "slurm", "report", "nemo_run", "cache")
_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")
_PLACEHOLDER = re.compile(r"\$\{(root|out:([^}]+))\}")


@dataclass
class Node:
    name: str
    kind: str
    parent: Optional[str] = None
    needs: list[str] = field(default_factory=list)
    experiment: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1  # Slurm nodes asked for
    gpus: Optional[int] = None  # GPUs per node (None: the suite's gpus_per_node for train, 1 otherwise)
    time: Optional[str] = None  # Slurm time limit (None: slurm.time)
    samples: Optional[Any] = None  # train (sft/rl/rm/dpo): examples / prompts / pairs in the node's dataset
    tokens_per_example: Optional[int] = None  # plan: tokens per example/sample (None: an upper bound, see plan.py)
    mode: str = "downstream"  # eval
    make: Optional[str] = None  # data
    limit: Optional[int] = None  # data
    note: Optional[str] = None

    @property
    def deps(self) -> list[str]:
        return ([self.parent] if self.parent else []) + [n for n in self.needs if n != self.parent]


@dataclass
class Suite:
    name: str
    path: Path
    root: str
    nodes: dict[str, Node]
    order: list[str]  # topological: every node after all it depends on (ties: file order)
    gpus_per_node: int = 8
    mfu: float = 0.4
    train_overrides: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)
    description: str = ""
    report: dict = field(default_factory=dict)  # table -> rows {row, <eval node keys>, published}

    def out(self, name: str) -> str:
        """Where node ``name`` writes (a run dir, an HF dir, an eval dir, a data dir)."""
        return f"{self.root.rstrip('/')}/{name}"

    def expand(self, text: str, key: str) -> str:
        """``${root}`` and ``${out:<node>}`` in an override."""
        def sub(m):
            if m.group(1) == "root":
                return self.root.rstrip("/")
            target = m.group(2)
            if target not in self.nodes:
                raise ConfigError(key, f"${{out:{target}}} names no node of suite {self.name}")
            return self.out(target)
        return _PLACEHOLDER.sub(sub, text)


SLURM_DEFAULTS = {
    "container_image": "nvcr.io/nvidia/pytorch:25.09-py3",  # the training image's base; put your built tag here
    "eval_container_image": None,  # evaluation nodes (TensorRT-LLM image); None: container_image
    "container_mounts": [],
    "container_workdir": "/workspace/evolm",
    "account": None,
    "partition": None,
    "time": "04:00:00",
    "gpus_per_node": None,
    "exclusive": True,
    "signal_seconds": 300,
    "master_port": 29500,
    "setup": [],
}


def suites_dir() -> Path:
    return recipes_dir() / "suite"


def available() -> list[str]:
    return sorted(p.stem for p in suites_dir().glob("*.yaml"))


def suite_path(name: Optional[str]) -> Path:
    if not name:
        raise ConfigError("suite", f"required: a suite name ({', '.join(available())}) or a YAML file")
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError("suite", f"no such file: {name}")
        return p
    path = suites_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("suite", f"no suite '{name}' in {suites_dir()}/; available: {', '.join(available())}")
    return path


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _hydra_value(value) -> str:
    """A parsed command-line value back as a Hydra override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def parse_overrides(overrides: list[str], allowed: dict[str, Any]) -> dict[str, Any]:
    """``key=value`` command-line items -> dict; keys must be in ``allowed`` (dotted for nested: slurm.account)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are key=value (e.g. suite=tiny executor=local)")
        key, _, value = item.partition("=")
        key = key.strip().lstrip("+")
        head = key.split(".")[0]
        if key not in allowed and not (head in allowed and allowed[head] == "section"):
            raise ConfigError(key, f"unknown key; valid keys: {', '.join(sorted(allowed))}")
        out[key] = value.strip() if key == "slurm.time" else _parse_value(value)  # 1:00:00 is text, not 3600 s
    return out


def _as_list(value, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return [str(v) for v in value]


def slurm_time(value, key: str) -> str:
    """A Slurm time limit as text (``04:00:00``, ``90``, ``1-12:00:00``). A YAML number is refused: YAML 1.1 reads
    ``1:00:00`` as 3600, which Slurm would take as 3600 minutes."""
    if isinstance(value, bool) or not isinstance(value, str) or not _SLURM_TIME.fullmatch(value.strip()):
        hint = (" (YAML read an unquoted H:MM:SS as a number of seconds; quote it)" if isinstance(value, int)
                and not isinstance(value, bool) else "")
        raise ConfigError(key, f"expected a Slurm time such as \"04:00:00\" or \"1-00:00:00\", quoted; got "
                               f"{value!r}{hint}")
    return value.strip()


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"expected an integer >= 1, got {value!r}")
    return value


def _node(name: str, spec, where: str) -> Node:
    key = f"nodes.{name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ConfigError(key, "node names are letters, digits, '_', '.', '-' (they become directory names)")
    if name in RESERVED:
        raise ConfigError(key, f"{name!r} is where the launcher or the report writes under the suite's root "
                               f"({', '.join(RESERVED)} are taken); rename the node")
    if not isinstance(spec, dict):
        raise ConfigError(key, f"expected a mapping such as {{kind: train, experiment: ...}}, got {spec!r}")
    kind = spec.get("kind", "train" if "experiment" in spec else None)
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind", f"must be one of {', '.join(KINDS)}; got {kind!r}")
    valid = COMMON_KEYS + KIND_KEYS[kind]
    for k in spec:
        if k not in valid:
            raise ConfigError(f"{key}.{k}", f"unknown key for a {kind} node; valid keys: {', '.join(valid)}")
    node = Node(name=name, kind=kind)
    parent = spec.get("parent")
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{key}.parent", f"expected a node name, got {parent!r}")
    node.parent = parent
    node.needs = _as_list(spec.get("needs"), f"{key}.needs")
    node.overrides = _as_list(spec.get("overrides"), f"{key}.overrides")
    for item in node.overrides:
        if "=" not in item:
            raise ConfigError(f"{key}.overrides", f"{item!r} is not key=value")
    node.nodes = _positive_int(spec.get("nodes", 1), f"{key}.nodes")
    if spec.get("gpus") is not None:
        node.gpus = _positive_int(spec["gpus"], f"{key}.gpus")
    node.time = None if spec.get("time") is None else slurm_time(spec["time"], f"{key}.time")
    node.note = spec.get("note")
    if kind == "train":
        node.experiment = spec.get("experiment")
        if not isinstance(node.experiment, str) or not node.experiment:
            raise ConfigError(f"{key}.experiment", "a train node names its recipe: experiment: <recipes/experiment "
                                                   "name>")
        if spec.get("samples") is not None:
            node.samples = parse_tokens(spec["samples"], f"{key}.samples")
        if spec.get("tokens_per_example") is not None:
            node.tokens_per_example = _positive_int(spec["tokens_per_example"], f"{key}.tokens_per_example")
    elif kind == "eval":
        node.mode = spec.get("mode", "downstream")
        if node.mode not in EVAL_MODES:
            raise ConfigError(f"{key}.mode", f"must be one of {', '.join(EVAL_MODES)}; got {node.mode!r}")
    elif kind == "data":
        node.make = spec.get("make")
        if not isinstance(node.make, str) or node.make not in DATA_MAKERS:
            raise ConfigError(f"{key}.make", f"must be one of {', '.join(DATA_MAKERS)}; got {node.make!r}")
        if spec.get("limit") is not None:
            node.limit = _positive_int(spec["limit"], f"{key}.limit")
    if kind == "data" and node.make == "nano_world":
        if parent:
            raise ConfigError(f"{key}.parent", "a nano_world node reads no other node's output: drop its parent")
        check_world_overrides(node.overrides, f"{key}.overrides")
    elif kind in ("export", "eval", "data") and not parent:
        raise ConfigError(f"{key}.parent", f"a {kind} node needs a parent (the node whose output it reads)")
    return node


def check_world_overrides(items: list[str], key: str) -> None:
    """A nano_world node's overrides are the world's own keys (``general_docs=1500``), never ``out``."""
    valid = sorted(f.name for f in fields(WorldConfig) if f.name not in ("out", "overwrite"))
    for item in items:
        name = item.partition("=")[0].strip()
        if name not in valid:
            raise ConfigError(key, f"{name!r} is not a nano world key (the node's out is its own directory); valid "
                                   f"keys: {', '.join(valid)}")


def outputs_are_needs(nodes: dict[str, Node], train_overrides: list[str], suite: str) -> None:
    """Every ``${out:<node>}`` a node reads -- in its overrides, and for a train node in the suite's
    ``train_overrides`` -- becomes one of its needs, so that it is ordered (and submitted, ``afterok``) after that node
    and ``only=`` keeps that node. A name that is no node is one line naming the key."""
    for node in nodes.values():
        items = [(o, "train_overrides") for o in train_overrides] if node.kind == "train" else []
        items += [(o, f"nodes.{node.name}.overrides") for o in node.overrides]
        for text, key in items:
            for m in _PLACEHOLDER.finditer(text):
                target = m.group(2)
                if target is None or target == node.name:  # ${root}; a node's own output is no dependency
                    continue
                if target not in nodes:
                    raise ConfigError(key, f"${{out:{target}}} names no node of suite {suite}")
                if target not in node.deps:
                    node.needs.append(target)


def topological(nodes: dict[str, Node], suite: str) -> list[str]:
    """Every node after its parent and needs; ties keep file order. A missing parent or a cycle is one line."""
    for node in nodes.values():
        for dep, what in [(node.parent, "parent")] + [(n, "needs") for n in node.needs]:
            if dep is None:
                continue
            if dep == node.name:
                raise ConfigError(f"nodes.{node.name}.{what}", "a node cannot depend on itself")
            if dep not in nodes:
                import difflib

                close = difflib.get_close_matches(dep, list(nodes), n=2, cutoff=0.6)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise ConfigError(f"nodes.{node.name}.{what}", f"names {dep!r}, which is not a node of suite "
                                                               f"{suite}{hint}")
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    order: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            last = nodes[cycle[-2]]
            what = "parent" if last.parent == name else "needs"
            raise ConfigError(f"nodes.{last.name}.{what}", f"cycle: {' -> '.join(cycle)} (each depends on "
                                                           "the next); break it")
        state[name] = 1
        for dep in nodes[name].deps:
            visit(dep, path + [name])
        state[name] = 2
        order.append(name)

    for name in nodes:
        visit(name, [])
    return order


def load(name: Optional[str], options: Optional[dict] = None) -> Suite:
    """Read ``recipes/suite/<name>.yaml`` (or a YAML path); ``options`` are command-line suite keys (root=,
    mfu=, gpus_per_node=, slurm.<key>=, local.<key>=)."""
    import yaml

    path = suite_path(name)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(str(path), f"not valid YAML ({first})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(str(path), "a suite is a mapping with name, root and nodes")
    for k in doc:
        if k not in SUITE_KEYS:
            raise ConfigError(k, f"unknown suite key in {path}; valid keys: {', '.join(SUITE_KEYS)}")
    options = dict(options or {})
    logger = []  # logger.<key>= on the command line: every train node's tracking (after train_overrides)
    for k, v in options.items():
        section, _, sub = k.partition(".")
        if section == "logger":
            if sub not in LOGGER_KEYS:
                raise ConfigError(k, f"unknown key; valid logger keys: {', '.join(LOGGER_KEYS)}")
            logger.append(f"{k}={_hydra_value(v)}")
            continue
        if sub:
            valid = SLURM_KEYS if section == "slurm" else LOCAL_KEYS
            if sub not in valid:
                raise ConfigError(k, f"unknown key; valid {section} keys: {', '.join(valid)}")
            doc.setdefault(section, {})
            if not isinstance(doc[section], dict):
                raise ConfigError(section, f"expected a mapping in {path}")
            doc[section][sub] = v
        else:
            doc[k] = v
    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise ConfigError("nodes", f"{path} needs a mapping of nodes (name: {{kind, parent, ...}})")
    nodes = {str(n): _node(str(n), spec, str(path)) for n, spec in raw_nodes.items()}
    suite_name = str(doc.get("name") or path.stem)
    train_overrides = _as_list(doc.get("train_overrides"), "train_overrides")
    outputs_are_needs(nodes, train_overrides, suite_name)
    order = topological(nodes, suite_name)
    slurm = dict(SLURM_DEFAULTS)
    for section in ("slurm", "local"):
        if not isinstance(doc.get(section) or {}, dict):
            raise ConfigError(section, f"expected a mapping of {section} keys in {path}, got {doc[section]!r}")
    for k, v in (doc.get("slurm") or {}).items():
        if k not in SLURM_KEYS:
            raise ConfigError(f"slurm.{k}", f"unknown key; valid slurm keys: {', '.join(SLURM_KEYS)}")
        slurm[k] = v
    _check_slurm(slurm)
    local = {"nproc": 1}
    for k, v in (doc.get("local") or {}).items():
        if k not in LOCAL_KEYS:
            raise ConfigError(f"local.{k}", f"unknown key; valid local keys: {', '.join(LOCAL_KEYS)}")
        local[k] = v
    local["nproc"] = _positive_int(local["nproc"], "local.nproc")
    root = doc.get("root") or f"runs/suite_{suite_name}"
    mfu = doc.get("mfu", 0.4)
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ConfigError("mfu", f"model FLOPs utilisation must be in (0, 1], got {mfu!r}")
    gpus = _positive_int(doc.get("gpus_per_node", 8), "gpus_per_node")
    if slurm.get("gpus_per_node") is not None:
        gpus = _positive_int(slurm["gpus_per_node"], "slurm.gpus_per_node")
    return Suite(name=suite_name, path=path, root=str(root), nodes=nodes, order=order, gpus_per_node=gpus,
                 mfu=float(mfu), train_overrides=train_overrides + logger,
                 slurm=slurm, local=local, description=str(doc.get("description") or ""),
                 report=_report(doc.get("report"), nodes))


def _check_slurm(slurm: dict) -> None:
    """Each Slurm key's type, so that a launch never fails half-way on one."""
    slurm["container_mounts"] = _as_list(slurm.get("container_mounts"), "slurm.container_mounts")
    slurm["setup"] = _as_list(slurm.get("setup"), "slurm.setup")
    slurm["time"] = slurm_time(slurm.get("time"), "slurm.time")
    for k in ("container_image", "container_workdir"):
        if not isinstance(slurm.get(k), str) or not slurm[k]:
            raise ConfigError(f"slurm.{k}", f"expected a non-empty string, got {slurm.get(k)!r}")
    for k in ("eval_container_image", "account", "partition"):
        if slurm.get(k) is not None and not isinstance(slurm[k], str):
            raise ConfigError(f"slurm.{k}", f"expected a string or null, got {slurm[k]!r}")
    if not isinstance(slurm.get("exclusive"), bool):
        raise ConfigError("slurm.exclusive", f"expected true or false, got {slurm.get('exclusive')!r}")
    if slurm.get("signal_seconds") is not None and slurm["signal_seconds"] != 0:
        _positive_int(slurm["signal_seconds"], "slurm.signal_seconds")
    port = slurm.get("master_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError("slurm.master_port", f"expected a port number in 1..65535, got {port!r}")


def _published(value, table: str, key: str) -> None:
    """EvoLM's figures beside a row: a number (upstream, cpt_replay), {task: number} (upstream_tasks) or
    {metric: [SFT, SFT+RL]} (downstream); null where the paper has none."""
    def number(x) -> bool:
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))

    if value is None:
        return
    if table in ("upstream", "cpt_replay"):
        ok = number(value)
        shape = "a number"
    elif table == "upstream_tasks":
        ok = isinstance(value, dict) and all(isinstance(k, str) and number(v) for k, v in value.items())
        shape = "a mapping of task: number"
    else:
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(map(number, v))
            for k, v in value.items())
        shape = "a mapping of metric: [SFT, SFT+RL] numbers"
    if not ok:
        raise ConfigError(key, f"expected {shape} (or null), got {value!r}")


def _report(raw, nodes: dict[str, Node]) -> dict:
    """The ``report:`` section: per table, rows naming eval nodes (and EvoLM's published figures)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("report", f"expected a mapping of tables ({', '.join(REPORT_TABLES)}, takeaways)")
    for table, rows in raw.items():
        if table == "takeaways":  # EvoLM's claims checked on the suite's runs (suite/takeaways.py)
            validate_takeaways(rows, nodes)
            continue
        if table not in REPORT_TABLES:
            raise ConfigError(f"report.{table}", f"unknown table; valid tables: {', '.join(REPORT_TABLES)}, "
                                                 "takeaways")
        if not isinstance(rows, list):
            raise ConfigError(f"report.{table}", "expected a list of rows")
        for i, row in enumerate(rows):
            key = f"report.{table}[{i}]"
            if not isinstance(row, dict) or "row" not in row:
                raise ConfigError(key, "a row is a mapping with `row` (its label), the eval node(s) and `published`")
            for k in row:
                if k not in ("row", "published", *REPORT_TABLES[table]):
                    raise ConfigError(f"{key}.{k}", f"unknown key; valid keys: row, "
                                                    f"{', '.join(REPORT_TABLES[table])}, published")
            for k in REPORT_TABLES[table]:
                name = row.get(k)
                if name is None:
                    raise ConfigError(f"{key}.{k}", "required: the eval node of this row")
                if not isinstance(name, str) or name not in nodes or nodes[name].kind != "eval":
                    raise ConfigError(f"{key}.{k}", f"{name!r} is not an eval node of this suite")
            _published(row.get("published"), table, f"{key}.published")
    return raw


def select(suite: Suite, only) -> list[str]:
    """The topological order restricted to ``only`` (node names) and everything they depend on; all if None."""
    if only is None:
        return list(suite.order)
    names = _as_list(only, "only")
    keep: set[str] = set()

    def add(n: str) -> None:
        if n in keep:
            return
        keep.add(n)
        for d in suite.nodes[n].deps:
            add(d)

    for n in names:
        if n not in suite.nodes:
            raise ConfigError("only", f"{n!r} is not a node of suite {suite.name}")
        add(n)
    return [n for n in suite.order if n in keep]
