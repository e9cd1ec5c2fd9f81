"""train/, eval/, benchmarks/, tasks/ and plumbing/ are packages installed beside fot: `python -m train.crossbatch` and the script
paths (`python train/crossbatch.py`) both work from any directory, no source file edits sys.path, and nothing
the checkout puts on sys.path shadows an installed package."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Without PYTHONPATH, what imports is what the environment installed, as for a user.
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180)


def test_tool_packages_import_from_this_checkout(tmp_path):
    proc = run(["-c", "import train, eval, benchmarks, tasks, plumbing, fot; print(train.__file__, eval.__file__, "
                      "benchmarks.__file__, tasks.__file__, plumbing.__file__, fot.__file__)"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = [Path(p).parent for p in proc.stdout.split()]
    expected = [ROOT / name for name in ("train", "eval", "benchmarks", "tasks", "plumbing", "fot")]
    assert found == expected, f"the environment imports {found}; reinstall this checkout: pip install --no-deps -e ."


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["-m", "train.crossbatch", "--help"],
    [str(ROOT / "train" / "crossbatch.py"), "--help"],
    ["-m", "eval.passkey", "--help"],
    [str(ROOT / "eval" / "perplexity.py"), "--help"],
    ["-m", "benchmarks.prefill", "--help"],
    [str(ROOT / "benchmarks" / "memory_scaling.py"), "--help"],
], ids=lambda a: " ".join(Path(x).name if "/" in x else x for x in a))
def test_module_and_script_paths_run_from_elsewhere(tmp_path, args):
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_no_source_file_edits_sys_path():
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*(\+=|=[^=])")
    hits = [f"{path.relative_to(ROOT)}:{n}" for folder in ("fot", "train", "eval", "benchmarks", "tasks", "plumbing", "tests")
            for path in sorted((ROOT / folder).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if edit.search(line) and path != Path(__file__)]
    assert hits == []


def top_level_names(folder):
    """The import names a folder offers when it is on sys.path: its modules and its packages."""
    for path in folder.iterdir():
        if path.suffix == ".py":
            yield path.stem
        elif (path / "__init__.py").is_file():
            yield path.name


@pytest.mark.parametrize("folder", ["", "train", "eval", "benchmarks", "tasks", "plumbing", "tests"],
                         ids=lambda f: f or "root")
def test_nothing_on_sys_path_shadows_an_installed_package(folder):
    """`python -m ...` and pytest put the checkout's root first on sys.path, and a script run puts its own folder
    there. A module or package in one of those folders with the name of an installed package (or of the standard
    library) hides that package from everything, transformers included: a top-level kernels/ broke `import
    transformers` once transformers 5.25 began to depend on the PyPI package "kernels"."""
    installed = importlib.metadata.packages_distributions()
    clashes = sorted(f"{name} (installed by {', '.join(installed[name])})" if name in installed else f"{name} (stdlib)"
                     for name in top_level_names(ROOT / folder)
                     if set(installed.get(name, [])) - {"fot"} or name in sys.stdlib_module_names)
    assert clashes == [], f"rename these in {folder or 'the root'}/: {clashes}"
