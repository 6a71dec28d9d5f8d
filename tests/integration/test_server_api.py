"""A real `vllm serve` with the plugin: flags in --help, per-request vllm_xargs, HTTP 400s, /metrics.

One server per module (tiny random Llama, float32, eager, small KV cache), started with a policy
that keeps everything by default (``--kv-eviction=snapkv --kv-budget=1``) so requests can opt in.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from server_processes import free_port, stop, vllm_command, wait_until_healthy

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 600
MODEL_NAME = "tiny"


#: Short `vllm` runs, started together before the server so they overlap its start-up.
CLI_RUNS = {
    "help": ["serve", "--help=KVEviction"],
    "help_groups": ["serve", "--help"],
    "bad_flag": ["serve", "{model}", "--kv-budget", "2.5"],
    "bad_additional_config": ["serve", "{model}", "--additional-config", '{"kv_eviction": {"scorer": "snapkv", "budget": 7.5}}'],
    "flags_that_do_not_fit": ["serve", "{model}", "--kv-eviction", "snapkv", "--kv-budget", "64", "--kv-window", "100"],
    "decode_interval_flag": ["serve", "{model}", "--kv-eviction", "pyramidkv", "--kv-decode-interval", "64"],
    "floor_with_token_budget": ["serve", "{model}", "--kv-eviction", "snapkv", "--kv-budget", "64", "--kv-min-tokens", "32"],
}


@pytest.fixture(scope="module")
def cli_runs(tiny_llama_dir, tmp_path_factory):
    """name -> (process, output file) for each of :data:`CLI_RUNS`."""
    folder = tmp_path_factory.mktemp("cli")
    runs = {}
    for name, args in CLI_RUNS.items():
        out = folder / f"{name}.txt"
        with open(out, "w") as fh:
            argv = [*vllm_command(), *(a.replace("{model}", str(tiny_llama_dir)) for a in args)]
            runs[name] = (subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT), out)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(run) -> tuple[int, str]:
    proc, out = run
    try:
        code = proc.wait(timeout=STARTUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, out.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory, cli_runs):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm_serve.log"
    argv = [
        *vllm_command(), "serve", str(tiny_llama_dir),
        "--served-model-name", MODEL_NAME,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
        "--kv-cache-memory-bytes", str(64 * 2**20),
        "--host", "127.0.0.1", "--port", str(port),
        "--kv-eviction", "snapkv", "--kv-budget", "1",
    ]  # fmt: skip
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base, log_path, STARTUP_TIMEOUT_S)
        yield {"base": base, "proc": proc, "log": log_path, "model": str(tiny_llama_dir)}
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=300)


def complete(client, xargs=None, prompt="The capital of France is", max_tokens=4, **kwargs):
    extra_body = {"vllm_xargs": xargs} if xargs is not None else None
    return client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body=extra_body, **kwargs
    )


def test_help_lists_the_flags_with_defaults(cli_runs):
    code, output = finished(cli_runs["help"])
    assert code == 0, output
    text = " ".join(output.split())  # undo argparse's line wrapping
    for option, default in [
        ("--kv-eviction", "none"),
        ("--kv-budget", "1.0"),
        ("--kv-min-tokens", "192"),
        ("--kv-allocation", "per scorer"),
        ("--kv-window", "32"),
        ("--kv-sinks", "per scorer"),
        ("--kv-pooling", "avg"),
        ("--kv-pooling-kernel", "5"),
        ("--kv-granularity", "per scorer"),
        ("--kv-head-selection", "per scorer"),
        ("--kv-decode-interval", "0"),
        ("--kv-prompt-eviction", "on"),
        ("--kv-alpha", "0.2"),
        ("--kv-rho", "0.5"),
        ("--kv-epsilon", "0.0"),
        ("--kv-criticalkv-base", "snapkv"),
    ]:
        assert option in text
        after = text[text.index(option + " ") :]
        assert f"(default: {default})" in after[:400], option
    assert "{none,streamingllm,snapkv" in text


def test_plain_help_lists_the_group(cli_runs):
    code, output = finished(cli_runs["help_groups"])  # vLLM's --help lists groups, not flags
    assert code == 0, output
    assert "KVEviction" in output and "KV-cache eviction (vllm-kvevict)" in output


def test_bad_flag_is_a_usage_error(cli_runs):
    code, output = finished(cli_runs["bad_flag"])
    assert code == 2, output
    assert "error: argument --kv-budget: invalid kv_budget=2.5: a fraction in (0, 1)" in output


def test_flags_that_do_not_fit_together_are_a_usage_error_not_a_traceback(cli_runs):
    code, output = finished(cli_runs["flags_that_do_not_fit"])
    assert code == 2, output
    assert "--kv-budget" in output and "--kv-window" in output and "do not fit together" in output
    assert "Traceback" not in output


def test_decode_interval_at_head_granularity_beyond_its_allocations_is_a_usage_error(cli_runs):
    code, output = finished(cli_runs["decode_interval_flag"])
    assert code == 2, output
    assert "do not fit together" in output
    assert "invalid kv_decode_interval=64: 0 with allocation 'pyramid' at granularity 'head'" in output
    assert "Traceback" not in output


def test_a_floor_with_a_token_budget_is_refused_not_ignored(cli_runs):
    code, output = finished(cli_runs["floor_with_token_budget"])
    assert code == 2, output
    assert "--kv-min-tokens" in output and "invalid kv_min_tokens=32" in output and "fractional budgets" in output


def test_bad_additional_config_stops_the_server_at_start(cli_runs):
    code, output = finished(cli_runs["bad_additional_config"])
    assert code != 0, output
    assert "invalid kv_eviction.budget=7.5" in output
    assert "Started server process" not in output


def test_valid_requests_pass(client):
    plain = complete(client)
    assert plain.choices[0].text
    opted_in = complete(client, {"kv_eviction": "snapkv", "kv_budget": 0.2, "my_tag": "passes through"})
    assert opted_in.usage.completion_tokens == 4
    floored = complete(client, {"kv_eviction": "snapkv", "kv_budget": 0.1, "kv_min_tokens": 64})
    assert floored.usage.completion_tokens == 4
    opted_out = complete(client, {"kv_eviction": "none"})
    assert opted_out.usage.completion_tokens == 4
    decoding = complete(client, {"kv_eviction": "snapkv", "kv_granularity": "page", "kv_budget": 64,
                                 "kv_decode_interval": 32, "kv_prompt_eviction": "off"})
    assert decoding.usage.completion_tokens == 4
    head_decoding = complete(client, {"kv_eviction": "snapkv", "kv_budget": 64, "kv_decode_interval": 32})
    assert head_decoding.usage.completion_tokens == 4
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        extra_body={"vllm_xargs": {"kv_eviction": "tova", "kv_budget": 64}},
    )
    assert chat.usage.completion_tokens == 3


@pytest.mark.parametrize(
    "xargs, field",
    [
        ({"kv_eviction": "snapk"}, "kv_eviction"),
        ({"kv_budget": 1.5}, "kv_budget"),
        ({"kv_budget": -0.1}, "kv_budget"),
        ({"kv_budget": "lots"}, "kv_budget"),
        ({"kv_window": [8, 16]}, "kv_window"),
        ({"kv_buget": 0.2}, "kv_buget"),
        ({"kv_budget": True}, "kv_budget"),
        ({"kv_window": True}, "kv_window"),
        ({"kv_eviction": "pyramidkv", "kv_decode_interval": 64}, "kv_decode_interval"),
        ({"kv_eviction": "h2o", "kv_granularity": "head", "kv_decode_interval": 64}, "kv_decode_interval"),
        ({"kv_eviction": "snapkv", "kv_prompt_eviction": "off"}, "kv_prompt_eviction"),
        ({"kv_eviction": "snapkv", "kv_budget": 0.2, "kv_rho": 0.3}, "kv_rho"),
        ({"kv_eviction": "snapkv", "kv_budget": 0.2, "kv_min_tokens": -1}, "kv_min_tokens"),
        ({"kv_eviction": "snapkv", "kv_budget": 64, "kv_min_tokens": 32}, "kv_min_tokens"),
        ({"kv_min_tokens": True}, "kv_min_tokens"),
    ],
    ids=["unknown-policy", "budget-above-1", "budget-negative", "budget-text", "window-list", "unknown-kv-key",
         "budget-boolean", "window-boolean", "decode-interval-head", "decode-interval-h2o-head", "prompt-off-no-decode",
         "setting-not-read", "floor-negative", "floor-with-token-budget", "floor-boolean"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
def test_bad_xargs_are_400_naming_the_field_and_server_keeps_serving(client, server, xargs, field, stream):
    with pytest.raises(openai.BadRequestError) as info:
        response = complete(client, xargs, stream=stream)
        if stream:
            list(response)
    assert info.value.status_code == 400
    assert field in info.value.message
    assert (info.value.body or {}).get("param") == field
    assert server["proc"].poll() is None
    assert complete(client).usage.completion_tokens == 4


def kvevict_samples(base: str) -> dict[str, float]:
    """``/metrics`` samples named ``kvevict_*``, summed over label sets, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(base + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("kvevict_"):
                assert set(sample.labels) <= {"model_name", "engine", "policy", "granularity", "outcome", "stage", "stat", "le"}, sample
                if "le" not in sample.labels:
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_metrics_page_has_kvevict_series(client, server):
    before = kvevict_samples(server["base"])
    assert "kvevict_blocks_returned_total" in before  # exported from the start, at 0
    # every gauge has its value from the start, before any eviction: the pool's geometry
    config = json.loads((Path(server["model"]) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block = before["kvevict_block_size_tokens"]
    assert block > 0 and before["kvevict_cache_blocks"] > 0
    assert before["kvevict_block_bytes"] == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4 * block
    long_prompt = " ".join(f"item{i}" for i in range(700))  # ~2k tokens: many pages to evict
    complete(client, {"kv_eviction": "snapkv", "kv_budget": 0.2}, prompt=long_prompt, max_tokens=2)
    deadline = time.monotonic() + 30
    while True:  # stats reach the front-end with the engine's next outputs
        after = kvevict_samples(server["base"])
        if after.get("kvevict_blocks_returned_total", 0) > before.get("kvevict_blocks_returned_total", 0):
            break
        assert time.monotonic() < deadline, f"no eviction recorded: {after}"
        time.sleep(1)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("kvevict_requests_evicted_total") >= 1
    assert grew("kvevict_eviction_seconds_count") == grew("kvevict_requests_evicted_total")
    assert grew("kvevict_blocks_evicted_total") >= 1
    assert grew("kvevict_tokens_evicted_total") >= grew("kvevict_blocks_evicted_total")
    assert grew("kvevict_blocks_returned_total") >= 1
