"""Bad input never costs a run, a dataset or a checkpoint (issue 10): one table of bad inputs across the
Python API and the tools, each ending in an early error of the right type whose message names the culprit,
with the data folder byte-for-byte unchanged; then the inputs that must end in a counted skip or the right
result instead. Everything is tiny and in-process (one subprocess row checks a real exit code)."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import backbone_info  # noqa: E402
import export  # noqa: E402
import test_det  # noqa: E402
import train_cls  # noqa: E402
import train_det  # noqa: E402
import train_seg  # noqa: E402
import transfer  # noqa: E402
import visualize_det  # noqa: E402

from backbones import build_backbone, fold_batchnorm  # noqa: E402
from backbones.resnet import ResNet  # noqa: E402
from classification.datasets import build_cls_dataset, validate_dataset  # noqa: E402
from datafiles.images import read_image  # noqa: E402
from datafiles.validation import InvalidFiles  # noqa: E402
from detection import Predictor  # noqa: E402
from detection.datasets import (DatasetError, DetectionDataset, load_coco_records, load_voc_records,  # noqa: E402
                                validate_records)
from detection.models import build_detector  # noqa: E402
from engine.checkpoint import CheckpointError, CheckpointSaveError, load_checkpoint, save_checkpoint  # noqa: E402
from engine.config import ConfigError, load_config, save_config  # noqa: E402
from engine.run_lock import EXIT_IN_USE, LOCK_FILE  # noqa: E402
from engine.trained import load_trained_weights  # noqa: E402
from segmentation.datasets import VOCSegmentation  # noqa: E402

CONFIGS = {tool: ROOT / "configs" / tool / "default.yaml" for tool in ("det", "seg", "cls", "transfer")}


# ------------------------------------------------------------------ tiny datasets written into tmp/data

def png_bytes(width: int = 32, height: int = 24) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), 120, np.uint8))[1].tobytes()


def jpeg_bytes(width: int = 32, height: int = 24) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", noise)[1].tobytes()


def exif_rotated_jpeg(path: Path, width: int = 32, height: int = 24) -> None:
    """Stored width x height, with EXIF orientation 6 (viewers show it rotated: height x width)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (width, height), (200, 10, 10)).save(path, exif=exif)


def gif_bytes(tmp: Path) -> bytes:
    Image.new("P", (32, 24)).save(tmp / "x.gif")
    return (tmp / "x.gif").read_bytes()


BAD_IMAGES: dict[str, Callable[[Path], bytes]] = {
    "truncated_jpeg": lambda tmp: jpeg_bytes()[: len(jpeg_bytes()) // 2],
    "truncated_header": lambda tmp: jpeg_bytes()[:12],
    "zero_bytes": lambda tmp: b"",
    "not_an_image": lambda tmp: b"hello, I am text\n",
    "size_mismatch": lambda tmp: png_bytes(40, 30),
    "gif": gif_bytes,
}


def coco_set(tmp: Path, files: dict[str, bytes] | None = None, images: list[dict] | None = None,
             annotations: list[dict] | None = None, raw_json: str | None = None) -> tuple[Path, Path]:
    """tmp/data/images/<name> + tmp/data/ann.json; by default two 32x24 images with one box each."""
    folder = tmp / "data" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"a.jpg": jpeg_bytes(), "b.png": png_bytes()} if files is None else files
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if images is None:
        images = [{"id": i, "file_name": name, "width": 32, "height": 24} for i, name in enumerate(files, 1)]
    if annotations is None:
        annotations = [{"id": 10 + img["id"], "image_id": img["id"], "category_id": 1, "bbox": [2, 2, 10, 8],
                        "iscrowd": 0, "area": 80} for img in images]
    ann = tmp / "data" / "ann.json"
    ann.write_text(raw_json if raw_json is not None else json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return folder, ann


def det_action(tmp: Path, **kwargs) -> Callable[[], object]:
    folder, ann = coco_set(tmp, **kwargs)

    def run():
        records, _, _ = load_coco_records(folder, ann)
        return validate_records(records, split="train", cache_dir=tmp / "cache", report_dir=tmp / "out")
    return run


def one_bad_image(kind: str) -> Callable[[Path], Callable[[], object]]:
    return lambda tmp: det_action(tmp, files={"a.jpg": BAD_IMAGES[kind](tmp)})


def voc_seg_set(tmp: Path, mask: np.ndarray | None = None, mode: str = "P", image_size=(32, 24)) -> Path:
    root = tmp / "data" / "VOC"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages" / "a.jpg").write_bytes(jpeg_bytes(*image_size))
    mask = np.pad(np.ones((8, 8), np.uint8), ((8, 8), (12, 12))) if mask is None else mask
    Image.fromarray(mask).convert(mode).save(root / "SegmentationClass" / "a.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    return root


def seg_action(tmp: Path, **kwargs) -> Callable[[], object]:
    root = voc_seg_set(tmp, **kwargs)
    return lambda: VOCSegmentation(root, "train", num_classes=4).validate(cache_dir=tmp / "cache")


def image_folder(tmp: Path, classes: dict[str, dict[str, bytes]]) -> Path:
    for cls, files in classes.items():
        (tmp / "data" / "train" / cls).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (tmp / "data" / "train" / cls / name).write_bytes(data)
    return tmp / "data"


def cls_action(tmp: Path, classes: dict[str, dict[str, bytes]]) -> Callable[[], object]:
    root = image_folder(tmp, classes)
    return lambda: validate_dataset(build_cls_dataset("imagefolder", root, "train", None), cache_dir=tmp / "cache")


def tiny_imagenet_escape(tmp: Path) -> Callable[[], object]:
    root = image_folder(tmp, {"n01": {"x.png": png_bytes()}, "n02": {"y.png": png_bytes()}})
    (root / "wnids.txt").write_text("n01\nn02\n")
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "val_annotations.txt").write_text("../../../etc/hostname\tn01\t0\t0\t1\t1\n")
    return lambda: build_cls_dataset("tiny-imagenet", root, "val", None)


def voc_det_escape(tmp: Path) -> Callable[[], object]:
    root = tmp / "data" / "VOC"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("../../../../etc/hostname\n")
    return lambda: load_voc_records(root, "trainval")


# ------------------------------------------------------------------ weights files

def torch_file(path: Path, content: bytes | object) -> Path:
    """`path` holding `content`: bytes as they are, anything else through torch.save."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def weights_file(tmp: Path, content: bytes | dict) -> Path:
    return torch_file(tmp / "weights.pth", content)


def load_weights(content: bytes | dict, name: str = "resnet18") -> Callable[[Path], Callable[[], object]]:
    return lambda tmp: (lambda: build_backbone(name, weights=weights_file(tmp, content)))


# ------------------------------------------------------------------ the table

def config(tool: str, *overrides: str) -> Callable[[Path], Callable[[], object]]:
    return lambda tmp: (lambda: load_config(CONFIGS[tool], None, list(overrides)))


def call(fn: Callable[[], object]) -> Callable[[Path], Callable[[], object]]:
    return lambda tmp: fn


def cli(main: Callable, *argv: str) -> Callable[[Path], Callable[[], object]]:
    """A tool's main(argv) in-process; `{tmp}` in an argument is the test's folder."""
    return lambda tmp: (lambda: main([a.format(tmp=tmp) for a in argv]))


def yaml_with_syntax_error(tmp: Path) -> Path:
    (tmp / "bad.yaml").write_text("train:\n  lr: 0.1\n   epochs: 3\n")  # line 3 indented under a scalar
    return tmp / "bad.yaml"


def existing_checkpoint(tmp: Path) -> Path:
    (tmp / "ckpt.pth").write_bytes(b"")
    return tmp / "ckpt.pth"


def earlier_run(tmp: Path, overrides: tuple[str, ...] = ()) -> Path:
    """tmp/runs/r holding a train_det checkpoint whose saved config is the default (plus `overrides`)."""
    run = tmp / "runs" / "r"
    run.mkdir(parents=True)
    cfg = load_config(CONFIGS["det"], None, ["data.synthetic.enabled=true", f"output_dir={run}", *overrides])
    torch.save({"model": {}, "iteration": 3, "config": OmegaConf.to_container(cfg, resolve=True)}, run / "last.pth")
    return run


def earlier_run_with(tmp: Path, last_pth: bytes | dict) -> Path:
    """earlier_run whose last.pth holds `last_pth` (bytes as they are, a dict merged into the checkpoint's)."""
    run = earlier_run(tmp)
    if not isinstance(last_pth, bytes):
        last_pth = {**torch.load(run / "last.pth", weights_only=True), **last_pth}
    torch_file(run / "last.pth", last_pth)
    return run


def truncated_checkpoint(tmp: Path) -> bytes:
    torch.save({"model": build_backbone("resnet18").state_dict()}, tmp / "whole.pth")
    data = (tmp / "whole.pth").read_bytes()
    return data[: len(data) // 2]


def load_as(loader: Callable[[Path], object], content: Callable[[Path], bytes | object]):
    """`loader(path)` on a checkpoint file holding `content(tmp)`."""
    return lambda tmp: (lambda path: lambda: loader(path))(torch_file(tmp / "ckpt.pth", content(tmp)))


_held_locks: list[int] = []  # the fds of locks a row holds, as another run would (closed with the test process)


def folder_in_use(tmp: Path) -> Path:
    """earlier_run whose folder lock another open file holds, with the holder line a run writes."""
    run = earlier_run(tmp)
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b'{"pid": 4242, "host": "node7", "started": "2026-01-02 03:04:05 +0000"}\n')
    _held_locks.append(fd)
    return run


def disk_full_save(tmp: Path) -> Callable[[], object]:
    """save_checkpoint whose temporary file is /dev/full: every write fails with ENOSPC, as on a full disk."""
    def run():
        with mock.patch("engine.checkpoint.os.fdopen", lambda fd, mode: (os.close(fd), open("/dev/full", mode))[1]):
            save_checkpoint(tmp / "run" / "last.pth", model=torch.nn.Linear(2, 2), epoch=0, iteration=1)
    return run


def denied_save(tmp: Path) -> Callable[[], object]:
    def run():
        with mock.patch("engine.checkpoint.tempfile.mkstemp",
                        side_effect=PermissionError(errno.EACCES, "Permission denied", str(tmp / "run"))):
            save_checkpoint(tmp / "run" / "last.pth", model=torch.nn.Linear(2, 2), epoch=0, iteration=1)
    return run


def trainer(main: Callable, *argv: str, prepare: Callable[[Path], object] = lambda tmp: None):
    """A training tool's main(argv) in-process after `prepare(tmp)`; `{tmp}` in an argument is the test's folder.
    Runs write under tmp/outputs, which the table's test requires to stay absent: no iteration ran."""
    def build(tmp: Path) -> Callable[[], object]:
        prepare(tmp)
        return lambda: main([a.format(tmp=tmp) for a in ["data.num_workers=0", "output_dir={tmp}/outputs/run", *argv]])
    return build


def user_folder(tmp: Path) -> None:
    """A folder of the user's own, e.g. a VOC2012 tree without what the tools would read (not a demo set)."""
    (tmp / "data" / "VOC" / "JPEGImages").mkdir(parents=True)
    (tmp / "data" / "VOC" / "JPEGImages" / "mine.jpg").write_bytes(jpeg_bytes())


def untrained_predictor(tmp: Path) -> Predictor:
    """The default detector, untrained, saved as a run in tmp/predictor (inputs are refused before the model runs)."""
    run = tmp / "predictor"
    run.mkdir()
    cfg = load_config(CONFIGS["det"], None, ["data.synthetic.enabled=true"])
    save_config(cfg, run / "config.yaml")
    torch.save({"model": build_detector(cfg.model).state_dict()}, run / "last.pth")
    return Predictor(run / "config.yaml", run / "last.pth")


def predict(image: Callable[[], object]) -> Callable[[Path], Callable[[], object]]:
    """The Predictor called on `image()`."""
    return lambda tmp: (lambda predictor: lambda: predictor(image()))(untrained_predictor(tmp))


def pil_image(mode: str, dtype: type) -> Image.Image:
    return Image.fromarray(np.arange(24 * 32, dtype=dtype).reshape(24, 32)).convert(mode)


BAD_INPUTS = [
    # --- the training tools: refused before the first iteration, the data folder untouched, no run folder
    ("train_det_demo_into_user_folder", trainer(train_det.main, "data.synthetic.enabled=true",
                                                "data.root={tmp}/data/VOC", prepare=user_folder),
     DatasetError, r"generated demo set into data\.root=.*data/VOC, which holds other files"),
    ("train_det_voc_root_no_config", trainer(train_det.main, "data.format=voc", "data.root={tmp}/data/VOC",
                                             prepare=user_folder), DatasetError, r"VOC/ImageSets/Main/trainval\.txt"),
    ("train_seg_voc_root_no_config", trainer(train_seg.main, "data.format=voc", "data.root={tmp}/data/VOC",
                                             prepare=user_folder), DatasetError, r"data/VOC.*Segmentation"),
    ("train_cls_tiny_imagenet_root", trainer(train_cls.main, "data.format=tiny-imagenet", "data.root={tmp}/data/VOC",
                                             prepare=user_folder), Exception, r"data/VOC/(train|wnids)"),
    ("train_det_into_an_earlier_run", lambda tmp: (earlier_run(tmp), cli(train_det.main, "output_dir={tmp}/runs/r")(tmp))[1],
     FileExistsError, r"runs/r holds an earlier run \(last\.pth\).*--resume.*--overwrite"),
    ("train_det_resume_other_model", lambda tmp: (earlier_run(tmp), cli(
        train_det.main, "--resume", "data.synthetic.enabled=true", "output_dir={tmp}/runs/r",
        "model.backbone.name=resnet34", "train.lr=0.5")(tmp))[1],
     ValueError, r"(?s)model\.backbone\.name: 'resnet18' -> 'resnet34'.*train\.lr: 0\.02 -> 0\.5"),
    ("train_seg_eval_only_without_checkpoint", trainer(train_seg.main, "--eval-only"), FileNotFoundError,
     r"--eval-only: no last\.pth in .*outputs/run"),
    ("train_cls_resume_and_overwrite", trainer(train_cls.main, "--resume", "--overwrite"), ValueError,
     r"--resume .* --overwrite .*choose one"),
    ("train_seg_batch_larger_than_data", trainer(train_seg.main, "data.synthetic.enabled=true", "data.root={tmp}/gen",
                                                 "data.synthetic.num_train=3", "data.synthetic.num_val=1",
                                                 "train.batch_size=4", "data.validate=false"),
     ValueError, r"3 training images make no batch of train\.batch_size=4"),
    ("train_det_fp16_on_cpu", trainer(train_det.main, "data.synthetic.enabled=true", "data.root={tmp}/gen",
                                      "data.synthetic.num_train=2", "data.synthetic.num_val=1", "train.amp=fp16"),
     ValueError, r"train\.amp='fp16'.*needs device=cuda"),
    ("train_det_lr_steps_mixed", trainer(train_det.main, "data.synthetic.enabled=true", "data.root={tmp}/gen",
                                         "data.synthetic.num_train=2", "data.synthetic.num_val=1",
                                         "train.batch_size=2", "train.lr_steps=[0.5,100]"), ValueError, r"lr_steps \[0\.5, 100\] must be all"),
    ("train_det_resume_truncated_checkpoint", lambda tmp: (earlier_run_with(tmp, truncated_checkpoint(tmp)), cli(
        train_det.main, "--resume", "data.synthetic.enabled=true", "output_dir={tmp}/runs/r")(tmp))[1],
     CheckpointError, r"runs/r/last\.pth: the file is damaged or truncated \(\d+ bytes; PytorchStreamReader failed"),
    ("train_det_eval_only_text_checkpoint", lambda tmp: (earlier_run_with(tmp, b"not weights\n"), cli(
        train_det.main, "--eval-only", "data.synthetic.enabled=true", "output_dir={tmp}/runs/r")(tmp))[1],
     CheckpointError, r"runs/r/last\.pth: not a PyTorch checkpoint .*starts with b'not weig'"),
    ("train_det_resume_a_weights_file", lambda tmp: (earlier_run_with(tmp, {"model": None}), cli(
        train_det.main, "--resume", "data.synthetic.enabled=true", "output_dir={tmp}/runs/r")(tmp))[1],
     CheckpointError, r"runs/r/last\.pth: not a checkpoint of a ResDet training tool"),
    ("train_det_resume_other_world_size", lambda tmp: (earlier_run_with(tmp, {"loop": {"world_size": 2}}), cli(
        train_det.main, "--resume", "auto", "data.synthetic.enabled=true", "output_dir={tmp}/runs/r")(tmp))[1],
     ValueError, r"trained by 2 process\(es\), this launch has 1.*--nnodes MIN:MAX is not supported"),
    ("train_det_folder_in_use", lambda tmp: (folder_in_use(tmp), cli(
        train_det.main, "--overwrite", "data.synthetic.enabled=true", "output_dir={tmp}/runs/r")(tmp))[1],
     EXIT_IN_USE, r"runs/r is in use by another run \(pid 4242 on host node7, started 2026-01-02 03:04:05"),
    # --- checkpoint files: training (load_checkpoint), the Predictors, export and the test / visualize tools
    # (engine.trained.build_trained_model: load_trained_weights) name the file and what is wrong, never torch's own advice
    ("ckpt_text_file", load_as(lambda path: load_trained_weights(torch.nn.Linear(2, 2), path),
                               lambda tmp: b"resnet weights\n"), CheckpointError,
     r"ckpt\.pth: not a PyTorch checkpoint \(torch\.save writes a zip archive; this file starts with b'resnet w'"),
    ("ckpt_empty_file", load_as(load_checkpoint, lambda tmp: b""), CheckpointError, r"ckpt\.pth: the file is empty"),
    ("ckpt_truncated", load_as(lambda path: load_trained_weights(build_backbone("resnet18"), path),
                               truncated_checkpoint), CheckpointError, r"ckpt\.pth: the file is damaged or truncated"),
    ("ckpt_pickled_model", load_as(load_checkpoint, lambda tmp: torch.nn.Linear(2, 2)), CheckpointError,
     r"ckpt\.pth: holds pickled Python objects \(torch\.nn\.modules\.linear\.Linear\).*state_dict\(\)"),
    ("ckpt_other_model", load_as(lambda path: load_trained_weights(build_backbone("resnet34"), path),
                                 lambda tmp: {"model": build_backbone("resnet18").state_dict()}), CheckpointError,
     r"\Acheckpoint \S+ckpt\.pth does not fit this model: \d+ of the model's \d+ tensors are missing \(e\.g\. "
     r"layer1\.2\.[^\n]{0,400}\Z"),  # counts and three examples: no key dump
    ("ckpt_other_shapes", load_as(lambda path: load_trained_weights(build_backbone("resnet18", num_classes=10), path),
                                  lambda tmp: {"model": build_backbone("resnet18", num_classes=5).state_dict()}),
     CheckpointError, r"ckpt\.pth does not fit this model: 2 have another shape \(e\.g\. fc\.weight: \(5, 512\) in the "
                      r"file, \(10, 512\) in the model\)"),
    ("ckpt_save_disk_full", disk_full_save, CheckpointSaveError,
     r"cannot write checkpoint \S+run/last\.pth: No space left on device \(ENOSPC\); no earlier checkpoint exists"),
    ("ckpt_save_permission_denied", denied_save, CheckpointSaveError,
     r"cannot write checkpoint \S+run/last\.pth: Permission denied \(EACCES\)"),
    # --- detection data (COCO json, VOC lists): decoded and checked before the first iteration
    ("det_truncated_jpeg", one_bad_image("truncated_jpeg"), DatasetError, r"a\.jpg.*cannot decode.*truncated"),
    ("det_truncated_header", one_bad_image("truncated_header"), DatasetError, r"a\.jpg.*cannot decode"),
    ("det_zero_byte", one_bad_image("zero_bytes"), DatasetError, r"a\.jpg.*empty \(0 bytes\)"),
    ("det_not_an_image", one_bad_image("not_an_image"), DatasetError, r"a\.jpg.*cannot decode"),
    ("det_size_mismatch", one_bad_image("size_mismatch"), DatasetError, r"a\.jpg: image is 40x30.*says 32x24"),
    ("det_gif_opencv_cannot_read", one_bad_image("gif"), DatasetError, r"a\.jpg.*GIF.*OpenCV"),
    ("det_exif_rotated", lambda tmp: (exif_rotated_jpeg(tmp / "r.jpg"), det_action(
        tmp, files={"a.jpg": (tmp / "r.jpg").read_bytes()},
        images=[{"id": 1, "file_name": "a.jpg", "width": 24, "height": 32}]))[1], DatasetError, r"a\.jpg.*EXIF"),
    ("det_file_name_escapes", lambda tmp: det_action(tmp, images=[{"id": 1, "file_name": "../../../etc/hostname"}]),
     DatasetError, r"'\.\./\.\./\.\./etc/hostname'.*outside the image folder"),
    ("det_file_name_absolute", lambda tmp: det_action(tmp, images=[{"id": 1, "file_name": "/etc/hostname"}]),
     DatasetError, r"/etc/hostname.*outside"),
    ("det_image_id_string", lambda tmp: det_action(tmp, images=[{"id": "1", "file_name": "a.jpg"}], annotations=[]),
     DatasetError, r"ann\.json: images entry .*'id' must be an integer"),
    ("det_image_id_duplicate", lambda tmp: det_action(tmp, images=[{"id": 1, "file_name": "a.jpg"},
                                                                   {"id": 1, "file_name": "b.png"}]),
     DatasetError, r"ann\.json: images id 1 appears more than once"),
    ("det_bbox_strings", lambda tmp: det_action(tmp, annotations=[
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": ["1", "2", "3", "4"]}]),
     DatasetError, r"annotation id 5 .*bbox \['1'.*4 numbers"),
    ("det_bbox_negative", lambda tmp: det_action(tmp, annotations=[
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 4]}]), DatasetError, r"annotation id 6.*negative width or height"),
    ("det_category_unknown", lambda tmp: det_action(tmp, annotations=[
        {"id": 7, "image_id": 1, "category_id": 99, "bbox": [1, 1, 4, 4]}]), DatasetError, r"annotation id 7.*99"),
    ("det_category_bool", lambda tmp: det_action(tmp, annotations=[
        {"id": 8, "image_id": 1, "category_id": True, "bbox": [1, 1, 4, 4]}]), DatasetError, r"annotation id 8.*True"),
    ("det_no_annotations", lambda tmp: det_action(tmp, annotations=[]), DatasetError, r"train split.*nothing to learn"),
    ("det_crowd_only", lambda tmp: det_action(tmp, annotations=[
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 1}]),
     DatasetError, r"1 object.*crowd.*nothing to learn"),
    ("det_json_is_a_list", lambda tmp: det_action(tmp, raw_json="[]"), DatasetError, r"ann\.json: not COCO"),
    ("det_json_broken", lambda tmp: det_action(tmp, raw_json="{\"images\": ["), DatasetError, r"ann\.json: cannot read"),
    ("det_image_missing", lambda tmp: det_action(tmp, images=[{"id": 1, "file_name": "gone.jpg"}]),
     DatasetError, r"gone\.jpg does not exist"),
    ("det_voc_split_escapes", voc_det_escape, DatasetError, r"etc/hostname.*outside"),
    # --- segmentation masks
    ("seg_label_out_of_range", lambda tmp: seg_action(tmp, mask=np.full((24, 32), 7, np.uint8)),
     DatasetError, r"a\.png.*label values \[7\]"),
    ("seg_mask_size_mismatch", lambda tmp: seg_action(tmp, mask=np.ones((20, 30), np.uint8)),
     DatasetError, r"a\.jpg: image is 32x24.*a\.png says 30x20"),
    ("seg_mask_rgb", lambda tmp: seg_action(tmp, mode="RGB"), DatasetError, r"a\.png.*mode 'RGB'"),
    ("seg_background_only", lambda tmp: seg_action(tmp, mask=np.zeros((24, 32), np.uint8)),
     DatasetError, r"no foreground.*nothing to learn"),
    # --- classification folders
    ("cls_truncated_png", lambda tmp: cls_action(tmp, {"cat": {"x.png": png_bytes()[:40]}, "dog": {"y.png": png_bytes()}}),
     DatasetError, r"cat/x\.png.*cannot decode"),
    ("cls_one_class", lambda tmp: cls_action(tmp, {"cat": {"x.png": png_bytes()}}), DatasetError, r"1 class.*nothing"),
    ("cls_tiny_imagenet_escape", tiny_imagenet_escape, DatasetError, r"val_annotations\.txt:1.*outside"),
    # --- configs, through load_config with each tool's default YAML
    ("cfg_det_null", config("det", "train.lr=null"), ConfigError, r"'train\.lr' = None.*must not be null"),
    ("cfg_det_float_for_int", config("det", "train.batch_size=8.5"), ConfigError, r"'train\.batch_size' = 8\.5.*integer"),
    ("cfg_det_batch_zero", config("det", "train.batch_size=0"), ConfigError, r"'train\.batch_size' = 0.*>= 1"),
    ("cfg_det_metric_typo", config("det", "eval.metric=coco2"), ConfigError, r"'eval\.metric' = 'coco2'.*voc07"),
    ("cfg_det_backend_typo", config("det", "eval.backend=cocoapi"), ConfigError, r"'eval\.backend'.*pycocotools"),
    ("cfg_det_norm_typo", config("det", "model.backbone.norm=BatchNorm"), ConfigError, r"'model\.backbone\.norm'"),
    ("cfg_det_device", config("det", "device=gpu"), ConfigError, r"'device' = 'gpu'"),
    ("cfg_det_amp", config("det", "train.amp=fp8"), ConfigError, r"'train\.amp' = 'fp8'.*bf16"),
    ("cfg_det_min_size_zero", config("det", "data.min_size=0"), ConfigError, r"'data\.min_size'.*>= 1"),
    ("cfg_det_unknown_key", config("det", "train.lrr=0.1"), ConfigError, r"'train\.lrr'.*did you mean 'train\.lr'"),
    ("cfg_seg_batch_one", config("seg", "train.batch_size=1"), ConfigError, r"'train\.batch_size' = 1.*BatchNorm"),
    ("cfg_seg_head", config("seg", "model.head=deeplab"), ConfigError, r"'model\.head' = 'deeplab'"),
    ("cfg_seg_output_stride", config("seg", "model.output_stride=32"), ConfigError, r"'model\.output_stride' = 32"),
    ("cfg_cls_policy", config("cls", "train.lr_policy=linear"), ConfigError, r"'train\.lr_policy' = 'linear'.*poly"),
    ("cfg_cls_format", config("cls", "data.format=imagenet"), ConfigError, r"'data\.format' = 'imagenet'"),
    ("cfg_cls_string_lr", config("cls", "train.lr='0.1'"), ConfigError, r"'train\.lr' = '0\.1'.*number"),
    ("cfg_transfer_no_backbones", config("transfer", "backbones=[]"), ConfigError, r"'backbones' = \[\].*at least 1"),
    ("cfg_transfer_no_seeds", config("transfer", "seeds=[]"), ConfigError, r"'seeds' = \[\].*at least 1"),
    ("cfg_yaml_syntax", lambda tmp: (lambda: load_config(CONFIGS["seg"], yaml_with_syntax_error(tmp))), ConfigError,
     r"bad\.yaml:3:\d+: YAML syntax error"),
    # --- backbone weights
    ("weights_random_bytes", load_weights(bytes(range(256)) * 8), ValueError, r"weights\.pth.*not a"),
    ("weights_empty_file", load_weights(b""), ValueError, r"weights\.pth.*not a PyTorch checkpoint"),
    ("weights_text_file", load_weights(b"resnet50 weights, honest\n"), ValueError, r"weights\.pth.*not a"),
    ("weights_unrelated", load_weights({"encoder.w": torch.zeros(3, 3)}), ValueError,
     r"weights\.pth: look like an unrecognised net.*0 of its \d+ tensors filled.*conv1\.weight.*encoder\.w.*"
     r"nothing fits"),
    ("weights_other_architecture", load_weights({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}),
     ValueError, r"1 of its 100 tensors filled, 99 missing"),
    ("weights_resnet50_into_resnet18", lambda tmp: load_weights(build_backbone("resnet50").state_dict())(tmp),
     ValueError, r"weights\.pth: look like resnet50 .*bottleneck blocks 3-4-6-3.*not this resnet18.*77 of its 100 "
     r"tensors filled, 23 missing.*188 in the file with no place"),
    ("weights_resnet18_into_plain18", lambda tmp: load_weights(build_backbone("resnet18").state_dict(), "plain18")(tmp),
     ValueError, r"look like resnet18 .*not this plain18.*no place in it.*downsample"),
    ("weights_no_tensors", load_weights({"epoch": 3}), ValueError, r"weights\.pth: holds no tensors"),
    ("weights_missing_file", lambda tmp: (lambda: build_backbone("resnet18", weights=tmp / "nope.pth")),
     FileNotFoundError, r"nope\.pth"),
    # --- model options that cannot work
    ("bb_name_none", call(lambda: build_backbone(None)), ValueError, r"backbone name None is not a name.*resnet18"),
    ("bb_freeze_at_float", call(lambda: build_backbone("resnet18", freeze_at=1.5)), ValueError,
     r"freeze_at=1\.5 must be in \[0, 5\]"),
    ("bb_plain_zero_init", call(lambda: build_backbone("plain18", zero_init_residual=True)), ValueError,
     r"zero_init_residual on a plain net"),
    ("bb_frozen_zero_init", call(lambda: build_backbone("resnet18", norm="FrozenBN", zero_init_residual=True)),
     ValueError, r"zero_init_residual needs a norm with a trainable scale"),
    ("bb_plain_shortcut", call(lambda: build_backbone("plain18", shortcut="A")), ValueError, r"shortcut='A' on a plain"),
    ("bb_basic_groups", call(lambda: ResNet("basic", (1, 1, 1, 1), groups=32)), ValueError, r"groups=32.*bottleneck"),
    ("bb_basic_stride_in_1x1", call(lambda: build_backbone("resnet18", stride_in_1x1=True)), ValueError,
     r"stride_in_1x1 applies to bottleneck"),
    ("bb_fold_preact", call(lambda: fold_batchnorm(build_backbone("preact_resnet18").eval())), ValueError,
     r"pre-activation block.*cannot be folded"),
    ("bb_num_classes_zero", call(lambda: build_backbone("resnet18", num_classes=0)), ValueError, r"num_classes=0"),
    # --- the Predictor's inputs (16-bit images are read, not refused: tests/test_predict.py)
    ("predict_pil_32bit_int", predict(lambda: pil_image("I", np.int32)), TypeError, r"mode 'I' \(32-bit integer"),
    ("predict_pil_float", predict(lambda: pil_image("F", np.float32)), TypeError, r"mode 'F' \(32-bit float"),
    ("predict_float_array", predict(lambda: np.random.default_rng(0).random((24, 32, 3))), TypeError,
     r"dtype float64: expected uint8"),
    ("predict_bool_array", predict(lambda: np.ones((24, 32), bool)), TypeError, r"dtype bool"),
    ("predict_empty_0x0", predict(lambda: np.zeros((0, 0, 3), np.uint8)), ValueError, r"image is empty \(0x0 pixels"),
    ("predict_empty_0xN", predict(lambda: np.zeros((0, 7), np.uint8)), ValueError, r"image is empty \(7x0 pixels"),
    ("predict_empty_pil", predict(lambda: Image.new("RGB", (5, 0))), ValueError, r"image is empty \(5x0 pixels"),
    ("predict_rgba_array", predict(lambda: np.zeros((24, 32, 4), np.uint8)), ValueError, r"shape \(24, 32, 4\)"),
    ("model_uint8_tensor", lambda tmp: (lambda model: lambda: model([torch.zeros(3, 24, 32, dtype=torch.uint8)]))(
        untrained_predictor(tmp).model), TypeError, r"floating type.*torch\.uint8"),
    # --- tools' own arguments
    ("tool_backbone_info_size_0", cli(backbone_info.main, "resnet18", "--size", "0"), 2, r"--size.*positive"),
    ("tool_backbone_info_size_neg", cli(backbone_info.main, "resnet18", "--size", "-4"), 2, r"--size.*-4"),
    ("tool_backbone_info_too_small", cli(backbone_info.main, "vgg16", "--size", "8"), 2, r"vgg16: input 8x8 is too small"),
    ("tool_visualize_num_negative", cli(visualize_det.main, "--gt", "--out", "{tmp}/vis", "--num", "-1"), 2,
     r"--num must be at least 1, got -1"),
    ("tool_test_det_out_missing_folder", lambda tmp: cli(test_det.main, "--checkpoint", str(existing_checkpoint(tmp)),
                                                         "--out", "{tmp}/missing/m.json")(tmp), 2,
     r"--out .*missing/m\.json: folder .*missing does not exist"),
    ("tool_test_det_no_checkpoint", cli(test_det.main, "--checkpoint", "{tmp}/none.pth"), 2, r"none\.pth: no such file"),
    ("tool_test_det_bad_metric", lambda tmp: cli(test_det.main, "--checkpoint", str(existing_checkpoint(tmp)),
                                                 "eval.metric=map")(tmp), 2, r"'eval\.metric' = 'map'"),
    ("tool_test_det_int8_compile", cli(test_det.main, "--checkpoint", "{tmp}/none.pth", "--int8", "--compile"), 2,
     r"--int8 is its own fast form: it does not combine with --no-fast or --compile"),
    ("tool_test_det_int8_no_images", cli(test_det.main, "--checkpoint", "{tmp}/none.pth", "--int8",
                                         "--calibration-images", "0"), 2, r"--calibration-images must be >= 1, got 0"),
    ("tool_export_check_count_negative", cli(export.main, "--config", "{tmp}/c.yaml", "--checkpoint", "{tmp}/l.pth",
                                              "--format", "onnx", "--out", "{tmp}/m.onnx", "--check-count", "-1"), 2,
     r"--check-count must be >= 0, got -1"),
    ("tool_export_whole_model_torch_export", cli(export.main, "--config", "{tmp}/c.yaml", "--checkpoint", "{tmp}/l.pth",
                                                  "--format", "torch_export", "--out", "{tmp}/m.pt2"), 2,
     r"--backbone-only goes with --format torch_export.*onnx or torchscript"),
    ("tool_export_overrides_after_check_images", cli(export.main, "--config", str(CONFIGS["det"]), "--checkpoint",
                                                      "{tmp}/l.pth", "--format", "onnx", "--out", "{tmp}/m.onnx",
                                                      "--check-images", "{tmp}", "data.min_size=[256]"), 2,
     r"--check-images data\.min_size=\[256\]: no such file or folder \(key=value overrides go before"),
    ("tool_transfer_no_seeds", cli(transfer.main, "seeds=[]"), 2, r"'seeds' = \[\]"),
    ("tool_transfer_detection_typo", cli(transfer.main, "det.overrides=[train.lrr=0.1]"), 2,
     r"resnet18 detection \(pretrained\) stage: Unknown config key 'train\.lrr'.*'train\.lr'"),
    ("tool_transfer_per_backbone_typo", cli(transfer.main, "per_backbone={{plain18: {{cls: [train.epochz=1]}}}}"), 2,
     r"plain18 pretraining stage: Unknown config key 'train\.epochz'"),
    ("tool_det_yaml_syntax", lambda tmp: cli(train_det.main, "--config", str(yaml_with_syntax_error(tmp)))(tmp), 2,
     r"bad\.yaml:3:\d+: YAML syntax error: mapping values are not allowed"),
]


def tree_digest(folder: Path) -> str:
    """Hash of every path and file content under `folder`: proves a check wrote nothing there."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")) if folder.exists() else []:
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("build, expected, culprit", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_refused_early_naming_the_culprit(tmp_path, monkeypatch, capsys, build, expected, culprit):
    monkeypatch.chdir(tmp_path)  # tools' relative defaults (outputs/, .cache/) land in tmp, never in the checkout
    monkeypatch.setenv("RESDET_CACHE", str(tmp_path / "cache"))
    action = build(tmp_path)
    before = tree_digest(tmp_path / "data")
    if isinstance(expected, int):
        with pytest.raises(SystemExit) as exit_info:
            action()
        assert exit_info.value.code == expected
        message = capsys.readouterr().err
    else:
        with pytest.raises(expected) as error_info:
            action()
        message = str(error_info.value)
    assert re.search(culprit, message, re.S), message
    assert "weights_only=False" not in message
    assert tree_digest(tmp_path / "data") == before, "the check wrote into the data folder"
    assert not (tmp_path / "outputs").exists(), "a refused run must not create its output folder"


def test_the_table_has_at_least_30_bad_inputs():
    assert len(BAD_INPUTS) >= 30 and len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


def test_cli_exit_code_in_a_real_process():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "backbone_info.py"), "resnet18", "--size", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--size" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ failed saves lose nothing

def test_a_full_disk_loses_neither_a_checkpoint_nor_the_final_evaluation(tmp_path, monkeypatch, caplog):
    """ENOSPC at the first checkpoint: the run stops naming the file and the cause, and, no checkpoint existing, the
    same command starts anew (no --overwrite needed). ENOSPC at the final save: metrics.json is written first, the
    error follows, and the previous last.pth is intact."""
    argv = ["data.synthetic.enabled=true", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}",
            "data.num_workers=0", "data.synthetic.num_train=8", "data.synthetic.num_val=2",
            "data.synthetic.image_size=64", "data.min_size=[64]", "data.max_size=64",
            "model.anchor_sizes=[8,16,32,64,128]", "model.rpn.post_nms_top_n_test=50", "train.batch_size=2",
            "train.iters=4", "train.checkpoint_every=2", "train.log_every=1", "eval.every=0"]
    fdopen, saves = os.fdopen, []

    def disk_full_from(first_failing: int):
        def open_for_save(fd, mode):  # the temporary checkpoint file: /dev/full from the `first_failing`-th save on
            saves.append(fd)
            if len(saves) < first_failing:
                return fdopen(fd, mode)
            os.close(fd)
            return open("/dev/full", mode)
        return open_for_save

    monkeypatch.setattr("engine.checkpoint.os.fdopen", disk_full_from(1))
    with pytest.raises(CheckpointSaveError, match=r"run/last\.pth: No space left on device \(ENOSPC\); no earlier"):
        train_det.main(argv)
    assert not (tmp_path / "run" / "last.pth").exists() and (tmp_path / "run" / "history.jsonl").is_file()

    saves.clear()
    monkeypatch.setattr("engine.checkpoint.os.fdopen", disk_full_from(2))
    with pytest.raises(CheckpointSaveError, match=r"run/last\.pth: No space left on device \(ENOSPC\); the previous"):
        train_det.main(argv)  # the same command: the folder held nothing to resume
    assert "never wrote a checkpoint (history.jsonl): nothing to resume; starting a new run" in caplog.text
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())) >= {"AP", "AP50"}
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["iteration"] == 2
    assert not list((tmp_path / "run").glob(".last.pth.*.tmp"))


# ------------------------------------------------------------------ counted skips and right results

def test_skip_invalid_skips_every_kind_of_bad_file_counts_and_lists_them(tmp_path, caplog):
    files = {"good.png": png_bytes(), **{f"{kind}.jpg": make(tmp_path) for kind, make in BAD_IMAGES.items()}}
    folder, ann = coco_set(tmp_path, files=files)
    before = tree_digest(tmp_path / "data")
    records, _, _ = load_coco_records(folder, ann, skip_invalid=True)
    kept = validate_records(records, split="train", skip_invalid=True, report_dir=tmp_path / "out",
                            cache_dir=tmp_path / "cache")
    assert [Path(r.path).name for r in kept] == ["good.png"]
    listed = (tmp_path / "out" / "invalid_train.txt").read_text().splitlines()
    assert len(listed) == len(BAD_IMAGES) and all(any(kind in line for line in listed) for kind in BAD_IMAGES)
    assert f"skipped {len(BAD_IMAGES)} of {len(files)} file(s)" in caplog.text
    assert tree_digest(tmp_path / "data") == before


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_header_validation_still_names_every_bad_image_and_stops_or_skips_it(tmp_path, kind):
    """data.validate=header reads headers only: each bad image is refused up front, or, if its header is
    intact, when training reads it: named either way, then the run stops or (skip_invalid) skips and lists it."""
    folder, ann = coco_set(tmp_path, files={"a.jpg": BAD_IMAGES[kind](tmp_path), "b.png": png_bytes()})
    records, _, _ = load_coco_records(folder, ann)
    try:
        kept = validate_records(records, validate="header", report_dir=tmp_path / "out")
    except DatasetError as error:
        assert "a.jpg" in str(error) and "skip_invalid" in str(error)
        kept = validate_records(records, validate="header", skip_invalid=True, report_dir=tmp_path / "out")
        assert [Path(r.path).name for r in kept] == ["b.png"]
        assert "a.jpg" in (tmp_path / "out" / "invalid_train.txt").read_text()
        return
    with pytest.raises(DatasetError, match=r"a\.jpg.*skip_invalid"):
        DetectionDataset(kept, invalid=InvalidFiles(False))[0]
    report = tmp_path / "out" / "invalid_train.txt"
    _, target = DetectionDataset(kept, invalid=InvalidFiles(True, report))[0]
    assert target["image_id"] == 2 and "a.jpg" in report.read_text()


def test_second_validation_is_served_from_the_cache(tmp_path, monkeypatch):
    folder, ann = coco_set(tmp_path)
    records, _, _ = load_coco_records(folder, ann)
    validate_records(records, cache_dir=tmp_path / "cache")
    monkeypatch.setattr("datafiles.validation._inspect", lambda check: pytest.fail(f"decoded {check.path} again"))
    assert len(validate_records(records, cache_dir=tmp_path / "cache")) == 2
    (folder / "a.jpg").write_bytes(png_bytes(40, 30))  # a changed file (size + mtime) is decoded again
    with pytest.raises(BaseException, match="decoded .*a.jpg again"):
        validate_records(records, cache_dir=tmp_path / "cache")


def test_exif_is_ignored_for_images_as_for_annotations(tmp_path):
    exif_rotated_jpeg(tmp_path / "r.jpg", width=32, height=24)
    assert read_image(tmp_path / "r.jpg").shape == (24, 32, 3)  # stored pixels, as COCO / VOC tools annotate them
    folder, ann = coco_set(tmp_path, files={"a.jpg": (tmp_path / "r.jpg").read_bytes()})
    records, _, _ = load_coco_records(folder, ann)
    assert len(validate_records(records, cache_dir=tmp_path / "cache")) == 1


@pytest.mark.parametrize("overrides, key, value", [
    (["data.min_size=800"], "data.min_size", [800]),
    (["train.amp=bf16"], "train.amp", "bf16"),
    (["model.backbone.weights=w.pth"], "model.backbone.weights", "w.pth"),
])
def test_values_that_are_right(overrides, key, value):
    assert OmegaConf.select(load_config(CONFIGS["det"], None, overrides), key) == value


def detector_like(backbone: torch.nn.Module, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in backbone.state_dict().items()} | {"roi_heads.box_predictor.w": torch.ones(2)}


@pytest.mark.parametrize("wrap, prefix", [
    (lambda sd: {"model": sd, "epoch": 3}, "backbone.body."),  # ResDet detection training checkpoint
    (lambda sd: sd, "backbone.body."),  # torchvision / Detectron2-style detector state dict
    (lambda sd: {"model": sd}, "module.backbone."),  # DDP segmentation / classification checkpoint
])
def test_backbone_part_of_a_whole_model_is_found_loaded_and_reported(tmp_path, caplog, wrap, prefix):
    torch.manual_seed(0)
    source = build_backbone("resnet18")
    path = weights_file(tmp_path, wrap(detector_like(source, prefix)))
    loaded = build_backbone("resnet18", weights=path)
    torch.testing.assert_close(loaded.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])
    assert f"keys under '{prefix}'" in caplog.text


@pytest.mark.parametrize("name, norm", [("preact_resnet18", "BN"), ("resnet18", "SyncBN"), ("resnet18", "GN")])
def test_zero_init_residual_works_for_preact_and_syncbn(name, norm):
    backbone = build_backbone(name, norm=norm, zero_init_residual=True)
    block = backbone.layer1[0]
    last = block.conv2.weight if name.startswith("preact") else block.bn2.weight
    assert torch.count_nonzero(last) == 0


def test_fold_refusal_leaves_the_model_untouched():
    model = build_backbone("preact_resnet18").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        fold_batchnorm(model)
    assert model.state_dict().keys() == before.keys()


def test_backbone_info_follows_the_convolutions(capsys):
    backbone_info.main(["resnet18", "vgg16", "--size", "100"])
    out = capsys.readouterr().out
    assert "| res5 | 512 | 32 | 4 |" in out  # 100 -> 50 -> 25 -> 13 -> 7 -> 4 (100 // 32 would say 3)
    assert "| conv5 | 512 | 16 | 6 |" in out  # VGG pools floor: 100 -> 50 -> 25 -> 12 -> 6
