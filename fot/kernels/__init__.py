"""Triton kernels for fot, installed as ``fot.kernels``.

Triton is optional (``pip install fot[triton]``). Nothing here imports triton at
package import time: each kernel module imports it itself, and ``fot.attention``
imports those modules lazily, only when a Triton implementation is asked for.
Every kernel has a pure-PyTorch reference in ``fot.attention`` that defines what
it computes; see README.md in this directory.

Accessors:
    unavailable_reason(device) -> str | None   why the kernels cannot run there (None: they can);
                                               never raises, imports triton only if it is installed
    load_memory_attention() -> module          the kernel module; RuntimeError naming the reason if
                                               triton is not installed

There is deliberately no package-level ``memory_attention`` alias: importing the submodule
``fot.kernels.memory_attention`` rebinds that package attribute to the module, so an alias here would
silently change meaning. Call ``load_memory_attention().memory_attention(...)``.

Under the CPU interpreter, TRITON_INTERPRET=1 must be in the environment before the kernel module
is first imported: triton decides interpreted vs compiled when the kernels are defined.
"""

from __future__ import annotations

import importlib
import importlib.util

_MODULE = __name__ + ".memory_attention"


def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def load_memory_attention():
    """Import and return the memory-attention kernel module (imports triton)."""
    if not triton_installed():
        raise RuntimeError("attn_impl='triton' needs the triton package: pip install 'fot[triton]'")
    return importlib.import_module(_MODULE)


def unavailable_reason(device) -> str | None:
    """Why the Triton memory-attention kernel cannot run on ``device`` (a str), or None if it can."""
    if not triton_installed():
        return "the triton package is not installed (pip install 'fot[triton]')"
    return load_memory_attention().unavailable_reason(device)

