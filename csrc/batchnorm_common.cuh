// Shared by the BatchNorm kernels of fastres._C (batchnorm_stats.cu, batchnorm_apply.cu,
// batchnorm_backward.cu): element access, the deterministic per-channel reduction (Welford / plain sums,
// block tree, grid merge by the last block), and the launch-configuration helpers of batchnorm_plan.cu.
// CUDA headers only. All arithmetic is fp32.
//
// Two paths per kernel, chosen on the host side of each launcher:
// * vector: 16-byte loads/stores along C, when C is a multiple of the vector width (and, for the
//   elementwise kernels, of 8, so one thread's 8 channels make one whole mask byte) and every data
//   pointer is 16-byte aligned;
// * scalar: any C, any alignment.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "batchnorm_kernels.h"

namespace fastres {
namespace detail {

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
// deterministic per-channel reductions (bn_stats, pass 1 of bn_backward)
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

// One more row x[0, V) into a Welford summary. The division is IEEE (no --use_fast_math): an
// approximate 1/n would bias the mean of long columns.
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
// Staging layout: a[gy][C], b[gy][C], n[gx][gy].
// Counters: counters[blockIdx.x] counts the blocks of column blockIdx.x that have arrived; it must be
// zero on entry, and the last block resets it to zero, so one zeroed buffer serves every later launch
// on the same stream (batchnorm.cpp keeps one per device and stream) and every CUDA graph replay.
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
// launch configuration (host; defined in batchnorm_plan.cu)
// ------------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int elem_size(DType dt) { return dt == DType::f32 ? 4 : 2; }

// Block (bx, by) and grid (gx, gy) for the 2-D elementwise kernels: `groups` channel groups of 8 per
// row, M rows, at most about 8 resident blocks per SM (rows are then walked with a grid stride).
void plan_2d(int64_t M, int groups, dim3& block, dim3& grid);

// 1-D grid-stride launch over `chunks` work items (one per thread per step).
unsigned plan_1d(int64_t chunks);

// A reduction plan the kernels can run for M rows of C channels of dtype dt.
bool plan_ok(const ReducePlan& plan, DType dt, int64_t M, int C);

}  // namespace detail
}  // namespace fastres

// Launches KERNEL<T, V> for the element type of a.dt and the plan's vector width (in a launcher with
// `a`, `plan`, `grid`, `block` and `stream` in scope).
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

// Launches KERNEL<T> for the element type of a.dt.
#define FASTRES_ELEMENTWISE_CASES(KERNEL, GRID, BLOCK, ARGS)                                      \
  switch (a.dt) {                                                                                 \
    case DType::f32: KERNEL<float><<<GRID, BLOCK, 0, stream>>>(ARGS); break;                      \
    case DType::f16: KERNEL<__half><<<GRID, BLOCK, 0, stream>>>(ARGS); break;                     \
    case DType::bf16: KERNEL<__nv_bfloat16><<<GRID, BLOCK, 0, stream>>>(ARGS); break;             \
    default: return cudaErrorInvalidValue;                                                        \
  }
