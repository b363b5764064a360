"""Nothing in the repository is importable under the name of an installed package when the project root
(or a test folder pytest puts on sys.path) comes first: `python` started in a checkout imports the
real `kernels`, transformers and peft. transformers 5.25 requires Hugging Face's `kernels`, whose name
our top-level kernels/ folder took while it was a package (issue 22)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _importable(folder: Path) -> set[str]:
    """Top-level names a regular import finds in `folder` before any later sys.path entry: modules and
    regular packages. A folder without __init__.py is at most a namespace portion, which loses to
    any installed module or package of that name."""
    names = set()
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in (".py", ".so", ".pyc"):
            names.add(entry.name.split(".")[0])
    return names


def _installed_top_level() -> dict[str, list[str]]:
    """Import name -> the distributions that install it, ours left out."""
    names = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in names.items() if set(dists) != {"launcher"}}


def test_the_project_root_holds_no_package_but_launcher() -> None:
    assert _importable(ROOT) == {"launcher"}
    for folder in ("kernels", "slurm"):  # installed as launcher.kernels / launcher.slurm from <folder>/src
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ must stay a plain folder"
        assert (ROOT / folder / "src" / "__init__.py").exists()


def test_no_name_on_a_test_path_shadows_an_installed_package() -> None:
    """pytest puts each test folder holding a conftest.py on sys.path (rootdir-relative imports)."""
    installed = _installed_top_level()
    assert "kernels" in installed and "transformers" in installed  # the check sees the real ones
    for folder in [ROOT, *(p.parent for p in TESTS.rglob("conftest.py"))]:
        taken = {name: installed[name] for name in _importable(folder) if name in installed}
        assert not taken, f"{folder}: {taken} would shadow installed packages; rename them"


def test_launcher_kernels_and_slurm_come_from_the_checkout() -> None:
    import kernels as hf_kernels
    import launcher.kernels.attention
    import launcher.slurm

    assert Path(launcher.kernels.attention.__file__).resolve().parent == ROOT / "kernels" / "src"
    assert Path(launcher.slurm.__file__).resolve().parent == ROOT / "slurm" / "src"
    assert "site-packages" in Path(hf_kernels.__file__).parts, hf_kernels.__file__
    assert sys.modules["kernels"] is hf_kernels


def test_every_package_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists packages by hand: one left out is missing from a wheel, while the editable
    install the tests run from still finds it (launcher.runtime.data and launcher.plan.estimate were)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapped = set(setuptools["packages"]), setuptools["package-dir"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "launcher").rglob("__init__.py")}
    found |= {name for name, folder in mapped.items() if (ROOT / folder / "__init__.py").exists()}
    assert listed == found, f"listed only: {sorted(listed - found)}; in the tree only: {sorted(found - listed)}"
