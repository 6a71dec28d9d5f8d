"""kvevict_* metrics of a real `vllm serve` (CPU, SmolLM2-135M) against vLLM's own pool, and the
Grafana dashboard's every PromQL query against a real Prometheus (Debian's) scraping it.

One server and one Prometheus per module, started together (Prometheus scrapes from the first
request on): ``--kv-eviction=snapkv --kv-budget=1 --kv-granularity=page`` (requests opt in),
block size 32; the prompts share no block, so each request holds its own (usage is exact).
Prometheus comes from ``scripts/fetch_prometheus.sh`` (run by ``scripts/setup.sh``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_processes import free_port, log_tail, stop, vllm_command, wait_until_healthy

requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
import dashboard as grafana_dashboard  # noqa: E402  (deploy/grafana/dashboard.py)
import render as grafana_render  # noqa: E402  (deploy/grafana/render.py)

STARTUP_TIMEOUT_S = 600
MODEL_NAME = "smollm2"
BLOCK = 32
#: 40 full blocks + 2 tokens: the prompt and up to 30 decoded tokens stay in 41 blocks.
PROMPT_LEN = 40 * BLOCK + 2
DECODE = 28
TOOLS = Path(os.environ.get("KVEVICT_TOOLS_DIR", Path.home() / ".cache/vllm-kvevict/tools"))
PROMETHEUS = TOOLS / "prometheus/usr/bin/prometheus"
SCRAPE_S = 1


def prometheus_binary() -> Path:
    if not PROMETHEUS.exists():
        subprocess.run(["bash", str(ROOT / "scripts/fetch_prometheus.sh")], check=False)
    if not PROMETHEUS.exists():
        if shutil.which("apt-get") is None:
            pytest.skip("no Prometheus and no apt-get to fetch Debian's (scripts/fetch_prometheus.sh)")
        pytest.fail(f"{PROMETHEUS} missing after scripts/fetch_prometheus.sh")
    return PROMETHEUS


@pytest.fixture(scope="module")
def stack(smollm2_dir, tmp_path_factory):
    """``{"base", "prom", "proc", "log"}``: the server and a Prometheus scraping it every second."""
    prometheus = prometheus_binary()
    folder = tmp_path_factory.mktemp("metrics-stack")
    port, prom_port = free_port(), free_port()
    config = folder / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_S}s\nscrape_configs:\n"
        f"  - job_name: vllm\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    )
    prom_log = open(folder / "prometheus.log", "w")
    prom = subprocess.Popen(
        [str(prometheus), f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=prom_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log_path = folder / "vllm_serve.log"
    log = open(log_path, "w")
    argv = [
        *vllm_command(), "serve", str(smollm2_dir), "--served-model-name", MODEL_NAME,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--block-size", str(BLOCK),
        "--kv-cache-memory-bytes", str(128 * 2**20),
        "--host", "127.0.0.1", "--port", str(port),
        "--kv-eviction", "snapkv", "--kv-budget", "1", "--kv-granularity", "page",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base, log_path, STARTUP_TIMEOUT_S)
        assert prom.poll() is None, log_tail(folder / "prometheus.log")
        yield {"base": base, "prom": f"http://127.0.0.1:{prom_port}", "proc": proc, "log": log_path}
    finally:
        stop(proc)
        stop(prom)
        log.close()
        prom_log.close()


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: ``(name, labels) -> value``."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(requests.get(base + "/metrics", timeout=10).text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def prompt_ids(seed: int, n: int = PROMPT_LEN) -> list[int]:
    return [1000 + (seed * 7919 + i * 104729) % 40000 for i in range(n)]


def stream_and_scrape(base: str, xargs: dict, seed: int, after_chunks: int = 1) -> dict:
    """Stream a completion; scrape /metrics right after its ``after_chunks``-th streamed chunk,
    while it decodes."""
    body = {
        "model": MODEL_NAME, "prompt": prompt_ids(seed), "max_tokens": DECODE, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "vllm_xargs": xargs,
    }  # fmt: skip
    with requests.post(base + "/v1/completions", json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith(b"data: {")
            if seen == after_chunks:
                break
        during = scrape(base)
        for _ in lines:  # drain: the request finishes
            pass
    assert total(during, "vllm:num_requests_running") == 1, "the request finished before the scrape"
    return during


def used_blocks(samples: dict) -> int:
    """Blocks in use per vLLM's own gauge (usage = 1 - free / (blocks - 1 null block))."""
    blocks = total(samples, "kvevict_cache_blocks")
    return round(total(samples, "vllm:kv_cache_usage_perc") * (blocks - 1))


def test_metrics_match_the_pool(stack, smollm2_dir):
    base = stack["base"]
    before = scrape(base)
    config = json.loads((smollm2_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    block_bytes = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4 * BLOCK
    info = [ls for (n, ls) in before if n == "vllm:cache_config_info"][0]
    assert total(before, "kvevict_cache_blocks") == int(dict(info)["num_gpu_blocks"])
    assert total(before, "kvevict_block_size_tokens") == BLOCK

    stock = stream_and_scrape(base, {"kv_eviction": "none"}, seed=1)
    assert used_blocks(stock) == math.ceil(PROMPT_LEN / BLOCK)  # everything held
    evict = stream_and_scrape(base, {"kv_eviction": "snapkv", "kv_budget": 0.2}, seed=2)
    after = scrape(base)

    def grew(samples, name, **labels):
        return total(samples, name, **labels) - total(before, name, **labels)

    page = dict(policy="snapkv", granularity="page")
    returned = grew(evict, "kvevict_blocks_returned_total")
    evicted_blocks = grew(evict, "kvevict_blocks_evicted_total", **page)
    evicted_tokens = grew(evict, "kvevict_tokens_evicted_total", **page)
    # The pool's change: blocks the stock request held minus those the evicting one holds.
    assert used_blocks(stock) - used_blocks(evict) == returned == evicted_blocks
    assert returned >= math.ceil(PROMPT_LEN / BLOCK) - math.ceil(0.2 * PROMPT_LEN / BLOCK) - 3
    assert evicted_tokens == evicted_blocks * BLOCK
    assert total(evict, "kvevict_block_bytes") == block_bytes
    assert grew(evict, "kvevict_bytes_returned_total") == returned * block_bytes
    # While it decodes: stock vLLM would hold every position; it holds all but the evicted.
    logical, held = total(evict, "kvevict_logical_tokens", **page), total(evict, "kvevict_held_tokens", **page)
    assert PROMPT_LEN <= logical < PROMPT_LEN + DECODE
    assert logical - held == evicted_tokens
    assert total(after, "kvevict_held_tokens", **page) == total(after, "kvevict_logical_tokens", **page) == 0
    kept = (PROMPT_LEN - evicted_tokens) / PROMPT_LEN
    assert grew(after, "kvevict_compression_ratio_sum", **page) == pytest.approx(kept)
    assert grew(after, "kvevict_memory_efficiency_sum", **page) == pytest.approx(1.0)  # pages: held = ideal
    heads = config["num_hidden_layers"] * config["num_key_value_heads"]
    assert grew(after, "kvevict_head_kept_tokens_count", **page) == heads
    assert total(after, "kvevict_last_head_kept_tokens", **page, stat="min") == PROMPT_LEN - evicted_tokens
    assert grew(after, "kvevict_requests_total", **page, outcome="evicted") == 1
    assert grew(after, "kvevict_requests_total", policy="none", outcome="opted_out") == 1
    assert grew(after, "kvevict_eviction_seconds_count", **page) == 1
    assert grew(after, "kvevict_scoring_seconds_count", **page) == 1
    assert total(after, "kvevict_errors_total") == 0
    for name, labels in after:
        if name.startswith("kvevict_"):
            assert {k for k, _ in labels} <= {"model_name", "engine", "policy", "granularity", "outcome", "stage", "stat", "le"}


def test_head_granularity_metrics_match_the_pool(stack, smollm2_dir):
    """A head-granular request (criticalkv + adakv): blocks returned = the pool's change against
    stock, and its memory efficiency and per-head spread are exported."""
    base = stack["base"]
    before = scrape(base)
    config = json.loads((smollm2_dir / "config.json").read_text())
    # compaction lands one step after the first token: scrape a few tokens in
    during = stream_and_scrape(base, {"kv_eviction": "criticalkv", "kv_budget": 0.2, "kv_granularity": "head"},
                               seed=3, after_chunks=4)
    after = scrape(base)
    head = dict(policy="criticalkv", granularity="head")

    def grew(samples, name, **labels):
        return total(samples, name, **labels) - total(before, name, **labels)

    returned = grew(during, "kvevict_blocks_returned_total")
    stock_blocks = math.ceil((PROMPT_LEN + 4) / BLOCK)
    assert returned > 0 and stock_blocks - used_blocks(during) == returned
    assert grew(during, "kvevict_blocks_evicted_total", **head) == returned
    assert grew(after, "kvevict_requests_total", **head, outcome="evicted") == 1
    heads = config["num_hidden_layers"] * config["num_key_value_heads"]
    assert grew(after, "kvevict_head_kept_tokens_count", **head) == heads
    kept_min = total(after, "kvevict_last_head_kept_tokens", **head, stat="min")
    kept_max = total(after, "kvevict_last_head_kept_tokens", **head, stat="max")
    assert 0 < kept_min <= int(0.2 * PROMPT_LEN) <= kept_max  # Ada-KV: unequal heads, mean = budget
    efficiency = grew(after, "kvevict_memory_efficiency_sum", **head)
    assert 0.8 <= efficiency <= 1.0
    assert total(after, "kvevict_held_tokens", **head) == total(after, "kvevict_logical_tokens", **head) == 0
    assert total(after, "kvevict_errors_total") == 0


def test_outcomes_skipped_rejected_and_another_eviction(stack):
    base = stack["base"]
    # Prometheus must see the histograms' series before this second eviction, so that rate()
    # finds an increase in the dashboard test below.
    deadline = time.monotonic() + 60
    while not prom_query(stack["prom"], "kvevict_compression_ratio_count"):
        assert time.monotonic() < deadline, "Prometheus never scraped the server"
        time.sleep(SCRAPE_S)
    before = scrape(base)
    short = {"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 2, "vllm_xargs": {"kv_eviction": "snapkv", "kv_budget": 0.2}}
    assert requests.post(base + "/v1/completions", json=short, timeout=120).status_code == 200
    bad = {**short, "vllm_xargs": {"kv_eviction": "snapk"}}
    assert requests.post(base + "/v1/completions", json=bad, timeout=120).status_code == 400
    evicting = {**short, "prompt": prompt_ids(3, n=12 * BLOCK)}
    assert requests.post(base + "/v1/completions", json=evicting, timeout=300).status_code == 200
    deadline = time.monotonic() + 30
    while True:  # engine stats reach the front-end with its next outputs
        after = scrape(base)
        grew = lambda outcome, **labels: total(after, "kvevict_requests_total", outcome=outcome, **labels) - total(  # noqa: E731
            before, "kvevict_requests_total", outcome=outcome, **labels
        )
        if grew("evicted") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grew("skipped_short", policy="snapkv", granularity="page") == 1
    assert grew("rejected", policy="other") == 1  # counted by the API server process itself
    assert grew("evicted", policy="snapkv", granularity="page") == 1
    assert grew("opted_out") == 0


def prom_query(prom: str, expr: str) -> list[dict]:
    r = requests.get(prom + "/api/v1/query", params={"query": expr}, timeout=30)
    assert r.status_code == 200, (expr, r.text)
    return r.json()["data"]["result"]


def test_decode_time_eviction_counters(stack):
    """A request re-evicted every 32 generated tokens counts its decode-time evictions and the
    blocks they returned (the dashboard's "Decode-time evictions" panel reads these)."""
    base = stack["base"]
    before = scrape(base)
    body = {
        "model": MODEL_NAME, "prompt": prompt_ids(5, n=12 * BLOCK), "max_tokens": 3 * 32 + 4, "temperature": 0.0,
        "ignore_eos": True,
        "vllm_xargs": {"kv_eviction": "snapkv", "kv_granularity": "page", "kv_budget": 0.2, "kv_decode_interval": 32},
    }  # fmt: skip
    response = requests.post(base + "/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 30
    while True:  # engine stats reach the front-end with its next outputs
        after = scrape(base)
        grew = lambda name: total(after, name, policy="snapkv", granularity="page") - total(  # noqa: E731
            before, name, policy="snapkv", granularity="page"
        )
        if grew("kvevict_decode_evictions_total") >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grew("kvevict_decode_evictions_total") == 3
    assert grew("kvevict_decode_blocks_returned_total") >= 1
    assert total(after, "kvevict_errors_total") == 0


def test_every_dashboard_query_returns_data(stack, tmp_path):
    """Runs after the two tests above sent traffic (same module; 2-minute rate windows)."""
    prom, base = stack["prom"], stack["base"]
    deadline = time.monotonic() + 60
    while not prom_query(prom, 'kvevict_requests_total{outcome="rejected"}'):  # scraped after the traffic
        assert time.monotonic() < deadline, "Prometheus never scraped the server"
        time.sleep(SCRAPE_S)
    time.sleep(3 * SCRAPE_S)
    empty = []
    for title, expr in grafana_dashboard.queries():
        result = prom_query(prom, grafana_render.substitute(expr, rate="2m"))
        values = [float(s["value"][1]) for s in result]
        if not values or all(math.isnan(v) for v in values):
            empty.append(f"{title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    # The model variable's values, as Grafana's label_values() asks the series API.
    r = requests.get(prom + "/api/v1/label/model_name/values", params={"match[]": "vllm:num_requests_running"}, timeout=30)
    assert r.json()["data"] == [MODEL_NAME]
    # The PNG renderer draws every panel from the same Prometheus.
    end = time.time()
    drawn = grafana_render.render(prom, tmp_path / "dashboard.png", end - 300, end, rate="2m")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert all(n > 0 for n in drawn.values()), drawn
    assert stack["proc"].poll() is None and requests.get(base + "/health", timeout=5).status_code == 200
