"""detection.Predictor / segmentation.Predictor, tools/predict.py and test_det.py's per-class metrics and TTA."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import predict  # noqa: E402
import test_det  # noqa: E402

from datafiles.images import as_rgb_array, read_image  # noqa: E402
from detection import Predictor  # noqa: E402
from segmentation import Predictor as SegPredictor  # noqa: E402
from segmentation.evaluation import multiscale_flip_inference  # noqa: E402
from segmentation.models import build_segmentation_model  # noqa: E402



def val_images(run: Path) -> list[Path]:
    root = run.parent / "shapes"
    return sorted((root / "train").glob("*.png"))


def annotations(run: Path) -> Path:
    return run.parent / "shapes" / "annotations" / "instances_train.json"


def test_predictions_json_scores_the_runs_own_ap(tiny_det_run, tmp_path):
    """The consistency proof: predict the val set, score predictions.json with pycocotools, get metrics.json's AP."""
    out = tmp_path / "pred"
    summary = predict.main(["--config", str(tiny_det_run / "config.yaml"), "--checkpoint", str(tiny_det_run / "last.pth"),
                            "--input", str(val_images(tiny_det_run)[0].parent), "--annotations", str(annotations(tiny_det_run)),
                            "--out", str(out), "--score-thresh", "0.05"])  # = model.roi.score_thresh of the run
    assert summary["unreadable"] == [] and summary["images"] == 4
    gt = COCO(str(annotations(tiny_det_run)))
    predictions = json.loads((out / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= set(gt.getCatIds())
    coco_eval = COCOeval(gt, gt.loadRes(predictions), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    expected = json.loads((tiny_det_run / "metrics.json").read_text())
    assert expected["AP50"] > 0.3, expected  # a model that detects something, or the comparison proves little
    assert coco_eval.stats[0] == pytest.approx(expected["AP"], abs=1e-4)
    assert coco_eval.stats[1] == pytest.approx(expected["AP50"], abs=1e-4)
    assert len(list((out / "rendered").glob("*.jpg"))) == 4


def test_predictor_takes_paths_arrays_and_pil_and_answers_in_original_pixels(tiny_det_run):
    predictor = Predictor(tiny_det_run / "config.yaml", tiny_det_run / "last.pth")
    assert predictor.class_names == ["circle", "square", "triangle"] and predictor.category_ids == [1, 2, 3]
    path = val_images(tiny_det_run)[0]
    array = read_image(path)
    from_path, from_array, from_pil = predictor([path, array, Image.open(path)])
    assert len(from_path) > 0
    for other in (from_array, from_pil):
        np.testing.assert_array_equal(other.boxes, from_path.boxes)
        assert other.names == from_path.names
    # the same picture at twice the size: boxes come back in that image's pixels, i.e. twice as large
    big = predictor(cv2.resize(array, (128, 128), interpolation=cv2.INTER_LINEAR))
    assert isinstance(big.boxes, np.ndarray) and big.boxes.shape[1] == 4
    top, big_top = from_path.boxes[0], big.boxes[0]
    np.testing.assert_allclose(big_top, 2 * top, atol=3.0)
    assert big.names[0] == from_path.names[0]


def test_folded_channels_last_path_gives_the_plain_models_detections(tiny_det_run):
    images = val_images(tiny_det_run)
    fast = Predictor(tiny_det_run / "config.yaml", tiny_det_run / "last.pth", score_thresh=0.3)(images)
    plain = Predictor(tiny_det_run / "config.yaml", tiny_det_run / "last.pth", score_thresh=0.3, fast=False)(images)
    for a, b in zip(fast, plain):
        assert a.names == b.names
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_pil_images_and_files_both_ignore_the_exif_orientation(tmp_path):
    """EXIF orientation 6 (rotate 90° clockwise to view): the one EXIF policy (datafiles.images) reads pixels as
    stored, as the annotations assume, from a file and from a PIL image of it alike."""
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=100)
    from_file = read_image(path)
    assert from_file.shape == (20, 40, 3)
    np.testing.assert_array_equal(as_rgb_array(Image.open(path)), from_file)


def test_cli_takes_files_folders_globs_and_lists_a_bad_file(tiny_det_run, tmp_path):
    images = val_images(tiny_det_run)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in images[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    bad = folder / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["--config", str(tiny_det_run / "config.yaml"), "--checkpoint", str(tiny_det_run / "last.pth"),
            "--out", str(out), "--batch-size", "2", "--input", str(folder), str(images[2]),
            str(images[3].parent / "*4.png"), str(tmp_path / "missing.jpg")]
    summary = predict.main(args)
    assert summary["images"] == 4  # 2 from the folder, 1 file, 1 glob match
    assert len(summary["unreadable"]) == 2
    listed = (out / "unreadable.txt").read_text()
    assert "broken.png" in listed and "missing.jpg" in listed
    entries = json.loads((out / "images.json").read_text())
    assert [e["id"] for e in entries] == [1, 2, 4, 5]  # ids number the inputs in order; 3 is broken.png
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and {p["image_id"] for p in predictions} <= {1, 2, 4, 5}
    assert all(len(p["bbox"]) == 4 and p["score"] >= 0.05 for p in predictions)
    assert len(list((out / "rendered").glob("*.jpg"))) == 4
    with pytest.raises(SystemExit):  # an earlier run's predictions are not overwritten unasked
        predict.main(args)
    assert predict.main([*args, "--overwrite"])["images"] == 4


def test_test_det_writes_per_class_ap_pr_curves_and_the_tta_gain(tiny_det_run, tmp_path):
    common = ["--config", str(tiny_det_run / "config.yaml"), "--checkpoint", str(tiny_det_run / "last.pth")]
    (tmp_path / "plain").mkdir()
    (tmp_path / "tta").mkdir()
    metrics = test_det.main([*common, "--out", str(tmp_path / "plain" / "m.json")])
    per_class = metrics["AP_per_class"]
    assert list(per_class) == ["circle", "square", "triangle"]
    present = [v for v in per_class.values() if not np.isnan(v)]
    assert np.mean(present) == pytest.approx(metrics["AP"], abs=1e-6)  # COCO AP is the mean of the classes' APs
    assert set(metrics["AP50_per_class"]) == set(per_class)
    written = json.loads((tmp_path / "plain" / "m.json").read_text())
    assert written["AP_per_class"].keys() == per_class.keys()
    assert (tmp_path / "plain" / "pr_curves.png").stat().st_size > 0
    tta = test_det.main([*common, "--out", str(tmp_path / "tta" / "m.json"), "eval.scales=[1.0,1.25]", "eval.flip=true"])
    assert tta["tta"]["single_scale"] == pytest.approx(metrics["AP"], abs=1e-9)
    assert tta["tta"]["gain"] == pytest.approx(tta["AP"] - metrics["AP"], abs=1e-9)


def test_flip_tta_merges_both_views_and_is_mirror_symmetric(tiny_det_run):
    """With flip, the image and its mirror are the same two views swapped: the merged detections of the mirror
    are the mirrored detections of the image. And merging keeps the plain view's best detections."""
    from detection.inference import detect

    predictor = Predictor(tiny_det_run / "config.yaml", tiny_det_run / "last.pth", fast=False)
    image = predictor.preprocess(read_image(val_images(tiny_det_run)[0]))
    plain = detect(predictor.model, [image])[0]
    merged, mirrored = detect(predictor.model, [image, image.flip(-1)], scales=[1.0], flip=True)
    assert len(merged["scores"]) > len(plain["scores"])  # the mirrored view added detections
    torch.testing.assert_close(merged["boxes"][:3], plain["boxes"][:3])
    width = image.shape[-1]
    unmirrored = torch.stack([width - mirrored["boxes"][:, 2], mirrored["boxes"][:, 1],
                              width - mirrored["boxes"][:, 0], mirrored["boxes"][:, 3]], dim=1)
    order_a, order_b = merged["scores"].argsort(), mirrored["scores"].argsort()
    torch.testing.assert_close(unmirrored[order_b], merged["boxes"][order_a], atol=1e-3, rtol=0)
    torch.testing.assert_close(mirrored["labels"][order_b], merged["labels"][order_a])


def test_voc_metric_writes_pr_curves_too(tiny_det_run, tmp_path):
    metrics = test_det.main(["--config", str(tiny_det_run / "config.yaml"), "--checkpoint", str(tiny_det_run / "last.pth"),
                             "--out", str(tmp_path / "m.json"), "eval.metric=voc07"])
    assert set(metrics["AP_per_class"]) == {"circle", "square", "triangle"}
    assert (tmp_path / "pr_curves.png").stat().st_size > 0


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> Path:
    """An untrained DeepLabV3+ R18 (fixed seed) saved as a run: config.yaml + last.pth."""
    from engine.config import load_config, save_config
    from segmentation.synthetic import generate_shapes_segmentation

    tmp = tmp_path_factory.mktemp("seg")
    generate_shapes_segmentation(tmp / "shapes")
    cfg = load_config(ROOT / "configs" / "seg" / "default.yaml", overrides=["data.synthetic.enabled=true", f"data.root={tmp / 'shapes'}"])
    save_config(cfg, tmp / "config.yaml")
    torch.manual_seed(0)
    model = build_segmentation_model(cfg.model).eval()
    torch.save({"model": model.state_dict()}, tmp / "last.pth")
    return tmp


def test_segmentation_predictor_gives_masks_at_the_original_size(seg_run):
    predictor = SegPredictor(seg_run / "config.yaml", seg_run / "last.pth")
    assert predictor.class_names == ["background", "circle", "square", "triangle"]
    image = (np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)
    result = predictor(image)
    assert result.mask.shape == (45, 70) and result.mask.dtype == np.uint8 and result.mask.max() < 4
    assert result.confidence.shape == (45, 70) and (result.confidence <= 1).all()
    plain = build_segmentation_model(predictor.cfg.model)
    plain.load_state_dict(torch.load(seg_run / "last.pth", weights_only=True)["model"])
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    expected = multiscale_flip_inference(plain.eval(), tensor).argmax(1)[0].numpy()
    assert (result.mask == expected).mean() > 0.999  # folded + channels_last: the same up to float32 near-ties


def test_cli_on_a_segmentation_run_writes_rle_masks_and_overlays(seg_run, tmp_path):
    images = sorted((seg_run / "shapes" / "JPEGImages").glob("*"))[:2]
    out = tmp_path / "out"
    summary = predict.main(["--config", str(seg_run / "config.yaml"), "--checkpoint", str(seg_run / "last.pth"),
                            "--input", *map(str, images), "--out", str(out)])
    assert summary["task"] == "segmentation" and summary["images"] == 2
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and all(isinstance(p["segmentation"]["counts"], str) for p in predictions)
    assert {p["category_id"] for p in predictions} <= {1, 2, 3}
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == 2 and Image.open(masks[0]).size == Image.open(images[0]).size
    assert len(list((out / "rendered").glob("*.jpg"))) == 2


def test_16_bit_inputs_are_read_as_the_datasets_read_a_16_bit_png(tiny_det_run, tmp_path):
    """A 16-bit picture (the 8-bit one in its high byte, noise in its low byte) as a PNG file (decoded by OpenCV as
    the datasets decode it), a PIL image of mode I;16 or I;16B, or a uint16 array: the 8-bit picture's detections,
    not a white image's."""
    predictor = Predictor(tiny_det_run / "config.yaml", tiny_det_run / "last.pth")
    grey = cv2.cvtColor(read_image(val_images(tiny_det_run)[0]), cv2.COLOR_RGB2GRAY)
    wide = grey.astype(np.uint16) * 256 + np.random.default_rng(0).integers(0, 256, grey.shape, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "16bit.png"), wide)
    assert cv2.imread(str(tmp_path / "16bit.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    big_endian = Image.frombytes("I;16B", wide.shape[::-1], wide.astype(">u2").tobytes())
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"  # which PIL.Image.convert("RGB") turned all white
    expected = predictor(grey)
    assert len(expected) > 0
    for image in (tmp_path / "16bit.png", Image.open(tmp_path / "16bit.png"), big_endian, wide,
                  np.repeat(wide[..., None], 3, axis=2)):
        np.testing.assert_array_equal(as_rgb_array(image), np.repeat(grey[..., None], 3, axis=2))
        np.testing.assert_array_equal(predictor(image).boxes, expected.boxes)
