"""Everything a run writes to its output directory: config, TensorBoard, metrics, history.

Only the main rank writes; on other ranks every method is a no-op, so training loops can log
unconditionally.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from engine.config import save_config
from engine.distributed import is_main_process

HISTORY = "history.jsonl"


class RunOutput:
    """The run directory: ``config.yaml``, ``tb/``, ``metrics.json``, ``history.jsonl``."""

    def __init__(self, output_dir: str | Path, cfg: DictConfig, *, resume_from: int | None = None,
                 history_lines: int = 0, write_config: bool = True) -> None:
        """`resume_from`: the iteration a resumed run continues from. What the killed run logged after that
        point is dropped (history.jsonl kept to its first `history_lines` lines, TensorBoard events purged),
        so the resumed run logs every iteration exactly once."""
        self.output_dir = Path(output_dir)
        self.enabled = is_main_process()
        self.purge_step = None if resume_from is None else resume_from + 1
        self.history_lines = history_lines
        self._writer: SummaryWriter | None = None
        if self.enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if write_config:
                save_config(cfg, self.output_dir / "config.yaml")
            if resume_from is not None:
                self._truncate_history(history_lines)

    def _truncate_history(self, lines: int) -> None:
        path = self.output_dir / HISTORY
        if path.is_file():
            kept = path.read_text().splitlines(keepends=True)[:lines]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)

    @property
    def writer(self) -> SummaryWriter:
        """Opened on first use so runs that never log scalars leave no empty event file."""
        if self._writer is None:
            self._writer = SummaryWriter(str(self.output_dir / "tb"), purge_step=self.purge_step)
        return self._writer

    def log_scalars(self, scalars: Mapping[str, Any], step: int, prefix: str = "train/") -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def write_metrics(self, metrics: Mapping[str, Any], name: str = "metrics.json") -> None:
        """Final metrics as JSON; non-finite values become null so the file stays valid JSON."""
        if not self.enabled:
            return
        text = json.dumps(jsonable(metrics), indent=2, allow_nan=False)
        (self.output_dir / name).write_text(text + "\n")

    def append_history(self, record: Mapping[str, Any]) -> None:
        """One JSON line per logging step (e.g. iteration, epoch, losses) for plot_history."""
        self.append_record(HISTORY, record)
        self.history_lines += self.enabled

    def append_record(self, name: str, record: Mapping[str, Any]) -> None:
        """Append `record` as one JSON line to the file `name` in the run directory."""
        if not self.enabled:
            return
        with open(self.output_dir / name, "a") as f:
            f.write(json.dumps(jsonable(record), allow_nan=False) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def jsonable(value: Any) -> Any:
    """Plain JSON values: tensors/numpy scalars via ``.item()``, nan/inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def last_logged_value(history_jsonl: str | Path, key: str) -> Any:
    """The last non-null value of `key` in a run's history.jsonl, None without one (or without the file)."""
    path = Path(history_jsonl)
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def plot_history(
    history_jsonl: str | Path, keys: Sequence[str], out_png: str | Path, title: str = ""
) -> None:
    """One panel per key, plotted against iteration (or epoch for records without one)."""
    records = [json.loads(line) for line in Path(history_jsonl).read_text().splitlines() if line]
    fig = Figure(figsize=(5 * len(keys), 4), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        points = [r for r in records if r.get(key) is not None]
        x_name = "iteration" if all("iteration" in r for r in points) else "epoch"
        ax.plot([r.get(x_name) for r in points], [r[key] for r in points], marker=".")
        ax.set(xlabel=x_name, ylabel=key, title=key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
