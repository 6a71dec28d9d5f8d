"""A short soak (benchmarks/soak/run.py at CI size): mixed valid, invalid, over-long, streamed and
hung-up requests against one real server; it stays up, leaks no block, answers every invalid
request with a 400 naming its field, and keep-everything requests match a stock server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak"


def test_short_soak(tmp_path):
    sys.path.insert(0, str(SOAK))
    try:
        import run
    finally:
        sys.path.pop(0)
    summary = run.main(["--requests", "60", "--concurrency", "12", "--out", str(tmp_path / "summary.json"),
                        "--work", str(tmp_path / "work")])
    assert summary["requests"] == 60
    assert summary["server_crashes"] == 0
    assert summary["leaked_blocks"] == 0
    assert summary["invalid_all_400"]
    assert summary["outcomes"].get("error", 0) == 0 and summary["kvevict_errors_total"] == 0
    assert summary["outcomes"].get("aborted", 0) > 0 and summary["outcomes"].get("rejected_400", 0) > 0
    assert summary["identity_checked"] > 0 and summary["identity_mismatches"] == 0
