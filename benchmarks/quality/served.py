"""What a user of the server gets: the plugin through the OpenAI API, question inside the prompt.

    python benchmarks/quality/served.py                    # the small default (~10 min on 2 cores)
    python benchmarks/quality/served.py --n-per 4 --lengths 1024,2048 --multiturn-n 6   # SERVED.md

Starts one ``vllm serve`` with the plugin (SmolLM2 by default, float32, blocks of 32 as the
README advises on CPU, ``--kv-eviction criticalkv --kv-budget 1``: every request chooses its own
policy in ``vllm_xargs``, and one sent with ``kv_eviction: none`` is left to stock vLLM),
``--enable-prompt-tokens-details`` so replies say how many prompt tokens came from the prefix
cache. Then

1. ``run.py --target server`` (run ``served``): every prompt under stock vLLM and under each
   policy x granularity x budget, each setting with its own ``cache_salt`` so each prefills every
   prompt itself (rows record ``cached_tokens``: 0 shows it);
2. ``multiturn.py`` (run ``served-multiturn``, with ``--multiturn-n``): two-turn chats.

and stops the server. ``--time-limit`` stops sending requests after that many seconds; the same
command resumes (rows already in ``--out`` are skipped), so a long suite runs in short chunks.
The reference engine on the same prompts: ``run.py --target reference --protocol prompt
--block-size 32`` with the same kinds, lengths, ``--n-per``, policies, granularities and budgets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The kinds SmolLM2-135M answers at full cache (RESULTS.md: 1.00, 0.83, 0.67; FLOOR.md's three).
SOLVED_KINDS = "niah_single,niah_multivalue,qa"
POLICIES = "criticalkv,snapkv,keydiff,streamingllm"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.environ.get("KVEVICT_MODEL_DIR"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/quality/results/served")
    ap.add_argument("--multiturn-out", type=Path, default=ROOT / "benchmarks/quality/results/served-multiturn")
    ap.add_argument("--kinds", default=SOLVED_KINDS)
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--n-per", type=int, default=2, help="prompts per kind x length")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--granularities", default="page,head")
    ap.add_argument("--budgets", default="0.2,0.1")
    ap.add_argument("--multiturn-n", type=int, default=2, help="two-turn chats per kind x length (0: none)")
    ap.add_argument("--multiturn-lengths", default="1024")
    ap.add_argument("--multiturn-policies", default="criticalkv:head,snapkv:head,keydiff:head,streamingllm:page",
                    help="policy:granularity pairs for the two-turn chats (stock vLLM always runs)")
    ap.add_argument("--multiturn-budget", type=float, default=0.1)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds of requests (the same command resumes)")
    ap.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="the server's (default: 4096, or the longest prompt length + 512 if more)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    return ap.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def max_model_len(args: argparse.Namespace) -> int:
    """``--max-model-len``, else room for the longest prompt and its answer (4,096 at least)."""
    if args.max_model_len is not None:
        return args.max_model_len
    longest = max(int(x) for x in f"{args.lengths},{args.multiturn_lengths}".split(",") if x)
    return max(4096, longest + 512)


def serve_command(args: argparse.Namespace, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe) if exe.exists() else (shutil.which("vllm") or "vllm"), "serve", str(args.model_dir),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len(args)), "--block-size", str(args.block_size),
            "--kv-cache-memory-bytes", str(args.kv_cache_bytes), "--host", "127.0.0.1", "--port", str(port),
            "--enable-prompt-tokens-details", "--kv-eviction", "criticalkv", "--kv-budget", "1"]


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(serve_command(args, port), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}; log: {log_path}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit(f"vllm serve not ready after {args.startup_timeout} s; log: {log_path}")
        time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.model_dir:
        raise SystemExit("--model-dir (or $KVEVICT_MODEL_DIR) is required")
    from benchmarks.quality import run

    start = time.monotonic()
    proc, base = start_server(args, args.out / "vllm_serve.log")
    print(f"server ready after {time.monotonic() - start:.0f} s", file=sys.stderr)
    try:
        phase = time.monotonic()
        limit = [] if args.time_limit is None else ["--time-limit", str(args.time_limit)]
        run.main(["--target", "server", "--base-url", base + "/v1", "--out", str(args.out), "--engine-name", "served",
                  "--model-dir", str(args.model_dir), "--kinds", args.kinds, "--lengths", args.lengths,
                  "--n-per", str(args.n_per), "--policies", args.policies, "--granularities", args.granularities,
                  "--budgets", args.budgets, "--concurrency", str(args.concurrency), "--no-report", *limit])
        print(f"grid: {time.monotonic() - phase:.0f} s", file=sys.stderr)
        if args.multiturn_n:
            from benchmarks.quality import multiturn

            phase = time.monotonic()
            left = None if args.time_limit is None else max(0.0, args.time_limit - (phase - start))
            multiturn.main(["--base-url", base + "/v1", "--out", str(args.multiturn_out), "--model-dir",
                            str(args.model_dir), "--lengths", args.multiturn_lengths, "--n", str(args.multiturn_n),
                            "--policies", args.multiturn_policies, "--budget", str(args.multiturn_budget),
                            "--concurrency", str(args.concurrency),
                            *([] if left is None else ["--time-limit", str(left)])])
            print(f"multi-turn: {time.monotonic() - phase:.0f} s", file=sys.stderr)
    finally:
        stop_server(proc)
    print(f"wall time {time.monotonic() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
