"""How an eviction fails: at a stage, leaving its request as it was (never into the engine)."""

from __future__ import annotations


class EvictionFailure(RuntimeError):
    """An eviction that failed at ``stage`` (one of :data:`STAGES`); the request stays whole."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


#: Where an eviction can fail (the ``stage`` label of ``kvevict_errors_total``).
STAGES = ("scoring", "selection", "compaction", "invariant")
