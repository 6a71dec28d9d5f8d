"""Needles at small budgets: head against page granularity, and pooling, on the reference engine.

    python benchmarks/quality/needle_granularity.py --budget 0.1 --n 6 [--settings ckv-adakv,ckv-page32]

niah_single prompts of 3000 tokens with the question before and after the context (the demo's
prompts, ``scripts/demo_request.py``), the whole prompt compressed; each prompt is prefilled
once, then every setting evicts and decodes greedily. Prints one line per prompt and setting,
then the accuracy of each setting.
"""

from __future__ import annotations

import argparse
import os

SETTINGS = {
    "ckv-adakv": dict(scorer="criticalkv", granularity="head"),
    "ckv-adakv-eps1e-4": dict(scorer="criticalkv", granularity="head", epsilon=1e-4),
    "snap-adakv": dict(scorer="snapkv", granularity="head"),
    "ckv-uniform": dict(scorer="criticalkv", granularity="head", allocation="uniform"),
    "ckv-rho0.8": dict(scorer="criticalkv", granularity="head", rho=0.8),
    "ckv-page32": dict(scorer="criticalkv", granularity="page"),
    "defensive": dict(scorer="defensivekv", granularity="head"),
    "ckv-max7": dict(scorer="criticalkv", granularity="head", pooling="max", pooling_kernel=7),
    "snap-max7": dict(scorer="snapkv", granularity="head", pooling="max", pooling_kernel=7),
    "ckv-avg9": dict(scorer="criticalkv", granularity="head", pooling_kernel=9),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--model-dir", default=os.environ.get("KVEVICT_MODEL_DIR"))
    args = ap.parse_args()

    import torch

    from vllm_kvevict.config import EvictionConfig
    from vllm_kvevict.evaluation.scoring import score
    from vllm_kvevict.evaluation.tasks import make_task
    from vllm_kvevict.reference.engine import ReferenceEngine

    torch.set_num_threads(1)
    engine = ReferenceEngine(args.model_dir)
    names = args.settings.split(",")
    right = dict.fromkeys(names, 0.0)
    for i in range(args.n):
        task = make_task("niah_single", engine.tokenizer, args.tokens, seed=i, question_position="both")
        prefilled = engine.prefill(torch.tensor(task.prompt_ids))
        for name in names:
            config = EvictionConfig(budget=args.budget, **SETTINGS[name])
            gen = engine.generate(prefilled, config, task.max_new_tokens, block_size=32)
            right[name] += score(task, gen.text)
            print(i, name, repr(gen.text.strip()[:30]), task.answers, score(task, gen.text), flush=True)
    print(f"budget {args.budget}, n={args.n}: " + ", ".join(f"{k} {v / args.n:.2f}" for k, v in right.items()))


if __name__ == "__main__":
    main()
