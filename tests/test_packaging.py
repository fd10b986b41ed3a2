"""ResDet is a checkout toolkit (README, "Install"): a non-editable install copies the packages without configs/
and tools/, and then importing a task package fails at once saying so; `backbones` works on its own."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", ".cache", "outputs", "build", "*.egg-info", "__pycache__",
                                     ".pytest_cache")


def test_non_editable_install_fails_at_once_naming_the_checkout_rule(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)  # pip builds in the source folder: not in the checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    assert (target / "detection").is_dir() and not (target / "configs").exists()

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})

    for package in ("detection", "segmentation", "classification.build", "engine.config"):
        result = run(f"import {package}")
        assert result.returncode != 0 and "ResDet runs from its checkout" in result.stderr, (package, result.stderr)
        assert "pip install -e ." in result.stderr
    result = run("import backbones; print(backbones.__file__); "
                 "print(backbones.build_backbone('resnet18').output_shape())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(target))  # the installed copy, not the checkout's
