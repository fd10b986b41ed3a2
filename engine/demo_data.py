"""The generated demo data of the built-in default runs: used only when asked, written only into its own folder.

`data.synthetic.enabled` is `auto` in every tool's default config: the demo set is used when the built-in
default runs (no `--config`, no data path or format on the command line), and never silently in place of a
user's data. `true` / `false` force it on or off.
"""
from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from .images import DatasetError

OWNER_MARKER = ".resdet-demo-data"  # written first: the folder belongs to the generator, even half-written
DONE_MARKER = "DONE.json"  # what the generators write last (a set made by calling a generator directly)
DATA_KEYS = ("data.root", "data.train.", "data.val.", "data.format")  # overrides that name the user's data


def resolve_demo_data(cfg: DictConfig, args: Namespace) -> bool:
    """Turn `data.synthetic.enabled: auto` into true / false (in `cfg`, so the saved config records it)."""
    setting = cfg.data.synthetic.enabled
    if setting == "auto":
        names_data = any(item.split("=", 1)[0].startswith(DATA_KEYS) for item in args.overrides)
        setting = args.config is None and not names_data
    if not isinstance(setting, bool):
        raise ValueError(f"data.synthetic.enabled={setting!r} must be auto, true or false")
    cfg.data.synthetic.enabled = setting
    return setting


def prepare_demo_data(root: str | Path, generate: Callable[[Path], object]) -> None:
    """Run `generate(root)` (idempotent) unless `root` holds files the generator did not write."""
    root = Path(root)
    owned = (root / OWNER_MARKER).is_file() or (root / DONE_MARKER).is_file()
    if root.is_dir() and any(root.iterdir()) and not owned:
        raise DatasetError(f"data.synthetic.enabled would write the generated demo set into data.root={root}, which "
                           "holds other files: point data.root at a new folder, or set data.synthetic.enabled=false "
                           "to train on the data in it")
    root.mkdir(parents=True, exist_ok=True)
    (root / OWNER_MARKER).touch()
    generate(root)
