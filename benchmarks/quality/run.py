"""Quality benchmark: accuracy against KV budget on generated RULER-style tasks.

    python benchmarks/quality/run.py --target reference [--kinds ...] [--lengths 1024,2048] ...
    python benchmarks/quality/run.py --target server --base-url http://localhost:8000/v1
    python benchmarks/quality/run.py --target kvpress --policies snapkv,knorm

Every target gets the same seeded prompts (as token ids) and the same scoring. Results are
appended as JSON lines to ``OUT/results.jsonl`` (a rerun skips what is already there), then
``report.py`` writes ``summary.md``, ``summary.json`` and ``accuracy_vs_budget.png`` into OUT.

Targets
-------
reference : ``vllm_kvevict.reference`` (one prefill per prompt, then every policy x budget).
server    : an OpenAI-compatible server (vLLM with the plugin, started with a policy and
            ``--kv-budget 1``; the full-cache rows go out with ``kv_eviction: none``, engine
            ``stock``). Protocol ``prompt``: the whole prompt is compressed. Each setting has its
            own prefix-cache salt (``--cache-salt``), so each prefills every prompt itself.
kvpress   : NVIDIA kvpress 0.5.5 in ``.venv-kvpress`` (one prefill per policy x budget).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.grid import DEFAULT_BUDGETS, ResultWriter, sweep_points  # noqa: E402

#: The default suite: sized to finish within an hour on the reference target on 2 CPU cores.
DEFAULT_KINDS = "niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe,qa"
DEFAULT_LENGTHS = "1024,2048"
DEFAULT_N_PER = 2


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _kinds_at(text: str) -> tuple[int, list[str]]:
    length, _, kinds = text.partition("=")
    if not length.strip().isdigit() or not _csv(kinds):
        raise argparse.ArgumentTypeError(f"--kinds-at: {text!r}: expected LENGTH=KIND[,KIND...], e.g. 4096=niah_single,qa")
    return int(length), _csv(kinds)


def _seed_at(text: str) -> tuple[int, int]:
    length, _, seed = text.partition("=")
    if not length.strip().isdigit() or not seed.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--seed-at: {text!r}: expected LENGTH=SEED, e.g. 4096=7")
    return int(length), int(seed)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("reference", "server", "kvpress"), required=True)
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/quality/results/<target>)")
    ap.add_argument("--model-dir", default=os.environ.get("KVEVICT_MODEL_DIR"), help="HF folder (tokenizer; model for reference/kvpress)")
    ap.add_argument("--kinds", default=DEFAULT_KINDS, help="task kinds (comma-separated)")
    ap.add_argument("--kinds-at", type=_kinds_at, action="append", default=[], metavar="LENGTH=KINDS",
                    help="the kinds at one length instead of --kinds (repeatable; e.g. 4096=niah_single,qa)")
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prompt lengths in tokens")
    ap.add_argument("--n-per", type=int, default=DEFAULT_N_PER, help="tasks per kind x length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-at", type=_seed_at, action="append", default=[], metavar="LENGTH=SEED",
                    help="the seed of one length instead of --seed (repeatable): prompts of one seed share their "
                         "drafts (needles, values, depths) across lengths, so give each length its own")
    ap.add_argument("--question-position", choices=("after", "both"), default="after")
    ap.add_argument("--protocol", choices=("context", "prompt", "both"), default="context",
                    help="reference: compress the context only (question fed after eviction), the whole prompt, "
                         "or both from one prefill per prompt")
    ap.add_argument("--policies", default="all",
                    help="scorers, or 'all' (every scorer in vllm_kvevict.policies.SCORERS); 'scorer:allocation' "
                         "adds that scorer under that allocation only (e.g. snapkv:uniform beside snapkv's default)")
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS))
    ap.add_argument("--min-tokens", default="default",
                    help="floors of the fractional budget (EvictionConfig.min_tokens), comma-separated; 'default' "
                         "the config's (0 with --kvpress-settings and the kvpress target: kvpress has no floor)")
    ap.add_argument("--allocations", default="default", help="'default' (per scorer) or allocator names")
    ap.add_argument("--granularities", default="head",
                    help="head (the plugin's default per head), head-token (single tokens per head, as "
                         "kvpress), head-page (whole pages per head) and/or page (whole blocks for all heads)")
    ap.add_argument("--vector", choices=("off", "on", "both"), default="off",
                    help="reference: VECTOR around each scorer (rows with it carry \"vector\": true), or both")
    ap.add_argument("--vector-share", type=float, default=None,
                    help="reference: VECTOR's p_a for the VECTOR points (default: min(p_c/2, (1-p_c)/2)); give the run "
                         "its own --engine-name, rows do not carry it")
    ap.add_argument("--vector-residual", choices=("absolute", "relative"), default=None,
                    help="reference: VECTOR's key-only criterion for the VECTOR points (default: the config's); "
                         "give the run its own --engine-name")
    ap.add_argument("--vector-min-r2", type=float, default=None,
                    help="reference: VECTOR's per-head R^2 gate for the VECTOR points (default: the config's); "
                         "give the run its own --engine-name")
    ap.add_argument("--block-size", type=int, default=128, help="reference: page size for granularity page (vLLM CPU's block)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (reference, kvpress); on a shared, busy CPU 1 is fastest")
    ap.add_argument("--base-url", default="http://localhost:8000/v1", help="server target")
    ap.add_argument("--served-model", default=None, help="server target: model name (default: the first served)")
    ap.add_argument("--engine-name", default=None,
                    help="the run's name in the results (rows' \"run\"; default: the target's name); rows of two "
                         "runs never pool. Rows' \"engine\" says what answered: reference, kvpress, server, stock")
    ap.add_argument("--kvpress-settings", action="store_true",
                    help="reference: kvpress's windows for knorm, keydiff, expected_attention (0) and tova (1) and "
                         "criticalkv's epsilon 1e-4, so they share kvpress's definition (label the engine apart, "
                         "e.g. reference-kvsettings)")
    ap.add_argument("--concurrency", type=int, default=4, help="server target: requests in flight")
    ap.add_argument("--cache-salt", choices=("setting", "none"), default="setting",
                    help="server target: a prefix-cache salt per setting (each prefills every prompt itself) or none")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="server: send nothing after this many seconds; reference: start no prompt after them "
                         "(a rerun resumes the rest)")
    ap.add_argument("--min-full-accuracy", type=float, default=0.1, help="report: retention threshold")
    ap.add_argument("--workers", type=int, default=2,
                    help="reference/kvpress: processes, each on its share of the tasks (one per core)")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "i/N", set by --workers
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    if args.protocol == "both" and args.target != "reference":
        ap.error("--protocol both: the reference target only (the server compresses the prompt, kvpress the context)")
    if args.time_limit is not None and args.target == "kvpress":
        ap.error("--time-limit: the reference and server targets only")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_kvevict.evaluation.tasks import make_suite

    torch.set_num_threads(args.threads)
    if not args.model_dir:
        raise SystemExit("--model-dir (or $KVEVICT_MODEL_DIR) is required")
    if args.policies == "all":
        from vllm_kvevict.policies import SCORERS

        policies = list(SCORERS)
    else:
        policies = _csv(args.policies)
    allocations = [None if a == "default" else a for a in _csv(args.allocations)]
    vectors = {"off": (False,), "on": (True,), "both": (False, True)}[args.vector]
    points = sweep_points(policies, [float(b) for b in _csv(args.budgets)], allocations, _csv(args.granularities),
                          floors(args), vectors)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    kinds_at, seed_at = dict(args.kinds_at), dict(args.seed_at)
    tasks = round_robin([task for length in (int(x) for x in _csv(args.lengths))
                         for task in make_suite(kinds_at.get(length, _csv(args.kinds)), tokenizer, [length], args.n_per,
                                                seed_at.get(length, args.seed), args.question_position)])
    out = args.out or ROOT / "benchmarks/quality/results" / args.target
    start = time.perf_counter()
    if not args.shard:
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").write_text(json.dumps({**{k: str(v) for k, v in vars(args).items()},
                                                   "n_tasks": len(tasks), "n_points": len(points)}, indent=1))
        if args.workers > 1 and args.target != "server":
            run_shards(argv if argv is not None else sys.argv[1:], out, args.workers)
            return finish(args, out, start)
    name, position = "results.jsonl", 0
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        tasks, name, position = tasks[index::count], f"results.shard{index}.jsonl", index
    writer = ResultWriter(out / name)
    print(f"{len(tasks)} tasks x {len(points)} settings -> {out / name}", file=sys.stderr)

    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    protocols = 2 if args.protocol == "both" else 1
    with tqdm(total=len(tasks) * len(points) * protocols, desc=f"{args.target} {args.shard or ''}".strip(), unit="run",
              position=position) as bar:
        if args.target == "reference":
            from benchmarks.quality.reference_target import KVPRESS_SETTINGS, run_reference

            run_reference(tasks, points, writer, model_dir=args.model_dir, protocol=args.protocol,
                          block_size=args.block_size, progress=bar.update, engine_name=args.engine_name or "reference",
                          overrides=KVPRESS_SETTINGS if args.kvpress_settings else None, vector_share=args.vector_share,
                          vector_options=vector_options(args), deadline=deadline)
        elif args.target == "server":
            from benchmarks.quality.server_target import run_server

            left = run_server(tasks, points, writer, base_url=args.base_url, model=args.served_model,
                              engine_name=args.engine_name or "server", concurrency=args.concurrency,
                              progress=bar.update, salt=args.cache_salt, deadline=deadline)
            if left:
                print(f"--time-limit: {left} requests not sent; rerun the same command to resume", file=sys.stderr)
        else:
            from benchmarks.quality.kvpress_target import run_kvpress

            run_kvpress(tasks, points, writer, model_dir=args.model_dir, threads=args.threads, progress=bar.update)
    writer.close()
    if not args.shard:
        finish(args, out, start)


def round_robin(tasks: list) -> list:
    """``tasks`` (grouped by length and kind) reordered round by round: the first task of every
    length x kind, then the second of each, ... so that a sweep stopped early (``--time-limit``,
    shards taking every other task) holds about as many prompts of every kind and length."""
    cells: dict[tuple, list] = {}
    for task in tasks:
        cells.setdefault((task.context_tokens, task.kind), []).append(task)
    rounds = max((len(c) for c in cells.values()), default=0)
    return [c[i] for i in range(rounds) for c in cells.values() if i < len(c)]


def vector_options(args: argparse.Namespace) -> dict:
    """``--vector-residual`` / ``--vector-min-r2`` as config fields (only those given)."""
    given = {"vector_residual": args.vector_residual, "vector_min_r2": args.vector_min_r2}
    return {k: v for k, v in given.items() if v is not None}


def floors(args: argparse.Namespace) -> list:
    """``--min-tokens`` as ints (``None``: the config's default); kvpress's definitions have none."""
    kvpress = args.target == "kvpress" or args.kvpress_settings
    if args.min_tokens == "default":
        return [0] if kvpress else [None]
    values = [int(x) for x in _csv(args.min_tokens)]
    if kvpress and any(values):
        raise SystemExit("--min-tokens: kvpress has no floor (only 0 with --target kvpress or --kvpress-settings)")
    return values


def run_shards(argv: list[str], out: Path, workers: int) -> None:
    """Run ``workers`` copies of this script, shard ``i`` taking tasks ``i, i + N, ...``."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--out", str(out), "--shard", f"{i}/{workers}"])
             for i in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"shard exit codes {codes}")


def finish(args, out: Path, start: float) -> None:
    print(f"wall time {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if not args.no_report:
        from benchmarks.quality.report import write_report

        print(write_report([out], out, args.min_full_accuracy))


if __name__ == "__main__":
    main()
