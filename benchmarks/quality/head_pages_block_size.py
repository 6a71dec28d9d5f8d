"""Whole pages per head against single tokens per head, by page size, on the quality smoke
prompts (keydiff at 0.2, question after the context, 1k tokens, reference engine).

    source scripts/env.sh && python benchmarks/quality/head_pages_block_size.py   # ~1 min

Prints one line per (block size, mode, prompt): score, kept share, output. The result that set
``HEAD_PAGE_MAX_BLOCK_SIZE`` is in HEAD_VS_PAGE.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROMPTS = [("niah_single", 0), ("niah_single", 1), ("niah_multikey", 1)]


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from benchmarks.quality.grid import Point, ResultWriter
    from benchmarks.quality.reference_target import run_reference
    from vllm_kvevict.evaluation.tasks import make_task

    torch.set_num_threads(2)
    model_dir = os.environ["KVEVICT_MODEL_DIR"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = [make_task(kind, tokenizer, 1024, seed) for kind, seed in PROMPTS]
    points = [Point("keydiff", None, "head-page", 0.2), Point("keydiff", None, "head-token", 0.2)]
    for block_size in (128, 32, 16):
        out = Path(tempfile.mkdtemp()) / "rows.jsonl"
        writer = ResultWriter(out)
        run_reference(tasks, points, writer, model_dir=model_dir, protocol="context", block_size=block_size,
                      progress=lambda *_: None)
        writer.close()
        for line in out.read_text().splitlines():
            r = json.loads(line)
            kept = round(r["memory_fraction"], 3)
            print(block_size, f"{r['granularity']:<10}", r["uid"], r["score"], kept, repr(r["output"][:20]))


if __name__ == "__main__":
    main()
