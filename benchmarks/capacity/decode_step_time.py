"""Time per engine step during decode: stock vLLM, prompt-only eviction and decode-time eviction,
alternated in one run, on a quiet CPU and beside one busy-looping process.

Written to answer one question of issue 20: the capacity rehearsal's plugin arms took 4-10x
longer per step than stock. Each arm is its own process (one in-process engine on the tiny
random Llama, 8 requests of 256 random tokens, 400 generated tokens each, ``ignore_eos``); the
arms alternate ``--repeats`` times, so slow phases of a shared machine hit every arm alike.
``--busy`` adds a run of every arm beside a process spinning on one core (what another
engineer's test run does to a 2-core machine). Prints a table, writes ``decode_step_time.json``
and ``decode_step_time.png`` next to this script.

    python benchmarks/capacity/decode_step_time.py --busy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = {
    "stock": None,
    "prompt eviction (0.5)": {"scorer": "snapkv", "granularity": "page", "window": 32, "budget": 0.5},
    "decode-time eviction (cap 256, every 128)": {
        "scorer": "snapkv", "granularity": "page", "window": 32, "budget": 256, "decode_interval": 128,
    },
}  # fmt: skip


def one_arm(name: str, model: str) -> float:
    """Milliseconds per engine step after the prompts' prefills (run in a child process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import random

    from vllm import LLM, SamplingParams

    kwargs = dict(model=model, dtype="float32", enforce_eager=True, block_size=32, num_gpu_blocks_override=400,
                  max_model_len=1024, max_num_seqs=8, enable_prefix_caching=False, gpu_memory_utilization=0.5)
    if ARMS[name]:
        kwargs["additional_config"] = {"kv_eviction": ARMS[name]}
    engine = LLM(**kwargs).llm_engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"r{i}", {"prompt_token_ids": [rng.randint(100, 20000) for _ in range(256)]}, params)
    for _ in range(3):  # the prefills
        engine.step()
    steps, started = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    ms = 1000 * (time.perf_counter() - started) / steps
    engine.engine_core.shutdown()
    return ms


def run_child(name: str, model: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--model", model], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("MS_PER_STEP "):
            return float(line.split()[1])
    raise RuntimeError(f"arm {name!r} failed:\n{out.stderr[-3000:]}")


def tiny_model() -> str:
    from vllm_kvevict.reference.tiny import make_tiny_llama

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "kvevict-tiny-llama"
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        make_tiny_llama(folder, Path(os.environ["KVEVICT_MODEL_DIR"]))
    return str(folder)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = sorted({r["condition"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(ARMS)
    for i, name in enumerate(ARMS):
        ys = [next(r["ms_per_step_median"] for r in rows if r["arm"] == name and r["condition"] == c) for c in conditions]
        ax.bar([j + i * width for j in range(len(conditions))], ys, width, label=name)
    ax.set_xticks([j + width for j in range(len(conditions))], conditions)
    ax.set_ylabel("ms per decode step (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: the tiny random Llama, made once)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="also run every arm beside one busy-looping process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model or tiny_model()
    if args.child:
        print(f"MS_PER_STEP {one_arm(args.child, model):.3f}")
        return
    rows = []
    for condition in ["quiet", "one busy process"] if args.busy else ["quiet"]:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition != "quiet" else None
        try:
            times = {name: [] for name in ARMS}
            for _ in range(args.repeats):
                for name in ARMS:
                    times[name].append(run_child(name, model))
        finally:
            if spinner:
                spinner.kill()
        for name, ms in times.items():
            rows.append({"condition": condition, "arm": name, "ms_per_step": [round(m, 2) for m in ms],
                         "ms_per_step_median": round(statistics.median(ms), 2)})
    stock = {r["condition"]: r["ms_per_step_median"] for r in rows if r["arm"] == "stock"}
    print(f"| condition | arm | ms per step (median of {args.repeats}) | runs | vs stock |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["vs_stock"] = round(r["ms_per_step_median"] / stock[r["condition"]], 2)
        print(f"| {r['condition']} | {r['arm']} | {r['ms_per_step_median']} | {r['ms_per_step']} | {r['vs_stock']} |")
    (HERE / "decode_step_time.json").write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    plot(rows, HERE / "decode_step_time.png")


if __name__ == "__main__":
    main()
