"""Every config the project ships loads against its task's default and spec, and a transfer study's stage configs
(each backbone's pretraining and detection runs) load too: a typo in a shipped recipe fails here, not hours into
a user's run."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine.config import CONFIGS_DIR, load_config
from tools import transfer

TASKS = ("cls", "det", "seg", "transfer")
SHIPPED = [path for task in TASKS for path in sorted((CONFIGS_DIR / task).glob("*.yaml"))
           if path.name not in ("default.yaml", "default.spec.yaml")]


def test_every_task_ships_configs():
    assert {path.parent.name for path in SHIPPED} == set(TASKS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads(path: Path):
    cfg = load_config(CONFIGS_DIR / path.parent.name / "default.yaml", path)
    assert cfg.output_dir
    if path.parent.name == "transfer":
        parser = argparse.ArgumentParser()
        parser.error = lambda message: pytest.fail(f"{path.name}: {message}")  # what the tool would exit with
        scratch = list(cfg.backbones) if cfg.scratch is None else list(cfg.scratch)
        transfer.check_stage_configs(parser, cfg, scratch)
