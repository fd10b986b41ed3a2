"""tools/benchmark_data.py on three generated images: its JSON, and that both pipelines make the same picture."""
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detection.datasets import DetectionDataset, load_coco_records
from detection.transforms import build_det_transforms
from engine.sampling import SeededDataset
from experiments import data_benchmark as lib

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_data", ROOT / "tools" / "benchmark_data.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_data"] = bench
_spec.loader.exec_module(bench)

# (width, height) whose 800 / 1333 resize is a whole number of pixels, so floor (torchvision) == round (ours)
SIZES = [(120, 80), (80, 120), (60, 60)]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Three PNGs (lossless: every decoder must give the same pixels) with a colour gradient that tells left from
    right and red from blue, one box each."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    images, annotations = [], []
    for image_id, (width, height) in enumerate(SIZES, start=1):
        x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
        rgb = np.stack([255 * x, 255 * y, np.full_like(x, 40)], axis=2).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "bbox": [2, 3, width // 2, height // 3]})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": [{"id": 1, "name": "thing"}]}))
    return root


@pytest.fixture(scope="module")
def result(coco, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "benchmark_data.json"
    bench.main(["--data", str(coco), "--images", "images", "--annotations", "ann.json", "--rounds", "1",
                "--profile", "--out", str(out)])
    return json.loads(out.read_text())


def test_json_schema(result):
    for side in ("ours", "torchvision", "torchvision_without_model_resize"):
        assert result[side]["images_per_s"] > 0 and len(result[side]["round_seconds"]) == 1
    assert result["ratio"] == pytest.approx(result["ours"]["images_per_s"] / result["torchvision"]["images_per_s"])
    assert set(result["ours"]["stages_ms_per_image"]) == set(lib.STAGES)
    stages = result["ours"]["stages_ms_per_image"]
    # boxes_and_albumentations is the albumentations call less a re-timed resize and flip: noise can make it < 0
    assert all(ms >= 0 for stage, ms in stages.items() if stage != "boxes_and_albumentations")
    assert result["settings"] | {"num_images": 3, "min_size": 800, "max_size": 1333, "flip_prob": 0.5,
                                 "batch_size": 2, "threads": 1, "num_workers": 0} == result["settings"]
    assert {"cpu", "cores", "torch", "torchvision", "opencv", "pillow"} <= set(result["hardware"])
    values = 3 * (2 * 1200 * 800 + 800 * 800)  # 3 channels of 1200x800, 800x1200 and 800x800
    assert result["shapes"] == {"images": 3, "same_shape": 3, "max_side_difference_px": 0,
                                "ours_pixels": values, "torchvision_pixels": values}
    assert f"**{result['ratio']:.2f}x**" in bench.to_markdown(result)


def test_profiled_alternatives_give_our_bits(result):
    """Every decoder and float conversion the profile times is a drop-in: the same bits as the default path."""
    for group in ("decode", "to_float"):
        variants = result["profile"][group]
        assert len(variants) >= 3 and all(v["same_bits_as_ours"] for v in variants.values()), variants
    assert all(v["ms_per_image"] > 0 for v in result["profile"]["resize"].values())


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_both_pipelines_make_the_same_picture(coco, flip_prob):
    """Same image in, same-shaped float32 [3, H, W] tensors out, the same picture to within the rounding of
    OpenCV's uint8 bilinear resize against torch's float one, boxes scaled and flipped alike."""
    records, _, _ = load_coco_records(coco / "images", coco / "ann.json")
    ours = SeededDataset(DetectionDataset(records, build_det_transforms(True, [800], 1333, flip_prob=flip_prob)))
    theirs = lib.TorchvisionReference(records, 800, 1333, flip_prob)
    for index, (width, height) in enumerate(SIZES):
        image, target = ours[(index, 0)]
        their_image, their_target = theirs[index]
        scale = 800 / min(width, height)
        assert image.shape == their_image.shape == (3, round(height * scale), round(width * scale))
        assert image.dtype == their_image.dtype == torch.float32 and image.is_contiguous()
        assert (image - their_image).abs().mean() < 0.01
        torch.testing.assert_close(target["boxes"], their_target["boxes"].as_subclass(torch.Tensor))
