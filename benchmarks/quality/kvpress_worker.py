"""Runs NVIDIA kvpress's pipeline on prepared token ids. Runs INSIDE .venv-kvpress.

It imports only torch, transformers and kvpress (never ``vllm_kvevict``). Input: a JSON file

    {"model_dir": ..., "threads": 2,
     "tasks": [{"uid", "context_ids", "question_ids", "max_new_tokens", "runs": [ids to run]}],
     "runs":  [{"id", "press": {"class": "AdaKVPress", "press": {"class": "SnapKVPress",
                                 "compression_ratio": 0.8, ...}, ...} or null}]}

Output: one JSON line per (task, run) on stdout, ``{"uid", "id", "output", "seconds"}``, in
task-major order. A run with ``press: null`` is the full cache. Each (task, run) is a fresh
``_forward`` of kvpress's ``KVPressTextGenerationPipeline`` (context prefill under the press,
then the question, then greedy decoding) on exactly the given ids.

    .venv-kvpress/bin/python benchmarks/quality/kvpress_worker.py spec.json
"""

from __future__ import annotations

import json
import sys
import time


def build_press(spec):
    """``{"class": "AdaKVPress", "press": {...}, **kwargs}`` -> a kvpress press (None -> None)."""
    import kvpress

    if spec is None:
        return None
    spec = dict(spec)
    cls = getattr(kvpress, spec.pop("class"))
    if "press" in spec:
        spec["press"] = build_press(spec["press"])
    return cls(**spec)


def main(spec_path: str) -> None:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import torch
    from transformers import pipeline

    with open(spec_path) as fh:
        spec = json.load(fh)
    torch.set_num_threads(int(spec.get("threads", 2)))
    pipe = pipeline("kv-press-text-generation", model=spec["model_dir"], dtype=torch.float32, device="cpu")
    for task in spec["tasks"]:
        inputs = {
            "context_ids": torch.tensor([task["context_ids"]], dtype=torch.long),
            "questions_ids": [torch.tensor([task["question_ids"]], dtype=torch.long)],
        }
        todo = set(task.get("runs", [run["id"] for run in spec["runs"]]))
        for run in spec["runs"]:
            if run["id"] not in todo:  # already in the results file
                continue
            start = time.perf_counter()
            with torch.no_grad():
                (answer,) = pipe._forward(inputs, max_new_tokens=task["max_new_tokens"], press=build_press(run["press"]))
            line = {"uid": task["uid"], "id": run["id"], "output": answer, "seconds": round(time.perf_counter() - start, 3)}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
