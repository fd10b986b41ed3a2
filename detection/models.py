"""Faster R-CNN in the three shapes the ResNet paper and its successors use, on any ResDet backbone.

Everything generic comes from torchvision (FasterRCNN, AnchorGenerator, RPN, RoIHeads,
MultiScaleRoIAlign, FeaturePyramidNetwork, TwoMLPHead, FastRCNNPredictor; the RPN and RoI heads rank
equal scores in index order, `detection.ranking`); this module only adds what torchvision lacks: the C4
res5 box head, the VGG-16 fc6/fc7 head with RoI max-pooling, and the adapter from our named stages.

- `c4`  (ResNet paper, appendix A): RPN and RoI pooling on res4 (stride 16), res5 run per RoI.
- `fpn` (Lin et al. 2017): P2-P6 on res2-res5, multi-level RoIAlign, 2-fc head. Its state dict is
  key-for-key torchvision's `fasterrcnn_resnet50_fpn`, so torchvision's COCO weights evaluate here.
- `vgg` (Ren et al. 2015, the paper's baseline): conv5_3 (stride 16), RoI max-pooling 7x7, fc6/fc7.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, RoIPool
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from backbones import Backbone, Preprocessing, build_backbone
from backbones.build import RESNETS, VGGS

from .ranking import TieOrderedRoIHeads, TieOrderedRPN
from .roi_align import MultiScaleRoIAlign  # torchvision's, with a multi-threaded backward on the CPU

HEADS = ("c4", "fpn", "vgg")


class DetectorBackbone(nn.Module):
    """Our Backbone (`body`), optionally followed by an FPN, in the form torchvision's detectors take:
    an ordered dict of feature maps plus `out_channels`. FPN levels are named p2..p6."""

    def __init__(self, body: Backbone, fpn_channels: int | None = None) -> None:
        super().__init__()
        self.body = body
        shapes = body.output_shape()
        self.fpn = None
        if fpn_channels is None:
            (self.out_channels,) = {spec.channels for spec in shapes.values()}
        else:
            self.fpn = FeaturePyramidNetwork([s.channels for s in shapes.values()], fpn_channels, LastLevelMaxPool())
            self.out_channels = fpn_channels
        self.level_names = [f"p{name.removeprefix('res')}" for name in shapes] + (["p6"] if self.fpn else [])

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        features = self.body(x)
        if self.fpn is None:
            return OrderedDict(features)
        return OrderedDict(zip(self.level_names, self.fpn(features).values()))


class NormalizeOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's batching transform minus its resize: ResDet's datasets resize (with the
    multi-scale / flip augmentation in albumentations), and normalisation follows the weights'
    stored preprocessing (which may be BGR / Caffe-style)."""

    def __init__(self, preprocessing: Preprocessing, size_divisible: int = 32) -> None:
        super().__init__(min_size=0, max_size=0, image_mean=list(preprocessing.pixel_mean),
                         image_std=list(preprocessing.pixel_std), size_divisible=size_divisible)
        self.preprocessing = preprocessing

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():  # torchvision's own check: a uint8 image would normalise to inf / NaN
            raise TypeError(f"Expected input images to be of floating type (in range [0, 1]), but found type "
                            f"{image.dtype} instead")
        return self.preprocessing.normalize(image[None])[0]

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict | None]:
        return image, target


def _float32(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)` in float32 even under autocast (unchanged in float32 / float64 runs)."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float() if x.dtype in (torch.bfloat16, torch.float16) else x)


class Float32OutputRPNHead(RPNHead):
    """torchvision's RPN head whose objectness and box deltas come out in float32 under autocast: bf16's 8-bit
    mantissa in the deltas moves boxes by pixels at a few hundred px (with the box predictor below: a raccoon
    detector lost 3.7 AP, 7 AP75, under bf16; docs/benchmarks.md). MMDetection's `force_fp32` on its heads is the
    same idea. Same parameters and state dict keys as RPNHead."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:  # RPNHead.forward's order, so float32 runs (their backward sums too) stay bit for bit
            t = self.conv(feature)
            logits.append(_float32(self.cls_logits, t))
            deltas.append(_float32(self.bbox_pred, t))
        return logits, deltas


class Float32OutputBoxPredictor(FastRCNNPredictor):
    """torchvision's box predictor (class scores and box deltas) run in float32 under autocast, for the same
    reason. Same parameters and state dict keys as FastRCNNPredictor."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return _float32(super().forward, x)


class Res5BoxHead(nn.Module):
    """The paper's C4 box head: res5 (first block strided) on each 14x14 RoI, then global average pooling."""

    def __init__(self, res5: nn.Module) -> None:
        super().__init__()
        self.res5 = res5
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.res5(x)), 1)


class VGGBoxHead(nn.Module):
    """fc6/fc7 of VGG-16 (with their ImageNet weights when the backbone had them) on 7x7 RoIs."""

    def __init__(self, fc_layers: nn.Module) -> None:
        super().__init__()
        self.fc = fc_layers

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(x, 1))


class SingleLevelRoIPool(nn.Module):
    """RoI max-pooling (Fast R-CNN) on one named feature map, with MultiScaleRoIAlign's call signature
    so torchvision's RoIHeads can use it."""

    def __init__(self, featmap_name: str, output_size: int, stride: int) -> None:
        super().__init__()
        self.featmap_name = featmap_name
        self.pool = RoIPool(output_size, spatial_scale=1.0 / stride)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list) -> Tensor:
        return self.pool(features[self.featmap_name], proposals)


def build_detector(cfg: Mapping[str, Any]) -> FasterRCNN:
    """Faster R-CNN from the `model` section of a detection config (see configs/det/default.yaml).

    `num_classes` counts foreground classes; torchvision's convention (+1 for background) is applied here.
    """
    head = cfg["head"]
    if head not in HEADS:
        raise ValueError(f"model.head={head!r} is not one of {list(HEADS)}")
    bb = cfg["backbone"]
    if head == "c4" and bb["name"] not in RESNETS:
        raise ValueError(f"the c4 head needs a ResNet-family backbone (res5 runs per RoI), got {bb['name']!r}")
    if head == "vgg" and bb["name"] not in VGGS:
        raise ValueError(f"the vgg head needs a VGG backbone (its fc6/fc7 form the box head), got {bb['name']!r}")
    options = dict(bb.get("options") or {})
    if head == "fpn":
        out_features = ("res2", "res3", "res4", "res5")
    elif head == "c4":
        out_features = ("res4",)
    else:
        out_features = ("conv5",)
        options.setdefault("num_classes", 1000)  # build the classifier so fc6/fc7 (and their weights) exist
    body = build_backbone(bb["name"], out_features=out_features, freeze_at=bb["freeze_at"], norm=bb["norm"],
                          weights=bb["weights"], partial_weights=bb.get("partial_weights", False), **options)

    anchor_sizes = tuple(cfg["anchor_sizes"])
    aspect_ratios = tuple(cfg["aspect_ratios"])
    if head == "fpn":
        backbone = DetectorBackbone(body, fpn_channels=cfg["fpn_channels"])
        if len(anchor_sizes) != len(backbone.level_names):
            raise ValueError(f"model.anchor_sizes needs one size per FPN level {backbone.level_names}, got {list(anchor_sizes)}")
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (aspect_ratios,) * len(anchor_sizes))
        roi_pool = MultiScaleRoIAlign(backbone.level_names[:-1], output_size=7, sampling_ratio=2)
        representation = cfg["roi"]["head_dim"]
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, representation)
    else:
        anchors = AnchorGenerator((anchor_sizes,), (aspect_ratios,))
        if head == "c4":
            representation = body.stage_specs["res5"].channels
            box_head = Res5BoxHead(body.pop_res5())
            backbone = DetectorBackbone(body)
            roi_pool = MultiScaleRoIAlign(["res4"], output_size=14, sampling_ratio=0)
        else:
            box_head = VGGBoxHead(body.pop_fc_layers())
            backbone = DetectorBackbone(body)
            roi_pool = MultiScaleRoIAlign(["conv5"], output_size=7, sampling_ratio=0)  # swapped below
            representation = 4096

    rpn, roi = cfg["rpn"], cfg["roi"]
    box_predictor = Float32OutputBoxPredictor(representation, cfg["num_classes"] + 1)
    # built after the box predictor, as FasterRCNN would build its own RPNHead: the same random draws, so the same init
    rpn_head = Float32OutputRPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    model = FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors, rpn_head=rpn_head, box_roi_pool=roi_pool,
        box_head=box_head, box_predictor=box_predictor,
        rpn_pre_nms_top_n_train=rpn["pre_nms_top_n_train"], rpn_pre_nms_top_n_test=rpn["pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=rpn["post_nms_top_n_train"], rpn_post_nms_top_n_test=rpn["post_nms_top_n_test"],
        rpn_batch_size_per_image=rpn["batch_size_per_image"],
        box_batch_size_per_image=roi["batch_size_per_image"], box_score_thresh=roi["score_thresh"],
        box_nms_thresh=roi["nms_thresh"], box_detections_per_img=roi["detections_per_img"],
    )
    # the RPN and RoI heads FasterRCNN built, ranking equal scores in index order (detection.ranking); no new state
    model.rpn.__class__, model.roi_heads.__class__ = TieOrderedRPN, TieOrderedRoIHeads
    if head == "vgg":  # FasterRCNN's constructor only accepts MultiScaleRoIAlign; Fast R-CNN max-pooled
        model.roi_heads.box_roi_pool = SingleLevelRoIPool("conv5", 7, stride=body.output_shape()["conv5"].stride)
    model.transform = NormalizeOnlyTransform(body.preprocessing, size_divisible=body.size_divisibility)
    return model
