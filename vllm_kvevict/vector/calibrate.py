"""Calibrate VECTOR's regressions: ``python -m vllm_kvevict.vector.calibrate --model DIR --out FILE``.

For every calibration sequence (the project's generated tasks, prompt and question, and plain
generated text, :mod:`vllm_kvevict.lkv.data`, from seeds of their own; or, for a random model
whose tokenizer reads no text, uniformly random token ids: kind ``random``) the model's prompt pass
gives every layer's cached keys and values; per (layer, KV head) the moments of two fits are
accumulated, one on the cached (rotated) keys and one on the keys with RoPE undone at their
positions (:mod:`.regression`). Every ``--holdout-every``-th sequence is held out of the fits
and measures their R^2; each head keeps the variant with the higher held-out R^2. Prints the
R^2 table (``--table`` also writes it as Markdown) and writes the artifact (:mod:`.artifact`).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from vllm_kvevict.evaluation.kinds import KINDS
from vllm_kvevict.lkv.data import CONTINUATION, check_kinds
from vllm_kvevict.vector.regression import DEFAULT_RIDGE, Moments

#: Task seeds of calibration sequences: apart from the benchmarks' (< 1,000,000) and LKV's.
CALIBRATION_SEEDS = range(5_000_000, 6_000_000)
#: Every task kind of vllm_kvevict.evaluation, and plain generated text.
DEFAULT_KINDS: tuple[str, ...] = tuple(KINDS) + (CONTINUATION,)
#: Uniformly random token ids (no special token): for a random model whose tokenizer reads no
#: text (the serving check's word-level tiny Llama), not among the defaults.
RANDOM_TOKENS = "random"
#: Key variants: 0 the cached (rotated) key, 1 the key with RoPE undone.
VARIANTS = ("rotated", "derotated")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vllm_kvevict.vector.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="HF model folder")
    p.add_argument("--out", required=True, type=Path, help="artifact file to write (.safetensors)")
    p.add_argument("--sequences", type=int, default=30, help="calibration sequences (held-out ones included)")
    p.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help="task kinds and/or 'continuation' (plain generated text) and/or 'random' (random "
                        "token ids), comma-separated")
    p.add_argument("--holdout-every", type=int, default=5, help="every N-th sequence measures R^2 only")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="ridge relative to mean diag(X^T X)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", type=Path, default=None, help="also write the R^2 table (Markdown) here")
    return p.parse_args(argv)


def sequence_ids(tokenizer, index: int, length: int, seed: int, kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[int]:
    """Calibration sequence ``index``: a generated task of ``kinds`` (compressed part then what
    follows), plain generated text (``continuation``) or random token ids (``random``: exactly
    ``length``), ``length`` tokens at most."""
    from vllm_kvevict.lkv.data import make_example

    rng = random.Random(f"vector-calibration-{seed}-{index}")
    kind = rng.choice(kinds)
    task_seed = rng.randrange(CALIBRATION_SEEDS.start, CALIBRATION_SEEDS.stop)
    if kind == RANDOM_TOKENS:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        draw = random.Random(task_seed)
        return [ids[draw.randrange(len(ids))] for _ in range(length)]
    example = make_example(tokenizer, kind, length, task_seed, "after")
    return (example.compressed_ids + example.fed_ids)[:length]


def accumulate(engine, args, progress) -> tuple[Moments, Moments, dict]:
    """Fit and held-out moments ``[Nl, Hkv, 2]`` over the calibration sequences."""
    from vllm_kvevict.lkv.nets import unrotate_keys
    from vllm_kvevict.reference.forward import run_prompt

    parts = engine.parts
    rotary = engine.model.model.rotary_emb
    shape = (parts.num_layers, parts.num_kv_heads, len(VARIANTS))
    fit, held = Moments.zeros(shape, parts.head_dim), Moments.zeros(shape, parts.head_dim)
    tokens = {"fit": 0, "held_out": 0}
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    check_kinds([k for k in kinds if k != RANDOM_TOKENS], ())
    for index in progress(range(args.sequences), desc="calibration sequences"):
        ids = torch.tensor(sequence_ids(engine.tokenizer, index, args.length, args.seed, kinds), dtype=torch.long)
        passed = run_prompt(parts, ids, keep_queries=1)
        positions = torch.arange(ids.shape[0])
        keys = torch.stack(passed.keys).float()  # [Nl, Hkv, L, d]
        plain = unrotate_keys(keys, positions, rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
        values = torch.stack(passed.values).float()
        both_keys = torch.stack((keys, plain), dim=2)  # [Nl, Hkv, 2, L, d]
        both_values = values.unsqueeze(2).expand_as(both_keys)
        target, name = (held, "held_out") if index % args.holdout_every == args.holdout_every - 1 else (fit, "fit")
        target.add(both_keys, both_values)
        tokens[name] += int(ids.shape[0])
    return fit, held, tokens


def r2_table(r2: torch.Tensor, derotate: torch.Tensor) -> str:
    """Markdown: one row per layer, per KV head ``rotated / derotated`` held-out R^2, chosen marked."""
    num_kv_heads = r2.shape[1]
    head = "| layer | " + " | ".join(f"head {g} (rotated / derotated)" for g in range(num_kv_heads)) + " |"
    lines = [head, "|" + "---|" * (num_kv_heads + 1)]
    for layer in range(r2.shape[0]):
        cells = []
        for g in range(num_kv_heads):
            rot, der = float(r2[layer, g, 0]), float(r2[layer, g, 1])
            mark = ("", "*") if bool(derotate[layer, g]) else ("*", "")
            cells.append(f"{rot:.3f}{mark[0]} / {der:.3f}{mark[1]}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    chosen = torch.where(derotate, r2[..., 1], r2[..., 0])
    lines.append("")
    lines.append(f"chosen (*): mean R^2 {float(chosen.mean()):.3f}, min {float(chosen.min()):.3f}, "
                 f"max {float(chosen.max()):.3f}; RoPE undone in {int(derotate.sum())} of {derotate.numel()} heads")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from vllm_kvevict.lkv.identity import ModelIdentity
    from vllm_kvevict.reference.engine import ReferenceEngine
    from vllm_kvevict.vector.artifact import save_artifact

    if args.sequences < args.holdout_every:
        raise SystemExit(f"--sequences {args.sequences} holds no sequence out (--holdout-every {args.holdout_every})")
    started = time.perf_counter()
    engine = ReferenceEngine(args.model)
    fit, held, tokens = accumulate(engine, args, tqdm)
    weight = fit.solve(args.ridge)  # [Nl, Hkv, 2, d + 1, d]
    r2 = held.r2(weight).float()  # [Nl, Hkv, 2]
    derotate = r2[..., 1] > r2[..., 0]
    chosen = torch.where(derotate[..., None, None], weight[:, :, 1], weight[:, :, 0]).float()
    rotary = engine.model.model.rotary_emb
    seconds = time.perf_counter() - started
    record = {"command": " ".join(["python -m vllm_kvevict.vector.calibrate"] + sys.argv[1:]),
              "sequences": args.sequences, "length": args.length, "holdout_every": args.holdout_every,
              "ridge": args.ridge, "seed": args.seed, "kinds": args.kinds, "tokens": tokens, "seconds": round(seconds, 1),
              "fit": "affine least squares, normal equations in float64 with a relative ridge"}
    save_artifact(args.out, ModelIdentity.from_hf_config(engine.model.config), chosen, derotate, r2,
                  rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)), record)
    table = r2_table(r2, derotate)
    print(table)
    print(f"wrote {args.out} ({tokens['fit']} fit tokens, {tokens['held_out']} held-out tokens, {seconds:.0f} s)")
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")


if __name__ == "__main__":
    main()
