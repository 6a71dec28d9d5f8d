"""Compile every Triton kernel for a GPU without one: the CPU-side check of the GPU build.

The wrappers are called on CPU tensors with ``JITFunction.run`` replaced by a hook that runs
Triton's own argument binding and specialization for an NVIDIA target (default sm_90, H100)
and compiles to a cubin with the ``ptxas`` shipped in the Triton wheel, launching nothing.
Prints registers, local memory (spills) and shared memory per kernel (``cuobjdump -res-usage``);
exits non-zero when a kernel fails to compile. Must run without ``TRITON_INTERPRET=1``::

    python benchmarks/kernels/compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check needs real Triton compilation: unset TRITON_INTERPRET")

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as triton_compile
from triton.runtime.jit import JITFunction, create_function_from_signature

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vllm_kvevict.kernels import (  # noqa: E402
    head_gram,
    triton_compact,
    triton_paged_decode_attention,
    triton_pool_scores,
    triton_value_norms,
    triton_window_lse,
    triton_window_scores,
)
from vllm_kvevict.kernels.synthetic import make_two_segment_case  # noqa: E402

RESULTS: list[dict] = []


def compile_instead_of_launch(target: GPUTarget, label: list[str]):
    backend = make_backend(target)

    def run(self: JITFunction, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.9
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        name = f"{self.fn.__name__} [{label[0]}]"
        t0 = time.perf_counter()
        try:
            source = ASTSource(self, signature, constexprs, attrs)
            kernel = triton_compile(source, target=target, options=options.__dict__)
        except Exception as exc:  # noqa: BLE001 - reported, then the script fails
            RESULTS.append({"kernel": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            return None
        RESULTS.append({"kernel": name, "ok": True, "seconds": time.perf_counter() - t0,
                        "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps,
                        **resource_usage(kernel.asm["cubin"])})
        return None

    return run


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)  # local memory per thread: register spills
    return {"registers": int(regs.group(1)) if regs else None,
            "local_bytes": int(local.group(1)) if local else None}


def launch_all(label: list[str], dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    Hkv = 8
    H = Hkv * group
    label[0] = f"{str(dtype).replace('torch.', '')} G={group} d={head_dim} bs={block_size}"
    case = make_two_segment_case(torch.full((2, Hkv), 40), [20, 50], [70, 90], head_dim, block_size, dtype,
                                 poison=False, generator=gen)
    q = torch.randn(2, H, head_dim, generator=gen).to(dtype)
    for splits in (1, 4):
        triton_paged_decode_attention(q, case.k_cache, case.v_cache, *case.tables, num_splits=splits)
    table = case.block_table[1]
    qw = torch.randn(8, H, head_dim, generator=gen).to(dtype)
    lse = triton_window_lse(qw, case.k_cache, table, 90)  # not launched: values unused
    triton_window_scores(qw, lse, case.k_cache, table, 90, stats=("mean",))
    triton_window_scores(qw, lse, case.k_cache, table, 90, stats=("sum", "max", "sumsq"), per_query_head=True)
    triton_pool_scores(torch.rand(Hkv, 90), "avg", 5)
    triton_pool_scores(torch.rand(Hkv, 90), "max", 7)
    values = torch.randn(16, Hkv, head_dim, generator=gen).to(dtype)
    o_proj = torch.randn(256, H * head_dim, generator=gen).to(dtype)
    triton_value_norms(values, o_proj, H, p=1)
    triton_value_norms(values, o_proj, H, p=2, gram=head_gram(o_proj, H))
    for p in (1, 2):  # the paged, streamed variants the GPU backends score with (paged_value_norms)
        triton_value_norms(case.v_cache, o_proj, H, p=p, block_table=table, num_tokens=90, stream_l2=True)
    kept_pos = torch.arange(40).expand(2, Hkv, 40).contiguous()
    dest = torch.arange(2 * Hkv * 3, dtype=torch.int32).view(2, Hkv, 3) + Hkv
    triton_compact(case.k_cache, case.v_cache, case.block_table, kept_pos, torch.full((2, Hkv), 40), dest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--quick", action="store_true", help="only bf16, G=4, d=128, bs=16")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    label = [""]
    original = JITFunction.run
    JITFunction.run = compile_instead_of_launch(target, label)
    try:
        configs = [(torch.bfloat16, 4, 128, 16)]
        if not args.quick:
            configs += [(torch.float32, 4, 128, 16), (torch.bfloat16, 1, 64, 32), (torch.bfloat16, 8, 64, 16)]
        for config in configs:
            launch_all(label, *config)
    finally:
        JITFunction.run = original
    print(f"target sm_{args.arch}, Triton {triton.__version__}")
    print(f"{'kernel':70s} {'ok':>3s} {'regs':>5s} {'local':>6s} {'smem':>7s} {'warps':>5s} {'s':>5s}")
    for r in RESULTS:
        if r["ok"]:
            print(f"{r['kernel']:70s} {'yes':>3s} {r['registers']!s:>5s} {r['local_bytes']!s:>6s} "
                  f"{r['shared']:>7d} {r['num_warps']:>5d} {r['seconds']:5.1f}")
        else:
            print(f"{r['kernel']:70s}  NO  {r['error']}")
    return 0 if RESULTS and all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
