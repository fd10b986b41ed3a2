"""The generated demo data of the built-in default runs is written only into its own folder: a folder with
other files in it is refused, never overwritten (whether a run uses the demo data at all is settled at launch:
`engine.launch.resolve_demo_data`)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .images import DatasetError

OWNER_MARKER = ".resdet-demo-data"  # written first: the folder belongs to the generator, even half-written
DONE_MARKER = "DONE.json"  # what the generators write last (a set made by calling a generator directly)


def prepare_demo_data(root: str | Path, generate: Callable[[Path], object]) -> None:
    """Run `generate(root)` (idempotent) unless `root` holds files the generator did not write."""
    root = Path(root)
    owned = (root / OWNER_MARKER).is_file() or (root / DONE_MARKER).is_file()
    if root.is_dir() and any(root.iterdir()) and not owned:
        raise DatasetError(f"data.synthetic.enabled would write the generated demo set into data.root={root}, which "
                           "holds other files: point data.root at a new folder, or set data.synthetic.enabled=false "
                           "to train on the data in it")
    root.mkdir(parents=True, exist_ok=True)
    (root / OWNER_MARKER).touch()
    generate(root)
