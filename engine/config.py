"""Experiment configuration: one default YAML per tool is the schema; files and CLI override it.

Merge order is default <- config file (after its ``_base_`` chain) <- ``key=value`` overrides.
Every layer is checked against the default before merging, so a typo fails loudly with a
suggestion instead of silently training with the default value; the merged values are then checked
against the rules in ``default.spec.yaml`` beside the default (engine/config_spec.py): types, null,
ranges and choices, before any data is read.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_spec import check_value, inferred_rule, load_spec

BASE_KEY = "_base_"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the checkout's configs/: every default lives there
if not CONFIGS_DIR.is_dir():  # a non-editable install copies the packages without configs/ (and tools/)
    raise ImportError(f"ResDet runs from its checkout, like torchvision's references: {CONFIGS_DIR} does not exist, so "
                      "this is a copy of the packages without their configs/ (a non-editable `pip install .`?). Clone "
                      "the repository and install it editable (`make install`, or `pip install -e .` in the checkout); "
                      "only `backbones` works on its own")
COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config file or override that does not fit the tool's default schema."""


def load_config(
    default_yaml: str | Path,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> DictConfig:
    """Merge default <- config file <- CLI overrides, validate keys, return the resolved config.

    The result is in struct mode, so code cannot add keys the schema lacks; empty-dict
    defaults (``options: {}``) stay open for free-form keys.
    """
    default = OmegaConf.load(default_yaml)
    schema = OmegaConf.to_container(default, resolve=False)
    layers = _file_layers(Path(config_path)) if config_path is not None else []
    layers += [(COMMAND_LINE, _parse_override(item)) for item in overrides]
    valid_keys = _key_paths(schema)
    spec = load_spec(default_yaml)
    for source, layer in layers:
        _check_layer(layer, schema, source, valid_keys, spec)
    cfg = OmegaConf.merge(default, *(layer for _, layer in layers))
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"Cannot resolve config key '{err.full_key}': {err.msg}") from err
    _check_values(cfg, schema, spec)
    OmegaConf.set_struct(cfg, True)
    _open_free_form(cfg, schema)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, so a run directory records exactly what was trained."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def parse_args(
    description: str, default_yaml: str | Path, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, DictConfig]:
    """The CLI shared by the training tools; config errors exit with a usage message. Overrides may come before
    and after the options; `args.resume` is False, True (`--resume`) or "auto" (`--resume auto`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help="experiment YAML (may use _base_)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                        help="continue the run in OUTPUT_DIR from its last.pth; 'auto': continue it if OUTPUT_DIR "
                             "holds a checkpoint, else start a new run (one command for every restart)")
    parser.add_argument("--overwrite", action="store_true", help="delete the earlier run in OUTPUT_DIR and start anew")
    parser.add_argument("--eval-only", action="store_true", help="evaluate OUTPUT_DIR/last.pth and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(_resume_value_attached(sys.argv[1:] if argv is None else argv))
    return args, config_or_exit(parser, default_yaml, args)


def _resume_value_attached(argv: Sequence[str]) -> list[str]:
    """`--resume auto` as `--resume=auto`, and a bare `--resume` moved last, so that argparse never takes the
    key=value after a bare `--resume` for its value."""
    items, bare_resume, i = [], False, 0
    while i < len(argv):
        if argv[i] == "--resume" and argv[i + 1:i + 2] == ["auto"]:
            items.append("--resume=auto")
            i += 1
        elif argv[i] == "--resume":
            bare_resume = True
        else:
            items.append(argv[i])
        i += 1
    return items + ["--resume"] * bare_resume


def config_or_exit(parser: argparse.ArgumentParser, default_yaml: str | Path, args: argparse.Namespace) -> DictConfig:
    """`load_config` from a tool's parsed `--config` and overrides; a bad config exits with the usage message."""
    try:
        return load_config(default_yaml, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        parser.error(str(err))


def load_task_config(path: str | Path, defaults: Mapping[str, str | Path]) -> tuple[str, DictConfig]:
    """(task, config) of a config file that fits exactly one of the tasks' schemas ({task: default yaml}): each
    task's schema has keys the others lack (detection model.rpn, data.min_size; segmentation model.output_stride,
    data.crop_size), so the one that loads tells the task."""
    loaded, errors = {}, []
    for task, default in defaults.items():
        try:
            loaded[task] = load_config(default, path)
        except ConfigError as error:
            errors.append(f"as {task}: {error}")
    if len(loaded) == 1:
        return next(iter(loaded.items()))
    if not loaded:
        tasks = " nor ".join(f"a {task}" for task in defaults)
        raise ConfigError(f"{path} is neither {tasks} config\n" + "\n".join(errors))
    raise ConfigError(f"{path} fits {'both ' if len(loaded) == 2 else ''}the {' and the '.join(loaded)} schema: use the "
                      "run's config.yaml")


def _file_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The file's ``_base_`` chain (oldest first) followed by the file itself."""
    if path.resolve() in chain:
        raise ConfigError(f"_base_ cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    try:
        layer = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as err:  # one line naming the file and line, not PyYAML's traceback
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    if not isinstance(layer, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = layer.pop(BASE_KEY, None)
    bases = _file_layers(path.parent / base, chain + (path.resolve(),)) if base else []
    return bases + [(str(path), layer)]


def _parse_override(item: str) -> dict:
    """``a.b=value`` with the value parsed as YAML (numbers, lists, null...)."""
    if "=" not in item or not item.split("=", 1)[0]:
        raise ConfigError(f"Override '{item}' on the {COMMAND_LINE} must look like key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except yaml.YAMLError as err:
        raise ConfigError(f"Cannot parse override '{item}' on the {COMMAND_LINE}: {err}") from err


def _check_layer(
    layer: dict, schema: dict, source: str, valid_keys: list[str], spec: dict[str, dict], prefix: str = ""
) -> None:
    """Every key must exist in the schema (unless under a free-form ``{}``) with a matching kind; keys with
    a spec rule are checked after the merge instead (a lone scalar for a ``scalar_ok`` list becomes a list)."""
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(_unknown_key_message(path, source, valid_keys))
        expected = schema[key]
        rule = spec.get(path)
        if rule is None:
            _check_kind(path, expected, value, source)
        elif rule.get("scalar_ok") and value is not None and not isinstance(value, (list, dict)):
            layer[key] = [value]
        if isinstance(expected, dict) and expected and isinstance(value, dict):
            _check_layer(value, expected, source, valid_keys, spec, prefix=f"{path}.")


def _unknown_key_message(path: str, source: str, valid_keys: list[str]) -> str:
    """Suggest the keys nearest to ``path`` (difflib), else keys with the same leaf name."""
    ratios = {key: difflib.SequenceMatcher(None, path, key).ratio() for key in valid_keys}
    cutoff = max(0.6, max(ratios.values(), default=0.0) - 0.1)
    close = sorted((key for key in ratios if ratios[key] >= cutoff), key=ratios.get, reverse=True)
    leaf = path.rsplit(".", 1)[-1]
    close = close or [key for key in valid_keys if key.rsplit(".", 1)[-1] == leaf]
    hint = " or ".join(f"'{key}'" for key in close[:3])
    suggestion = f"; did you mean {hint}?" if close else ""
    return f"Unknown config key '{path}' from {source}{suggestion}"


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "scalar"


def _check_kind(path: str, expected: Any, value: Any, source: str) -> None:
    """Containers stay containers and bool/number defaults stay typed; null and ${...} pass."""
    if expected is None or value is None or (isinstance(value, str) and "${" in value):
        return
    want, got = _kind(expected), _kind(value)
    if want != got and not (want == "scalar" and got in ("bool", "number")):
        raise ConfigError(f"Config key '{path}' from {source} expects a {want}, got {value!r}")


def _check_values(cfg: DictConfig, schema: dict, spec: dict[str, dict], prefix: str = "") -> None:
    """Check every key of the default (free-form ``{}`` sections as a whole) against its spec rule, or the
    default's own type; lone scalars become one-item lists where the rule says ``scalar_ok``."""
    for key, default in schema.items():
        path = f"{prefix}{key}"
        value = OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        if isinstance(default, dict) and default and isinstance(value, dict) and path not in spec:
            _check_values(cfg[key], default, spec, prefix=f"{path}.")
            continue
        try:
            checked = check_value(path, value, spec.get(path) or inferred_rule(default, nullable=not spec))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if checked is not value:
            cfg[key] = checked


def _key_paths(schema: dict, prefix: str = "") -> list[str]:
    """All dotted key paths, sections included, as candidates for suggestions."""
    paths = []
    for key, value in schema.items():
        paths.append(f"{prefix}{key}")
        if isinstance(value, dict):
            paths += _key_paths(value, prefix=f"{prefix}{key}.")
    return paths


def _open_free_form(cfg: DictConfig, schema: dict) -> None:
    """Free-form ``{}`` sections accept any key even though the config is in struct mode."""
    for key, value in schema.items():
        node = cfg.get(key)
        if isinstance(value, dict) and isinstance(node, DictConfig):
            if value:
                _open_free_form(node, value)
            else:
                OmegaConf.set_struct(node, False)
