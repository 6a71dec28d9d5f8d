"""One example made ready to train on: its cache, what is fed after it, and the teacher.

The teacher is the frozen model with the full cache: its greedy answer is appended to what is
fed (self-distillation: the student learns to reproduce what the full cache would have said),
and its next-token log-probabilities at the counted positions are the targets.

Prepared examples are stored (:func:`save_prepared`) so that training can take several passes
over them and a stopped run resumes without prefilling again. Keys and values are stored in
float16 and the teacher is computed from those rounded tensors, so the student with every mask
at 1 is exactly the teacher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_kvevict.config import EvictionConfig
from vllm_kvevict.lkv.data import Example
from vllm_kvevict.lkv.distill import log_probs, suffix_hidden


@dataclass
class Prepared:
    """A prefilled example and its teacher.

    Attributes
    ----------
    example : what it was made from.
    keys, values : per layer ``[Hkv, L, d]`` of the compressed part (keys post-RoPE).
    fed : ``[T]`` int64: the tokens run after eviction (question, teacher's answer, or text).
    rows : ``[n]`` int64 positions of ``fed`` whose next-token distribution is compared.
    weights : ``[n]`` float32 weight of each.
    teacher : ``[n, V]`` float32 log-probabilities of the full-cache model there.
    """

    example: Example
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    fed: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    teacher: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1])


def counted_rows(num_fed: int, num_answer: int, question_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows predicting the next fed token (the last fed token predicts nothing fed).

    With ``num_answer`` answer tokens at the end of ``num_fed``, the rows predicting the fed
    tokens before the answer weigh ``question_weight``, those predicting answer tokens 1.
    """
    rows = torch.arange(max(num_fed - 1, 0))
    first_answer = num_fed - num_answer  # index of the first answer token in fed
    weights = torch.where(rows + 1 >= first_answer, 1.0, question_weight).to(torch.float32)
    return rows, weights


@torch.no_grad()
def prepare(engine, example: Example, question_weight: float) -> Prepared:
    """Prefill ``example`` with ``engine`` (a :class:`~vllm_kvevict.reference.engine.ReferenceEngine`),
    decode the teacher's greedy answer and its log-probabilities."""
    prefilled = engine.prefill(example.compressed_ids, keep_queries=1)
    keys = [k.to(torch.float16).float() for k in prefilled.keys]
    values = [v.to(torch.float16).float() for v in prefilled.values]
    answer: list[int] = []
    if example.max_new_tokens:
        suffix = example.fed_ids or None
        answer = engine.generate(prefilled, EvictionConfig(), example.max_new_tokens, suffix_ids=suffix).token_ids
    fed = torch.tensor(list(example.fed_ids) + answer, dtype=torch.long)
    num_answer = len(answer) if example.max_new_tokens else fed.numel()
    rows, weights = counted_rows(fed.numel(), num_answer, question_weight)
    hidden = suffix_hidden(engine.parts, keys, values, fed, None)
    teacher = log_probs(engine.parts, hidden, rows)[0]
    return Prepared(example, keys, values, fed, rows, weights, teacher)


def save_prepared(prepared: Prepared, path: Path) -> None:
    """Store ``prepared`` (keys, values in float16; the teacher as float16 log-probabilities)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "example": asdict(prepared.example),
            "keys": [k.to(torch.float16) for k in prepared.keys],
            "values": [v.to(torch.float16) for v in prepared.values],
            "fed": prepared.fed,
            "rows": prepared.rows,
            "weights": prepared.weights,
            "teacher": prepared.teacher.to(torch.float16),
        },
        tmp,
    )
    tmp.replace(path)


def load_prepared(path: Path) -> Prepared:
    data = torch.load(path, weights_only=True)
    return Prepared(
        example=Example(**data["example"]),
        keys=[k.float() for k in data["keys"]],
        values=[v.float() for v in data["values"]],
        fed=data["fed"],
        rows=data["rows"],
        weights=data["weights"],
        teacher=torch.log_softmax(data["teacher"].float(), dim=-1),
    )
