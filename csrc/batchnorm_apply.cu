// bn_apply of fastres._C: y = act((z - mean) * weight * invstd + bias (+ residual)) over NHWC data
// seen as [M, C], and the packed ReLU bit mask of y > 0. Elementwise, no workspace.
#include "batchnorm_common.cuh"

namespace fastres {
namespace {

using namespace detail;

// act((z - mean) * scale + shift (+ residual)). ReLU as (y < 0 ? 0 : y) keeps NaN visible.
__device__ __forceinline__ float apply_elem(float z, float mean, float scale, float shift, float res,
                                            bool relu) {
  float y = fmaf(z - mean, scale, shift) + res;
  return relu && y < 0.f ? 0.f : y;
}

// Vector path (C % 8 == 0, 16-byte aligned pointers). Thread (tx, ty) of block (X, Y) owns channels
// c0 = (X * bx + tx) * 8 .. c0 + 7 and rows r = Y * by + ty + k * gy * by; its 8 elements of a row
// are memory positions r*C + c0 .. + 7, which make mask byte (r*C + c0) / 8.
//   T: element type of z, residual and y; a: the arguments (batchnorm_kernels.h, ApplyArgs).
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
// which make mask byte k (positions past the end are 0 bits). T, a: as bn_apply_vec_kernel.
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

}  // namespace

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

}  // namespace fastres
