"""Reference criticalkv page mode with the served plugin's first scoring (its two-stage token scores pooled)."""
import json, sys
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from transformers import AutoTokenizer
import os
from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.evaluation.tasks import make_suite
from vllm_kvevict.reference.engine import ReferenceEngine
from vllm_kvevict.policies.scorers import CriticalKV
CriticalKV.page_score = CriticalKV.score  # as the plugin's page mode first scored
md = os.environ["KVEVICT_MODEL_DIR"]
tasks = make_suite(["niah_single"], AutoTokenizer.from_pretrained(md), [2048], 20, 0, "after")
eng = ReferenceEngine(md)
cfg = EvictionConfig.from_fields(scorer="criticalkv", budget=0.25, allocation=None, granularity="page")
for t in tasks[:int(sys.argv[1])]:
    p = eng.prefill(t.prompt_ids)
    g = eng.generate(p, cfg, t.max_new_tokens, suffix_ids=None, block_size=32)
    print(json.dumps({"uid": t.uid, "output": g.text}), flush=True)
