"""Packaging for fot, the Focused Transformer / LongLLaMA implementation.

The Triton kernels live in fot/kernels/, not in a top-level kernels/ directory
mapped onto fot.kernels: transformers 5.25 depends on the PyPI package "kernels"
and imports it with transformers, and a kernels/ directory at the checkout's root
shadows it for everything run from there (`python -m ...`, pytest), so that
importing transformers fails. tests/test_packaging.py checks that no module the
checkout puts on sys.path has the name of an installed package.

The checkout's tools install beside fot as the top-level packages train, eval and
benchmarks, with the two they share below them: tasks (every generated text fot
trains or evaluates on) and plumbing (argument parsing, output files, the tokenizer
loader, model presets). So `python -m train.crossbatch`, `python -m eval.passkey`
and the script paths (`python train/crossbatch.py`, `torchrun train/crossbatch.py`)
all import them the same way, with no sys.path edits. They are meant for the
editable install from a checkout that the Makefile makes (`pip install -e .`); fot
itself never imports them. The five names are generic, but fot is not published to
a registry, nothing it depends on probes for them (unlike "kernels"), and the PyPI
projects that hold them are small and unrelated: an environment that needs one of
those next to fot is the one case this choice rules out.
"""

from pathlib import Path

from setuptools import find_packages, setup

# The oldest transformers the tests pass on (the Makefile's test-oldest reads it from here). 5.4 is the
# first release whose PreTrainedConfig runs a subclass's __post_init__, which LongLlamaConfig relies on (on 5.2
# and 5.3 head_dim stays None; 5.0 and 5.1 fail earlier), and 5.6 the first whose GGUF tokenizer survives
# save_pretrained: a SmolLM2 tokenizer converted by 5.4 or 5.5 reloads with a 0 after every word.
TRANSFORMERS_OLDEST = "5.6.0"

setup(
    name="fot",
    version="0.1.0",
    description="Focused Transformer and LongLLaMA for PyTorch and Hugging Face transformers 5",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fot", "fot.*", "train", "eval", "benchmarks", "tasks", "plumbing"]),
    package_data={"fot": ["csrc/*.cpp"]},  # compiled on first use by fot.native
    install_requires=[
        "torch>=2.4",
        f"transformers>={TRANSFORMERS_OLDEST},<6",
        "safetensors",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "faiss": ["faiss-cpu>=1.8"],
        "faiss-gpu": ["faiss-gpu"],
        "triton": ["triton>=3.7.1,<3.8"],  # torch 2.13 wheels are built against triton 3.7.1
        # omegaconf 2.4 is the first whose structured configs take Literal fields (train/config.py).
        "train": ["datasets", "sentencepiece", "protobuf", "wandb", "pyyaml", "omegaconf>=2.4,<3", "tqdm"],
        "eval": ["matplotlib"],
        "dev": ["pytest", "pytest-xdist", "psutil", "matplotlib", "sentencepiece", "protobuf", "pyyaml", "peft"],
        # Loading GGUF checkpoints through transformers (from_pretrained(..., gguf_file=...)).
        "gguf": ["gguf", "accelerate"],
        # Scoring fot models with EleutherAI's lm-evaluation-harness (docs/use_with.md; eval/lmeval_passkey.py).
        "lmeval": ["lm-eval[hf]>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["fot=fot.__main__:main"]},  # fot ask ... (fot/ask.py)
)
