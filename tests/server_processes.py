"""Helpers for tests that start `vllm serve` (and other servers) as subprocesses."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path


def vllm_command() -> list[str]:
    """The `vllm` console script of this interpreter's environment (the one with the plugin)."""
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [shutil.which("vllm") or "vllm"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
