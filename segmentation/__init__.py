"""Semantic segmentation on ResDet backbones: models, datasets, mIoU, and `Predictor` for trained runs."""
from .predictor import Predictor, Segmentation

__all__ = ["Predictor", "Segmentation"]
