"""`passes/` and `targets/` install inside the package, both as a normal and as an editable install.

Each install goes into its own folder and is imported by a fresh interpreter that sees only that folder
(plus the venv's third-party packages, without processing their .pth files, so the developer's own install
of ohq-tvm cannot answer in its place).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import ohq_tvm
import ohq_tvm.passes

PROBE = textwrap.dedent("""
    import importlib, json, site, sys
    site.addsitedir(sys.argv[1])          # processes the editable install's .pth finder
    sys.path.append(sys.argv[2])          # third-party packages, .pth files not processed
    # An editable finder sits behind sys.path's finder; put it first so a copy of ohq-tvm installed in
    # the third-party folder cannot answer for it.
    sys.meta_path.sort(key=lambda finder: "__editable__" not in getattr(finder, "__module__", ""))
    for module in json.loads(sys.argv[3]):
        importlib.import_module(module)
    import ohq_tvm, ohq_tvm.passes, ohq_tvm.targets
    print(json.dumps({
        "package": ohq_tvm.__file__,
        "passes": ohq_tvm.passes.__file__,
        "targets": ohq_tvm.targets.__file__,
        "boards": ohq_tvm.targets.builtin_board_names(),
    }))
""")


def _repo() -> Path:
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "pyproject.toml").is_file():
        pytest.skip("needs the source tree next to the tests")
    return repo


def source_modules(repo: Path) -> list[str]:
    """Every importable module of the source tree, by its installed name."""
    roots = {
        "ohq_tvm": repo / "ohq_tvm",
        "ohq_tvm.passes": repo / "passes",
        "ohq_tvm.targets": repo / "targets",
    }
    modules = []
    for prefix, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(root).with_suffix("").parts
            if prefix == "ohq_tvm" and parts[0] in {"passes", "targets"}:
                continue
            name = ".".join((prefix, *parts))
            modules.append(name.removesuffix(".__init__").removesuffix(".__main__"))
    return sorted(set(modules) - {"ohq_tvm"})


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    repo = _repo()
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"ohq_tvm", "ohq_tvm.passes", "ohq_tvm.targets"}
    for init in (repo / "ohq_tvm").rglob("__init__.py"):
        folders.add(".".join(("ohq_tvm", *init.parent.relative_to(repo / "ohq_tvm").parts)))
    assert listed == folders


def _source_tree(tmp_path: Path) -> Path:
    """A copy of the project's sources, so builds write nothing into the working tree."""
    repo = _repo()
    copy = tmp_path / "src"
    skip_anywhere = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(skip_anywhere(folder, names))
        if Path(folder) == repo:  # build outputs and environments at the top only, not nested folders
            skipped |= {".venv", ".git", "build", "dist", "demo-out"} & set(names)
        return skipped

    shutil.copytree(repo, copy, ignore=ignore)
    return copy


def _probe(site_dir: Path) -> dict:
    purelib = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(site_dir), purelib, json.dumps(source_modules(_repo()))],
        capture_output=True,
        text=True,
        cwd=site_dir,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_normal_install_maps_passes_and_targets_into_the_package(tmp_path):
    source = _source_tree(tmp_path)
    site_dir = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site_dir),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    found = _probe(site_dir)
    assert found["passes"] == str(site_dir / "ohq_tvm" / "passes" / "__init__.py")
    assert found["targets"] == str(site_dir / "ohq_tvm" / "targets" / "__init__.py")
    assert (site_dir / "ohq_tvm" / "targets" / "rpi4b.toml").is_file()
    assert {"host", "rpi4b"} <= set(found["boards"])
    # The renamed package, and its old name as a plain module (a folder would shadow it).
    assert (site_dir / "ohq_tvm" / "codegen" / "verify.py").is_file()
    assert (site_dir / "ohq_tvm" / "build.py").is_file()
    assert not (site_dir / "ohq_tvm" / "build").exists()


def test_editable_install_maps_passes_and_targets_to_the_source_folders(tmp_path):
    source = _source_tree(tmp_path)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))",
            str(tmp_path / "wheel"),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = tmp_path / "wheel" / build.stdout.strip().splitlines()[-1]
    shutil.unpack_archive(str(wheel), str(site_dir), format="zip")
    found = _probe(site_dir)
    assert found["package"] == str(source / "ohq_tvm" / "__init__.py")
    assert found["passes"] == str(source / "passes" / "__init__.py")
    assert found["targets"] == str(source / "targets" / "__init__.py")
    assert {"host", "rpi4b"} <= set(found["boards"])


def test_the_suite_imports_an_installed_package():
    # The repository root is kept off sys.path (importlib import mode), so the package under test is
    # an installed distribution: site-packages, or an editable finder pointing at the source tree.
    repo = Path(__file__).resolve().parents[1]
    assert str(repo) not in sys.path and "" not in sys.path
    assert importlib.metadata.version("ohq-tvm") == ohq_tvm.__version__
    assert ohq_tvm.passes.__name__ == "ohq_tvm.passes"
