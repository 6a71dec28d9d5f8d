"""Train LKV-T and LKV-H jointly by self-distillation from the frozen model; write the artifact.

    python -m vllm_kvevict.lkv.train --model DIR --out FILE [--steps 480] [--seed 0] [--init FILE] ...

Two phases, each with a progress bar, each resumable (rerun the same command):

1. prepare: prefill the training and validation examples with the full cache, decode the
   teacher's answers and store them (``--cache``, one file per example);
2. train: ``--steps`` steps, each on one stored example (passes in a seeded order) at
   ``--budgets-per-step`` budgets drawn log-uniformly from ``[--min-budget, --max-budget]``:
   loss = mean over those budgets of ``KL(teacher || student)`` on the tokens after the
   compressed part, the student's masks coming from the soft top-k of LKV-T's scores under
   LKV-H's budgets. A checkpoint (in the cache folder) and the artifact are written every
   ``--checkpoint-every`` steps; the validation examples are scored with the served (hard)
   selection every ``--validate-every`` steps (the training curve, ``--log``).

Training kinds: every task kind but ``--held-out`` (default niah_multivalue, qa), plus the
continuation of generated text. Design and the choices made: docs/LKV.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from vllm_kvevict.lkv.data import CONTINUATION, DEFAULT_HELD_OUT, VALIDATION_SEEDS, Stream, check_kinds
from vllm_kvevict.lkv.validation import Validator

#: Budgets the validation examples are scored at (the benchmark's).
VALIDATION_BUDGETS = (0.2, 0.1)


def parse_args(argv=None) -> argparse.Namespace:
    from vllm_kvevict.evaluation.kinds import KINDS

    ap = argparse.ArgumentParser(prog="python -m vllm_kvevict.lkv.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder (the frozen teacher)")
    ap.add_argument("--out", required=True, type=Path, help="artifact file to write (.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--examples", type=int, default=160, help="training examples prepared (passes: steps / examples)")
    ap.add_argument("--validation-examples", type=int, default=10)
    ap.add_argument("--held-out", default=",".join(DEFAULT_HELD_OUT), help="task kinds never trained on")
    ap.add_argument("--kinds", default=None, help="training kinds (default: every task kind not held out, and "
                    f"{CONTINUATION})")
    ap.add_argument("--lengths", default="768,1024", help="prompt lengths in tokens")
    ap.add_argument("--inside-share", type=float, default=0.3,
                    help="share of task examples whose whole prompt (question included) is compressed")
    ap.add_argument("--question-weight", type=float, default=0.2,
                    help="loss weight of the positions predicting question tokens (answer tokens: 1)")
    ap.add_argument("--budgets-per-step", type=int, default=2)
    ap.add_argument("--min-budget", type=float, default=0.05)
    ap.add_argument("--max-budget", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=32, help="protected last tokens (the policies' default window)")
    ap.add_argument("--page-share", type=float, default=0.5,
                    help="share of steps whose soft top-k runs over whole pages of --block-size (the served "
                         "whole-pages-per-head selection); the others over single tokens")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--temperature-start", type=float, default=0.5)
    ap.add_argument("--temperature-end", type=float, default=0.05)
    ap.add_argument("--rank", type=int, default=8, help="LKV-T hidden features per (layer, KV head)")
    ap.add_argument("--kernel", type=int, default=7, help="LKV-T convolution width along tokens")
    ap.add_argument("--validate-every", type=int, default=40)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--cache", type=Path, default=None,
                    help="prepared examples (default: ~/.cache/vllm-kvevict/lkv-train/<model>-seed<seed>)")
    ap.add_argument("--log", type=Path, default=None, help="training curve and plots (default: next to --out)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--init", type=Path, default=None,
                    help="artifact to start from (warm start; its model and module sizes must match), "
                         "instead of the KeyDiff start")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="train at most this many steps in this run, then checkpoint (rerun to go on)")
    args = ap.parse_args(argv)
    held_out = [k for k in args.held_out.split(",") if k]
    kinds = args.kinds.split(",") if args.kinds else [k for k in KINDS if k not in held_out] + [CONTINUATION]
    try:
        check_kinds(kinds, held_out)
    except ValueError as exc:
        ap.error(f"--kinds/--held-out: {exc}")
    args.kinds, args.held_out = tuple(kinds), tuple(held_out)
    args.lengths = tuple(int(x) for x in args.lengths.split(","))
    if not 0 < args.min_budget <= args.max_budget < 1:
        ap.error("--min-budget and --max-budget must satisfy 0 < min <= max < 1")
    return args


def fingerprint(args: argparse.Namespace) -> dict:
    """The settings a checkpoint must share to be resumed."""
    keys = ("model", "seed", "examples", "validation_examples", "held_out", "kinds", "lengths", "inside_share",
            "question_weight", "budgets_per_step", "min_budget", "max_budget", "window", "page_share", "block_size",
            "lr", "temperature_start",
            "temperature_end", "rank", "kernel", "steps", "init")
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items() if k in keys}


def warm_start(path: Path, identity, scorer, shares) -> dict:
    """Load ``path``'s modules into ``scorer`` and ``shares``; its training record, for the new one's.

    Refused (``SystemExit``) when it was made for another model or with other module sizes.
    """
    from vllm_kvevict.lkv.artifact import load_artifact

    artifact = load_artifact(path)
    if artifact.identity != identity:
        differ = "; ".join(artifact.identity.differences(identity))
        raise SystemExit(f"--init {path}: made for another model ({differ})")
    if artifact.shape != scorer.shape:
        raise SystemExit(f"--init {path}: module sizes {artifact.shape.to_dict()} differ from this run's "
                         f"{scorer.shape.to_dict()} (--rank, --kernel)")
    scorer.load_state_dict(artifact.scorer.state_dict())
    shares.load_state_dict(artifact.shares.state_dict())
    return {"path": str(path), "training": artifact.training}


def temperature(step: int, args) -> float:
    """Geometric from ``--temperature-start`` to ``--temperature-end`` over the run."""
    frac = step / max(args.steps - 1, 1)
    return args.temperature_start * (args.temperature_end / args.temperature_start) ** frac


def step_draw(args, step: int) -> tuple[list[float], Optional[int]]:
    """The budgets of ``step`` (log-uniform) and its selection unit (``None``: single tokens)."""
    rng = random.Random(f"lkv-budgets-{args.seed}-{step}")
    lo, hi = math.log(args.min_budget), math.log(args.max_budget)
    budgets = [math.exp(rng.uniform(lo, hi)) for _ in range(args.budgets_per_step)]
    return budgets, args.block_size if rng.random() < args.page_share else None


def example_order(args, step: int) -> int:
    """The stored example of ``step``: every example once per pass, passes in seeded orders."""
    order = list(range(args.examples))
    random.Random(f"lkv-order-{args.seed}-{step // args.examples}").shuffle(order)
    return order[step % args.examples]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from vllm_kvevict.lkv.artifact import save_artifact
    from vllm_kvevict.lkv.distill import distill_loss, log_probs, suffix_hidden
    from vllm_kvevict.lkv.identity import ModelIdentity
    from vllm_kvevict.lkv.masks import example_features, soft_masks
    from vllm_kvevict.lkv.nets import HeadShares, NetShape, TokenScorer
    from vllm_kvevict.lkv.plots import plot_curve, plot_shares
    from vllm_kvevict.lkv.store import ExampleStore
    from vllm_kvevict.reference.engine import ReferenceEngine

    started = time.perf_counter()
    engine = ReferenceEngine(args.model)
    engine.model.requires_grad_(False)
    identity = ModelIdentity.from_hf_config(engine.model.config)
    cache = args.cache or Path.home() / ".cache/vllm-kvevict/lkv-train" / f"{identity.config_hash}-seed{args.seed}"
    log_dir = args.log or args.out.with_name(args.out.stem + "-training")
    log_dir.mkdir(parents=True, exist_ok=True)

    train_stream = Stream(args.kinds, args.lengths, args.inside_share, args.seed)
    val_kinds = tuple(k for k in args.kinds if k != CONTINUATION) + args.held_out
    val_stream = Stream(val_kinds, args.lengths, 0.0, args.seed, VALIDATION_SEEDS)
    store = ExampleStore(cache, engine, args.question_weight)
    store.fill("train", train_stream, args.examples, tqdm)
    store.fill("validation", val_stream, args.validation_examples, tqdm)

    torch.manual_seed(args.seed)
    rotary = engine.model.model.rotary_emb
    shape = NetShape(engine.parts.num_layers, engine.parts.num_kv_heads, engine.parts.head_dim, args.rank, args.kernel)
    scorer = TokenScorer(shape, rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
    shares = HeadShares(shape)
    init_record = warm_start(args.init, identity, scorer, shares) if args.init else None
    params = list(scorer.parameters()) + list(shares.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    ckpt_path = cache / f"{args.out.stem}.ckpt"
    state = {"step": 0, "curve": [], "seconds": 0.0}
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        if saved["fingerprint"] != fingerprint(args):
            raise SystemExit(f"{ckpt_path} was made with other settings: delete it or rerun with those settings")
        scorer.load_state_dict(saved["scorer"])
        shares.load_state_dict(saved["shares"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"resuming at step {state['step']}", file=sys.stderr)
    validation = [store.load("validation", i) for i in range(args.validation_examples)]
    validator = Validator(validation, engine.parts, args.window, args.held_out)

    def training_record() -> dict:
        return {"command": "python -m vllm_kvevict.lkv.train " + " ".join(sys.argv[1:] if argv is None else argv),
                "settings": fingerprint(args), "steps_done": state["step"], "train_seconds": round(state["seconds"], 1),
                "validation": state["curve"][-1] if state["curve"] else None,
                **({"init": init_record} if init_record else {})}

    def checkpoint() -> None:
        torch.save({"fingerprint": fingerprint(args), "scorer": scorer.state_dict(), "shares": shares.state_dict(),
                    "optimizer": optimizer.state_dict(), "state": state}, ckpt_path)
        save_artifact(args.out, identity, scorer, shares, training_record())
        (log_dir / "curve.json").write_text(json.dumps(state["curve"], indent=1))

    if not state["curve"]:
        state["curve"].append({"step": 0, **validator.baseline(VALIDATION_BUDGETS),
                               **validator.score(scorer, shares, VALIDATION_BUDGETS)})
    bar = tqdm(total=args.steps, initial=state["step"], desc="train", unit="step")
    last = args.steps if args.stop_after is None else min(args.steps, state["step"] + args.stop_after)
    while state["step"] < last:
        step, tick = state["step"], time.perf_counter()
        prepared = store.load("train", example_order(args, step))
        features = example_features(scorer, prepared.keys, prepared.values)
        budgets, block = step_draw(args, step)
        masks = soft_masks(scorer, shares, features, budgets, args.window, temperature(step, args), block)
        hidden = suffix_hidden(engine.parts, prepared.keys, prepared.values, prepared.fed, masks)
        loss = distill_loss(prepared.teacher, log_probs(engine.parts, hidden, prepared.rows), prepared.weights).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state["step"] += 1
        state["seconds"] += time.perf_counter() - tick
        value = float(loss.detach())
        state.setdefault("losses", []).append(round(value, 5))
        if state["step"] % args.validate_every == 0 or state["step"] == args.steps:
            state["curve"].append({"step": state["step"], "train_loss": _recent(state["losses"], args.validate_every),
                                   "temperature": temperature(step, args),
                                   **validator.score(scorer, shares, VALIDATION_BUDGETS)})
        if state["step"] % args.checkpoint_every == 0 or state["step"] == args.steps:
            checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", T=f"{temperature(step, args):.3f}")
    bar.close()
    checkpoint()
    if state["step"] < args.steps:
        print(f"stopped at step {state['step']} of {args.steps}: rerun the same command to go on", file=sys.stderr)
        return
    plot_curve(state["curve"], state["losses"], log_dir / "training_curve.png")
    plot_shares(shares, log_dir / "head_budgets.png", VALIDATION_BUDGETS)
    print(f"wrote {args.out} ({state['step']} steps, {state['seconds']:.0f} s training, "
          f"{time.perf_counter() - started:.0f} s this run)", file=sys.stderr)


def _recent(losses: list[float], n: int) -> float:
    window = losses[-n:]
    return round(sum(window) / len(window), 5)


if __name__ == "__main__":
    main()
