"""Build and load the C++ CPU kernels of ``csrc/`` (plain C ABI, no torch headers: seconds to build).

A library is built once per (source, compiler, flags) into ``~/.cache/vllm-kvevict/kernels/``
(``$XDG_CACHE_HOME`` if set), named by their hash, so every checkout and worktree on a machine
finds its own build and a changed source gets a new one. ``scripts/setup.sh`` builds it
(``python -m vllm_kvevict.kernels.native_build``); a process that finds no build builds it on
first use (atomic rename, so concurrent processes are safe). Where it cannot be built or
loaded (no compiler, no source in a wheel install), callers fall back to torch and
:func:`load` says why in a warning, once.

The libraries are compiled without ``-march``: each kernel picks its instruction set at run time
(AVX-512, AVX2, portable), so a build is valid on any x86-64 CPU. ``-fopenmp`` links
``libgomp.so.1``, which resolves to the copy torch already loaded (same soname), so a kernel's
threads are torch's own OpenMP pool, not a second one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch  # noqa: F401  (loads torch's libgomp before any kernel library needs it)

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-fast-math")

_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_reasons: dict[str, str] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-kvevict" / "kernels"


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path(name: str, cxx: str) -> Path:
    """Where the build of ``csrc/<name>.cpp`` by ``cxx`` lives (its hash names it)."""
    digest = hashlib.sha256()
    digest.update((CSRC / f"{name}.cpp").read_bytes())
    digest.update("\0".join((cxx, *FLAGS)).encode())
    return cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"


def build(name: str) -> Path:
    """Build ``csrc/<name>.cpp`` unless its build exists; returns the library's path.

    Raises ``RuntimeError`` (with the compiler's output) when it cannot be built.
    """
    source = CSRC / f"{name}.cpp"
    if not source.is_file():
        raise RuntimeError(f"kernel source {source} not found (a wheel install ships no csrc/)")
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or $CXX) on PATH")
    target = library_path(name, cxx)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {source}:\n{proc.stderr.strip()}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same hash writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built CPU kernel %s -> %s", source.name, target)
    return target


def load(name: str) -> Optional[ctypes.CDLL]:
    """The loaded library of ``csrc/<name>.cpp`` (built if needed), or None, with a warning once."""
    if name not in _loaded:
        try:
            _loaded[name] = ctypes.CDLL(str(build(name)))
        except (RuntimeError, OSError) as exc:
            _loaded[name] = None
            _reasons[name] = str(exc)
            logger.warning("vllm-kvevict: CPU kernel %s unavailable, the torch path runs instead: %s", name, exc)
    return _loaded[name]


def unavailable_reason(name: str) -> Optional[str]:
    """Why :func:`load` returned None for ``name`` (None if it loaded or was not tried)."""
    return _reasons.get(name)


def main(argv: list[str]) -> int:
    """``python -m vllm_kvevict.kernels.native_build``: build every ``csrc/*.cpp`` (set-up)."""
    names = argv or sorted(p.stem for p in CSRC.glob("*.cpp"))
    for name in names:
        try:
            print(f"[setup] CPU kernel {name}: {build(name)}")
        except RuntimeError as exc:
            print(f"[setup] CPU kernel {name} NOT built (the torch path will run): {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
