"""The --kv-* flags on vLLM's real engine-args parser, and their path into additional_config."""

from __future__ import annotations

import argparse

import pytest

from vllm_kvevict.config import ALLOCATIONS, FLAT_KEYS, SCORERS, EvictionConfig, EvictionConfigError
from vllm_kvevict.vllm import cli

vllm_arg_utils = pytest.importorskip("vllm.engine.arg_utils")


@pytest.fixture(scope="module")
def plugin():
    from vllm_kvevict.vllm import plugin

    plugin.register()
    return plugin


@pytest.fixture(scope="module")
def parser(plugin):
    """vLLM's own serve-style parser: AsyncEngineArgs.add_cli_args on a FlexibleArgumentParser."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm serve"))


def engine_args(parser, smollm2_dir, *argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(smollm2_dir), *argv]))


def test_one_flag_per_flat_key_with_choices_and_defaults():
    specs = {s.key: s for s in cli.flag_specs()}
    assert list(specs) == list(FLAT_KEYS)
    assert specs["kv_eviction"].choices == SCORERS
    assert specs["kv_allocation"].choices == ALLOCATIONS
    assert specs["kv_budget"].choices is None
    for key, spec in specs.items():
        default = EvictionConfig.model_fields[FLAT_KEYS[key]].default
        assert spec.default_text == ("per scorer" if default is None else str(default))
        assert spec.help.count("(default:") == 1
        assert spec.option == "--" + key.replace("_", "-")


def test_flags_are_in_their_own_group_of_the_vllm_parser(parser):
    group = next(g for g in parser._action_groups if g.title == cli.GROUP_TITLE)
    options = {opt for action in group._group_actions for opt in action.option_strings}
    assert options == {spec.option for spec in cli.flag_specs()}
    help_text = parser.format_help()  # FlexibleArgumentParser: plain --help lists the groups
    assert cli.GROUP_TITLE in help_text


def test_no_flag_leaves_additional_config_untouched(parser, smollm2_dir):
    assert engine_args(parser, smollm2_dir).additional_config == {}
    assert engine_args(parser, smollm2_dir, "--kv-eviction", "none").additional_config == {}
    given = engine_args(parser, smollm2_dir, "--additional-config", '{"other": 1}')
    assert given.additional_config == {"other": 1}


def test_flags_travel_in_additional_config(parser, smollm2_dir):
    args = engine_args(parser, smollm2_dir, "--kv-eviction", "criticalkv", "--kv-budget", "0.1", "--kv_window", "16")
    assert args.additional_config == {"kv_eviction": {"scorer": "criticalkv", "budget": 0.1, "window": 16}}
    assert EvictionConfig.from_additional_config(args.additional_config).budget_tokens(10000) == 1000


def test_min_tokens_flag_travels_and_is_checked(parser, smollm2_dir, capsys):
    args = engine_args(parser, smollm2_dir, "--kv-eviction", "snapkv", "--kv-budget", "0.1", "--kv-min-tokens", "200")
    assert args.additional_config["kv_eviction"]["min_tokens"] == 200
    assert EvictionConfig.from_additional_config(args.additional_config).budget_tokens(900) == 200
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--kv-min-tokens", "-5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --kv-min-tokens: invalid kv_min_tokens=-5: a whole token count" in err
    with pytest.raises(SystemExit) as info:  # a floor with a token budget would be ignored: refused
        engine_args(parser, smollm2_dir, "--kv-eviction", "snapkv", "--kv-budget", "256", "--kv-min-tokens", "64")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--kv-min-tokens" in err and "invalid kv_min_tokens=64" in err
    help_text = next(s.help for s in cli.flag_specs() if s.key == "kv_min_tokens")
    assert "max(int(L * budget), min_tokens)" in help_text and "(default: " in help_text


def test_flags_merge_over_user_additional_config(parser, smollm2_dir):
    args = engine_args(
        parser,
        smollm2_dir,
        "--additional-config",
        '{"other": {"x": 1}, "kv_eviction": {"scorer": "tova", "budget": 0.5, "window": 8}}',
        "--kv-budget",
        "0.25",
    )
    assert args.additional_config == {"other": {"x": 1}, "kv_eviction": {"scorer": "tova", "budget": 0.25, "window": 8}}


@pytest.mark.parametrize(
    "argv, option, allowed",
    [
        (["--kv-eviction", "bogus"], "--kv-eviction", "snapkv"),
        (["--kv-budget", "1.5"], "--kv-budget", "a fraction in (0, 1)"),
        (["--kv-budget", "abc"], "--kv-budget", "a fraction in (0, 1)"),
        (["--kv-allocation", "lru"], "--kv-allocation", "adakv"),
        (["--kv-pooling-kernel", "4"], "--kv-pooling-kernel", "odd"),
        (["--kv-alpha", "1.5"], "--kv-alpha", "less than or equal to 1"),
    ],
)
def test_bad_flag_is_a_usage_error_naming_flag_and_allowed_values(parser, argv, option, allowed, capsys):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err
    assert allowed in err


def test_inconsistent_flags_are_a_usage_error_naming_them(parser, smollm2_dir, capsys):
    """Issue 17: flags invalid together exit with status 2 and a message, never a traceback."""
    with pytest.raises(SystemExit) as info:
        engine_args(parser, smollm2_dir, "--kv-eviction", "snapkv", "--kv-budget", "16", "--kv-window", "32")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-budget" in err and "--kv-window" in err and "invalid kv_window=32" in err


def test_single_flag_check_does_not_blame_other_flags():
    assert cli.parse_flag_value("kv_budget", "16") == 16  # window 32 is checked with all flags
    assert cli.parse_flag_value("kv_budget", "0.1") == 0.1
    with pytest.raises(argparse.ArgumentTypeError, match="kv_sinks"):
        cli.parse_flag_value("kv_sinks", "-1")


def test_normalize_additional_config():
    untouched = {"other": 1}
    assert cli.normalize_additional_config(untouched) is untouched
    flat = {"kv_eviction": "snapkv", "kv_budget": 0.2, "other": 1}
    assert cli.normalize_additional_config(flat) == {"other": 1, "kv_eviction": {"scorer": "snapkv", "budget": 0.2}}
    assert cli.normalize_additional_config({"kv_eviction": {"scorer": "none"}}) == {}
    with pytest.raises(EvictionConfigError) as info:
        cli.normalize_additional_config({"kv_eviction": {"scorer": "snapkv", "budget": 5.5}})
    assert info.value.field == "kv_eviction.budget"


def test_bad_additional_config_fails_at_engine_start(plugin, smollm2_dir):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(smollm2_dir), additional_config={"kv_eviction": {"scorer": "snap"}})
    with pytest.raises(EvictionConfigError) as info:
        args.create_engine_config()
    assert info.value.field == "kv_eviction.scorer"
    assert "snapkv" in str(info.value)


def test_patches_sit_on_the_expected_vllm_functions(plugin):
    """Fails if vLLM 0.32 moved or renamed what compat.v0_32.patch_cli_flags() wraps."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    from vllm_kvevict.vllm.patching import is_wrapped

    for name in ("add_cli_args", "from_cli_args", "create_engine_config"):
        assert is_wrapped(EngineArgs, name), name
    # AsyncEngineArgs must keep inheriting from_cli_args and calling EngineArgs.add_cli_args.
    assert "from_cli_args" not in vars(AsyncEngineArgs)
    assert "create_engine_config" not in vars(AsyncEngineArgs)
    from vllm_kvevict.vllm.compat import v0_32

    v0_32.patch_cli_flags()  # idempotent: the original under the wrapper is vLLM's own function
    from vllm_kvevict.vllm.patching import original_of

    assert original_of(EngineArgs, "from_cli_args").__func__.__module__ == "vllm.engine.arg_utils"


@pytest.mark.parametrize("argv", [[], ["--kv-eviction", "none"], ["--additional-config", '{"kv_eviction": {"scorer": "none"}}']])
def test_policy_none_leaves_the_engine_config_as_stock(parser, tiny_llama_dir, argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parser.parse_args(["--model", str(tiny_llama_dir), "--max-model-len", "256", *argv])
    vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert vllm_config.additional_config == {}
    assert vllm_config.kv_transfer_config is None  # no KV connector, hence no eviction machinery


def test_kv_vector_on_starts(parser, smollm2_dir):
    """Issue 19: VECTOR is served on vLLM-CPU and on the CUDA backends (no platform refusal:
    tests/unit/test_vector_plugin_platforms.py)."""
    argv = ("--kv-eviction", "keydiff", "--kv-budget", "0.1", "--kv-vector", "on")
    assert engine_args(parser, smollm2_dir, *argv).additional_config["kv_eviction"]["vector"] == "on"
