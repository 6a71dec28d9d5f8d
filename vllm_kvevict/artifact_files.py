"""Versioned safetensors artifacts made for one model: writing, checked reading, packaged lookup.

Shared by the learned artifacts (LKV, :mod:`vllm_kvevict.lkv.artifact`; VECTOR,
:mod:`vllm_kvevict.vector.artifact`). An artifact is one safetensors file whose header
(``__metadata__``, all strings) holds at least ``format``, ``version`` and ``model`` (a
:class:`~vllm_kvevict.lkv.identity.ModelIdentity` as JSON). Each kind names its format, the
version it reads, the config field that sets a path (named in errors), its error class and the
command that makes one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

if TYPE_CHECKING:  # imported where used: vllm_kvevict.lkv's package imports this module
    from vllm_kvevict.lkv.identity import ModelIdentity


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact.

    Attributes
    ----------
    label : the kind's name in messages (``LKV``).
    format : the header's ``format``.
    version : the ``version`` this package reads.
    path_field : the flat config key that names a file (``kv_lkv_artifact``).
    error : the exception class raised (a ``ValueError`` subclass).
    make_command : how to make one (``python -m vllm_kvevict.lkv.train``), for messages.
    directory : where the packaged artifacts live (one per model).
    """

    label: str
    format: str
    version: int
    path_field: str
    error: type
    make_command: str
    directory: Path

    def write(self, path: Union[str, Path], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """Write ``tensors`` and ``metadata`` (``format`` and ``version`` added) to ``path``,
        atomically, readable by all (package data)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": self.format, "version": str(self.version), **metadata}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    def file_key(self, path: Union[str, Path]) -> tuple[str, int]:
        """``(resolved path, modification time)``: what a loader caches an artifact by (a file
        rewritten in place is read again); refused when there is no such file."""
        path = Path(path).resolve()
        if not path.is_file():
            raise self.error(f"{self.path_field}={str(path)!r}: no such file")
        return str(path), path.stat().st_mtime_ns

    def read_header(self, path: Union[str, Path]) -> dict[str, str]:
        """The file's metadata, checked for this kind's format and version."""
        from safetensors import safe_open

        path = Path(path)
        where = f"{self.path_field}={str(path)!r}"
        if not path.is_file():
            raise self.error(f"{where}: no such file")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
        except Exception as exc:  # not a safetensors file
            raise self.error(f"{where}: not a safetensors file ({exc})") from None
        if metadata.get("format") != self.format:
            raise self.error(f"{where}: format {metadata.get('format')!r}, expected {self.format!r}")
        if metadata.get("version") != str(self.version):
            raise self.error(
                f"{where}: artifact version {metadata.get('version')!r}, this package reads "
                f"version {self.version}: make it again with {self.make_command}"
            )
        return metadata

    def packaged(self) -> list[Path]:
        """The artifact files shipped in :attr:`directory`, sorted."""
        return sorted(self.directory.glob("*.safetensors"))

    def packaged_for(self, identity: "ModelIdentity") -> Optional[Path]:
        """The packaged artifact made for ``identity``, ``None`` if there is none."""
        from vllm_kvevict.lkv.identity import ModelIdentity

        for candidate in self.packaged():
            if ModelIdentity.from_json(self.read_header(candidate)["model"]) == identity:
                return candidate
        return None

    def check_model(self, path: Union[str, Path], made_for: "ModelIdentity", identity: "ModelIdentity") -> None:
        """Refuse an artifact made for another model, naming every field that differs."""
        differences = made_for.differences(identity)
        if differences:
            raise self.error(
                f"{self.path_field}={str(path)!r} was made for {made_for.describe()}, not for "
                f"{identity.describe()} ({'; '.join(differences)})"
            )

    def resolve(self, needed_by: str, model: Any, path: Optional[Union[str, Path]], load: Callable[[Any], Any],
                packaged_path: Callable[["ModelIdentity"], Optional[Path]]) -> Any:
        """The artifact for ``model`` (an identity, or a callable giving it): the file ``path``,
        else the packaged one made for it (``load`` reads a file); refused when the model is
        unknown, when ``path`` was made for another model, or when no packaged one matches."""
        identity = model() if callable(model) else model
        if identity is None:
            raise self.error(f"{needed_by} needs the model it runs on: build the policy with build_policy(..., model=...)")
        if path is not None:
            artifact = load(path)
            self.check_model(path, artifact.identity, identity)
            return artifact
        packaged = packaged_path(identity)
        if packaged is None:
            raise self.missing(identity)
        return load(packaged)

    def missing(self, identity: "ModelIdentity") -> Exception:
        """The error for a model with no packaged artifact."""
        return self.error(
            f"no packaged {self.label} artifact for {identity.describe()} (in {self.directory}): make one with "
            f"{self.make_command} --model DIR --out FILE and set {self.path_field}=FILE"
        )
