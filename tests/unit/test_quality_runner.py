"""The quality runner's suite: the kinds per length (``--kinds-at``), and the task order, round by
round over every length x kind, so a sweep stopped early (or split across shards) stays balanced."""

from types import SimpleNamespace

import pytest

from benchmarks.quality.run import parse_args, round_robin


def _tasks(lengths, kinds, n):
    return [SimpleNamespace(context_tokens=t, kind=k, i=i) for t in lengths for k in kinds for i in range(n)]


def test_round_robin_takes_one_task_of_every_cell_per_round():
    tasks = _tasks([1024, 2048], ["qa", "vt", "cwe"], 3)
    order = round_robin(tasks)
    assert sorted(map(id, order)) == sorted(map(id, tasks))
    assert [t.i for t in order] == [0] * 6 + [1] * 6 + [2] * 6
    assert [(t.context_tokens, t.kind) for t in order[:6]] == [(1024, "qa"), (1024, "vt"), (1024, "cwe"),
                                                               (2048, "qa"), (2048, "vt"), (2048, "cwe")]
    # every other task (a shard) still holds each length and kind
    shard = order[0::2]
    assert {t.context_tokens for t in shard[:3]} == {1024, 2048}


def test_round_robin_keeps_uneven_cells_and_empty_input():
    tasks = _tasks([1024], ["qa"], 2) + _tasks([2048], ["vt"], 1)
    assert [(t.kind, t.i) for t in round_robin(tasks)] == [("qa", 0), ("vt", 0), ("qa", 1)]
    assert round_robin([]) == []


def test_kinds_at_parses_length_and_kinds_and_names_the_flag_on_bad_input(capsys):
    args = parse_args(["--target", "reference", "--kinds-at", "4096=niah_single, qa", "--kinds-at", "2048=fwe"])
    assert dict(args.kinds_at) == {4096: ["niah_single", "qa"], 2048: ["fwe"]}
    for bad in ("4k=qa", "4096=", "qa"):
        with pytest.raises(SystemExit):
            parse_args(["--target", "reference", "--kinds-at", bad])
        assert "--kinds-at" in capsys.readouterr().err


def test_seed_at_parses_and_names_the_flag_on_bad_input(capsys):
    args = parse_args(["--target", "reference", "--seed", "4", "--seed-at", "2048=6", "--seed-at", "4096=7"])
    assert (args.seed, dict(args.seed_at)) == (4, {2048: 6, 4096: 7})
    for bad in ("2048", "2k=6", "2048=x"):
        with pytest.raises(SystemExit):
            parse_args(["--target", "reference", "--seed-at", bad])
        assert "--seed-at" in capsys.readouterr().err


def test_protocol_both_and_time_limit_refused_where_a_target_cannot_do_them(capsys):
    for argv, flag in ((["--target", "server", "--protocol", "both"], "--protocol both"),
                       (["--target", "kvpress", "--time-limit", "60"], "--time-limit")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert flag in capsys.readouterr().err
    assert parse_args(["--target", "reference", "--protocol", "both", "--time-limit", "60"]).time_limit == 60


def test_served_max_model_len_fits_the_longest_prompt_and_its_answer():
    from benchmarks.quality import served

    assert served.max_model_len(served.parse_args(["--lengths", "1024,2048"])) == 4096
    assert served.max_model_len(served.parse_args(["--lengths", "4096"])) == 4096 + 512
    assert served.max_model_len(served.parse_args(["--lengths", "1024", "--multiturn-lengths", "8192"])) == 8192 + 512
    assert served.max_model_len(served.parse_args(["--lengths", "4096", "--max-model-len", "6000"])) == 6000
    command = served.serve_command(served.parse_args(["--lengths", "4096", "--model-dir", "/m"]), 8000)
    assert command[command.index("--max-model-len") + 1] == "4608"
