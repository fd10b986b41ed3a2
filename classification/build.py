"""From the `data` section of a classification config to datasets: what tools/train_cls.py reads its data with."""
from __future__ import annotations

from engine.config import CONFIGS_DIR

DEFAULT_CONFIG = CONFIGS_DIR / "cls" / "default.yaml"  # the classification schema: every cls config overrides it
