// BatchNorm kernels of fastres._C over NHWC data seen as [M, C] (see batchnorm_kernels.h):
// statistics (bn_stats), apply (+ residual) (+ ReLU, bit mask) (bn_apply), and backward (bn_backward).
// CUDA headers only: this file compiles in seconds. All arithmetic is fp32.
//
// Two paths per kernel, chosen on the host side of each launcher:
// * vector: 16-byte loads/stores along C, when C is a multiple of the vector width (and, for the
//   elementwise kernels, of 8, so one thread's 8 channels make one whole mask byte) and every data
//   pointer is 16-byte aligned;
// * scalar: any C, any alignment.
//
// BatchNorm backward, per channel over its n = M values (the math of bn_backward, written once):
//   g      = dL/dy, zeroed where the ReLU mask bit is 0 (when the forward had a ReLU)
//   xhat   = (z - mean) * invstd,           y = gamma * xhat + beta (+ residual), then the ReLU
//   dbeta  = sum(g)                          dgamma = sum(g * xhat) = invstd * sum(g * (z - mean))
//   dres   = g
//   training (mean and invstd are functions of z):
//     dz = gamma * invstd * (g - dbeta / n - xhat * dgamma / n)
//   eval (mean and invstd are constants):
//     dz = gamma * invstd * g
//   The elementwise pass uses dz = k_g * g + k_z * (z - mean) + k_0 with per-channel coefficients
//     k_g = gamma * invstd,  k_z = -k_g * invstd * dgamma / n,  k_0 = -k_g * dbeta / n  (training)
//     k_g = gamma * invstd,  k_z = 0,                           k_0 = 0                 (eval)
#include "batchnorm_kernels.h"

#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastres {
namespace {

constexpr int kThreads = 256;   // threads per block, every kernel
constexpr int kMaxGridY = 65535;

// ------------------------------------------------------------------------------------------------
// element access
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads p[0, N) as floats. Either N * sizeof(T) is a multiple of 16 and p is 16-byte aligned
// (16-byte loads), or the loads are scalar.
template <typename T, int N>
__device__ __forceinline__ void load_f(const T* p, float (&out)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + k);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[k * kPer + j] = to_f(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_f(p[j]);
  }
}

// Rounds v[0, N) to T in place (so that v holds exactly what is stored) and stores it at p, with the
// same alignment rule as load_f.
template <typename T, int N>
__device__ __forceinline__ void store_round(T* p, float (&v)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < N / kPer; ++k) {
      uint4 u;
      T* e = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        e[j] = from_f<T>(v[k * kPer + j]);
        v[k * kPer + j] = to_f(e[j]);
      }
      reinterpret_cast<uint4*>(p)[k] = u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const T t = from_f<T>(v[j]);
      p[j] = t;
      v[j] = to_f(t);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// per-element math
// ------------------------------------------------------------------------------------------------

// bn_apply: act((z - mean) * scale + shift (+ residual)). ReLU as (y < 0 ? 0 : y) keeps NaN visible.
__device__ __forceinline__ float apply_elem(float z, float mean, float scale, float shift, float res,
                                            bool relu) {
  float y = fmaf(z - mean, scale, shift) + res;
  return relu && y < 0.f ? 0.f : y;
}

// bn_backward's dz from the coefficients (see the top of the file).
__device__ __forceinline__ float dz_elem(float g, float z, float mean, float kg, float kz, float k0) {
  return fmaf(kg, g, fmaf(kz, z - mean, k0));
}

// ------------------------------------------------------------------------------------------------
// deterministic per-channel reductions
// ------------------------------------------------------------------------------------------------

// A thread's summary of V channels. Welford: n values, a = mean, b = M2 (sum of squared deviations).
// Sums (backward): a = sum(g), b = sum(g * (z - mean)); n unused.
template <int V>
struct Acc {
  float n;
  float a[V];
  float b[V];
};

template <int V>
__device__ __forceinline__ void acc_zero(Acc<V>& s) {
  s.n = 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) s.a[v] = s.b[v] = 0.f;
}

// One more row x[0, V) into a Welford summary.
template <int V>
__device__ __forceinline__ void welford_add(Acc<V>& s, const float (&x)[V]) {
  s.n += 1.f;
  const float inv = 1.f / s.n;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const float d = x[v] - s.a[v];
    s.a[v] = fmaf(d, inv, s.a[v]);
    s.b[v] = fmaf(d, x[v] - s.a[v], s.b[v]);
  }
}

// s <- s merged with (nb, ab, bb). Welford: Chan et al.'s pairwise merge, either side may be empty
// (an empty summary is all zeros). Sums: plain addition.
template <int V, bool kWelford>
__device__ __forceinline__ void acc_merge(Acc<V>& s, float nb, const float (&ab)[V], const float (&bb)[V]) {
  if constexpr (kWelford) {
    const float n = s.n + nb;
    const float wb = n > 0.f ? nb / n : 0.f;            // weight of the other mean
    const float wab = n > 0.f ? s.n * (nb / n) : 0.f;   // na * nb / n
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float d = ab[v] - s.a[v];
      s.a[v] = fmaf(d, wb, s.a[v]);
      s.b[v] = s.b[v] + bb[v] + d * d * wab;
    }
    s.n = n;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      s.a[v] += ab[v];
      s.b[v] += bb[v];
    }
  }
}

// Shared memory of a reduction block: one summary per thread.
template <int V>
struct ReduceShared {
  float a[kThreads * V];
  float b[kThreads * V];
  float n[kThreads];
  int last;
};

// Merges the summaries of the blockDim.y threads that share threadIdx.x into the one of
// threadIdx.y == 0, along a fixed tree (row ty takes row ty + s for s = by/2, by/4, ..., 1).
// blockDim.y must be a power of two. Every thread of the block must call it.
template <int V, bool kWelford>
__device__ void block_reduce(Acc<V>& s, ReduceShared<V>& sh) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  for (int step = blockDim.y / 2; step > 0; step >>= 1) {
    if (ty >= step && ty < 2 * step) {  // givers of this step write their summary once
      const int slot = ty * bx + tx;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        sh.a[slot * V + v] = s.a[v];
        sh.b[slot * V + v] = s.b[v];
      }
      sh.n[slot] = s.n;
    }
    __syncthreads();
    if (ty < step) {
      const int slot = (ty + step) * bx + tx;
      float ab[V], bb[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        ab[v] = sh.a[slot * V + v];
        bb[v] = sh.b[slot * V + v];
      }
      acc_merge<V, kWelford>(s, sh.n[slot], ab, bb);
    }
    __syncthreads();
  }
}

// After block_reduce: block (bx, by) stores the summaries of its channels [c0, c0 + V) (thread row 0)
// in the staging buffer; the last block of its column to arrive merges the gridDim.y partials in a
// fixed order (partial b to thread row b % blockDim.y, in increasing b; then block_reduce) and returns
// true, with the column's totals in the threads of row 0. Other blocks return false.
// Staging layout: a[gy][C], b[gy][C], n[gx][gy]. The last block resets its counter to zero.
template <int V, bool kWelford>
__device__ bool grid_reduce(Acc<V>& s, ReduceShared<V>& sh, int c0, int C, float* staging,
                            int* counters) {
  const int gy = gridDim.y;
  float* st_a = staging;
  float* st_b = staging + (int64_t)gy * C;
  float* st_n = staging + 2 * (int64_t)gy * C;
  if (threadIdx.y == 0) {
    const int64_t row = (int64_t)blockIdx.y * C;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (c0 + v < C) {
        st_a[row + c0 + v] = s.a[v];
        st_b[row + c0 + v] = s.b[v];
      }
    }
    if (threadIdx.x == 0) st_n[(int64_t)blockIdx.x * gy + blockIdx.y] = s.n;
  }
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int prev = atomicAdd(&counters[blockIdx.x], 1);
    sh.last = prev == gy - 1;
  }
  __syncthreads();
  if (!sh.last) return false;
  __threadfence();
  acc_zero(s);
  for (int b = threadIdx.y; b < gy; b += blockDim.y) {
    const int64_t row = (int64_t)b * C;
    float ab[V], bb[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const bool ok = c0 + v < C;
      ab[v] = ok ? __ldcg(st_a + row + c0 + v) : 0.f;  // L2 reads: written by other blocks
      bb[v] = ok ? __ldcg(st_b + row + c0 + v) : 0.f;
    }
    acc_merge<V, kWelford>(s, __ldcg(st_n + (int64_t)blockIdx.x * gy + b), ab, bb);
  }
  block_reduce<V, kWelford>(s, sh);
  if (threadIdx.x == 0 && threadIdx.y == 0) counters[blockIdx.x] = 0;  // ready for the next launch
  return true;
}

// ------------------------------------------------------------------------------------------------
// bn_stats
// ------------------------------------------------------------------------------------------------

// Grid (gx, gy), block (bx, by): thread (tx, ty) of block (X, Y) owns channels
// c0 = (X * bx + tx) * V .. c0 + V - 1 and rows r = Y * by + ty + k * gy * by.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) bn_stats_kernel(StatsArgs a) {
  __shared__ ReduceShared<V> sh;
  const T* z = static_cast<const T*>(a.z);
  const int C = a.C;
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  Acc<V> s;
  acc_zero(s);
  if (c0 < C) {
    const int64_t step = (int64_t)gridDim.y * blockDim.y;
    int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y;
    for (; r + 3 * step < a.M; r += 4 * step) {  // four rows in flight
      float x0[V], x1[V], x2[V], x3[V];
      load_f<T, V>(z + r * C + c0, x0);
      load_f<T, V>(z + (r + step) * C + c0, x1);
      load_f<T, V>(z + (r + 2 * step) * C + c0, x2);
      load_f<T, V>(z + (r + 3 * step) * C + c0, x3);
      welford_add(s, x0);
      welford_add(s, x1);
      welford_add(s, x2);
      welford_add(s, x3);
    }
    for (; r < a.M; r += step) {
      float x[V];
      load_f<T, V>(z + r * C + c0, x);
      welford_add(s, x);
    }
  }
  block_reduce<V, true>(s, sh);
  if (!grid_reduce<V, true>(s, sh, c0, C, a.staging, a.counters)) return;
  if (threadIdx.y != 0) return;
  const float n = s.n;  // == M
  const float unbias = n / fmaxf(n - 1.f, 1.f);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int c = c0 + v;
    if (c >= C) continue;
    const float mean = s.a[v];
    // Biased: used to normalise. Clamped at 0 without fmaxf, which would turn a NaN M2 (NaN or inf
    // in z) into 0 and leave invstd and running_var finite where the reference gives NaN.
    const float m2n = s.b[v] / n;
    const float var = m2n < 0.f ? 0.f : m2n;
    a.mean[c] = mean;
    a.invstd[c] = rsqrtf(var + a.eps);
    if (a.running_mean != nullptr) {
      const float m = a.momentum;
      a.running_mean[c] = (1.f - m) * a.running_mean[c] + m * mean;
      a.running_var[c] = (1.f - m) * a.running_var[c] + m * (var * unbias);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// bn_apply
// ------------------------------------------------------------------------------------------------

// Vector path (C % 8 == 0, 16-byte aligned pointers). Thread (tx, ty) of block (X, Y) owns channels
// c0 = (X * bx + tx) * 8 .. c0 + 7 and rows r = Y * by + ty + k * gy * by; its 8 elements of a row
// are memory positions r*C + c0 .. + 7, which make mask byte (r*C + c0) / 8.
template <typename T>
__global__ void __launch_bounds__(kThreads) bn_apply_vec_kernel(ApplyArgs a) {
  const int C = a.C;
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (c0 >= C) return;
  float mean[8], scale[8], shift[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int c = c0 + j;
    mean[j] = a.mean[c];
    scale[j] = (a.weight != nullptr ? a.weight[c] : 1.f) * a.invstd[c];
    shift[j] = a.bias != nullptr ? a.bias[c] : 0.f;
  }
  const T* z = static_cast<const T*>(a.z);
  const T* res = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  const int64_t step = (int64_t)gridDim.y * blockDim.y;
  for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < a.M; r += step) {
    const int64_t off = r * C + c0;
    float v[8], rv[8];
    load_f<T, 8>(z + off, v);
    if (res != nullptr) {
      load_f<T, 8>(res + off, rv);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) rv[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = apply_elem(v[j], mean[j], scale[j], shift[j], rv[j], a.relu);
    store_round<T, 8>(y + off, v);
    if (a.mask != nullptr) {
      unsigned bits = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) bits |= (v[j] > 0.f ? 1u : 0u) << j;
      a.mask[off >> 3] = static_cast<uint8_t>(bits);
    }
  }
}

// Scalar path (any C, any alignment). Thread k (grid-stride) owns memory positions 8k .. 8k + 7,
// which make mask byte k (positions past the end are 0 bits).
template <typename T>
__global__ void __launch_bounds__(kThreads) bn_apply_scalar_kernel(ApplyArgs a) {
  const int C = a.C;
  const int64_t numel = a.M * C;
  const int64_t chunks = (numel + 7) / 8;
  const T* z = static_cast<const T*>(a.z);
  const T* res = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < chunks; k += step) {
    const int64_t i0 = k * 8;
    int c = static_cast<int>(i0 % C);
    unsigned bits = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t i = i0 + j;
      if (i < numel) {
        const float scale = (a.weight != nullptr ? a.weight[c] : 1.f) * a.invstd[c];
        const float shift = a.bias != nullptr ? a.bias[c] : 0.f;
        const float rv = res != nullptr ? to_f(res[i]) : 0.f;
        const T t = from_f<T>(apply_elem(to_f(z[i]), a.mean[c], scale, shift, rv, a.relu));
        y[i] = t;
        bits |= (to_f(t) > 0.f ? 1u : 0u) << j;
      }
      if (++c == C) c = 0;
    }
    if (a.mask != nullptr) a.mask[k] = static_cast<uint8_t>(bits);
  }
}

// ------------------------------------------------------------------------------------------------
// bn_backward
// ------------------------------------------------------------------------------------------------

// Zeroes g[0, V) where the mask bits of memory positions i0 .. i0 + V - 1 are 0. Needs
// (i0 % 8) + V <= 8: true for V == 1, and for V in {4, 8} with i0 a multiple of V.
template <int V>
__device__ __forceinline__ void mask_grad(const uint8_t* mask, int64_t i0, float (&g)[V]) {
  if (mask == nullptr) return;
  const unsigned bits = static_cast<unsigned>(mask[i0 >> 3]) >> (i0 & 7);
#pragma unroll
  for (int v = 0; v < V; ++v) g[v] = (bits >> v) & 1u ? g[v] : 0.f;
}

// Pass 1: sums of g and g * (z - mean) per channel, thread layout as bn_stats_kernel. The last block
// of each channel column writes dgamma, dbeta and the coefficients of dz (k_g, k_z, k_0) to coef.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) bn_backward_reduce_kernel(BackwardArgs a) {
  __shared__ ReduceShared<V> sh;
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* z = static_cast<const T*>(a.z);
  const int C = a.C;
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  Acc<V> s;
  acc_zero(s);
  if (c0 < C) {
    float mean[V];
#pragma unroll
    for (int v = 0; v < V; ++v) mean[v] = a.mean[c0 + v];
    const int64_t step = (int64_t)gridDim.y * blockDim.y;
    int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y;
    for (; r + step < a.M; r += 2 * step) {  // two rows (four loads) in flight
      const int64_t i0 = r * C + c0, i1 = (r + step) * C + c0;
      float g0[V], z0[V], g1[V], z1[V];
      load_f<T, V>(gy + i0, g0);
      load_f<T, V>(z + i0, z0);
      load_f<T, V>(gy + i1, g1);
      load_f<T, V>(z + i1, z1);
      mask_grad<V>(a.mask, i0, g0);
      mask_grad<V>(a.mask, i1, g1);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        s.a[v] += g0[v] + g1[v];
        s.b[v] = fmaf(g1[v], z1[v] - mean[v], fmaf(g0[v], z0[v] - mean[v], s.b[v]));
      }
    }
    for (; r < a.M; r += step) {
      const int64_t i0 = r * C + c0;
      float g0[V], z0[V];
      load_f<T, V>(gy + i0, g0);
      load_f<T, V>(z + i0, z0);
      mask_grad<V>(a.mask, i0, g0);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        s.a[v] += g0[v];
        s.b[v] = fmaf(g0[v], z0[v] - mean[v], s.b[v]);
      }
    }
  }
  block_reduce<V, false>(s, sh);
  if (!grid_reduce<V, false>(s, sh, c0, C, a.staging, a.counters)) return;
  if (threadIdx.y != 0) return;
  const float n = static_cast<float>(a.M);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int c = c0 + v;
    if (c >= C) continue;
    const float invstd = a.invstd[c];
    const float dbeta = s.a[v];
    const float dgamma = invstd * s.b[v];
    a.dbeta[c] = dbeta;
    a.dgamma[c] = dgamma;
    const float kg = (a.weight != nullptr ? a.weight[c] : 1.f) * invstd;
    a.coef[c] = kg;
    a.coef[C + c] = a.training ? -kg * invstd * dgamma / n : 0.f;
    a.coef[2 * C + c] = a.training ? -kg * dbeta / n : 0.f;
  }
}

// Pass 2, vector path (C % 8 == 0, aligned): dz (and dres), thread layout as bn_apply_vec_kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads) bn_backward_vec_kernel(BackwardArgs a) {
  const int C = a.C;
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (c0 >= C) return;
  float mean[8], kg[8], kz[8], k0[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int c = c0 + j;
    mean[j] = a.mean[c];
    kg[j] = a.coef[c];
    kz[j] = a.coef[C + c];
    k0[j] = a.coef[2 * C + c];
  }
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* z = static_cast<const T*>(a.z);
  T* dz = static_cast<T*>(a.dz);
  T* dres = static_cast<T*>(a.dres);
  const int64_t step = (int64_t)gridDim.y * blockDim.y;
  for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < a.M; r += step) {
    const int64_t off = r * C + c0;
    float g[8], zv[8], out[8];
    load_f<T, 8>(gy + off, g);
    mask_grad<8>(a.mask, off, g);
    if (a.training) {
      load_f<T, 8>(z + off, zv);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) zv[j] = mean[j];  // k_z == 0: z is not needed
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = dz_elem(g[j], zv[j], mean[j], kg[j], kz[j], k0[j]);
    store_round<T, 8>(dz + off, out);
    if (dres != nullptr) store_round<T, 8>(dres + off, g);
  }
}

// Pass 2, scalar path: thread k (grid-stride) owns memory positions 8k .. 8k + 7 (one mask byte).
template <typename T>
__global__ void __launch_bounds__(kThreads) bn_backward_scalar_kernel(BackwardArgs a) {
  const int C = a.C;
  const int64_t numel = a.M * C;
  const int64_t chunks = (numel + 7) / 8;
  const T* gy = static_cast<const T*>(a.grad_y);
  const T* z = static_cast<const T*>(a.z);
  T* dz = static_cast<T*>(a.dz);
  T* dres = static_cast<T*>(a.dres);
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < chunks; k += step) {
    const int64_t i0 = k * 8;
    const unsigned bits = a.mask != nullptr ? static_cast<unsigned>(a.mask[k]) : 0xFFu;
    int c = static_cast<int>(i0 % C);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t i = i0 + j;
      if (i < numel) {
        const float g = (bits >> j) & 1u ? to_f(gy[i]) : 0.f;
        const float mean = a.mean[c];
        const float zv = a.training ? to_f(z[i]) : mean;
        dz[i] = from_f<T>(dz_elem(g, zv, mean, a.coef[c], a.coef[C + c], a.coef[2 * C + c]));
        if (dres != nullptr) dres[i] = from_f<T>(g);
      }
      if (++c == C) c = 0;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// launch configuration
// ------------------------------------------------------------------------------------------------

int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = 0;
  if (dev >= 0 && dev < 64) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    cudaGetLastError();  // clear it: a fallback grid size is fine
    n = 80;
  }
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

int elem_size(DType dt) { return dt == DType::f32 ? 4 : 2; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Block (bx, by) and grid (gx, gy) for the 2-D elementwise kernels: `groups` channel groups of 8 per
// row, M rows, at most about 8 resident blocks per SM (rows are then walked with a grid stride).
void plan_2d(int64_t M, int groups, dim3& block, dim3& grid) {
  const int bx = pow2_at_least(groups, 32);
  const int by = kThreads / bx;
  const int64_t gx = ceil_div(groups, bx);
  int64_t gy = ceil_div(8LL * sm_count(), gx);
  gy = gy < ceil_div(M, by) ? gy : ceil_div(M, by);
  gy = gy < kMaxGridY ? gy : kMaxGridY;
  block = dim3(bx, by);
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy > 0 ? gy : 1));
}

// 1-D grid-stride launch over `chunks` work items (one per thread per step).
unsigned plan_1d(int64_t chunks) {
  int64_t g = ceil_div(chunks, kThreads);
  const int64_t cap = 8LL * sm_count();
  return static_cast<unsigned>(g < cap ? (g > 0 ? g : 1) : cap);
}

}  // namespace

ReducePlan plan_reduction(int64_t M, int C, DType dt, bool aligned) {
  ReducePlan p{};
  const int wide = 16 / elem_size(dt);
  p.vec = aligned && C % wide == 0 ? wide : 1;
  const int groups = C / p.vec;  // exact on the vector path; C on the scalar path
  p.bx = pow2_at_least(groups, 32);
  p.by = kThreads / p.bx;
  const int64_t gx = ceil_div(groups, p.bx);
  // About 4 blocks per SM in all, each thread taking at least ~4 rows, every block some rows.
  int64_t gy = ceil_div(4LL * sm_count(), gx);
  const int64_t gy_rows = ceil_div(M, 4LL * p.by);
  gy = gy < gy_rows ? gy : gy_rows;
  gy = gy < kMaxGridY ? gy : kMaxGridY;
  p.gx = static_cast<int>(gx);
  p.gy = static_cast<int>(gy > 0 ? gy : 1);
  p.staging_floats = 2LL * p.gy * C + static_cast<int64_t>(p.gx) * p.gy;
  p.counters = p.gx;
  return p;
}

namespace {

// Launches KERNEL<T, V> for the element type of a.dt and the plan's vector width.
#define FASTRES_REDUCE_CASES(KERNEL, ARGS)                                                        \
  switch (a.dt) {                                                                                 \
    case DType::f32:                                                                              \
      if (plan.vec == 4) KERNEL<float, 4><<<grid, block, 0, stream>>>(ARGS);                      \
      else KERNEL<float, 1><<<grid, block, 0, stream>>>(ARGS);                                    \
      break;                                                                                      \
    case DType::f16:                                                                              \
      if (plan.vec == 8) KERNEL<__half, 8><<<grid, block, 0, stream>>>(ARGS);                     \
      else KERNEL<__half, 1><<<grid, block, 0, stream>>>(ARGS);                                   \
      break;                                                                                      \
    case DType::bf16:                                                                             \
      if (plan.vec == 8) KERNEL<__nv_bfloat16, 8><<<grid, block, 0, stream>>>(ARGS);              \
      else KERNEL<__nv_bfloat16, 1><<<grid, block, 0, stream>>>(ARGS);                            \
      break;                                                                                      \
    default:                                                                                      \
      return cudaErrorInvalidValue;                                                               \
  }

#define FASTRES_ELEMENTWISE_CASES(KERNEL, GRID, BLOCK, ARGS)                                      \
  switch (a.dt) {                                                                                 \
    case DType::f32: KERNEL<float><<<GRID, BLOCK, 0, stream>>>(ARGS); break;                      \
    case DType::f16: KERNEL<__half><<<GRID, BLOCK, 0, stream>>>(ARGS); break;                     \
    case DType::bf16: KERNEL<__nv_bfloat16><<<GRID, BLOCK, 0, stream>>>(ARGS); break;             \
    default: return cudaErrorInvalidValue;                                                        \
  }

bool plan_ok(const ReducePlan& plan, DType dt, int64_t M, int C) {
  return (plan.vec == 1 || plan.vec == 16 / elem_size(dt)) && M >= 1 && C >= 1 && plan.bx * plan.by == kThreads && plan.gx >= 1 && plan.gy >= 1 &&
         plan.gy <= kMaxGridY && (plan.vec == 1 || C % plan.vec == 0) &&
         static_cast<int64_t>(plan.gx) * plan.bx * plan.vec >= C &&
         static_cast<int64_t>(plan.gy - 1) * plan.by < M;
}

}  // namespace

cudaError_t launch_bn_stats(const StatsArgs& a, const ReducePlan& plan, cudaStream_t stream) {
  if (!plan_ok(plan, a.dt, a.M, a.C) || (plan.vec > 1 && !aligned16(a.z))) return cudaErrorInvalidValue;
  const dim3 block(plan.bx, plan.by), grid(plan.gx, plan.gy);
  FASTRES_REDUCE_CASES(bn_stats_kernel, a)
  return cudaGetLastError();
}

cudaError_t launch_bn_apply(const ApplyArgs& a, cudaStream_t stream) {
  if (a.M < 1 || a.C < 1) return cudaErrorInvalidValue;
  const bool vec = a.C % 8 == 0 && aligned16(a.z) && aligned16(a.residual) && aligned16(a.y);
  if (vec) {
    dim3 block, grid;
    plan_2d(a.M, a.C / 8, block, grid);
    FASTRES_ELEMENTWISE_CASES(bn_apply_vec_kernel, grid, block, a)
  } else {
    const unsigned grid = plan_1d(ceil_div(a.M * a.C, 8));
    FASTRES_ELEMENTWISE_CASES(bn_apply_scalar_kernel, grid, kThreads, a)
  }
  return cudaGetLastError();
}

cudaError_t launch_bn_backward(const BackwardArgs& a, const ReducePlan& plan, cudaStream_t stream) {
  if (!plan_ok(plan, a.dt, a.M, a.C) || (plan.vec > 1 && !(aligned16(a.grad_y) && aligned16(a.z))))
    return cudaErrorInvalidValue;
  {
    const dim3 block(plan.bx, plan.by), grid(plan.gx, plan.gy);
    FASTRES_REDUCE_CASES(bn_backward_reduce_kernel, a)
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const bool vec = a.C % 8 == 0 && aligned16(a.grad_y) && aligned16(a.z) && aligned16(a.dz) &&
                   aligned16(a.dres);
  if (vec) {
    dim3 block, grid;
    plan_2d(a.M, a.C / 8, block, grid);
    FASTRES_ELEMENTWISE_CASES(bn_backward_vec_kernel, grid, block, a)
  } else {
    const unsigned grid = plan_1d(ceil_div(a.M * a.C, 8));
    FASTRES_ELEMENTWISE_CASES(bn_backward_scalar_kernel, grid, kThreads, a)
  }
  return cudaGetLastError();
}

}  // namespace fastres
