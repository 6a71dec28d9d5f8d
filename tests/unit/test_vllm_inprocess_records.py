"""inprocess.recorded_key: a request's latest entry in one of the recorder's maps."""

from __future__ import annotations

from vllm_kvevict.vllm.inprocess import recorded_key


def test_the_latest_entry_of_the_id_or_its_suffixed_forms_and_no_other_request():
    records = {"7": "a", "7-x1": "b", "70": "other", "17-x": "other", "7-x2": "c"}
    assert recorded_key(records, "7") == "7-x2"
    assert recorded_key({"7": "a"}, "7") == "7"
    assert recorded_key(records, "8") is None
    assert recorded_key({"70": "x"}, "7") is None
