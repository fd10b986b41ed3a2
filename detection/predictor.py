"""Put a trained detector to work: images in, boxes in the original image's pixels out.

The model alone does not resize (its `NormalizeOnlyTransform` leaves that to the datasets), so the predictor
applies the run's test transform (shortest side = max(data.min_size), longest capped at data.max_size, the
same albumentations resize) and maps the boxes back, as `tools/test_det.py` does.
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
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from datafiles.images import ImageInput, as_rgb_array, image_to_tensor
from engine.trained import build_trained_model, load_run_config

from .build import DEFAULT_CONFIG, select_classes
from .datasets import VOC_CLASSES
from .inference import detect, to_original_size
from .fast import optimize_for_inference
from .models import build_detector
from .quantize import calibration_batches, quantize_int8
from .synthetic import SHAPES_CLASSES
from .transforms import build_det_transforms

logger = logging.getLogger(__name__)


@dataclass
class Detections:
    """One image's detections: `boxes` [N, 4] float32 x0, y0, x1, y1 in the original image's pixels,
    `scores` [N], `labels` [N] (1..K, the model's), `names` their class names, `category_ids` the data's ids."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    category_ids: list[int]

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results {image_id, category_id, bbox [x, y, w, h], score}, at full precision: rounding would
        reorder near-tied scores and move AP off the run's own evaluation."""
        xywh = box_convert(torch.from_numpy(self.boxes).double(), "xyxy", "xywh").tolist()
        return [{"image_id": image_id, "category_id": int(c), "bbox": box, "score": float(s)}
                for box, s, c in zip(xywh, self.scores, self.category_ids)]

    def drawn_on(self, image: np.ndarray, threshold: float) -> np.ndarray:
        """`image` (HxWx3 uint8) with the boxes scoring >= threshold, labelled "name score" (torchvision's
        drawing utility)."""
        keep = np.flatnonzero(self.scores >= threshold)
        if not len(keep):
            return image
        drawn = draw_bounding_boxes(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(self.boxes[keep]),
                                    labels=[f"{self.names[i]} {self.scores[i]:.2f}" for i in keep],
                                    colors="orange", width=2)
        return drawn.permute(1, 2, 0).numpy()


def label_space(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """Class names and the data's category id of labels 1..K, without loading the dataset: COCO categories
    from the annotation json the config names (val first), VOC names from the config; category ids are the
    COCO ids, or 1..K for VOC. `data.classes` selects and orders them as training did (`select_classes`)."""
    data, num_classes = cfg.data, cfg.model.num_classes
    names, ids = _data_classes(data)
    if data.classes and names is None:
        names = list(data.classes)
    elif data.classes:  # the selection training made, with its checks (unknown or repeated names)
        _, names, ids = select_classes([], names, ids, list(data.classes))
    if names is None:
        logger.warning("no annotation json found (%s): classes are named class_1..class_%d", data.val.annotations,
                       num_classes)
        names = [f"class_{k}" for k in range(1, num_classes + 1)]
    if len(names) != num_classes:
        raise ValueError(f"model.num_classes={num_classes} but the data config names {len(names)} classes {names}")
    return names, ids or list(range(1, len(names) + 1))


def _data_classes(data: DictConfig) -> tuple[list[str] | None, list[int] | None]:
    """(every class name of the data, their COCO category ids or None for 1..K); (None, None) when unknown."""
    if data.format == "voc":
        return list(data.class_names or VOC_CLASSES), None
    for split in ("val", "train"):
        path = Path(data[split].annotations)
        if path.is_file():
            categories = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
            return [str(c["name"]) for c in categories], [int(c["id"]) for c in categories]
    if data.class_names:
        return list(data.class_names), None
    if data.synthetic.enabled is True:
        return list(SHAPES_CLASSES), None
    return None, None


def test_resize_sides(data: DictConfig) -> tuple[int, int]:
    """(shortest, longest) of the run's test resize: the largest `data.min_size`, capped by `data.max_size`
    (the Predictor's and test_det.py's transform, and the exported models' in-graph resize)."""
    return max(data.min_size), data.max_size


class Predictor:
    """A trained Faster R-CNN run applied to any image.

        predictor = Predictor("outputs/det_default/config.yaml", "outputs/det_default/last.pth")
        detections = predictor("photo.jpg")            # or an array, a PIL image, or a list of them

    `fast` folds the BatchNorms into the convolutions and runs channels_last, `compile` (with `fast`) also
    compiles backbone + FPN (`detection.fast.optimize_for_inference`): the same detections up to float32
    rounding (exact in float64); docs/benchmarks.md has the speed of each. `int8=N` (CPU) instead runs the
    dense parts in int8, calibrated on the first N training images of the run's data (`detection.quantize`):
    faster again, not exact (its AP cost on trained models is in docs/benchmarks.md).
    `eval.scales` / `eval.flip` in the config switch on test-time augmentation, as in test_det.py.
    """

    def __init__(self, config: str | Path | DictConfig, checkpoint: str | Path, device: str | torch.device = "cpu",
                 score_thresh: float | None = None, *, fast: bool = True, compile: bool = False, int8: int = 0) -> None:
        self.cfg = load_run_config(config, DEFAULT_CONFIG)
        self.device = torch.device(device)
        self.class_names, self.category_ids = label_space(self.cfg)
        model = build_trained_model(build_detector, self.cfg.model, checkpoint)
        if score_thresh is not None:
            model.roi_heads.score_thresh = score_thresh
        model.eval()
        if int8:
            if self.device.type != "cpu":
                raise ValueError(f"int8 runs on the CPU, not {self.device}")
            quantize_int8(model, calibration_batches(self.cfg.data, int8, self.cfg.eval.batch_size))
        elif fast:
            optimize_for_inference(model, compile=compile)
        self.model = model.to(self.device)
        self.transform = build_det_transforms(False, *test_resize_sides(self.cfg.data))

    @property
    def score_thresh(self) -> float:
        return self.model.roi_heads.score_thresh

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 HxWx3 -> the resized [0, 1] float tensor the model saw at test time."""
        resized = self.transform(image=image, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))["image"]
        return image_to_tensor(resized)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], batch_size: int | None = None
                 ) -> Detections | list[Detections]:
        """Detections of one image, or a list for a list of images (run `batch_size` at a time)."""
        single = not isinstance(images, (list, tuple))
        arrays = [as_rgb_array(image) for image in ([images] if single else images)]
        batch_size = batch_size or self.cfg.eval.batch_size
        results = []
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start: start + batch_size]
            tensors = [self.preprocess(array) for array in chunk]
            outputs = detect(self.model, [t.to(self.device) for t in tensors], self.cfg.eval.scales, self.cfg.eval.flip)
            for array, tensor, out in zip(chunk, tensors, outputs):
                boxes = to_original_size(out["boxes"].float().cpu(), tensor, array.shape[:2])
                labels = out["labels"].cpu().numpy()
                results.append(Detections(boxes.numpy(), out["scores"].float().cpu().numpy(), labels,
                                          [self.class_names[k - 1] for k in labels],
                                          [self.category_ids[k - 1] for k in labels]))
        return results[0] if single else results
