"""The evaluation page shared by detection, segmentation and the dataset browser: one folder holding index.html,
plotly.min.js and the drawn images, which opens from disk in any current browser with no network.

A task module builds `Section`s of `Table`s, plotly figures and `GalleryItem`s; `write_page` renders them
through the jinja2 template next to this file. Provenance (config, checkpoint, commit, date, hardware) and the
training curves of `history.jsonl` are the same for every task and live here.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image

from .output import HISTORY

TEMPLATES = Path(__file__).with_name("templates")
GENERATOR = "ResDet evaluation report"  # the page's <meta name="generator">: marks a folder this module may replace
PLOTLY_JS = "plotly.min.js"
THUMBNAIL_SIZE = 320  # longest side of a gallery thumbnail, pixels
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class Table:
    """A table the page can sort by clicking a header: `rows` of cells, each a text or (text, sort key)."""

    id: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str | tuple[str, float | str]]]
    caption: str = ""

    def cells(self) -> list[list[tuple[str, str]]]:
        """(text, sort key) per cell; numbers sort numerically, n/a last."""
        out = []
        for row in self.rows:
            out.append([(c[0], _sort_key(c[1])) if isinstance(c, tuple) else (c, _sort_key(c)) for c in row])
        return out


@dataclass
class GalleryItem:
    """One drawn image of a gallery: paths relative to the page, caption lines under the thumbnail."""

    image: str
    thumbnail: str
    title: str
    lines: Sequence[str] = ()


@dataclass
class Section:
    """A titled part of the page: paragraphs of plain text (escaped), then tables, figures and a gallery."""

    id: str
    title: str
    text: Sequence[str] = ()
    tables: Sequence[Table] = ()
    figures: Sequence[str] = ()  # HTML of plotly figures (see `figure_html`)
    gallery: Sequence[GalleryItem] = ()
    legend: Sequence[tuple[str, str]] = ()  # (CSS colour, label) swatches shown above the gallery


def percent(value: float | None, digits: int = 1) -> tuple[str, float]:
    """A fraction as a percentage cell (text, sort key); None, nan and COCOeval's -1 (no ground truth) as "n/a"."""
    if value is None or value == -1 or (isinstance(value, float) and math.isnan(value)):
        return "n/a", -math.inf
    return f"{100 * value:.{digits}f}", float(value)


def _sort_key(value: Any) -> str:
    if isinstance(value, (int, float, np.floating, np.integer)):
        return repr(float(value)) if math.isfinite(value) else "-Infinity"
    return str(value)


def figure_html(fig: go.Figure, div_id: str) -> str:
    """A plotly figure as a <div> for the page; plotly.js itself is loaded once from the report folder."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOTLY_CONFIG)


def prepare_report_dir(path: str | Path) -> Path:
    """An empty folder for a report at `path`: an earlier report there is replaced, any other non-empty folder is
    refused (so `--report ~/photos` can never delete photos)."""
    path = Path(path)
    if path.exists():
        index = path / "index.html"
        ours = index.is_file() and f'content="{GENERATOR}"' in index.read_text(errors="replace")[:2000]
        if path.is_dir() and ours:
            shutil.rmtree(path)
        elif not path.is_dir() or any(path.iterdir()):
            raise FileExistsError(f"report folder {path} exists and is not an earlier report: choose another folder")
    (path / "images").mkdir(parents=True, exist_ok=True)
    return path


def save_gallery_image(out_dir: Path, name: str, rgb: np.ndarray) -> tuple[str, str]:
    """Write an RGB uint8 drawing as images/<name>.jpg and a thumbnail as images/<name>_thumb.jpg; the paths
    relative to the page."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    full, thumb = f"images/{name}.jpg", f"images/{name}_thumb.jpg"
    image.save(out_dir / full, quality=90)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    image.save(out_dir / thumb, quality=85)
    return full, thumb


def provenance(cfg: Mapping[str, Any], *, checkpoint: str | Path | None, data: str, images: int,
               config_path: str | Path | None = None) -> list[tuple[str, str]]:
    """What produced the numbers: config, checkpoint, model, data, code commit, date, hardware."""
    model = cfg["model"]
    backbone = model["backbone"]
    weights = backbone.get("weights") or "none (from scratch)"
    rows = [
        ("config", str(config_path) if config_path else "(the run's resolved config, below)"),
        ("checkpoint", str(checkpoint) if checkpoint else "the model at the end of training"),
        ("model", f"{model.get('head', '')} head, backbone {backbone['name']} (weights: {weights}), "
                  f"{model['num_classes']} classes"),
        ("data", f"{data}: {images} images"),
        ("code", _commit()),
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("hardware", _hardware(str(cfg.get("device", "cpu")))),
    ]
    return rows


def _commit() -> str:
    """The git commit of this checkout (with "+ local changes" when the tree differs), or why it is unknown."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return head.stdout.strip() + (" + local changes" if dirty else "")


def _hardware(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    return "; ".join(parts)


def history_section(output_dir: str | Path | None) -> Section | None:
    """Training curves from `output_dir/history.jsonl` (engine.output: one line per log step with train/* losses
    and lr, one per epoch end with train/epoch_* and val/* metrics), or None without a history."""
    path = Path(output_dir) / HISTORY if output_dir is not None else None
    if path is None or not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None

    def curves(keys: list[str], title: str, div_id: str, y_title: str) -> str | None:
        fig = go.Figure()
        for key in keys:
            points = [(r["iteration"], r[key]) for r in records  # COCOeval's -1: no ground truth of that size
                      if r.get(key) is not None and r[key] != -1 and "iteration" in r]
            if points:
                x, y = zip(*points)
                fig.add_trace(go.Scatter(x=x, y=y, name=key.split("/", 1)[-1], mode="lines+markers",
                                         marker={"size": 4},
                                         hovertemplate="iteration %{x}<br>%{y:.4g}<extra>" + key + "</extra>"))
        if not fig.data:
            return None
        fig.update_layout(title=title, xaxis_title="iteration", yaxis_title=y_title, height=380,
                          margin={"t": 50, "b": 40}, hovermode="x unified")
        return figure_html(fig, div_id)

    keys = sorted({key for r in records for key in r})
    losses = [k for k in keys if k.startswith("train/") and not k.startswith("train/epoch_")]
    metrics = [k for k in keys if k.startswith("val/") and all(isinstance(r.get(k), (int, float, type(None)))
                                                                for r in records)]
    figures = [f for f in (curves(losses, "training losses (mean over each logging window)", "curve-losses", "loss"),
                           curves(["lr"], "learning rate", "curve-lr", "lr"),
                           curves(metrics, "evaluation metrics", "curve-metrics", "value")) if f]
    text = [f"{len(records)} records of {path.name}; hover for values, click a legend entry to hide a curve."]
    return Section("training", "Training curves", text=text, figures=figures)


def write_page(out_dir: str | Path, *, title: str, subtitle: str, sections: Sequence[Section],
               provenance_rows: Sequence[tuple[str, str]] = (), config_text: str = "") -> Path:
    """Render `sections` into out_dir/index.html (out_dir from `prepare_report_dir`, images already in it) and
    copy plotly.js beside it. Returns the page's path."""
    import plotly.offline

    out_dir = Path(out_dir)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    page = env.get_template("report.html.j2").render(
        title=title, subtitle=subtitle, sections=sections, provenance=provenance_rows, config_text=config_text,
        generator=GENERATOR, plotly_js=PLOTLY_JS, uses_plotly=any(s.figures for s in sections))
    (out_dir / PLOTLY_JS).write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
