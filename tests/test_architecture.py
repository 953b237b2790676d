"""The layout rules of docs/design.md ("Map"), checked: one-way layers, sizes, a light HTTP client."""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dssm", "pipelines", "serving")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
#: A module or function over the limit says why in a comment holding this marker.
REASON = "size:"


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _layers() -> list[list[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    raw = config["importlinter:contract:layers"]["layers"]
    return [[m.strip() for m in line.replace("|", ":").split(":")] for line in raw.strip().splitlines()]


def test_import_contracts_hold() -> None:
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / ".importlinter")) == 0


def test_lint_imports_fails_on_an_upward_import(tmp_path: Path) -> None:
    """The contract can fail: a copy of the tree where the model core imports serving breaks it."""
    import shutil

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    with open(tmp_path / "dssm" / "metrics.py", "a") as handle:
        handle.write("\nimport serving.searcher  # noqa: E402,F401\n")
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; import sys; "
                             "sys.exit(lint_imports(config_filename='.importlinter'))"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "dssm.metrics -> serving.searcher" in result.stdout


def test_every_module_sits_in_a_layer() -> None:
    layered = [m for layer in _layers() for m in layer]
    loose = [m for m in _modules() if m not in PACKAGES and not any(m == x or m.startswith(x + ".")
                                                                    for x in layered)]
    assert not loose, f"modules in no layer of .importlinter: {loose}"


def test_modules_and_functions_stay_small_or_say_why() -> None:
    too_long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            if len(lines) > MAX_MODULE_LINES and REASON not in "\n".join(lines[:60]):
                too_long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                    if length > MAX_FUNCTION_LINES and f"# {REASON}" not in body:
                        too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "over the size limits without a '# size:' reason:\n" + "\n".join(too_long)


def test_every_module_opens_with_what_it_owns() -> None:
    missing = [str(p.relative_to(ROOT)) for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


@pytest.mark.parametrize("module", ["serving.client", "dssm.cli", "dssm.index"])
def test_light_modules_import_neither_tensorflow_nor_scann(module: str) -> None:
    code = (f"import sys, {module}; heavy = [m for m in ('tensorflow', 'scann', 'apache_beam', 'torch') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_design_map_names_every_module() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    section = design[design.index("## Map"):design.index("\n## ", design.index("## Map") + 1)]
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__init__.py":
                continue
            stem = path.stem
            if not any(f"`{form}" in section for form in (stem, f"{stem}.py", f"{path.parent.name}/{stem}")):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"docs/design.md's map does not name: {missing}"
