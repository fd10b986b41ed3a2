"""tools/transfer.py: the whole pretrain -> detect (pretrained and scratch) pipeline, its outputs and its resume."""
import json
import sys
import time
from pathlib import Path

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "transfer" / "default.yaml"
sys.path.insert(0, str(ROOT / "tools"))

import transfer  # noqa: E402
from classification.datasets import build_cls_dataset  # noqa: E402


def _default_config(tmp_path: Path) -> Path:
    """configs/transfer/default.yaml with its generated data written under tmp_path instead of the shared .cache/."""
    default = yaml.safe_load(DEFAULT.read_text())
    config = {
        "_base_": str(DEFAULT),
        "cls": {"overrides": [*default["cls"]["overrides"], f"data.root={tmp_path / 'cls_shapes'}"]},
        "det": {"overrides": [*default["det"]["overrides"], f"data.root={tmp_path / 'shapes'}"]},
        "output_dir": str(tmp_path / "transfer"),
    }
    path = tmp_path / "transfer.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_transfer_runs_end_to_end_then_resumes_without_redoing(tmp_path):
    config = _default_config(tmp_path)
    out = tmp_path / "transfer"
    results = transfer.main(["--config", str(config)])

    stages = [f"{b}/seed0/{s}" for b in ("resnet18", "plain18") for s in ("cls", "det_pretrained", "det_scratch")]
    assert results["stages_run"] == stages
    saved = json.loads((out / "results.json").read_text())
    cells = {(c["backbone"], c["seed"], c["pretrained"]): c for c in saved["cells"]}
    assert set(cells) == {(b, 0, p) for b in ("resnet18", "plain18") for p in (True, False)}
    for (backbone, _, pretrained), cell in cells.items():
        assert 0.0 <= cell["AP"] <= 1.0 and "AP50" in cell and cell["det_wall_s"] > 0
        assert (cell["cls_top1"] is not None) == pretrained and (cell["cls_train_top1"] is not None) == pretrained
        det_cfg = yaml.safe_load((out / backbone / "seed0" / ("det_pretrained" if pretrained else "det_scratch")
                                  / "config.yaml").read_text())
        assert det_cfg["model"]["backbone"]["name"] == backbone
        assert (det_cfg["model"]["backbone"]["weights"] is not None) == pretrained
    assert [(c["backbone"], c["seed"]) for c in saved["classification"]] == [("resnet18", 0), ("plain18", 0)]
    assert all(0 <= c["top1"] <= 100 and c["wall_s"] > 0 for c in saved["classification"])
    table = (out / "results.md").read_text()
    assert "| resnet18 |" in table and "| plain18 |" in table and "AP pretrained" in table
    for name in ("transfer.png", "degradation.png"):
        assert (out / name).stat().st_size > 1000

    # the same command again: every stage is found done, nothing is retrained, the results are rebuilt the same
    metrics_times = {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/*/metrics.json")}
    start = time.time()
    again = transfer.main(["--config", str(config)])
    assert again["stages_run"] == []
    assert time.time() - start < 15
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/*/metrics.json")} == metrics_times
    assert again["cells"] == saved["cells"]
    assert (out / "stages.log").read_text().count("done before, skipped") == 6


def test_tiny_imagenet_class_subset_links_the_first_classes(tmp_path):
    root = tmp_path / "tiny"
    wnids = ["n03", "n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    annotations = []
    for k, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        Image.new("RGB", (8, 8)).save(root / "val" / "images" / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t7\t7")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")

    subset = transfer.tiny_imagenet_subset(root, 2, tmp_path / "data", "tiny-imagenet")
    assert transfer.tiny_imagenet_subset(root, 2, tmp_path / "data", "tiny-imagenet") == subset  # idempotent
    train = build_cls_dataset("tiny-imagenet", subset, "train", None)
    val = build_cls_dataset("tiny-imagenet", subset, "val", None)
    assert train.classes == val.classes == ["n01", "n02"]
    assert len(train) == 2 and sorted(val.targets) == [0, 1]
