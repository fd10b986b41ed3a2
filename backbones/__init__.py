"""ResDet backbones: one builder, named multi-stage outputs, `output_shape()` for the heads."""
from .base import Backbone, Preprocessing, ShapeSpec, count_macs, count_parameters
from .batch_norm import EvalBatchNorm2d, FrozenBatchNorm2d, convert_frozen_batchnorm, fold_batchnorm, get_norm
from .build import backbone_names, build_backbone
from .weights import LoadReport, load_backbone_weights, save_backbone

__all__ = [
    "Backbone", "EvalBatchNorm2d", "FrozenBatchNorm2d", "LoadReport", "Preprocessing", "ShapeSpec", "backbone_names", "build_backbone",
    "convert_frozen_batchnorm", "count_macs", "fold_batchnorm", "count_parameters", "get_norm", "load_backbone_weights", "save_backbone",
]
