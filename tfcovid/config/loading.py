"""Reading an experiment: YAML files (a key given twice is an error), ``--set KEY=VALUE``
assignments and command-line flags merged over the defaults, the offline demo preset, then
typed and validated into an :class:`~tfcovid.config.schema.Experiment`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from tfcovid.config.checks import class_weight_value, validate
from tfcovid.config.schema import (
    DEMO_MULTILABEL,
    DEMO_PRESET,
    NULLABLE,
    SECTIONS,
    TOP_LEVEL,
    ConfigError,
    Experiment,
)
from tfcovid.utils.text import clip, escape, shown

# Configs are a few hundred bytes; a larger file is a mistake (or an attack), refused unread.
MAX_CONFIG_BYTES = 1 << 20


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def merge(base: dict, update: Mapping, where: str = "config") -> dict:
    """Deep-merge ``update`` into a copy of ``base``, rejecting unknown sections and keys."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in update.items():
        if key in TOP_LEVEL:
            out[key] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: section '{key}' must be a mapping, got {shown(value)}.")
            names = [f.name for f in dataclasses.fields(SECTIONS[key])]
            for sub, subvalue in value.items():
                if sub not in names:
                    raise ConfigError(
                        f"{where}: unknown key {shown(f'{key}.{sub}')}.{_suggest(str(sub), names)} "
                        f"Valid keys in '{key}': {', '.join(names)}."
                    )
                out.setdefault(key, {})[sub] = subvalue
        else:
            valid = list(TOP_LEVEL) + list(SECTIONS)
            raise ConfigError(
                f"{where}: unknown key {shown(str(key))}.{_suggest(str(key), valid)} Valid top-level keys: "
                f"{', '.join(valid)}."
            )
    return out


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _AliasRefused(yaml.composer.ComposerError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    without a word: `lr: 0.01` then `lr: 0.02` trained at 0.02) and every alias (``*name``):
    nine nested aliases in 1 KB ("billion laughs") expand to 10**9 values, and configs are
    small enough to write out."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(None, None, f"alias *{escape(clip(event.anchor, 40))} refused: tfcovid "
                                "does not expand YAML aliases (*name, <<: *name) in configs; write "
                                "the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:  # unhashable: PyYAML's own error
                raise _DuplicateKey(
                    "while reading a mapping", node.start_mark,
                    f"key {shown(key)} is given twice (also on line {seen[key] + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """Read a config file; a missing file or invalid YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes: not a tfcovid config "
                          "(they are a few hundred bytes).")
    try:
        data = yaml.load(raw.decode("utf-8-sig"), Loader=_UniqueKeyLoader) or {}  # safe: SafeLoader's tags only
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    except (_DuplicateKey, _AliasRefused) as err:
        mark = err.problem_mark
        raise ConfigError(f"{path} (line {mark.line + 1}, column {mark.column + 1}): {err.problem}.") from None
    except yaml.constructor.ConstructorError as err:  # e.g. !!python/object/apply:os.system
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: {clip(str(err.problem), 300)}. tfcovid reads plain YAML "
                          "only (yaml.safe_load) and never runs code from config files; remove "
                          "the tag.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {clip(str(err), 1000)}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}.")
    return dict(data)


def overrides_from_flags(flags: Mapping[str, Any]) -> dict:
    """Turn {"train.lr": 0.01, "data.dir": None, ...} into nested overrides, skipping None."""
    out: dict = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        if "." in dotted:
            section, key = dotted.split(".", 1)
            out.setdefault(section, {})[key] = value
        else:
            out[dotted] = value
    return out


def parse_assignments(items: Sequence[str]) -> dict:
    """Turn ``--set`` items such as ``train.lr=0.01`` into nested overrides.

    Values are read as YAML, so ``null``, ``true``, ``[0.5, 1.0]`` and numbers work; keys are
    checked later by :func:`merge` (an unknown key is an error naming the valid ones).
    """
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"Bad --set {shown(item)}: expected KEY=VALUE, e.g. train.lr=0.01 or data.demo_per_class=8.")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else ""  # safe: SafeLoader
        except _AliasRefused as err:
            raise ConfigError(f"Bad --set {shown(item)}: {err.problem}.") from None
        except yaml.YAMLError:
            value = text
        section, dot, sub = key.partition(".")
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else {}
        if sub in fields and isinstance(fields[sub].default, str) and not isinstance(value, (str, Mapping)):
            value = text.strip()  # a string key keeps its text: jit_compile=false, name=123
        if dot:
            out.setdefault(section, {})[sub] = value
        else:
            out[section] = value
    return out


def configs_folder() -> Path:
    """The config files installed with tfcovid: ``tfcovid/configs`` in an installed package, the
    repository's top-level ``configs/`` in a source checkout (and an editable install)."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def installed_configs() -> list[str]:
    """The installed configs' names, sorted: ``demo.yaml``, ``part1/vgg16_first7.yaml``, ..."""
    folder = configs_folder()
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.yaml"))


def find_config(name: str | Path) -> Path:
    """A config file by path or by name: a file that exists wins, else the installed config of
    that name (``part1/vgg16_first7``, with or without ``.yaml`` or a leading ``configs/``)."""
    path = Path(name)
    if path.is_file():
        return path
    available = installed_configs()
    for key in dict.fromkeys((path.as_posix(), path.as_posix().removeprefix("configs/"))):
        for candidate in (key, f"{key}.yaml"):
            if candidate in available:
                return configs_folder() / candidate
    raise ConfigError(f"Config file not found: {name}. It is neither a file here nor an installed "
                      f"config; installed (tfcovid configs lists them): "
                      f"{', '.join(available) or f'none (no {configs_folder()})'}.")


def local_demo_folder() -> Path | None:
    """``./demo`` as an absolute path where it is a folder, else None: ``data.dir: demo`` is
    still the built-in set (whatever folder a run starts in; ``reproduce_tables.sh --smoke``
    relies on it), and ``fit`` says how to train on the folder instead."""
    folder = Path("demo")
    return folder.resolve() if folder.is_dir() else None


def resolve(config_file: str | Path | None = None, flags: Mapping[str, Any] | None = None,
            assignments: Mapping | None = None) -> Experiment:
    """Build the final Experiment: defaults <- [demo preset] <- config file <- --set <- flags.

    ``config_file`` is a path or an installed config's name (:func:`find_config`).
    The demo preset applies when no config file is given and the data is the demo set, so
    `tfcovid fit --backbone vgg16 --freeze first7` runs offline in minutes. ``assignments``
    (from :func:`parse_assignments`) may set a key to None, which flags cannot.
    """
    overrides = overrides_from_flags(flags or {})
    layers: list[tuple[str, Mapping]] = []
    if config_file is not None:
        path = find_config(config_file)
        layers.append((str(path), load_yaml(path)))
    if assignments:
        layers.append(("--set", assignments))
    layers.append(("command-line flags", overrides))

    tree: dict = {}
    for where, layer in layers:
        tree = merge(tree, layer, where)
    if config_file is None and str(tree.get("data", {}).get("dir", "demo")) == "demo":
        preset = merge({}, DEMO_PRESET, "demo preset")
        if tree.get("data", {}).get("task") == "multilabel":
            preset = merge(preset, DEMO_MULTILABEL, "demo preset")
        tree = merge(preset, tree, "command-line flags")
    if tree.get("data", {}).get("task") == "multilabel" and "loss" not in tree.get("train", {}):
        tree = merge(tree, {"train": {"loss": "bce"}})  # "ce" is the binary task's loss
    return from_dict(tree)


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and allowed choices; return it normalised."""
    key = f"{section}.{f.name}" if section else f.name
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"Bad value for '{key}': {shown(value)}. {msg}")

    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise bad("Expected true or false.")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise bad("Expected an integer.")
        return int(number)
    if isinstance(default, float):
        if value is None and f.name in NULLABLE:
            return None
        number = _number(value)
        if number is None:
            raise bad("Expected a number" + (" or null." if f.name in NULLABLE else "."))
        if not math.isfinite(number):
            raise bad("Expected a finite number (not NaN or infinity).")
        return number
    if isinstance(default, tuple) and default and isinstance(default[0], float):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise bad("Expected two numbers, e.g. [0.08, 1.0].")
        lo, hi = _number(value[0]), _number(value[1])
        if lo is None or hi is None:
            raise bad("Expected two numbers, e.g. [0.08, 1.0].")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise bad("Expected finite numbers with 0 < low <= high.")
        return (lo, hi)
    if isinstance(default, tuple):
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise bad("Expected a non-empty list of non-empty names, e.g. [covid-19, normal, pneumonia].")
        if len(set(value)) != len(value):
            raise bad("Names must be unique.")
        return tuple(value)
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping) or not value:
            raise bad("Expected a mapping of folder name -> list of labels.")
        out = {}
        for folder, labels in value.items():
            if isinstance(labels, str):
                labels = [labels]
            if not isinstance(labels, (list, tuple)) or not all(isinstance(v, str) for v in labels):
                raise bad(f"Folder {shown(folder)} must map to a list of label names.")
            out[str(folder)] = tuple(labels)
        return out
    if f.name == "class_weight":  # none | balanced | {name: weight}
        return class_weight_value(value, key)
    if isinstance(default, str):
        if isinstance(value, bool) and f.name == "jit_compile":  # YAML reads `true` as a bool
            return str(value).lower()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("Expected a string.")
        return str(value)
    return value


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a number (bools, lists, None, 'ten').

    Numeric strings are accepted because PyYAML reads ``1e-3`` (no dot) as a string.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def from_dict(tree: Mapping) -> Experiment:
    """Validate a nested dict (as read from YAML) into an Experiment."""
    tree = merge({}, tree)  # rejects unknown keys
    sections = {}
    for name, cls in SECTIONS.items():
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in tree.get(name, {}):
                values[f.name] = _coerce(name, f, tree[name][f.name])
        sections[name] = cls(**values)
    top = {}
    for f in dataclasses.fields(Experiment):
        if f.name in TOP_LEVEL and f.name in tree:
            top[f.name] = _coerce("", f, tree[f.name])
    exp = Experiment(**top, **sections)
    validate(exp)
    return exp
