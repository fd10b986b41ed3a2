"""An experiment as a sequence of training runs ("stages") that survives interruption: each stage trains in its own
folder unless its metrics.json is there (a stage with only last.pth resumes), so rerunning the same command
continues where it stopped. Used by tools/transfer.py and tools/cifar_degradation.py."""
from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

METRICS = "metrics.json"
WALL_TIME = "wall_time.json"  # written next to a stage's metrics.json
STAGE_LOG = "stages.log"


def tiny_imagenet_subset(root: Path, num_classes: int, parent: Path, fmt: str) -> Path:
    """`parent/<root name>-<N>cls`: a Tiny-ImageNet folder of the first N (sorted) classes of `root`, made of
    symlinks (train class folders, val images) plus the filtered wnids.txt and val_annotations.txt."""
    if fmt != "tiny-imagenet":
        raise ValueError(f"cls.class_subset needs data.format=tiny-imagenet, got {fmt!r}")
    wnids = sorted((root / "wnids.txt").read_text().split())[:num_classes]
    dst = parent / f"{root.resolve().name}-{num_classes}cls"
    if (dst / "wnids.txt").is_file() and (dst / "wnids.txt").read_text().split() == wnids:
        return dst
    (dst / "val").mkdir(parents=True, exist_ok=True)
    (dst / "train").mkdir(exist_ok=True)
    for wnid in wnids:
        if not (dst / "train" / wnid).exists():
            (dst / "train" / wnid).symlink_to((root / "train" / wnid).resolve(), target_is_directory=True)
    if not (dst / "val" / "images").exists():
        (dst / "val" / "images").symlink_to((root / "val" / "images").resolve(), target_is_directory=True)
    lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
    kept = [line for line in lines if len(line.split("\t")) > 1 and line.split("\t")[1] in wnids]
    (dst / "val" / "val_annotations.txt").write_text("\n".join(kept) + "\n")
    (dst / "wnids.txt").write_text("\n".join(wnids) + "\n")  # last: marks the copy complete
    return dst


def run_stage(tool_main: Callable[[list[str]], dict], argv: list[str], stage_dir: Path, out: Path, start: float,
              ran: list[str], *, tag: str = "transfer", log_name: str = STAGE_LOG) -> tuple[dict, float | None]:
    """Run one training entry point (`tool_main(argv)`, e.g. train_cls.main) into `stage_dir` unless its
    metrics.json exists (resuming it when it holds a checkpoint); return (metrics, wall seconds of the run).
    Progress lines go to stdout and `out/log_name`."""
    def log(line: str) -> None:
        line = f"[{tag} {format_duration(time.time() - start)}] {stage_dir.relative_to(out)}: {line}"
        print(line, flush=True)
        with open(out / log_name, "a") as f:
            f.write(line + "\n")

    if (stage_dir / METRICS).is_file():
        metrics = json.loads((stage_dir / METRICS).read_text())
        wall = json.loads((stage_dir / WALL_TIME).read_text())["seconds"] if (stage_dir / WALL_TIME).is_file() else None
        log("done before, skipped")
        return metrics, wall
    argv = ["--resume", "auto", *argv, f"output_dir={stage_dir}"]  # interrupted mid-stage: continue where it stopped
    log(f"running {' '.join(argv)}")
    t0 = time.time()
    metrics = tool_main(argv)
    wall = time.time() - t0
    (stage_dir / WALL_TIME).write_text(json.dumps({"seconds": wall}) + "\n")
    ran.append(str(stage_dir.relative_to(out)))
    gc.collect()
    log(f"finished in {format_duration(wall)}")
    return metrics, wall


def format_duration(seconds: float) -> str:
    """`12m03.4s`."""
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
