"""CriticalKV's group value L1 norms through the C++ kernel ``csrc/value_l1.cpp`` (CPU, float32).

``out[g, j] = mean_{h in g} ||v[g, j] @ Wo[h]||_1`` with ``Wo[h] = o_proj[:, h*d:(h+1)*d].T``:
the definition of ``policies.ops.value_l1_norm``, computed with every product held in a
register and never stored (the torch path materialises ``[256, G*D]`` tiles of them). Its floats
differ from torch's in summation order only (about 1e-7 relative); they do not depend on the
thread count or on the number of rows, but do on the instruction set the CPU offers (:data:`ISAS`).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from vllm_kvevict.kernels import native_build

#: The kernel's paths, by the number ``kvevict_value_l1_isa`` reports.
ISAS = ("portable", "avx2", "avx512")

_i64 = ctypes.c_int64
_ready: dict[str, object] = {}


def _library() -> Optional[ctypes.CDLL]:
    if "lib" not in _ready:
        lib = native_build.load("value_l1")
        if lib is not None:
            lib.kvevict_value_l1.argtypes = [ctypes.c_void_p, _i64, _i64, _i64, _i64, _i64, ctypes.c_void_p,
                                             _i64, _i64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
            lib.kvevict_value_l1.restype = ctypes.c_int
            lib.kvevict_value_l1_isa.restype = ctypes.c_int
        _ready["lib"] = lib
    return _ready["lib"]


def available() -> bool:
    return _library() is not None


def best_isa() -> Optional[str]:
    """The instruction set the kernel uses on this CPU, or None when it is not available."""
    lib = _library()
    return None if lib is None else ISAS[lib.kvevict_value_l1_isa()]


def status() -> str:
    """One line for logs and benchmark headers: which path computes the value norms."""
    isa = best_isa()
    if isa is not None:
        return f"native kernel ({isa})"
    return f"torch ({native_build.unavailable_reason('value_l1') or 'kernel not loaded'})"


#: Output features per tile of the packed projection (``kTileCols`` in the C++ source).
TILE_COLS = 64
#: Packed projections by the ``o_proj`` tensor they came from (a layer's weight is packed once;
#: an in-place change of it, seen through ``_version``, packs it again). Inference tensors (the
#: serving path's weights, made under ``torch.inference_mode``) have no version counter: they
#: are taken as the constants they are there, and keyed by identity and storage only.
_packed = WeakIdKeyDictionary()


def pack_output_projection(o_proj: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``o_proj [D, H*d]`` -> ``[H, tiles, d, 64]`` float32 contiguous, ``[h, t, k, c] =
    o_proj[t*64 + c, h*d + k]``, zero past ``D``: the layout the kernel streams."""
    dim, width = o_proj.shape
    tiles = -(-dim // TILE_COLS)
    wo = o_proj.float().t().reshape(num_heads, width // num_heads, dim)  # [H, d, D]
    wo = torch.nn.functional.pad(wo, (0, tiles * TILE_COLS - dim))
    return wo.view(num_heads, width // num_heads, tiles, TILE_COLS).permute(0, 2, 1, 3).contiguous()


def packed_output_projection(o_proj: torch.Tensor, num_heads: int) -> torch.Tensor:
    """:func:`pack_output_projection`, cached per ``o_proj`` tensor."""
    version = (o_proj.data_ptr(), None if o_proj.is_inference() else o_proj._version, num_heads)
    hit = _packed.get(o_proj)
    if hit is not None and hit[0] == version:
        return hit[1]
    packed = pack_output_projection(o_proj, num_heads)
    _packed[o_proj] = (version, packed)
    return packed


def group_value_l1(values: torch.Tensor, o_proj: torch.Tensor, num_heads: int,
                   isa: Optional[str] = None, threads: Optional[int] = None) -> torch.Tensor:
    """``values [Hkv, L, d]``, ``o_proj [D, H*d]`` (CPU, any strides) -> ``[Hkv, L]`` float32.

    ``isa``: one of :data:`ISAS` (tests), default the best this CPU has; ``threads``: default
    torch's intra-op thread count (the kernel runs in torch's OpenMP pool).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the value_l1 CPU kernel is not available: {native_build.unavailable_reason('value_l1')}")
    if values.dim() != 3 or o_proj.dim() != 2:
        raise ValueError(f"values must be [Hkv, L, d] and o_proj [D, H*d], got {tuple(values.shape)}, {tuple(o_proj.shape)}")
    hkv, length, d = values.shape
    if num_heads % hkv or o_proj.shape[1] != num_heads * d:
        raise ValueError(f"o_proj {tuple(o_proj.shape)} does not fit {num_heads} heads of dim {d} over {hkv} KV heads")
    if values.device.type != "cpu" or o_proj.device.type != "cpu":
        raise ValueError("group_value_l1 runs on CPU tensors only")
    values = values.float()
    if values.stride(2) != 1:
        values = values.contiguous()
    if isa is not None and isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS} or None, got {isa!r}")
    packed = packed_output_projection(o_proj, num_heads)
    out = torch.empty(hkv, length, dtype=torch.float32)
    rc = lib.kvevict_value_l1(values.data_ptr(), hkv, length, d, values.stride(0), values.stride(1),
                              packed.data_ptr(), num_heads, packed.shape[1], out.data_ptr(),
                              -1 if isa is None else ISAS.index(isa), threads or torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"kvevict_value_l1 failed (code {rc}; isa {isa!r} on a CPU whose best is {best_isa()!r})")
    return out
