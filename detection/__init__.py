"""Faster R-CNN on ResDet backbones: models, datasets, evaluation, and `Predictor` for trained runs."""
from .predictor import Detections, Predictor

__all__ = ["Detections", "Predictor"]
