// CriticalKV's value norms on CPU without materialising V @ Wo (issue 14).
//
//   out[g, j] = (1/G) * sum_{h in group g} sum_{e < D} | sum_{k < d} v[g, j, k] * Wo[h, k, e] |
//
// with Wo[h, k, e] = o_proj[e, h*d + k]. Each product is an FMA chain over k in order
// (k = 0 .. d-1) held in a register, its absolute value summed into a per-row vector of lane
// partial sums, never stored. The result does not depend on the thread count or on how rows
// are scheduled (every row's arithmetic is fixed by the shapes and the ISA path).
//
// ISA paths, chosen at run time: AVX-512F (16 lanes), AVX2+FMA (8 lanes), portable C++
// (16 "lanes" in an array). Lanes differ in number, so the three give floats that differ in
// the last bits; all are the same definition.
//
// C ABI (loaded through ctypes by vllm_kvevict/kernels/cpu_value_norms.py).

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

namespace {

constexpr int kTileCols = 64;   // output features per Wo tile (zero-padded past D)
constexpr int kRowChunk = 64;   // value rows per unit of parallel work

struct Problem {
  const float* values;  // [Hkv, L, d], head dim contiguous
  int64_t stride_vh, stride_vl;
  const float* packed;  // [H][tiles][d][kTileCols], zero-padded
  int64_t hkv, length, d, groups, tiles;
  float* out;           // [Hkv, L] contiguous
};

// ---- AVX-512: MR rows x 64 columns per step, 4*MR accumulators ------------------------------

template <int MR>
__attribute__((target("avx512f"))) inline void tile_avx512(const float* const* rows, const float* w, int64_t d,
                                                          float* lane_sums /* [MR][16] */) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    const float* wk = w + k * kTileCols;
    const __m512 b0 = _mm512_loadu_ps(wk), b1 = _mm512_loadu_ps(wk + 16);
    const __m512 b2 = _mm512_loadu_ps(wk + 32), b3 = _mm512_loadu_ps(wk + 48);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(rows[r][k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    __m512 s = _mm512_loadu_ps(lane_sums + r * 16);
    s = _mm512_add_ps(s, _mm512_abs_ps(acc[r][0]));
    s = _mm512_add_ps(s, _mm512_abs_ps(acc[r][1]));
    s = _mm512_add_ps(s, _mm512_abs_ps(acc[r][2]));
    s = _mm512_add_ps(s, _mm512_abs_ps(acc[r][3]));
    _mm512_storeu_ps(lane_sums + r * 16, s);
  }
}

// ---- AVX2 + FMA: MR rows x 16 columns per step (a 64-column tile in 4 steps) ----------------

template <int MR>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* const* rows, const float* w, int64_t d,
                                                          float* lane_sums /* [MR][16] */) {
  for (int half = 0; half < 4; ++half) {
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < d; ++k) {
      const float* wk = w + k * kTileCols + half * 16;
      const __m256 b0 = _mm256_loadu_ps(wk), b1 = _mm256_loadu_ps(wk + 8);
      for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(rows[r] + k);
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
      }
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int r = 0; r < MR; ++r) {
      __m256 s = _mm256_loadu_ps(lane_sums + r * 16);
      s = _mm256_add_ps(s, _mm256_andnot_ps(sign, acc[r][0]));
      s = _mm256_add_ps(s, _mm256_andnot_ps(sign, acc[r][1]));
      _mm256_storeu_ps(lane_sums + r * 16, s);
    }
  }
}

// ---- portable: the same tile walk in plain C++ (the compiler's baseline vectorisation) --------

template <int MR>
inline void tile_portable(const float* const* rows, const float* w, int64_t d, float* lane_sums) {
  for (int r = 0; r < MR; ++r) {
    float acc[kTileCols] = {0.0f};
    for (int64_t k = 0; k < d; ++k) {
      const float a = rows[r][k];
      const float* wk = w + k * kTileCols;
      for (int c = 0; c < kTileCols; ++c) acc[c] += a * wk[c];
    }
    for (int c = 0; c < kTileCols; ++c) lane_sums[r * 16 + (c % 16)] += acc[c] < 0 ? -acc[c] : acc[c];
  }
}

enum Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

template <int MR>
inline void run_tile(Isa isa, const float* const* rows, const float* w, int64_t d, float* lane_sums) {
  if (isa == kAvx512)
    tile_avx512<MR>(rows, w, d, lane_sums);
  else if (isa == kAvx2)
    tile_avx2<MR>(rows, w, d, lane_sums);
  else
    tile_portable<MR>(rows, w, d, lane_sums);
}

constexpr int kRowsPerStep = 5;  // AVX-512: 20 accumulators + 4 weight vectors in 32 registers

// One chunk: rows [lo, hi) of KV head g, all heads of its group, all tiles.
void run_chunk(const Problem& p, Isa isa, int64_t g, int64_t lo, int64_t hi) {
  float lane_sums[kRowChunk * 16];
  float head_sum[kRowChunk];
  std::fill(head_sum, head_sum + kRowChunk, 0.0f);
  const float* rows[kRowChunk];
  for (int64_t j = lo; j < hi; ++j) rows[j - lo] = p.values + g * p.stride_vh + j * p.stride_vl;
  const int64_t n = hi - lo;
  for (int64_t i = 0; i < p.groups; ++i) {
    const int64_t h = g * p.groups + i;
    std::fill(lane_sums, lane_sums + n * 16, 0.0f);
    for (int64_t t = 0; t < p.tiles; ++t) {
      const float* w = p.packed + (h * p.tiles + t) * p.d * kTileCols;
      int64_t r = 0;
      for (; r + kRowsPerStep <= n; r += kRowsPerStep) run_tile<kRowsPerStep>(isa, rows + r, w, p.d, lane_sums + r * 16);
      switch (n - r) {
        case 4: run_tile<4>(isa, rows + r, w, p.d, lane_sums + r * 16); break;
        case 3: run_tile<3>(isa, rows + r, w, p.d, lane_sums + r * 16); break;
        case 2: run_tile<2>(isa, rows + r, w, p.d, lane_sums + r * 16); break;
        case 1: run_tile<1>(isa, rows + r, w, p.d, lane_sums + r * 16); break;
        default: break;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      float s = 0.0f;  // lanes summed in a fixed order
      for (int c = 0; c < 16; ++c) s += lane_sums[r * 16 + c];
      head_sum[r] += s;
    }
  }
  const float inv = 1.0f / static_cast<float>(p.groups);
  for (int64_t r = 0; r < n; ++r) p.out[g * p.length + lo + r] = head_sum[r] * inv;
}

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}

}  // namespace

extern "C" {

// The ISA path a call with isa = -1 takes on this CPU: 0 portable, 1 AVX2, 2 AVX-512.
int kvevict_value_l1_isa(void) { return static_cast<int>(detect_isa()); }

// values: [hkv, length, d] float32 at (stride_vh, stride_vl, 1); packed: the output projection as
// [heads][tiles][d][64] float32 contiguous, packed[h][t][k][c] = o_proj[t*64 + c, h*d + k] and 0
// for t*64 + c >= D (kernels/cpu_value_l1.pack_output_projection); out: [hkv, length] float32
// contiguous. isa: -1 best available, else a path (an unsupported one is an error).
// Returns 0, or -1 on bad arguments.
int kvevict_value_l1(const float* values, int64_t hkv, int64_t length, int64_t d, int64_t stride_vh,
                     int64_t stride_vl, const float* packed, int64_t heads, int64_t tiles, float* out, int isa,
                     int threads) {
  if (hkv <= 0 || d <= 0 || tiles <= 0 || length < 0 || heads % hkv != 0 || threads < 1) return -1;
  const Isa best = detect_isa();
  if (isa > static_cast<int>(best)) return -1;
  const Isa path = isa < 0 ? best : static_cast<Isa>(isa);
  if (length == 0) return 0;
  const Problem p{values, stride_vh, stride_vl, packed, hkv, length, d, heads / hkv, tiles, out};
  const int64_t chunks_per_head = (length + kRowChunk - 1) / kRowChunk;
  const int64_t work = hkv * chunks_per_head;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work > 1)
  for (int64_t u = 0; u < work; ++u) {
    const int64_t g = u / chunks_per_head, c = u % chunks_per_head;
    const int64_t lo = c * kRowChunk;
    run_chunk(p, path, g, lo, std::min(length, lo + kRowChunk));
  }
  return 0;
}

// Columns per tile of the packed projection (64).
int kvevict_value_l1_tile_cols(void) { return kTileCols; }

}  // extern "C"
