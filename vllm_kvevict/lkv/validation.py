"""The training curve's measure: validation examples under the served (hard) selection.

For each validation example and budget, the policy's kept set (single tokens per head, and
whole 32-token pages per head) gives 0/1 masks; the student pass over them is compared with the
teacher: ``kl`` (weighted mean of ``KL(teacher || student)``) and ``agree`` (share of answer
positions where the student's most likely token is the teacher's). :meth:`Validator.baseline`
does the same for ``keydiff`` with ``adakv`` (the best query-agnostic scorer before LKV).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.data import DEFAULT_HELD_OUT
from vllm_kvevict.lkv.distill import distill_loss, log_probs, suffix_hidden
from vllm_kvevict.lkv.masks import example_features, kept_masks, served_kept, train_config
from vllm_kvevict.lkv.prepare import Prepared
from vllm_kvevict.policies import LayerInputs, compute_kept
from vllm_kvevict.policies.head_page_select import plan_head_pages
from vllm_kvevict.policies.registry import build_scorer

#: Page size of the whole-pages-per-head selection (the plugin's CPU block size).
PAGE = 32
#: Selection modes measured: single tokens per head, whole pages per head.
MODES = {"token": None, "page": PAGE}


class Validator:
    """Scores kept sets on ``examples`` (prepared) with the model's ``parts``
    (:class:`~vllm_kvevict.reference.model_parts.DecoderParts`), window ``window``."""

    def __init__(self, examples: list[Prepared], parts, window: int, held_out=DEFAULT_HELD_OUT):
        self.examples = examples
        self.parts = parts
        self.window = window
        self.held_out = set(held_out)

    @torch.no_grad()
    def _measure(self, masks_of) -> dict:
        """``masks_of(example) -> {label: per-layer [1, Hkv, L] masks}`` -> mean metrics per label."""
        sums: dict[str, list[float]] = defaultdict(list)
        for example in self.examples:
            answer = example.weights >= 1.0
            for label, masks in masks_of(example).items():
                hidden = suffix_hidden(self.parts, example.keys, example.values, example.fed, masks)
                student = log_probs(self.parts, hidden, example.rows)
                kl = float(distill_loss(example.teacher, student, example.weights)[0])
                agree = (student[0].argmax(-1) == example.teacher.argmax(-1))[answer].float().mean()
                for group in ("all", "held_out") if example.example.kind in self.held_out else ("all",):
                    sums[f"{label}/kl/{group}"].append(kl)
                    sums[f"{label}/agree/{group}"].append(float(agree))
        return {k: round(sum(v) / len(v), 5) for k, v in sorted(sums.items())}

    def score(self, scorer, shares, budgets) -> dict:
        """LKV's kept sets at ``budgets``, both selection modes."""
        def masks_of(example):
            features = example_features(scorer, example.keys, example.values)
            out = {}
            for budget in budgets:
                config = train_config(budget, self.window)
                for mode, block in MODES.items():
                    kept = served_kept(scorer, shares, features, config.model_copy(update={"head_selection": mode}), block)
                    out[f"lkv/{mode}/{budget:g}"] = kept_masks(kept, example.length)
            return out

        return self._measure(masks_of)

    def baseline(self, budgets) -> dict:
        """``keydiff`` + ``adakv`` kept sets at ``budgets``, both selection modes."""
        def masks_of(example):
            layers = [LayerInputs(keys=k, values=v, queries=k[:, :0], layer_idx=i, num_layers=len(example.keys))
                      for i, (k, v) in enumerate(zip(example.keys, example.values))]
            out = {}
            for budget in budgets:
                config = EvictionConfig(scorer="keydiff", budget=budget, window=self.window, min_tokens=0)
                out[f"keydiff/token/{budget:g}"] = kept_masks(compute_kept(layers, config), example.length)
                scorer = build_scorer(config)
                pages = plan_head_pages([scorer.page_score(x) for x in layers], config, example.length, PAGE)
                out[f"keydiff/page/{budget:g}"] = kept_masks(pages, example.length)
            return out

        return self._measure(masks_of)
