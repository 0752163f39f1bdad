// bn_backward of fastres._C over NHWC data seen as [M, C]: the BatchNorm (+ ReLU) backward.
//
// The math (dbeta, dgamma, dres, dz in training and eval) is derived once, in the docstring of
// fastres/ops/reference.py; with g = dL/dy masked by the ReLU bit mask and n = M, the kernels here
// compute it in two passes:
// * bn_backward_reduce_kernel (the deterministic grid reduction of batchnorm_common.cuh):
//     sum(g) and sum(g * (z - mean)) per channel; its last block per channel column writes
//     dbeta = sum(g), dgamma = invstd * sum(g * (z - mean)) and the coefficients of dz:
//     k_g = gamma * invstd,  k_z = -k_g * invstd * dgamma / n,  k_0 = -k_g * dbeta / n  (training)
//     k_g = gamma * invstd,  k_z = 0,                           k_0 = 0                 (eval)
// * bn_backward_vec_kernel / bn_backward_scalar_kernel (elementwise):
//     dz = k_g * g + k_z * (z - mean) + k_0, and dres = g when asked.
#include "batchnorm_common.cuh"

namespace fastres {
namespace {

using namespace detail;

// dz from the per-channel coefficients: dz = k_g * g + k_z * (z - mean) + k_0.
__device__ __forceinline__ float dz_elem(float g, float z, float mean, float kg, float kz, float k0) {
  return fmaf(kg, g, fmaf(kz, z - mean, k0));
}

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
//   T: element type of grad_y, z, dz and dres; V: channels per thread (16 / sizeof(T) on the vector
//   path, else 1); a: the arguments (batchnorm_kernels.h, BackwardArgs).
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
//   T, a: as bn_backward_reduce_kernel; reads coef, written by it.
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
//   T, a: as bn_backward_reduce_kernel; reads coef, written by it.
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

}  // namespace

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
