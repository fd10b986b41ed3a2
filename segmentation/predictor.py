"""Put a trained segmentation model to work: images in, class masks at the original size out.

Evaluation runs at full resolution (no resize), with `eval.scales` / `eval.flip` averaging as in
tools/test_seg.py; the predictor does exactly that, so its masks are the ones the run was scored on.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from pycocotools import mask as mask_utils

from backbones import fold_batchnorm
from datafiles.images import ImageInput, as_rgb_array, image_to_tensor
from engine.trained import build_trained_model, load_run_config

from .build import DEFAULT_CONFIG
from .datasets import COCO_TO_VOC
from .evaluation import multiscale_flip_inference
from .models import build_segmentation_model
from .palette import VOC_SEG_CLASSES
from .synthetic import SHAPES_SEG_CLASSES

logger = logging.getLogger(__name__)


@dataclass
class Segmentation:
    """One image's prediction at its original size: `mask` [H, W] uint8 class indices (0 = background),
    `confidence` [H, W] float32 the winning class's probability; `class_names` index -> name and
    `category_ids` index -> the data's category id (COCO ids for COCO data read 1..K by id)."""

    mask: np.ndarray
    confidence: np.ndarray
    class_names: list[str]
    category_ids: list[int]

    def to_coco(self, image_id: int) -> list[dict]:
        """One RLE per predicted class (background, index 0, left out), as COCO's stuff-segmentation results,
        scored by the class's mean confidence."""
        results = []
        for index in np.unique(self.mask).tolist():
            if index == 0:
                continue
            region = self.mask == index
            rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": image_id, "category_id": self.category_ids[index], "segmentation": rle,
                            "score": round(float(self.confidence[region].mean()), 5)})
        return results


def label_space(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """Class names (index 0 = background) and each index's category id, without loading the dataset,
    following tools/train_seg.py's build_dataset: VOC layout from the config (ids = indices), COCO from its
    annotation json (all categories by id, or the VOC subset: ids = COCO ids, 0 for background)."""
    data, num_classes = cfg.data, cfg.model.num_classes
    if data.format == "coco" and data.class_mapping == "coco_to_voc":
        names = list(data.class_names or VOC_SEG_CLASSES)
        voc_to_coco = {index: cat for cat, index in COCO_TO_VOC.items()}
        ids = [voc_to_coco.get(k, 0) for k in range(len(names))]
    elif data.format == "coco":
        path = next((Path(data[s].annotations) for s in ("val", "train") if Path(data[s].annotations).is_file()), None)
        if path is None:
            logger.warning("no annotation json found (%s): classes are named class_0..class_%d",
                           data.val.annotations, num_classes - 1)
            names, ids = [f"class_{k}" for k in range(num_classes)], list(range(num_classes))
        else:
            categories = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
            names = ["background"] + [str(c["name"]) for c in categories]
            ids = [0] + [int(c["id"]) for c in categories]
        names = list(data.class_names or names)
    else:
        names = list(data.class_names or (SHAPES_SEG_CLASSES if data.synthetic.enabled is True else VOC_SEG_CLASSES))
        ids = list(range(len(names)))
    if len(names) != num_classes:
        raise ValueError(f"model.num_classes={num_classes} but the data config names {len(names)} classes {names}")
    return names, ids


class Predictor:
    """A trained segmentation run applied to any image.

        predictor = Predictor("outputs/seg_default/config.yaml", "outputs/seg_default/last.pth")
        result = predictor("photo.jpg")                 # or an array, a PIL image, or a list of them

    `fast` folds the BatchNorms into the convolutions and runs channels_last (same masks up to float32
    rounding). Images run one at a time, at full resolution, as tools/test_seg.py evaluates.
    """

    def __init__(self, config: str | Path | DictConfig, checkpoint: str | Path, device: str | torch.device = "cpu",
                 *, fast: bool = True) -> None:
        self.cfg = load_run_config(config, DEFAULT_CONFIG)
        self.device = torch.device(device)
        self.class_names, self.category_ids = label_space(self.cfg)
        model = build_trained_model(build_segmentation_model, self.cfg.model, checkpoint)
        model.eval()
        if fast:
            fold_batchnorm(model).to(memory_format=torch.channels_last)
        self.fast = fast
        self.model = model.to(self.device)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Segmentation | list[Segmentation]:
        """The prediction for one image, or a list for a list of images."""
        single = not isinstance(images, (list, tuple))
        results = []
        for image in [images] if single else images:
            tensor = image_to_tensor(as_rgb_array(image))[None].to(self.device)
            if self.fast:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            log_probs = multiscale_flip_inference(self.model, tensor, tuple(self.cfg.eval.scales), self.cfg.eval.flip)
            confidence, mask = log_probs[0].max(0)
            results.append(Segmentation(mask.to(torch.uint8).cpu().numpy(), confidence.exp().float().cpu().numpy(),
                                        self.class_names, self.category_ids))
        return results[0] if single else results
