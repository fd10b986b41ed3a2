"""Value rules for a tool's config: types, null, ranges and choices, checked before anything runs.

A tool's default YAML says which keys exist; ``default.spec.yaml`` beside it says what values they
take, one flat entry per dotted key::

    train.batch_size: {type: int, min: 1}
    train.iters: {type: int, min: 1, nullable: true}
    eval.metric: {choices: [coco, voc07, voc12]}
    data.min_size: {type: list, items: int, min: 1, scalar_ok: true}

Fields: ``type`` (int | float | number | bool | str | list | mapping), ``nullable``, ``choices``,
``min`` / ``max`` (inclusive) and ``above`` (exclusive; for lists they apply to the items), ``items``
(the type of list items), ``min_items`` / ``max_items``, ``scalar_ok`` (a lone scalar becomes a one-item
list: ``data.min_size=800``), ``pattern`` (regex for strings) and ``why`` (appended to the message).
A key without an entry takes the type of its default value, and null only where the default is null
(a tool without a spec file keeps the lenient check: null anywhere).
Entries for keys the default YAML lacks are ignored, so a spec may name keys a tool is adding.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

SPEC_SUFFIX = ".spec.yaml"
FIELDS = {"type", "nullable", "choices", "min", "max", "above", "items", "min_items", "max_items", "scalar_ok",
          "pattern", "why"}
_TYPES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "mapping": lambda v: isinstance(v, dict),
}
_NAMES = {"int": "an integer", "float": "a number", "number": "a number", "bool": "true or false",
          "str": "a string", "list": "a list", "mapping": "a mapping"}


def spec_path(default_yaml: str | Path) -> Path:
    """``configs/det/default.yaml`` -> ``configs/det/default.spec.yaml``."""
    default_yaml = Path(default_yaml)
    return default_yaml.with_name(default_yaml.name.removesuffix(".yaml") + SPEC_SUFFIX)


def load_spec(default_yaml: str | Path) -> dict[str, dict]:
    """The rules beside ``default_yaml`` (empty when it has none)."""
    path = spec_path(default_yaml)
    if not path.is_file():
        return {}
    spec = yaml.safe_load(path.read_text()) or {}
    for key, rule in spec.items():
        unknown = set(rule) - FIELDS
        if unknown:
            raise ValueError(f"{path}: entry {key!r} has unknown field(s) {sorted(unknown)}; valid: {sorted(FIELDS)}")
    return spec


def inferred_rule(default: Any, *, nullable: bool = False) -> dict:
    """The rule for a key without a spec entry: the default's own type (ints also pass as floats).
    A null default says nothing about the type, so anything goes there."""
    for name in ("bool", "int", "float", "str", "list", "mapping"):
        if _TYPES[name](default):
            return {"type": name, "nullable": nullable}
    return {"nullable": True}


def check_value(key: str, value: Any, rule: dict) -> Any:
    """The value, normalised (``scalar_ok``), or ValueError naming the key, the value and what it should be."""
    def fail(problem: str) -> ValueError:
        why = f" ({rule['why']})" if "why" in rule else ""
        return ValueError(f"Config key '{key}' = {value!r}: {problem}{why}")

    if value is None:
        if rule.get("nullable") or (rule.get("choices") and None in rule["choices"]):
            return None
        raise fail(f"must not be null; expected {describe(rule)} (null is allowed only where the default config "
                    "documents it)")
    kind = rule.get("type")
    if kind == "list" and rule.get("scalar_ok") and not isinstance(value, (list, dict)):
        value = [value]
    if "choices" in rule:
        if not any(value == c and type(value) is type(c) for c in rule["choices"]):
            raise fail(f"expected one of {rule['choices']}")
        return value
    if kind is not None and not _TYPES[kind](value):
        raise fail(f"expected {describe(rule)}, got {type(value).__name__}")
    if kind == "list":
        if len(value) < rule.get("min_items", 0) or len(value) > rule.get("max_items", len(value)):
            raise fail(f"expected {describe(rule)}, got {len(value)} item(s)")
        for index, item in enumerate(value):
            if "items" in rule and not _TYPES[rule["items"]](item):
                raise fail(f"item {index} ({item!r}) is not {_NAMES[rule['items']]}")
            _check_range(item, rule, fail)
        return value
    _check_range(value, rule, fail)
    if "pattern" in rule and not re.fullmatch(rule["pattern"], str(value)):
        raise fail(f"expected {describe(rule)}")
    return value


def _check_range(value: Any, rule: dict, fail) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if ("min" in rule and value < rule["min"]) or ("max" in rule and value > rule["max"]) or (
            "above" in rule and value <= rule["above"]):
        raise fail(f"out of range: expected {describe(rule)}")


def describe(rule: dict) -> str:
    """'an integer >= 1 or null', 'one of [coco, voc07]', ... for messages."""
    if "choices" in rule:
        return f"one of {rule['choices']}"
    kind = rule.get("type")
    text = _NAMES.get(kind, "a value")
    if kind == "list":
        sizes = [f"at least {rule['min_items']}" if "min_items" in rule else "",
                 f"at most {rule['max_items']}" if "max_items" in rule else ""]
        size = " and ".join(s for s in sizes if s)
        text = f"a list of {size + ' ' if size else ''}{_NAMES[rule['items']] + 's' if 'items' in rule else 'items'}"
        text = text.replace("an integers", "integers").replace("a numbers", "numbers").replace("a strings", "strings")
        if rule.get("scalar_ok"):
            text += " (or a single value)"
    bounds = [f">= {rule['min']}" if "min" in rule else "", f"> {rule['above']}" if "above" in rule else "",
              f"<= {rule['max']}" if "max" in rule else ""]
    bounds_text = " and ".join(b for b in bounds if b)
    if bounds_text:
        text += f" {'each ' if kind == 'list' else ''}{bounds_text}"
    if "pattern" in rule:
        text += f" matching {rule['pattern']!r}"
    return text + (" or null" if rule.get("nullable") else "")
