"""fot's compiled CPU kernels (fot/csrc), built on first use with the system's C++ compiler and loaded with ctypes.

A kernel is one C++ file with a plain C ABI, so building it needs a compiler and nothing else: no Python or
torch headers, no build system. The shared library is cached under ``$FOT_CACHE_DIR`` (default
``~/.cache/fot/native``), named by a hash of the source, the compiler command and this CPU's instruction-set
flags (it is built with ``-march=native``), and written atomically, so concurrent first uses and a copied cache
on another CPU are both safe. ``CXX`` names the compiler (default ``g++``, then ``c++``).

A model that asks for a compiled backend runs it or raises: there is no silent fallback to another backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")

_LOADED: dict[str, ctypes.CDLL] = {}


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (Linux), or the machine name: part of the cache key of a -march=native build."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler() -> str:
    for name in ([os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("fot: the ivf-scan search needs a C++ compiler to build its kernel and none was found "
                       "(install one, e.g. `apt install g++`, or set CXX), or choose mem_index='ivf-gemm' or "
                       "'faiss-ivf'.")  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("FOT_CACHE_DIR") or Path.home() / ".cache" / "fot") / "native"


def load(name: str) -> ctypes.CDLL:
    """The library built from fot/csrc/``name``.cpp, compiled now if this source, compiler and CPU have no build
    in the cache yet."""
    if name in _LOADED:
        return _LOADED[name]
    source = CSRC / f"{name}.cpp"
    if not source.exists():  # checkpoint code (save_code=True) carries the .py files, not fot/csrc
        raise RuntimeError(f"fot: the {name} kernel's source ships with the installed fot, not with a checkpoint's "
                           "code; install fot and load the checkpoint after `import fot`, or choose "
                           "mem_index='ivf-gemm'.")  # fmt: skip
    cxx = _compiler()
    key = hashlib.sha256(source.read_bytes() + " ".join((cxx, *CXXFLAGS)).encode() + _cpu_flags().encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cxx, *CXXFLAGS, str(source), "-o", tmp]
        logger.info("fot: building the %s kernel: %s", name, " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"fot: building the {name} kernel failed ({' '.join(cmd)}):\n{done.stderr.strip()}")
            os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    _LOADED[name] = lib
    return lib


def ivf_scan():
    """``fot_ivf_scan`` from fot/csrc/ivf_scan.cpp, with its argument types declared."""
    lib = load("ivf_scan")
    fn = lib.fot_ivf_scan
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    fn.argtypes = [p, i64, i64, p, i64, i64, p, p, p, i64, p, i32, i64, i64, p, i64, i64, i64, i64, i64, i32, p, p]
    fn.restype = ctypes.c_int
    return fn


def ivf_lists():
    """``fot_ivf_lists`` from fot/csrc/ivf_scan.cpp, with its argument types declared."""
    fn = load("ivf_scan").fot_ivf_lists
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, i64, i64, i64, i64, p, p, p]
    fn.restype = ctypes.c_int64
    return fn


def top_rows():
    """``fot_top_rows`` from fot/csrc/ivf_scan.cpp, with its argument types declared."""
    fn = load("ivf_scan").fot_top_rows
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, p]
    fn.restype = ctypes.c_int
    return fn


def topk_attend():
    """``fot_topk_attend`` from fot/csrc/ivf_scan.cpp, with its argument types declared."""
    fn = load("ivf_scan").fot_topk_attend
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    fn.argtypes = [p, p, i64, i64, i64, p, i32, i64, i64, ctypes.c_float, i32, p, p]
    fn.restype = ctypes.c_int
    return fn
