"""Prepared examples on disk: one file per example, made once, read every pass.

``DIR/manifest.json`` records what the examples were made with; a store made with other
settings is refused (delete it, or give ``--cache`` another folder), so a resumed run never
mixes examples of two configurations.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_kvevict.lkv.data import Stream
from vllm_kvevict.lkv.prepare import Prepared, load_prepared, prepare, save_prepared


class ExampleStore:
    """Examples of ``engine``'s model under ``root`` (``root/<split>/<index>.pt``)."""

    def __init__(self, root: Path, engine, question_weight: float):
        self.root = Path(root)
        self.engine = engine
        self.question_weight = question_weight

    def path(self, split: str, index: int) -> Path:
        return self.root / split / f"{index:05d}.pt"

    def _check_manifest(self, split: str, stream: Stream) -> None:
        settings = {"kinds": list(stream.kinds), "lengths": list(stream.lengths), "inside_share": stream.inside_share,
                    "seed": stream.seed, "seeds": [stream.seeds.start, stream.seeds.stop],
                    "question_weight": self.question_weight}
        manifest = self.root / split / "manifest.json"
        if manifest.exists():
            if json.loads(manifest.read_text()) != settings:
                raise SystemExit(f"{manifest.parent} holds examples made with other settings: delete it or use --cache")
            return
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(settings, indent=1))

    def fill(self, split: str, stream: Stream, count: int, progress) -> None:
        """Make the examples ``0 .. count - 1`` of ``split`` that are not stored yet."""
        self._check_manifest(split, stream)
        missing = [i for i in range(count) if not self.path(split, i).exists()]
        for index in progress(missing, desc=f"prepare {split}", unit="example"):
            example = stream.example(self.engine.tokenizer, index)
            save_prepared(prepare(self.engine, example, self.question_weight), self.path(split, index))

    def load(self, split: str, index: int) -> Prepared:
        return load_prepared(self.path(split, index))
