"""Triton kernels for fot, installed as ``fot.kernels``.

Triton is optional (``pip install fot[triton]``). Nothing here imports triton at
package import time: each kernel module imports it itself, and ``fot.attention``
imports those modules lazily, only when a Triton implementation is asked for.
Every kernel has a pure-PyTorch reference in ``fot.attention`` that defines what
it computes; see README.md in this directory.
"""
