"""Compose a recipe with Hydra (YAML under recipes/ + ``key=value`` overrides) and check it against a typed schema.

Every failure becomes a ConfigError that names the offending key and says how to fix it, so the CLI can print one
line and exit before any heavy work.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Sequence, Type, TypeVar

from evolm_nemo.config.errors import ConfigError, first_line

T = TypeVar("T")


def recipes_dir() -> Path:
    """recipes/ at the repository root (override with EVOLM_RECIPES)."""
    env = os.environ.get("EVOLM_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"


def _field_names(schema, dotted: str) -> list[str]:
    """Valid keys under ``dotted`` (a.b) in a dataclass schema, for error messages."""
    cls = _key_type(schema, dotted) if dotted else schema
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _key_type(schema, dotted: str):
    """The type of the key ``dotted`` (a.b) in a dataclass schema, ``Optional[X]`` as ``X``; None if it has none."""
    import typing

    cls = schema
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if typing.get_origin(cls) is typing.Union and len(args) == 1:
            cls = args[0]
    return cls


# 98,2,0 or runs/pt_*,runs/cpt_*: Hydra's grammar reads it as a sweep of values. Quoting it is safe when it holds no
# quote (it would end the quoted string), backslash (escapes a quote), ${...}, or Hydra's list/dict/function syntax
_COMMAS = re.compile(r"[^'\"\\\[\]{}()$=]+(,[^'\"\\\[\]{}()$=]+)+")


def _commas_as_text(overrides: Sequence[str], schema) -> list[str]:
    """``data.split=98,2,0``, a string key given a comma-separated value (megatron's ``--split 98,2,0``, the report's
    globs ``dynamics=runs/pt_*,runs/cpt_*``): quoted, so Hydra takes it as the one string it is -- evolm runs no sweeps,
    and Hydra refused it as an ambiguous sweep. A comma list for a key of another type stays Hydra's to refuse
    (``_translate_hydra``: write a list in ``[...]``)."""
    out = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if eq and _COMMAS.fullmatch(value) and _key_type(schema, key.lstrip("+")) is str:
            item = f"{key}='{value}'"
        out.append(item)
    return out


def _stage_only_keys() -> dict[str, list[str]]:
    """Dotted keys (and sections) the root recipe holds only under some stages -> those stages: what their
    ``recipes/stage/<name>.yaml`` adds (``train.epochs``, ``sft.*``, ``rl.*``, ...)."""
    import yaml

    found: dict[str, list[str]] = {}

    def walk(node, prefix, stage):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            found.setdefault(dotted, []).append(stage)
            if isinstance(value, dict):
                walk(value, dotted + ".", stage)

    for path in sorted((recipes_dir() / "stage").glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:  # an unreadable stage recipe is hydra's to report
            continue
        if isinstance(doc, dict):
            walk(doc, "", path.stem)
    return found


def _unknown_key(schema, key: str, composed=None) -> ConfigError:
    """An override of a key the composed recipe lacks. ``composed``: for the root training recipe, a function giving
    the recipe as composed without that override (None if it does not compose) -- a key that only other stages'
    recipes hold (``train.epochs`` of a pretraining run, ``rl.temperature`` of an SFT run) is named as theirs
    instead of as unknown, whichever way the stage was picked (``stage=``, an experiment)."""
    parent, _, leaf = key.rpartition(".")
    recipe = composed() if composed is not None and leaf in _field_names(schema, parent) else None
    if recipe is not None and recipe.get("stage"):
        stage, owners, section = str(recipe["stage"]), _stage_only_keys(), key.split(".")[0]
        # the key itself, else its section when the recipe lacks the whole section (sft, rl, rm, dpo)
        stages = owners.get(key) or (owners.get(section) if "." in key and section not in recipe else None)
        if stages and stage not in stages:
            return ConfigError(key, f"is a key of stage={'|'.join(stages)} (recipes/stage/), not of stage={stage}; "
                                    "pick one of those stages (stage=<name>) or an experiment of one")
    valid = _field_names(schema, parent)
    top = key.split(".")[0]
    if leaf in valid or (top != key and top in _field_names(schema, "") and _key_type(schema, top) in (dict, Any)):
        # a key of the schema the recipe does not hold (lineage: free-form, empty unless given)
        return ConfigError(key, f"is not in the composed recipe; add it with +{key}=<value>")
    hint = f"valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}" if valid else "check the spelling"
    return ConfigError(key, f"unknown key; {hint}")


def _translate_hydra(exc: Exception, schema, composed=None) -> ConfigError:
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    full = text + ("\n" + str(cause) if cause else "")
    m = re.search(r"Could not override '([^']+)'", full)
    if m:
        inner = re.search(r"not in struct\s+full_key: ([\w.]+)", full)  # the new key inside a dict value given
        key = inner.group(1) if inner and inner.group(1).startswith(m.group(1) + ".") else m.group(1)
        return _unknown_key(schema, key, None if composed is None else lambda: composed(key))
    m = re.search(r"Multiple values for ([\w.]+)\.", full)
    if m:  # +experiment=demo: the group is in the recipe's defaults list already
        return ConfigError(m.group(1), f"is in the recipe's defaults list already; pick it without '+' "
                                       f"({m.group(1)}=<name>)")
    m = re.search(r"Could not append to config\. An item is already at '([^']+)'", full)
    if m:
        return ConfigError(m.group(1), f"is in the recipe already; set it without '+' ({m.group(1)}=<value>)")
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", full)
    if m:
        group, name = m.group(1), m.group(2)
        options = sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))
        return ConfigError(group, f"no recipe '{name}' in recipes/{group}/; available: {', '.join(options)}")
    m = re.search(r"Cannot find primary config '([^']+)'", full)
    if m:
        return ConfigError("recipe", f"no recipe file {m.group(1)}.yaml in {recipes_dir()}")
    m = re.search(r"Ambiguous value for argument '([^'=]+)=([^']*)'", full)
    if m:
        import typing

        key, value = m.group(1).lstrip("+"), m.group(2)
        fix = (f"write the list as {key}=[{value}]" if typing.get_origin(_key_type(schema, key)) is list else
               "give it one value (a command per value)")
        return ConfigError(key, f"{value} is a sweep in Hydra's grammar, and evolm runs one configuration per "
                                f"command; {fix}")
    m = re.search(r"Error parsing override '([^']+)'", full)
    if m:
        return ConfigError(m.group(1), "cannot parse override; write overrides as key=value (e.g. parallel.tp=2)")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ConfigError("recipe", first)


def _unparsable(overrides: Sequence[str]) -> ConfigError | None:
    """The first override Hydra's grammar cannot read (``run.name=${model.name``), named with its key; Hydra's own
    message names none ("mismatched input '{' expecting <EOF>")."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_override(item)
        except Exception as exc:
            key, _, value = item.partition("=")
            return ConfigError(key.lstrip("+~") or item, f"cannot parse {value!r} ({first_line(exc)}); quote a value "
                                                         f"with special characters: key='...'")
    return None


def _translate_omegaconf(exc: Exception, schema) -> ConfigError:
    key = getattr(exc, "full_key", None) or "recipe"
    msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    if "not in" in msg and "Key" in msg:
        return _unknown_key(schema, key)
    m = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m:
        return ConfigError(key, f"expected {m.group(3).lower()}, got {m.group(1)!r}")
    m = re.search(r"field '([^']+)' is not Optional", msg)
    if m:
        return ConfigError(key, "must be set (it cannot be null)")
    return ConfigError(key, msg.splitlines()[0])


def _default_groups(config_name: str) -> set[str]:
    """Config groups named in the defaults list of recipes/<config_name>.yaml (e.g. model, data, experiment)."""
    import yaml

    try:
        doc = yaml.safe_load((recipes_dir() / f"{config_name}.yaml").read_text(encoding="utf-8"))
    except Exception:  # a missing or unreadable primary config is reported by hydra itself
        return set()
    groups = set()
    for entry in (doc or {}).get("defaults", []) if isinstance(doc, dict) else []:
        if isinstance(entry, dict):
            for key in entry:
                groups.add(str(key).replace("optional ", "").replace("override ", "").strip().split("@")[0])
    return groups


BUDGETS = ("train.tokens", "train.iters")  # a training run's length: one or the other


def _one_budget(config_name: str, overrides: Sequence[str]) -> list[str]:
    """On the root training recipe, a budget given on the command line replaces the recipe's other one:
    ``train.tokens=1.6B`` alone trains 1.6B tokens whatever ``train.iters`` the recipe or experiment holds (and
    ``train.iters=N`` alone replaces an experiment's ``train.tokens``); both given stay the user's to settle."""
    overrides = list(overrides)
    if config_name != "config":
        return overrides
    given = {}
    for item in overrides:
        key, _, value = item.lstrip("+").partition("=")
        if key in BUDGETS:
            given[key] = value.strip()
    named = [k for k, v in given.items() if v not in ("", "null", "None")]
    if len(named) == 1 and len(given) == 1:
        other = BUDGETS[1 - BUDGETS.index(named[0])]
        overrides.append(f"{other}=null")
    return overrides


def _check_group_choices(config_name: str, overrides: Sequence[str]) -> None:
    """A ``group=name`` override (``experiment=``, ``model=``, ...) must name a recipe file in recipes/<group>/.
    Hydra itself silently skips a missing choice of an *optional* group (``optional experiment``), so a misspelled
    ``experiment=`` would train the default; refuse it in one line with the closest names."""
    import difflib

    root = recipes_dir()
    groups = _default_groups(config_name)
    for item in overrides:
        key, _, value = item.partition("=")
        group = key.lstrip("+~")
        if group not in groups or not (root / group).is_dir():
            continue
        value = value.strip()
        if value in ("", "null", "None") or value.startswith("["):
            continue
        if (root / group / f"{value}.yaml").is_file():
            continue
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        close = difflib.get_close_matches(value, options, n=3, cutoff=0.6)
        if close:
            hint = f"did you mean {' or '.join(close)}?"
        elif len(options) <= 12:
            hint = f"available: {', '.join(options)}"
        else:
            hint = f"see {root / group}/ for the {len(options)} available"
        raise ConfigError(group, f"no recipe '{value}' in recipes/{group}/; {hint}")


def _hydra(config_name: str, overrides: Sequence[str]):
    """Hydra's composition of ``recipes/<config_name>.yaml`` with ``overrides`` (a DictConfig)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _without(config_name: str, overrides: Sequence[str]):
    """``key -> the recipe composed without the overrides of key`` (a plain dict; None if it does not compose):
    what an error about that key is judged against."""

    def recipe(key: str):
        rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
        try:
            from omegaconf import OmegaConf

            return OmegaConf.to_container(_hydra(config_name, rest))
        except Exception:  # another error of the same command line: the key is judged without a recipe
            return None

    return recipe


def compose(config_name: str, overrides: Sequence[str], schema: Type[T]) -> T:
    """Compose ``recipes/<config_name>.yaml`` with ``overrides`` and return a ``schema`` instance."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if item.startswith("~"):  # the recipe would lose the key and the schema's default stand in, unseen
            raise ConfigError(key, "removing a key (Hydra's ~key) is not supported: every key of the recipe has a "
                                   "value; set the one you want (key=<value>, or key=null where null is allowed)")
        if "=" not in item:
            raise ConfigError(item, "overrides are key=value (e.g. parallel.tp=2 or experiment=pretrain_1b_160b)")
        if re.match(r"hydra([./]|$)", key):  # Hydra applies them to its runtime config, which nothing here reads
            raise ConfigError(key, "Hydra's runtime settings are not used: evolm composes recipes with Hydra's API "
                                   "and changes no directory, writes no .hydra/ and runs no launcher or sweeper; "
                                   "where a command writes is its own key (run.out_dir, out, output, dst: --help)")
    if os.environ.get("EVOLM_RECIPES") and not recipes_dir().is_dir():
        raise ConfigError("EVOLM_RECIPES", f"{recipes_dir()} is not a directory (the recipes/ to compose from); unset "
                                           "it to use the repository's")
    _check_group_choices(config_name, overrides)
    overrides = _one_budget(config_name, _commas_as_text(overrides, schema))
    try:
        raw = _hydra(config_name, overrides)
    except Exception as exc:  # hydra raises several exception types; all become one line
        raise _unparsable(overrides) or _translate_hydra(
            exc, schema, _without(config_name, overrides) if config_name == "config" else None) from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        _check_interpolations(merged)
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _translate_omegaconf(exc, schema) from None


def _check_interpolations(cfg) -> None:
    """Each ``${...}`` of the composed recipe resolves, else a ConfigError naming its key (``run.out_dir:
    ${oc.env:SCRATCH}/x: Environment variable 'SCRATCH' not found``); OmegaConf's own error names no key."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def walk(node, key):  # a list's items under the list's key (the one an override sets)
        names = [k for k, _ in node.items_ex(resolve=False)] if isinstance(node, DictConfig) else range(len(node))
        for name in names:
            dotted = (f"{key}.{name}" if key else str(name)) if isinstance(node, DictConfig) else key
            if OmegaConf.is_missing(node, name):  # ??? (reading it raises): the schema's check names it
                continue
            try:
                child = node[name]  # resolves this value if it is an interpolation (a section's own are lazy)
            except OmegaConfBaseException as exc:
                raw = OmegaConf.to_container(node, resolve=False)[name]
                raise ConfigError(dotted, f"{raw}: {first_line(exc).rstrip('.')}") from None
            if isinstance(child, (DictConfig, ListConfig)) and not OmegaConf.is_interpolation(node, name):
                walk(child, dotted)  # (a None section reads as None)

    walk(cfg, "")


def compose_command(config_name: str, overrides: Sequence[str], schema: Type[T]) -> T:
    """:func:`compose` for a command whose keys share a name with a recipes/ config group (`evolm eval`'s ``model=``,
    ``stage=``): those are plain values, set after composing -- Hydra would read ``model=<dir>`` as picking a
    recipes/model/*.yaml."""
    plain = {f.name for f in dataclasses.fields(schema) if (recipes_dir() / f.name).is_dir()}
    later, rest = {}, []
    for item in overrides:
        key, _, value = item.lstrip("+").partition("=")
        if key in plain:
            later[key] = value.strip("'\"") or None
        else:
            rest.append(item)
    cfg = compose(config_name, rest, schema)
    for key, value in later.items():
        setattr(cfg, key, value)
    return cfg


def to_dict(cfg) -> dict:
    """Plain-dict view of a composed config (for logs, checkpoints and lineage)."""
    return dataclasses.asdict(cfg)


def changed_keys(recorded: dict, ours: dict) -> list[tuple[str, object, object]]:
    """``(key, recorded value, ours)`` for each dotted key of ``ours`` (``section.name`` or a top-level ``name``)
    whose value differs in ``recorded``, a config as a checkpoint records it (``to_dict``); keys the record lacks
    (checkpoints from before a key existed) are not compared."""
    changed = []
    for key, value in ours.items():
        section, _, name = key.rpartition(".")
        where = recorded.get(section, {}) if section else recorded
        if isinstance(where, dict) and name in where and where[name] != value:
            changed.append((key, where[name], value))
    return changed
