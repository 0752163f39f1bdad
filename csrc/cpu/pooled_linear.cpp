// fastres._cpu: pooled_linear, a vouched frozen call's pooled head (global average pooling + nn.Linear) in
// one call, for the few rows of a serving batch (fastres.backends.torch.pooled_linear_vouched).
//
// Why. After the body, the head is ~0.9 ms of a ResNet-50 b8 64 px call on 2 CPU cores: the pooling's op
// 0.12 ms (its dispatch from cold caches) and the linear 0.70-0.83 ms (oneDNN's matmul: 0.51 ms even with
// the weight in cache, while reading the 8 MB weight from memory takes ~0.4 ms). With 16 rows or fewer the
// linear is a stream over the weight with a few multiply-adds per value: this reads each weight row once,
// from memory, against the pooled rows kept in the L1/L2 cache.
//
// The math (written once): x (N, C, H, W), weight (K, C), bias (K) or none:
//   p[n, c]   = (sum over h < H, w < W of x[n, c, h, w]) / (H * W)                  (fp32, in that order)
//   out[n, k] = sum over c of p[n, c] * weight[k, c]  (+ bias[k])                    (fp32 FMA, 16 or 8 lanes
//               of partial sums over c, then their sum), what F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1),
//               weight, bias) computes, within fp32 rounding.
//
// pooled_linear(x, weight, bias, out, isa) -> bool (True: out holds the result; False: nothing written,
// the caller runs torch's ops, which raise what is wrong with the arguments)
//   x       a float32 CPU strided 4-D tensor, N in 1..kMaxRows, C, H, W >= 1, any strides (channels_last: the
//           pooling's inner loop runs over contiguous channels)
//   weight  (K, C) float32 CPU, contiguous, K >= 1
//   bias    (K,) float32 CPU contiguous, or None
//   out     (N, K) float32 CPU contiguous, written in full (the caller's fresh tensor)
//   isa     2: AVX-512F kernel, 1: AVX2 + FMA kernel (the caller passes torch's own CPU capability, so that
//           ATEN_CPU_CAPABILITY limits this too); a kernel the CPU lacks answers False
// Compiled code (objdump of the -O3 object, GCC 12): the AVX-512 tile of 8 rows runs 22 instructions per
// 16-value step of c (16 FMAs with the 8 pooled-row loads as memory operands, 2 weight loads), the AVX2 tile
// of 4 rows 14 (8 FMAs); neither main loop touches the stack (no spills).
// No tensor is kept; the GIL is released while it computes. The weight's row pairs are split over torch's
// intra-op threads (at::parallel_for, tasks of >= 1 MiB of weight; this file is compiled with -fopenmp and
// runs in torch's own OpenMP pool): on one thread the kernel was slower than oneDNN's matmul on ResNet-50
// b8 (1.04 vs 0.85 ms), on two 0.67 ms.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "functions.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTRES_X86 1
// (GCC 12's AVX-512 intrinsics pass _mm512_undefined_* values to masked builtins and then warn about them:
// GCC bug 105593, fixed in GCC 13; nothing in this file reads an uninitialized value)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace {

constexpr int64_t kMaxRows = 16;
constexpr int64_t kGrainValues = 1 << 18;   // weight values per task of torch's intra-op pool (1 MiB)

// p[n * C + c] = mean over (h, w) of x[n, c, h, w]; s* are x's strides in elements.
void pool(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t s0, int64_t s1, int64_t s2,
          int64_t s3, float* p) {
  const float count = static_cast<float>(H * W);
  for (int64_t n = 0; n < N; n++) {
    float* row = p + n * C;
    std::fill(row, row + C, 0.0f);
    for (int64_t h = 0; h < H; h++) {
      for (int64_t w = 0; w < W; w++) {
        const float* q = x + n * s0 + h * s2 + w * s3;
        if (s1 == 1) {
          for (int64_t c = 0; c < C; c++) row[c] += q[c];
        } else {
          for (int64_t c = 0; c < C; c++) row[c] += q[c * s1];
        }
      }
    }
    for (int64_t c = 0; c < C; c++) row[c] /= count;
  }
}

#ifdef FASTRES_X86
__attribute__((target("avx2,fma"))) inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// (lanes 8-15 added to 0-7, then those summed)
__attribute__((target("avx512f"))) inline float sum16(__m512 v) {
  return sum8(_mm512_castps512_ps256(_mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xEE))));
}

// out rows m0..m0+MR-1, columns k and k+1 (k1: whether k+1 < K), AVX-512: 2 x MR accumulators of 16 lanes.
template <int MR>
__attribute__((target("avx512f"))) void tile512(const float* p, int64_t C, const float* w0, const float* w1,
                                                 float* o0, float* o1, int64_t K) {
  __m512 a0[MR], a1[MR];
  for (int r = 0; r < MR; r++) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m512 v0 = _mm512_loadu_ps(w0 + c), v1 = _mm512_loadu_ps(w1 + c);
    for (int r = 0; r < MR; r++) {
      const __m512 a = _mm512_loadu_ps(p + r * C + c);
      a0[r] = _mm512_fmadd_ps(v0, a, a0[r]);
      a1[r] = _mm512_fmadd_ps(v1, a, a1[r]);
    }
  }
  if (c < C) {
    const __mmask16 m = static_cast<__mmask16>((1u << (C - c)) - 1);
    const __m512 v0 = _mm512_maskz_loadu_ps(m, w0 + c), v1 = _mm512_maskz_loadu_ps(m, w1 + c);
    for (int r = 0; r < MR; r++) {
      const __m512 a = _mm512_maskz_loadu_ps(m, p + r * C + c);
      a0[r] = _mm512_fmadd_ps(v0, a, a0[r]);
      a1[r] = _mm512_fmadd_ps(v1, a, a1[r]);
    }
  }
  for (int r = 0; r < MR; r++) {
    o0[r * K] = sum16(a0[r]);
    if (o1 != nullptr) o1[r * K] = sum16(a1[r]);
  }
}

// The same tile with AVX2: 2 x MR accumulators of 8 lanes (MR <= 4: 16 registers).
template <int MR>
__attribute__((target("avx2,fma"))) void tile256(const float* p, int64_t C, const float* w0, const float* w1,
                                                 float* o0, float* o1, int64_t K) {
  __m256 a0[MR], a1[MR];
  for (int r = 0; r < MR; r++) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 v0 = _mm256_loadu_ps(w0 + c), v1 = _mm256_loadu_ps(w1 + c);
    for (int r = 0; r < MR; r++) {
      const __m256 a = _mm256_loadu_ps(p + r * C + c);
      a0[r] = _mm256_fmadd_ps(v0, a, a0[r]);
      a1[r] = _mm256_fmadd_ps(v1, a, a1[r]);
    }
  }
  if (c < C) {
    alignas(32) int32_t lanes[8];
    for (int i = 0; i < 8; i++) lanes[i] = (c + i < C) ? -1 : 0;
    const __m256i m = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    const __m256 v0 = _mm256_maskload_ps(w0 + c, m), v1 = _mm256_maskload_ps(w1 + c, m);
    for (int r = 0; r < MR; r++) {
      const __m256 a = _mm256_maskload_ps(p + r * C + c, m);
      a0[r] = _mm256_fmadd_ps(v0, a, a0[r]);
      a1[r] = _mm256_fmadd_ps(v1, a, a1[r]);
    }
  }
  for (int r = 0; r < MR; r++) {
    o0[r * K] = sum8(a0[r]);
    if (o1 != nullptr) o1[r * K] = sum8(a1[r]);
  }
}

using Tile = void (*)(const float*, int64_t, const float*, const float*, float*, float*, int64_t);
constexpr Tile kTiles512[] = {tile512<1>, tile512<2>, tile512<3>, tile512<4>,
                              tile512<5>, tile512<6>, tile512<7>, tile512<8>};
constexpr Tile kTiles256[] = {tile256<1>, tile256<2>, tile256<3>, tile256<4>};

// out[n, k] = sum_c p[n, c] * weight[k, c] + bias[k]: two weight rows at a time (one pass over the weight,
// from memory), against blocks of the pooled rows (from the cache).
void rows_times_weight(const float* p, int64_t N, int64_t C, const float* weight, int64_t K, const float* bias,
                       float* out, int isa) {
  const int block = isa == 2 ? 8 : 4;
  const Tile* tiles = isa == 2 ? kTiles512 : kTiles256;
  const int64_t pairs = (K + 1) / 2;
  at::parallel_for(0, pairs, std::max<int64_t>(1, kGrainValues / (2 * C)), [&](int64_t begin, int64_t end) {
    for (int64_t k = 2 * begin; k < std::min(K, 2 * end); k += 2) {
      const bool two = k + 1 < K;
      const float* w0 = weight + k * C;
      const float* w1 = two ? w0 + C : w0;
      for (int64_t n = 0; n < N; n += block) {
        const int mr = static_cast<int>(std::min<int64_t>(block, N - n));
        tiles[mr - 1](p + n * C, C, w0, w1, out + n * K + k, two ? out + n * K + k + 1 : nullptr, K);
      }
      if (bias != nullptr) {
        for (int64_t n = 0; n < N; n++) {
          out[n * K + k] += bias[k];
          if (two) out[n * K + k + 1] += bias[k + 1];
        }
      }
    }
  });
}
#endif

bool has_isa(int isa) {
#ifdef FASTRES_X86
  if (isa == 2) return __builtin_cpu_supports("avx512f");
  if (isa == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  (void)isa;
  return false;
}

bool plain_float(const at::Tensor& t) {
  return !t.is_nested() && t.layout() == at::kStrided && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
         t.has_storage() && !t.is_neg() && !t._is_zerotensor();
}

// Whether t's elements lie within its storage (a storage resized under a tensor is not read).
bool in_storage(const at::Tensor& t) {
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); d++) last += (t.size(d) - 1) * t.stride(d);
  return t.numel() > 0 && static_cast<size_t>(last + 1) * sizeof(float) <= t.storage().nbytes();
}

}  // namespace

PyObject* pooled_linear(PyObject*, PyObject* args) {
  PyObject *xo, *wo, *bo, *oo;
  int isa;
  if (!PyArg_ParseTuple(args, "OOOOi", &xo, &wo, &bo, &oo, &isa)) return nullptr;
  if (!THPVariable_Check(xo) || !THPVariable_Check(wo) || !THPVariable_Check(oo) ||
      (bo != Py_None && !THPVariable_Check(bo)) || !has_isa(isa))
    Py_RETURN_FALSE;
#ifdef FASTRES_X86
  try {
    const at::Tensor x = THPVariable_Unpack(xo), w = THPVariable_Unpack(wo), out = THPVariable_Unpack(oo);
    const bool biased = bo != Py_None;
    const at::Tensor b = biased ? THPVariable_Unpack(bo) : at::Tensor();
    if (!plain_float(x) || !plain_float(w) || !plain_float(out) || (biased && !plain_float(b)) || x.dim() != 4 ||
        w.dim() != 2 || out.dim() != 2 || !w.is_contiguous() || !out.is_contiguous() ||
        (biased && (b.dim() != 1 || !b.is_contiguous())))
      Py_RETURN_FALSE;
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = w.size(0);
    if (N < 1 || N > kMaxRows || C < 1 || H < 1 || W < 1 || K < 1 || w.size(1) != C || out.size(0) != N ||
        out.size(1) != K || (biased && b.size(0) != K) || !in_storage(x) || !in_storage(w) || !in_storage(out) ||
        (biased && !in_storage(b)))
      Py_RETURN_FALSE;
    const float* xp = x.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    const float* bp = biased ? b.const_data_ptr<float>() : nullptr;
    float* op = out.mutable_data_ptr<float>();
    std::vector<float> p(static_cast<size_t>(N * C));
    Py_BEGIN_ALLOW_THREADS
    pool(xp, N, C, H, W, x.stride(0), x.stride(1), x.stride(2), x.stride(3), p.data());
    rows_times_weight(p.data(), N, C, wp, K, bp, op, isa);
    Py_END_ALLOW_THREADS
    Py_RETURN_TRUE;
  } catch (const std::exception&) {   // (torch refused a tensor's metadata): the caller's ops
    Py_RETURN_FALSE;
  }
#else
  Py_RETURN_FALSE;
#endif
}
