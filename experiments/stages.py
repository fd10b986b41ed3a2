"""An experiment as a sequence of training runs ("stages") that survives interruption: each stage trains in its own
folder unless its metrics.json is there (a stage with only last.pth resumes), so rerunning the same command
continues where it stopped. Used by tools/transfer.py and tools/cifar_degradation.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.preemption import EXIT_PREEMPTED, STOP_SIGNALS
from engine.run_lock import EXIT_IN_USE

METRICS = "metrics.json"
WALL_TIME = "wall_time.json"  # a stage's seconds summed over its attempts (one killed with -9 is not counted)
STAGE_LOG = "stages.log"
TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"  # the checkout's tools/ (README: a checkout toolkit)


class StageInUse(SystemExit):
    """Another process is training this stage (its run folder's lock, engine.run_lock). A SystemExit with the
    tool's EXIT_IN_USE, so an experiment that does not catch it stops as the tool did; one that shares its stages
    between processes (tools/transfer.py) catches it and passes the stage over."""

    def __init__(self, stage_dir: Path):
        super().__init__(EXIT_IN_USE)
        self.stage_dir = stage_dir


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
        _link(dst / "train" / wnid, (root / "train" / wnid).resolve())
    _link(dst / "val" / "images", (root / "val" / "images").resolve())
    lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
    kept = [line for line in lines if len(line.split("\t")) > 1 and line.split("\t")[1] in wnids]
    _write_whole(dst / "val" / "val_annotations.txt", "\n".join(kept) + "\n")
    _write_whole(dst / "wnids.txt", "\n".join(wnids) + "\n")  # last: marks the copy complete
    return dst


def _write_whole(path: Path, text: str) -> None:
    """Write `path` through a temporary and a rename: a process reading it never sees it half written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _link(path: Path, target: Path) -> None:
    """A symlink to a folder, unless one is there (made earlier, or just now by another process of the study)."""
    try:
        path.symlink_to(target, target_is_directory=True)
    except FileExistsError:
        pass


def run_stage(tool: str, argv: list[str], stage_dir: Path, out: Path, start: float, ran: list[str], *,
              tag: str = "transfer", log_name: str = STAGE_LOG) -> tuple[dict, float | None]:
    """Run the training tool `tools/<tool>.py` (e.g. "train_cls") with `argv` into `stage_dir` unless its
    metrics.json exists (resuming it when it holds a checkpoint); return (metrics, wall seconds of the run).
    Progress lines go to stdout and `out/log_name`. A stage stopped by a signal (its preemption checkpoint
    written) or failing ends the experiment with the stage's exit status; the same command continues it. A stage
    another process is training raises StageInUse."""
    def log(line: str) -> None:
        line = f"[{tag} {format_duration(time.time() - start)}] {stage_dir.relative_to(out)}: {line}"
        print(line, flush=True)
        with open(out / log_name, "a") as f:
            f.write(line + "\n")

    if (stage_dir / METRICS).is_file():
        metrics = json.loads((stage_dir / METRICS).read_text())
        wall = _wall_time(stage_dir)["seconds"] if (stage_dir / WALL_TIME).is_file() else None
        log("done before, skipped")
        return metrics, wall
    argv = ["--resume", "auto", *argv, f"output_dir={stage_dir}"]  # interrupted mid-stage: continue where it stopped
    log(f"running {tool} {' '.join(argv)}")
    t0 = time.time()
    status = run_tool(tool, argv)
    if status == EXIT_IN_USE:  # another process is training this stage: the time and the record are its own
        log("in use by another process (named above), which goes on with it")
        raise StageInUse(stage_dir)
    wall = _add_wall_time(stage_dir, time.time() - t0, finished=status == 0)
    if status != 0:
        log(f"stopped with exit status {status} after {format_duration(wall)} in all"
            + (" (a signal: its checkpoint is written; the same command continues it)" if status == EXIT_PREEMPTED
               else "; its output is above"))
        raise SystemExit(status)
    ran.append(str(stage_dir.relative_to(out)))
    log(f"finished in {format_duration(wall)}")
    return json.loads((stage_dir / METRICS).read_text()), wall


def _wall_time(stage_dir: Path) -> dict:
    path = stage_dir / WALL_TIME
    return json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "finished": False}


def _add_wall_time(stage_dir: Path, seconds: float, *, finished: bool) -> float:
    """Add one attempt's seconds to the stage's wall_time.json (a stage stopped by a signal and continued later
    counts every attempt); the total. A tool that failed before making its run folder (a missing dataset, say)
    leaves nothing to record, and no folder is made for it: its own error is the one the user sees."""
    total = _wall_time(stage_dir)["seconds"] + seconds
    if stage_dir.is_dir():
        (stage_dir / WALL_TIME).write_text(json.dumps({"seconds": total, "finished": finished}) + "\n")
    return total


def run_tool(tool: str, argv: list[str]) -> int:
    """`python tools/<tool>.py argv` as a child process (a tool never imports another); the stop signals this
    process gets (a scheduler's SIGTERM / SIGUSR1, Ctrl-C) are passed on to it, so it writes its preemption
    checkpoint (a signal that also reached it directly is the same request: engine.preemption). Its exit status."""
    child = subprocess.Popen([sys.executable, str(TOOLS_DIR / f"{tool}.py"), *argv])
    previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum)) for sig in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def format_duration(seconds: float) -> str:
    """`12m03.4s`."""
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
