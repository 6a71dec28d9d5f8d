"""Run NVIDIA kvpress presses on one prefill and save what they saw and what they kept.

Runs INSIDE the kvpress virtual environment (scripts/setup_kvpress_env.sh); it never imports
``vllm_kvevict``. Usage::

    .venv-kvpress/bin/python tests/parity/kvpress_capture.py --prompt ids.pt --cases cases.json \
        --model MODEL_DIR --out capture.pt [--model MODEL_DIR2 --out capture2.pt ...]

``ids.pt`` holds a 1-D LongTensor of token ids. ``cases.json`` is a list of::

    {"id": "adakv_snapkv",
     "press": {"class": "AdaKVPress", "alpha_safeguard": 0.2,
               "press": {"class": "SnapKVPress", "window_size": 64, "kernel_size": 5}},
     "compression_ratios": [0.5, 0.75, 0.9]}

How it captures. Every press is entered with kvpress's own context manager
(``with press(model):``), so kvpress's own forward hook calls the press on the real prefill.
Each press's ``compress`` is wrapped: the wrapper calls kvpress's ``compress`` once per
compression ratio on the very tensors the hook handed it, records the kept indices, and returns
the cache unchanged, so that all presses share one forward pass (a press runs after the layer's
attention, so the prefill itself never depends on it).

Kept indices come from what kvpress did, never from re-deriving its rule:

* pruning presses (``ScorerPress.compress``, ``PyramidKVPress``) return gathered keys; each
  returned key row is matched, by its bytes, to its row in the input keys (:class:`RowIndex`);
* masking presses (``AdaKVPress``, ``CriticalAdaKVPress``) leave the cache whole and record the
  pruned ``(batch, head, position)`` triples in ``module.masked_key_indices``; kept = the rest.

Per layer it also saves the tensors a re-implementation needs (float32, batch removed):
``keys``/``values`` ``[Hkv, L, d]`` exactly as the press got them (post-RoPE, from the cache);
``window_queries[w]`` ``[H, w, d]`` post-RoPE queries of the last ``w`` positions for each
``--windows`` size, built as ``SnapKVPress.compute_window_attention`` builds them (from the last
``w`` hidden states only, so the matmul rounds identically); ``queries_pre_rope``
``[H, L - n_sink, d]`` as ``ExpectedAttentionPress.get_query_statistics`` builds them (hidden
states after the sinks); ``o_proj`` ``[D, H*d]``. Once: ``rope_cos``/``rope_sin`` ``[512, d]`` for
positions ``L .. L+511`` from the model's rotary embedding (``apply_avg_rope``'s tables). The
scores each press's ``score`` returned are saved as well (``[Hkv, L]`` per layer, for AdaKV-style
presses the wrapped press's scores), to check that no tie sits at the cut.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import json
import os
import sys
from pathlib import Path

import torch

N_FUTURE_POSITIONS = 512


def build_press(spec: dict):
    """``{"class": "AdaKVPress", "press": {...}, **kwargs}`` -> a kvpress press object."""
    import kvpress

    spec = dict(spec)
    cls = getattr(kvpress, spec.pop("class"))
    if "press" in spec:
        spec["press"] = build_press(spec["press"])
    return cls(**spec)


def inner_scorer(press):
    """The press whose ``score`` gives the ranking (the wrapped one for AdaKV/CriticalAdaKV)."""
    from kvpress import AdaKVPress, CriticalAdaKVPress

    return press.press if isinstance(press, (AdaKVPress, CriticalAdaKVPress)) else press


class RowIndex:
    """Finds rows of one layer's keys ``[Hkv, L, d]`` by their bytes (exact, no arithmetic).

    kvpress returns gathered rows (``keys.gather``), i.e. the very bytes of input rows. Matching
    bytes involves no floating-point operation, so the result cannot depend on the CPU or on
    how many rows are looked up at once (a float projection ``keys @ r`` computed over ``L``
    rows and over ``n`` rows may round one row differently: seen on an AMD EPYC).
    """

    def __init__(self, keys: torch.Tensor):
        self.keys = keys
        self.index: list[dict[bytes, int]] = []
        for h in range(keys.shape[0]):
            rows = row_bytes(keys[h])
            where = {row: pos for pos, row in enumerate(rows)}
            if len(where) != len(rows):
                raise RuntimeError(f"head {h}: duplicate key rows: kept positions would be ambiguous")
            self.index.append(where)

    def positions(self, keys_out: torch.Tensor) -> list[torch.Tensor]:
        """Sorted positions of the rows of ``keys_out`` ``[Hkv, n, d]``, per head."""
        kept = []
        for h, where in enumerate(self.index):
            try:
                idx = torch.tensor([where[row] for row in row_bytes(keys_out[h])], dtype=torch.long)
            except KeyError:
                raise RuntimeError(f"head {h}: a returned key row is not a row of the input keys") from None
            if not torch.equal(self.keys[h, idx], keys_out[h]):
                raise RuntimeError(f"head {h}: matched rows differ from the returned ones")
            kept.append(torch.sort(idx).values)
        return kept


def row_bytes(rows: torch.Tensor) -> list[bytes]:
    """The raw bytes of each row of a 2-D tensor (``[n, d]`` -> ``n`` byte strings)."""
    raw = rows.detach().cpu().contiguous().view(torch.uint8).reshape(rows.shape[0], -1)
    return [bytes(r) for r in raw.tolist()]


def kept_from_mask(masked, num_kv_heads: int, seq_len: int) -> list[torch.Tensor]:
    """Complement of kvpress's ``module.masked_key_indices`` (batch 0), per KV head."""
    batch_idx, head_idx, seq_idx = masked
    if batch_idx.numel() and int(batch_idx.max()) != 0:
        raise RuntimeError("capture expects batch size 1")
    keep = torch.ones(num_kv_heads, seq_len, dtype=torch.bool)
    keep[head_idx.cpu(), seq_idx.cpu()] = False
    return [torch.nonzero(keep[h]).flatten() for h in range(num_kv_heads)]


class Capture:
    """Wraps presses, runs one prefill, collects inputs and kept indices."""

    def __init__(self, model, cases: list[dict], windows: list[int], n_sink: int):
        self.model = model
        self.windows = windows
        self.n_sink = n_sink
        self.cases = cases
        self.presses = {c["id"]: build_press(c["press"]) for c in cases}
        n = model.config.num_hidden_layers
        self.layers: list[dict | None] = [None] * n
        self.row_index: list[RowIndex | None] = [None] * n
        self.results = {
            c["id"]: {"spec": c, "ratios": {float(r): {"kept": [None] * n, "scores": [None] * n}
                                            for r in c["compression_ratios"]}}
            for c in cases
        }
        for case in cases:
            self._wrap(case["id"], self.presses[case["id"]], [float(r) for r in case["compression_ratios"]])

    def _wrap(self, case_id: str, press, ratios: list[float]) -> None:
        original_compress = press.compress
        scorer = inner_scorer(press)
        original_score = scorer.score
        last_scores: list[torch.Tensor] = []

        def recording_score(*args, **kwargs):
            scores = original_score(*args, **kwargs)
            last_scores.append(scores.detach().clone())
            return scores

        scorer.score = recording_score

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            layer = module.layer_idx
            self._record_layer(module, hidden_states, keys, values, kwargs)
            saved_ratio = press.compression_ratio
            try:
                for ratio in ratios:
                    press.compression_ratio = ratio
                    module.masked_key_indices = None
                    last_scores.clear()
                    k_out, _ = original_compress(
                        module, hidden_states, keys.clone(), values.clone(), attentions, kwargs
                    )
                    masked = getattr(module, "masked_key_indices", None)
                    if masked is not None:
                        kept = kept_from_mask(masked, keys.shape[1], keys.shape[2])
                    else:
                        kept = self.row_index[layer].positions(k_out[0])
                    slot = self.results[case_id]["ratios"][ratio]
                    slot["kept"][layer] = kept
                    slot["scores"][layer] = last_scores[0][0].float() if last_scores else None
            finally:
                press.compression_ratio = saved_ratio
                module.masked_key_indices = None
            # The cache stays whole: the next press on this layer sees the same tensors.
            return keys, values

        press.compress = compress

    def _record_layer(self, module, hidden_states, keys, values, kwargs) -> None:
        from transformers.models.llama.modeling_llama import rotate_half

        from kvpress.utils import get_prerope_query_states

        layer = module.layer_idx
        if self.layers[layer] is not None:
            ref = self.layers[layer]
            if not (torch.equal(ref["keys"], keys[0]) and torch.equal(ref["values"], values[0])):
                raise RuntimeError(f"layer {layer}: presses saw different keys/values")
            return
        cos, sin = kwargs["position_embeddings"]
        window_queries = {}
        for w in self.windows:
            # Exactly as SnapKVPress.compute_window_attention builds its window queries: the
            # projection of the last w hidden states only (a different row count may round
            # differently in the matmul).
            q = get_prerope_query_states(module, hidden_states[:, -w:])
            q = (q * cos[:, -w:].unsqueeze(1)) + (rotate_half(q) * sin[:, -w:].unsqueeze(1))
            window_queries[w] = q[0].detach().clone()
        self.row_index[layer] = RowIndex(keys[0].detach().clone())
        self.layers[layer] = {
            "keys": keys[0].detach().clone(),
            "values": values[0].detach().clone(),
            "window_queries": window_queries,
            # As ExpectedAttentionPress.get_query_statistics: hidden states after the sinks.
            "queries_pre_rope": get_prerope_query_states(module, hidden_states[:, self.n_sink :])[0].detach().clone(),
            "queries_pre_rope_start": self.n_sink,
            "o_proj": module.o_proj.weight.detach().clone(),
            "scale": float(module.scaling),
        }

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> dict:
        with contextlib.ExitStack() as stack:
            for press in self.presses.values():
                stack.enter_context(press(self.model))
            # The base model only: kvpress hooks its attention layers; the LM head is not needed.
            self.model.model(input_ids=input_ids.unsqueeze(0), use_cache=True)
        missing = [i for i, layer in enumerate(self.layers) if layer is None]
        if missing:
            raise RuntimeError(f"no press ran on layers {missing}")
        seq_len = input_ids.numel()
        rotary = self.model.model.rotary_emb
        position_ids = torch.arange(seq_len, seq_len + N_FUTURE_POSITIONS).unsqueeze(0)
        cos, sin = rotary(self.layers[0]["keys"].unsqueeze(0), position_ids)
        cfg = self.model.config
        return {
            "meta": {
                "kvpress": md.version("kvpress"),
                "transformers": md.version("transformers"),
                "torch": str(torch.__version__),
                "seq_len": seq_len,
                "num_layers": cfg.num_hidden_layers,
                "num_heads": cfg.num_attention_heads,
                "num_kv_heads": cfg.num_key_value_heads,
                "head_dim": self.layers[0]["keys"].shape[-1],
            },
            "input_ids": input_ids,
            "layers": self.layers,
            "rope_cos": cos[0].float(),
            "rope_sin": sin[0].float(),
            "cases": self.results,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, action="append", help="HF model folder (repeatable)")
    parser.add_argument("--out", required=True, type=Path, action="append", help="output file, one per --model")
    parser.add_argument("--prompt", required=True, type=Path, help="torch.save'd 1-D LongTensor of token ids")
    parser.add_argument("--cases", required=True, type=Path, help="JSON list of press cases")
    parser.add_argument("--windows", default="64,32,8,1", help="window sizes whose post-RoPE queries to save")
    parser.add_argument("--n-sink", type=int, default=4, help="sinks dropped from queries_pre_rope (kvpress: 4)")
    args = parser.parse_args(argv)
    if len(args.model) != len(args.out):
        parser.error("give one --out per --model")

    if "vllm_kvevict" in sys.modules:
        raise RuntimeError("the kvpress capture must not import vllm_kvevict")
    import transformers
    from transformers import AutoModelForCausalLM

    # One thread: the presses run many small ops, which thread-pool overhead only slows down
    # on a small, shared CPU.
    torch.set_num_threads(int(os.environ.get("KVEVICT_CAPTURE_THREADS", "1")))
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    input_ids = torch.load(args.prompt).long().flatten()
    cases = json.loads(args.cases.read_text())
    windows = [int(w) for w in args.windows.split(",")]
    for model_dir, out in zip(args.model, args.out):
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        result = Capture(model, cases, windows, args.n_sink).run(input_ids)
        result["meta"]["model"] = str(model_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, out)
        print(f"[kvpress-capture] {len(cases)} cases, {result['meta']['num_layers']} layers, "
              f"L={result['meta']['seq_len']} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
