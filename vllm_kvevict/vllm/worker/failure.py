"""How an eviction fails: at a stage, leaving its request as it was (never into the engine)."""

from __future__ import annotations


class EvictionFailure(RuntimeError):
    """An eviction that failed at ``stage`` (one of :data:`STAGES`); the request stays whole."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


#: Where an eviction can fail (the ``stage`` label of ``kvevict_errors_total``).
STAGES = ("scoring", "selection", "compaction", "invariant")


def layer_scores(sink, num_layers: int) -> list:
    """Every layer's scores of the scoring step, in layer order (a failure observing them, or a
    missing layer, is the scoring stage's)."""
    if sink.error is not None:
        raise EvictionFailure("scoring", sink.error)
    if set(sink.scores) != set(range(num_layers)):
        raise EvictionFailure("scoring", f"scores for {len(sink.scores)}/{num_layers} layers")
    return [sink.scores[i] for i in range(num_layers)]


def injected(sink, stage: str) -> None:
    """Fail at ``stage`` when a fault-injection test asked for it (the sink's ``fault``)."""
    if sink.fault == stage:
        raise EvictionFailure(stage, f"injected {stage} fault")


def check_compaction(kept, plan, length: int, num_blocks: int) -> None:
    """What must hold before a compacted request attends its head-pages (else it stays whole)."""
    for routes in (kept.indices, kept.key_only or []):  # whole tokens, then VECTOR's key-only ones
        for layer, heads in enumerate(routes):
            for g, positions in enumerate(heads):
                if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < length):
                    raise EvictionFailure("invariant",
                                          f"layer {layer} head {g} keeps a position outside the scored length")
    most = max((sum(len(pages) for pages in layer) for layer in plan.head_pages), default=0)
    if most > num_blocks * plan.num_kv_heads:
        raise EvictionFailure("invariant", f"a layer uses {most} head-pages of {num_blocks} compact blocks")
    if int(plan.slots().sum()) != kept.kept_tokens():
        raise EvictionFailure("invariant", "the compact region does not hold every kept token")
