"""Model Runner V2 (GPU default) hook, tested without a GPU.

The wrapped MRV2 methods are checked to exist with the signatures the hook relies on, and the
hook's planning + in-place compaction runs on MRV2-shaped inputs (an ``InputBatch``-like object:
vLLM's real ``InputBatch`` needs a GPU runner to build). Not verifiable here: a real MRV2 step
(prepare_inputs -> prepare_attn -> build_attn_metadata -> a GPU backend) and CUDA graphs.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import torch

from vllm_kvevict.config import EvictionConfig


def test_mrv2_methods_and_input_batch_fields_exist():
    import dataclasses

    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_kvevict.vllm.patching import original_of

    assert list(inspect.signature(original_of(GPUModelRunner, "prepare_attn")).parameters) == ["self", "input_batch"]
    assert list(inspect.signature(original_of(GPUModelRunner, "add_requests")).parameters) == ["self", "scheduler_output"]
    fields = {f.name for f in dataclasses.fields(InputBatch)}
    assert {"req_ids", "num_reqs", "idx_mapping_np", "query_start_loc_np", "num_computed_tokens_np",
            "seq_lens", "seq_lens_cpu_upper_bound"} <= fields
    # prepare_attn's result feeds build_attn_metadata through model_state.prepare_attn, which reads
    # seq_lens and the CPU upper bound from the input batch: what the hook edits in place.
    from vllm.v1.worker.gpu.model_states import default

    src = inspect.getsource(default.DefaultModelState.prepare_attn)
    assert "seq_lens=input_batch.seq_lens" in src and "input_batch.seq_lens_cpu_upper_bound" in src


class _Runner:
    """The MRV2 runner attributes the hook reads (a real one needs a GPU)."""

    def __init__(self, prompt_lens):
        self.kv_cache_config = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=["a", "b"])])
        self.cache_config = SimpleNamespace(block_size=16)
        self.req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.array(prompt_lens)))

    def get_model(self):
        return None


def test_mrv2_plan_compacts_block_tables_and_seq_lens_in_place(monkeypatch):
    from vllm_kvevict.vllm.compat import v0_32
    from vllm_kvevict.vllm.compat.v0_32 import plan_mrv2_step

    monkeypatch.setattr(v0_32, "our_connector_active", lambda: True)  # no KV connector group here
    from vllm_kvevict.vllm.worker import RequestState, WorkerEvictionState
    from vllm_kvevict.vllm import worker as worker_mod

    state = WorkerEvictionState()
    state.enabled = True
    state.server_default = EvictionConfig(scorer="snapkv", budget=0.25, window=8)
    # request "e" evicted blocks 1 and 2 earlier; "p" is in its last prefill chunk
    state.requests["e"] = RequestState(config=state.server_default, prompt_len=70, evicted=torch.tensor([1, 2]), observed_until=70)
    original = worker_mod._STATE
    worker_mod._STATE = state
    try:
        batch = SimpleNamespace(
            req_ids=["p", "e"],
            num_reqs=2,
            idx_mapping_np=np.array([1, 0]),
            query_start_loc_np=np.array([0, 30, 31]),
            num_computed_tokens_np=np.array([70, 80]),
            seq_lens=torch.tensor([100, 81], dtype=torch.int32),
            seq_lens_cpu_upper_bound=torch.tensor([100, 81], dtype=torch.int32),
        )
        tables = (torch.tensor([[1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13, 14, 15, 0]], dtype=torch.int32),)
        runner = _Runner([70, 100])
        plan_mrv2_step(runner, batch, tables)
    finally:
        worker_mod._STATE = original
    assert state.rows[0].score and (state.rows[0].window_lo, state.rows[0].window_hi) == (22, 30)
    assert tables[0][1, :4].tolist() == [10, 13, 14, 15] and tables[0][0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert batch.seq_lens.tolist() == [100, 81 - 32] and batch.seq_lens_cpu_upper_bound.tolist() == [100, 49]
    assert state.compacted_by_runner
    # the connector's resets arrive after planning in MRV2: planned requests are kept
    state.apply_resets({"p", "gone"}, {"p": 2})
    assert "p" in state.requests and state.generation_of("p") == 2


def test_restarted_request_is_planned_from_scratch():
    from vllm_kvevict.vllm.worker import RequestState, WorkerEvictionState

    state = WorkerEvictionState()
    cfg = EvictionConfig(scorer="snapkv", budget=0.25, window=8)
    state.requests["r"] = RequestState(config=cfg, prompt_len=100, evicted=torch.tensor([0, 1]), observed_until=100)
    state.open_step()
    state.plan_row(0, "r", {"kv_eviction": "snapkv", "kv_budget": 0.25, "kv_window": 8}, 100, 64, 36)
    assert 0 not in state.compact_rows and state.rows[0].score
    assert state.requests["r"].evicted is None
