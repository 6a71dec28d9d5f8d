"""Kernel micro-benchmarks: our Triton kernels against their torch paths, vLLM's own decode
kernels (when importable) and the copy-bandwidth floor.

GPU (one command, from the repository root; ``--sweep`` also searches decode and value-norm launch configs)::

    python benchmarks/kernels/bench.py [--sweep]

writes ``benchmarks/kernels/summary.json`` (rows ``{"kernel", "device", "shape", "dtype",
"median_ms", "reference_ms", "floor_ms", "fraction_of_floor"}``, ``fraction_of_floor =
floor_ms / median_ms``) and ``benchmarks/kernels/RESULTS.md``. Timings are medians of CUDA-event
timings from ``triton.testing.do_bench`` (L2 flushed between runs). The floor of a kernel is
the larger of two times: the bytes it must move (K/V read for attention and scoring; read +
written for copies) over the copy bandwidth measured in the same run (``(read + written bytes) /
time`` of a large device-to-device copy), and its matrix-product operations over the bf16 matrix
rate measured in the same run (an 8192^3 product). Only value norms and the prefill are bound by
the second.

CPU smoke run (tiny shapes, the Triton interpreter, wall-clock timer; proves the script
works, its numbers mean nothing and it writes only under ``--out``)::

    TRITON_INTERPRET=1 python benchmarks/kernels/bench.py --smoke --out /tmp/kernels-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vllm_kvevict.kernels import (  # noqa: E402
    gram_factor,
    head_gram,
    torch_compact,
    torch_paged_decode_attention,
    torch_pool_scores,
    torch_value_norms,
    torch_window_lse,
    torch_window_scores,
    triton_compact,
    triton_paged_decode_attention,
    triton_pool_scores,
    triton_value_norms,
    triton_window_lse,
    triton_window_scores,
)
from vllm_kvevict.kernels.synthetic import TwoSegmentCase, make_two_segment_case  # noqa: E402

HERE = Path(__file__).resolve().parent
DECODE_SHAPES = [(64, 8192), (16, 32768), (128, 4096), (8, 32768)]  # (batch, tokens per request)


@dataclass
class Setup:
    device: str
    device_name: str
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    hidden: int
    decode_shapes: list
    window_tokens: int
    window: int
    norm_tokens: int
    compact_shape: tuple
    smoke: bool
    sweep: bool = False
    copy_gbps: float = 0.0
    matmul_tflops: float = 0.0
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- timing


def timer(setup: Setup) -> Callable[[Callable[[], object]], float]:
    if setup.device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_median(fn, reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_median


def measure_copy_bandwidth(setup: Setup, bench) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    nbytes = (1 << 30) if setup.device == "cuda" else (1 << 24)
    src = torch.empty(nbytes, dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(setup: Setup, bench) -> float:
    """TFLOP/s of a large matrix product in the benchmark's dtype, on random data."""
    n = 8192 if setup.device == "cuda" else 256
    a = torch.randn(n, n, device=setup.device).to(setup.dtype)
    b = torch.randn(n, n, device=setup.device).to(setup.dtype)
    ms = bench(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def floor_ms(setup: Setup, nbytes: float, flops: float = 0.0) -> float:
    """The larger of bytes over copy bandwidth and matrix operations over the matrix rate."""
    return max(nbytes / (setup.copy_gbps * 1e9), flops / (setup.matmul_tflops * 1e12)) * 1e3


def add_row(setup: Setup, kernel: str, shape: str, median_ms: float, reference_ms: Optional[float], nbytes: float,
            flops: float = 0.0):
    fl = floor_ms(setup, nbytes, flops)
    row = {
        "kernel": kernel,
        "device": setup.device_name,
        "shape": shape,
        "dtype": str(setup.dtype).replace("torch.", ""),
        "median_ms": float(f"{median_ms:.5g}"),
        "reference_ms": None if reference_ms is None else float(f"{reference_ms:.5g}"),
        "floor_ms": float(f"{fl:.5g}"),
        "fraction_of_floor": float(f"{fl / median_ms:.4g}"),
    }
    setup.rows.append(row)
    print(json.dumps(row), flush=True)


def guarded(setup: Setup, what: str, fn: Callable[[], Optional[float]]) -> Optional[float]:
    """Run an optional baseline; a failure is a note, not a crash."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - baselines are optional by design
        msg = f"{what}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        setup.notes.append(msg)
        print(msg, flush=True)
        return None


# --------------------------------------------------------------------------- decode


def decode_case(setup: Setup, batch: int, tokens: int, gen: torch.Generator,
                compact_fraction: float = 0.5) -> TwoSegmentCase:
    """Each (request, KV head) reads ``tokens`` on average: a compact part ragged across heads
    (mean ``compact_fraction * tokens``, heads from 0.5x to 1.5x) and a shared positional tail;
    the prompt the compact part came from was twice its size (its blocks are null now)."""
    Hkv, bs = setup.kv_heads, setup.block_size
    mean_c = int(compact_fraction * tokens)
    w = 0.5 + torch.rand(batch, Hkv, generator=gen)
    compact_lens = (w / w.mean(1, keepdim=True) * mean_c).round().long()
    tail_len = tokens - mean_c
    prompt = 2 * mean_c
    return make_two_segment_case(compact_lens, [prompt] * batch, [prompt + tail_len] * batch, setup.head_dim, bs,
                                 setup.dtype, device=setup.device, poison=False, generator=gen)


def import_unified_attention():
    for mod in ("vllm.v1.attention.ops.triton_unified_attention", "vllm.attention.ops.triton_unified_attention"):
        try:
            return __import__(mod, fromlist=["unified_attention"]).unified_attention
        except ImportError:
            continue
    raise ImportError("vllm unified_attention not importable")


def run_vllm_triton(setup: Setup, bench, q, k, v, table, seq, tokens) -> float:
    unified_attention = import_unified_attention()
    B, H, d = q.shape
    Hkv = k.shape[2]
    out = torch.empty_like(q)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    threshold = 128 // Hkv  # vLLM's TRITON_ATTN: 3D (split) kernel below this batch size
    segs = 16
    segm_out = torch.empty(threshold, H, segs, 1 << (d - 1).bit_length(), dtype=torch.float32, device=q.device)
    segm_max = torch.empty(threshold, H, segs, dtype=torch.float32, device=q.device)
    segm_sum = torch.empty_like(segm_max)

    def call():
        unified_attention(q=q, k=k, v=v, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=seq,
                          max_seqlen_k=tokens, softmax_scale=d ** -0.5, causal=True, window_size=(-1, -1),
                          block_table=table, softcap=0, q_descale=None, k_descale=None, v_descale=None,
                          seq_threshold_3D=threshold, num_par_softmax_segments=segs,
                          softmax_segm_output=segm_out, softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum)

    call()
    return bench(call)


def run_fa3(setup: Setup, bench, q, k, v, table, seq, tokens) -> float:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    B, H, d = q.shape
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)

    def call():
        flash_attn_varlen_func(q, k, v, max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=tokens, seqused_k=seq,
                               softmax_scale=d ** -0.5, causal=True, block_table=table, fa_version=3)

    call()
    return bench(call)


def bench_decode(setup: Setup, bench, gen):
    for batch, tokens in setup.decode_shapes:
        q = torch.randn(batch, setup.heads, setup.head_dim, device=setup.device).to(setup.dtype)
        shape = (f"B={batch} T={tokens} H={setup.heads} Hkv={setup.kv_heads} d={setup.head_dim} "
                 f"bs={setup.block_size}")
        bench_two_segment(setup, bench, gen, q, tokens, shape + " compact=ragged 50%")
        if setup.device == "cuda":
            torch.cuda.empty_cache()
            bench_vllm_decode(setup, bench, q, tokens, shape + " dense positional")
            torch.cuda.empty_cache()


def bench_two_segment(setup: Setup, bench, gen, q, tokens: int, shape: str) -> None:
    case = decode_case(setup, q.shape[0], tokens, gen)
    nbytes = case.kv_bytes()
    args = (q, case.k_cache, case.v_cache, *case.tables)
    ours = bench(lambda: triton_paged_decode_attention(*args))
    ref = guarded(setup, f"torch decode {shape}", lambda: bench(lambda: torch_paged_decode_attention(*args)))
    add_row(setup, "decode_two_segment", shape, ours, ref, nbytes)
    if setup.sweep:
        best, config = sweep_decode(setup, bench, q, case)
        add_row(setup, f"decode_two_segment[{config}]", shape, best, ref, nbytes)


def bench_vllm_decode(setup: Setup, bench, q, tokens: int, shape: str) -> None:
    k, v, table, seq = vllm_layout_from(setup, q.shape[0], tokens)
    nbytes = 2 * q.shape[0] * tokens * setup.kv_heads * setup.head_dim * k.element_size()
    for kernel, runner in (("decode_vllm_triton_unified_attention", run_vllm_triton), ("decode_vllm_fa3", run_fa3)):
        ms = guarded(setup, kernel, lambda: runner(setup, bench, q, k, v, table, seq, tokens))
        if ms is not None:
            add_row(setup, kernel, shape, ms, None, nbytes)


def best_config(setup: Setup, bench, what: str, configs: list[tuple[str, Callable[[], object]]]) -> tuple[float, str]:
    """``(median ms, label)`` of the fastest of ``configs`` (``(label, fn)``; two under --smoke);
    each timing is printed, a configuration that fails is a note."""
    results = []
    for label, fn in configs[:2] if setup.smoke else configs:
        ms = guarded(setup, f"{what} {label}", lambda: bench(fn))
        if ms is not None:
            results.append((ms, label))
            print(f"sweep {what} {label}: {ms:.4f} ms", flush=True)
    return min(results)


def sweep_decode(setup: Setup, bench, q, case) -> tuple[float, str]:
    """Best launch configuration of our decode kernel on this shape (tile, warps, stages, splits)."""
    from vllm_kvevict.kernels.decode_attention import default_num_splits

    base = default_num_splits(q, case.k_cache, case.compact_pages, case.block_table)
    configs = [(f"block_n={bn} warps={w} stages={st} splits={sp}",
                partial(triton_paged_decode_attention, q, case.k_cache, case.v_cache, *case.tables, num_splits=sp,
                        block_n=bn, num_warps=w, num_stages=st))
               for bn in (64, 128, 256) for w in (4, 8) for st in (2, 3, 4)
               for sp in sorted({max(1, base // 2), base, 2 * base})]
    return best_config(setup, bench, f"decode B={q.shape[0]}", configs)


def vllm_layout_from(setup: Setup, batch: int, tokens: int):
    bs, Hkv, d = setup.block_size, setup.kv_heads, setup.head_dim
    n_blk = math.ceil(tokens / bs)
    k = torch.randn(batch * n_blk + 1, bs, Hkv, d, device=setup.device, dtype=setup.dtype)
    v = torch.randn_like(k)
    table = (torch.randperm(batch * n_blk, device=setup.device) + 1).view(batch, n_blk).to(torch.int32)
    seq = torch.full((batch,), tokens, dtype=torch.int32, device=setup.device)
    return k, v, table, seq


# --------------------------------------------------------------------------- scoring, norms, compaction


def bench_window(setup: Setup, bench, gen):
    L, W, H, Hkv = setup.window_tokens, setup.window, setup.heads, setup.kv_heads
    d, bs = setup.head_dim, setup.block_size
    case = make_two_segment_case(torch.zeros(1, Hkv, dtype=torch.long), [0], [L], d, bs, setup.dtype,
                                 device=setup.device, poison=False, generator=gen)
    table = case.block_table[0]
    q = torch.randn(W, H, d, device=setup.device).to(setup.dtype)
    lse = triton_window_lse(q, case.k_cache, table, L)
    k_bytes = L * Hkv * d * case.k_cache.element_size()
    shape = f"L={L} W={W} H={H} Hkv={Hkv} d={d} bs={bs}"
    qk_flops = 2 * W * H * L * d
    for stats in (("mean",), ("sum", "max", "sumsq")):
        ours = bench(lambda: triton_window_scores(q, lse, case.k_cache, table, L, stats=stats))
        ref = guarded(setup, "torch window scores",
                      lambda: bench(lambda: torch_window_scores(q, lse, case.k_cache, table, L, stats=stats)))
        add_row(setup, f"window_scores[{','.join(stats)}]", shape, ours, ref, k_bytes, qk_flops)
    lse_ms = bench(lambda: triton_window_lse(q, case.k_cache, table, L))
    lse_ref = guarded(setup, "torch window lse", lambda: bench(lambda: torch_window_lse(q, case.k_cache, table, L)))
    add_row(setup, "window_lse", shape, lse_ms, lse_ref, k_bytes, qk_flops)
    scores = torch.rand(Hkv, L, device=setup.device)
    for kind in ("avg", "max"):
        ours = bench(lambda: triton_pool_scores(scores, kind, 5))
        ref = bench(lambda: torch_pool_scores(scores, kind, 5))
        add_row(setup, f"pool_{kind}5", f"R={Hkv} L={L}", ours, ref, 2 * scores.numel() * 4)
    if setup.device == "cuda":  # the 5 % target: a causal SDPA prefill of the same length
        qp = torch.randn(1, H, L, d, device=setup.device, dtype=setup.dtype)
        kp = torch.randn(1, H, L, d, device=setup.device, dtype=setup.dtype)
        vp = torch.randn_like(kp)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ms = bench(lambda: sdpa(qp, kp, vp, is_causal=True))
        add_row(setup, "prefill_sdpa_causal", f"L={L} H={H} d={d}", ms, None, 4 * L * H * d * qp.element_size(),
                2 * L * L * H * d)  # QK^T and PV, each 2*L*L*H*d, halved by the causal mask
        del qp, kp, vp


def bench_value_norms(setup: Setup, bench, gen):
    N, H, Hkv, d, D = setup.norm_tokens, setup.heads, setup.kv_heads, setup.head_dim, setup.hidden
    values = torch.randn(N, Hkv, d, device=setup.device).to(setup.dtype)
    o_proj = (torch.randn(D, H * d, device=setup.device) / math.sqrt(H * d)).to(setup.dtype)
    factor = gram_factor(head_gram(o_proj, H))  # once per layer, at load time
    shape = f"N={N} H={H} Hkv={Hkv} d={d} D={D}"
    esz = values.element_size()
    l1_bytes = (values.numel() + o_proj.numel()) * esz + N * H * 4
    l1_flops = 2 * N * H * d * D
    ours = bench(lambda: triton_value_norms(values, o_proj, H, p=1))
    ref = guarded(setup, "torch value norms L1", lambda: bench(lambda: torch_value_norms(values, o_proj, H, p=1)))
    add_row(setup, "value_norm_l1_streaming_wo", shape, ours, ref, l1_bytes, l1_flops)
    l2_bytes = values.numel() * esz + factor.numel() * esz + N * H * 4
    l2_flops = 2 * N * H * d * d
    ours = bench(lambda: triton_value_norms(values, o_proj, H, p=2, factor=factor))
    ref = guarded(setup, "torch value norms L2", lambda: bench(lambda: torch_value_norms(values, o_proj, H, p=2)))
    add_row(setup, "value_norm_l2_gram", shape, ours, ref, l2_bytes, l2_flops)
    if setup.sweep:
        for p, nbytes, flops, configs in (
                (1, l1_bytes, l1_flops, [(bn, be, w) for bn in (32, 64, 128) for be in (64, 128) for w in (4, 8)]),
                (2, l2_bytes, l2_flops, [(bn, 64, w) for bn in (32, 64, 128) for w in (4, 8)])):
            best, config = best_config(setup, bench, f"value_norm p={p}", [
                (f"block_n={bn} block_e={be} warps={w}",
                 partial(triton_value_norms, values, o_proj, H, p=p, factor=factor, block_n=bn, block_e=be, num_warps=w))
                for bn, be, w in configs])
            add_row(setup, f"value_norm_{'l1_streaming_wo' if p == 1 else 'l2_gram'}[{config}]", shape, best,
                    None, nbytes, flops)


def bench_compaction(setup: Setup, bench, gen):
    B, L = setup.compact_shape
    Hkv, d, bs = setup.kv_heads, setup.head_dim, setup.block_size
    case = make_two_segment_case(torch.zeros(B, Hkv, dtype=torch.long), [0] * B, [L] * B, d, bs, setup.dtype,
                                 device=setup.device, poison=False, generator=gen)
    keep = torch.rand(B, Hkv, generator=gen) * 0.5 + 0.25  # keep 25 % .. 75 % per head
    kept_lens = (keep * L).long()
    max_kept = int(kept_lens.max())
    kept_pos = torch.rand(B, Hkv, L, generator=gen).argsort(-1)[..., :max_kept].sort(-1).values
    pages = (max_kept + bs - 1) // bs
    n_fresh = math.ceil(B * Hkv * pages / Hkv)
    fresh = torch.empty(n_fresh, Hkv, bs, d, device=setup.device, dtype=setup.dtype)
    base = case.k_cache.shape[0]
    k_cache = torch.cat([case.k_cache, fresh])  # the fresh blocks compaction writes into
    v_cache = torch.cat([case.v_cache, fresh])
    dest = ((torch.arange(n_fresh) + base).view(-1, 1) * Hkv + torch.arange(Hkv)).flatten()[: B * Hkv * pages]
    dest = dest.view(B, Hkv, pages).to(torch.int32)
    dev = setup.device
    args = (case.block_table, kept_pos.to(dev), kept_lens.to(dev), dest.to(dev))
    moved = 2 * 2 * int(kept_lens.sum()) * d * k_cache.element_size()  # K and V, read and written
    shape = f"B={B} L={L} Hkv={Hkv} d={d} bs={bs} keep=25-75%"
    ours = bench(lambda: triton_compact(k_cache, v_cache, *args))
    ref = guarded(setup, "torch compaction", lambda: bench(lambda: torch_compact(k_cache, v_cache, *args)))
    add_row(setup, "compaction", shape, ours, ref, moved)


# --------------------------------------------------------------------------- report


NOTES_MARK = "<!-- hand-written notes below: kept when bench.py rewrites the table above -->"


def write_results(setup: Setup, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = out_dir / "RESULTS.md"
    text = previous.read_text() if previous.exists() else ""
    kept_notes = text.split(NOTES_MARK, 1)[1] if NOTES_MARK in text else ""
    (out_dir / "summary.json").write_text(json.dumps(setup.rows, indent=1) + "\n")
    lines = [
        "# Kernel benchmarks",
        "",
        f"Device: {setup.device_name}. dtype {setup.dtype}. Copy bandwidth (read + written): "
        f"{setup.copy_gbps:.1f} GB/s; matrix product {setup.matmul_tflops:.1f} TFLOP/s. "
        f"Command: `python benchmarks/kernels/bench.py"
        f"{' --smoke' if setup.smoke else ''}`.",
        "",
        "| kernel | shape | median ms | torch ms | floor ms | fraction of floor |",
        "|---|---|---|---|---|---|",
    ]
    for r in setup.rows:
        ref = "" if r["reference_ms"] is None else f"{r['reference_ms']:.4g}"
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['median_ms']:.4g} | {ref} | {r['floor_ms']:.4g} | "
                     f"{r['fraction_of_floor']:.3f} |")
    prefill = [r for r in setup.rows if r["kernel"] == "prefill_sdpa_causal"]
    window = [r for r in setup.rows if r["kernel"].startswith("window_")]
    if prefill and window:
        lines += ["", "Window scoring / causal SDPA prefill of the same length (target <= 5 %; scoring needs "
                  "`window_lse` plus one `window_scores`): "
                  + ", ".join(f"{r['kernel']} {100 * r['median_ms'] / prefill[0]['median_ms']:.2f} %" for r in window)]
    if setup.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in setup.notes]
    if kept_notes:
        lines += ["", NOTES_MARK + kept_notes.rstrip("\n")]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", type=Path, default=None, help="folder for summary.json and RESULTS.md")
    ap.add_argument("--only", default="decode,window,norms,compaction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="also search decode and value-norm launch configurations")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("no CUDA device: run with --smoke (CPU, TRITON_INTERPRET=1) to check the script")
    if args.smoke:
        setup = Setup("cpu", "cpu (TRITON_INTERPRET=1, smoke)", torch.float32, 8, 2, 64, 16, 256,
                      [(2, 256)], 128, 8, 32, (2, 96), smoke=True)
        out_dir = args.out or Path("/tmp/kvevict-kernels-smoke")
    else:
        setup = Setup("cuda", torch.cuda.get_device_name(), torch.bfloat16, 32, 8, 128, 16, 4096,
                      DECODE_SHAPES, 32768, 32, 4096, (16, 8192), smoke=False)
        out_dir = args.out or HERE
    setup.sweep = args.sweep
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    bench = timer(setup)
    setup.copy_gbps = measure_copy_bandwidth(setup, bench)
    setup.matmul_tflops = measure_matmul_tflops(setup, bench)
    print(f"copy bandwidth {setup.copy_gbps:.1f} GB/s, {setup.dtype} matrix product {setup.matmul_tflops:.1f} "
          f"TFLOP/s on {setup.device_name}", flush=True)
    only = set(args.only.split(","))
    for name, fn in (("decode", bench_decode), ("window", bench_window), ("norms", bench_value_norms),
                     ("compaction", bench_compaction)):
        if name in only:
            fn(setup, bench, gen)
            if cuda:
                torch.cuda.empty_cache()
    write_results(setup, out_dir)
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
