"""The floors of docs/architecture.md, held: each package imports only the floors below it, and no tool imports
another tool (experiments.scale_benchmark aside: inside its measuring processes it imports the train_det.py of the
checkout tools/benchmark_scale.py measures, any checkout, by design)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backbones", "engine", "datafiles", "detection", "segmentation", "classification", "experiments")
TASKS = ("detection", "segmentation", "classification")
# What each package may import of the project (besides itself).
ALLOWED = {
    "backbones": set(),
    "engine": set(),
    "datafiles": {"engine"},
    "detection": {"engine", "datafiles", "backbones"},
    "segmentation": {"engine", "datafiles", "backbones"},
    "classification": {"engine", "datafiles", "backbones"},
    "experiments": {"engine", "datafiles", "backbones", "detection", "segmentation", "classification"},
}


def project_imports(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_each_package_imports_only_the_floors_below_it():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    wrong = []
    for package in PACKAGES:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"{package}/ has no modules"
        for path in files:
            used = project_imports(path) & (set(PACKAGES) | tools | {"tools"})
            if path.name == "scale_benchmark.py":  # the measured checkout's train_det (docs/architecture.md)
                used -= {"train_det"}
            for name in sorted(used - ALLOWED[package] - {package}):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports against the floors of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_tool_imports_another_tool():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    wrong = []
    for path in sorted((ROOT / "tools").glob("*.py")):
        others = project_imports(path) & (tools - {path.stem})
        wrong += [f"tools/{path.name} imports {name}" for name in sorted(others)]
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_a_task_importing_another_task(tmp_path):
    """The checker itself: an import of a sibling task is seen (so a green run means something)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from segmentation.models import build_segmentation_model\n")
    assert "segmentation" in project_imports(module) - ALLOWED["detection"]
