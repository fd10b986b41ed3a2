"""tools/backbone_info.py prints the stage table a user looks at first."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_backbone_info_prints_stages_params_and_macs():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "backbone_info.py"), "resnet18", "vgg16", "--size", "64"],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert "| res5 | 512 | 32 | 2 | 11.18 |" in "\n".join(lines)
    assert any(line.startswith("| conv5 | 512 | 16 | 4 |") for line in lines)
    assert any(line.startswith("| + 1000-way classifier | | | | 11.69 |") for line in lines)
