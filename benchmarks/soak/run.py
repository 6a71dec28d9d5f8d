"""Soak: many mixed requests against one real `vllm serve` with the plugin, then its health.

One server (tiny random Llama by default, a small KV cache so that preemption happens) gets
``--requests`` requests from ``--concurrency`` clients on loopback: random scorer / allocation /
granularity / budget per request (budget 1 and ``none`` included), prompts of 100 tokens to near
``--max-model-len``, streamed or not, about a quarter hung up mid-stream, about a tenth invalid
(every invalid setting and JSON type of the config, and malformed ``vllm_xargs``), a few over
the model's length. Then: did the server stay up, did every invalid request get a 400 naming its
field, are vLLM's KV blocks all free again at idle, and are the keep-everything requests' greedy
outputs the same as a stock server's on the same prompts.

    python benchmarks/soak/run.py                         # 1000 requests, ~15 min on 2 cores
    python benchmarks/soak/run.py --requests 60           # the CI-sized run of tests/integration/test_soak.py

Writes ``summary.json`` next to this script (or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))

from requests_mix import Job, make_jobs  # noqa: E402
from server_processes import free_port, stop, vllm_command  # noqa: E402

MODEL_NAME = "soak"


def start_server(model: str, port: int, log_path: Path, max_model_len: int, kv_bytes: int, eviction: bool):
    argv = [*vllm_command(), "serve", model, "--served-model-name", MODEL_NAME, "--dtype", "float32",
            "--enforce-eager", "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(kv_bytes),
            "--block-size", "32", "--max-num-seqs", "16", "--host", "127.0.0.1", "--port", str(port)]
    if eviction:
        argv += ["--kv-eviction", "snapkv", "--kv-budget", "1"]
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}: see {log_path}")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return proc, base, log
        except requests.RequestException:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"vllm serve not ready after 600 s: see {log_path}")


def gauge(base: str, name: str) -> float:
    """Sum over label sets of one gauge on ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(requests.get(base + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def wait_idle(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gauge(base, "vllm:num_requests_running") == 0 and gauge(base, "vllm:num_requests_waiting") == 0:
            return
        time.sleep(1)


def run_job(base: str, job: Job) -> dict:
    body = {"model": MODEL_NAME, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": job.stream}
    if job.xargs is not None:
        body["vllm_xargs"] = job.xargs
    started = time.monotonic()
    result = {"index": job.index, "kind": job.kind}
    try:
        with requests.post(base + "/v1/completions", json=body, stream=job.stream, timeout=600) as response:
            result["status"] = response.status_code
            if response.status_code != 200:
                try:
                    result["param"] = response.json().get("error", {}).get("param")
                except ValueError:
                    result["param"] = None
            elif job.stream:
                chunks, text = 0, []
                for line in response.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunks += 1
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    if job.abort_after is not None and chunks >= job.abort_after:
                        result["aborted"] = True
                        break
                result["text"] = "".join(text)
            else:
                result["text"] = response.json()["choices"][0]["text"]
    except requests.RequestException as exc:
        result["status"], result["error"] = None, f"{type(exc).__name__}: {exc}"
    result["seconds"] = time.monotonic() - started
    return result


def outcome(job: Job, result: dict) -> str:
    status = result.get("status")
    if job.kind == "valid":
        if status == 200:
            return "aborted" if result.get("aborted") else "ok"
        return "error"
    if status != 400:
        return "error"
    if job.kind == "invalid" and job.expect_param is not None and result.get("param") != job.expect_param:
        return "wrong_400"
    return "rejected_400"


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": round(statistics.fmean(ordered), 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the tiny random Llama, made here)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-bytes", type=int, default=4 << 20, help="small: preemption happens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop submitting after this long")
    parser.add_argument("--out", type=Path, default=HERE / "summary.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvevict-soak"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or make_tiny(args.work)
    jobs = make_jobs(args.requests, args.seed, args.max_model_len)
    started = time.monotonic()
    proc, base, log = start_server(model, free_port(), args.work / "serve.log", args.max_model_len,
                                   args.kv_cache_bytes, eviction=True)
    crashes, results = 0, []
    try:
        wait_idle(base)
        num_blocks = gauge(base, "kvevict_cache_blocks")
        usage_before = gauge(base, "vllm:kv_cache_usage_perc")
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(lambda j=j: run_job(base, j) if time.monotonic() - started < args.max_seconds
                                   else {"index": j.index, "kind": j.kind, "skipped": True}) for j in jobs]
            results = [f.result() for f in futures]
        crashes += proc.poll() is not None
        wait_idle(base)
        healthy = proc.poll() is None and requests.get(base + "/health", timeout=10).status_code == 200
        crashes += not healthy
        usage_after = gauge(base, "vllm:kv_cache_usage_perc") if healthy else float("nan")
        preemptions = gauge(base, "vllm:num_preemptions_total") if healthy else float("nan")
        errors_total = gauge(base, "kvevict_errors_total") if healthy else float("nan")
    finally:
        stop(proc)
        log.close()
    done = [(j, r) for j, r in zip(jobs, results) if not r.get("skipped")]
    counts: dict[str, int] = {}
    for job, result in done:
        counts[outcome(job, result)] = counts.get(outcome(job, result), 0) + 1
    identity = [(j, r) for j, r in done if j.identity and r.get("status") == 200 and not r.get("aborted")]
    mismatches = compare_with_stock(model, args, identity)
    summary = {
        "requests": len(done),
        "concurrency": args.concurrency,
        "server_crashes": int(crashes),
        "leaked_blocks": round((usage_after - usage_before) * num_blocks),
        "num_blocks": int(num_blocks),
        "preemptions": int(preemptions) if preemptions == preemptions else None,
        "kvevict_errors_total": int(errors_total) if errors_total == errors_total else None,
        "invalid_all_400": all(outcome(j, r) == "rejected_400" for j, r in done if j.kind != "valid"),
        "outcomes": dict(sorted(counts.items())),
        "identity_checked": len(identity),
        "identity_mismatches": mismatches,
        "latency_s": percentiles([r["seconds"] for j, r in done if outcome(j, r) == "ok"]),
        "wall_s": round(time.monotonic() - started, 1),
        "device": "cpu",
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def compare_with_stock(model: str, args, identity: list) -> int:
    """Replay the keep-everything requests on a stock server (no eviction), one at a time."""
    if not identity:
        return 0
    proc, base, log = start_server(model, free_port(), args.work / "stock.log", args.max_model_len,
                                   args.kv_cache_bytes, eviction=False)
    try:
        mismatches = 0
        for job, result in identity:
            plain = Job(job.index, "valid", job.prompt, job.max_tokens, False)
            mismatches += run_job(base, plain).get("text") != result.get("text")
        return mismatches
    finally:
        stop(proc)
        log.close()


def make_tiny(work: Path) -> str:
    from vllm_kvevict.reference.tiny import make_tiny_llama

    model_dir = Path(os.environ.get("KVEVICT_MODEL_DIR", Path.home() / ".cache/vllm-kvevict/SmolLM2-135M-Instruct"))
    return str(make_tiny_llama(work / "tiny-llama", model_dir))


if __name__ == "__main__":
    summary = main()
    failed = summary["server_crashes"] or summary["leaked_blocks"] or not summary["invalid_all_400"]
    raise SystemExit(1 if failed else 0)
