"""inprocess.recorded_key: a request's latest entry in one of the recorder's maps;
inprocess.key_only_reads: the key-only tokens decode attention takes, by path and layer."""

from __future__ import annotations

import torch

from vllm_kvevict.vllm.inprocess import key_only_reads, recorded_key


def test_the_latest_entry_of_the_id_or_its_suffixed_forms_and_no_other_request():
    records = {"7": "a", "7-x1": "b", "70": "other", "17-x": "other", "7-x2": "c"}
    assert recorded_key(records, "7") == "7-x2"
    assert recorded_key({"7": "a"}, "7") == "7"
    assert recorded_key(records, "8") is None
    assert recorded_key({"70": "x"}, "7") is None


def test_key_only_reads_records_both_paths_and_restores_them(tiny_vector_artifact, monkeypatch):
    from vllm_kvevict.vector import load_artifact
    from vllm_kvevict.vllm.backends import head_batch, head_rows

    artifact = load_artifact(tiny_vector_artifact)
    kernel_calls = []
    monkeypatch.setattr(head_batch, "paged_decode_attention",
                        lambda *a, key_only=None, **k: kernel_calls.append(key_only))
    before = head_batch.KeyOnlyWeights.segment, head_batch.paged_decode_attention, head_rows.entry_values
    weights = head_batch.KeyOnlyWeights.of(artifact, torch.device("cpu"))
    keys = torch.randn(3, artifact.weight.shape[-1])
    heads, positions = torch.tensor([0, 1, 1]), torch.tensor([5, 9, 11])
    lens = torch.tensor([[2, 0], [1, 4]], dtype=torch.int32)
    with key_only_reads() as reads:
        segment = weights.segment(1, lens, torch.zeros(2, 2, 4, dtype=torch.int32))
        assert reads == []  # made, not yet taken by a kernel call
        head_batch.paged_decode_attention("q", key_only=None)  # a call without key-only tokens
        head_batch.paged_decode_attention("q", key_only=segment)
        rebuilt = head_rows.entry_values(artifact, 0, keys, heads, positions)
    assert reads == [("gpu", 1, 7), ("torch", 0, 3)] and kernel_calls == [None, segment]
    assert torch.equal(segment.weight, weights.weight[1]) and segment.lens is lens
    assert (head_batch.KeyOnlyWeights.segment, head_batch.paged_decode_attention, head_rows.entry_values) == before
    assert head_rows.entry_values(artifact, 0, keys, heads, positions).equal(rebuilt)
    assert reads == [("gpu", 1, 7), ("torch", 0, 3)]
