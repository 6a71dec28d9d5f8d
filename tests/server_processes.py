"""Helpers for tests that start `vllm serve` (and other servers) as subprocesses."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
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


def wait_until_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float) -> None:
    """Poll ``{base}/health`` until it answers 200; fail the test with the log's tail if the
    server exits or is not ready within ``timeout_s``."""
    import pytest
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"vllm serve not ready after {timeout_s} s:\n{log_tail(log_path)}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """Terminate, then kill after 60 s."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
