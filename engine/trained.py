"""Loading a finished run (its config.yaml and last.pth) for inference: the one way the Predictors, export and the
test and visualize tools load a trained model, so a run whose backbone weights file has moved loads in all of them."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from .checkpoint import CheckpointError, load_model_weights, read_checkpoint
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
    """The model state of a ResDet checkpoint (key "model"), or a bare state dict; an unreadable file is a
    CheckpointError naming it and what is wrong."""
    state = read_checkpoint(checkpoint)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"checkpoint {checkpoint}: holds no model state dict (a ResDet last.pth keeps it "
                              "under 'model'; a bare state dict maps names to tensors)")
    return state


def load_trained_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Fill `model` from a checkpoint (see load_model_state); one that does not fit is refused with counts and
    examples of the tensors that do not fit."""
    load_model_weights(model, load_model_state(checkpoint), checkpoint)


def build_trained_model(build: Callable[[Mapping[str, Any]], nn.Module], model_cfg: Mapping[str, Any],
                        checkpoint: str | Path) -> nn.Module:
    """`build(model_cfg)` (the task's model builder) with the checkpoint's weights, on the CPU in train mode; see
    model_config_for_inference for a backbone weights file that has moved."""
    model = build(model_config_for_inference(model_cfg))
    load_trained_weights(model, checkpoint)
    return model
