"""The soak's request mix: valid policies drawn at random, every invalid setting the config has,
and prompts over the model's length (pure data, no server)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

from vllm_kvevict.config import ALLOCATIONS, SCORERS

#: (vllm_xargs, the field the 400 must name): every invalid value and JSON type of every setting,
#: and malformed vllm_xargs (``param`` None: vLLM's own request validation answers those).
INVALID: tuple[tuple[Any, Optional[str]], ...] = (
    ({"kv_eviction": "snapk"}, "kv_eviction"),
    ({"kv_eviction": 3}, "kv_eviction"),
    ({"kv_budget": -1}, "kv_budget"),
    ({"kv_budget": 0}, "kv_budget"),
    ({"kv_budget": "abc"}, "kv_budget"),
    ({"kv_budget": "nan"}, "kv_budget"),
    ({"kv_budget": "inf"}, "kv_budget"),
    ({"kv_budget": 1.5}, "kv_budget"),
    ({"kv_budget": [0.2]}, "kv_budget"),
    ({"kv_budget": True}, "kv_budget"),
    ({"kv_allocation": "fair"}, "kv_allocation"),
    ({"kv_window": -1}, "kv_window"),
    ({"kv_window": True}, "kv_window"),
    ({"kv_window": 0, "kv_eviction": "snapkv"}, "kv_window"),
    ({"kv_sinks": -2}, "kv_sinks"),
    ({"kv_pooling": "median"}, "kv_pooling"),
    ({"kv_pooling_kernel": 4}, "kv_pooling_kernel"),
    ({"kv_granularity": "token"}, "kv_granularity"),
    ({"kv_head_selection": "row"}, "kv_head_selection"),
    ({"kv_decode_interval": 10}, "kv_decode_interval"),
    ({"kv_alpha": 2}, "kv_alpha"),
    ({"kv_rho": -0.5, "kv_eviction": "criticalkv"}, "kv_rho"),
    ({"kv_epsilon": -1, "kv_eviction": "criticalkv"}, "kv_epsilon"),
    ({"kv_criticalkv_base": "criticalkv", "kv_eviction": "criticalkv"}, "kv_criticalkv_base"),
    ({"kv_rho": 0.3, "kv_eviction": "snapkv"}, "kv_rho"),
    ({"kv_eviction": "snapkv", "kv_budget": 16, "kv_window": 64}, "kv_window"),
    ({"kv_request_override": "any"}, "kv_request_override"),
    ({"kv_bogus": 1}, "kv_bogus"),
    ("not an object", None),
    ([1, 2], None),
)


@dataclass
class Job:
    """One request of the soak."""

    index: int
    kind: str  # valid, invalid, too_long
    prompt: list[int]
    max_tokens: int
    stream: bool
    xargs: Any = None
    #: for invalid requests, the field the 400 must name (None: any 400)
    expect_param: Optional[str] = None
    #: streamed chunks after which the client hangs up (None: read to the end)
    abort_after: Optional[int] = None
    #: whether the policy keeps everything (budget 1 or none): its output must be stock's
    identity: bool = False


def random_policy(rng: random.Random) -> tuple[dict, bool]:
    """A valid ``vllm_xargs`` policy and whether it keeps everything."""
    scorer = rng.choice([s for s in SCORERS if s != "lkv"])
    if scorer == "none":
        return {"kv_eviction": "none"}, True
    roll = rng.random()
    if roll < 0.1:
        return {"kv_eviction": scorer, "kv_budget": 1}, True
    xargs: dict[str, Any] = {"kv_eviction": scorer}
    xargs["kv_budget"] = rng.choice([0.05, 0.1, 0.2, 0.5]) if roll < 0.8 else rng.choice([64, 128, 256])
    if rng.random() < 0.3:
        xargs["kv_allocation"] = rng.choice(["uniform", "adakv", "adakv_floor", "pyramid", "global"])
        assert xargs["kv_allocation"] in ALLOCATIONS
    if rng.random() < 0.3:
        xargs["kv_granularity"] = rng.choice(["page", "head"])
    return xargs, False


def make_jobs(n: int, seed: int, max_model_len: int, vocab: tuple[int, int] = (100, 20000)) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        roll = rng.random()
        length = rng.randint(100, max_model_len - 64)
        prompt = [rng.randint(*vocab) for _ in range(length)]
        stream = rng.random() < 0.5
        if roll < 0.1:
            xargs, param = INVALID[i % len(INVALID)]
            jobs.append(Job(i, "invalid", prompt[:200], 4, stream, xargs, param))
        elif roll < 0.13:
            too_long = [rng.randint(*vocab) for _ in range(max_model_len + rng.randint(1, 200))]
            jobs.append(Job(i, "too_long", too_long, 4, stream))
        else:
            xargs, identity = random_policy(rng)
            abort = rng.randint(1, 6) if stream and rng.random() < 0.5 else None  # ~a quarter of all
            # a fifth decode long enough to grow past the small cache: running requests get preempted
            max_tokens = rng.randint(128, 320) if rng.random() < 0.2 else rng.randint(4, 24)
            jobs.append(Job(i, "valid", prompt, max_tokens, stream, xargs, abort_after=abort,
                            identity=identity and abort is None))
    return jobs
