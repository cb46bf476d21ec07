"""Installing featx from a clone: what ``pip install -e .`` and ``pip wheel .`` make of the repository.

The wheels are built by the project's own build backend (``[build-system]`` in pyproject.toml), called the
way pip calls it, in a copy of the clone, so no test installs anything into the running environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
# what a clone holds that a build reads
BUILD_INPUTS = ("featx", "pyproject.toml", "README.md", "pytest_featx.py")


def clone(into: Path) -> Path:
    """A copy of the repository's build inputs in a folder named ``featx`` under ``into``."""
    copy = into / "featx"
    copy.mkdir()
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / name)
    return copy


def build(project: Path, hook: str, out: Path) -> Path:
    """Run the build backend's ``hook`` (``build_wheel``, ``build_editable``) in ``project``, as pip does."""
    system = tomllib.loads((project / "pyproject.toml").read_text())["build-system"]
    backend = system["build-backend"]
    module, _, attribute = backend.partition(":")
    out.mkdir()
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = {[str(project / p) for p in system.get('backend-path', [])]!r}\n"
        f"backend = importlib.import_module({module!r})\n"
        + (f"backend = backend.{attribute}\n" if attribute else "")
        + f"print(backend.{hook}({str(out)!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=_without_pythonpath(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def _without_pythonpath() -> dict[str, str]:
    """The environment without PYTHONPATH: the worktree under test must not be importable by that path."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_an_editable_install_of_a_clone_named_featx_imports_from_the_clones_parent_folder(tmp_path):
    project = clone(tmp_path)
    wheel = build(project, "build_editable", tmp_path / "dist")
    site_dir = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site_dir)
    # `python -c` puts the working directory first on sys.path, where the clone `featx/` is a folder without
    # an __init__.py: a namespace package, unless the install puts the real package ahead of it
    # `-S`, then the install under test ahead of the interpreter's own site-packages: those may hold this
    # checkout's own editable install (as CI's clone has), which must not be what is found
    code = (
        f"import site; site.addsitedir({str(site_dir)!r})\n"
        "for d in site.getsitepackages(): site.addsitedir(d)\n"
        "import featx\n"
        "print(featx.__file__)\n"
        "featx.verify\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env=_without_pythonpath(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(project / "featx" / "__init__.py")


def test_the_wheel_holds_the_package_its_type_hints_and_the_pytest_plugin(tmp_path):
    wheel = build(clone(tmp_path), "build_wheel", tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"featx/__init__.py", "featx/py.typed", "featx/cli/__init__.py", "pytest_featx.py"} <= names
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"featx", "pytest_featx.py"}  # no tests, benchmarks or examples as top-level packages
