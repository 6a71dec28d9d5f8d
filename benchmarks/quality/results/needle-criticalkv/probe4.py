"""Across failing prompts: every needle digit criticalkv drops in a head where snapkv keeps it."""
import os, sys, torch
torch.set_num_threads(1)
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.reference.engine import ReferenceEngine
from vllm_kvevict.evaluation.tasks import make_suite
from vllm_kvevict.policies import Allocation, build_scorer, rank
engine = ReferenceEngine(os.environ["KVEVICT_MODEL_DIR"]); tok = engine.tokenizer
tasks = make_suite(["niah_single"], tok, [2000, 3000], 10, 0)
snap = EvictionConfig(scorer="snapkv", budget=0.25, granularity="head")
ckv = EvictionConfig(scorer="criticalkv", budget=0.25, granularity="head")
allrat, n_lost, n_stage2, layers_hit = [], 0, 0, {}
for i in [int(x) for x in sys.argv[1].split(",")]:
    t = tasks[i]; ids = list(t.prompt_ids)
    sub = tok(" " + t.answers[0], add_special_tokens=False)["input_ids"]
    s0 = next(s for s in range(len(ids)) if ids[s:s + len(sub)] == sub)
    digits = [p for p in range(s0, s0 + len(sub)) if tok.decode([ids[p]]).strip()]
    pre = engine.prefill(t.prompt_ids)
    ks = engine.kept_indices(pre, snap); kc = engine.kept_indices(pre, ckv)
    layers = pre.layer_inputs(ckv)
    for l, inp in enumerate(layers):
        base = build_scorer(ckv, "snapkv").score(inp)
        B = Allocation(ckv).split_layer(base, inp); rb = rank(base)
        for h in range(pre.num_kv_heads):
            S = set(ks[l][h].tolist()); C = set(kc[l][h].tolist())
            for p in digits:
                if p in S and p not in C:
                    n_lost += 1; n_stage2 += int(rb[h, p] >= int(B[h]) // 2)
                    allrat.append(base.values[h, p].item() / 1e-4)
                    layers_hit[l] = layers_hit.get(l, 0) + 1
    print(f"task {i}: done, lost so far {n_lost}", flush=True)
r = torch.tensor(allrat)
print(f"digit evictions (kept by snapkv, dropped by criticalkv): {n_lost}; ranked past rho*B[g] (stage 2): {n_stage2}")
print(f"a/eps of those digits: median {r.median():.3f}, 90th pct {torch.quantile(r, 0.9):.3f}, share below 1: {(r < 1).float().mean():.3f}")
print("by layer:", dict(sorted(layers_hit.items())))
