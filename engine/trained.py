"""Loading a finished run (its config.yaml and last.pth) for inference, shared by the two predictors."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .config import load_config

logger = logging.getLogger(__name__)


def load_run_config(config: str | Path | DictConfig, default_yaml: str | Path) -> DictConfig:
    """A run's config.yaml (or any config file, merged over the tool's defaults), or a config already loaded."""
    return config if isinstance(config, DictConfig) else load_config(default_yaml, config)


def model_config_for_inference(model_cfg: Mapping[str, Any]) -> dict:
    """The `model` section with a missing backbone weights file dropped: the checkpoint holds every weight;
    the file is only read (when present) for the preprocessing it records."""
    cfg = dict(model_cfg)
    backbone = dict(cfg["backbone"])
    weights = backbone["weights"]
    if weights and not Path(weights).is_file():
        logger.warning("backbone weights %s not found: assuming the backbone's default preprocessing", weights)
        backbone["weights"] = None
    cfg["backbone"] = backbone
    return cfg


def load_model_state(checkpoint: str | Path) -> dict:
    """The model state of a ResDet checkpoint (key "model"), or a bare state dict."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state.get("model", state)
