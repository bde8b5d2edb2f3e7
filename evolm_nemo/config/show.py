"""What Hydra users expect of a command line: ``evolm <command> --help`` prints the command's keys with their values
(the defaults, or as composed with the overrides on the same line) and the comment of each key, and ``--cfg job``
prints the composed recipe as YAML. Both compose for real (the same checks as a run) and run nothing."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Sequence

from evolm_nemo.config.compose import compose, compose_command, recipes_dir

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s?(.*))?$")
_MORE = re.compile(r"^\s+#\s*(.*)$")


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from a dataclass's source (and its dataclass bases'): the comment on a field's line,
    continued by comment-only lines that follow it."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not cls:
            out.update(field_comments(base))
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    names = {f.name for f in dataclasses.fields(cls)}
    current = None
    for line in lines:
        more = _MORE.match(line)
        if more and current is not None:
            out[current] = f"{out[current]} {more.group(1).strip()}".strip()
            continue
        m = _FIELD.match(line)
        current = None
        if m and m.group(1) in names:
            current = m.group(1)
            out[current] = (m.group(2) or "").strip()
    return out


def _value(v) -> str:
    if isinstance(v, str):
        return repr(v) if v == "" or v != v.strip() or " " in v else v
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def key_lines(obj, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, value, comment)`` for every leaf of a (nested) dataclass instance, in field order."""
    rows = []
    comments = field_comments(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            rows += key_lines(v, key + ".")
        else:
            rows.append((key, _value(v), comments.get(f.name, "")))
    return rows


_YAML_KEY = re.compile(r"^(\s*)([\w.]+)\s*:[^#]*?(?:#\s?(.*))?$")


def recipe_comments(config_name: str) -> dict[str, str]:
    """``{dotted key: comment}`` from ``recipes/<config_name>.yaml`` itself (the comment on a key's line): what
    ``--help`` shows for a key whose schema field carries none (evaluation's recipes keep their comments there)."""
    try:
        lines = (recipes_dir() / f"{config_name}.yaml").read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    out, path = {}, []  # path: (indent, key) of the open mappings above the current line
    for line in lines:
        m = _YAML_KEY.match(line)
        if not m or line.lstrip().startswith(("#", "-")):
            continue
        indent = len(m.group(1))
        while path and path[-1][0] >= indent:
            path.pop()
        key = ".".join([k for _, k in path] + [m.group(2)])
        path.append((indent, m.group(2)))
        if m.group(3):
            out[key] = m.group(3).strip()
    return out


def groups(config_name: str) -> dict[str, list[str]]:
    """The config groups a recipe can pick (``recipes/<group>/*.yaml`` for each group its defaults list names)."""
    from evolm_nemo.config.compose import _default_groups

    root = recipes_dir()
    return {g: sorted(p.stem for p in (root / g).glob("*.yaml")) for g in sorted(_default_groups(config_name))
            if (root / g).is_dir()}


def _compose(config_name: str, overrides: Sequence[str], schema, settings=None):
    """As the command composes it: evaluation's recipes read ``model=`` / ``stage=`` as plain values; a command
    that parses its own ``key=value`` items (``settings``: overrides -> its typed config) is shown as it parses."""
    if settings is not None:
        return settings(list(overrides))
    make = compose_command if config_name.startswith("eval_") else compose
    return make(config_name, overrides, schema)


def render_help(command: str, config_name: str, overrides: Sequence[str], schema, settings=None) -> str:
    cfg = _compose(config_name, overrides, schema, settings)
    yaml_comments = recipe_comments(config_name)
    rows = [(k, v, c or yaml_comments.get(k, "")) for k, v, c in key_lines(cfg)]
    width = min(max(len(k) + len(v) + 2 for k, v, _ in rows), 60)
    given = f" with {' '.join(overrides)}" if overrides else " (defaults)"
    kind = "key=value overrides" if settings is not None else "Hydra overrides"
    out = [f"usage: evolm {command} [key=value ...]   (recipe: recipes/{config_name}.yaml, {kind})", "",
           f"keys{given}:"]
    for key, value, comment in rows:
        text = f"{key}={value}"
        out.append(f"  {text:<{width}}  # {comment}" if comment else f"  {text}")
    picks = groups(config_name)
    if picks:
        out += ["", "config groups (pick one: group=name):"]
        out += [f"  {g}: {', '.join(names)}" for g, names in picks.items()]
    out += ["", f"`evolm {command} ... --cfg job` prints the composed recipe as YAML."]
    return "\n".join(out)


def render_job(config_name: str, overrides: Sequence[str], schema, settings=None) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(_compose(config_name, overrides, schema, settings))).rstrip()
