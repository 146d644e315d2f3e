"""The package's parts import one way: sam <- zero <- trainer <- cli, and sam <- zero <- hf.

`fsam_ds.sam` imports torch and the standard library only, so the math and the plain-PyTorch
optimizer work without DeepSpeed or transformers; `fsam_ds.zero` never reaches into the trainer;
`fsam_ds.hf` (the Hugging Face Trainer integration) sits beside the trainer and imports neither it
nor the commands, and they do not import it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fsam_ds"

# each part may import itself and the parts listed for it
ALLOWED = {
    "sam": {"sam"},
    "zero": {"sam", "zero"},
    "trainer": {"sam", "zero", "trainer"},
    "cli": {"sam", "zero", "trainer", "cli"},
    "hf": {"sam", "zero", "hf"},
}
# third-party modules `fsam_ds.sam` may import (everything else there must be the standard library)
SAM_THIRD_PARTY = {"torch"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from fsam_ds import trainer` names a part too
            if node.module == "fsam_ds":
                found += [(node.lineno, f"fsam_ds.{alias.name}") for alias in node.names]
    return found


def direction_violations(package: Path) -> list[str]:
    """Every import in `package` that goes against ALLOWED, as 'file:line imports module'."""
    stdlib = set(sys.stdlib_module_names)
    out = []
    for part, allowed in ALLOWED.items():
        for path in sorted((package / part).rglob("*.py")):
            for line, module in _imports(path):
                top, *rest = module.split(".")
                where = f"{path.relative_to(package.parent)}:{line} imports {module}"
                if top == "fsam_ds":
                    target = rest[0] if rest else None
                    if target in ALLOWED and target not in allowed:
                        out.append(where)
                    elif target not in ALLOWED:
                        out.append(where + " (import from a part, not from the package root)")
                elif part == "sam" and top not in stdlib and top not in SAM_THIRD_PARTY:
                    out.append(where + " (fsam_ds.sam may import torch and the standard library only)")
    return out


def test_imports_follow_the_direction():
    assert direction_violations(PACKAGE) == []


def test_checker_catches_an_import_against_the_direction(tmp_path):
    for part in ALLOWED:
        (tmp_path / "fsam_ds" / part).mkdir(parents=True)
    (tmp_path / "fsam_ds" / "zero" / "engine.py").write_text("from fsam_ds.trainer.loop import train\n")
    (tmp_path / "fsam_ds" / "sam" / "core.py").write_text("import deepspeed\nimport math\nimport torch\n")
    (tmp_path / "fsam_ds" / "trainer" / "loop.py").write_text("from fsam_ds.zero.engine import SAMEngine\n")
    (tmp_path / "fsam_ds" / "hf" / "trainer.py").write_text("from fsam_ds.trainer.loop import train\n"
                                                           "from fsam_ds.zero.engine import SAMEngine\n")
    (tmp_path / "fsam_ds" / "cli" / "train.py").write_text("from fsam_ds.hf import trainer\n")
    found = direction_violations(tmp_path / "fsam_ds")
    assert found == ["fsam_ds/sam/core.py:1 imports deepspeed (fsam_ds.sam may import torch and the standard "
                     "library only)", "fsam_ds/zero/engine.py:1 imports fsam_ds.trainer.loop",
                     "fsam_ds/cli/train.py:1 imports fsam_ds.hf", "fsam_ds/hf/trainer.py:1 imports fsam_ds.trainer.loop"]


def test_sam_imports_without_deepspeed_or_transformers():
    code = ("import sys; sys.modules['deepspeed'] = None; sys.modules['transformers'] = None; "
            "sys.modules['datasets'] = None; import fsam_ds.sam; import fsam_ds; "
            "print(fsam_ds.SAMOptimizer.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SAMOptimizer"


def test_every_module_has_a_part():
    loose = {p.name for p in PACKAGE.glob("*.py")}
    # the package root holds only its exports and the trainer's stable module path (`-m fsam_ds.train`)
    assert loose == {"__init__.py", "__main__.py", "train.py"}


def test_readme_layout_lists_every_module():
    """The README's layout names every module of the package and the benchmarks, and nothing else."""
    root = PACKAGE.parent
    text = (root / "README.md").read_text()
    section = text[text.index("## Architecture and layout"):]
    block = section.split("```")[1]
    listed, folder = set(), ""
    for line in block.splitlines():
        if line.endswith("/") and not line.startswith(" "):  # a top-level folder heading
            folder = line
        elif folder and line.startswith("  "):  # "  names.py[, more.py]   description"
            names = line.strip().split("  ")[0]
            listed.update(folder + name.strip() for name in names.split(","))
    modules = {path for part in ("fsam_ds", "benchmarks") for path in (root / part).rglob("*.py")}
    on_disk = {str(path.relative_to(root)) for path in modules
               if path.name != "__init__.py" or path.parent == PACKAGE}  # part __init__s only hold docstrings
    assert listed == on_disk


def test_declared_lower_bounds_are_the_tested_versions():
    """Every dependency's lower bound in pyproject.toml is a version the suite runs with: the environment
    satisfies every declared range, and where the CPU install pins a package (constraints-cpu.txt, what CI
    installs), the declared lower bound is that pinned version. A bound lowered below what is tested fails."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (PACKAGE.parent / "constraints-cpu.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version.strip())
    for requirement in declared:
        installed = Version(importlib.metadata.version(requirement.name))
        assert requirement.specifier.contains(installed, prereleases=True), (requirement, installed)
        lower = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
        assert lower, f"{requirement} declares no lower bound"
        if requirement.name.lower() in pins:
            assert lower[0] == pins[requirement.name.lower()], (requirement, pins[requirement.name.lower()])
