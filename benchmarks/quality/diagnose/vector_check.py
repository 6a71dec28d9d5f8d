"""Is VECTOR's loss a bug? One prompt through the reference engine, every route checked.

    python benchmarks/quality/diagnose/vector_check.py --kind qa --budget 0.1 --scorer keydiff

What it checks (printed, one line each):

* **RoPE undo**: the cached keys de-rotated by ``unrotate_keys`` at their positions against the
  keys taken before RoPE in the same forward pass (max abs difference).
* **dtypes** of the model, the cached keys/values and the artifact.
* **the routed values**: at key-only positions the cache holds ``reconstruct`` of that key at
  that position, everywhere else the true value (max abs difference, both).
* **(a) true values**: the VECTOR cache with its key-only tokens' true values gives the same
  logits as plain eviction keeping whole and key-only tokens whole (max abs logit difference).
* **the regression on this prompt**: per head R^2 of the artifact, of the bias alone (the
  intercept row), and of a fit on this prompt itself (in-sample, an upper bound).
* **per-layer attention-output error** of the question's tokens (teacher-forced: every layer's
  queries from the full-cache pass), relative to the full cache, for: plain eviction at the
  budget, VECTOR with true values (a), with ``W k`` (b), with the key-only tokens dropped, and
  with their values replaced by the prompt's mean value; and the attention mass on key-only
  tokens.
* the answers each variant generates.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from vllm_kvevict.config import EvictionConfig  # noqa: E402
from vllm_kvevict.lkv.nets import unrotate_keys  # noqa: E402
from vllm_kvevict.reference.forward import attend_ragged, run_tokens  # noqa: E402
from vllm_kvevict.reference.head_cache import HeadCache  # noqa: E402
from vllm_kvevict.reference.key_only import merged, routed_values  # noqa: E402
from vllm_kvevict.reference.model_parts import apply_rope  # noqa: E402
from vllm_kvevict.vector.artifact import artifact_for  # noqa: E402
from vllm_kvevict.vector.regression import Moments  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=os.environ.get("KVEVICT_MODEL_DIR"))
    p.add_argument("--kind", default="qa")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default="keydiff")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--extra", default="", help="extra config fields, k=v,k=v (e.g. vector_share=0.02)")
    return p.parse_args(argv)


@torch.no_grad()
def pre_rope_keys(parts, ids):
    """Per layer ``[Hkv, L, d]`` keys before RoPE, from the same full causal pass as run_prompt."""
    import torch.nn.functional as F

    L = ids.shape[0]
    cos, sin = parts.rope_tables(torch.arange(L))
    hidden = parts.embed_tokens(ids)
    out_keys = []
    for layer in range(parts.num_layers):
        q, k, v = parts.project(layer, hidden)
        out_keys.append(k.clone())
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g = parts.group_size
        out = F.scaled_dot_product_attention(q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None],
                                             is_causal=True, scale=parts.scale)[0]
        hidden = parts.finish(layer, hidden, out)
    return out_keys


def r2(values, predicted):
    """``[Hkv]`` pooled R^2 of ``predicted`` for ``values [Hkv, n, d]``."""
    sse = ((values - predicted) ** 2).sum(dim=(1, 2))
    sst = ((values - values.mean(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2))
    return 1 - sse / sst


def cache_of(keys, values, kept, suffix_kv, positions):
    cache = HeadCache.from_kept(keys, values, kept, reserve=positions.numel())
    for layer, (k, v) in enumerate(suffix_kv):
        cache.append(layer, k, v, positions)
    return cache


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from vllm_kvevict.evaluation.scoring import score
    from vllm_kvevict.evaluation.tasks import make_suite
    from vllm_kvevict.reference.engine import ReferenceEngine

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    task = make_suite([args.kind], tokenizer, [args.length], 1, args.seed, "after")[0]
    engine = ReferenceEngine(args.model_dir)
    parts = engine.parts
    prefilled = engine.prefill(task.prompt_ids)
    compressed = prefilled.prefix(task.context_end)
    L = compressed.prompt_len
    artifact = artifact_for(compressed.model)
    print(f"task {args.kind} seed {args.seed}: context {L} tokens, question {len(task.question_ids)}; "
          f"answers {task.answers}")

    # ---- RoPE undo, dtypes
    pre = pre_rope_keys(parts, compressed.input_ids)
    worst = max(float((unrotate_keys(k.float(), torch.arange(L), artifact.inv_freq, artifact.rope_scaling)
                       - p.float()).abs().max()) for k, p in zip(compressed.keys, pre))
    scale = max(float(p.abs().max()) for p in pre)
    print(f"RoPE undo: max |unrotate(cached) - pre-RoPE key| = {worst:.2e} (keys up to {scale:.1f}); "
          f"artifact inv_freq == model's: {torch.allclose(artifact.inv_freq, parts.rotary.inv_freq.float())}; "
          f"rope_scaling {artifact.rope_scaling}")
    print(f"dtypes: model {parts.dtype}, keys {compressed.keys[0].dtype}, values {compressed.values[0].dtype}, "
          f"weight {artifact.weight.dtype}; derotate in {int(artifact.derotate.sum())} of {artifact.derotate.numel()} heads")

    # ---- the routes
    extra = dict(kv.split("=") for kv in args.extra.split(",") if kv)
    extra = {k: (float(v) if v.replace(".", "", 1).isdigit() else v) for k, v in extra.items()}
    vcfg = EvictionConfig(scorer=args.scorer, budget=args.budget, vector="on", **extra)
    pcfg = EvictionConfig(scorer=args.scorer, budget=args.budget)
    vkept = engine.kept_set(compressed, vcfg)
    plain = engine.kept_set(compressed, pcfg).indices
    whole, key_only = vkept.indices, vkept.key_only
    n_whole = sum(int(i.numel()) for r in whole for i in r)
    n_ko = sum(int(i.numel()) for r in key_only for i in r)
    n_plain = sum(int(i.numel()) for r in plain for i in r)
    print(f"routes: plain {n_plain} tokens; VECTOR {n_whole} whole + {n_ko} key-only "
          f"(slots {n_whole + n_ko / 2:.0f}) over {len(whole) * len(whole[0])} heads")

    routed = routed_values(compressed.keys, compressed.values, key_only, artifact)
    err_ko, err_rest = 0.0, 0.0
    for layer in range(len(routed)):
        rebuilt = artifact.reconstruct(layer, compressed.keys[layer], torch.arange(L))
        mask = torch.zeros(routed[layer].shape[:2], dtype=torch.bool)
        for h, idx in enumerate(key_only[layer]):
            mask[h, idx] = True
        err_ko = max(err_ko, float((routed[layer] - rebuilt)[mask].abs().max()) if mask.any() else 0.0)
        err_rest = max(err_rest, float((routed[layer] - compressed.values[layer])[~mask].abs().max()))
    print(f"routed values: key-only rows vs reconstruct {err_ko:.1e}; other rows vs true values {err_rest:.1e}")

    # ---- (a): true values at key-only tokens == plain eviction keeping them whole
    q_ids = torch.tensor(task.question_ids)
    positions = torch.arange(L, L + q_ids.numel())
    both = merged(whole, key_only)
    gen_a = engine.generate(compressed, vcfg, 8, suffix_ids=q_ids, kept=both, return_logits=True)
    true_cache = HeadCache.from_kept(compressed.keys, compressed.values, both, reserve=q_ids.numel())
    logits_a = run_tokens(parts, true_cache, q_ids, positions)[-1]
    ko_true = HeadCache.from_kept(compressed.keys, routed_values(compressed.keys, compressed.values, key_only,
                                                                  _TrueArtifact(compressed.values)), both,
                                  reserve=q_ids.numel())
    logits_a2 = run_tokens(parts, ko_true, q_ids, positions)[-1]
    print(f"(a) key-only tokens with their true values vs the same tokens kept whole: max |logit diff| "
          f"{float((logits_a - logits_a2).abs().max()):.1e}; first logits vs generate(kept=whole+key-only) "
          f"{float((logits_a - gen_a.logits[0]).abs().max()):.1e}")

    # ---- the regression on this prompt
    r2_art, r2_bias, r2_fit = [], [], []
    for layer in range(len(routed)):
        v = compressed.values[layer].float()
        x = artifact.regressors(layer, compressed.keys[layer], torch.arange(L))
        r2_art.append(r2(v, artifact.reconstruct(layer, compressed.keys[layer], torch.arange(L))))
        r2_bias.append(r2(v, artifact.weight[layer][:, -1:].expand_as(v)))
        m = Moments.zeros((v.shape[0],), v.shape[-1])
        m.add(x, v)
        r2_fit.append(m.r2(m.solve()).float())
    r2_art, r2_bias, r2_fit = (torch.stack(t) for t in (r2_art, r2_bias, r2_fit))
    held = torch.where(artifact.derotate, artifact.r2[..., 1], artifact.r2[..., 0])
    print(f"R^2 on this prompt: artifact {float(r2_art.mean()):.3f} (min {float(r2_art.min()):.3f}); "
          f"bias alone {float(r2_bias.mean()):.3f}; in-sample fit {float(r2_fit.mean()):.3f}; "
          f"calibration held-out {float(held.mean()):.3f}; corr(prompt, held-out) "
          f"{float(torch.corrcoef(torch.stack((r2_art.flatten(), held.flatten())))[0, 1]):.2f}")

    # ---- per-layer attention output error, teacher-forced
    full = HeadCache.from_kept(compressed.keys, compressed.values,
                               [[torch.arange(L)] * compressed.num_kv_heads] * compressed.num_layers,
                               reserve=q_ids.numel())
    queries: list = []
    run_tokens(parts, full, q_ids, positions, queries_out=queries)
    T = q_ids.numel()
    suffix_kv = [(torch.stack([s.keys[-T:] for s in row]), torch.stack([s.values[-T:] for s in row]))
                 for row in full.stores]
    mean_values = [v.mean(dim=1, keepdim=True).expand_as(v) for v in compressed.values]
    mean_routed = [torch.where(_mask(key_only[i], v.shape[:2])[..., None], mv, v)
                   for i, (v, mv) in enumerate(zip(compressed.values, mean_values))]
    variants = {
        "plain": cache_of(compressed.keys, compressed.values, plain, suffix_kv, positions),
        "(a) true": cache_of(compressed.keys, compressed.values, both, suffix_kv, positions),
        "(b) W k": cache_of(compressed.keys, routed, both, suffix_kv, positions),
        "dropped": cache_of(compressed.keys, compressed.values, whole, suffix_kv, positions),
        "mean v": cache_of(compressed.keys, mean_routed, both, suffix_kv, positions),
    }
    errors = {name: [] for name in variants}
    mass = []
    for layer in range(compressed.num_layers):
        q = queries[layer]
        ref = attend_ragged(q, positions, full, layer, parts.scale)
        for name, cache in variants.items():
            out = attend_ragged(q, positions, cache, layer, parts.scale)
            errors[name].append(float((out - ref).norm() / ref.norm()))
        mass.append(_key_only_mass(q, positions, variants["(b) W k"], layer, parts.scale, key_only[layer]))
    print("per-layer relative attention-output error of the question's tokens vs the full cache:")
    print("layer | " + " | ".join(errors) + " | attention on key-only")
    for layer in range(compressed.num_layers):
        print(f"{layer:5d} | " + " | ".join(f"{errors[n][layer]:.3f}" for n in errors) + f" | {mass[layer]:.3f}")
    print("mean  | " + " | ".join(f"{sum(e) / len(e):.3f}" for e in errors.values())
          + f" | {sum(mass) / len(mass):.3f}")

    # ---- end to end
    for name, kept in (("plain", plain), ("(a) true", both), ("dropped", whole)):
        gen = engine.generate(compressed, pcfg, task.max_new_tokens, suffix_ids=q_ids, kept=kept)
        print(f"answer {name}: {gen.text!r} score {score(task, gen.text):.2f}")
    gen = engine.generate(compressed, vcfg, task.max_new_tokens, suffix_ids=q_ids, kept=vkept)
    print(f"answer (b) W k: {gen.text!r} score {score(task, gen.text):.2f}")


def _mask(rows, shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    for h, idx in enumerate(rows):
        mask[h, idx] = True
    return mask


def _key_only_mass(q, positions, cache, layer, scale, key_only_rows):
    """Mean attention probability the question's queries give the key-only tokens."""
    stores = cache.stores[layer]
    group = q.shape[0] // len(stores)
    total = []
    for head, store in enumerate(stores):
        s = torch.matmul(q[head * group:(head + 1) * group], store.keys.T) * scale
        s = s.masked_fill(~(store.positions[None] <= positions[:, None]), float("-inf"))
        p = torch.softmax(s.float(), dim=-1)
        ko = torch.isin(store.positions, key_only_rows[head])
        total.append(p[..., ko].sum(dim=-1).mean())
    return float(torch.stack(total).mean())


class _TrueArtifact:
    """An artifact whose reconstruction is the true value (check (a))."""

    def __init__(self, values):
        self.values = values

    def reconstruct(self, layer, keys, positions):
        return self.values[layer][:, positions].float()


if __name__ == "__main__":
    main()
