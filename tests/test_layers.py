"""The package layers point down only: the quantizer core (gradq) -> engine adapters (comm_hooks) -> tools
(gradq_bench). Checked on the import statements of every module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["gradq", "comm_hooks", "gradq_bench"]


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_each_package_imports_only_the_layers_below_it():
    checked = 0
    for depth, package in enumerate(LAYERS):
        above = set(LAYERS[depth + 1 :])
        for path in sorted((ROOT / package).rglob("*.py")):
            assert not (_imported_packages(path) & above), f"{path.relative_to(ROOT)} imports a layer above it"
            checked += 1
    assert checked > 40
    assert "comm_hooks" in _imported_packages(ROOT / "gradq_bench" / "worker.py")  # the tools do use the engines
