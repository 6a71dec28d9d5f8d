"""Head against page granularity at equal held blocks (issue #4's quality check), reference engine.

    python benchmarks/quality/head_vs_page.py --out benchmarks/quality/results/head-vs-page

For every generated needle / variable-tracking prompt (prefilled once) and budget:

- ``head``: criticalkv + adakv, per-head single tokens (``head_selection="token"``). It holds ``K`` compact blocks
  (:func:`~vllm_kvevict.cache.blocks.compact_blocks_needed`, from the budget alone) plus its
  positional tail at the end of the compressed part (``ceil(P / bs) - P // bs``).
- ``page@blocks``: criticalkv at page granularity with a token budget of ``held_head * bs``, so it
  keeps exactly as many ``bs``-token pages as head mode holds blocks (the comparison issue #4 asks
  for).
- ``page@budget``: criticalkv at page granularity at the same fractional budget (fewer blocks).
- ``head@tokens``: head mode keeping as many tokens per head as page@blocks keeps (so more
  blocks than page@blocks): separates "fewer tokens for the same blocks" (K's slack) from
  "per-head choice against whole pages".
- ``head-maxpool7``: ``head`` with the SnapKV/AdaKV repositories' max-pooling (kernel 7) of the
  base scores instead of avg-pool 5: same blocks as ``head``.
- ``head-pages``: criticalkv + adakv, each head keeping whole block-aligned pages
  (``head_selection="page"``, the default since it was measured here): ``K = ceil(B / bs)``.
- ``page@head-pages``: page granularity at the blocks ``head-pages`` holds.

``--modes`` runs a subset (``full`` always runs).

Blocks the question and the generated tokens need are the same in both modes and not counted.
Protocol ``prompt`` (default): the whole prompt is compressed, as the served plugin does;
``context``: only the context, the question fed after eviction.

Rows go to ``OUT/results.jsonl`` (a rerun skips done rows; the key does not hold ``--epsilon``, so
give each value its own OUT); ``OUT/summary.md`` is the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KINDS = "niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt"
MODES = ("full", "head", "page@blocks", "page@budget", "head@tokens", "head-maxpool7", "head-pages", "page@head-pages")
#: (head mode, page mode at the same held blocks) compared prompt by prompt
PAIRS = (("head", "page@blocks"), ("head-pages", "page@head-pages"))


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def head_held_blocks(config, prompt_len: int, block_size: int, num_layers: int, num_kv_heads: int) -> int:
    """``K`` compact blocks + the positional tail blocks at the end of the compressed part."""
    from vllm_kvevict.cache.blocks import compact_blocks_needed, prompt_tail_layout

    k = compact_blocks_needed(config, prompt_len, block_size, num_layers, num_kv_heads)
    return k + prompt_tail_layout(prompt_len, block_size).tail_blocks(prompt_len)


def settings(budget: float, prompt_len: int, block_size: int, num_layers: int, num_kv_heads: int,
             scorer: str = "criticalkv", **extra):
    """``[(mode, config, held_blocks_or_None)]`` for one budget; page@blocks matches head's blocks.

    ``extra``: more policy fields for every mode (e.g. ``epsilon=1e-4``).
    """
    from vllm_kvevict.config import EvictionConfig

    head = EvictionConfig.from_fields(scorer=scorer, budget=budget, allocation="adakv", granularity="head",
                                      head_selection="token", **extra)
    held = head_held_blocks(head, prompt_len, block_size, num_layers, num_kv_heads)
    out = [("head", head, held)]
    tokens = held * block_size
    if tokens < prompt_len:
        out.append(("page@blocks", EvictionConfig.from_fields(scorer=scorer, budget=tokens, granularity="page", **extra), None))
        more = head.model_copy(update={"budget": tokens})
        out.append(("head@tokens", more, head_held_blocks(more, prompt_len, block_size, num_layers, num_kv_heads)))
    out.append(("page@budget", EvictionConfig.from_fields(scorer=scorer, budget=budget, granularity="page", **extra), None))
    # the SnapKV/AdaKV repositories' pooling (max, kernel 7): keeps a high-scoring token's
    # neighbours, i.e. multi-token answers, per head (same K: pooling does not change budgets)
    max7 = head.model_copy(update={"pooling": "max", "pooling_kernel": 7})
    out.append(("head-maxpool7", max7, held))
    # whole block-aligned pages per head (head_selection="page"), and page granularity at its blocks
    pages = head.model_copy(update={"head_selection": "page"})
    held_pages = head_held_blocks(pages, prompt_len, block_size, num_layers, num_kv_heads)
    out.append(("head-pages", pages, held_pages))
    if held_pages * block_size < prompt_len:
        out.append(("page@head-pages", EvictionConfig.from_fields(scorer=scorer, budget=held_pages * block_size,
                                                                  granularity="page", **extra), None))
    return out


def run(args) -> Path:
    import torch
    from tqdm import tqdm

    from benchmarks.quality.grid import ResultWriter
    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.evaluation.scoring import score
    from vllm_kvevict.evaluation.tasks import make_suite
    from vllm_kvevict.reference.engine import ReferenceEngine
    from vllm_kvevict.reference.selection import kept_blocks

    torch.set_num_threads(args.threads)
    engine = ReferenceEngine(args.model_dir)
    tasks = make_suite(_csv(args.kinds), engine.tokenizer, [int(x) for x in _csv(args.lengths)], args.n_per, args.seed)
    budgets = [float(b) for b in _csv(args.budgets)]
    args.out.mkdir(parents=True, exist_ok=True)
    writer = ResultWriter(args.out / "results.jsonl")
    bs = args.block_size
    extra = {} if args.epsilon is None else {"epsilon": args.epsilon}
    for task in tqdm(tasks, desc="head-vs-page", unit="task"):
        compressed_len = len(task.prompt_ids) if args.protocol == "prompt" else task.context_end
        rows = [("full", EvictionConfig(), 1.0, None)]
        for budget in budgets:
            rows += [(mode, cfg, budget, held) for mode, cfg, held in
                     settings(budget, compressed_len, bs, engine.parts.num_layers, engine.model.config.num_key_value_heads,
                              scorer=args.scorer, **extra)
                     if args.modes is None or mode in args.modes]
        todo = []
        for mode, cfg, budget, held in rows:
            row = {"engine": "reference", "uid": task.uid, "policy": mode, "allocation": "adakv" if mode.startswith("head") else "-",
                   "granularity": mode, "budget": budget, "protocol": args.protocol, "block_size": bs}
            if not writer.has(row):
                todo.append((row, cfg, held))
        if not todo:
            continue
        prefilled = engine.prefill(task.prompt_ids)
        compressed, suffix = (prefilled, None) if args.protocol == "prompt" else (prefilled.prefix(task.context_end), task.question_ids)
        for row, cfg, held in todo:
            start = time.perf_counter()
            if row["policy"].startswith("page"):
                held = int(kept_blocks(compressed, cfg, bs).numel())
            elif row["policy"] == "full":
                held = math.ceil(compressed_len / bs)
            gen = engine.generate(compressed, cfg, task.max_new_tokens, suffix_ids=suffix, block_size=bs)
            row.update(scorer=cfg.scorer, epsilon=cfg.epsilon if cfg.enabled else None, task=task.kind, context_tokens=task.context_tokens, compressed_tokens=compressed_len,
                       held_blocks=held, prompt_blocks=math.ceil(compressed_len / bs),
                       memory_fraction=round(gen.memory_fraction, 4), score=score(task, gen.text), output=gen.text,
                       answers=task.answers, seconds=round(time.perf_counter() - start, 3))
            writer.write(row)
    writer.close()
    return args.out / "results.jsonl"


def summarize(rows: list[dict]) -> str:
    """Markdown: per (budget, mode) accuracy, interval, mean held blocks; then head-minus-page pairs."""
    from vllm_kvevict.evaluation.scoring import wilson_interval

    cells = defaultdict(list)
    for r in rows:
        for task in (r["task"], "all"):
            cells[(r["budget"], r["policy"], task)].append(r)
    lines = ["| budget | mode | task | n | accuracy | 95% CI | held blocks (mean) | held / prompt blocks | tokens kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {mode: i for i, mode in enumerate(MODES)}
    for (budget, mode, task), rs in sorted(cells.items(), key=lambda kv: (-kv[0][0], kv[0][2] != "all", kv[0][2], order[kv[0][1]])):
        acc = sum(r["score"] for r in rs) / len(rs)
        lo, hi = wilson_interval(sum(r["score"] for r in rs), len(rs))
        held = sum(r["held_blocks"] for r in rs) / len(rs)
        frac = sum(r["held_blocks"] / r["prompt_blocks"] for r in rs) / len(rs)
        kept = sum(r["memory_fraction"] for r in rs) / len(rs)
        lines.append(f"| {budget:g} | {mode} | {task} | {len(rs)} | {acc:.3f} | [{lo:.2f}, {hi:.2f}] | {held:.1f} | {frac:.3f} | {kept:.3f} |")
    by = {(r["uid"], r["budget"], r["policy"]): r for r in rows}
    for head_mode, page_mode in PAIRS:
        pairs = defaultdict(lambda: [0, 0, 0, 0.0])  # head better, page better, tie, blocks head - page
        for (uid, budget, mode), r in by.items():
            if mode != head_mode or (uid, budget, page_mode) not in by:
                continue
            p = by[(uid, budget, page_mode)]
            cell = pairs[budget]
            cell[0 if r["score"] > p["score"] else 1 if r["score"] < p["score"] else 2] += 1
            cell[3] += r["held_blocks"] - p["held_blocks"]
        if not pairs:
            continue
        lines += ["", f"Paired, {head_mode} against {page_mode} on the same prompt:", "",
                  "| budget | head better | page better | tie | held blocks head - page (sum) |", "|---|---|---|---|---|"]
        for budget, (h, pb, t, d) in sorted(pairs.items(), reverse=True):
            lines.append(f"| {budget:g} | {h} | {pb} | {t} | {d:g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/quality/results/head-vs-page")
    ap.add_argument("--model-dir", default=os.environ.get("KVEVICT_MODEL_DIR"))
    ap.add_argument("--kinds", default=KINDS)
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--n-per", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="0.2,0.1")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--protocol", choices=("prompt", "context"), default="prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epsilon", type=float, default=None,
                    help="criticalkv's stage-2 epsilon (default: the config's, 0); use a separate --out per value")
    ap.add_argument("--scorer", default="criticalkv", help="the policy of every mode (its default allocation for "
                    "head modes is replaced by adakv); use a separate --out per scorer")
    ap.add_argument("--modes", type=lambda t: set(_csv(t)), default=None,
                    help=f"only these modes (comma-separated; default all): {', '.join(MODES[1:])}")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if not args.report_only:
        if not args.model_dir:
            raise SystemExit("--model-dir (or $KVEVICT_MODEL_DIR) is required")
        run(args)
        print(f"wall time {time.perf_counter() - start:.1f} s", file=sys.stderr)
    from benchmarks.quality.grid import read_rows

    text = summarize(list(read_rows([args.out])))
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
