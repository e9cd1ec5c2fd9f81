"""Checkpoints that carry their modeling code: ``save_pretrained(save_code=True)`` and ``trust_remote_code=True``.

The load runs in a subprocess where ``import fot`` fails (``python -S`` with site-packages on PYTHONPATH, so
the editable install's path hook never runs) and must give the logits and greedy tokens of the ``import fot``
route exactly.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import fot
from fot.modeling import CODE_CONFIG_FILE, CODE_MODEL_FILE
from tests.reference_format import reference_config_dict
from tests.tiny import tiny_model, tokens

# transformers copies a checkpoint's code into its module cache by following the relative imports of modeling.py.
# Loading fot's code that way is tested from transformers 5.24 (the lock) on; 5.6 copies only some of the modules
# two imports down (budget.py, types.py) and the load stops with FileNotFoundError (docs/use_with.md).
CODE_LOADING_TRANSFORMERS = "5.24.0"
needs_code_loading = pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse(CODE_LOADING_TRANSFORMERS),
    reason=f"loading a checkpoint's own code needs transformers >= {CODE_LOADING_TRANSFORMERS}")


FOT_DIR = Path(fot.__file__).parent
# What checkpoint code may import besides the standard library: fot's own dependencies, all of which transformers
# needs too (numpy included). faiss, triton and psutil are optional and imported inside try blocks (which transformers skips).
CODE_DEPENDENCIES = {"torch", "transformers", "safetensors", "numpy"}

# Run with `python -S` and PYTHONPATH=site-packages, in a temporary folder: the installed packages without their
# .pth files (fot's editable finder is one).
REMOTE_SCRIPT = r"""
import sys
try:
    import fot
except ImportError:
    pass
else:
    sys.exit(f"import fot works here ({fot.__file__}); the test needs an interpreter without it")
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[4]))  # as many as the test's process: the same reductions, the same bits
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
plan = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".plan"]
torch.save({"logits": logits, "generated": generated, "module": type(model).__module__,
            "triton_reason": plan.triton_unavailable_reason(torch.device("cpu"))}, sys.argv[3])
"""


def code_modules() -> list[str]:
    """The fot modules transformers copies for the model and config classes (by its own rules)."""
    files = {FOT_DIR / f"{CODE_MODEL_FILE}.py", FOT_DIR / f"{CODE_CONFIG_FILE}.py"}
    for start in list(files):
        files |= {Path(f) for f in get_relative_import_files(start)}
    return sorted(f.stem for f in files)


def relative_imports(path: Path) -> list[tuple[int, str]]:
    """Every relative import statement of a file, as (line, the module it names), at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [(node.lineno, ("." * node.level) + name) for name in names]
    return found


def test_transformers_copies_every_module_the_code_imports():
    modules = code_modules()
    assert {"modeling", "config", "model", "cache", "attention"} <= set(modules)
    for name in modules:
        path = FOT_DIR / f"{name}.py"
        for line, target in relative_imports(path):
            # transformers follows `from .x import y` only: `from . import x` or a subpackage is never copied
            assert target.startswith(".") and target[1:] in modules, (
                f"fot/{name}.py:{line} imports {target!r}, which transformers does not copy into a checkpoint "
                "saved with save_code=True; write `from .<module> import <names>` for a module of fot/ (a "
                "subpackage such as fot.kernels is imported with importlib, see fot.attention.kernels_package)"
            )
        external = set(get_imports(path)) - set(sys.stdlib_module_names) - CODE_DEPENDENCIES
        assert not external, f"fot/{name}.py needs {sorted(external)} outside a try block; checkpoint code must not"


def test_save_code_writes_the_modules_and_an_auto_map(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, save_code=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "config.LongLlamaConfig",
                                  "AutoModelForCausalLM": "modeling.LongLlamaForCausalLM"}
    assert sorted(p.stem for p in tmp_path.glob("*.py")) == code_modules()
    assert not hasattr(model.config, "auto_map") or model.config.auto_map is None  # the model is left as it was
    assert type(model)._auto_class is None and type(model.config)._auto_class is None


def test_auto_map_of_published_and_own_checkpoints(tmp_path):
    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text(json.dumps(reference_config_dict()))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(published))  # fot is imported: its classes
    assert isinstance(model, fot.LongLlamaForCausalLM)
    hub_map = reference_config_dict()["auto_map"]
    model.save_pretrained(tmp_path / "plain")  # a published auto_map is kept as it is
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["auto_map"] == hub_map
    model.save_pretrained(tmp_path / "code", save_code=True)  # replaced by the files written
    assert set(json.loads((tmp_path / "code" / "config.json").read_text())["auto_map"]) == {
        "AutoConfig", "AutoModelForCausalLM"}
    assert model.config.auto_map == hub_map
    # a checkpoint with code, saved again without: no auto_map naming files that are not there
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "code")
    assert isinstance(again, fot.LongLlamaForCausalLM)  # without trust_remote_code, the installed fot
    again.save_pretrained(tmp_path / "again")
    assert "auto_map" not in json.loads((tmp_path / "again" / "config.json").read_text())
    assert AutoConfig.from_pretrained(tmp_path / "again").mem_layers == model.config.mem_layers


@needs_code_loading
def test_checkpoint_with_code_loads_without_fot_and_matches(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_model(mem_layers=[1, 2]).save_pretrained(ckpt, save_code=True)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64).eval()  # the import fot route
    assert isinstance(model, fot.LongLlamaForCausalLM)
    ids = tokens(1, 150)  # several windows of 64: memory is read
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH=sysconfig.get_paths()["purelib"])
    done = subprocess.run(
        [sys.executable, "-S", "-c", REMOTE_SCRIPT, str(ckpt), str(tmp_path / "ids.pt"),
         str(tmp_path / "out.pt"), str(torch.get_num_threads())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules.")
    assert torch.equal(out["logits"], logits)
    assert torch.equal(out["generated"], generated)
    assert "checkpoint code" in out["triton_reason"]  # attn_impl="auto" takes torch; "triton" says why not


def test_the_installed_package_still_finds_its_kernels():
    from fot.attention import kernels_package

    assert kernels_package().__name__ == "fot.kernels"
