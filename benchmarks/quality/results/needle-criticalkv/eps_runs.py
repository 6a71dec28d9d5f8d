"""Study runs of criticalkv (adakv, rho 0.5) with eps patched: the study CLI has no eps flag."""
import sys
import vllm_kvevict.policies.scorers.criticalkv as ckv
from vllm_kvevict.reference.study import main
out_dir = sys.argv[1]
for eps, tag in [(0.0, "eps0"), (1e-6, "eps1e-6")]:
    ckv.CRITICALKV_EPSILON = eps
    print(f"### CRITICALKV_EPSILON = {eps}", flush=True)
    main(["--threads", "1", "--protocols", "inside", "--policies", "criticalkv",
          "--out", f"{out_dir}/{tag}_inside.jsonl"])
