"""The list part of the self-recall task through vLLM with the plugin, against the reference rows.

    python benchmarks/quality/self_recall_served.py --prompts 2 [--out benchmarks/quality/results/self-recall]

For the first ``--prompts`` prompts of ``self_recall.py``'s results: every setting it ran, as one
request each in one batch (``vllm_xargs`` of the setting; stock: ``kv_eviction: none``), greedy,
the same ``max_tokens``; prints and writes (``OUT/served.json``) whether the served list equals
the reference engine's token for token (the reference rows hold the text: compared as the
tokenizer's ids of it), and the first token where they part. The follow-up question is not
served: a served request cannot go on from another's evicted cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.self_recall import DEFAULT_OUT, config_of, read_jsonl  # noqa: E402
from vllm_kvevict.evaluation.self_recall import make_task  # noqa: E402


def xargs_of(row: dict) -> dict:
    if row["policy"] == "none":
        return {"kv_eviction": "none"}
    budget = row["budget"]
    out = {"kv_eviction": row["policy"], "kv_granularity": "page", "kv_budget": int(budget) if budget > 1 else budget,
           "kv_window": row["window"], "kv_decode_interval": row["decode_interval"], "kv_prompt_eviction": "off"}
    if budget <= 1:
        out["kv_min_tokens"] = row["min_tokens"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--model", default=os.environ.get("KVEVICT_MODEL_DIR"))
    args = ap.parse_args(argv)
    meta = json.loads((args.out / "meta.json").read_text())
    rows = [r for p in sorted(args.out.glob("results.shard*.jsonl")) for r in read_jsonl(p)]
    seeds = sorted({r["seed"] for r in rows})[: args.prompts]
    rows = [r for r in rows if r["seed"] in seeds]
    for r in rows:
        config_of(r)  # the same settings the reference ran
    from vllm import SamplingParams

    from vllm_kvevict.vllm.inprocess import open_llm

    block_size = int(meta["block_size"])
    with open_llm(args.model, block_size=block_size, max_model_len=2048, max_num_seqs=len(rows),
                  kv_cache_memory_bytes=1 << 30,
                  additional_config={"kv_eviction": {"scorer": "snapkv", "budget": 0.5, "granularity": "page"}}) as llm:
        tok = llm.get_tokenizer()
        tasks = {s: make_task(tok, s, int(meta["items"]), int(meta["max_new_tokens"])) for s in seeds}
        params = [SamplingParams(max_tokens=int(meta["max_new_tokens"]), temperature=0.0, extra_args=xargs_of(r))
                  for r in rows]
        outs = llm.generate([{"prompt_token_ids": tasks[r["seed"]].prompt_ids} for r in rows], params, use_tqdm=False)
    report = []
    for r, out in zip(rows, outs):
        served = list(out.outputs[0].token_ids)
        text = tok.decode(served, skip_special_tokens=True)
        reference = r["output"][len(tasks[r["seed"]].reply_start):]
        ref_ids = tok(reference, add_special_tokens=False)["input_ids"]
        served_ids = tok(text, add_special_tokens=False)["input_ids"]
        part = next((i for i, (a, b) in enumerate(zip(ref_ids, served_ids)) if a != b), None)
        if part is None and len(ref_ids) != len(served_ids):
            part = min(len(ref_ids), len(served_ids))
        report.append(dict(seed=r["seed"], policy=r["policy"], budget=r["budget"], equal=text == reference,
                           first_difference=part, served_tokens=len(served), reference_tokens=r["generated_tokens"]))
        print(f"seed {r['seed']} {r['policy']} {r['budget']:g}: {'equal' if text == reference else 'differs at ' + str(part)}"
              f" ({len(served)} served tokens, {r['generated_tokens']} reference)")
    (args.out / "served.json").write_text(json.dumps(report, indent=1))
    print(f"{sum(x['equal'] for x in report)}/{len(report)} lists equal token for token")


if __name__ == "__main__":
    main()
