"""The repository's layout. Its import graph runs one way: no cycle among its Python files, train/ and eval/ never
import each other, and the layers below them (tasks/, plumbing/, fot/) never import upwards; the README shows the
graph as it is. The scripts' files stay short, or say at their top why not.

Every import statement counts, those inside functions too: a deferred import still ties the two files together,
and a cycle of deferred imports is a cycle that only stays quiet until someone moves an import to the top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which top-level packages a package may import, besides itself (third-party and stdlib imports are not checked).
ALLOWED = {
    "fot": set(),
    "plumbing": {"fot"},
    "tasks": {"fot", "plumbing"},
    "train": {"fot", "plumbing", "tasks"},
    "eval": {"fot", "plumbing", "tasks"},
    "benchmarks": {"fot", "plumbing", "tasks", "eval"},
}


def repository_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of every top-level package (a folder with __init__.py)."""
    modules = {}
    for package in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file() and not p.name.startswith(".")):
        for path in sorted(package.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path: Path, module: str, modules) -> set[str]:
    """The dotted names a file imports, relative imports resolved against ``module``. ``from a.b import c`` names
    ``a.b.c`` when that is one of ``modules``, else ``a.b``: importing a submodule runs its package's __init__
    too, but counting that would make every package with a non-empty __init__ a cycle."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the repository modules it imports (the longest known prefix of each imported name)."""
    modules = repository_modules(root)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module, modules):
            parts = name.split(".")
            known = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                         None)
            if known is not None and known != module:
                targets.add(known)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import that ``ALLOWED`` forbids (train <-> eval, and any layer importing above it)."""
    bad = []
    for module, targets in sorted(graph.items()):
        package = module.split(".")[0]
        if package not in ALLOWED:
            continue  # tests/ may import anything
        bad += [f"{module} -> {t}" for t in sorted(targets)
                if t.split(".")[0] != package and t.split(".")[0] not in ALLOWED[package]]
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_no_import_cycle_in_the_repository(graph):
    found = cycles(graph)
    assert found == [], f"import cycles (each list imports itself round): {found}"


def test_no_file_imports_a_layer_above_it(graph):
    found = upward_imports(graph)
    assert found == [], f"imports against the layering of tests/test_layout.py's ALLOWED: {found}"


@pytest.fixture
def tangled(tmp_path):
    """A small repository with the faults the checks look for: train and eval importing each other, and a cycle of
    deferred imports inside train/."""
    files = {
        "fot/__init__.py": "",
        "fot/model.py": "import torch\n",
        "train/__init__.py": "",
        "train/data.py": "from eval.templates import TEMPLATES\nfrom fot.model import x\n",
        "train/synthetic.py": "def f():\n    from train.tokenizer import g\n",
        "train/tokenizer.py": "def g():\n    from .data import h\n    from . import synthetic\n",
        "eval/__init__.py": "",
        "eval/templates.py": "",
        "eval/passkey.py": "from train import tokenizer\nfrom .templates import T\n",
        "notes/unpackaged.py": "import train.data\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checks_find_cycles_and_upward_imports(tangled):
    graph = import_graph(tangled)
    assert graph["train.tokenizer"] == {"train.data", "train.synthetic"}  # relative imports, inside a function
    assert graph["eval.passkey"] == {"train.tokenizer", "eval.templates"}  # `from package import module`
    assert "notes.unpackaged" not in graph  # only packages are the repository's modules
    assert cycles(graph) == [["train.synthetic", "train.tokenizer"]]
    assert upward_imports(graph) == ["eval.passkey -> train.tokenizer", "train.data -> eval.templates"]


def package_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages it imports (tests/ left out)."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        package = module.split(".")[0]
        if package in ALLOWED:
            out.setdefault(package, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] != package)
    return {package: deps for package, deps in out.items() if deps}


def shown_imports(lead: str) -> dict[str, set[str]]:
    """The README's list that follows ``lead``: items ``A1, A2 ← B1, B2`` separated by ";", ended by ". "."""
    text = " ".join((ROOT / "README.md").read_text().split())
    assert lead in text, f"README.md's Layout has no line starting {lead!r}"
    shown: dict[str, set[str]] = {}
    for item in text.split(lead, 1)[1].split(". ", 1)[0].split(";"):
        importers, imported = item.split("←")
        for name in importers.split(","):
            shown[name.strip(" `")] = {d.strip(" `") for d in imported.split(",")}
    return shown


def test_the_readme_layout_shows_the_imports_as_they_are(graph):
    assert shown_imports("Imports between the packages (A ← B: A imports B): ") == package_imports(graph), \
        "update the package imports in the Layout section of README.md"
    fot = {("__init__" if m == "fot" else m.removeprefix("fot.")): {t.removeprefix("fot.") for t in targets}
           for m, targets in graph.items() if (m == "fot" or m.startswith("fot.")) and targets}
    assert shown_imports("Imports in `fot` (A ← B: A imports B): ") == fot, \
        "update the imports in `fot` in the Layout section of README.md"


LONG = 500  # lines
REASON = "# Over 500 lines: "


def test_long_script_files_say_why_at_their_top():
    """A file of the scripts' packages over ``LONG`` lines opens with a one-line reason (``REASON``...)."""
    long = [f"{path.relative_to(ROOT)} ({n} lines)" for folder in ("train", "eval", "tasks", "plumbing")
            for path in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > LONG and not path.read_text().startswith(REASON)]
    assert long == [], f"split these, or give the reason in a first line starting {REASON!r}: {long}"
